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

typedef struct CUstream_st* cudaStream_t;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16, cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };

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
  if (threads % 32 != 0) std::abort();  // the kernels here launch whole warps
  grid_dim = grid;
  block_dim = block;
  dynamic_smem.assign((smem + sizeof(float4) - 1) / sizeof(float4) + 1, float4{NAN, NAN, NAN, NAN});
  warp_exchange.assign(threads, 0.0f);
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
          for (unsigned w = 0; w < threads / 32; ++w) warp_barriers.push_back(std::make_unique<std::barrier<>>(32));
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

inline float __shfl_xor_sync(unsigned mask, float v, int lane_mask) {
  if (mask != 0xffffffffu) std::abort();  // only full-warp shuffles are emulated
  const unsigned t = threadIdx.x, warp = t / 32, lane = t % 32;
  float* buf = vmamba_emulate::warp_exchange.data() + warp * 32;
  buf[lane] = v;
  vmamba_emulate::warp_barriers[warp]->arrive_and_wait();
  const float got = buf[lane ^ static_cast<unsigned>(lane_mask)];
  vmamba_emulate::warp_barriers[warp]->arrive_and_wait();
  return got;
}

inline float __expf(float x) { return std::exp(x); }
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
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t) { return "emulated CUDA error"; }
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  *value = attr == cudaDevAttrMultiProcessorCount ? vmamba_emulate::multiprocessors : 227 * 1024;
  return cudaSuccess;
}
