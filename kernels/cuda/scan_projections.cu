// A scan's input projections in one kernel (contract and why: scan_projections.cuh).
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "scan_projections.cuh"
#include "float_convert.cuh"

namespace {

using vmamba_cuda_detail::from_f;
using vmamba_cuda_detail::to_f;

constexpr int kThreads = 256;
constexpr int kMaxTile = 32;  // positions a block projects
constexpr int kMinTile = 4;   // below this a block reads its weights (up to 150 KB at Di 768) for too few positions
constexpr size_t kSmemBudget = 48 * 1024;  // the default dynamic shared-memory limit: no opt-in call needed

// The row of W_x that holds row j of direction k's projections: its R dt ranks, then its N B rows, then its N C rows.
__device__ __forceinline__ int weight_row(int j, int k, int rank, int n_state) {
  if (j < rank) return k * rank + j;
  if (j < rank + n_state) return 4 * rank + k * n_state + (j - rank);
  return 4 * rank + 4 * n_state + k * n_state + (j - rank - n_state);
}

// Eight consecutive weights (16-byte aligned) as float32, in one or two vector loads.
__device__ __forceinline__ void load8(const __half* p, float (&out)[8]) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const __half2* h = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __half22float2(h[i]);
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}

__device__ __forceinline__ void load8(const float* p, float (&out)[8]) {
  const float4 a = *reinterpret_cast<const float4*>(p), b = *reinterpret_cast<const float4*>(p + 4);
  out[0] = a.x, out[1] = a.y, out[2] = a.z, out[3] = a.w, out[4] = b.x, out[5] = b.y, out[6] = b.z, out[7] = b.w;
}

__device__ __forceinline__ void fma4(float w, const float4& x, float (&acc)[4]) {
  acc[0] = fmaf(w, x.x, acc[0]);
  acc[1] = fmaf(w, x.y, acc[1]);
  acc[2] = fmaf(w, x.z, acc[2]);
  acc[3] = fmaf(w, x.w, acc[3]);
}

// Block (tile * 4 + direction k, batch b): positions [p0, p0 + tile) of one batch element, one direction; tile a
// multiple of 4. The four directions of a tile are neighbouring blocks, so the u tile they all stage is read from
// DRAM once and then from L2. Every phase keeps many loads in flight (at batch 1 the kernel waits on memory, not on
// arithmetic):
// 1. u's tile to shared memory as float32, [channel][position], each thread issuing its loads before its stores;
// 2. x rows of the tile: a thread computes four neighbouring positions of one row over 1/ks of the channels (16-byte
//    weight loads, float4 reads of u), the ks partial sums of neighbouring lanes added by shuffles; dt-rank rows go
//    to shared memory, B and C rows out;
// 3. delta: a thread computes four neighbouring positions of one channel from the tile's dt ranks.
// kVec: Di a multiple of 8 and W_x 16-byte aligned (the 16-byte weight loads); otherwise one weight at a time.
template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads) scan_projections_kernel(const T* __restrict__ u, const T* __restrict__ w_x,
                                                                   const T* __restrict__ dt_weight,
                                                                   T* __restrict__ delta, T* __restrict__ b_out,
                                                                   T* __restrict__ c_out, int di, int rank,
                                                                   int n_state, int len, int tile, int ks) {
  extern __shared__ float4 smem4[];
  float* su = reinterpret_cast<float*>(smem4);  // [di][tile]
  float* sx = su + di * tile;                   // [rank][tile]
  const int k = blockIdx.x % 4;
  const int p0 = (blockIdx.x / 4) * tile;
  const int b = blockIdx.y;
  const int np = min(tile, len - p0);
  const int quads = tile / 4;

  constexpr int kLoads = 8;
  const T* ub = u + static_cast<int64_t>(b) * di * len + p0;
  for (int base = threadIdx.x; base < di * tile; base += kLoads * blockDim.x) {
    float v[kLoads];
#pragma unroll
    for (int e = 0; e < kLoads; ++e) {
      const int i = base + e * blockDim.x;
      const int c = i / tile, p = i - c * tile;
      v[e] = i < di * tile && p < np ? to_f(ub[static_cast<int64_t>(c) * len + p]) : 0.0f;
    }
#pragma unroll
    for (int e = 0; e < kLoads; ++e) {
      const int i = base + e * blockDim.x;
      if (i < di * tile) su[i] = v[e];
    }
  }
  __syncthreads();

  // Phase 2: groups of (row, quad); the loop's trip count is the same for every thread, so every lane reaches the
  // shuffles (lanes past the last group add zeros).
  const int rows = rank + 2 * n_state;
  const int groups = rows * quads;
  const int part = threadIdx.x % ks;
  for (int g0 = 0; g0 < groups; g0 += blockDim.x / ks) {
    const int g = g0 + threadIdx.x / ks;
    const bool live = g < groups;
    const int j = live ? g / quads : 0, p = live ? (g - j * quads) * 4 : 0;
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (live) {
      const T* w = w_x + static_cast<int64_t>(weight_row(j, k, rank, n_state)) * di;
      if constexpr (kVec) {
        for (int c0 = part * 8; c0 < di; c0 += ks * 8) {
          float wv[8];
          load8(w + c0, wv);
#pragma unroll
          for (int e = 0; e < 8; ++e) fma4(wv[e], *reinterpret_cast<const float4*>(su + (c0 + e) * tile + p), acc);
        }
      } else {
        for (int c = part; c < di; c += ks) fma4(to_f(w[c]), *reinterpret_cast<const float4*>(su + c * tile + p), acc);
      }
    }
    for (int offset = ks / 2; offset > 0; offset /= 2) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[e] += __shfl_xor_sync(0xffffffffu, acc[e], offset);
    }
    if (!live || part != 0) continue;
    if (j < rank) {
      *reinterpret_cast<float4*>(sx + j * tile + p) = make_float4(acc[0], acc[1], acc[2], acc[3]);
    } else {
      const bool is_b = j < rank + n_state;
      const int n = is_b ? j - rank : j - rank - n_state;
      T* dst = (is_b ? b_out : c_out) + ((static_cast<int64_t>(b) * 4 + k) * n_state + n) * len + p0 + p;
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        if (p + e < np) dst[e] = from_f<T>(acc[e]);
      }
    }
  }
  __syncthreads();

  // Phase 3: groups of (channel, quad).
  T* db = delta + (static_cast<int64_t>(b) * 4 + k) * di * len + p0;
  const T* wk = dt_weight + static_cast<int64_t>(k) * di * rank;
  for (int g = threadIdx.x; g < di * quads; g += blockDim.x) {
    const int c = g / quads, p = (g - c * quads) * 4;
    if (p >= np) continue;
    const T* w = wk + static_cast<int64_t>(c) * rank;
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll 4
    for (int r = 0; r < rank; ++r) fma4(to_f(w[r]), *reinterpret_cast<const float4*>(sx + r * tile + p), acc);
    T* dst = db + static_cast<int64_t>(c) * len + p;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      if (p + e < np) dst[e] = from_f<T>(acc[e]);
    }
  }
}

