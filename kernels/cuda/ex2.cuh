// 2^x on the special-function units (ex2.approx, relative error about 2^-22; denormal results flushed to zero): the
// scan's decays exp(dt * A) = 2^(dt * A * log2 e). Shared by selective_scan_2d.cu and scan_floor.cu (which must time
// the same instruction the scan runs).
#pragma once

namespace vmamba_cuda_detail {

__device__ __forceinline__ float ex2(float x) {
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
}

}  // namespace vmamba_cuda_detail
