// A scan's input projections in two kernels (contract and why: scan_projections.cuh).
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>

#include "scan_projections.cuh"
#include "float_convert.cuh"

namespace {

using vmamba_cuda_detail::from_f;
using vmamba_cuda_detail::to_f;

constexpr size_t kSmemBudget = 48 * 1024;  // the default dynamic shared-memory limit: no opt-in call needed
constexpr int kUnroll = 16;                // loads of u a lane issues before its first FMA
constexpr int kDeltaWarps = 8;
constexpr int kDeltaChannelsPerWarp = 4;
constexpr int kDeltaChannels = kDeltaWarps * kDeltaChannelsPerWarp;  // delta channels a block writes

// Kernel 1, x = W_x u: block (row group of kRows rows, tile of 32 kPos positions, batch b). Lanes take positions
// (coalesced reads of u), the block's warps split the channel sum (warp w adds channels w, w + warps, ...), so even a
// 7 x 7 map at batch 1 gets enough blocks and each lane waits on few rounds of loads. The rows' weights are staged in
// shared memory channel-major, [c][kRows], so a step reads them as broadcast float4s; the warps' partial sums meet in
// shared memory afterwards (the same buffer). dt-rank rows go to the float32 scratch `xdt`, B and C rows out.
// Rows go to three outputs in turn, each (batch, its rows, len): the first `rows_f32` to the float32 `xdt`, the next
// `rows_b` to `b_out`, the last `rows_c` to `c_out` (NarrowPointwiseConv: all to `b_out`).
template <typename T, int kRows, int kPos>
__global__ void __launch_bounds__(512) project_rows_kernel(const T* __restrict__ u, const T* __restrict__ w_x,
                                                           float* __restrict__ xdt, T* __restrict__ b_out,
                                                           T* __restrict__ c_out, int di, int rows_f32, int rows_b,
                                                           int rows_c, int len) {
  extern __shared__ float4 smem4[];
  float* smem = reinterpret_cast<float*>(smem4);
  constexpr int kTile = 32 * kPos;
  const int warps = blockDim.x / 32, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int rows = rows_f32 + rows_b + rows_c, groups = (rows + kRows - 1) / kRows;
  // blockIdx.x = tile * groups + group: a tile's row groups are neighbouring blocks, so u is read from DRAM once
  const int r0 = (blockIdx.x % groups) * kRows, p0 = (blockIdx.x / groups) * kTile, b = blockIdx.z;

  constexpr int kLoads = 8;
  for (int base = threadIdx.x; base < di * kRows; base += kLoads * blockDim.x) {
    float v[kLoads];
#pragma unroll
    for (int e = 0; e < kLoads; ++e) {
      const int i = base + e * blockDim.x, r = i / di, c = i - r * di;
      v[e] = i < di * kRows && r0 + r < rows ? to_f(w_x[static_cast<int64_t>(r0 + r) * di + c]) : 0.0f;
    }
#pragma unroll
    for (int e = 0; e < kLoads; ++e) {
      const int i = base + e * blockDim.x, r = i / di, c = i - r * di;
      if (i < di * kRows) smem[c * kRows + r] = v[e];
    }
  }
  __syncthreads();

  float acc[kRows][kPos] = {};
  const T* ub = u + static_cast<int64_t>(b) * di * len;
  for (int c0 = warp; c0 < di; c0 += kUnroll * warps) {
    float uv[kUnroll][kPos];
#pragma unroll
    for (int e = 0; e < kUnroll; ++e) {
      const int c = c0 + e * warps;
#pragma unroll
      for (int q = 0; q < kPos; ++q) {
        const int p = p0 + lane + 32 * q;
        uv[e][q] = c < di && p < len ? to_f(ub[static_cast<int64_t>(c) * len + p]) : 0.0f;
      }
    }
#pragma unroll
    for (int e = 0; e < kUnroll; ++e) {
      const int c = c0 + e * warps;
      if (c >= di) break;  // warp-uniform
#pragma unroll
      for (int r4 = 0; r4 < kRows / 4; ++r4) {
        const float4 w = smem4[c * (kRows / 4) + r4];
#pragma unroll
        for (int q = 0; q < kPos; ++q) {
          acc[4 * r4][q] = fmaf(w.x, uv[e][q], acc[4 * r4][q]);
          acc[4 * r4 + 1][q] = fmaf(w.y, uv[e][q], acc[4 * r4 + 1][q]);
          acc[4 * r4 + 2][q] = fmaf(w.z, uv[e][q], acc[4 * r4 + 2][q]);
          acc[4 * r4 + 3][q] = fmaf(w.w, uv[e][q], acc[4 * r4 + 3][q]);
        }
      }
    }
  }
  __syncthreads();  // the weights are read; the buffer now takes the partial sums, [warp][row][position]
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
#pragma unroll
    for (int q = 0; q < kPos; ++q) smem[(warp * kRows + r) * kTile + lane + 32 * q] = acc[r][q];
  }
  __syncthreads();
  for (int o = threadIdx.x; o < kRows * kTile; o += blockDim.x) {
    const int r = o / kTile, p = o - r * kTile, j = r0 + r, pos = p0 + p;
    if (j >= rows || pos >= len) continue;
    float s = 0.0f;
    for (int w = 0; w < warps; ++w) s += smem[(w * kRows + r) * kTile + p];
    if (j < rows_f32) {
      xdt[(static_cast<int64_t>(b) * rows_f32 + j) * len + pos] = s;
    } else if (j < rows_f32 + rows_b) {
      b_out[(static_cast<int64_t>(b) * rows_b + j - rows_f32) * len + pos] = from_f<T>(s);
    } else {
      c_out[(static_cast<int64_t>(b) * rows_c + j - rows_f32 - rows_b) * len + pos] = from_f<T>(s);
    }
  }
}

