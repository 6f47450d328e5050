// The threading hook of the CPU kernels: each kernel splits its work into independent items and hands them to a
// ParallelFor callback supplied by its caller, so the torch binding (c_api.cpp) can use plain std::threads, the ONNX
// Runtime ops (custom_op.cpp) ORT's intra-op pool and the OpenVINO extension its TBB arena, without any runtime's
// threads fighting another's.
#pragma once

#include <cstdint>

namespace vmamba {

// Runs fn(arg, i) for every i in [0, n), possibly concurrently, and returns when all calls are done.
using ParallelFor = void (*)(void* ctx, int64_t n, void (*fn)(void* arg, int64_t i), void* arg);

}  // namespace vmamba
