// CUDA LayerNorms of the cuda-onnxruntime graph: over the last axis, with a fused residual sum, and from channel-first
// input (contracts and why: layer_norm.cuh).
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <type_traits>

#include "float_convert.cuh"
#include "layer_norm.cuh"

namespace {

constexpr int kThreads = 256;

using vmamba_cuda_detail::from_f;
using vmamba_cuda_detail::to_f;

// Two neighbouring elements, loaded and stored as one access (rows of even width stay aligned).
template <typename T>
struct alignas(2 * sizeof(T)) Pair {
  T v[2];
};

// Sum over the `Group` threads sharing a row (aligned lane groups of one warp; every lane of the warp takes part).
template <int Group>
__device__ __forceinline__ float group_sum(float s) {
#pragma unroll
  for (int offset = Group / 2; offset > 0; offset >>= 1) s += __shfl_xor_sync(0xffffffffu, s, offset);
  return s;
}

// Rounds a float32 value to the storage type and back: a fused sum is rounded where the unfused graph's Add rounds.
template <typename T>
__device__ __forceinline__ float rounded(float v) {
  return to_f(from_f<T>(v));
}

// The residual form's extra tensors: y's row is normalised from s = x (+ x_bias) + residual, each Add rounded to T as
// ONNX Runtime's Adds would; `sum` (may be null) receives s.
template <typename T>
struct Residual {
  const T* residual;
  const T* x_bias;  // (width,) or null
  T* sum;           // null: s is not stored
};

// `Group` threads per row; each holds up to `Elems` values of it in registers (pairs lane, lane + Group, ...).
// `WithResidual`: the row is the rounded sum of x, x_bias and residual (ResidualLayerNorm), else x (LastAxisLayerNorm).
template <typename T, int Group, int Elems, bool WithResidual>
__global__ void __launch_bounds__(kThreads) layer_norm_kernel(const T* __restrict__ x, Residual<T> res,
                                                              const T* __restrict__ scale, const T* __restrict__ bias,
                                                              T* __restrict__ y, int64_t rows, int width, float eps) {
  constexpr int kPairs = Elems / 2;
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) / Group;
  const int lane = threadIdx.x % Group;
  const bool live = row < rows;  // a group past the end still joins the shuffles, and stores nothing
  const int pairs = width / 2;
  const int64_t offset = (live ? row : 0) * width;
  const Pair<T>* src = reinterpret_cast<const Pair<T>*>(x + offset);
  float v[Elems];
  float sum = 0.0f;
#pragma unroll
  for (int i = 0; i < kPairs; ++i) {
    const int q = lane + Group * i;
    if (live && q < pairs) {
      const Pair<T> p = src[q];
      v[2 * i] = to_f(p.v[0]);
      v[2 * i + 1] = to_f(p.v[1]);
      if constexpr (WithResidual) {
        if (res.x_bias != nullptr) {
          const Pair<T> xb = reinterpret_cast<const Pair<T>*>(res.x_bias)[q];
          v[2 * i] = rounded<T>(v[2 * i] + to_f(xb.v[0]));
          v[2 * i + 1] = rounded<T>(v[2 * i + 1] + to_f(xb.v[1]));
        }
        const Pair<T> r = reinterpret_cast<const Pair<T>*>(res.residual + offset)[q];
        Pair<T> s;
        s.v[0] = from_f<T>(v[2 * i] + to_f(r.v[0]));
        s.v[1] = from_f<T>(v[2 * i + 1] + to_f(r.v[1]));
        v[2 * i] = to_f(s.v[0]);
        v[2 * i + 1] = to_f(s.v[1]);
        if (res.sum != nullptr) reinterpret_cast<Pair<T>*>(res.sum + offset)[q] = s;
      }
    } else {
      v[2 * i] = v[2 * i + 1] = 0.0f;
    }
    sum += v[2 * i] + v[2 * i + 1];
  }
  const float mean = group_sum<Group>(sum) / width;
  float squares = 0.0f;
#pragma unroll
  for (int i = 0; i < kPairs; ++i) {
    if (lane + Group * i < pairs) {
      const float d0 = v[2 * i] - mean, d1 = v[2 * i + 1] - mean;
      squares += d0 * d0 + d1 * d1;
    }
  }
  const float rstd = rsqrtf(group_sum<Group>(squares) / width + eps);
  if (!live) return;
  const Pair<T>* s = reinterpret_cast<const Pair<T>*>(scale);
  const Pair<T>* b = reinterpret_cast<const Pair<T>*>(bias);
  Pair<T>* dst = reinterpret_cast<Pair<T>*>(y + row * width);
#pragma unroll
  for (int i = 0; i < kPairs; ++i) {
    const int q = lane + Group * i;
    if (q < pairs) {
      const Pair<T> sp = s[q], bp = b[q];
      Pair<T> out;
      out.v[0] = from_f<T>((v[2 * i] - mean) * rstd * to_f(sp.v[0]) + to_f(bp.v[0]));
      out.v[1] = from_f<T>((v[2 * i + 1] - mean) * rstd * to_f(sp.v[1]) + to_f(bp.v[1]));
      dst[q] = out;
    }
  }
}

