// CUDA kernel of the fused 2-D selective scan `vmamba::selective_scan_2d` (contract: docs/scan-op.md).
//
// float32 or float16 tensors (all seven inputs and the output share one type, as the ONNX op's type constraint T),
// float32 state and arithmetic. d_state 1 and 16 (every VMamba release) are compiled (the state lives in registers);
// any other d_state is refused with a clear error.
//
// C ABI, so tests and benchmarks can call it through ctypes with torch CUDA tensors, and the ONNX Runtime op
// (kernels/onnxruntime/cuda_op.cpp) on ORT's compute stream. Asynchronous: returns after queuing on `stream`.
#pragma once

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum VmambaScanDtype { VMAMBA_SCAN_F32 = 0, VMAMBA_SCAN_F16 = 1 };

// All pointers are device pointers to dense tensors in the layouts of docs/scan-op.md:
//   u (batch, d_inner, H, W), delta (batch, 4, d_inner, H, W), A_logs (4 * d_inner, d_state),
//   B, C (batch, 4, d_state, H, W), D, delta_bias (4 * d_inner), y (batch, d_inner, H, W) (written).
// `stream` is a cudaStream_t (null: the legacy default stream). Returns null on success, else a static message
// (bad shape, unsupported d_state, CUDA error at launch). Launch errors only: an asynchronous fault shows later.
__attribute__((visibility("default"))) const char* vmamba_selective_scan_2d_cuda(
    int dtype, const void* u, const void* delta, const void* A_logs, const void* B, const void* C, const void* D,
    const void* delta_bias, void* y, int64_t batch, int64_t d_inner, int64_t d_state, int64_t height, int64_t width,
    void* stream);

// The same scan with the input projections packed in one tensor, as one GEMM writes them (the cuda-onnxruntime
// graph's SelectiveScan2DPacked, docs/scan-op.md): x (batch, 4 * rank + 8 * d_state, height, width) holds per
// position the dt-rank inputs (4 x rank, direction-major), then B (4 x d_state), then C (4 x d_state); dt_weight
// (4, d_inner, rank) projects the first part to delta: delta[b, k, c, p] = sum_r dt_weight[k, c, r] x[b, k*rank + r,
// p]. The other pointers as above. The d_state-1 warp and line kernels read x in place (the warp kernel computes
// delta in its round of loads); other shapes are unpacked into a stream-ordered scratch buffer first.
__attribute__((visibility("default"))) const char* vmamba_selective_scan_2d_packed_cuda(
    int dtype, const void* u, const void* x, const void* dt_weight, const void* A_logs, const void* D,
    const void* delta_bias, void* y, int64_t batch, int64_t d_inner, int64_t d_state, int64_t rank, int64_t height,
    int64_t width, void* stream);

// The same scan with delta and B, C read from wider tensors, as two GEMMs of the cuda-onnxruntime graph write them
// (SelectiveScan2DMerged, docs/scan-op.md): delta is the first 4 * d_inner channels of `delta` (batch, delta_channels,
// height, width), B and C the last 8 * d_state channels of `x` (batch, x_channels, height, width), B first. `delta` and
// `x` may be the same tensor. The d_state-1 line kernel reads them in place; other shapes copy them out first.
__attribute__((visibility("default"))) const char* vmamba_selective_scan_2d_merged_cuda(
    int dtype, const void* u, const void* delta, int64_t delta_channels, const void* x, int64_t x_channels,
    const void* A_logs, const void* D, const void* delta_bias, void* y, int64_t batch, int64_t d_inner,
    int64_t d_state, int64_t height, int64_t width, void* stream);

// Forces a path for tests and benchmarks: 0 automatic (default), 1 the chunked shared-memory kernel, 2 the
// global-memory fallback (used automatically when a channel's map does not fit in shared memory), 3 the block-scan
// kernel (d_state 1; automatic whenever its planes fit in shared memory and the line kernel does not take the map),
// 4 the line kernel (d_state 1, maps of at most 416 chunks of 7 or 8 steps a line; automatic for them), 5 the warp
// kernel (d_state 1, maps of at most 256 positions; automatic for them up to 4096 batch x d_inner channels).
__attribute__((visibility("default"))) void vmamba_selective_scan_2d_cuda_force_path(int path);

// Tuning of the shared-memory and line kernels, for benchmarks (0: automatic, the default): channels per block
// (capped by shared memory and the threads a block) and the shared-memory kernel's chunk threads per channel
// (automatic: one per line, at most 64; fewer chunks mean fewer exponentials evaluated twice, less parallelism).
__attribute__((visibility("default"))) void vmamba_selective_scan_2d_cuda_set_tuning(int channels_per_block,
                                                                                      int chunk_threads);

// Variant of the block-scan kernel, for benchmarks: 0 automatic, 1 one channel a block (three blocks per
// multiprocessor), 2 two channels a block (the default when d_inner is even), 4 two channels, registers uncapped;
// + 8: scalar staging loads; + 16: the chunked kernel's threads channel-major instead of interleaved; + 32: the
// block kernel's planes at the odd row stride instead of the stride with the fewest bank conflicts; + 64: the
// chunked kernel with one lane per (channel, chunk) holding all 16 states (default for d_state 16: two lanes, eight
// states each); + 128: the line kernel without its L2 prefetch (on by default for float16 maps of stage-1 size);
// + 256: no warp kernel on the automatic path (the line kernel takes its maps); + 512: the packed op's X is unpacked
// (delta computed into a scratch buffer, then the usual dispatch) rather than read in place by the line kernel.
__attribute__((visibility("default"))) void vmamba_selective_scan_2d_cuda_set_block_variant(int variant);

// Human-readable summary of the launch configuration the last call chose (for benchmarks; not thread-safe).
__attribute__((visibility("default"))) const char* vmamba_selective_scan_2d_cuda_last_config(void);

#ifdef __cplusplus
}
#endif
