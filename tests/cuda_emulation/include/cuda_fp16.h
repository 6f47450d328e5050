// Host emulation of CUDA's __half (see cuda_runtime.h here): GCC's _Float16, conversions rounding to nearest even as
// __float2half_rn does.
#pragma once

struct __half {
  _Float16 value;
};

inline float __half2float(__half h) { return static_cast<float>(h.value); }
inline __half __float2half_rn(float f) { return __half{static_cast<_Float16>(f)}; }
