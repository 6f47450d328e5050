// CPU kernel of the channel-axis LayerNorm `ai.vmamba::ChannelLayerNorm` (API: channel_layer_norm.h).
//
// Build: compiled once per instruction-set variant exactly as selective_scan_2d.cpp is (-DVMAMBA_SCAN_VARIANT=<name>
// and the variant's -march flags; the baseline compile also defines VMAMBA_SCAN_DISPATCH and holds the public
// functions, which pick a variant through isa_dispatch.h). The code is plain GCC vector extensions, so each compile
// lowers it to its own ISA: 16-lane AVX-512, 8-lane AVX2, 4-lane SSE2 or NEON.
//
// Layout: x is (batch, C, P) with the P pixels of a channel contiguous. A block of V vectors of pixels walks down
// the C channels three times (sum, centred sum of squares, normalise and write): every pixel's statistics live in
// its own lane, so there is no horizontal reduction, and each channel row of the block is V whole vectors. A block
// of 4 vectors (64 pixels on AVX-512) at C = 768 is 192 KB, so the second and third walks hit L2, not memory.
//
// Numerics: float32 like torch, two passes (mean, then the centred variance). The sums are taken relative to each
// pixel's channel-0 value (shift): for a map whose values share a large offset, x - shift is exact and small, so
// neither the mean nor the centred values lose the digits a plain float32 sum of C large values would. Measured at
// C = 768, x = 1000 + 2 N(0, 1), unit weight: largest error against float64 1.2e-6 (1.3e-6 at an offset of 1e4);
// a sequential float32 sum without the shift 1.2e-3, torch's CPU layer_norm 8.9e-5 (1.3e-3 at 1e4).

#include "channel_layer_norm.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#ifdef VMAMBA_SCAN_DISPATCH
#include "isa_dispatch.h"
#endif

#ifndef VMAMBA_SCAN_VARIANT
#define VMAMBA_SCAN_VARIANT generic
#endif

