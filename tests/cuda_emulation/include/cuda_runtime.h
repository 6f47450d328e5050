// Host emulation of the few CUDA runtime and device features the kernels use, for checking a kernel's index
// arithmetic and barriers on a machine without a GPU (tests/cuda_emulation/emulate.py). A launch runs as
// blockDim.x std::threads that take the blocks one after another: __syncthreads is a barrier of the block's threads,
// the warp shuffles exchange through a per-warp buffer between two barriers of the warp's 32 threads. Nothing here is
// timing-faithful; it checks what a kernel computes, not how fast.
#pragma once

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __shared__ static

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(8) float2 {
  float x, y;
};
struct alignas(8) uint2 {
  unsigned x, y;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }

typedef struct CUstream_st* cudaStream_t;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
enum cudaDeviceAttr {
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrMaxSharedMemoryPerMultiprocessor = 81,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaMemcpyKind { cudaMemcpyDeviceToDevice = 3 };

namespace vmamba_emulate {

inline thread_local dim3 thread_index, block_index;
inline dim3 block_dim, grid_dim;
inline int multiprocessors = 132;  // an H100's count, so launch shapes are chosen as there
inline std::vector<float4> dynamic_smem;
inline std::barrier<>* block_barrier = nullptr;
inline std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
inline std::vector<float> warp_exchange;  // [warp][lane]

template <typename Kernel, typename... Args>
void launch(Kernel kernel, dim3 grid, dim3 block, size_t smem, cudaStream_t, Args... args) {
  const unsigned threads = block.x * block.y * block.z;
  const unsigned warps = (threads + 31) / 32;  // the last one partial where threads is not a multiple of 32
  grid_dim = grid;
  block_dim = block;
  dynamic_smem.assign((smem + sizeof(float4) - 1) / sizeof(float4) + 1, float4{NAN, NAN, NAN, NAN});
  warp_exchange.assign(32 * warps, 0.0f);
  // One CPU thread a CUDA thread for the whole launch, running the blocks in turn. Between blocks every thread meets
  // at `between` (never dropped), and thread 0 makes the next block's barriers: a thread that returns from the kernel
  // drops out of its block's barriers only.
  std::barrier<> between(threads);
  std::unique_ptr<std::barrier<>> block_sync;
  const unsigned blocks = grid.x * grid.y * grid.z;
  std::vector<std::thread> pool;
  for (unsigned t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      thread_index = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
      for (unsigned i = 0; i < blocks; ++i) {
        if (t == 0) {
          block_sync = std::make_unique<std::barrier<>>(threads);
          block_barrier = block_sync.get();
          warp_barriers.clear();
          for (unsigned w = 0; w < warps; ++w) {
            warp_barriers.push_back(std::make_unique<std::barrier<>>(std::min(32u, threads - 32 * w)));
          }
        }
        between.arrive_and_wait();
        block_index = dim3(i % grid.x, (i / grid.x) % grid.y, i / (grid.x * grid.y));
        kernel(args...);
        warp_barriers[t / 32]->arrive_and_drop();
        block_barrier->arrive_and_drop();
        between.arrive_and_wait();
      }
    });
  }
  for (auto& th : pool) th.join();
}

}  // namespace vmamba_emulate

#define threadIdx (::vmamba_emulate::thread_index)
#define blockIdx (::vmamba_emulate::block_index)
#define blockDim (::vmamba_emulate::block_dim)
#define gridDim (::vmamba_emulate::grid_dim)

inline void __syncthreads() { vmamba_emulate::block_barrier->arrive_and_wait(); }

// Warp shuffles: every lane of the warp that has not returned must make the call (the kernels here call them from
// warp-uniform code); a lane reads the value `source` gives it, or its own where the source is outside the warp.
template <typename Source>
float warp_exchange_value(float v, Source source) {
  const unsigned t = threadIdx.x, warp = t / 32, lane = t % 32;
  float* buf = vmamba_emulate::warp_exchange.data() + warp * 32;
  buf[lane] = v;
  vmamba_emulate::warp_barriers[warp]->arrive_and_wait();
  const int from = source(static_cast<int>(lane));
  const float got = from >= 0 && from < 32 ? buf[from] : v;
  vmamba_emulate::warp_barriers[warp]->arrive_and_wait();
  return got;
}
inline float __shfl_xor_sync(unsigned, float v, int lane_mask) {
  return warp_exchange_value(v, [&](int lane) { return lane ^ lane_mask; });
}
inline float __shfl_up_sync(unsigned, float v, unsigned delta) {
  return warp_exchange_value(v, [&](int lane) { return lane - static_cast<int>(delta); });
}
inline float __shfl_sync(unsigned, float v, int source_lane) {
  return warp_exchange_value(v, [&](int) { return source_lane % 32; });
}

inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
using std::fmaf;
using std::max;
using std::min;
template <typename T>
T __ldg(const T* p) {
  return *p;
}

// Stream-ordered allocation: launches run to completion when called, so plain host memory does.
inline cudaError_t cudaMallocAsync(void** ptr, size_t bytes, cudaStream_t) {
  *ptr = std::malloc(bytes > 0 ? bytes : 1);
  return *ptr != nullptr ? cudaSuccess : cudaErrorInvalidValue;
}
inline cudaError_t cudaFreeAsync(void* ptr, cudaStream_t) {
  std::free(ptr);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpy2DAsync(void* dst, size_t dpitch, const void* src, size_t spitch, size_t width,
                                     size_t height, cudaMemcpyKind, cudaStream_t) {
  for (size_t row = 0; row < height; ++row) {
    std::memcpy(static_cast<char*>(dst) + row * dpitch, static_cast<const char*>(src) + row * spitch, width);
  }
  return cudaSuccess;
}
template <typename Function>
cudaError_t cudaFuncSetAttribute(Function, cudaFuncAttribute, int) {
  return cudaSuccess;
}
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t) { return "emulated CUDA error"; }
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  *value = attr == cudaDevAttrMultiProcessorCount ? vmamba_emulate::multiprocessors
          : attr == cudaDevAttrMaxSharedMemoryPerMultiprocessor ? 228 * 1024
                                                                 : 227 * 1024;
  return cudaSuccess;
}
