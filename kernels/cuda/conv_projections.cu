// Depthwise 3 x 3 convolution + SiLU and the scan's input projections in one kernel (contract and why:
// conv_projections.cuh).
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "conv_projections.cuh"
#include "float_convert.cuh"

namespace {

using vmamba_cuda_detail::from_f;
using vmamba_cuda_detail::to_f;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr size_t kSmemBudget = 48 * 1024;  // the default dynamic shared-memory limit: no opt-in call needed
constexpr int kTiles[] = {32, 16, 8, 4, 2, 1};

int g_tile = 0;  // set_tile: 0 automatic

template <typename T>
struct alignas(2 * sizeof(T)) Pair {
  T v[2];
};

// Floats between two channels' rows of the u tile in shared memory: odd, so lanes reading consecutive channels at one
// position hit distinct banks.
__host__ __device__ constexpr int u_stride(int tile) { return tile % 2 == 0 ? tile + 1 : tile; }

// The sum over the warp's lanes of v[lane % kTile], returned to every lane: a reduce-scatter over the lane bits below
// kTile (each step halves the values a lane holds: kTile - 1 shuffles in all), then a butterfly over the lane bits
// above. Every lane of the warp must call it.
template <int kTile>
__device__ __forceinline__ float warp_sum_scatter(float (&v)[kTile], int lane) {
#pragma unroll
  for (int half = kTile / 2; half >= 1; half /= 2) {
    const bool upper = (lane & half) != 0;
#pragma unroll
    for (int i = 0; i < half; ++i) {
      const float send = upper ? v[i] : v[i + half];  // the half the partner keeps
      const float keep = upper ? v[i + half] : v[i];
      v[i] = keep + __shfl_xor_sync(0xffffffffu, send, half);
    }
  }
  float s = v[0];
#pragma unroll
  for (int off = kTile; off < 32; off *= 2) s += __shfl_xor_sync(0xffffffffu, s, off);
  return s;
}

// Block (tile of kTile positions from p0 = blockIdx.x kTile, direction k = blockIdx.y, batch b = blockIdx.z); phases
// as conv_projections.cuh describes, separated by the block's two barriers. No thread leaves before the last one.
template <typename T, int kTile>
__global__ void __launch_bounds__(kThreads)
    depthwise_conv_projections_kernel(const T* __restrict__ x, const T* __restrict__ conv_weight,
                                      const T* __restrict__ conv_bias, const T* __restrict__ w_x,
                                      const T* __restrict__ dt_weight, T* __restrict__ u_out, T* __restrict__ delta,
                                      T* __restrict__ b_out, T* __restrict__ c_out, int height, int width, int di,
                                      int rank, int n_state) {
  extern __shared__ float4 smem4[];
  constexpr int kStride = u_stride(kTile);
  float* const us = reinterpret_cast<float*>(smem4);  // [di][kStride]: u of the tile, rounded to T
  float* const xs = us + di * kStride;                // [rank + 2 n_state][kTile]: direction k's rows of x
  const int len = height * width, p0 = blockIdx.x * kTile, k = blockIdx.y, b = blockIdx.z;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;

  // u: a thread a (channel pair, position), pairs fastest (the channels-last rows are read along channels); zero past
  // the map's end, so the projections need no bound
  const T* const xb = x + static_cast<int64_t>(b) * len * di;
  const int pairs = di / 2;
  for (int i = threadIdx.x; i < pairs * kTile; i += kThreads) {
    const int c = 2 * (i % pairs), j = i / pairs, p = p0 + j;
    float acc0 = 0.0f, acc1 = 0.0f;
    if (p < len) {
      const int h = p / width, w = p - h * width;
      if (conv_bias != nullptr) {
        acc0 = to_f(conv_bias[c]);
        acc1 = to_f(conv_bias[c + 1]);
      }
      const T* const taps = conv_weight + static_cast<int64_t>(c) * 9;
#pragma unroll
      for (int t = 0; t < 9; ++t) {  // DepthwiseConvSiLU's order of taps, so u is the same to the bit
        const int hh = h + t / 3 - 1, ww = w + t % 3 - 1;
        if (hh >= 0 && hh < height && ww >= 0 && ww < width) {
          const Pair<T> v = *reinterpret_cast<const Pair<T>*>(xb + (static_cast<int64_t>(hh) * width + ww) * di + c);
          acc0 = fmaf(to_f(taps[t]), to_f(v.v[0]), acc0);
          acc1 = fmaf(to_f(taps[9 + t]), to_f(v.v[1]), acc1);
        }
      }
      acc0 = to_f(from_f<T>(acc0 * __frcp_rn(1.0f + __expf(-acc0))));
      acc1 = to_f(from_f<T>(acc1 * __frcp_rn(1.0f + __expf(-acc1))));
    }
    us[c * kStride + j] = acc0;
    us[(c + 1) * kStride + j] = acc1;
  }
  __syncthreads();

  // x rows of direction k: its R dt-rank rows, then its N B rows and N C rows of W_x. A warp a row: lanes split the
  // channel sum (coalesced reads of the row), then warp_sum_scatter leaves position j's sum in lane j.
  const int rows = rank + 2 * n_state;
  for (int r = warp; r < rows; r += kWarps) {
    const int row = r < rank              ? k * rank + r
                    : r < rank + n_state ? 4 * rank + k * n_state + (r - rank)
                                          : 4 * rank + 4 * n_state + k * n_state + (r - rank - n_state);
    const T* const wr = w_x + static_cast<int64_t>(row) * di;
    float acc[kTile] = {};
    for (int c = lane; c < di; c += 32) {
      const float wc = to_f(wr[c]);
      const float* const uc = us + c * kStride;
#pragma unroll
      for (int j = 0; j < kTile; ++j) acc[j] = fmaf(wc, uc[j], acc[j]);
    }
    const float s = warp_sum_scatter<kTile>(acc, lane);
    if (lane < kTile) xs[r * kTile + lane] = s;
  }
  if (k == 0) {  // one direction's block writes u, along positions (channel-first rows)
    for (int i = threadIdx.x; i < di * kTile; i += kThreads) {
      const int c = i / kTile, j = i - c * kTile;
      if (p0 + j < len) u_out[(static_cast<int64_t>(b) * di + c) * len + p0 + j] = from_f<T>(us[c * kStride + j]);
    }
  }
  __syncthreads();

  // delta of direction k: a thread a (channel, run of kRun positions), so a dt weight is read once for kRun sums and
  // the x values are broadcast reads; each thread writes its run contiguously
  constexpr int kRun = kTile < 8 ? kTile : 8;
  constexpr int kRuns = kTile / kRun;
  T* const dk = delta + (static_cast<int64_t>(b) * 4 + k) * di * len + p0;
  const T* const wk = dt_weight + static_cast<int64_t>(k) * di * rank;
  for (int i = threadIdx.x; i < di * kRuns; i += kThreads) {
    const int c = i / kRuns, j0 = (i - c * kRuns) * kRun;
    const T* const wc = wk + static_cast<int64_t>(c) * rank;
    float acc[kRun] = {};
    for (int r = 0; r < rank; ++r) {
      const float wr = to_f(wc[r]);
      const float* const xr = xs + r * kTile + j0;
#pragma unroll
      for (int j = 0; j < kRun; ++j) acc[j] = fmaf(wr, xr[j], acc[j]);
    }
#pragma unroll
    for (int j = 0; j < kRun; ++j) {
      if (p0 + j0 + j < len) dk[static_cast<int64_t>(c) * len + j0 + j] = from_f<T>(acc[j]);
    }
  }
  // B and C of direction k
  for (int i = threadIdx.x; i < 2 * n_state * kTile; i += kThreads) {
    const int s = i / kTile, j = i - s * kTile;
    if (p0 + j >= len) continue;
    const bool is_c = s >= n_state;
    T* const out = (is_c ? c_out : b_out) + ((static_cast<int64_t>(b) * 4 + k) * n_state + s - (is_c ? n_state : 0)) * len;
    out[p0 + j] = from_f<T>(xs[(rank + s) * kTile + j]);
  }
}

size_t smem_bytes(int tile, int di, int rows) {
  return sizeof(float) * (static_cast<size_t>(di) * u_stride(tile) + static_cast<size_t>(rows) * tile);
}

// The forced tile, else the largest that gives at least one block for every two multiprocessors (fewer positions a
// block, more blocks: batch 1's small maps), else the smallest; 0 where none fits shared memory.
int pick_tile(int64_t batch, int64_t len, int di, int rows, int multiprocessors) {
  if (g_tile != 0) return smem_bytes(g_tile, di, rows) <= kSmemBudget ? g_tile : 0;
  int smallest = 0;
  for (const int tile : kTiles) {
    if (smem_bytes(tile, di, rows) > kSmemBudget) continue;
    if (2 * batch * 4 * ((len + tile - 1) / tile) >= multiprocessors) return tile;
    smallest = tile;
  }
  return smallest;
}

template <typename T>
using Kernel = void (*)(const T*, const T*, const T*, const T*, const T*, T*, T*, T*, T*, int, int, int, int, int);

template <typename T>
Kernel<T> kernel_for(int tile) {
  switch (tile) {
    case 32: return depthwise_conv_projections_kernel<T, 32>;
    case 16: return depthwise_conv_projections_kernel<T, 16>;
    case 8: return depthwise_conv_projections_kernel<T, 8>;
    case 4: return depthwise_conv_projections_kernel<T, 4>;
    case 2: return depthwise_conv_projections_kernel<T, 2>;
    default: return depthwise_conv_projections_kernel<T, 1>;
  }
}

template <typename T>
cudaError_t launch(int tile, const void* x, const void* conv_weight, const void* conv_bias, const void* w_x,
                   const void* dt_weight, void* u, void* delta, void* B, void* C, int64_t batch, int height, int width,
                   int di, int rank, int n_state, cudaStream_t stream) {
  const int len = height * width;
  const dim3 grid(static_cast<unsigned>((len + tile - 1) / tile), 4, static_cast<unsigned>(batch));
  const Kernel<T> kernel = kernel_for<T>(tile);
  kernel<<<grid, kThreads, smem_bytes(tile, di, rank + 2 * n_state), stream>>>(
      static_cast<const T*>(x), static_cast<const T*>(conv_weight), static_cast<const T*>(conv_bias),
      static_cast<const T*>(w_x), static_cast<const T*>(dt_weight), static_cast<T*>(u), static_cast<T*>(delta),
      static_cast<T*>(B), static_cast<T*>(C), height, width, di, rank, n_state);
  return cudaGetLastError();
}

}  // namespace