size_t smem_bytes(int64_t di, int64_t rank, int tile) {
  return static_cast<size_t>(di + rank) * tile * sizeof(float);
}

// The widest tile (fewest weight reads) that fits the shared-memory budget and still gives two blocks a
// multiprocessor; at batch 1 the later stages' small maps get narrow tiles, so the work spreads over the GPU.
int choose_tile(int64_t batch, int64_t di, int64_t rank, int64_t len, int multiprocessors) {
  int tile = kMaxTile;
  while (tile > kMinTile && (smem_bytes(di, rank, tile) > kSmemBudget ||
                             batch * 4 * ((len + tile - 1) / tile) < 2 * static_cast<int64_t>(multiprocessors))) {
    tile /= 2;
  }
  return tile;
}

// Lanes sharing one x row group (phase 2): as many as leave no thread idle, up to 8.
int choose_split(int rows, int tile) {
  int ks = 1;
  while (ks < 8 && rows * (tile / 4) * ks * 2 <= kThreads) ks *= 2;
  return ks;
}

template <typename T>
cudaError_t launch(const void* u, const void* w_x, const void* dt_weight, void* delta, void* B, void* C, int64_t batch,
                   int di, int rank, int n_state, int len, int tile, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(4 * ((len + tile - 1) / tile)), static_cast<unsigned>(batch));
  const int ks = choose_split(rank + 2 * n_state, tile);
  const bool vec = di % 8 == 0 && reinterpret_cast<uintptr_t>(w_x) % 16 == 0;
  auto kernel = vec ? scan_projections_kernel<T, true> : scan_projections_kernel<T, false>;
  kernel<<<grid, kThreads, smem_bytes(di, rank, tile), stream>>>(
      static_cast<const T*>(u), static_cast<const T*>(w_x), static_cast<const T*>(dt_weight), static_cast<T*>(delta),
      static_cast<T*>(B), static_cast<T*>(C), di, rank, n_state, len, tile, ks);
  return cudaGetLastError();
}

}  // namespace

extern "C" const char* vmamba_scan_projections_cuda(int dtype, const void* u, const void* w_x, const void* dt_weight,
                                                    void* delta, void* B, void* C, int64_t batch, int64_t d_inner,
                                                    int64_t rank, int64_t d_state, int64_t len, void* stream) {
  if (batch < 0 || d_inner < 0 || len < 0) return "negative dimension";
  if (rank < 1 || d_state < 1) return "rank and d_state must be >= 1";
  if (batch > 65535) return "batch must be at most 65535";
  if (len > (int64_t{1} << 30) || d_inner > (int64_t{1} << 20) || rank > 4096 || d_state > 4096) {
    return "tensor too large for the projection kernel";
  }
  if (smem_bytes(d_inner, rank, kMinTile) > kSmemBudget) return "d_inner + rank too large for the projection kernel";
  if (batch == 0 || d_inner == 0 || len == 0) return nullptr;
  if (!u || !w_x || !dt_weight || !delta || !B || !C) return "null tensor pointer";
  int device = 0, multiprocessors = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return cudaGetErrorString(err);
  const int tile = choose_tile(batch, d_inner, rank, len, multiprocessors);
  const int di = static_cast<int>(d_inner), r = static_cast<int>(rank), n = static_cast<int>(d_state);
  const int l = static_cast<int>(len);
  auto s = static_cast<cudaStream_t>(stream);
  if (dtype == 1) {
    err = launch<__half>(u, w_x, dt_weight, delta, B, C, batch, di, r, n, l, tile, s);
  } else if (dtype == 0) {
    err = launch<float>(u, w_x, dt_weight, delta, B, C, batch, di, r, n, l, tile, s);
  } else {
    return "dtype must be 0 (float32) or 1 (float16)";
  }
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}
