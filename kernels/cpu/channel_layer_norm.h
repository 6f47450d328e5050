// CPU kernel of `ai.vmamba::ChannelLayerNorm`: LayerNorm over the channel axis of an NCHW map, in place of the
// Transpose -> LayerNormalization(last axis) -> Transpose that LayerNorm2d exports to (docs/scan-op.md, "Other ops").
//
//   y[n, c, p] = (x[n, c, p] - mean[n, p]) * rstd[n, p] * weight[c] + bias[c]
//   mean[n, p] = sum_c x[n, c, p] / C,  rstd[n, p] = 1 / sqrt(sum_c (x[n, c, p] - mean[n, p])^2 / C + epsilon)
//
// float32 throughout, two passes over the channels (mean, then the centred variance) as torch computes it. The
// pixels of one channel are contiguous, so the kernel runs whole vectors of pixels down the channels: no horizontal
// reductions and no transposes.
#pragma once

#include <cstdint>

#include "parallel_for.h"

namespace vmamba {

struct ChannelNormShape {
  int64_t batch;
  int64_t channels;  // C, the normalised axis
  int64_t pixels;    // product of the dimensions after the channel axis (H * W)
};

// All tensors dense (contiguous, row-major): x and y (batch, channels, pixels), weight and bias (channels). y must
// not overlap x.
struct ChannelNormTensors {
  const float* x;
  const float* weight;
  const float* bias;
  float* y;
};

// nullptr when the shape is one the kernel accepts, otherwise a static message saying why not.
const char* check_channel_norm_shape(const ChannelNormShape& shape);

// Computes y. Returns nullptr on success, otherwise a static error message. `parallel_for` may be null
// (runs serially on the calling thread).
const char* channel_layer_norm_f32(const ChannelNormTensors& tensors, const ChannelNormShape& shape, float epsilon,
                                   ParallelFor parallel_for, void* parallel_ctx);

// The instruction-set variant in use (isa_dispatch.h names; VMAMBA_SCAN_ISA forces a lower one, as for the scan).
const char* channel_norm_isa();

}  // namespace vmamba
