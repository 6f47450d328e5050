// CUDA LayerNorm over the last axis (contract and why: layer_norm.cuh).
#include <cuda_fp16.h>
#include <cuda_runtime.h>

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

// `Group` threads per row; each holds up to `Elems` values of it in registers (pairs lane, lane + Group, ...).
template <typename T, int Group, int Elems>
__global__ void __launch_bounds__(kThreads) layer_norm_kernel(const T* __restrict__ x, const T* __restrict__ scale,
                                                              const T* __restrict__ bias, T* __restrict__ y,
                                                              int64_t rows, int width, float eps) {
  constexpr int kPairs = Elems / 2;
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) / Group;
  const int lane = threadIdx.x % Group;
  const bool live = row < rows;  // a group past the end still joins the shuffles, and stores nothing
  const int pairs = width / 2;
  const Pair<T>* src = reinterpret_cast<const Pair<T>*>(x + (live ? row : 0) * width);
  float v[Elems];
  float sum = 0.0f;
#pragma unroll
  for (int i = 0; i < kPairs; ++i) {
    const int q = lane + Group * i;
    if (live && q < pairs) {
      const Pair<T> p = src[q];
      v[2 * i] = to_f(p.v[0]);
      v[2 * i + 1] = to_f(p.v[1]);
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
cudaError_t launch(const void* x, const void* scale, const void* bias, void* y, int64_t rows, int width, float eps,
                   cudaStream_t stream) {
  const int64_t threads = rows * Group;
  const unsigned blocks = static_cast<unsigned>((threads + kThreads - 1) / kThreads);
  layer_norm_kernel<T, Group, Elems><<<blocks, kThreads, 0, stream>>>(
      static_cast<const T*>(x), static_cast<const T*>(scale), static_cast<const T*>(bias), static_cast<T*>(y), rows,
      width, eps);
  return cudaGetLastError();
}

// Threads per row by width (narrow rows: more rows per warp), then the smallest register budget that holds a row.
template <typename T>
cudaError_t dispatch(const void* x, const void* scale, const void* bias, void* y, int64_t rows, int width, float eps,
                     cudaStream_t stream) {
  if (width <= 64) return launch<T, 8, 8>(x, scale, bias, y, rows, width, eps, stream);
  if (width <= 128) return launch<T, 16, 8>(x, scale, bias, y, rows, width, eps, stream);
  if (width <= 256) return launch<T, 16, 16>(x, scale, bias, y, rows, width, eps, stream);
  if (width <= 512) return launch<T, 32, 16>(x, scale, bias, y, rows, width, eps, stream);
  if (width <= 1024) return launch<T, 32, 32>(x, scale, bias, y, rows, width, eps, stream);
  return launch<T, 32, 64>(x, scale, bias, y, rows, width, eps, stream);
}

}  // namespace

extern "C" const char* vmamba_layer_norm_cuda(int dtype, const void* x, const void* scale, const void* bias, void* y,
                                              int64_t rows, int64_t width, float epsilon, void* stream) {
  if (width < 2 || width > VMAMBA_LAYER_NORM_MAX_WIDTH || width % 2 != 0) {
    return "LastAxisLayerNorm (CUDA): the last axis must have an even width from 2 to 2048";
  }
  if (rows < 0) return "LastAxisLayerNorm (CUDA): negative row count";
  if (rows == 0) return nullptr;
  const int w = static_cast<int>(width);
  auto s = static_cast<cudaStream_t>(stream);
  cudaError_t err;
  if (dtype == 1) {
    err = dispatch<__half>(x, scale, bias, y, rows, w, epsilon, s);
  } else if (dtype == 0) {
    err = dispatch<float>(x, scale, bias, y, rows, w, epsilon, s);
  } else {
    return "LastAxisLayerNorm (CUDA): dtype must be 0 (float32) or 1 (float16)";
  }
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}
