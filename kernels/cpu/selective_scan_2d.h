// CPU kernel of the fused 2-D selective scan `vmamba::selective_scan_2d` (contract: docs/scan-op.md).
//
// float32 inputs and output, float32 state. Threading is left to the caller: the kernel hands its work items to a
// ParallelFor callback, so the torch binding (c_api.cpp) can use plain std::threads and the ONNX Runtime op
// (custom_op.cpp) ORT's intra-op pool, without either runtime's threads fighting the other's.
#pragma once

#include <cstdint>

namespace vmamba {

// Runs fn(arg, i) for every i in [0, n), possibly concurrently, and returns when all calls are done.
using ParallelFor = void (*)(void* ctx, int64_t n, void (*fn)(void* arg, int64_t i), void* arg);

struct ScanShape {
  int64_t batch;
  int64_t k;  // directions, must be 4
  int64_t d_inner;
  int64_t d_state;
  int64_t height;
  int64_t width;
};

// All tensors dense (contiguous, row-major) in the layouts of docs/scan-op.md.
struct ScanTensors {
  const float* u;           // (batch, d_inner, H, W)
  const float* delta;       // (batch, 4, d_inner, H, W), before bias and softplus
  const float* A_logs;      // (4 * d_inner, d_state); A = -exp(A_logs)
  const float* B;           // (batch, 4, d_state, H, W)
  const float* C;           // (batch, 4, d_state, H, W)
  const float* D;           // (4 * d_inner)
  const float* delta_bias;  // (4 * d_inner)
  float* y;                 // (batch, d_inner, H, W), written (not accumulated into)
};

// nullptr when the shape is one the kernel accepts, otherwise a static message saying why not.
const char* check_scan_shape(const ScanShape& shape);

// Computes y. Returns nullptr on success, otherwise a static error message (bad shape, null pointer, out of memory).
// `parallel_for` may be null (runs serially on the calling thread).
const char* selective_scan_2d_f32(const ScanTensors& tensors, const ScanShape& shape, ParallelFor parallel_for,
                                  void* parallel_ctx);

// The instruction-set variant the dispatcher picked on this CPU: "x86-64-v4", "x86-64-v3" or "generic".
// The environment variable VMAMBA_SCAN_ISA (same names) forces a lower variant, for tests and benchmarks.
const char* scan_isa();

}  // namespace vmamba
