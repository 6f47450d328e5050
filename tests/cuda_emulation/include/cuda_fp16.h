// Host emulation of CUDA's __half (see cuda_runtime.h here): GCC's _Float16, conversions rounding to nearest even as
// __float2half_rn does.
#pragma once

#include "cuda_runtime.h"  // float2

struct __half {
  _Float16 value;
};
struct alignas(4) __half2 {
  __half x, y;
};

inline float __half2float(__half h) { return static_cast<float>(h.value); }
inline __half __float2half_rn(float f) { return __half{static_cast<_Float16>(f)}; }
inline float2 __half22float2(__half2 h) { return float2{__half2float(h.x), __half2float(h.y)}; }