// Kernel 2, delta = dt_weight[k] xdt[k]: block (group of kDeltaChannels channels and tile of 32 kPos positions,
// direction k, batch b).
// The tile's R dt-rank rows and the group's R weights a channel are staged in shared memory in one round of loads;
// lanes take positions (coalesced writes of delta), warps take channels.
template <typename T, int kPos>
__global__ void __launch_bounds__(kDeltaWarps * 32) project_delta_kernel(const float* __restrict__ xdt,
                                                                        const T* __restrict__ dt_weight,
                                                                        T* __restrict__ delta, int di, int rank,
                                                                        int len) {
  extern __shared__ float smem[];
  constexpr int kTile = 32 * kPos;
  float* xs = smem;                 // [rank][kTile]
  float* wd = smem + rank * kTile;  // [kDeltaChannels][rank]
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int groups = (di + kDeltaChannels - 1) / kDeltaChannels;
  const int c0 = (blockIdx.x % groups) * kDeltaChannels, p0 = (blockIdx.x / groups) * kTile;
  const int k = blockIdx.y, bk = blockIdx.z * 4 + k;

  const float* xb = xdt + static_cast<int64_t>(bk) * rank * len + p0;  // rows k R .. k R + R - 1 of batch b
  const T* wk = dt_weight + (static_cast<int64_t>(k) * di + c0) * rank;
  const int n_x = rank * kTile, n_w = min(kDeltaChannels, di - c0) * rank;
  constexpr int kLoads = 8;
  for (int base = threadIdx.x; base < n_x + n_w; base += kLoads * blockDim.x) {
    float v[kLoads];
#pragma unroll
    for (int e = 0; e < kLoads; ++e) {
      const int i = base + e * blockDim.x;
      if (i < n_x) {
        const int r = i / kTile, p = i - r * kTile;
        v[e] = p0 + p < len ? xb[static_cast<int64_t>(r) * len + p] : 0.0f;
      } else {
        v[e] = i < n_x + n_w ? to_f(wk[i - n_x]) : 0.0f;
      }
    }
#pragma unroll
    for (int e = 0; e < kLoads; ++e) {
      const int i = base + e * blockDim.x;
      if (i < n_x + n_w) smem[i] = v[e];
    }
  }
  __syncthreads();

#pragma unroll
  for (int i = 0; i < kDeltaChannelsPerWarp; ++i) {
    const int cl = warp * kDeltaChannelsPerWarp + i, c = c0 + cl;
    if (c >= di) break;  // warp-uniform
    float acc[kPos] = {};
    const float* w = wd + cl * rank;
    for (int r = 0; r < rank; ++r) {
      const float wr = w[r];
#pragma unroll
      for (int q = 0; q < kPos; ++q) acc[q] = fmaf(wr, xs[r * kTile + lane + 32 * q], acc[q]);
    }
    T* dst = delta + (static_cast<int64_t>(bk) * di + c) * len + p0 + lane;
#pragma unroll
    for (int q = 0; q < kPos; ++q) {
      if (p0 + lane + 32 * q < len) dst[32 * q] = from_f<T>(acc[q]);
    }
  }
}