template <typename T, int Group, int Elems>
cudaError_t launch(const void* x, const Residual<T>* res, const void* scale, const void* bias, void* y, int64_t rows,
                   int width, float eps, cudaStream_t stream) {
  const int64_t threads = rows * Group;
  const unsigned blocks = static_cast<unsigned>((threads + kThreads - 1) / kThreads);
  const auto* xt = static_cast<const T*>(x);
  const auto *st = static_cast<const T*>(scale), *bt = static_cast<const T*>(bias);
  if (res != nullptr) {
    layer_norm_kernel<T, Group, Elems, true>
        <<<blocks, kThreads, 0, stream>>>(xt, *res, st, bt, static_cast<T*>(y), rows, width, eps);
  } else {
    layer_norm_kernel<T, Group, Elems, false>
        <<<blocks, kThreads, 0, stream>>>(xt, Residual<T>{}, st, bt, static_cast<T*>(y), rows, width, eps);
  }
  return cudaGetLastError();
}

// Threads per row by width (narrow rows: more rows per warp), then the smallest register budget that holds a row.
template <typename T>
cudaError_t dispatch(const void* x, const Residual<T>* res, const void* scale, const void* bias, void* y, int64_t rows,
                     int width, float eps, cudaStream_t stream) {
  if (width <= 64) return launch<T, 8, 8>(x, res, scale, bias, y, rows, width, eps, stream);
  if (width <= 128) return launch<T, 16, 8>(x, res, scale, bias, y, rows, width, eps, stream);
  if (width <= 256) return launch<T, 16, 16>(x, res, scale, bias, y, rows, width, eps, stream);
  if (width <= 512) return launch<T, 32, 16>(x, res, scale, bias, y, rows, width, eps, stream);
  if (width <= 1024) return launch<T, 32, 32>(x, res, scale, bias, y, rows, width, eps, stream);
  return launch<T, 32, 64>(x, res, scale, bias, y, rows, width, eps, stream);
}

// TransposeLayerNorm: x is (batch, channels, positions), y (batch, positions, channels), each y row the LayerNorm of
// one position's channels. A block stages `Positions` positions of all channels in shared memory (reads coalesced
// along positions, kLoadBatch of them in flight per thread; rows padded to an odd stride so a warp reading one
// position's channels hits distinct banks), then each warp normalises positions and writes their rows (coalesced
// along channels).
constexpr int kLoadBatch = 8;

template <typename T, int Positions>
__global__ void __launch_bounds__(kThreads)
    transpose_layer_norm_kernel(const T* __restrict__ x, const T* __restrict__ scale, const T* __restrict__ bias,
                                T* __restrict__ y, int channels, int64_t positions, float eps) {
  extern __shared__ float staged[];  // [channels][Positions + 1]
  constexpr int kStride = Positions + 1;
  constexpr int kGroup = kThreads / Positions;  // channels one pass of the block stages
  const int64_t first = static_cast<int64_t>(blockIdx.x) * Positions;
  const int64_t batch = blockIdx.y;
  const int p = threadIdx.x % Positions;
  const bool position_ok = first + p < positions;
  const T* src = x + batch * channels * positions + first + p;
  for (int c = threadIdx.x / Positions; c < channels; c += kLoadBatch * kGroup) {
    float v[kLoadBatch];
#pragma unroll
    for (int k = 0; k < kLoadBatch; ++k) {
      const int ck = c + k * kGroup;
      v[k] = position_ok && ck < channels ? to_f(src[static_cast<int64_t>(ck) * positions]) : 0.0f;
    }
#pragma unroll
    for (int k = 0; k < kLoadBatch; ++k) {
      const int ck = c + k * kGroup;
      if (ck < channels) staged[ck * kStride + p] = v[k];
    }
  }
  __syncthreads();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int q = warp; q < Positions && first + q < positions; q += kThreads / 32) {
    float sum = 0.0f;
    for (int c = lane; c < channels; c += 32) sum += staged[c * kStride + q];
    const float mean = group_sum<32>(sum) / channels;
    float squares = 0.0f;
    for (int c = lane; c < channels; c += 32) {
      const float d = staged[c * kStride + q] - mean;
      squares += d * d;
    }
    const float rstd = rsqrtf(group_sum<32>(squares) / channels + eps);
    T* dst = y + (batch * positions + first + q) * channels;
    for (int c = lane; c < channels; c += 32) {
      dst[c] = from_f<T>((staged[c * kStride + q] - mean) * rstd * to_f(scale[c]) + to_f(bias[c]));
    }
  }
}