namespace vmamba {
namespace VMAMBA_SCAN_VARIANT {

const char* channel_norm_run(const ChannelNormTensors& t, const ChannelNormShape& s, float epsilon,
                             ParallelFor parallel_for, void* parallel_ctx);

namespace {

#define VM_INLINE inline __attribute__((always_inline))

// Native vector width: wider GCC vectors than the hardware's would be split into several.
#if defined(__AVX512F__)
constexpr int kNative = 16;
#elif defined(__AVX__)
constexpr int kNative = 8;
#else
constexpr int kNative = 4;
#endif
typedef float vf __attribute__((vector_size(kNative * sizeof(float))));

// The lanes a block is computed in: a native vector of pixels, or one pixel (maps narrower than a vector).
template <typename T>
struct Lanes;

template <>
struct Lanes<vf> {
  static constexpr int kWidth = kNative;
  static VM_INLINE vf load(const float* p) {
    vf v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  }
  static VM_INLINE void store(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }
  static VM_INLINE vf splat(float x) { return vf{} + x; }
  static VM_INLINE vf rsqrt(vf x) {  // once per pixel per block: exact 1 / sqrt, lane by lane (vsqrtps + vdivps)
    vf r;
    for (int i = 0; i < kNative; ++i) r[i] = 1.0f / std::sqrt(x[i]);
    return r;
  }
};

template <>
struct Lanes<float> {
  static constexpr int kWidth = 1;
  static VM_INLINE float load(const float* p) { return *p; }
  static VM_INLINE void store(float* p, float v) { *p = v; }
  static VM_INLINE float splat(float x) { return x; }
  static VM_INLINE float rsqrt(float x) { return 1.0f / std::sqrt(x); }
};

struct Job {
  ChannelNormTensors t;
  ChannelNormShape s;
  float epsilon;
  float inv_c;
  int64_t items_per_image;
  int64_t pixels_per_item;
};

// Normalises V * Lanes<T>::kWidth pixels starting at flat offset `at` (batch n's base + first pixel) over all C
// channels.
template <typename T, int V>
VM_INLINE void norm_block(const Job& job, int64_t at) {
  using L = Lanes<T>;
  constexpr int W = L::kWidth;
  const int64_t channels = job.s.channels, stride = job.s.pixels;
  const float* x = job.t.x + at;
  auto input = [&](int64_t c, int v) { return L::load(x + c * stride + v * W); };

  // Pass 1: mean of x - shift, shift = channel 0's value (its own term is 0). Two accumulators per vector: two
  // independent add chains per lane keep the adder busy where one would wait on its latency.
  T shift[V], acc0[V], acc1[V];
  for (int v = 0; v < V; ++v) {
    shift[v] = input(0, v);
    acc0[v] = acc1[v] = L::splat(0.0f);
  }
  int64_t c = 1;
  for (; c + 1 < channels; c += 2) {
    for (int v = 0; v < V; ++v) {
      acc0[v] += input(c, v) - shift[v];
      acc1[v] += input(c + 1, v) - shift[v];
    }
  }
  if (c < channels) {
    for (int v = 0; v < V; ++v) acc0[v] += input(c, v) - shift[v];
  }
  T mean[V];  // of x - shift
  for (int v = 0; v < V; ++v) {
    mean[v] = (acc0[v] + acc1[v]) * job.inv_c;
    acc0[v] = acc1[v] = L::splat(0.0f);
  }

  // Pass 2: the centred variance.
  auto centred = [&](int64_t ch, int v) { return (input(ch, v) - shift[v]) - mean[v]; };
  c = 0;
  for (; c + 1 < channels; c += 2) {
    for (int v = 0; v < V; ++v) {
      const T d0 = centred(c, v), d1 = centred(c + 1, v);
      acc0[v] += d0 * d0;
      acc1[v] += d1 * d1;
    }
  }
  if (c < channels) {
    for (int v = 0; v < V; ++v) {
      const T d0 = centred(c, v);
      acc0[v] += d0 * d0;
    }
  }
  T rstd[V];
  for (int v = 0; v < V; ++v) rstd[v] = L::rsqrt((acc0[v] + acc1[v]) * job.inv_c + job.epsilon);

  // Pass 3: normalise, scale and shift, write.
  float* y = job.t.y + at;
  for (c = 0; c < channels; ++c) {
    const T w = L::splat(job.t.weight[c]), b = L::splat(job.t.bias[c]);
    for (int v = 0; v < V; ++v) L::store(y + c * stride + v * W, centred(c, v) * rstd[v] * w + b);
  }
}

constexpr int kBlockVectors = 4;                    // vectors of pixels per block, at most
constexpr int64_t kItemElements = int64_t{1} << 15;  // about 128 KB of x per work item: a few us of work
// Below this many elements the norm runs on the calling thread: handing items to ORT's pool cost more than it saved
// (2 threads, one-node sessions: C = 384 at 14 x 14 took 29-34 us alone against 45-47 us shared, C = 768 at 7 x 7
// 23-27 against 34-43 us; C = 96 at 56 x 56, 300 K elements, 64-80 us shared against 155 us alone).
constexpr int64_t kParallelMinElements = int64_t{1} << 17;

// Blocks of up to kBlockVectors whole vectors over pixels [begin, end) of the image at flat offset `base`.
VM_INLINE void norm_vectors(const Job& job, int64_t base, int64_t begin, int64_t end) {
  int64_t p = begin;
  for (; p + kBlockVectors * kNative <= end; p += kBlockVectors * kNative) {
    norm_block<vf, kBlockVectors>(job, base + p);
  }
  switch ((end - p) / kNative) {  // the 1-3 whole vectors left, as one block
    case 3: norm_block<vf, 3>(job, base + p); break;
    case 2: norm_block<vf, 2>(job, base + p); break;
    case 1: norm_block<vf, 1>(job, base + p); break;
    default: break;
  }
}

// Work item: (batch element, a run of whole vectors of pixels). The last item of an image may end in a partial
// vector: it is done as one more vector ending at the image's last pixel, which overlaps pixels already done and
// rewrites them with the same values; an image narrower than a vector goes one pixel at a time.
void run_item(void* arg, int64_t item) {
  const Job& job = *static_cast<const Job*>(arg);
  const int64_t n = item / job.items_per_image;
  const int64_t index = item % job.items_per_image;
  const int64_t begin = index * job.pixels_per_item;
  const int64_t end = index + 1 == job.items_per_image ? job.s.pixels : begin + job.pixels_per_item;
  const int64_t base = n * job.s.channels * job.s.pixels;
  if (job.s.pixels < kNative) {
    for (int64_t p = begin; p < end; ++p) norm_block<float, 1>(job, base + p);
    return;
  }
  const int64_t whole_end = begin + (end - begin) / kNative * kNative;
  norm_vectors(job, base, begin, whole_end);
  if (whole_end < end) norm_block<vf, 1>(job, base + end - kNative);
}

// pixels == 1: every batch element is one row of C contiguous values, the last-axis LayerNorm of a channels-last map
// (`ai.vmamba::LastAxisLayerNorm`). Pixel lanes would be one pixel wide there, so a row is walked as whole vectors
// of channels plus a scalar tail instead, with one horizontal sum per pass; same shift and two passes as above.
VM_INLINE float sum_lanes(vf v) {
  float total = 0.0f;
  for (int i = 0; i < kNative; ++i) total += v[i];
  return total;
}

void norm_row(const Job& job, int64_t row) {
  using L = Lanes<vf>;
  const int64_t width = job.s.channels;
  const float* x = job.t.x + row * width;
  float* y = job.t.y + row * width;
  const float shift = x[0];
  const vf vshift = L::splat(shift);
  vf acc0 = L::splat(0.0f), acc1 = L::splat(0.0f);
  int64_t i = 0;
  for (; i + 2 * kNative <= width; i += 2 * kNative) {
    acc0 += L::load(x + i) - vshift;
    acc1 += L::load(x + i + kNative) - vshift;
  }
  for (; i + kNative <= width; i += kNative) acc0 += L::load(x + i) - vshift;
  float tail = 0.0f;
  for (; i < width; ++i) tail += x[i] - shift;
  const float mean = (sum_lanes(acc0 + acc1) + tail) * job.inv_c;  // of x - shift
  const vf vmean = L::splat(mean);

  acc0 = acc1 = L::splat(0.0f);
  for (i = 0; i + 2 * kNative <= width; i += 2 * kNative) {
    const vf d0 = (L::load(x + i) - vshift) - vmean, d1 = (L::load(x + i + kNative) - vshift) - vmean;
    acc0 += d0 * d0;
    acc1 += d1 * d1;
  }
  for (; i + kNative <= width; i += kNative) {
    const vf d = (L::load(x + i) - vshift) - vmean;
    acc0 += d * d;
  }
  tail = 0.0f;
  for (; i < width; ++i) {
    const float d = (x[i] - shift) - mean;
    tail += d * d;
  }
  const float rstd = 1.0f / std::sqrt((sum_lanes(acc0 + acc1) + tail) * job.inv_c + job.epsilon);
  const vf vrstd = L::splat(rstd);
  const float* w = job.t.weight;
  const float* b = job.t.bias;
  for (i = 0; i + kNative <= width; i += kNative) {
    L::store(y + i, ((L::load(x + i) - vshift) - vmean) * vrstd * L::load(w + i) + L::load(b + i));
  }
  for (; i < width; ++i) y[i] = ((x[i] - shift) - mean) * rstd * w[i] + b[i];
}

// Work item of the row form: rows [item * pixels_per_item, ...) (pixels_per_item holds rows per item there).
void run_rows_item(void* arg, int64_t item) {
  const Job& job = *static_cast<const Job*>(arg);
  const int64_t begin = item * job.pixels_per_item;
  const int64_t end = std::min(job.s.batch, begin + job.pixels_per_item);
  for (int64_t row = begin; row < end; ++row) norm_row(job, row);
}

void serial_for(void*, int64_t n, void (*fn)(void*, int64_t), void* arg) {
  for (int64_t i = 0; i < n; ++i) fn(arg, i);
}

}  // namespace

const char* channel_norm_run(const ChannelNormTensors& t, const ChannelNormShape& s, float epsilon,
                             ParallelFor parallel_for, void* parallel_ctx) {
  Job job{t, s, epsilon, 1.0f / static_cast<float>(s.channels), 1, 0};
  if (s.pixels == 1 && s.channels >= kNative) {  // rows of C contiguous values: the row form
    job.pixels_per_item = std::max<int64_t>(kItemElements / s.channels, 1);  // rows per item
    const int64_t items = (s.batch + job.pixels_per_item - 1) / job.pixels_per_item;
    if (items == 1 || parallel_for == nullptr || s.batch * s.channels < kParallelMinElements) parallel_for = serial_for;
    parallel_for(parallel_ctx, items, run_rows_item, &job);
    return nullptr;
  }
  // Items of whole vectors, about kItemElements each. A remainder narrower than a vector joins the last item (the
  // overlapping vector needs a whole vector of the image behind it).
  const int64_t vectors = std::max<int64_t>(s.pixels / kNative, 1);
  const int64_t per_item = std::clamp<int64_t>(kItemElements / (s.channels * kNative), 1, vectors);
  job.items_per_image = (vectors + per_item - 1) / per_item;
  job.pixels_per_item = per_item * kNative;
  if (job.items_per_image == 1 || s.pixels < kNative) {
    job.items_per_image = 1;
    job.pixels_per_item = s.pixels;
  }
  const int64_t items = s.batch * job.items_per_image;
  if (items == 1 || parallel_for == nullptr || s.batch * s.channels * s.pixels < kParallelMinElements) {
    parallel_for = serial_for;
  }
  parallel_for(parallel_ctx, items, run_item, &job);
  return nullptr;
}

}  // namespace VMAMBA_SCAN_VARIANT

#ifdef VMAMBA_SCAN_DISPATCH

#if defined(VMAMBA_SCAN_HAVE_X86_64_V3)
namespace x86_64_v3 {
const char* channel_norm_run(const ChannelNormTensors& t, const ChannelNormShape& s, float epsilon,
                             ParallelFor parallel_for, void* parallel_ctx);
}
#endif
#if defined(VMAMBA_SCAN_HAVE_X86_64_V4)
namespace x86_64_v4 {
const char* channel_norm_run(const ChannelNormTensors& t, const ChannelNormShape& s, float epsilon,
                             ParallelFor parallel_for, void* parallel_ctx);
}
#endif
#if defined(VMAMBA_SCAN_HAVE_ARMV8_2_A)
namespace armv8_2_a {
const char* channel_norm_run(const ChannelNormTensors& t, const ChannelNormShape& s, float epsilon,
                             ParallelFor parallel_for, void* parallel_ctx);
}
#endif

namespace {

using NormFn = const char* (*)(const ChannelNormTensors&, const ChannelNormShape&, float, ParallelFor, void*);

struct NormVariant {
  const char* name;
  NormFn run;
};

NormVariant pick_norm_variant() {
  const Isa isa = pick_isa();
  switch (isa) {
#if defined(VMAMBA_SCAN_HAVE_X86_64_V4)
    case Isa::kX86_64_V4: return {isa_name(isa), x86_64_v4::channel_norm_run};
#endif
#if defined(VMAMBA_SCAN_HAVE_X86_64_V3)
    case Isa::kX86_64_V3: return {isa_name(isa), x86_64_v3::channel_norm_run};
#endif
#if defined(VMAMBA_SCAN_HAVE_ARMV8_2_A)
    case Isa::kArmV8_2_A: return {isa_name(isa), armv8_2_a::channel_norm_run};
#endif
    default: return {isa_name(Isa::kBaseline), VMAMBA_SCAN_VARIANT::channel_norm_run};
  }
}

const NormVariant& norm_variant() {
  static const NormVariant v = pick_norm_variant();
  return v;
}

}  // namespace

const char* check_channel_norm_shape(const ChannelNormShape& s) {
  if (s.batch < 0 || s.channels < 0 || s.pixels < 0) return "batch, channels and pixels must be >= 0";
  // Keep every flat index far inside int64.
  const double elems = static_cast<double>(s.batch) * static_cast<double>(s.channels) * static_cast<double>(s.pixels);
  if (elems > 4e15) return "tensor too large";
  return nullptr;
}

const char* channel_layer_norm_f32(const ChannelNormTensors& t, const ChannelNormShape& s, float epsilon,
                                   ParallelFor parallel_for, void* parallel_ctx) {
  if (const char* err = check_channel_norm_shape(s)) return err;
  if (s.batch == 0 || s.channels == 0 || s.pixels == 0) return nullptr;  // empty y
  if (!t.x || !t.weight || !t.bias || !t.y) return "null tensor pointer";
  if (!(epsilon >= 0.0f)) return "epsilon must be >= 0";
  return norm_variant().run(t, s, epsilon, parallel_for, parallel_ctx);
}

const char* channel_norm_isa() { return norm_variant().name; }

#endif  // VMAMBA_SCAN_DISPATCH

}  // namespace vmamba
