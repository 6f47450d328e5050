// CUDA kernel of the fused 2-D selective scan (contract: docs/scan-op.md; API: selective_scan_2d.cuh).
//
// Work decomposition (main path, `scan_smem_kernel`): one thread block owns (batch b, a tile of `ct` channels) and
// runs all four directions one after the other, so y is accumulated on chip: the block keeps the channels' y
// (float32) and u in shared memory for the whole call and writes y to device memory once at the end. No two blocks
// touch the same y element (no atomics, no per-direction scratch): the device-memory traffic is the floor, each
// input read once from DRAM (B and C, shared by all channels of a direction, come from L2) and y written once.
//
// Inside a block each direction's sequence is cut into chunks of whole lines (rows for directions 0 and 2, columns
// for 1 and 3; consecutive lanes own consecutive lines): a column-direction step of a warp then reads consecutive
// addresses (coalesced), and a row-direction lane walks along its own row (each 32-byte sector serves 8 steps
// from L1). Shared memory rows are padded to an odd stride so both orientations are free of bank conflicts.
// Chunked two-pass scan: pass A scans every chunk but the last from a zero state, keeping only its end state and
// the sum of its dt (its decay over the chunk is exp(A * sum dt)); the chunk carries are folded in sequence order
// (one thread per (channel, state)); pass B rescans each chunk from its true initial state and adds C . h to y.
// With 56 x 56 maps that is 56-way parallelism per (channel, direction), which batch 1 needs (only 4 * d_inner
// independent recurrences otherwise); the price is a second evaluation of the exponentials.
//
// Fallback (`scan_global_kernel`), when one channel's map does not fit in shared memory (a stage-1 map of more
// than about 26 000 positions): one thread per (b, channel), serial, y accumulated in float32 device memory (y
// itself for float32, a temporary buffer for float16). Correct for any size, not tuned.
//
// Numerics: float32 state and arithmetic, A = -exp(A_logs) computed in float32 (accurate expf), decay exp(dt * A)
// by ex2.approx (relative error about 2^-22), softplus as log1pf(expf(x)) (x for x > 20, as PyTorch).

#include "selective_scan_2d.cuh"

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>

namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr int kMaxThreads = 256;

__device__ __forceinline__ float ex2(float x) {
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
}

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T from_f(float x);
template <>
__device__ __forceinline__ float from_f<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_f<__half>(float x) {
  return __float2half_rn(x);
}

__device__ __forceinline__ float softplus(float x) { return x > 20.0f ? x : log1pf(__expf(x)); }

struct Params {
  const void* u;
  const void* delta;
  const void* A_logs;
  const void* B;
  const void* C;
  const void* D;
  const void* delta_bias;
  void* y;
  int batch, di, height, width;
  int wp;   // shared-memory row stride (odd)
  int ct;   // channels per block
  int nch;  // chunk threads per channel
};

// One chunk (lines [l0, l1) in direction K's order) of one channel. `delta`, `b_mat`, `c_mat` point at the
// (b, k, channel) / (b, k) planes; `u_row` / `y_row` are maps of row stride `stride` (shared or device memory).
// kPassB: add C . h to y; otherwise accumulate the chunk's dt sum (pass A).
template <int N, typename T, typename UT, int K, bool kPassB>
__device__ __forceinline__ void scan_chunk(int height, int width, int stride, int l0, int l1, const T* __restrict__ delta,
                                           const T* __restrict__ b_mat, const T* __restrict__ c_mat, const UT* u_map,
                                           float* y_map, float bias, const float (&a2)[N], float (&h)[N],
                                           float& dt_sum) {
  constexpr bool kRows = (K % 2) == 0;
  constexpr bool kReverse = K >= 2;
  const int len = height * width;
  const int line_len = kRows ? width : height;
  const int nlines = kRows ? height : width;
  for (int l = l0; l < l1; ++l) {
    const int line = kReverse ? nlines - 1 - l : l;
#pragma unroll 4
    for (int s = 0; s < line_len; ++s) {
      const int along = kReverse ? line_len - 1 - s : s;
      const int row = kRows ? line : along;
      const int col = kRows ? along : line;
      const int p = row * width + col;
      const int m = row * stride + col;
      const float dt = softplus(to_f(delta[p]) + bias);
      const float dtu = dt * to_f(u_map[m]);
      float acc = 0.0f;
#pragma unroll
      for (int n = 0; n < N; ++n) {
        h[n] = ex2(dt * a2[n]) * h[n] + dtu * to_f(b_mat[n * len + p]);
        if constexpr (kPassB) acc += h[n] * to_f(c_mat[n * len + p]);
      }
      if constexpr (kPassB) {
        y_map[m] += acc;
      } else {
        dt_sum += dt;
      }
    }
  }
}

