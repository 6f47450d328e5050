// Stand-alone check of the CPU scan kernel against a float64 sequential reference, for any platform the kernel is
// built for: compiled with that platform's compiler and linked with the kernel's objects (build_kernels), it runs
// natively or under an emulator (qemu-aarch64-static; tests/test_arm64.py, scripts/arm64_check.sh). No Python, no
// ONNX Runtime. Prints the variant the dispatcher picked and each case's relative L2 error; exit status 0 when every
// case is within 1e-5, 1 otherwise. `scan_check ISA` also fails unless the dispatcher picked ISA.
//
// The reference follows docs/scan-op.md directly: four traversal orders written as explicit position lists, state
// h = exp(dt * A) h + dt * B u, y += C . h + D u, dt = softplus(delta + bias), all in double.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

extern "C" int vmamba_selective_scan_2d_f32(const float* u, const float* delta, const float* A_logs, const float* B,
                                            const float* C, const float* D, const float* delta_bias, float* y,
                                            int64_t batch, int64_t k, int64_t d_inner, int64_t d_state,
                                            int64_t height, int64_t width, int num_threads);
extern "C" const char* vmamba_scan_isa(void);

namespace {

struct Case {
  int64_t batch, d_inner, d_state, height, width;
  double delta_shift, a_shift;
};

std::vector<int64_t> order(int direction, int64_t h, int64_t w) {
  std::vector<int64_t> row, col;
  for (int64_t i = 0; i < h; ++i)
    for (int64_t j = 0; j < w; ++j) row.push_back(i * w + j);
  for (int64_t j = 0; j < w; ++j)
    for (int64_t i = 0; i < h; ++i) col.push_back(i * w + j);
  std::vector<int64_t> out = direction % 2 == 0 ? row : col;
  if (direction >= 2) std::reverse(out.begin(), out.end());
  return out;
}

double softplus(double x) { return x > 20.0 ? x : std::log1p(std::exp(x)); }

// Relative L2 error of the kernel's y against the reference for one case, or a negative value if the kernel failed.
double check(const Case& c, unsigned seed, int threads) {
  const int64_t bsz = c.batch, di = c.d_inner, n = c.d_state, h = c.height, w = c.width, len = h * w, k = 4;
  std::mt19937 gen(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  auto fill = [&](size_t count, float scale, float shift) {
    std::vector<float> v(count);
    for (auto& x : v) x = normal(gen) * scale + shift;
    return v;
  };
  const auto u = fill(bsz * di * len, 1.0f, 0.0f);
  const auto delta = fill(bsz * k * di * len, 1.0f, static_cast<float>(c.delta_shift));
  const auto a_logs = fill(k * di * n, 0.5f, static_cast<float>(c.a_shift));
  const auto bm = fill(bsz * k * n * len, 1.0f, 0.0f);
  const auto cm = fill(bsz * k * n * len, 1.0f, 0.0f);
  const auto d = fill(k * di, 1.0f, 0.0f);
  const auto bias = fill(k * di, 0.1f, 0.0f);
  std::vector<float> y(bsz * di * len, std::nanf(""));
  if (vmamba_selective_scan_2d_f32(u.data(), delta.data(), a_logs.data(), bm.data(), cm.data(), d.data(),
                                   bias.data(), y.data(), bsz, k, di, n, h, w, threads) != 0) {
    return -1.0;
  }
  std::vector<double> ref(bsz * di * len, 0.0), state(n);
  for (int64_t b = 0; b < bsz; ++b) {
    for (int dir = 0; dir < k; ++dir) {
      const auto positions = order(dir, h, w);
      for (int64_t ch = 0; ch < di; ++ch) {
        std::fill(state.begin(), state.end(), 0.0);
        const int64_t kc = dir * di + ch;
        for (int64_t p : positions) {
          const double dt = softplus(double(delta[((b * k + dir) * di + ch) * len + p]) + bias[kc]);
          const double up = u[(b * di + ch) * len + p];
          double acc = 0.0;
          for (int64_t j = 0; j < n; ++j) {
            const double a = -std::exp(double(a_logs[kc * n + j]));
            const double bj = bm[((b * k + dir) * n + j) * len + p];
            const double cj = cm[((b * k + dir) * n + j) * len + p];
            state[j] = std::exp(dt * a) * state[j] + dt * bj * up;
            acc += state[j] * cj;
          }
          ref[(b * di + ch) * len + p] += acc + double(d[kc]) * up;
        }
      }
    }
  }
  double err = 0.0, norm = 0.0;
  for (size_t i = 0; i < ref.size(); ++i) {
    const double diff = double(y[i]) - ref[i];
    err += diff * diff;
    norm += ref[i] * ref[i];
  }
  return std::sqrt(err) / std::max(std::sqrt(norm), 1e-300);
}

}  // namespace

int main(int argc, char** argv) {
  const char* isa = vmamba_scan_isa();
  std::printf("scan_check: variant %s\n", isa);
  if (argc > 1 && std::strcmp(argv[1], isa) != 0) {
    std::printf("scan_check: FAIL: expected variant %s\n", argv[1]);
    return 1;
  }
  // d_state 1 (v2 models) and 16 (v0), a generic d_state; channel counts that are not a multiple of the 16-channel
  // block or of the vector width; odd map sides; batch > 1; strong and weak decay.
  const Case cases[] = {
      {1, 16, 1, 14, 14, 0.0, 0.0}, {2, 19, 1, 5, 7, 0.0, 0.0},    {2, 21, 16, 7, 9, 0.0, 0.0},
      {1, 8, 16, 3, 13, -3.0, 1.0}, {3, 5, 3, 4, 6, 1.0, -1.0},    {1, 33, 1, 1, 17, 2.0, 0.0},
      {2, 3, 16, 9, 1, 0.5, 0.5},
  };
  int failures = 0;
  unsigned seed = 1;
  for (const Case& c : cases) {
    for (int threads : {1, 2}) {
      const double rel = check(c, seed++, threads);
      const bool ok = rel >= 0.0 && rel <= 1e-5;
      failures += ok ? 0 : 1;
      std::printf("scan_check: batch %lld d_inner %lld d_state %lld %lldx%lld threads %d: rel L2 %.2e %s\n",
                  static_cast<long long>(c.batch), static_cast<long long>(c.d_inner),
                  static_cast<long long>(c.d_state), static_cast<long long>(c.height),
                  static_cast<long long>(c.width), threads, rel, ok ? "ok" : "FAIL");
    }
  }
  std::printf("scan_check: %s (%d failures)\n", failures ? "FAIL" : "PASS", failures);
  return failures ? 1 : 0;
}