extern "C" int vmamba_depthwise_conv_projections_cuda_set_tile(int tile) {
  for (const int allowed : kTiles) {
    if (tile == allowed) g_tile = tile;
  }
  if (tile == 0) g_tile = 0;
  return g_tile;
}

extern "C" int vmamba_depthwise_conv_projections_cuda_tile(int64_t batch, int64_t height, int64_t width,
                                                           int64_t d_inner, int64_t rank, int64_t d_state) {
  int device = 0, multiprocessors = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    return 0;
  }
  return pick_tile(batch, height * width, static_cast<int>(d_inner), static_cast<int>(rank + 2 * d_state),
                   multiprocessors);
}

extern "C" const char* vmamba_depthwise_conv_projections_cuda(int dtype, const void* x, const void* conv_weight,
                                                              const void* conv_bias, const void* w_x,
                                                              const void* dt_weight, void* u, void* delta, void* B,
                                                              void* C, int64_t batch, int64_t height, int64_t width,
                                                              int64_t d_inner, int64_t rank, int64_t d_state,
                                                              void* stream) {
  if (batch < 0 || height < 0 || width < 0 || d_inner < 0) return "negative dimension";
  if (rank < 1 || d_state < 1) return "rank and d_state must be >= 1";
  if (d_inner % 2 != 0) return "d_inner must be even (the kernel reads channel pairs)";
  if (batch > 65535) return "batch must be at most 65535";
  if (height > (int64_t{1} << 15) || width > (int64_t{1} << 15) || d_inner > (int64_t{1} << 16) || rank > 4096 ||
      d_state > 4096) {
    return "tensor too large for the convolution-projection kernel";
  }
  if (batch == 0 || height == 0 || width == 0 || d_inner == 0) return nullptr;
  if (!x || !conv_weight || !w_x || !dt_weight || !u || !delta || !B || !C) return "null tensor pointer";
  int device = 0, multiprocessors = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return cudaGetErrorString(err);
  const int di = static_cast<int>(d_inner), r = static_cast<int>(rank), n = static_cast<int>(d_state);
  const int tile = pick_tile(batch, height * width, di, r + 2 * n, multiprocessors);
  if (tile == 0) {
    return g_tile != 0 ? "the forced tile does not fit shared memory for this d_inner and rank"
                       : "d_inner and rank too large for the convolution-projection kernel's shared memory";
  }
  auto s = static_cast<cudaStream_t>(stream);
  const int h = static_cast<int>(height), w = static_cast<int>(width);
  if (dtype == 1) {
    err = launch<__half>(tile, x, conv_weight, conv_bias, w_x, dt_weight, u, delta, B, C, batch, h, w, di, r, n, s);
  } else if (dtype == 0) {
    err = launch<float>(tile, x, conv_weight, conv_bias, w_x, dt_weight, u, delta, B, C, batch, h, w, di, r, n, s);
  } else {
    return "dtype must be 0 (float32) or 1 (float16)";
  }
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}