template <int N, typename T, typename UT, bool kPassB>
__device__ __forceinline__ void scan_chunk_k(int k, int height, int width, int stride, int l0, int l1,
                                             const T* delta, const T* b_mat, const T* c_mat, const UT* u_map,
                                             float* y_map, float bias, const float (&a2)[N], float (&h)[N],
                                             float& dt_sum) {
  switch (k) {
    case 0:
      scan_chunk<N, T, UT, 0, kPassB>(height, width, stride, l0, l1, delta, b_mat, c_mat, u_map, y_map, bias, a2, h,
                                      dt_sum);
      break;
    case 1:
      scan_chunk<N, T, UT, 1, kPassB>(height, width, stride, l0, l1, delta, b_mat, c_mat, u_map, y_map, bias, a2, h,
                                      dt_sum);
      break;
    case 2:
      scan_chunk<N, T, UT, 2, kPassB>(height, width, stride, l0, l1, delta, b_mat, c_mat, u_map, y_map, bias, a2, h,
                                      dt_sum);
      break;
    default:
      scan_chunk<N, T, UT, 3, kPassB>(height, width, stride, l0, l1, delta, b_mat, c_mat, u_map, y_map, bias, a2, h,
                                      dt_sum);
      break;
  }
}

template <typename T>
__device__ __forceinline__ float d_sum(const T* D, int di, int c) {
  return to_f(D[c]) + to_f(D[di + c]) + to_f(D[2 * di + c]) + to_f(D[3 * di + c]);
}

template <int N, typename T>
__device__ __forceinline__ void load_a2(const T* A_logs, int di, int k, int c, float (&a2)[N]) {
#pragma unroll
  for (int n = 0; n < N; ++n) a2[n] = -expf(to_f(A_logs[(static_cast<int64_t>(k) * di + c) * N + n])) * kLog2e;
}

