// CPU kernel of the fused 2-D selective scan (contract: docs/scan-op.md; API: selective_scan_2d.h).
//
// Build: this file is compiled once per instruction-set variant, with -DVMAMBA_SCAN_VARIANT=<namespace> and that
// variant's flags (x86-64: `generic` with the baseline flags, `x86_64_v3` with -march=x86-64-v3 (AVX2/FMA),
// `x86_64_v4` with -march=x86-64-v4 (AVX-512)); exactly one compile also defines VMAMBA_SCAN_DISPATCH and gets the
// public functions, which pick a variant at run time from CPUID. So the shipped library runs on any x86-64 CPU and
// still uses the widest vectors the machine has; -march=native is never used. aarch64 (vmamba_export/platforms.py):
// `armv8_a` (-march=armv8-a, NEON) holds the dispatcher and `armv8_2_a` (-march=armv8.2-a+fp16+dotprod) is picked
// when getauxval(AT_HWCAP) reports both HWCAP_ASIMDDP and HWCAP_ASIMDHP, so a Cortex-A53 (Raspberry Pi 3) runs the
// baseline and a Neoverse / Cortex-A76 the v8.2 code. Other architectures build `generic` alone. The vector code uses
// GCC/Clang vector extensions, which each compile lowers to its own ISA (4-lane NEON vectors on aarch64).
//
// Work decomposition: a work item is (batch, block of 16 channels) and runs all four directions (one after the
// other, or for d_state 1 on AVX-512 two at a time: scan_direction_pair_d1), so no two threads ever write the same y
// element and no per-direction y buffers are needed. The item
// transposes its u / delta / y tiles into channel-last scratch ([position][16 channels]) so that each scan step
// loads one 64-byte row: the 16 channels are the vector lanes, the positions are walked in the direction's order
// (any order costs the same in that layout). B and C (shared by all channels of a direction) are read as
// broadcast scalars: directly from the input when d_state = 1, else from position rows made once per call
// ([position][dt inputs | B | C], gather_rows; the dt inputs when a small-rank dt projection is fused, delta_at).
// softplus(delta + bias) and exp(dt * A) are computed inside the scan loop; they do not depend on the state, so the
// out-of-order core overlaps them with the (short) state recurrence.

#include "selective_scan_2d.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>
#include <utility>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif
#ifdef VMAMBA_SCAN_DISPATCH
#include "isa_dispatch.h"
#endif

#ifndef VMAMBA_SCAN_VARIANT
#define VMAMBA_SCAN_VARIANT generic
#endif