template <typename T, int Positions>
cudaError_t launch_transpose(const void* x, const void* scale, const void* bias, void* y, int64_t batch, int channels,
                             int64_t positions, float eps, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((positions + Positions - 1) / Positions), static_cast<unsigned>(batch));
  const size_t smem = static_cast<size_t>(channels) * (Positions + 1) * sizeof(float);
  transpose_layer_norm_kernel<T, Positions><<<grid, kThreads, smem, stream>>>(
      static_cast<const T*>(x), static_cast<const T*>(scale), static_cast<const T*>(bias), static_cast<T*>(y),
      channels, positions, eps);
  return cudaGetLastError();
}

// Small maps (batch 1): one row group per position, as layer_norm_kernel, reading the position's channels straight
// from the channel-first map (one strided load per value, all in flight at once). Its reads use few bytes of each
// sector, which costs nothing while the map sits in L2 but would at batch 128; its latency is one memory round trip,
// where the staged kernel needs several and long serial work per block, with too few blocks to hide it.
template <typename T, int Group, int Elems>
__global__ void __launch_bounds__(kThreads)
    transpose_layer_norm_rows_kernel(const T* __restrict__ x, const T* __restrict__ scale, const T* __restrict__ bias,
                                     T* __restrict__ y, int64_t rows, int channels, int64_t positions, float eps) {
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) / Group;
  const int lane = threadIdx.x % Group;
  const bool live = row < rows;
  const int64_t safe = live ? row : 0;
  const T* src = x + (safe / positions) * channels * positions + safe % positions;
  float v[Elems];
  float sum = 0.0f;
#pragma unroll
  for (int i = 0; i < Elems; ++i) {
    const int c = lane + Group * i;
    v[i] = live && c < channels ? to_f(src[static_cast<int64_t>(c) * positions]) : 0.0f;
    sum += v[i];
  }
  const float mean = group_sum<Group>(sum) / channels;
  float squares = 0.0f;
#pragma unroll
  for (int i = 0; i < Elems; ++i) {
    if (lane + Group * i < channels) squares += (v[i] - mean) * (v[i] - mean);
  }
  const float rstd = rsqrtf(group_sum<Group>(squares) / channels + eps);
  if (!live) return;
  T* dst = y + row * channels;
#pragma unroll
  for (int i = 0; i < Elems; ++i) {
    const int c = lane + Group * i;
    if (c < channels) dst[c] = from_f<T>((v[i] - mean) * rstd * to_f(scale[c]) + to_f(bias[c]));
  }
}

template <typename T, int Group, int Elems>
cudaError_t launch_transpose_rows(const void* x, const void* scale, const void* bias, void* y, int64_t rows,
                                  int channels, int64_t positions, float eps, cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>((rows * Group + kThreads - 1) / kThreads);
  transpose_layer_norm_rows_kernel<T, Group, Elems><<<blocks, kThreads, 0, stream>>>(
      static_cast<const T*>(x), static_cast<const T*>(scale), static_cast<const T*>(bias), static_cast<T*>(y), rows,
      channels, positions, eps);
  return cudaGetLastError();
}

// Maps of at most this many positions (over the batch) take the row kernel, larger ones the staged kernel.
constexpr int64_t kTransposeRowsMax = 16384;