template <int N, typename T>
__global__ void __launch_bounds__(kMaxThreads) scan_smem_kernel(Params P) {
  extern __shared__ float smem[];
  const int height = P.height, width = P.width, di = P.di, stride = P.wp, nch = P.nch;
  const int len = height * width;
  const int plane = height * stride;
  float* sy = smem;                    // [ct][plane] y accumulator
  float* su = sy + P.ct * plane;       // [ct][plane] u
  float* carry = su + P.ct * plane;    // [ct][nch][N + 1] chunk end states and dt sums, then initial states

  const T* u = static_cast<const T*>(P.u);
  const T* delta = static_cast<const T*>(P.delta);
  const T* A_logs = static_cast<const T*>(P.A_logs);
  const T* Bm = static_cast<const T*>(P.B);
  const T* Cm = static_cast<const T*>(P.C);
  const T* D = static_cast<const T*>(P.D);
  const T* dbias = static_cast<const T*>(P.delta_bias);
  T* y = static_cast<T*>(P.y);

  const int b = blockIdx.y;
  const int c0 = blockIdx.x * P.ct;
  const int nc = min(P.ct, di - c0);

  // u into shared memory (coalesced), y = (sum over directions of D) * u.
  for (int idx = threadIdx.x; idx < nc * len; idx += blockDim.x) {
    const int cl = idx / len;
    const int p = idx - cl * len;
    const int row = p / width;
    const int col = p - row * width;
    const float uu = to_f(u[(static_cast<int64_t>(b) * di + c0 + cl) * len + p]);
    const int m = cl * plane + row * stride + col;
    su[m] = uu;
    sy[m] = d_sum(D, di, c0 + cl) * uu;
  }
  __syncthreads();

  const int cl = threadIdx.x / nch;
  const int q = threadIdx.x - cl * nch;
  const bool has_channel = cl < nc;
  const int c = c0 + (has_channel ? cl : 0);
  float* my_carry = carry + (cl * nch + q) * (N + 1);

  for (int k = 0; k < 4; ++k) {
    const int nlines = (k % 2 == 0) ? height : width;
    const int lpc = (nlines + nch - 1) / nch;         // lines per chunk
    const int nchunks = (nlines + lpc - 1) / lpc;     // same for the whole block
    const bool active = has_channel && q < nchunks;
    const int l0 = q * lpc;
    const int l1 = min(nlines, l0 + lpc);
    const int64_t plane_bk = static_cast<int64_t>(b) * 4 + k;
    const T* delta_c = delta + (plane_bk * di + c) * len;
    const T* b_mat = Bm + plane_bk * N * len;
    const T* c_mat = Cm + plane_bk * N * len;
    float a2[N];
    load_a2<N>(A_logs, di, k, c, a2);
    const float bias = to_f(dbias[k * di + c]);
    float h[N];
#pragma unroll
    for (int n = 0; n < N; ++n) h[n] = 0.0f;

    if (nchunks > 1) {
      // Pass A: every chunk but the last, from a zero state.
      float dt_sum = 0.0f;
      if (active && q + 1 < nchunks) {
        scan_chunk_k<N, T, float, false>(k, height, width, stride, l0, l1, delta_c, b_mat, c_mat,
                                         su + cl * plane, nullptr, bias, a2, h, dt_sum);
#pragma unroll
        for (int n = 0; n < N; ++n) my_carry[n] = h[n];
        my_carry[N] = dt_sum;
      }
      __syncthreads();
      // Fold the carries in sequence order: slot j gets chunk j's initial state.
      for (int t = threadIdx.x; t < nc * N; t += blockDim.x) {
        const int fcl = t / N;
        const int n = t - fcl * N;
        const float a2n =
            -expf(to_f(A_logs[(static_cast<int64_t>(k) * di + c0 + fcl) * N + n])) * kLog2e;
        float state = 0.0f;
        for (int j = 0; j < nchunks; ++j) {
          float* slot = carry + (fcl * nch + j) * (N + 1);
          if (j + 1 < nchunks) {
            const float end = slot[n];
            const float sum = slot[N];
            slot[n] = state;
            state = ex2(a2n * sum) * state + end;
          } else {
            slot[n] = state;
          }
        }
      }
      __syncthreads();
      if (active) {
#pragma unroll
        for (int n = 0; n < N; ++n) h[n] = my_carry[n];
      }
    }
    // Pass B: from the true initial state, adding C . h into y.
    if (active) {
      float unused = 0.0f;
      scan_chunk_k<N, T, float, true>(k, height, width, stride, l0, l1, delta_c, b_mat, c_mat, su + cl * plane,
                                      sy + cl * plane, bias, a2, h, unused);
    }
    __syncthreads();  // the next direction's chunks cover other lines of the same y; carry slots are reused
  }

  for (int idx = threadIdx.x; idx < nc * len; idx += blockDim.x) {
    const int ch = idx / len;
    const int p = idx - ch * len;
    const int row = p / width;
    const int col = p - row * width;
    y[(static_cast<int64_t>(b) * di + c0 + ch) * len + p] = from_f<T>(sy[ch * plane + row * stride + col]);
  }
}

