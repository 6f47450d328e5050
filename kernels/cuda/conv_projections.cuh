// CUDA kernel of a v2 block's depthwise convolution + SiLU together with the scan's input projections, for the
// cuda-onnxruntime graph (op ai.vmamba::DepthwiseConvProjections; docs/cuda-onnxruntime.md, "DepthwiseConvProjections").
//
// Why: at batch 1 the chain DepthwiseConvSiLU -> ScanProjections costs three kernels (ScanProjections is two) whose
// work is small and whose time is mostly ramp-up and waiting on loads: about 14 us of an H100's time per block for
// the projections alone (run 35). The projections of a position need u at that position for every channel, which the
// convolution has just computed; one block that computes u for all channels of a few positions can project them
// while they are still in shared memory, and compute delta from the dt-rank rows it has just summed. One kernel then
// does what three did.
//
// Block (tile of `tile` consecutive positions p, direction k, batch element b), three phases:
//
//   u[c, p] = silu(bias[c] + sum_{i,j} weight[c, 0, i, j] x[b, h + i - 1, w + j - 1, c])     every channel c
//   x[r, p] = sum_c W_x[row_k(r), c] u[c, p]        the R dt-rank rows, N B rows and N C rows of direction k
//   delta[b, k, c, p] = sum_r dt_weight[k, c, r] x[r, p]                                      r < R
//
// u is rounded to the tensor type before the projections (what the unfused graph projects); x stays float32 in
// shared memory (ScanProjections keeps it float32 too) and is rounded once where it is written (B, C). The four
// direction blocks of a tile each compute the tile's u (cheap: 9 taps a channel); the direction-0 block writes it.
// Channel counts must be even (channel pairs are read together).
#pragma once

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// x (batch, height, width, d_inner) channels-last, conv_weight (d_inner, 1, 3, 3), conv_bias (d_inner,) or null,
// w_x (4 rank + 8 d_state, d_inner) (rows: the four directions' dt ranks, then B, then C), dt_weight (4, d_inner,
// rank); written: u (batch, d_inner, height, width), delta (batch, 4, d_inner, height, width), B and C (batch, 4,
// d_state, height, width). Device memory, one dtype (VMAMBA_SCAN_F32 0 or VMAMBA_SCAN_F16 1), `stream` a
// cudaStream_t. Returns null on success, else a static message.
__attribute__((visibility("default"))) const char* vmamba_depthwise_conv_projections_cuda(
    int dtype, const void* x, const void* conv_weight, const void* conv_bias, const void* w_x, const void* dt_weight,
    void* u, void* delta, void* B, void* C, int64_t batch, int64_t height, int64_t width, int64_t d_inner,
    int64_t rank, int64_t d_state, void* stream);

// Positions a block takes for later calls: 1, 2, 4, 8, 16 or 32, or 0 (automatic: the largest tile that still gives
// every two multiprocessors a block and fits shared memory), for tests and A/B timing. Returns the tile in force.
__attribute__((visibility("default"))) int vmamba_depthwise_conv_projections_cuda_set_tile(int tile);

// The tile a call with these sizes takes on the current device (as set_tile and the automatic choice say); 0 where
// none fits shared memory or the device cannot be queried.
__attribute__((visibility("default"))) int vmamba_depthwise_conv_projections_cuda_tile(int64_t batch, int64_t height,
                                                                                      int64_t width, int64_t d_inner,
                                                                                      int64_t rank, int64_t d_state);

#ifdef __cplusplus
}
#endif
