// CUDA kernels of a d_state scan's input projections, for the cuda-onnxruntime graph (op ai.vmamba::ScanProjections;
// docs/cuda-onnxruntime.md, "ScanProjections").
//
// Why: the exporter's graph computes a v2 block's x_proj as three 1 x 1 convolutions of u (the dt-rank inputs, B and
// C, 4 R, 4 N and 4 N output channels) and dt_projs as a batched MatMul of inner dimension R. At batch 1 cuDNN and
// cuBLAS run those on kernels made for large problems (alignment-2 `wmma` tiles for 4 output channels, after a
// conversion of u to NHWC): 4 to 8 us each, about 0.25 ms of the fp16 graph's 1.0 ms of GPU time on an H100. The
// work is small (a 4 R + 8 N by Di matrix times u, then R products per delta channel), so two kernels do it on the
// CUDA cores, each with a launch shape that fills the GPU at batch 1 and waits on few rounds of loads:
//
//   x[b, j, p] = sum_c W_x[j, c] u[b, c, p]                        j < 4 R + 8 N (rows: dt ranks, B, C)
//   delta[b, k, c, p] = sum_r dt_weight[k, c, r] x[b, k R + r, p]
//   B[b, k, n, p] = x[b, 4 R + k N + n, p],  C[b, k, n, p] = x[b, 4 R + 4 N + k N + n, p]
//
// The first writes B and C and keeps the dt-rank rows in float32 in a scratch buffer on the stream (cudaMallocAsync,
// capturable in a CUDA graph); the second reads them back (from L2) and writes delta. float32 sums, one rounding to
// the tensor type (the fp16 graph's cuDNN and cuBLAS kernels round x to float16 before the dt projection; this does
// not).
#pragma once

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// u (batch, d_inner, len), w_x (4 rank + 8 d_state, d_inner), dt_weight (4, d_inner, rank); delta (batch, 4, d_inner,
// len), B and C (batch, 4, d_state, len), written. Device memory, one dtype (VMAMBA_SCAN_F32 0 or VMAMBA_SCAN_F16 1),
// `stream` a cudaStream_t. Returns null on success, else a static message.
__attribute__((visibility("default"))) const char* vmamba_scan_projections_cuda(int dtype, const void* u,
                                                                               const void* w_x, const void* dt_weight,
                                                                               void* delta, void* B, void* C,
                                                                               int64_t batch, int64_t d_inner,
                                                                               int64_t rank, int64_t d_state,
                                                                               int64_t len, void* stream);

// NarrowPointwiseConv: y (batch, out_channels, len) = weight (out_channels, in_channels) x (batch, in_channels, len),
// a bias-free 1 x 1 convolution to few output channels (a packed scan's X = [dt ranks | B | C] rows of u) by the
// first kernel above, every row to y. float32 sums, one rounding.
__attribute__((visibility("default"))) const char* vmamba_narrow_pointwise_conv_cuda(int dtype, const void* x,
                                                                                    const void* weight, void* y,
                                                                                    int64_t batch,
                                                                                    int64_t in_channels,
                                                                                    int64_t out_channels, int64_t len,
                                                                                    void* stream);

#ifdef __cplusplus
}
#endif