namespace vmamba {
namespace VMAMBA_SCAN_VARIANT {

const char* run(const ScanTensors& t, const ScanShape& s, ParallelFor parallel_for, void* parallel_ctx);
const char* run_bf16(const ScanTensorsBf16& t, const ScanShape& s, ParallelFor parallel_for, void* parallel_ctx);
float arithmetic_floor(int64_t rows, ParallelFor parallel_for, void* parallel_ctx);

namespace {

#define VM_INLINE inline __attribute__((always_inline))

constexpr int64_t kLanes = 16;  // channels per work item (a scratch row is 64 bytes)

// Native vector width: the arithmetic uses vectors the hardware has (wider GCC vectors would be split, and their
// compares and selects were scalarised on AVX2: 8x slower); a 16-channel row is kGroups such vectors.
#if defined(__AVX512F__)
constexpr int kNative = 16;
#elif defined(__AVX__)
constexpr int kNative = 8;
#else
constexpr int kNative = 4;
#endif
constexpr int kGroups = static_cast<int>(kLanes) / kNative;
typedef float vf __attribute__((vector_size(kNative * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(kNative * sizeof(int32_t))));

VM_INLINE vf splat(float x) { return vf{} + x; }
VM_INLINE vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
VM_INLINE void store(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }

// Storage of the data tensors: float, or bfloat16 bits (the upper half of a float32) in a uint16_t.
typedef uint16_t vh __attribute__((vector_size(kNative * sizeof(uint16_t))));
typedef uint32_t vu __attribute__((vector_size(kNative * sizeof(uint32_t))));

VM_INLINE float to_float(float x) { return x; }
VM_INLINE float to_float(uint16_t x) {
  const uint32_t bits = static_cast<uint32_t>(x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
VM_INLINE void from_float(float x, float* dst) { *dst = x; }
VM_INLINE void from_float(float x, uint16_t* dst) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  // Round to nearest even; a NaN keeps a set mantissa bit (rounding could carry it into an infinity).
  *dst = x != x ? static_cast<uint16_t>((bits >> 16) | 0x40)
                : static_cast<uint16_t>((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
}
VM_INLINE vf load_row(const float* p) { return load(p); }
VM_INLINE vf load_row(const uint16_t* p) {
  vh h;
  std::memcpy(&h, p, sizeof(h));
  return reinterpret_cast<vf>(__builtin_convertvector(h, vu) << 16);
}
VM_INLINE void store_row(float* p, vf v) { store(p, v); }
VM_INLINE void store_row(uint16_t* p, vf v) {
  const vu bits = reinterpret_cast<vu>(v);
  const vu rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  const vu kept = v != v ? ((bits >> 16) | 0x40u) : rounded;
  const vh h = __builtin_convertvector(kept, vh);
  std::memcpy(p, &h, sizeof(h));
}

constexpr float kLog2e = 1.44269504088896341f;

// 2^x for x <= 0. Arguments arrive already in base 2 (dt * A * log2(e), with A * log2(e) folded into the decay rates
// once per tile; -|x| * log2(e) in softplus), so no Cody-Waite reduction by ln 2 is needed: r = x - round(x) is exact,
// and 2^r on [-0.5, 0.5] is 1 + r * P(r) with Cephes' exp2f polynomial (about 1e-7 relative). Below -125 it returns
// 0 (off by < 3e-38). About 10 vector ops, against 15 for exp(x) with its reduction: d_state 16 computes sixteen of
// these per position and channel, so this is most of the kernel's arithmetic.
VM_INLINE vf exp2_reduced(vf r) {  // 2^r for r in [-0.5, 0.5]
  vf p = splat(1.535336188319500e-4f);
  p = p * r + 1.339887440266574e-3f;
  p = p * r + 9.618437357674640e-3f;
  p = p * r + 5.550332471162809e-2f;
  p = p * r + 2.402264791363012e-1f;
  p = p * r + 6.931472028550421e-1f;
  return p * r + 1.0f;
}

VM_INLINE vf exp2_nonpos(vf x) {
#if defined(__AVX512F__)
  // AVX-512: round and scale by 2^n in one instruction each (vscalefps underflows to 0 by itself).
  x = x < -150.0f ? splat(-150.0f) : x;
  const vf n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return _mm512_scalef_ps(exp2_reduced(x - n), n);
#else
  const vi tiny = x < -125.0f;
  x = tiny ? splat(-125.0f) : x;
  const vf shifted = x + 12582912.0f;  // 1.5 * 2^23: rounds x to an integer
  const vf n = shifted - 12582912.0f;
  const vi n_int = reinterpret_cast<vi>(shifted) - 0x4B400000;
  const vf e = exp2_reduced(x - n);
  const vf scaled = reinterpret_cast<vf>(reinterpret_cast<vi>(e) + (n_int << 23));
  return tiny ? splat(0.0f) : scaled;
#endif
}

// log1p(t) for t in [0, 1] as t * q(t), q(t) = log1p(t) / t smooth on [0, 1] (q(0) = 1): a degree-8 polynomial
// (Chebyshev fit, about 2e-7 relative in float32), no range reduction and no division. Written as t * q(t), tiny t
// (very negative delta) keeps full relative precision, which 1 + t followed by a log would lose.
VM_INLINE vf log1p_unit(vf t) {
  vf q = splat(5.186003632843494e-3f);
  q = q * t - 2.9210267588496208e-2f;
  q = q * t + 7.754038274288177e-2f;
  q = q * t - 1.3583941757678986e-1f;
  q = q * t + 1.9055955111980438e-1f;
  q = q * t - 2.4825648963451385e-1f;
  q = q * t + 3.331601023674011e-1f;
  q = q * t - 4.999925494194031e-1f;
  q = q * t + 9.999999403953552e-1f;
  return t * q;
}

// softplus(x) = log1p(exp(x)), and x itself for x > 20 (as torch): written max(x, 0) + log1p(exp(-|x|)) so that
// exp never overflows.
VM_INLINE vf softplus(vf x) {
  const vf neg_abs = x > 0.0f ? -x : x;
  const vf pos = x > 0.0f ? x : splat(0.0f);
  const vf r = pos + log1p_unit(exp2_nonpos(neg_abs * kLog2e));
  return x > 20.0f ? x : r;
}

// ---- tile transposes between the input layout ([channel][position]) and scratch ([position][kLanes]) ----

template <int S, bool Hi, int... I>
VM_INLINE constexpr vi swap_mask(std::integer_sequence<int, I...>) {
  // Exchanges the off-diagonal S x S sub-blocks of each 2S x 2S block of a pair of rows (one butterfly level).
  return vi{(Hi ? ((I & S) ? kNative + I : I + S) : ((I & S) ? kNative + I - S : I))...};
}

template <int S>
VM_INLINE void butterfly(vf* rows) {
  constexpr auto seq = std::make_integer_sequence<int, kNative>{};
  for (int i = 0; i < kNative; ++i) {
    if (i & S) continue;
    const vf a = rows[i];
    const vf b = rows[i + S];
    rows[i] = __builtin_shuffle(a, b, swap_mask<S, false>(seq));
    rows[i + S] = __builtin_shuffle(a, b, swap_mask<S, true>(seq));
  }
  if constexpr (S > 1) butterfly<S / 2>(rows);
}

// In-register transpose of a kNative x kNative block.
VM_INLINE void transpose_block(vf* rows) { butterfly<kNative / 2>(rows); }

// dst[p * kLanes + c] = src[c * src_stride + p] for c < nc (0 for the padding lanes c >= nc), p < len.
template <typename T>
void to_lanes(const T* src, int64_t src_stride, int64_t nc, int64_t len, float* dst) {
  int64_t p0 = 0;
  for (; p0 + kNative <= len; p0 += kNative) {
    for (int64_t g = 0; g < kLanes; g += kNative) {
      vf rows[kNative];
      for (int r = 0; r < kNative; ++r) {
        if (g + r < nc) {
          rows[r] = load_row(src + (g + r) * src_stride + p0);
        } else {
          rows[r] = vf{};
        }
      }
      transpose_block(rows);
      for (int r = 0; r < kNative; ++r) std::memcpy(dst + (p0 + r) * kLanes + g, &rows[r], sizeof(vf));
    }
  }
  for (; p0 < len; ++p0) {
    for (int64_t c = 0; c < kLanes; ++c) dst[p0 * kLanes + c] = c < nc ? to_float(src[c * src_stride + p0]) : 0.0f;
  }
}

// dst[c * dst_stride + p] = src[p * kLanes + c] for c < nc, p < len.
template <typename T>
void from_lanes(const float* src, int64_t nc, int64_t len, T* dst, int64_t dst_stride) {
  int64_t p0 = 0;
  for (; p0 + kNative <= len; p0 += kNative) {
    for (int64_t g = 0; g < kLanes && g < nc; g += kNative) {
      vf rows[kNative];
      for (int r = 0; r < kNative; ++r) std::memcpy(&rows[r], src + (p0 + r) * kLanes + g, sizeof(vf));
      transpose_block(rows);
      for (int r = 0; r < kNative && g + r < nc; ++r) {
        store_row(dst + (g + r) * dst_stride + p0, rows[r]);
      }
    }
  }
  for (; p0 < len; ++p0) {
    for (int64_t c = 0; c < nc; ++c) from_float(src[p0 * kLanes + c], dst + c * dst_stride + p0);
  }
}

// dst[p * kLanes + c] = sum_j w[c * r + j] * low[j * len + p] for c < nc (0 for the padding lanes): delta of one
// direction from the input of its dt projection, computed straight into the lane layout. `w_lanes` is scratch for
// r * kLanes floats. Vectorised along positions (each row of `low` is read once per kNative positions, as whole
// vectors, and every weight is a broadcast operand of its FMA), then transposed into lanes like `to_lanes`: one
// position at a time (a scalar load, convert and broadcast per FMA) made the op 60% slower.
template <typename T>
void project_to_lanes(const T* low, int64_t r, const float* w, int64_t nc, int64_t len, float* w_lanes, float* dst) {
  for (int64_t j = 0; j < r; ++j) {
    for (int64_t c = 0; c < kLanes; ++c) w_lanes[j * kLanes + c] = c < nc ? w[c * r + j] : 0.0f;
  }
  for (int64_t p0 = 0; p0 < len; p0 += kNative) {
    // The last block may be partial (14 x 14, 7 x 7 maps): its positions are read zero-padded, as whole vectors too.
    const int np = static_cast<int>(std::min<int64_t>(kNative, len - p0));
    for (int64_t g = 0; g < kLanes; g += kNative) {
      vf rows[kNative] = {};  // rows[q]: channel g + q at positions p0 ... p0 + kNative - 1
      for (int64_t j = 0; j < r; ++j) {
        vf x;
        if (np == kNative) {
          x = load_row(low + j * len + p0);
        } else {
          alignas(64) float part[kNative] = {};
          for (int q = 0; q < np; ++q) part[q] = to_float(low[j * len + p0 + q]);
          x = load(part);
        }
        const float* wj = w_lanes + j * kLanes + g;
        for (int q = 0; q < kNative; ++q) rows[q] += splat(wj[q]) * x;
      }
      transpose_block(rows);
      for (int q = 0; q < np; ++q) store(dst + (p0 + q) * kLanes + g, rows[q]);
    }
  }
}

// ---- the scan ----

// Where a scan step gets delta (before bias and softplus) for its kLanes channels at position p: row p of a delta
// tile in lanes layout, or (kProject) the fused dt projection computed in the loop, sum_j w[j] * row[j], where row
// (stride row_stride per position) holds that position's dt_rank projection inputs, followed by B and C
// (Job::rows_t), and w[j] (kLanes floats each) the direction's weights in lanes. The products are independent of the
// state, so the core overlaps them with the recurrence, and no delta tile is written, read or transposed. They cost
// dt_rank FMAs (and weight loads) a step on the ports the scan's own arithmetic already fills, so only small ranks
// are projected in the loop (kMaxLoopRank); larger ones fill the tile with project_to_lanes.
struct DeltaSource {
  const float* tile;  // no projection: the direction's delta tile
  const float* w;     // projection: dt_rank rows of kLanes weights
  const float* rows;  // projection: the direction's position rows
  int64_t rank;
  int64_t row_stride;
};

// Largest dt_rank projected inside the scan loop. Measured (vmamba_tiny_s1l8, ONNX Runtime, 224): in the loop, the
// rank-6 stage-1 scans beat a separate grouped convolution, and ranks 12 to 48 (stages 2 to 4) lost to it.
constexpr int64_t kMaxLoopRank = 8;

template <bool kProject>
VM_INLINE vf delta_at(const DeltaSource& d, int64_t p, int g) {
  if constexpr (!kProject) {
    return load(d.tile + p * kLanes + g * kNative);
  } else {
    // Four partial sums: a dt_rank of 24 or 48 (stages 3 and 4) would otherwise be one long chain of dependent FMAs.
    const float* row = d.rows + p * d.row_stride;
    const float* w = d.w + g * kNative;
    vf acc[4] = {};
    int64_t j = 0;
    for (; j + 4 <= d.rank; j += 4) {
      for (int q = 0; q < 4; ++q) acc[q] += load(w + (j + q) * kLanes) * row[j + q];
    }
    for (; j < d.rank; ++j) acc[0] += load(w + j * kLanes) * row[j];
    return (acc[0] + acc[1]) + (acc[2] + acc[3]);
  }
}

// Positions of direction k as a double loop: p = start + o * outer_step + i * inner_step.
struct Walk {
  int64_t start, n_outer, outer_step, n_inner, inner_step;
};

Walk walk_for(int64_t k, int64_t h, int64_t w) {
  const int64_t last = h * w - 1;
  switch (k) {
    case 0: return {0, h, w, w, 1};            // row-major
    case 1: return {0, w, 1, h, w};            // column-major
    case 2: return {last, h, -w, w, -1};       // row-major reversed
    default: return {last, w, -1, h, -w};      // column-major reversed
  }
}

// One direction over one tile. B value of state j at position p: bsrc[p * pos_stride + j * state_stride] (C alike).
// NS > 0 fixes d_state at compile time (state kept in registers / fully unrolled); NS = 0 reads it from n.
// bias[g], a[j * kGroups + g] (A * log2 e) and the state h[j * kGroups + g] are native vectors covering lanes
// g * kNative...
template <int NS, bool kProject, typename TB>
void scan_direction(const Walk& wk, int64_t n, const DeltaSource& delta, const float* u_t, float* y_t, const vf* bias,
                    const vf* a, const TB* bsrc, const TB* csrc, int64_t pos_stride, int64_t state_stride,
                    vf* state_scratch) {
  const int64_t ns = NS > 0 ? NS : n;
  vf state_local[NS > 0 ? NS * kGroups : 1];
  vf* h = NS > 0 ? state_local : state_scratch;
  for (int64_t j = 0; j < ns * kGroups; ++j) h[j] = vf{};
  int64_t p_outer = wk.start;
  for (int64_t o = 0; o < wk.n_outer; ++o, p_outer += wk.outer_step) {
    int64_t p = p_outer;
    for (int64_t i = 0; i < wk.n_inner; ++i, p += wk.inner_step) {
      const TB* bp = bsrc + p * pos_stride;
      const TB* cp = csrc + p * pos_stride;
      vf dt[kGroups], dtu[kGroups], acc[kGroups];
      for (int g = 0; g < kGroups; ++g) {
        dt[g] = softplus(delta_at<kProject>(delta, p, g) + bias[g]);
        dtu[g] = dt[g] * load(u_t + p * kLanes + g * kNative);
        acc[g] = vf{};
      }
      for (int64_t j = 0; j < ns; ++j) {
        const float bj = to_float(bp[j * state_stride]);
        const float cj = to_float(cp[j * state_stride]);
        for (int g = 0; g < kGroups; ++g) {
          vf& hj = h[j * kGroups + g];
          hj = exp2_nonpos(dt[g] * a[j * kGroups + g]) * hj + dtu[g] * bj;
          acc[g] += hj * cj;
        }
      }
      for (int g = 0; g < kGroups; ++g) {
        float* yp = y_t + p * kLanes + g * kNative;
        store(yp, load(yp) + acc[g]);
      }
    }
  }
}

// d_state 1: two directions whose walks are each other's reverse (0 and 2, 1 and 3) in one loop. Their recurrences
// are independent, so the core interleaves two state chains where one direction alone leaves it waiting on the
// latency of the previous step's FMA: with AVX-512 a 16-channel tile is a single vector, one chain (kPairDirections;
// with narrower vectors a tile is already kGroups chains, and pairing measured 5-10% slower on AVX2). `wb` must
// visit the positions of `wa` in reverse order. When both reach the same position in one step (the middle of an
// odd-length walk) the two y updates run one after the other, as written.
constexpr bool kPairDirections = kGroups == 1;
template <bool kProject, typename TB>
void scan_direction_pair_d1(const Walk& wa, const Walk& wb, const DeltaSource& delta_a, const DeltaSource& delta_b,
                            const float* u_t, float* y_t, const vf* bias_a, const vf* bias_b, const vf* a_a,
                            const vf* a_b, const TB* b_a, const TB* c_a, const TB* b_b, const TB* c_b,
                            int64_t bc_stride) {
  vf ha[kGroups] = {}, hb[kGroups] = {};
  int64_t pa_outer = wa.start, pb_outer = wb.start;
  for (int64_t o = 0; o < wa.n_outer; ++o, pa_outer += wa.outer_step, pb_outer += wb.outer_step) {
    int64_t pa = pa_outer, pb = pb_outer;
    for (int64_t i = 0; i < wa.n_inner; ++i, pa += wa.inner_step, pb += wb.inner_step) {
      const float bja = to_float(b_a[pa * bc_stride]), cja = to_float(c_a[pa * bc_stride]);
      const float bjb = to_float(b_b[pb * bc_stride]), cjb = to_float(c_b[pb * bc_stride]);
      for (int g = 0; g < kGroups; ++g) {
        const vf dta = softplus(delta_at<kProject>(delta_a, pa, g) + bias_a[g]);
        const vf dtb = softplus(delta_at<kProject>(delta_b, pb, g) + bias_b[g]);
        ha[g] = exp2_nonpos(dta * a_a[g]) * ha[g] + dta * load(u_t + pa * kLanes + g * kNative) * bja;
        hb[g] = exp2_nonpos(dtb * a_b[g]) * hb[g] + dtb * load(u_t + pb * kLanes + g * kNative) * bjb;
        float* ya = y_t + pa * kLanes + g * kNative;
        store(ya, load(ya) + ha[g] * cja);
        float* yb = y_t + pb * kLanes + g * kNative;
        store(yb, load(yb) + hb[g] * cjb);
      }
    }
  }
}

// Flush-to-zero / denormals-are-zero for the lifetime of a work item. The state decays geometrically, so long scans
// with large dt * |A| drive it into the denormal range, where every multiply takes a ~100-cycle microcode assist
// (measured: 7x slower end to end). Values below 1.2e-38 change nothing that float32 output could show.
class FlushDenormals {
 public:
#if defined(__x86_64__) || defined(__i386__)
  FlushDenormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | 0x8040); }  // FTZ (bit 15) | DAZ (bit 6)
  ~FlushDenormals() { _mm_setcsr(saved_); }

 private:
  unsigned saved_;
#elif defined(__aarch64__)
  FlushDenormals() : saved_(__builtin_aarch64_get_fpcr64()) { __builtin_aarch64_set_fpcr64(saved_ | (1ull << 24)); }
  ~FlushDenormals() { __builtin_aarch64_set_fpcr64(saved_); }

 private:
  unsigned long long saved_;
#endif
};

template <typename T>
struct Job {
  ScanTensorsOf<T> t;
  ScanShape s;
  int64_t blocks;       // channel blocks per batch element
  const float* rows_t;  // (batch, 4, L, row_stride) position rows (gather_rows); null: d_state 1, no in-loop projection
  int64_t row_stride;   // rows_bc + 2 d_state
  int64_t rows_bc;      // where B starts in a row (C follows it): dt_rank with an in-loop projection, else 0
  std::atomic<bool> failed{false};
};

struct AlignedBuffer {
  float* p;
  explicit AlignedBuffer(size_t count)
      : p(static_cast<float*>(::operator new(count * sizeof(float), std::align_val_t(64), std::nothrow))) {}
  ~AlignedBuffer() { ::operator delete(p, std::align_val_t(64)); }
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
};

template <typename T>
void run_item(void* arg, int64_t item) {
  Job<T>& job = *static_cast<Job<T>*>(arg);
  const FlushDenormals ftz;
  const ScanTensorsOf<T>& t = job.t;
  const ScanShape& s = job.s;
  const int64_t di = s.d_inner, n = s.d_state, len = s.height * s.width;
  const int64_t b = item / job.blocks;
  const int64_t d0 = (item % job.blocks) * kLanes;
  const int64_t nc = std::min<int64_t>(kLanes, di - d0);
  const bool project = t.dt_weight != nullptr;
  const int64_t rank = project ? t.dt_rank : 0;
  const bool in_loop = project && rank <= kMaxLoopRank;  // else project_to_lanes fills the delta tile

  // Scratch: u and y tiles, the delta tile(s) unless the dt projection runs in the loop, then per-state decay rates
  // A and (generic d_state) the state itself, then the projection's weights in lanes. d_state 1 with one vector per
  // tile (AVX-512) scans two directions at a time (scan_direction_pair_d1): a second delta tile, decay-rate row and
  // (in the loop) set of weights.
  const bool paired = n == 1 && kPairDirections;
  const int64_t tile = len * kLanes;
  const int64_t delta_tiles = in_loop ? 0 : paired ? 2 : 1;
  const int64_t a_rows = paired ? 2 : n;
  const int64_t w_sets = in_loop && paired ? 2 : 1;
  AlignedBuffer buf((2 + delta_tiles) * tile + (a_rows + n) * kLanes + w_sets * rank * kLanes);
  if (buf.p == nullptr) {
    job.failed.store(true, std::memory_order_relaxed);
    return;
  }
  float* u_t = buf.p;
  float* y_t = u_t + tile;
  float* delta_t = y_t + tile;
  vf* a = reinterpret_cast<vf*>(delta_t + delta_tiles * tile);  // a_rows * kGroups vectors
  vf* state = a + a_rows * kGroups;
  float* w_lanes = reinterpret_cast<float*>(state + n * kGroups);

  to_lanes(t.u + (b * di + d0) * len, len, nc, len, u_t);

  // The D * u skip term of all four directions at once.
  alignas(64) float d_sum[kLanes] = {};
  for (int64_t c = 0; c < nc; ++c) {
    for (int64_t k = 0; k < 4; ++k) d_sum[c] += t.D[k * di + d0 + c];
  }
  for (int64_t p = 0; p < len; ++p) {
    for (int g = 0; g < kGroups; ++g) {
      float* row = y_t + p * kLanes + g * kNative;
      store(row, load(d_sum + g * kNative) * load(u_t + p * kLanes + g * kNative));
    }
  }

  // Direction k's delta source (its tile, filled here, or its projection: weights in lanes into `w_dst`), its bias
  // and its decay rates A * log2(e) (a[j * kGroups + g]).
  auto prepare = [&](int64_t k, float* delta_dst, float* w_dst, vf* bias, vf* a_dst) {
    DeltaSource src{delta_dst, nullptr, nullptr, rank, job.row_stride};
    const float* w = project ? t.dt_weight + (k * di + d0) * rank : nullptr;
    if (in_loop) {
      for (int64_t j = 0; j < rank; ++j) {
        for (int64_t c = 0; c < kLanes; ++c) w_dst[j * kLanes + c] = c < nc ? w[c * rank + j] : 0.0f;
      }
      src.w = w_dst;
      src.rows = job.rows_t + (b * 4 + k) * len * job.row_stride;
    } else if (project) {
      project_to_lanes(t.delta + (b * 4 + k) * rank * len, rank, w, nc, len, w_dst, delta_dst);
    } else {
      to_lanes(t.delta + ((b * 4 + k) * di + d0) * len, len, nc, len, delta_dst);
    }
    alignas(64) float bias_lanes[kLanes] = {};
    for (int64_t c = 0; c < nc; ++c) bias_lanes[c] = t.delta_bias[k * di + d0 + c];
    for (int g = 0; g < kGroups; ++g) bias[g] = load(bias_lanes + g * kNative);
    for (int64_t j = 0; j < n; ++j) {
      // A * log2(e): the decay exp(dt * A) is computed as 2^(dt * A log2 e). Padding lanes: 0, so their state stays 0.
      alignas(64) float a_lanes[kLanes] = {};
      for (int64_t c = 0; c < nc; ++c) a_lanes[c] = -std::exp(t.A_logs[(k * di + d0 + c) * n + j]) * kLog2e;
      for (int g = 0; g < kGroups; ++g) a_dst[j * kGroups + g] = load(a_lanes + g * kNative);
    }
    return src;
  };
  // Where B of direction k starts in its position rows (C follows d_state values later).
  auto b_of = [&](int64_t k) { return job.rows_t + (b * 4 + k) * len * job.row_stride + job.rows_bc; };

  if (paired) {
    for (int64_t ka = 0; ka < 2; ++ka) {  // directions 0 with 2, then 1 with 3: each pair walks one order both ways
      const int64_t kb = ka + 2;
      vf bias_a[kGroups], bias_b[kGroups];
      const DeltaSource da = prepare(ka, delta_t, w_lanes, bias_a, a);
      float* delta_b = delta_t + (in_loop ? 0 : tile);
      const DeltaSource db = prepare(kb, delta_b, w_lanes + (in_loop ? rank * kLanes : 0), bias_b, a + kGroups);
      const Walk wa = walk_for(ka, s.height, s.width), wb = walk_for(kb, s.height, s.width);
      if (in_loop) {
        scan_direction_pair_d1<true>(wa, wb, da, db, u_t, y_t, bias_a, bias_b, a, a + kGroups, b_of(ka), b_of(ka) + 1,
                                     b_of(kb), b_of(kb) + 1, job.row_stride);
      } else {
        scan_direction_pair_d1<false>(wa, wb, da, db, u_t, y_t, bias_a, bias_b, a, a + kGroups,
                                      t.B + (b * 4 + ka) * len, t.C + (b * 4 + ka) * len, t.B + (b * 4 + kb) * len,
                                      t.C + (b * 4 + kb) * len, 1);
      }
    }
  } else {
    for (int64_t k = 0; k < 4; ++k) {
      vf bias[kGroups];
      const DeltaSource delta = prepare(k, delta_t, w_lanes, bias, a);
      const Walk wk = walk_for(k, s.height, s.width);
      if (job.rows_t == nullptr) {  // d_state 1, no projection: B and C from the input
        scan_direction<1, false>(wk, n, delta, u_t, y_t, bias, a, t.B + (b * 4 + k) * len, t.C + (b * 4 + k) * len, 1,
                                 0, state);
        continue;
      }
      const float* bsrc = b_of(k);
      const int64_t rs = job.row_stride;
      if (in_loop) {
        if (n == 1) {
          scan_direction<1, true>(wk, n, delta, u_t, y_t, bias, a, bsrc, bsrc + n, rs, 1, state);
        } else if (n == 16) {
          scan_direction<16, true>(wk, n, delta, u_t, y_t, bias, a, bsrc, bsrc + n, rs, 1, state);
        } else {
          scan_direction<0, true>(wk, n, delta, u_t, y_t, bias, a, bsrc, bsrc + n, rs, 1, state);
        }
      } else if (n == 16) {
        scan_direction<16, false>(wk, n, delta, u_t, y_t, bias, a, bsrc, bsrc + n, rs, 1, state);
      } else {
        scan_direction<0, false>(wk, n, delta, u_t, y_t, bias, a, bsrc, bsrc + n, rs, 1, state);
      }
    }
  }

  from_lanes(y_t, nc, len, t.y + (b * di + d0) * len, len);
}

// The position rows of (batch b, direction k) = item b * 4 + k: row p holds the dt projection's inputs at p (dt_rank
// values, when it is projected in the loop), then B (d_state values) and C (d_state values), as float32. A step then
// reads everything it needs besides its own channels' u from one or two cache lines, where the planes put each value
// L apart. Built for an in-loop projection or d_state > 1; one pass over (small) inputs, shared by all channel blocks.
template <typename T>
void gather_rows(void* arg, int64_t item) {
  Job<T>& job = *static_cast<Job<T>*>(arg);
  const int64_t n = job.s.d_state, len = job.s.height * job.s.width, rank = job.rows_bc, rs = job.row_stride;
  float* dst = const_cast<float*>(job.rows_t) + item * len * rs;
  auto copy_planes = [&](const T* src, int64_t planes, int64_t offset) {
    for (int64_t j = 0; j < planes; ++j) {
      for (int64_t p = 0; p < len; ++p) dst[p * rs + offset + j] = to_float(src[j * len + p]);
    }
  };
  if (rank > 0) copy_planes(job.t.delta + item * rank * len, rank, 0);
  copy_planes(job.t.B + item * n * len, n, rank);
  copy_planes(job.t.C + item * n * len, n, rank + n);
}

void serial_for(void*, int64_t n, void (*fn)(void*, int64_t), void* arg) {
  for (int64_t i = 0; i < n; ++i) fn(arg, i);
}

template <typename T>
const char* run_typed(const ScanTensorsOf<T>& t, const ScanShape& s, ParallelFor parallel_for, void* parallel_ctx) {
  if (parallel_for == nullptr) parallel_for = serial_for;
  const int64_t len = s.height * s.width;
  Job<T> job;
  job.t = t;
  job.s = s;
  job.blocks = (s.d_inner + kLanes - 1) / kLanes;
  job.rows_bc = t.dt_weight != nullptr && t.dt_rank <= kMaxLoopRank ? t.dt_rank : 0;  // projected in the loop
  job.row_stride = job.rows_bc + 2 * s.d_state;
  job.rows_t = nullptr;
  const bool rows = job.rows_bc > 0 || s.d_state > 1;
  AlignedBuffer rows_buf(rows ? static_cast<size_t>(s.batch * 4 * len * job.row_stride) : 0);
  if (rows) {
    if (rows_buf.p == nullptr) return "out of memory";
    job.rows_t = rows_buf.p;
    parallel_for(parallel_ctx, s.batch * 4, gather_rows<T>, &job);
  }
  parallel_for(parallel_ctx, s.batch * job.blocks, run_item<T>, &job);
  return job.failed.load() ? "out of memory" : nullptr;
}

// The arithmetic floor of the d_state-1 scan (scan_arithmetic_floor in the header): each work item runs kFloorChains
// independent chains of the per-step arithmetic on registers only. The inputs change every step (z and u drift),
// so nothing can be hoisted out of the loop; the results are summed so nothing can be dropped.
constexpr int64_t kFloorItems = 64;
constexpr int kFloorChains = 4;

struct FloorJob {
  int64_t rows_per_item;
  float sums[kFloorItems];
};

void floor_item(void* arg, int64_t item) {
  FloorJob& job = *static_cast<FloorJob*>(arg);
  const FlushDenormals ftz;
  const vf bias = splat(0.25f), a = splat(-0.7f * kLog2e), step = splat(1e-6f);
  const float bj = 0.3f, cj = 0.6f;
  vf z[kFloorChains], u[kFloorChains], h[kFloorChains], acc[kFloorChains];
  for (int c = 0; c < kFloorChains; ++c) {
    z[c] = splat(0.1f * static_cast<float>(c + item) - 1.0f);
    u[c] = splat(0.5f);
    h[c] = vf{};
    acc[c] = vf{};
  }
  // rows_per_item rows of kLanes channels: kLanes / kNative vectors each, spread over the chains.
  const int64_t vectors = job.rows_per_item * kGroups;
  for (int64_t i = 0; i < vectors; i += kFloorChains) {
    for (int c = 0; c < kFloorChains; ++c) {
      const vf dt = softplus(z[c] + bias);
      h[c] = exp2_nonpos(dt * a) * h[c] + dt * u[c] * bj;
      acc[c] += h[c] * cj;
      z[c] += step;
      u[c] -= step;
    }
  }
  vf total = vf{};
  for (int c = 0; c < kFloorChains; ++c) total += acc[c];
  float sum = 0.0f;
  for (int l = 0; l < kNative; ++l) sum += total[l];
  job.sums[item] = sum;
}

}  // namespace

float arithmetic_floor(int64_t rows, ParallelFor parallel_for, void* parallel_ctx) {
  if (parallel_for == nullptr) parallel_for = serial_for;
  FloorJob job;
  job.rows_per_item = (rows + kFloorItems - 1) / kFloorItems;
  parallel_for(parallel_ctx, kFloorItems, floor_item, &job);
  float sum = 0.0f;
  for (float v : job.sums) sum += v;
  return sum;
}

const char* run(const ScanTensors& t, const ScanShape& s, ParallelFor parallel_for, void* parallel_ctx) {
  return run_typed(t, s, parallel_for, parallel_ctx);
}

const char* run_bf16(const ScanTensorsBf16& t, const ScanShape& s, ParallelFor parallel_for, void* parallel_ctx) {
  return run_typed(t, s, parallel_for, parallel_ctx);
}

}  // namespace VMAMBA_SCAN_VARIANT

#ifdef VMAMBA_SCAN_DISPATCH

#if defined(VMAMBA_SCAN_HAVE_X86_64_V3)
namespace x86_64_v3 {
const char* run(const ScanTensors& t, const ScanShape& s, ParallelFor parallel_for, void* parallel_ctx);
const char* run_bf16(const ScanTensorsBf16& t, const ScanShape& s, ParallelFor parallel_for, void* parallel_ctx);
float arithmetic_floor(int64_t rows, ParallelFor parallel_for, void* parallel_ctx);
}
#endif
#if defined(VMAMBA_SCAN_HAVE_ARMV8_2_A)
namespace armv8_2_a {
const char* run(const ScanTensors& t, const ScanShape& s, ParallelFor parallel_for, void* parallel_ctx);
const char* run_bf16(const ScanTensorsBf16& t, const ScanShape& s, ParallelFor parallel_for, void* parallel_ctx);
float arithmetic_floor(int64_t rows, ParallelFor parallel_for, void* parallel_ctx);
}
#endif
#if defined(VMAMBA_SCAN_HAVE_X86_64_V4)
namespace x86_64_v4 {
const char* run(const ScanTensors& t, const ScanShape& s, ParallelFor parallel_for, void* parallel_ctx);
const char* run_bf16(const ScanTensorsBf16& t, const ScanShape& s, ParallelFor parallel_for, void* parallel_ctx);
float arithmetic_floor(int64_t rows, ParallelFor parallel_for, void* parallel_ctx);
}
#endif

namespace {

using RunFn = const char* (*)(const ScanTensors&, const ScanShape&, ParallelFor, void*);
using RunBf16Fn = const char* (*)(const ScanTensorsBf16&, const ScanShape&, ParallelFor, void*);
using FloorFn = float (*)(int64_t, ParallelFor, void*);

struct Variant {
  const char* name;
  RunFn run;
  RunBf16Fn run_bf16;
  FloorFn floor;
};

Variant pick_variant() {
  // isa_dispatch.h: the CPU's widest variant this build holds, or the one VMAMBA_SCAN_ISA forces.
  const Isa isa = pick_isa();
  switch (isa) {
#if defined(VMAMBA_SCAN_HAVE_X86_64_V4)
    case Isa::kX86_64_V4:
      return {isa_name(isa), x86_64_v4::run, x86_64_v4::run_bf16, x86_64_v4::arithmetic_floor};
#endif
#if defined(VMAMBA_SCAN_HAVE_X86_64_V3)
    case Isa::kX86_64_V3:
      return {isa_name(isa), x86_64_v3::run, x86_64_v3::run_bf16, x86_64_v3::arithmetic_floor};
#endif
#if defined(VMAMBA_SCAN_HAVE_ARMV8_2_A)
    case Isa::kArmV8_2_A:
      return {isa_name(isa), armv8_2_a::run, armv8_2_a::run_bf16, armv8_2_a::arithmetic_floor};
#endif
    default:
      return {isa_name(Isa::kBaseline), VMAMBA_SCAN_VARIANT::run, VMAMBA_SCAN_VARIANT::run_bf16,
              VMAMBA_SCAN_VARIANT::arithmetic_floor};
  }
}

const Variant& variant() {
  static const Variant v = pick_variant();
  return v;
}

}  // namespace

const char* check_scan_shape(const ScanShape& s) {
  if (s.k != 4) return "k (directions) must be 4";
  if (s.batch < 0 || s.d_inner < 0) return "batch and d_inner must be >= 0";
  if (s.d_state < 1) return "d_state must be >= 1";
  if (s.height < 0 || s.width < 0) return "height and width must be >= 0";
  // Keep every flat index (and the scratch sizes) far inside int64.
  const double elems = static_cast<double>(s.batch) * 4 * static_cast<double>(std::max(s.d_inner, s.d_state)) *
                       static_cast<double>(s.height) * static_cast<double>(s.width);
  if (elems > 4e15) return "tensor too large";
  return nullptr;
}

namespace {

// The checks shared by both entry points, then `run` (nullptr: success, including an empty y; else why not).
template <typename T, typename Run>
const char* checked_run(const ScanTensorsOf<T>& t, const ScanShape& s, Run run, ParallelFor parallel_for,
                        void* parallel_ctx) {
  if (const char* err = check_scan_shape(s)) return err;
  if (s.batch == 0 || s.d_inner == 0 || s.height == 0 || s.width == 0) return nullptr;  // empty y
  if (!t.u || !t.delta || !t.A_logs || !t.B || !t.C || !t.D || !t.delta_bias || !t.y) return "null tensor pointer";
  if (t.dt_weight != nullptr && (t.dt_rank < 1 || t.dt_rank > (int64_t{1} << 20))) {
    return "dt_rank must be between 1 and 2^20";
  }
  return run(t, s, parallel_for, parallel_ctx);
}

}  // namespace

const char* selective_scan_2d_f32(const ScanTensors& t, const ScanShape& s, ParallelFor parallel_for,
                                  void* parallel_ctx) {
  return checked_run(t, s, variant().run, parallel_for, parallel_ctx);
}

const char* selective_scan_2d_bf16(const ScanTensorsBf16& t, const ScanShape& s, ParallelFor parallel_for,
                                   void* parallel_ctx) {
  return checked_run(t, s, variant().run_bf16, parallel_for, parallel_ctx);
}

const char* scan_isa() { return variant().name; }

float scan_arithmetic_floor(int64_t rows, ParallelFor parallel_for, void* parallel_ctx) {
  return variant().floor(rows < 0 ? 0 : rows, parallel_for, parallel_ctx);
}

#endif  // VMAMBA_SCAN_DISPATCH

}  // namespace vmamba
