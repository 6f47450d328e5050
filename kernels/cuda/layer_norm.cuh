// CUDA LayerNorm over the last axis, for the cuda-onnxruntime graph (op ai.vmamba::LastAxisLayerNorm).
//
// Why our own: ONNX Runtime's CUDA LayerNormalization runs one 32-thread block per row group, which suits wide rows
// (transformers, C >= 768) but not VMamba's many narrow ones: at batch 128 fp16 on an H200 its 48 norms of
// vmamba_tiny_s1l8 took 6.4 ms, about ten times their memory traffic (benchmarks/results/gpu/). Here 8, 16 or 32
// threads share a row (by its width), hold it in registers and reduce with warp shuffles: one read, one write.
//
// float32 or float16 tensors (x, scale, bias and y share the type), float32 statistics: mean, then the biased
// variance from the centred values (two passes over registers, as PyTorch's layer_norm), y = (x - mean) *
// rsqrt(var + eps) * scale + bias. Widths up to kMaxWidth.
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

#ifdef __cplusplus
}
#endif