// Fallback: one thread per (b, channel), serial over every direction, y accumulated in float32 device memory.
template <int N, typename T>
__global__ void __launch_bounds__(128) scan_global_kernel(Params P, float* acc) {
  const int64_t item = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (item >= static_cast<int64_t>(P.batch) * P.di) return;
  const int di = P.di, height = P.height, width = P.width;
  const int len = height * width;
  const int b = static_cast<int>(item / di);
  const int c = static_cast<int>(item - static_cast<int64_t>(b) * di);
  const T* u_map = static_cast<const T*>(P.u) + item * len;
  const T* A_logs = static_cast<const T*>(P.A_logs);
  float* y_map = acc + item * len;
  const float dsum = d_sum(static_cast<const T*>(P.D), di, c);
  for (int p = 0; p < len; ++p) y_map[p] = dsum * to_f(u_map[p]);
  for (int k = 0; k < 4; ++k) {
    const int64_t plane_bk = static_cast<int64_t>(b) * 4 + k;
    const T* delta_c = static_cast<const T*>(P.delta) + (plane_bk * di + c) * len;
    const T* b_mat = static_cast<const T*>(P.B) + plane_bk * N * len;
    const T* c_mat = static_cast<const T*>(P.C) + plane_bk * N * len;
    float a2[N];
    load_a2<N>(A_logs, di, k, c, a2);
    const float bias = to_f(static_cast<const T*>(P.delta_bias)[k * di + c]);
    float h[N];
#pragma unroll
    for (int n = 0; n < N; ++n) h[n] = 0.0f;
    float unused = 0.0f;
    const int nlines = (k % 2 == 0) ? height : width;
    scan_chunk_k<N, T, T, true>(k, height, width, width, 0, nlines, delta_c, b_mat, c_mat, u_map, y_map, bias, a2,
                                h, unused);
  }
}

template <typename T>
__global__ void convert_kernel(const float* __restrict__ src, T* __restrict__ dst, int64_t n) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    dst[i] = from_f<T>(src[i]);
  }
}

int g_force_path = 0;
int g_tile = 0;    // channels per block; 0: automatic
int g_chunks = 0;  // chunk threads per channel (most lines a direction is cut into); 0: automatic (64)
char g_last_config[256] = "none";

const char* cuda_error(cudaError_t err, const char* what) {
  static thread_local char message[256];
  std::snprintf(message, sizeof(message), "%s: %s", what, cudaGetErrorString(err));
  return message;
}

template <int N, typename T>
const char* launch(const Params& base, cudaStream_t stream) {
  Params P = base;
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return cuda_error(err, "cudaGetDevice");
  int sms = 0, smem_optin = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (sms <= 0) sms = 1;

  // One chunk per line up to 64 lines (no idle lanes), then 64 chunks of several lines.
  const int lines = std::max(P.height, P.width);
  P.nch = std::min(lines, g_chunks > 0 ? g_chunks : 64);
  P.wp = (P.width % 2 == 0) ? P.width + 1 : P.width;
  auto smem_bytes = [&](int ct) {
    return static_cast<size_t>(ct) * (2 * static_cast<size_t>(P.height) * P.wp + P.nch * (N + 1)) * sizeof(float);
  };
  // More channels per block share B and C through L1 (they are per direction, not per channel), fewer keep more
  // blocks in flight when the batch is small.
  // About 128 threads a block (small maps: many channels a block), at least two blocks per multiprocessor.
  int ct = g_tile > 0 ? g_tile : std::max(1, 128 / P.nch);
  while (ct > 1 && (smem_bytes(ct) > static_cast<size_t>(smem_optin) ||
                    (g_tile <= 0 && static_cast<int64_t>(P.batch) * ((P.di + ct - 1) / ct) < 2 * sms))) {
    ct /= 2;
  }
  ct = std::min(ct, std::max(1, kMaxThreads / P.nch));
  const bool fits = smem_bytes(ct) <= static_cast<size_t>(smem_optin);
  const bool use_smem = g_force_path == 1 ? fits : (g_force_path == 2 ? false : fits);

  if (use_smem) {
    P.ct = ct;
    const size_t bytes = smem_bytes(ct);
    err = cudaFuncSetAttribute(scan_smem_kernel<N, T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(bytes));
    if (err != cudaSuccess) return cuda_error(err, "cudaFuncSetAttribute");
    const dim3 grid((P.di + ct - 1) / ct, P.batch);
    const dim3 block(ct * P.nch);
    std::snprintf(g_last_config, sizeof(g_last_config), "smem N=%d %s ct=%d nch=%d grid=%ux%u block=%u smem=%zu",
                  N, sizeof(T) == 2 ? "f16" : "f32", ct, P.nch, grid.x, grid.y, block.x, bytes);
    scan_smem_kernel<N, T><<<grid, block, bytes, stream>>>(P);
    err = cudaGetLastError();
    return err == cudaSuccess ? nullptr : cuda_error(err, "selective_scan_2d (shared-memory kernel) launch");
  }

  const int64_t items = static_cast<int64_t>(P.batch) * P.di;
  const int64_t total = items * P.height * P.width;
  float* acc = nullptr;
  const bool f32 = sizeof(T) == sizeof(float);
  if (f32) {
    acc = static_cast<float*>(P.y);
  } else {
    err = cudaMallocAsync(reinterpret_cast<void**>(&acc), static_cast<size_t>(total) * sizeof(float), stream);
    if (err != cudaSuccess) return cuda_error(err, "cudaMallocAsync (fallback accumulator)");
  }
  const int threads = 128;
  const unsigned blocks = static_cast<unsigned>((items + threads - 1) / threads);
  std::snprintf(g_last_config, sizeof(g_last_config), "global N=%d %s grid=%u block=%d", N, f32 ? "f32" : "f16",
                blocks, threads);
  scan_global_kernel<N, T><<<blocks, threads, 0, stream>>>(P, acc);
  err = cudaGetLastError();
  if (err == cudaSuccess && !f32) {
    const unsigned cblocks = static_cast<unsigned>(std::min<int64_t>((total + 255) / 256, 65535));
    convert_kernel<T><<<cblocks, 256, 0, stream>>>(acc, static_cast<T*>(P.y), total);
    err = cudaGetLastError();
  }
  if (!f32) {
    const cudaError_t free_err = cudaFreeAsync(acc, stream);
    if (err == cudaSuccess) err = free_err;
  }
  return err == cudaSuccess ? nullptr : cuda_error(err, "selective_scan_2d (fallback kernel) launch");
}

