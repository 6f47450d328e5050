// CPU kernel of the fused 2-D selective scan `vmamba::selective_scan_2d` (contract: docs/scan-op.md).
//
// float32 or bfloat16 data tensors (u, delta, B, C, y), float32 parameters (A_logs, D, delta_bias), float32 state
// and arithmetic. Threading is left to the caller: the kernel hands its work items to a
// ParallelFor callback, so the torch binding (c_api.cpp) can use plain std::threads and the ONNX Runtime op
// (custom_op.cpp) ORT's intra-op pool, without either runtime's threads fighting the other's.
#pragma once

#include <cstdint>

#include "parallel_for.h"

namespace vmamba {

struct ScanShape {
  int64_t batch;
  int64_t k;  // directions, must be 4
  int64_t d_inner;
  int64_t d_state;
  int64_t height;
  int64_t width;
};

// All tensors dense (contiguous, row-major) in the layouts of docs/scan-op.md. `T` is the storage of the data tensors:
// float, or uint16_t holding bfloat16 bits (OpenVINO's bf16 inference feeds the op bf16 without a conversion pass);
// the parameters are float32 in both.
template <typename T>
struct ScanTensorsOf {
  const T* u;               // (batch, d_inner, H, W)
  const T* delta;           // (batch, 4, d_inner, H, W), before bias and softplus
  const float* A_logs;      // (4 * d_inner, d_state); A = -exp(A_logs)
  const T* B;               // (batch, 4, d_state, H, W)
  const T* C;               // (batch, 4, d_state, H, W)
  const float* D;           // (4 * d_inner)
  const float* delta_bias;  // (4 * d_inner)
  T* y;                     // (batch, d_inner, H, W), written (not accumulated into)
  // Optional (OpenVINO for every rank, ONNX Runtime for ranks up to 8): the dt projection fused into the op. When
  // set, `delta` holds its input instead, (batch, 4, dt_rank, H, W), and delta of direction k, channel c is
  // sum_j dt_weight[(k * d_inner + c) * dt_rank + j] * delta[b, k, j] (dt_weight (4, d_inner, dt_rank)): the
  // (batch, 4, d_inner, H, W) tensor is never stored. Ranks up to 8 are projected inside the scan loop, larger ones
  // into the kernel's delta tile first.
  const float* dt_weight = nullptr;
  int64_t dt_rank = 0;
};
using ScanTensors = ScanTensorsOf<float>;
using ScanTensorsBf16 = ScanTensorsOf<uint16_t>;

// nullptr when the shape is one the kernel accepts, otherwise a static message saying why not.
const char* check_scan_shape(const ScanShape& shape);

// Computes y. Returns nullptr on success, otherwise a static error message (bad shape, null pointer, out of memory).
// `parallel_for` may be null (runs serially on the calling thread).
const char* selective_scan_2d_f32(const ScanTensors& tensors, const ScanShape& shape, ParallelFor parallel_for,
                                  void* parallel_ctx);

// Same with bfloat16 data tensors: read widened to float32, y rounded to nearest even (NaN stays NaN).
const char* selective_scan_2d_bf16(const ScanTensorsBf16& tensors, const ScanShape& shape, ParallelFor parallel_for,
                                   void* parallel_ctx);

// The instruction-set variant the dispatcher picked on this CPU: "x86-64-v4", "x86-64-v3" or "generic" on x86-64,
// "armv8.2-a+fp16+dotprod" or "armv8-a" on aarch64. The environment variable VMAMBA_SCAN_ISA (same names) forces a
// lower variant, for tests and benchmarks.
const char* scan_isa();

// A benchmark floor, not part of the op: the arithmetic of `rows` d_state-1 scan steps of 16 channels each
// (softplus, the decay's exponential, the state update and C . h: what one step of the kernel computes per tile row),
// run on registers only by independent chains, with no loads, stores or transposes. Timing it for the rows a model's
// scans take gives a lower bound on the kernel's time (benchmarks/cpu_profile.py). Returns a checksum.
float scan_arithmetic_floor(int64_t rows, ParallelFor parallel_for, void* parallel_ctx);

}  // namespace vmamba
