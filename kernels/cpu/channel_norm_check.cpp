// Stand-alone check of the channel LayerNorm kernel (channel_layer_norm.h) against a float64 reference, for any
// platform the kernel is built for: compiled with that platform's compiler and linked with the kernel's objects
// (build_kernels: norm_<variant>.o), it runs natively or under an emulator (qemu-aarch64-static; tests/test_arm64.py).
// No Python, no ONNX Runtime. Prints the variant the dispatcher picked and each case's largest error; exit status 0
// when every case is within 1e-5 of the reference (relative to its largest value), 1 otherwise. `channel_norm_check
// ISA` also fails unless the dispatcher picked ISA.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <thread>
#include <vector>

#include "channel_layer_norm.h"

namespace {

struct Case {
  int64_t batch, channels, pixels;
  float offset;
};

// Two threads taking items in turn: the kernel's ParallelFor contract, as ORT's pool runs it.
void two_threads(void*, int64_t n, void (*fn)(void*, int64_t), void* arg) {
  std::atomic<int64_t> next{0};
  auto worker = [&]() {
    for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) fn(arg, i);
  };
  std::thread other(worker);
  worker();
  other.join();
}

// Largest error of y against the reference, relative to the reference's largest value, or a negative value if the
// kernel refused.
double check(const Case& c, unsigned seed, bool threaded) {
  const int64_t count = c.batch * c.channels * c.pixels;
  std::mt19937 gen(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> x(count), w(c.channels), b(c.channels);
  for (auto& v : x) v = 2.0f * normal(gen) + c.offset;
  for (auto& v : w) v = normal(gen);
  for (auto& v : b) v = normal(gen);
  std::vector<float> y(count, std::nanf(""));  // a pixel the kernel leaves unwritten stays NaN and fails
  const vmamba::ChannelNormTensors t{x.data(), w.data(), b.data(), y.data()};
  const vmamba::ChannelNormShape shape{c.batch, c.channels, c.pixels};
  if (vmamba::channel_layer_norm_f32(t, shape, 1e-5f, threaded ? two_threads : nullptr, nullptr) != nullptr) {
    return -1.0;
  }
  double worst = 0.0, scale = 1.0;
  for (int64_t n = 0; n < c.batch; ++n) {
    for (int64_t p = 0; p < c.pixels; ++p) {
      auto at = [&](int64_t ch) { return (n * c.channels + ch) * c.pixels + p; };
      double mean = 0.0, var = 0.0;
      for (int64_t ch = 0; ch < c.channels; ++ch) mean += x[at(ch)];
      mean /= double(c.channels);
      for (int64_t ch = 0; ch < c.channels; ++ch) var += (x[at(ch)] - mean) * (x[at(ch)] - mean);
      const double rstd = 1.0 / std::sqrt(var / double(c.channels) + 1e-5);
      for (int64_t ch = 0; ch < c.channels; ++ch) {
        const double ref = (x[at(ch)] - mean) * rstd * double(w[ch]) + double(b[ch]);
        const double err = std::fabs(double(y[at(ch)]) - ref);
        scale = std::max(scale, std::fabs(ref));
        worst = err == err ? std::max(worst, err) : 1e30;
      }
    }
  }
  return worst / scale;
}

}  // namespace

int main(int argc, char** argv) {
  const char* isa = vmamba::channel_norm_isa();
  std::printf("channel_norm_check: variant %s\n", isa);
  if (argc > 1 && std::strcmp(argv[1], isa) != 0) {
    std::printf("channel_norm_check: FAIL: expected variant %s\n", argv[1]);
    return 1;
  }
  // C from 1 to past a stage-4 width; pixel counts narrower than a vector, around multiples of the vector widths
  // (4, 8, 16 lanes) and of the 4-vector block, and real stage sizes; batch > 1; a large common offset. One pixel
  // per image is the row form (LastAxisLayerNorm: rows of C contiguous values, widths around the vector widths).
  const Case cases[] = {
      {1, 1, 15, 0.0f},   {2, 3, 7, 0.0f},    {1, 5, 1, 0.0f},         {2, 96, 3136, 0.0f}, {1, 100, 143, 0.0f},
      {1, 384, 196, 0.0f}, {2, 768, 49, 1000.0f}, {1, 17, 65, 0.0f}, {3, 33, 63, 0.0f},   {1, 1000, 9, 0.0f},
      {3136, 96, 1, 0.0f}, {7, 17, 1, 0.0f},  {5, 33, 1, 1000.0f},     {49, 768, 1, 0.0f},
  };
  int failures = 0;
  unsigned seed = 1;
  for (const Case& c : cases) {
    for (bool threaded : {false, true}) {
      const double err = check(c, seed++, threaded);
      const bool ok = err >= 0.0 && err <= 1e-5;
      failures += ok ? 0 : 1;
      std::printf("channel_norm_check: batch %lld C %lld pixels %lld offset %g threads %d: max err %.2e %s\n",
                  static_cast<long long>(c.batch), static_cast<long long>(c.channels),
                  static_cast<long long>(c.pixels), c.offset, threaded ? 2 : 1, err, ok ? "ok" : "FAIL");
    }
  }
  std::printf("channel_norm_check: %s (%d failures)\n", failures ? "FAIL" : "PASS", failures);
  return failures ? 1 : 0;
}
