// CUDA depthwise 3 x 3 convolution + SiLU from a channels-last map to a channel-first one, for the cuda-onnxruntime
// graph (op ai.vmamba::DepthwiseConvSiLU; docs/cuda-onnxruntime.md, "Fused ops").
//
// Why: in a VMamba block the input projection leaves the map channels-last and the scan wants it channel-first, with a
// depthwise convolution and SiLU between. Unfused that is a Transpose, cuDNN's convolution and the activation: three
// or more kernels per block, which at batch 1 cost more in launches than in bytes. One kernel reads the channels-last
// rows into shared memory and writes the activated channel-first output.
//
// Channel counts must be even.
//
// y[b, c, h, w] = silu(bias[c] + sum_{i,j in 0..2} weight[c, 0, i, j] * x[b, h + i - 1, w + j - 1, c]), zero padding
// of one pixel, stride 1, float32 arithmetic, one rounding to the tensor type at the end.
#pragma once

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// x: (batch, height, width, channels), weight: (channels, 1, 3, 3), bias: (channels,) or null, y: (batch, channels,
// height, width); device memory, one dtype (VMAMBA_SCAN_F32 0 or VMAMBA_SCAN_F16 1). Returns null on success, else a
// static message.
__attribute__((visibility("default"))) const char* vmamba_depthwise_conv_silu_cuda(int dtype, const void* x,
                                                                                  const void* weight, const void* bias,
                                                                                  void* y, int64_t batch,
                                                                                  int64_t height, int64_t width,
                                                                                  int64_t channels, void* stream);

#ifdef __cplusplus
}
#endif
