// The arithmetic floor of a d_state-16 selective scan on this GPU (benchmarks only; API: scan_floor.cuh).
//
// Why: the issue's bandwidth target for the d_state-16 scan (70% of copy bandwidth) asks for less time than the
// exponentials alone take. Rather than argue from data sheets, `floor_kernel` measures it: every thread runs the
// work one scan step must do per state element, and nothing else, on registers only (no loads, no stores but one
// result a thread): decay 2^(dt * a2[n]), drive x * b[n], h = decay * h + drive, y += c[n] * h. Any real kernel
// does at least this per (position, channel, direction, state) plus its memory traffic, softplus and indexing, so
// elements / (measured elements per second) is a lower bound on its time.
//
// The exponentials run on the special-function units (ex2.approx, 16 lanes per clock per multiprocessor) or, for
// `poly_states` of the 16 states, as a polynomial on the FMA pipes (`ex2_fma`); benchmarks/gpu_check.py times every
// mix and keeps the best, so the floor is not an artefact of one unit. (On the H200 the special-function units alone
// win: the FMA pipes are busy with the step's own four instructions.)

#include "scan_floor.cuh"
#include "ex2.cuh"

#include <cuda_runtime.h>

#include <cstdio>

namespace {

constexpr int kStates = 16;
constexpr int kThreads = 256;

using vmamba_cuda_detail::ex2;

// 2^x for x in [-126, 0] on the FMA pipes: 2^floor(x) as an exponent-field add, 2^f (f in [0, 1)) as a degree-5
// polynomial (least-squares fit of the relative error on Chebyshev nodes: 1.6e-7 relative in float32, as accurate
// as ex2.approx's 2^-22).
__device__ __forceinline__ float ex2_fma(float x) {
  x = fmaxf(x, -126.0f);
  const float i = floorf(x);
  const float f = x - i;
  float p = 0.0018776833f;
  p = fmaf(p, f, 0.0089890827f);
  p = fmaf(p, f, 0.055826534f);
  p = fmaf(p, f, 0.24015355f);
  p = fmaf(p, f, 0.69315308f);
  p = fmaf(p, f, 0.99999994f);
  return __int_as_float(__float_as_int(p) + (static_cast<int>(i) << 23));
}

template <int kPoly>
__global__ void __launch_bounds__(kThreads) floor_kernel(int steps, float* out) {
  const int tid = blockIdx.x * blockDim.x + threadIdx.x;
  float a2[kStates], b[kStates], c[kStates], h[kStates];
#pragma unroll
  for (int n = 0; n < kStates; ++n) {
    a2[n] = -0.1f * (n + 1) - 1e-7f * (tid & 1023);
    b[n] = 0.5f + 0.01f * n;
    c[n] = 1.0f - 0.02f * n;
    h[n] = 0.0f;
  }
  float dt = 0.5f + 1e-6f * (tid & 255);
  float x = 0.25f + 0.01f * (tid & 7);
  float y = 0.0f;
  for (int s = 0; s < steps; ++s) {
    float acc = 0.0f;
#pragma unroll
    for (int n = 0; n < kStates; ++n) {
      const float z = dt * a2[n];
      const float decay = n < kPoly ? ex2_fma(z) : ex2(z);
      h[n] = fmaf(decay, h[n], x * b[n]);
      acc = fmaf(c[n], h[n], acc);
    }
    y += acc;
    // The next step's dt and x: one instruction each (a real kernel loads them, and computes softplus).
    dt = fmaf(dt, 0.999f, 1e-3f);
    x = fmaf(x, -0.5f, 1.5f);
  }
  out[tid] = y;
}

template <int kPoly>
cudaError_t launch_floor(int blocks, int steps, float* out, cudaStream_t stream) {
  floor_kernel<kPoly><<<blocks, kThreads, 0, stream>>>(steps, out);
  return cudaGetLastError();
}

__global__ void exp2_poly_kernel(const float* x, float* y, int64_t n) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i < n) y[i] = ex2_fma(x[i]);
}

}  // namespace

extern "C" const char* vmamba_scan_floor(int poly_states, int blocks, int steps, float* out, void* stream) {
  if (blocks < 1 || steps < 1 || out == nullptr) return "blocks and steps must be >= 1, out non-null";
  auto s = static_cast<cudaStream_t>(stream);
  cudaError_t err;
  switch (poly_states) {
    case 0: err = launch_floor<0>(blocks, steps, out, s); break;
    case 2: err = launch_floor<2>(blocks, steps, out, s); break;
    case 3: err = launch_floor<3>(blocks, steps, out, s); break;
    case 4: err = launch_floor<4>(blocks, steps, out, s); break;
    case 5: err = launch_floor<5>(blocks, steps, out, s); break;
    case 6: err = launch_floor<6>(blocks, steps, out, s); break;
    case 8: err = launch_floor<8>(blocks, steps, out, s); break;
    case 16: err = launch_floor<16>(blocks, steps, out, s); break;
    default: return "poly_states must be one of 0, 2, 3, 4, 5, 6, 8, 16";
  }
  if (err == cudaSuccess) return nullptr;
  static thread_local char message[256];
  std::snprintf(message, sizeof(message), "scan floor kernel launch: %s", cudaGetErrorString(err));
  return message;
}

extern "C" int vmamba_scan_floor_threads(void) { return kThreads; }

extern "C" const char* vmamba_exp2_poly(const float* x, float* y, int64_t n, void* stream) {
  if (n <= 0) return nullptr;
  exp2_poly_kernel<<<static_cast<unsigned>((n + 255) / 256), 256, 0, static_cast<cudaStream_t>(stream)>>>(x, y, n);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : "exp2 polynomial kernel launch failed";
}
