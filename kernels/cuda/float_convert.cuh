// float32 <-> storage type (float or __half) for the CUDA kernels: their tensors are float32 or float16, their
// arithmetic float32. Device-only helpers, included by selective_scan_2d.cu and layer_norm.cu.
#pragma once

#include <cuda_fp16.h>

namespace vmamba_cuda_detail {

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

}  // namespace vmamba_cuda_detail
