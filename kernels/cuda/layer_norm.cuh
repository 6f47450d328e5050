// CUDA LayerNorms for the cuda-onnxruntime graph: ops ai.vmamba::LastAxisLayerNorm, ResidualLayerNorm and
// TransposeLayerNorm (docs/cuda-onnxruntime.md, "The graph around the scan" and "Fused ops").
//
// Why our own: ONNX Runtime's CUDA LayerNormalization runs one 32-thread block per row group, which suits wide rows
// (transformers, C >= 768) but not VMamba's many narrow ones: at batch 128 fp16 on an H200 its 48 norms of
// vmamba_tiny_s1l8 took 6.4 ms, about ten times their memory traffic (benchmarks/results/gpu/). Here 8, 16 or 32
// threads share a row (by its width), hold it in registers and reduce with warp shuffles: one read, one write.
// The two fused forms remove kernels that would run beside each norm at batch 1, where launches, not bytes, set
// the time: the residual Add(s) before a norm, and the Transpose from a channel-first map (the scan's output, a
// convolution's) into the channels-last residual stream.
//
// float32 or float16 tensors (all of one call share the type), float32 statistics: mean, then the biased variance
// from the centred values (two passes, as PyTorch's layer_norm), y = (x - mean) * rsqrt(var + eps) * scale + bias.
// Normalised widths: even, 2 to VMAMBA_LAYER_NORM_MAX_WIDTH.
#pragma once

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum { VMAMBA_LAYER_NORM_MAX_WIDTH = 2048 };

// x and y: (rows, width) dense, device memory; scale and bias: (width,). `dtype`: VMAMBA_SCAN_F32 (0) or
// VMAMBA_SCAN_F16 (1). Returns null on success, else a static message (width out of range, launch error).
__attribute__((visibility("default"))) const char* vmamba_layer_norm_cuda(int dtype, const void* x, const void* scale,
                                                                         const void* bias, void* y, int64_t rows,
                                                                         int64_t width, float epsilon, void* stream);

// ResidualLayerNorm: s = (x + x_bias) + residual, y = LayerNorm(s) over the last axis; each sum is rounded to the
// tensor type, as the unfused graph's Adds round. x, residual, y and sum: (rows, width); x_bias: (width,) or null;
// sum: written unless null. With residual null this is vmamba_layer_norm_cuda.
__attribute__((visibility("default"))) const char* vmamba_residual_layer_norm_cuda(
    int dtype, const void* x, const void* residual, const void* x_bias, const void* scale, const void* bias, void* y,
    void* sum, int64_t rows, int64_t width, float epsilon, void* stream);

// TransposeLayerNorm: x (batch, channels, positions) channel-first, y (batch, positions, channels), each row of y the
// LayerNorm over the channels of one position: LastAxisLayerNorm(Transpose(x, [0, 2, 3, 1])) for a 4-D map.
// batch at most 65535.
__attribute__((visibility("default"))) const char* vmamba_transpose_layer_norm_cuda(
    int dtype, const void* x, const void* scale, const void* bias, void* y, int64_t batch, int64_t channels,
    int64_t positions, float epsilon, void* stream);

#ifdef __cplusplus
}
#endif