// Launch shapes. Small problems (batch 1) take one position a lane and row groups of 4 when groups of 8 would leave
// multiprocessors idle; large ones two positions a lane (more work per weight read). The channel sum is split over
// up to 16 warps, about 12 channels a warp, so a lane's loads of u take at most a few rounds.
struct Plan {
  int pos, rows_per_block, warps;
};

int cdiv(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

Plan plan(int64_t batch, int di, int rows, int len, int multiprocessors) {
  Plan p{};
  p.pos = batch * len >= 16384 ? 2 : 1;
  p.warps = std::min(16, std::max(4, cdiv(di, 12)));
  const bool few_blocks = batch * cdiv(len, 32 * p.pos) * cdiv(rows, 8) < 2 * multiprocessors;
  p.rows_per_block = few_blocks || sizeof(float) * di * 8 > kSmemBudget ? 4 : 8;
  return p;
}

size_t rows_smem(const Plan& p, int di) {
  return sizeof(float) * std::max(static_cast<size_t>(di) * p.rows_per_block,
                                  static_cast<size_t>(p.warps) * p.rows_per_block * 32 * p.pos);
}

size_t delta_smem(const Plan& p, int rank) {
  return sizeof(float) * static_cast<size_t>(rank) * (32 * p.pos + kDeltaChannels);
}

template <typename T, int kRows, int kPos>
void launch_rows_shape(const Plan& p, const T* u, const T* w_x, float* xdt, T* B, T* C, int64_t batch, int di,
                       int rows_f32, int rows_b, int rows_c, int len, cudaStream_t stream) {
  const dim3 grid(cdiv(rows_f32 + rows_b + rows_c, kRows) * cdiv(len, 32 * kPos), 1, static_cast<unsigned>(batch));
  project_rows_kernel<T, kRows, kPos><<<grid, 32 * p.warps, rows_smem(p, di), stream>>>(u, w_x, xdt, B, C, di,
                                                                                        rows_f32, rows_b, rows_c, len);
}

// Kernel 1 in the plan's launch shape.
template <typename T>
void launch_rows(const Plan& p, const T* u, const T* w_x, float* xdt, T* B, T* C, int64_t batch, int di, int rows_f32,
                 int rows_b, int rows_c, int len, cudaStream_t stream) {
  auto rows = p.rows_per_block == 8 ? (p.pos == 2 ? launch_rows_shape<T, 8, 2> : launch_rows_shape<T, 8, 1>)
                                    : (p.pos == 2 ? launch_rows_shape<T, 4, 2> : launch_rows_shape<T, 4, 1>);
  rows(p, u, w_x, xdt, B, C, batch, di, rows_f32, rows_b, rows_c, len, stream);
}

template <typename T>
cudaError_t launch(const Plan& p, const void* u_, const void* w_x_, const void* dt_weight_, void* delta_, void* B_,
                   void* C_, int64_t batch, int di, int rank, int n_state, int len, cudaStream_t stream) {
  const T* u = static_cast<const T*>(u_);
  const T* w_x = static_cast<const T*>(w_x_);
  T* B = static_cast<T*>(B_);
  T* C = static_cast<T*>(C_);
  float* xdt = nullptr;
  cudaError_t err =
      cudaMallocAsync(reinterpret_cast<void**>(&xdt), sizeof(float) * batch * 4 * rank * len, stream);
  if (err != cudaSuccess) return err;
  launch_rows<T>(p, u, w_x, xdt, B, C, batch, di, 4 * rank, 4 * n_state, 4 * n_state, len, stream);
  err = cudaGetLastError();
  if (err == cudaSuccess) {
    const dim3 grid(cdiv(di, kDeltaChannels) * cdiv(len, 32 * p.pos), 4, static_cast<unsigned>(batch));
    auto kernel = p.pos == 2 ? project_delta_kernel<T, 2> : project_delta_kernel<T, 1>;
    kernel<<<grid, kDeltaWarps * 32, delta_smem(p, rank), stream>>>(xdt, static_cast<const T*>(dt_weight_),
                                                                   static_cast<T*>(delta_), di, rank, len);
    err = cudaGetLastError();
  }
  const cudaError_t free_err = cudaFreeAsync(xdt, stream);
  return err != cudaSuccess ? err : free_err;
}

cudaError_t multiprocessor_count(int* count) {
  int device = 0;
  const cudaError_t err = cudaGetDevice(&device);
  return err != cudaSuccess ? err : cudaDeviceGetAttribute(count, cudaDevAttrMultiProcessorCount, device);
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
  if (batch == 0 || d_inner == 0 || len == 0) return nullptr;
  if (!u || !w_x || !dt_weight || !delta || !B || !C) return "null tensor pointer";
  int multiprocessors = 0;
  cudaError_t err = multiprocessor_count(&multiprocessors);
  if (err != cudaSuccess) return cudaGetErrorString(err);
  const int di = static_cast<int>(d_inner), r = static_cast<int>(rank), n = static_cast<int>(d_state);
  const int l = static_cast<int>(len);
  const Plan p = plan(batch, di, 4 * r + 8 * n, l, multiprocessors);
  const int64_t tiles = (len + 32 * p.pos - 1) / (32 * p.pos);
  if (tiles * std::max<int64_t>((4 * rank + 8 * d_state + 3) / 4, (d_inner + kDeltaChannels - 1) / kDeltaChannels) >
      INT32_MAX) {
    return "map too large for the projection kernel";
  }
  if (rows_smem(p, di) > kSmemBudget) return "d_inner too large for the projection kernel (at most 3072)";
  if (delta_smem(p, r) > kSmemBudget) return "rank too large for the projection kernel (at most 128)";
  auto s = static_cast<cudaStream_t>(stream);
  if (dtype == 1) {
    err = launch<__half>(p, u, w_x, dt_weight, delta, B, C, batch, di, r, n, l, s);
  } else if (dtype == 0) {
    err = launch<float>(p, u, w_x, dt_weight, delta, B, C, batch, di, r, n, l, s);
  } else {
    return "dtype must be 0 (float32) or 1 (float16)";
  }
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

extern "C" const char* vmamba_narrow_pointwise_conv_cuda(int dtype, const void* x, const void* weight, void* y,
                                                         int64_t batch, int64_t in_channels, int64_t out_channels,
                                                         int64_t len, void* stream) {
  if (batch < 0 || in_channels < 0 || out_channels < 0 || len < 0) return "negative dimension";
  if (batch > 65535) return "batch must be at most 65535";
  if (len > (int64_t{1} << 30) || in_channels > (int64_t{1} << 20) || out_channels > 4096) {
    return "tensor too large for the narrow pointwise convolution (at most 4096 output channels)";
  }
  if (batch == 0 || out_channels == 0 || len == 0) return nullptr;
  if (!x || !weight || !y) return "null tensor pointer";
  int multiprocessors = 0;
  cudaError_t err = multiprocessor_count(&multiprocessors);
  if (err != cudaSuccess) return cudaGetErrorString(err);
  const int cin = static_cast<int>(in_channels), cout = static_cast<int>(out_channels), l = static_cast<int>(len);
  const Plan p = plan(batch, cin, cout, l, multiprocessors);
  if ((len + 32 * p.pos - 1) / (32 * p.pos) * ((out_channels + 3) / 4) > INT32_MAX) {
    return "map too large for the narrow pointwise convolution";
  }
  if (rows_smem(p, cin) > kSmemBudget) return "too many input channels for the narrow pointwise convolution (at most 3072)";
  auto s = static_cast<cudaStream_t>(stream);
  if (dtype == 1) {
    launch_rows<__half>(p, static_cast<const __half*>(x), static_cast<const __half*>(weight), nullptr,
                        static_cast<__half*>(y), nullptr, batch, cin, 0, cout, 0, l, s);
  } else if (dtype == 0) {
    launch_rows<float>(p, static_cast<const float*>(x), static_cast<const float*>(weight), nullptr,
                       static_cast<float*>(y), nullptr, batch, cin, 0, cout, 0, l, s);
  } else {
    return "dtype must be 0 (float32) or 1 (float16)";
  }
  err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}
