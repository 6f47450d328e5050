// C entry point of libvmamba_scan.so, called through ctypes by vmamba_export/scan/native.py (the torch op's CPU path).
//
// Threads: a plain std::thread fan-out per call (num_threads is torch.get_num_threads()). Spawning costs tens of
// microseconds per call, small next to a stage-1 scan (about a millisecond), and keeps the library free of any
// persistent pool that could fight torch's own threads or outlive a fork.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <system_error>
#include <thread>
#include <vector>

#include "selective_scan_2d.h"

namespace {

struct ThreadCount {
  int n;
};

void thread_parallel_for(void* ctx, int64_t n, void (*fn)(void*, int64_t), void* arg) {
  const int64_t threads = std::min<int64_t>(static_cast<ThreadCount*>(ctx)->n, n);
  if (threads <= 1) {
    for (int64_t i = 0; i < n; ++i) fn(arg, i);
    return;
  }
  // Dynamic scheduling: items are equal-sized, but the machine may be shared.
  std::atomic<int64_t> next{0};
  auto worker = [&]() {
    for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) fn(arg, i);
  };
  std::vector<std::thread> pool;
  pool.reserve(static_cast<size_t>(threads - 1));
  for (int64_t i = 1; i < threads; ++i) {
    try {
      pool.emplace_back(worker);
    } catch (const std::system_error&) {
      break;  // could not start more threads: the ones running (and this one) take the remaining items
    }
  }
  worker();
  for (auto& thread : pool) thread.join();
}

}  // namespace

extern "C" {

// Returns 0 on success, 1 for bad arguments (shape, null pointer), 2 for any other failure (out of memory).
// The message of the last failure goes to stderr: ctypes callers get only the code.
__attribute__((visibility("default"))) int vmamba_selective_scan_2d_f32(
    const float* u, const float* delta, const float* A_logs, const float* B, const float* C, const float* D,
    const float* delta_bias, float* y, int64_t batch, int64_t k, int64_t d_inner, int64_t d_state, int64_t height,
    int64_t width, int num_threads) {
  const vmamba::ScanShape shape{batch, k, d_inner, d_state, height, width};
  if (const char* err = vmamba::check_scan_shape(shape)) {
    std::fprintf(stderr, "vmamba_selective_scan_2d_f32: %s\n", err);
    return 1;
  }
  const bool empty = batch == 0 || d_inner == 0 || height == 0 || width == 0;
  if (!empty && (!u || !delta || !A_logs || !B || !C || !D || !delta_bias || !y)) {
    std::fprintf(stderr, "vmamba_selective_scan_2d_f32: null tensor pointer\n");
    return 1;
  }
  const vmamba::ScanTensors tensors{u, delta, A_logs, B, C, D, delta_bias, y};
  ThreadCount threads{num_threads < 1 ? 1 : num_threads};
  const char* err = nullptr;
  try {
    err = vmamba::selective_scan_2d_f32(tensors, shape, thread_parallel_for, &threads);
  } catch (...) {  // nothing may unwind into the ctypes caller
    err = "internal error";
  }
  if (err == nullptr) return 0;
  std::fprintf(stderr, "vmamba_selective_scan_2d_f32: %s\n", err);
  return 2;
}

// The instruction-set variant in use (selective_scan_2d.h: scan_isa), for benchmarks and bug reports.
__attribute__((visibility("default"))) const char* vmamba_scan_isa(void) { return vmamba::scan_isa(); }

// selective_scan_2d.h: scan_arithmetic_floor on num_threads threads (a benchmark; returns its checksum).
__attribute__((visibility("default"))) float vmamba_scan_arithmetic_floor(int64_t rows, int num_threads) {
  ThreadCount threads{num_threads < 1 ? 1 : num_threads};
  return vmamba::scan_arithmetic_floor(rows, thread_parallel_for, &threads);
}

}  // extern "C"