template <typename T>
const char* dispatch_state(const Params& P, int64_t d_state, cudaStream_t stream) {
  switch (d_state) {
    // The two d_state values of every VMamba release (v2: 1, v0: 16); each more costs compile time for 4 archs.
    case 1: return launch<1, T>(P, stream);
    case 16: return launch<16, T>(P, stream);
    default: return "the CUDA kernel supports d_state 1 and 16 only (compiled in: state kept in registers)";
  }
}

}  // namespace

extern "C" const char* vmamba_selective_scan_2d_cuda(int dtype, const void* u, const void* delta, const void* A_logs,
                                                     const void* B, const void* C, const void* D,
                                                     const void* delta_bias, void* y, int64_t batch, int64_t d_inner,
                                                     int64_t d_state, int64_t height, int64_t width, void* stream) {
  if (batch < 0 || d_inner < 0 || height < 0 || width < 0) return "batch, d_inner, height and width must be >= 0";
  if (d_state < 1) return "d_state must be >= 1";
  if (batch == 0 || d_inner == 0 || height == 0 || width == 0) return nullptr;  // empty y
  if (!u || !delta || !A_logs || !B || !C || !D || !delta_bias || !y) return "null tensor pointer";
  if (batch > 65535) return "batch must be <= 65535 for the CUDA kernel";
  // Flat indices inside one plane are 32-bit; planes are offset in 64-bit.
  if (height * width > (int64_t{1} << 30) || d_inner > (int64_t{1} << 24) || d_state * height * width > (int64_t{1} << 30)) {
    return "tensor too large for the CUDA kernel";
  }
  Params P{};
  P.u = u;
  P.delta = delta;
  P.A_logs = A_logs;
  P.B = B;
  P.C = C;
  P.D = D;
  P.delta_bias = delta_bias;
  P.y = y;
  P.batch = static_cast<int>(batch);
  P.di = static_cast<int>(d_inner);
  P.height = static_cast<int>(height);
  P.width = static_cast<int>(width);
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case VMAMBA_SCAN_F32: return dispatch_state<float>(P, d_state, s);
    case VMAMBA_SCAN_F16: return dispatch_state<__half>(P, d_state, s);
    default: return "dtype must be 0 (float32) or 1 (float16)";
  }
}

extern "C" void vmamba_selective_scan_2d_cuda_force_path(int path) { g_force_path = path; }

extern "C" void vmamba_selective_scan_2d_cuda_set_tuning(int channels_per_block, int chunk_threads) {
  g_tile = channels_per_block;
  g_chunks = chunk_threads;
}

extern "C" const char* vmamba_selective_scan_2d_cuda_last_config(void) { return g_last_config; }