// Row kernel for small maps (threads per row by width, as dispatch); else the staged kernel with the most of 32, 16,
// 8, 4 positions a block whose float32 tile fits the default 48 KB of shared memory.
template <typename T>
cudaError_t dispatch_transpose(const void* x, const void* scale, const void* bias, void* y, int64_t batch,
                               int channels, int64_t positions, float eps, cudaStream_t stream) {
  const int64_t rows = batch * positions;
  if (rows <= kTransposeRowsMax) {
    const auto go = [&](auto group, auto elems) {
      return launch_transpose_rows<T, decltype(group)::value, decltype(elems)::value>(x, scale, bias, y, rows,
                                                                                      channels, positions, eps, stream);
    };
    using std::integral_constant;
    if (channels <= 64) return go(integral_constant<int, 8>{}, integral_constant<int, 8>{});
    if (channels <= 128) return go(integral_constant<int, 16>{}, integral_constant<int, 8>{});
    if (channels <= 256) return go(integral_constant<int, 16>{}, integral_constant<int, 16>{});
    if (channels <= 512) return go(integral_constant<int, 32>{}, integral_constant<int, 16>{});
    if (channels <= 1024) return go(integral_constant<int, 32>{}, integral_constant<int, 32>{});
    return go(integral_constant<int, 32>{}, integral_constant<int, 64>{});
  }
  const auto fits = [channels](int p) { return channels * (p + 1) * static_cast<int64_t>(sizeof(float)) <= 48 * 1024; };
  if (fits(32)) return launch_transpose<T, 32>(x, scale, bias, y, batch, channels, positions, eps, stream);
  if (fits(16)) return launch_transpose<T, 16>(x, scale, bias, y, batch, channels, positions, eps, stream);
  if (fits(8)) return launch_transpose<T, 8>(x, scale, bias, y, batch, channels, positions, eps, stream);
  return launch_transpose<T, 4>(x, scale, bias, y, batch, channels, positions, eps, stream);
}

const char* width_error(int64_t width) {
  if (width < 2 || width > VMAMBA_LAYER_NORM_MAX_WIDTH || width % 2 != 0) {
    return "the normalised axis must have an even width from 2 to 2048";
  }
  return nullptr;
}

const char* status(cudaError_t err) { return err == cudaSuccess ? nullptr : cudaGetErrorString(err); }

}  // namespace

extern "C" const char* vmamba_layer_norm_cuda(int dtype, const void* x, const void* scale, const void* bias, void* y,
                                              int64_t rows, int64_t width, float epsilon, void* stream) {
  return vmamba_residual_layer_norm_cuda(dtype, x, nullptr, nullptr, scale, bias, y, nullptr, rows, width, epsilon,
                                         stream);
}

extern "C" const char* vmamba_residual_layer_norm_cuda(int dtype, const void* x, const void* residual,
                                                       const void* x_bias, const void* scale, const void* bias, void* y,
                                                       void* sum, int64_t rows, int64_t width, float epsilon,
                                                       void* stream) {
  if (const char* err = width_error(width)) return err;
  if (rows < 0) return "negative row count";
  if (rows == 0) return nullptr;
  const int w = static_cast<int>(width);
  auto s = static_cast<cudaStream_t>(stream);
  if (dtype == 1) {
    const Residual<__half> res{static_cast<const __half*>(residual), static_cast<const __half*>(x_bias),
                               static_cast<__half*>(sum)};
    return status(dispatch<__half>(x, residual ? &res : nullptr, scale, bias, y, rows, w, epsilon, s));
  }
  if (dtype == 0) {
    const Residual<float> res{static_cast<const float*>(residual), static_cast<const float*>(x_bias),
                              static_cast<float*>(sum)};
    return status(dispatch<float>(x, residual ? &res : nullptr, scale, bias, y, rows, w, epsilon, s));
  }
  return "dtype must be 0 (float32) or 1 (float16)";
}

extern "C" const char* vmamba_transpose_layer_norm_cuda(int dtype, const void* x, const void* scale, const void* bias,
                                                        void* y, int64_t batch, int64_t channels, int64_t positions,
                                                        float epsilon, void* stream) {
  if (const char* err = width_error(channels)) return err;
  if (batch < 0 || positions < 0) return "negative batch or position count";
  if (batch > 65535) return "batch must be at most 65535";
  if (batch == 0 || positions == 0) return nullptr;
  const int c = static_cast<int>(channels);
  auto s = static_cast<cudaStream_t>(stream);
  if (dtype == 1) return status(dispatch_transpose<__half>(x, scale, bias, y, batch, c, positions, epsilon, s));
  if (dtype == 0) return status(dispatch_transpose<float>(x, scale, bias, y, batch, c, positions, epsilon, s));
  return "dtype must be 0 (float32) or 1 (float16)";
}
