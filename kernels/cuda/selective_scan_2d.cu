// CUDA kernel of the fused 2-D selective scan (contract: docs/scan-op.md; API: selective_scan_2d.cuh).
//
// d_state 1 (every v2 model), maps of at most 416 chunks of 7 or 8 steps a line (up to about 56 x 56, every map of a
// 224-pixel input): `scan_lines_kernel` (below, "Line kernel"); of them, maps of at most 256 positions at small batch
// (batch 1 at the 14 x 14 and 7 x 7 stages): `scan_warps_kernel` ("Warp kernel"). Larger maps: `scan_block_kernel`, one thread block
// per (batch b, two channels) runs the four directions in turn. Per direction the block stages dt = softplus(delta +
// bias), B and C of its plane in shared memory with coalesced loads (u and the float32 y accumulator stay there for
// all four), then scans the sequence in parallel: each thread takes kItems consecutive steps of the direction's order
// (a short serial scan kept in registers), the (decay, state) pairs of the threads are combined by a warp-shuffle
// scan and a pass over the warp totals, and each thread finishes its steps from its true initial state. Every
// exponential is evaluated once and every input byte is read from DRAM once (B and C, shared by the channels of a
// direction, come from L2). Shared-memory rows are padded to the stride with the fewest bank conflicts.
//
// d_state 16 (v0 models) and the d_state-1 maps too large for the block path (`scan_smem_kernel`): one thread block
// owns (batch b, a tile of `ct` channels) and runs all four directions one after the other, so y is accumulated on
// chip: the block keeps the channels' y (float32; and u, for d_state 1) in shared memory for the whole call and
// writes y to device memory once at the end. No two blocks touch the same y element (no atomics, no per-direction
// scratch). For d_state 16, B and C are first copied position-major ([position][B(16) | C(16)], `gather_bc_kernel`),
// so a step reads them as eight 16-byte loads from one line instead of 32 loads from 32 planes. Two neighbouring
// lanes share each (channel, chunk) of d_state 16, eight states each (72 registers instead of 128: twice the warps).
//
// Inside a block each direction's sequence is cut into chunks of whole lines (rows for directions 0 and 2, columns
// for 1 and 3; the block's channels of one line sit in neighbouring lanes, then the next line's): a column-direction
// step of a warp then reads few, consecutive segments, a row-direction lane walks along its own row (each 32-byte
// sector serves 8 steps from L1), and one warp-wide load of B | C serves all the block's channels of a line.
// Shared memory rows are padded to an odd stride.
// Chunked two-pass scan: pass A scans every chunk but the last from a zero state, keeping only its end state and
// the sum of its dt (its decay over the chunk is exp(A * sum dt)); the chunk carries are folded in sequence order
// (one thread per (channel, state)); pass B rescans each chunk from its true initial state and adds C . h to y.
// With 56 x 56 maps that is 56-way parallelism per (channel, direction), which batch 1 needs (only 4 * d_inner
// independent recurrences otherwise); the price is a second evaluation of the exponentials.
//
// Fallback (`scan_global_kernel`), when one channel's map does not fit in shared memory (a stage-1 map of more
// than about 26 000 positions): one thread per (b, channel), serial, y accumulated in float32 device memory (y
// itself for float32, a temporary buffer for float16). Correct for any size, not tuned.
//
// Numerics: float32 state and arithmetic, A = -exp(A_logs) computed in float32 (accurate expf), decay exp(dt * A)
// by ex2.approx (relative error about 2^-22), softplus as log1pf(expf(x)) (x for x > 20, as PyTorch).

#include "selective_scan_2d.cuh"
#include "ex2.cuh"
#include "float_convert.cuh"

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <mutex>
#include <type_traits>
#include <vector>

namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr int kMaxThreads = 512;  // chunked kernel's launch bound (benchmarks may ask for 512 threads)
constexpr int kAutoThreads = 256;  // chunked kernel's automatic block size
// The chunked kernel with split states: 448 threads (4 channels x 56 chunks x 2 lanes), two blocks per multiprocessor:
// 72 registers a thread (a cap of 64 for 512 threads spilled 380 bytes a thread).
constexpr int kSplitMaxThreads = 448;

using vmamba_cuda_detail::ex2;
using vmamba_cuda_detail::from_f;
using vmamba_cuda_detail::to_f;

// Four consecutive elements (16-byte aligned for float, 8 for half) as float.
__device__ __forceinline__ void load4(const float* ptr, float (&out)[4]) {
  const float4 v = __ldg(reinterpret_cast<const float4*>(ptr));
  out[0] = v.x;
  out[1] = v.y;
  out[2] = v.z;
  out[3] = v.w;
}
__device__ __forceinline__ void load4(const __half* ptr, float (&out)[4]) {
  const uint2 raw = __ldg(reinterpret_cast<const uint2*>(ptr));
  const float2 lo = __half22float2(*reinterpret_cast<const __half2*>(&raw.x));
  const float2 hi = __half22float2(*reinterpret_cast<const __half2*>(&raw.y));
  out[0] = lo.x;
  out[1] = lo.y;
  out[2] = hi.x;
  out[3] = hi.y;
}

__device__ __forceinline__ float softplus(float x) { return x > 20.0f ? x : log1pf(__expf(x)); }

// softplus for the block kernel: log1p(z) = log(w) * z / (w - 1) with w = 1 + z corrects the rounding of w, so the
// fast hardware log keeps log1p's relative accuracy (a few ulp) at a fraction of log1pf's instructions.
__device__ __forceinline__ float softplus_fast(float x) {
  if (x > 20.0f) return x;
  const float z = __expf(x);
  const float w = 1.0f + z;
  return w == 1.0f ? z : __logf(w) * __fdividef(z, w - 1.0f);
}

struct Params {
  const void* u;
  const void* delta;
  const void* A_logs;
  const void* B;
  const void* C;
  const void* D;
  const void* delta_bias;
  void* y;
  int batch, di, height, width;
  int wp;   // shared-memory row stride (odd)
  int ct;   // channels per block
  int nch;  // chunk threads per channel
  int channel_major;  // chunked kernel, for benchmarks: thread t = (channel t / nch, chunk t % nch), not interleaved
  int vec4;  // block kernel: rows of whole quads and aligned tensors, so staging loads four elements at once
  int prefetch;  // line kernel: prefetch the planes of its later loads into L2 at the start
  const float* bc;  // d_state > 1: B and C position-major, (batch, 4, H*W, [B(N) | C(N)]) float32 (gather_bc_kernel)
  // Line kernel: planes of H W elements from one batch element's B (and C) to the next: 4 N, or the channels of the
  // packed or merged tensor holding them; and from one batch element's delta to the next: 4 Di, or the channels of
  // the merged op's delta tensor.
  int bc_channels;
  int delta_channels;
  // Packed projections (vmamba_selective_scan_2d_packed_cuda), line kernel only: with rank > 0, `delta` points at the
  // first dt-rank plane of the packed tensor x (batch stride x_bstride) and each step's delta is computed from that
  // position's `rank` values and dt_weight (4, Di, rank), so the (batch, 4, Di, H, W) delta tensor never exists.
  const void* dt_weight;
  int rank;
  int64_t x_bstride;
};

// d_state > 1: B and C of every (b, k) copied position-major, [p][B(0..N-1) | C(0..N-1)] in float32, so a scan step
// reads its 2N values as N/2 aligned 16-byte loads from one 128-byte line, instead of 2N loads N planes apart (which,
// with the lanes of a warp on different lines of the map, touched 32 sectors per load: the d_state-16 kernel ran at
// 2% of the copy bandwidth). One thread per (b, k, position); the reads are coalesced along positions.
template <int N, typename T>
__global__ void gather_bc_kernel(const T* __restrict__ B, const T* __restrict__ C, float* __restrict__ bc,
                                 int64_t planes, int len) {
  static_assert(N % 4 == 0, "position-major B/C is written as float4");
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= planes * len) return;
  const int64_t plane = idx / len;
  const int p = static_cast<int>(idx - plane * len);
  const T* b = B + plane * N * len + p;
  const T* c = C + plane * N * len + p;
  float4* dst = reinterpret_cast<float4*>(bc + idx * 2 * N);
#pragma unroll
  for (int i = 0; i < N / 4; ++i) {
    dst[i] = make_float4(to_f(b[(4 * i) * len]), to_f(b[(4 * i + 1) * len]), to_f(b[(4 * i + 2) * len]),
                         to_f(b[(4 * i + 3) * len]));
    dst[N / 4 + i] = make_float4(to_f(c[(4 * i) * len]), to_f(c[(4 * i + 1) * len]), to_f(c[(4 * i + 2) * len]),
                                 to_f(c[(4 * i + 3) * len]));
  }
}

// The B and C a scan of plane (b, k) reads: the input planes for d_state 1, the position-major copy otherwise
// (`c_mat` unused then: C follows B in each position's row).
template <typename BT>
struct BcPlanes {
  const BT* b;
  const BT* c;
};

template <int N, typename T>
__device__ __forceinline__ auto bc_planes(const Params& P, int64_t plane_bk, int len) {
  if constexpr (N == 1) {
    return BcPlanes<T>{static_cast<const T*>(P.B) + plane_bk * len, static_cast<const T*>(P.C) + plane_bk * len};
  } else {
    const float* bc = P.bc + plane_bk * len * 2 * N;
    return BcPlanes<float>{bc, bc + N};
  }
}

// One chunk (lines [l0, l1) in direction K's order) of one channel. `delta`, `b_mat`, `c_mat` point at the
// (b, k, channel) / (b, k) planes; `u_map` is the channel's u (row stride `u_stride`) and `y_map` its y accumulator
// (row stride `stride`), each in shared or device memory.
// kPassB: add C . h to y; otherwise accumulate the chunk's dt sum (pass A).
// NL < N (state split): this thread holds states [s0, s0 + NL), its neighbouring lane (pair_mask) the other half;
// their C . h terms are summed by a shuffle and the lane with s0 == 0 adds them to y.
template <int N, int NL, typename T, typename BT, typename UT, int K, bool kPassB>
__device__ __forceinline__ void scan_chunk(int height, int width, int stride, int u_stride, int l0, int l1,
                                           const T* __restrict__ delta,
                                           const BT* __restrict__ b_mat, const BT* __restrict__ c_mat, const UT* u_map,
                                           float* y_map, float bias, const float (&a2)[NL], float (&h)[NL],
                                           float& dt_sum, int s0, unsigned pair_mask) {
  constexpr bool kRows = (K % 2) == 0;
  constexpr bool kReverse = K >= 2;
  const int len = height * width;
  const int line_len = kRows ? width : height;
  const int nlines = kRows ? height : width;
  // Steps unrolled: 4 lets the loads of later steps start early; the split kernel's register budget (72) takes 2.
  constexpr int kUnroll = NL < N ? 2 : 4;
  for (int l = l0; l < l1; ++l) {
    const int line = kReverse ? nlines - 1 - l : l;
#pragma unroll(kUnroll)
    for (int s = 0; s < line_len; ++s) {
      const int along = kReverse ? line_len - 1 - s : s;
      const int row = kRows ? line : along;
      const int col = kRows ? along : line;
      const int p = row * width + col;
      const int m = row * stride + col;
      const float dt = softplus(to_f(delta[p]) + bias);
      const float dtu = dt * to_f(u_map[row * u_stride + col]);
      float acc = 0.0f;
      if constexpr (N == 1) {
        h[0] = ex2(dt * a2[0]) * h[0] + dtu * to_f(b_mat[p]);
        if constexpr (kPassB) acc = h[0] * to_f(c_mat[p]);
      } else {
        // Position-major B | C (bc_planes): NL/4 + NL/4 float4 loads from one line.
        const float4* row4 = reinterpret_cast<const float4*>(b_mat + static_cast<int64_t>(p) * 2 * N + s0);
#pragma unroll
        for (int i = 0; i < NL / 4; ++i) {
          const float4 bv = __ldg(row4 + i);
          const float bq[4] = {bv.x, bv.y, bv.z, bv.w};
#pragma unroll
          for (int e = 0; e < 4; ++e) h[4 * i + e] = ex2(dt * a2[4 * i + e]) * h[4 * i + e] + dtu * bq[e];
          if constexpr (kPassB) {
            const float4 cv = __ldg(row4 + N / 4 + i);
            acc += h[4 * i] * cv.x + h[4 * i + 1] * cv.y + h[4 * i + 2] * cv.z + h[4 * i + 3] * cv.w;
          }
        }
      }
      if constexpr (kPassB) {
        if constexpr (NL < N) {
          acc += __shfl_xor_sync(pair_mask, acc, 1);
          if (s0 == 0) y_map[m] += acc;
        } else {
          y_map[m] += acc;
        }
      } else {
        dt_sum += dt;
      }
    }
  }
}

template <int N, int NL, typename T, typename BT, typename UT, bool kPassB>
__device__ __forceinline__ void scan_chunk_k(int k, int height, int width, int stride, int u_stride, int l0, int l1,
                                             const T* delta, const BT* b_mat, const BT* c_mat, const UT* u_map,
                                             float* y_map, float bias, const float (&a2)[NL], float (&h)[NL],
                                             float& dt_sum, int s0, unsigned pair_mask) {
  switch (k) {
    case 0:
      scan_chunk<N, NL, T, BT, UT, 0, kPassB>(height, width, stride, u_stride, l0, l1, delta, b_mat, c_mat,
                                                u_map, y_map, bias, a2, h, dt_sum, s0, pair_mask);
      break;
    case 1:
      scan_chunk<N, NL, T, BT, UT, 1, kPassB>(height, width, stride, u_stride, l0, l1, delta, b_mat, c_mat,
                                                u_map, y_map, bias, a2, h, dt_sum, s0, pair_mask);
      break;
    case 2:
      scan_chunk<N, NL, T, BT, UT, 2, kPassB>(height, width, stride, u_stride, l0, l1, delta, b_mat, c_mat,
                                                u_map, y_map, bias, a2, h, dt_sum, s0, pair_mask);
      break;
    default:
      scan_chunk<N, NL, T, BT, UT, 3, kPassB>(height, width, stride, u_stride, l0, l1, delta, b_mat, c_mat,
                                                u_map, y_map, bias, a2, h, dt_sum, s0, pair_mask);
      break;
  }
}

template <typename T>
__device__ __forceinline__ float d_sum(const T* D, int di, int c) {
  return to_f(D[c]) + to_f(D[di + c]) + to_f(D[2 * di + c]) + to_f(D[3 * di + c]);
}

// a2[n] = A[s0 + n] * log2(e) for the NL states from s0 of (direction k, channel c).
template <int N, int NL = N, typename T>
__device__ __forceinline__ void load_a2(const T* A_logs, int di, int k, int c, float (&a2)[NL], int s0 = 0) {
#pragma unroll
  for (int n = 0; n < NL; ++n) {
    a2[n] = -expf(to_f(A_logs[(static_cast<int64_t>(k) * di + c) * N + s0 + n])) * kLog2e;
  }
}

// kSplit 2 (d_state 16): two neighbouring lanes share a (channel, chunk), 8 states each, so a thread needs about half
// the registers and twice the warps fit on a multiprocessor to hide the latency of the serial steps.
template <int N, typename T, int kSplit>
__global__ void __launch_bounds__(kSplit == 1 ? kMaxThreads : kSplitMaxThreads, kSplit) scan_smem_kernel(Params P) {
  static_assert(kSplit == 1 || (kSplit == 2 && N % 8 == 0), "state split: two halves of whole float4 groups");
  constexpr int NL = N / kSplit;
  extern __shared__ float smem[];
  const int height = P.height, width = P.width, di = P.di, stride = P.wp, nch = P.nch;
  const int len = height * width;
  const int plane = height * stride;
  // d_state 16 reads u from device memory (through L1) instead of staging it: half the shared memory per channel,
  // so more blocks per multiprocessor to hide the latency of the serial steps (vanilla tiny stage 1, batch 128, H200:
  // 21.0 -> 17.2 ms). d_state 1 (here only for maps too large for the block kernel) stages it (3.1 against 4.5 ms).
  constexpr bool kStageU = N == 1;
  float* sy = smem;                                  // [ct][plane] y accumulator
  float* su = sy + P.ct * plane;                     // d_state 1: [ct][plane] u
  float* carry = su + (kStageU ? P.ct * plane : 0);  // [ct][nch][N + 1] chunk end states and dt sums, then states in

  const T* u = static_cast<const T*>(P.u);
  const T* delta = static_cast<const T*>(P.delta);
  const T* A_logs = static_cast<const T*>(P.A_logs);
  const T* D = static_cast<const T*>(P.D);
  const T* dbias = static_cast<const T*>(P.delta_bias);
  T* y = static_cast<T*>(P.y);

  const int b = blockIdx.y;
  const int c0 = blockIdx.x * P.ct;
  const int nc = min(P.ct, di - c0);

  // y = (sum over directions of D) * u (coalesced reads).
  for (int idx = threadIdx.x; idx < nc * len; idx += blockDim.x) {
    const int cl = idx / len;
    const int p = idx - cl * len;
    const int row = p / width;
    const int col = p - row * width;
    const float uu = to_f(u[(static_cast<int64_t>(b) * di + c0 + cl) * len + p]);
    const int m = cl * plane + row * stride + col;
    if constexpr (kStageU) su[m] = uu;
    sy[m] = d_sum(D, di, c0 + cl) * uu;
  }
  __syncthreads();

  // Thread t takes channel t % ct of chunk t / ct: the ct channels of one chunk sit in neighbouring lanes, so one
  // warp-wide load of B and C (shared by the channels) touches ct times fewer lines. Channel-major (channel t / nch,
  // each warp on 32 lines) made every B|C load touch 32 lines: L1 was 95% busy at the vanilla stage-1 shape (ncu).
  const int tt = threadIdx.x / kSplit;
  const int s0 = (threadIdx.x % kSplit) * NL;
  const unsigned pair_mask = kSplit == 2 ? 3u << ((threadIdx.x & 31) & ~1) : 0u;
  const int cl = P.channel_major ? tt / nch : tt % P.ct;
  const int q = P.channel_major ? tt - cl * nch : tt / P.ct;
  const bool has_channel = cl < nc;
  const int c = c0 + (has_channel ? cl : 0);
  float* my_carry = carry + (cl * nch + q) * (N + 1);

  for (int k = 0; k < 4; ++k) {
    const int nlines = (k % 2 == 0) ? height : width;
    const int lpc = (nlines + nch - 1) / nch;         // lines per chunk
    const int nchunks = (nlines + lpc - 1) / lpc;     // same for the whole block
    const bool active = has_channel && q < nchunks;
    const int l0 = q * lpc;
    const int l1 = min(nlines, l0 + lpc);
    const int64_t plane_bk = static_cast<int64_t>(b) * 4 + k;
    const T* delta_c = delta + (plane_bk * di + c) * len;
    const auto [b_mat, c_mat] = bc_planes<N, T>(P, plane_bk, len);
    using BT = std::remove_cv_t<std::remove_pointer_t<decltype(b_mat)>>;
    // This channel's u: staged (row stride `stride`) or in device memory (row stride `width`).
    using UT = std::conditional_t<kStageU, float, T>;
    const UT* u_c;
    if constexpr (kStageU) {
      u_c = su + cl * plane;
    } else {
      u_c = u + (static_cast<int64_t>(b) * di + c) * len;
    }
    const int u_stride = kStageU ? stride : width;
    float a2[NL];
    load_a2<N, NL>(A_logs, di, k, c, a2, s0);
    const float bias = to_f(dbias[k * di + c]);
    float h[NL];
#pragma unroll
    for (int n = 0; n < NL; ++n) h[n] = 0.0f;

    if (nchunks > 1) {
      // Pass A: every chunk but the last, from a zero state.
      float dt_sum = 0.0f;
      if (active && q + 1 < nchunks) {
        scan_chunk_k<N, NL, T, BT, UT, false>(k, height, width, stride, u_stride, l0, l1, delta_c, b_mat, c_mat,
                                              u_c, nullptr, bias, a2, h, dt_sum, s0, pair_mask);
#pragma unroll
        for (int n = 0; n < NL; ++n) my_carry[s0 + n] = h[n];
        if (s0 == 0) my_carry[N] = dt_sum;
      }
      __syncthreads();
      // Fold the carries in sequence order: slot j gets chunk j's initial state.
      for (int t = threadIdx.x; t < nc * N; t += blockDim.x) {
        const int fcl = t / N;
        const int n = t - fcl * N;
        const float a2n =
            -expf(to_f(A_logs[(static_cast<int64_t>(k) * di + c0 + fcl) * N + n])) * kLog2e;
        float state = 0.0f;
        for (int j = 0; j < nchunks; ++j) {
          float* slot = carry + (fcl * nch + j) * (N + 1);
          if (j + 1 < nchunks) {
            const float end = slot[n];
            const float sum = slot[N];
            slot[n] = state;
            state = ex2(a2n * sum) * state + end;
          } else {
            slot[n] = state;
          }
        }
      }
      __syncthreads();
      if (active) {
#pragma unroll
        for (int n = 0; n < NL; ++n) h[n] = my_carry[s0 + n];
      }
    }
    // Pass B: from the true initial state, adding C . h into y.
    if (active) {
      float unused = 0.0f;
      scan_chunk_k<N, NL, T, BT, UT, true>(k, height, width, stride, u_stride, l0, l1, delta_c, b_mat, c_mat, u_c,
                                          sy + cl * plane, bias, a2, h, unused, s0, pair_mask);
    }
    __syncthreads();  // the next direction's chunks cover other lines of the same y; carry slots are reused
  }

  for (int idx = threadIdx.x; idx < nc * len; idx += blockDim.x) {
    const int ch = idx / len;
    const int p = idx - ch * len;
    const int row = p / width;
    const int col = p - row * width;
    y[(static_cast<int64_t>(b) * di + c0 + ch) * len + p] = from_f<T>(sy[ch * plane + row * stride + col]);
  }
}

// ---- Block-scan kernel (d_state 1) ----

constexpr int kBlockMaxThreads = 512;
constexpr int kBlockMaxWarps = kBlockMaxThreads / 32;
constexpr int kStageBatch = 4;
constexpr unsigned kFullMask = 0xffffffffu;

// One direction K over the staged planes of CPB channels (B and C are shared by them, which is why a block takes
// two: half the index arithmetic, B/C loads and C reads per channel). Thread t owns the sequence steps
// [seg0 + t*I, seg0 + t*I + I) of each segment of blockDim.x * I steps. The composition of two steps' (decay a,
// state h) pairs, earlier then later, is (a1 * a2, a2 * h1 + h2).
template <int I, int K, int CPB>
__device__ __forceinline__ void block_scan_direction(int len, int height, int width, int stride, int plane,
                                                     const float (&a2)[CPB], const float* sdt, const float* su,
                                                     const float* sb, const float* sc, float* sy, float* wtot) {
  constexpr bool kRows = (K % 2) == 0;
  constexpr bool kReverse = K >= 2;
  const int line_len = kRows ? width : height;
  const int t = threadIdx.x;
  const int lane = t & 31;
  const int warp = t >> 5;
  const int nwarps = blockDim.x >> 5;
  const int seg_len = blockDim.x * I;
  float carry[CPB];  // state entering the segment
#pragma unroll
  for (int ch = 0; ch < CPB; ++ch) carry[ch] = 0.0f;
  int parity = 0;  // warp totals double-buffered: one barrier per segment
  for (int seg0 = 0; seg0 < len; seg0 += seg_len, parity ^= 1) {
    const int i0 = seg0 + t * I;
    // Position of step i0: index s in the orientation's forward order (rows: row-major, columns: column-major).
    const int q = min(i0, len - 1);
    const int s = kReverse ? len - 1 - q : q;
    int line = s / line_len;
    int along = s - line * line_len;
    float acc_a[CPB][I], acc_h[CPB][I];
    int pos[I];
    float a_run[CPB], h_run[CPB];
#pragma unroll
    for (int ch = 0; ch < CPB; ++ch) {
      a_run[ch] = 1.0f;
      h_run[ch] = 0.0f;
    }
#pragma unroll
    for (int j = 0; j < I; ++j) {
      const int row = kRows ? line : along;
      const int col = kRows ? along : line;
      const int m = row * stride + col;
      pos[j] = m;
      if (i0 + j < len) {
        const float bb = sb[m];
#pragma unroll
        for (int ch = 0; ch < CPB; ++ch) {
          const float dt = sdt[ch * plane + m];
          const float a = ex2(dt * a2[ch]);
          h_run[ch] = a * h_run[ch] + dt * su[ch * plane + m] * bb;
          a_run[ch] *= a;
        }
      }
#pragma unroll
      for (int ch = 0; ch < CPB; ++ch) {
        acc_a[ch][j] = a_run[ch];
        acc_h[ch][j] = h_run[ch];
      }
      if (kReverse) {
        if (--along < 0) {
          along = line_len - 1;
          --line;
        }
      } else if (++along == line_len) {
        along = 0;
        ++line;
      }
    }
    // Inclusive scan of the threads' totals inside the warp, then exclusive.
    float sa[CPB], sh[CPB], ea[CPB], eh[CPB];
#pragma unroll
    for (int ch = 0; ch < CPB; ++ch) {
      sa[ch] = a_run[ch];
      sh[ch] = h_run[ch];
    }
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
#pragma unroll
      for (int ch = 0; ch < CPB; ++ch) {
        const float pa = __shfl_up_sync(kFullMask, sa[ch], off);
        const float ph = __shfl_up_sync(kFullMask, sh[ch], off);
        if (lane >= off) {
          sh[ch] = sa[ch] * ph + sh[ch];
          sa[ch] = sa[ch] * pa;
        }
      }
    }
    float* tot = wtot + parity * (CPB * 2 * kBlockMaxWarps);
#pragma unroll
    for (int ch = 0; ch < CPB; ++ch) {
      ea[ch] = __shfl_up_sync(kFullMask, sa[ch], 1);
      eh[ch] = __shfl_up_sync(kFullMask, sh[ch], 1);
      if (lane == 0) {
        ea[ch] = 1.0f;
        eh[ch] = 0.0f;
      }
      if (lane == 31) {
        tot[(2 * ch) * kBlockMaxWarps + warp] = sa[ch];
        tot[(2 * ch + 1) * kBlockMaxWarps + warp] = sh[ch];
      }
    }
    __syncthreads();
    // Every warp scans the (at most 16) warp totals itself with shuffles, the segment's carry folded into the
    // first: lane w then holds the state after warp w. No second barrier.
    float h0[CPB];
#pragma unroll
    for (int ch = 0; ch < CPB; ++ch) {
      float ta = 1.0f, th = 0.0f;
      if (lane < nwarps) {
        ta = tot[(2 * ch) * kBlockMaxWarps + lane];
        th = tot[(2 * ch + 1) * kBlockMaxWarps + lane];
      }
      if (lane == 0) th = ta * carry[ch] + th;
#pragma unroll
      for (int off = 1; off < kBlockMaxWarps; off <<= 1) {
        const float pa = __shfl_up_sync(kFullMask, ta, off);
        const float ph = __shfl_up_sync(kFullMask, th, off);
        if (lane >= off) {
          th = ta * ph + th;
          ta = ta * pa;
        }
      }
      const float after_previous = __shfl_sync(kFullMask, th, warp > 0 ? warp - 1 : 0);
      const float h_in = warp > 0 ? after_previous : carry[ch];
      carry[ch] = __shfl_sync(kFullMask, th, nwarps - 1);
      h0[ch] = ea[ch] * h_in + eh[ch];  // state before this thread's first step
    }
#pragma unroll
    for (int j = 0; j < I; ++j) {
      if (i0 + j < len) {
        const int m = pos[j];
        const float cc = sc[m];
#pragma unroll
        for (int ch = 0; ch < CPB; ++ch) sy[ch * plane + m] += cc * (acc_a[ch][j] * h0[ch] + acc_h[ch][j]);
      }
    }
  }
}

template <int I, int CPB>
__device__ __forceinline__ void block_scan_direction_k(int k, int len, int height, int width, int stride, int plane,
                                                       const float (&a2)[CPB], const float* sdt, const float* su,
                                                       const float* sb, const float* sc, float* sy, float* wtot) {
  switch (k) {
    case 0: block_scan_direction<I, 0, CPB>(len, height, width, stride, plane, a2, sdt, su, sb, sc, sy, wtot); break;
    case 1: block_scan_direction<I, 1, CPB>(len, height, width, stride, plane, a2, sdt, su, sb, sc, sy, wtot); break;
    case 2: block_scan_direction<I, 2, CPB>(len, height, width, stride, plane, a2, sdt, su, sb, sc, sy, wtot); break;
    default: block_scan_direction<I, 3, CPB>(len, height, width, stride, plane, a2, sdt, su, sb, sc, sy, wtot); break;
  }
}

// Shared memory of the block kernel: per channel u, y, dt planes, B and C planes (row stride `stride`), and the
// double-buffered warp totals.
inline size_t block_smem_bytes(int height, int stride, int cpb) {
  return ((3 * static_cast<size_t>(cpb) + 2) * height * stride + 2 * 2 * cpb * kBlockMaxWarps) * sizeof(float);
}

template <typename T, int I, int CPB, int kThreads, int kMinBlocks>
__global__ void __launch_bounds__(kThreads, kMinBlocks) scan_block_kernel(Params P) {
  extern __shared__ float smem[];
  const int height = P.height, width = P.width, stride = P.wp, di = P.di;
  const int len = height * width;
  const int plane = height * stride;
  float* su = smem;                // [CPB][plane]
  float* sy = su + CPB * plane;    // [CPB][plane]
  float* sdt = sy + CPB * plane;   // [CPB][plane]
  float* sb = sdt + CPB * plane;   // [plane]
  float* sc = sb + plane;          // [plane]
  float* wtot = sc + plane;        // [2][CPB][2][kBlockMaxWarps]

  const T* u = static_cast<const T*>(P.u);
  const T* delta = static_cast<const T*>(P.delta);
  const T* A_logs = static_cast<const T*>(P.A_logs);
  const T* Bm = static_cast<const T*>(P.B);
  const T* Cm = static_cast<const T*>(P.C);
  const T* dbias = static_cast<const T*>(P.delta_bias);
  T* y = static_cast<T*>(P.y);

  const int c0 = blockIdx.x * CPB;  // the launcher picks CPB dividing d_inner
  const int b = blockIdx.y;
  const int64_t map_off = (static_cast<int64_t>(b) * di + c0) * len;  // channel ch at map_off + ch * len
  const int row0 = threadIdx.x / width;
  const int col0 = threadIdx.x - row0 * width;
  const int step_rows = blockDim.x / width;  // (row, col) advance of one block-stride in the map
  const int step_cols = blockDim.x - step_rows * width;
  float dsum[CPB];
#pragma unroll
  for (int ch = 0; ch < CPB; ++ch) dsum[ch] = d_sum(static_cast<const T*>(P.D), di, c0 + ch);
  {
    int row = row0, col = col0;
    for (int p = threadIdx.x; p < len; p += blockDim.x) {
      const int m = row * stride + col;
#pragma unroll
      for (int ch = 0; ch < CPB; ++ch) {
        const float uu = to_f(u[map_off + ch * len + p]);
        su[ch * plane + m] = uu;
        sy[ch * plane + m] = dsum[ch] * uu;
      }
      row += step_rows;
      col += step_cols;
      if (col >= width) {
        col -= width;
        ++row;
      }
    }
  }
  for (int k = 0; k < 4; ++k) {
    const int64_t plane_bk = static_cast<int64_t>(b) * 4 + k;
    const T* delta_c = delta + (plane_bk * di + c0) * len;  // channel ch at delta_c + ch * len
    const T* b_map = Bm + plane_bk * len;
    const T* c_map = Cm + plane_bk * len;
    float bias[CPB], a2[CPB];
#pragma unroll
    for (int ch = 0; ch < CPB; ++ch) {
      bias[ch] = to_f(dbias[k * di + c0 + ch]);
      a2[ch] = -expf(to_f(A_logs[k * di + c0 + ch])) * kLog2e;
    }
    __syncthreads();  // the previous direction is done with the staged planes
    if (P.vec4) {
      // Quads of one row: one 16-byte (8 for half) load per tensor and thread instead of four.
      const int wq = width >> 2;
      int qrow = threadIdx.x / wq, qcol = threadIdx.x - (threadIdx.x / wq) * wq;
      const int qstep_rows = blockDim.x / wq, qstep_cols = blockDim.x - (blockDim.x / wq) * wq;
      for (int qi = threadIdx.x; qi < (len >> 2); qi += blockDim.x) {
        const int p = qi << 2;
        float dv[CPB][4], bv[4], cv[4];
#pragma unroll
        for (int ch = 0; ch < CPB; ++ch) load4(delta_c + ch * len + p, dv[ch]);
        load4(b_map + p, bv);
        load4(c_map + p, cv);
        const int m = qrow * stride + (qcol << 2);
        if ((stride & 3) == 0) {
          // Rows of whole quads (block_smem_stride): one 16-byte store per plane, conflict-free per quarter warp.
#pragma unroll
          for (int ch = 0; ch < CPB; ++ch) {
            *reinterpret_cast<float4*>(sdt + ch * plane + m) =
                make_float4(softplus_fast(dv[ch][0] + bias[ch]), softplus_fast(dv[ch][1] + bias[ch]),
                            softplus_fast(dv[ch][2] + bias[ch]), softplus_fast(dv[ch][3] + bias[ch]));
          }
          *reinterpret_cast<float4*>(sb + m) = make_float4(bv[0], bv[1], bv[2], bv[3]);
          *reinterpret_cast<float4*>(sc + m) = make_float4(cv[0], cv[1], cv[2], cv[3]);
        } else {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
#pragma unroll
            for (int ch = 0; ch < CPB; ++ch) sdt[ch * plane + m + e] = softplus_fast(dv[ch][e] + bias[ch]);
            sb[m + e] = bv[e];
            sc[m + e] = cv[e];
          }
        }
        qrow += qstep_rows;
        qcol += qstep_cols;
        if (qcol >= wq) {
          qcol -= wq;
          ++qrow;
        }
      }
      __syncthreads();
      block_scan_direction_k<I, CPB>(k, len, height, width, stride, plane, a2, sdt, su, sb, sc, sy, wtot);
      continue;
    }
    // kStageBatch strides of loads in flight per thread before any is used; (row, col) advanced without divisions.
    int row = row0, col = col0;
    for (int base = threadIdx.x; base < len; base += kStageBatch * blockDim.x) {
      float dv[CPB][kStageBatch], bv[kStageBatch], cv[kStageBatch];
#pragma unroll
      for (int r = 0; r < kStageBatch; ++r) {
        const int p = base + r * static_cast<int>(blockDim.x);
        if (p < len) {
#pragma unroll
          for (int ch = 0; ch < CPB; ++ch) dv[ch][r] = to_f(delta_c[ch * len + p]);
          bv[r] = to_f(b_map[p]);
          cv[r] = to_f(c_map[p]);
        }
      }
#pragma unroll
      for (int r = 0; r < kStageBatch; ++r) {
        if (base + r * static_cast<int>(blockDim.x) < len) {
          const int m = row * stride + col;
#pragma unroll
          for (int ch = 0; ch < CPB; ++ch) sdt[ch * plane + m] = softplus_fast(dv[ch][r] + bias[ch]);
          sb[m] = bv[r];
          sc[m] = cv[r];
        }
        row += step_rows;
        col += step_cols;
        if (col >= width) {
          col -= width;
          ++row;
        }
      }
    }
    __syncthreads();
    block_scan_direction_k<I, CPB>(k, len, height, width, stride, plane, a2, sdt, su, sb, sc, sy, wtot);
  }
  __syncthreads();
  int row = row0, col = col0;
  for (int p = threadIdx.x; p < len; p += blockDim.x) {
    const int m = row * stride + col;
#pragma unroll
    for (int ch = 0; ch < CPB; ++ch) y[map_off + ch * len + p] = from_f<T>(sy[ch * plane + m]);
    row += step_rows;
    col += step_cols;
    if (col >= width) {
      col -= width;
      ++row;
    }
  }
}

// ---- Line kernel (d_state 1, maps of at most kLinesMaxThreads chunks a phase) ----
//
// One thread per chunk of I consecutive positions of one line, in two phases: rows (directions 0 and 2), then
// columns (1 and 3). The two directions of an orientation cover the same positions in opposite orders, so one
// thread loads a chunk's u, dt, B and C for both into registers once (no shared-memory staging) and runs both short
// serial scans there. Each chunk's (decay, state) total goes to shared memory in its direction's sequence order, one
// warp per (channel, direction) scans those totals, and each thread finishes its chunk from its true initial state.
// The row phase leaves D u + the row directions' terms in a float32 plane in shared memory; the column phase adds
// its own and writes y. Lanes take neighbouring chunks of a row (row phase: one vector load covers a lane's steps)
// and neighbouring columns (column phase: each load is one coalesced row segment). Every input element is read from
// device memory once (u twice, the second time from cache) and every exponential evaluated once. Little shared
// memory (a float32 plane per channel and the chunk totals), and a batch-1 call still has one block per channel:
// its 4 * d_inner independent recurrences are cut into H * W / I chunks each.

constexpr int kLinesMaxThreads = 416;  // 13 warps: 72 registers a thread leave room for two blocks a multiprocessor

// I values of one line's run: steps `start + e * step` (e < count; zeros past it) of `p`.
template <int I, typename T>
__device__ __forceinline__ void load_run(const T* p, int step, int count, float (&out)[I]) {
  if constexpr (I % 8 == 0 && sizeof(T) == 2) {
    // Eight halves: one 16-byte load.
    if (step == 1 && count == I && (reinterpret_cast<uintptr_t>(p) & 15) == 0) {
#pragma unroll
      for (int e = 0; e < I; e += 8) {
        const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p + e));
        const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const float2 v = __half22float2(*reinterpret_cast<const __half2*>(&words[q]));
          out[e + 2 * q] = v.x;
          out[e + 2 * q + 1] = v.y;
        }
      }
      return;
    }
  }
  if constexpr (I % 4 == 0) {
    if (step == 1 && count == I && (reinterpret_cast<uintptr_t>(p) & (4 * sizeof(T) - 1)) == 0) {
#pragma unroll
      for (int e = 0; e < I; e += 4) {
        float v[4];
        load4(p + e, v);
#pragma unroll
        for (int q = 0; q < 4; ++q) out[e + q] = v[q];
      }
      return;
    }
  }
#pragma unroll
  for (int e = 0; e < I; ++e) out[e] = e < count ? to_f(__ldg(p + e * step)) : 0.0f;
}

// The carries of `n` chunk totals (a, h) of one (channel, direction), stored in sequence order at tot[2 * i]:
// afterwards tot[2 * i] holds the state entering chunk i. One warp: each lane composes a contiguous range, the
// lanes' totals are scanned by shuffles, then each lane walks its range again.
__device__ __forceinline__ void scan_chunk_totals(float* tot, int n, int lane) {
  const int per_lane = (n + 31) / 32;
  const int i0 = min(n, lane * per_lane), i1 = min(n, i0 + per_lane);
  float ta = 1.0f, th = 0.0f;
#pragma unroll 4
  for (int i = i0; i < i1; ++i) {
    const float a = tot[2 * i];
    th = a * th + tot[2 * i + 1];
    ta *= a;
  }
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const float pa = __shfl_up_sync(kFullMask, ta, off);
    const float ph = __shfl_up_sync(kFullMask, th, off);
    if (lane >= off) {
      th = ta * ph + th;
      ta = ta * pa;
    }
  }
  float h = __shfl_up_sync(kFullMask, th, 1);
  if (lane == 0) h = 0.0f;
#pragma unroll 4
  for (int i = i0; i < i1; ++i) {
    const float a = tot[2 * i], b = tot[2 * i + 1];
    tot[2 * i] = h;
    h = a * h + b;
  }
}

// Packed inputs: the chunk's runs of delta, B and C for channel c of direction k, B and C from planes of x, delta
// computed from x's dt-rank planes (the same positions for every channel of the block: they come from L1).
template <typename T, int I>
__device__ __forceinline__ void load_packed_inputs(const Params& P, int b, int k, int c, int m0, int step, int count,
                                                   float (&dt_in)[I], float (&b_in)[I], float (&c_in)[I]) {
  const int len = P.height * P.width;
  const T* x = static_cast<const T*>(P.delta) + b * P.x_bstride + static_cast<int64_t>(k) * P.rank * len + m0;
  const T* w = static_cast<const T*>(P.dt_weight) + (static_cast<int64_t>(k) * P.di + c) * P.rank;
#pragma unroll
  for (int e = 0; e < I; ++e) dt_in[e] = 0.0f;
  // Not unrolled: each unrolled rank keeps another I values live, and the kernel is at its 72-register bound (two
  // blocks of 416 threads a multiprocessor); ptxas spills 4-100 bytes so, 104-160 unrolled by 2.
#pragma unroll 1
  for (int r = 0; r < P.rank; ++r) {
    float v[I];
    load_run<I>(x + static_cast<int64_t>(r) * len, step, count, v);
    const float wr = to_f(__ldg(w + r));
#pragma unroll
    for (int e = 0; e < I; ++e) dt_in[e] = fmaf(wr, v[e], dt_in[e]);
  }
  const int64_t bc = (static_cast<int64_t>(b) * P.bc_channels + k) * len + m0;
  load_run<I>(static_cast<const T*>(P.B) + bc, step, count, b_in);
  load_run<I>(static_cast<const T*>(P.C) + bc, step, count, c_in);
}

// Where the line kernel reads delta, B and C: dense (batch, 4, ...) tensors; planes of wider tensors at
// P.delta_channels and P.bc_channels planes a batch element (the merged op); or the packed tensor, delta computed from
// its dt-rank planes (load_packed_inputs). Separate instantiations, so the dense kernel keeps its own register
// allocation (the strided addressing in it cost 3-4% at stage 1, run 29).
enum LinesInputs { kDenseInputs = 0, kStridedInputs = 1, kPackedInputs = 2 };

// One phase: kRows, directions 0 (forward) and 2 (backward) over the rows; else 1 and 3 over the columns.
template <typename T, int I, bool kRows, int kInputs>
__device__ __forceinline__ void lines_phase(const Params& P, int b, int c0, float* sy, float* tot, int tot_stride) {
  const int height = P.height, width = P.width, len = height * width, di = P.di, cpb = P.ct;
  const int line_len = kRows ? width : height;
  const int lines = kRows ? height : width;
  const int pieces = (line_len + I - 1) / I;
  const int n = lines * pieces;  // chunks of one channel and direction
  const int t = threadIdx.x;
  const int ch = t / n;
  const int j = t - ch * n;
  // Row phase: neighbouring threads take neighbouring chunks of a row. Column phase: neighbouring columns.
  const int line = kRows ? j / pieces : j % width;
  const int piece = kRows ? j - line * pieces : j / width;
  const int seq = line * pieces + piece;  // the chunk's place in the forward direction's order
  const int start = piece * I;
  const int count = min(I, line_len - start);
  const int c = c0 + ch;
  const bool active = ch < cpb && c < di;
  const int kf = kRows ? 0 : 1, kb = kf + 2;
  const int m0 = kRows ? line * width + start : start * width + line;  // position of the chunk's step 0
  const int step = kRows ? 1 : width;

  float keep[I], qf[I], qb[I];  // y = keep + qf * (state entering, forward) + qb * (state entering, backward)
  if (active) {
    const T* u = static_cast<const T*>(P.u);
    const T* delta = static_cast<const T*>(P.delta);
    const T* Bm = static_cast<const T*>(P.B);
    const T* Cm = static_cast<const T*>(P.C);
    const T* A_logs = static_cast<const T*>(P.A_logs);
    const T* dbias = static_cast<const T*>(P.delta_bias);
    const int64_t map = (static_cast<int64_t>(b) * di + c) * len + m0;
    const int64_t plane_f = static_cast<int64_t>(b) * 4 + kf, plane_b = static_cast<int64_t>(b) * 4 + kb;
    float uu[I], dt_in[I], b_in[I], c_in[I];
    load_run<I>(u + map, step, count, uu);
    // Unpacked inputs stay loaded as written before the packed form existed: the same code, the same registers.
    if constexpr (kInputs == kPackedInputs) {
      load_packed_inputs<T, I>(P, b, kf, c, m0, step, count, dt_in, b_in, c_in);
    } else if constexpr (kInputs == kStridedInputs) {
      const int64_t plane = static_cast<int64_t>(b) * P.bc_channels + kf;
      load_run<I>(delta + ((static_cast<int64_t>(b) * P.delta_channels + kf * di + c) * len + m0), step, count, dt_in);
      load_run<I>(Bm + plane * len + m0, step, count, b_in);
      load_run<I>(Cm + plane * len + m0, step, count, c_in);
    } else {
      load_run<I>(delta + (plane_f * di + c) * len + m0, step, count, dt_in);
      load_run<I>(Bm + plane_f * len + m0, step, count, b_in);
      load_run<I>(Cm + plane_f * len + m0, step, count, c_in);
    }
    const float bias_f = to_f(dbias[kf * di + c]), bias_b = to_f(dbias[kb * di + c]);
    const float a2f = -expf(to_f(A_logs[kf * di + c])) * kLog2e;
    const float a2b = -expf(to_f(A_logs[kb * di + c])) * kLog2e;
    float a_run = 1.0f, h_run = 0.0f;
#pragma unroll
    for (int e = 0; e < I; ++e) {
      if (e < count) {
        const float dt = softplus_fast(dt_in[e] + bias_f);
        const float a = ex2(dt * a2f);
        h_run = a * h_run + dt * uu[e] * b_in[e];
        a_run *= a;
      }
      keep[e] = c_in[e] * h_run;
      qf[e] = c_in[e] * a_run;
    }
    float* tf = tot + (2 * ch) * tot_stride;
    tf[2 * seq] = a_run;
    tf[2 * seq + 1] = h_run;
    a_run = 1.0f;
    h_run = 0.0f;
    // The backward inputs reuse the forward ones' registers: loaded only now (other warps hide the latency), so a
    // thread holds one direction's inputs at a time and two blocks fit a multiprocessor without spilling.
    asm volatile("" ::: "memory");
    if constexpr (kInputs == kPackedInputs) {
      load_packed_inputs<T, I>(P, b, kb, c, m0, step, count, dt_in, b_in, c_in);
    } else if constexpr (kInputs == kStridedInputs) {
      const int64_t plane = static_cast<int64_t>(b) * P.bc_channels + kb;
      load_run<I>(delta + ((static_cast<int64_t>(b) * P.delta_channels + kb * di + c) * len + m0), step, count, dt_in);
      load_run<I>(Bm + plane * len + m0, step, count, b_in);
      load_run<I>(Cm + plane * len + m0, step, count, c_in);
    } else {
      load_run<I>(delta + (plane_b * di + c) * len + m0, step, count, dt_in);
      load_run<I>(Bm + plane_b * len + m0, step, count, b_in);
      load_run<I>(Cm + plane_b * len + m0, step, count, c_in);
    }
#pragma unroll
    for (int e = I - 1; e >= 0; --e) {
      if (e < count) {
        const float dt = softplus_fast(dt_in[e] + bias_b);
        const float a = ex2(dt * a2b);
        h_run = a * h_run + dt * uu[e] * b_in[e];
        a_run *= a;
      }
      keep[e] += c_in[e] * h_run;
      qb[e] = c_in[e] * a_run;
    }
    float* tb = tf + tot_stride;
    tb[2 * (n - 1 - seq)] = a_run;
    tb[2 * (n - 1 - seq) + 1] = h_run;
    if constexpr (kRows) {
      const float dsum = d_sum(static_cast<const T*>(P.D), di, c);
#pragma unroll
      for (int e = 0; e < I; ++e) keep[e] += dsum * uu[e];
    }
  }
  __syncthreads();
  const int lane = t & 31, warp = t >> 5, nwarps = (blockDim.x + 31) >> 5;
  for (int s = warp; s < 2 * cpb; s += nwarps) {
    if (c0 + s / 2 < di) scan_chunk_totals(tot + s * tot_stride, n, lane);
  }
  __syncthreads();
  if (!active) return;
  const float hf = tot[(2 * ch) * tot_stride + 2 * seq];
  const float hb = tot[(2 * ch + 1) * tot_stride + 2 * (n - 1 - seq)];
  float* sy_c = sy + ch * len + m0;
  if constexpr (kRows) {
#pragma unroll
    for (int e = 0; e < I; ++e) {
      if (e < count) sy_c[e] = keep[e] + qf[e] * hf + qb[e] * hb;
    }
  } else {
    T* y = static_cast<T*>(P.y) + (static_cast<int64_t>(b) * di + c) * len + m0;
#pragma unroll
    for (int e = 0; e < I; ++e) {
      if (e < count) y[e * width] = from_f<T>(sy_c[e * width] + keep[e] + qf[e] * hf + qb[e] * hb);
    }
  }
}

// Shared memory: the channels' float32 row-phase planes, then the chunk totals (per channel and direction, `stride`
// floats: (a, h) of each chunk).
__host__ __device__ inline int lines_chunks(int line_len, int lines, int items) {
  return lines * ((line_len + items - 1) / items);
}
__host__ __device__ inline int lines_tot_stride(int height, int width, int items) {
  const int rows = lines_chunks(width, height, items), cols = lines_chunks(height, width, items);
  return 2 * (rows > cols ? rows : cols);
}
inline size_t lines_smem_bytes(int height, int width, int items, int cpb) {
  return static_cast<size_t>(cpb) *
         (static_cast<size_t>(height) * width + 2 * static_cast<size_t>(lines_tot_stride(height, width, items))) *
         sizeof(float);
}

// Asks L2 for a plane the block reads later (one prefetch per 128-byte line, spread over the block's threads).
template <typename T>
__device__ __forceinline__ void prefetch_l2(const T* plane, int len) {
  const char* bytes = reinterpret_cast<const char*>(plane);
  const int n = len * static_cast<int>(sizeof(T));
  for (int off = threadIdx.x * 128; off < n; off += blockDim.x * 128) {
    asm volatile("prefetch.global.L2 [%0];" ::"l"(bytes + off));
  }
}

template <typename T, int I, int kInputs>
__global__ void __launch_bounds__(kLinesMaxThreads, 2) scan_lines_kernel(Params P) {
  extern __shared__ float smem[];
  const int tot_stride = lines_tot_stride(P.height, P.width, I);
  float* sy = smem;
  float* tot = sy + static_cast<size_t>(P.ct) * P.height * P.width;
  const int c0 = blockIdx.x * P.ct;
  if (P.prefetch) {
    // The planes of the block's later loads (the row phase's backward direction, the column phase), requested from
    // DRAM now so that those loads find them in L2 instead of waiting a DRAM round trip each.
    const int len = P.height * P.width, di = P.di;
    if constexpr (kInputs == kPackedInputs) {
      const int64_t b = blockIdx.y;
      for (int k : {2, 1, 3}) {
        prefetch_l2(static_cast<const T*>(P.B) + (b * P.bc_channels + k) * len, len);
        prefetch_l2(static_cast<const T*>(P.C) + (b * P.bc_channels + k) * len, len);
        for (int r = 0; r < P.rank; ++r) {
          prefetch_l2(static_cast<const T*>(P.delta) + b * P.x_bstride + (static_cast<int64_t>(k) * P.rank + r) * len,
                      len);
        }
      }
    } else if constexpr (kInputs == kStridedInputs) {
      const int64_t b = blockIdx.y;
      for (int k : {2, 1, 3}) {
        prefetch_l2(static_cast<const T*>(P.B) + (b * P.bc_channels + k) * len, len);
        prefetch_l2(static_cast<const T*>(P.C) + (b * P.bc_channels + k) * len, len);
        for (int ch = 0; ch < P.ct && c0 + ch < di; ++ch) {
          prefetch_l2(
              static_cast<const T*>(P.delta) + (b * P.delta_channels + static_cast<int64_t>(k) * di + c0 + ch) * len,
              len);
        }
      }
    } else {
      const int64_t plane0 = static_cast<int64_t>(blockIdx.y) * 4;
      for (int k : {2, 1, 3}) {
        prefetch_l2(static_cast<const T*>(P.B) + (plane0 + k) * len, len);
        prefetch_l2(static_cast<const T*>(P.C) + (plane0 + k) * len, len);
        for (int ch = 0; ch < P.ct && c0 + ch < di; ++ch) {
          prefetch_l2(static_cast<const T*>(P.delta) + ((plane0 + k) * di + c0 + ch) * len, len);
        }
      }
    }
  }
  lines_phase<T, I, true, kInputs>(P, blockIdx.y, c0, sy, tot, tot_stride);
  __syncthreads();
  lines_phase<T, I, false, kInputs>(P, blockIdx.y, c0, sy, tot, tot_stride);
}

// Fallback: one thread per (b, channel), serial over every direction, y accumulated in float32 device memory.
template <int N, typename T>
__global__ void __launch_bounds__(128) scan_global_kernel(Params P, float* acc) {
  const int64_t item = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (item >= static_cast<int64_t>(P.batch) * P.di) return;
  const int di = P.di, height = P.height, width = P.width;
  const int len = height * width;
  const int b = static_cast<int>(item / di);
  const int c = static_cast<int>(item - static_cast<int64_t>(b) * di);
  const T* u_map = static_cast<const T*>(P.u) + item * len;
  const T* A_logs = static_cast<const T*>(P.A_logs);
  float* y_map = acc + item * len;
  const float dsum = d_sum(static_cast<const T*>(P.D), di, c);
  const int step_rows = blockDim.x / width;  // (row, col) advance of one block-stride in the map
  const int step_cols = blockDim.x - step_rows * width;
  for (int p = 0; p < len; ++p) y_map[p] = dsum * to_f(u_map[p]);
  for (int k = 0; k < 4; ++k) {
    const int64_t plane_bk = static_cast<int64_t>(b) * 4 + k;
    const T* delta_c = static_cast<const T*>(P.delta) + (plane_bk * di + c) * len;
    const auto [b_mat, c_mat] = bc_planes<N, T>(P, plane_bk, len);
    float a2[N];
    load_a2<N>(A_logs, di, k, c, a2);
    const float bias = to_f(static_cast<const T*>(P.delta_bias)[k * di + c]);
    float h[N];
#pragma unroll
    for (int n = 0; n < N; ++n) h[n] = 0.0f;
    float unused = 0.0f;
    const int nlines = (k % 2 == 0) ? height : width;
    using BT = std::remove_cv_t<std::remove_pointer_t<decltype(b_mat)>>;
    scan_chunk_k<N, N, T, BT, T, true>(k, height, width, width, width, 0, nlines, delta_c, b_mat, c_mat, u_map,
                                       y_map, bias, a2, h, unused, 0, 0u);
  }
}

template <typename T>
__global__ void convert_kernel(const float* __restrict__ src, T* __restrict__ dst, int64_t n) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    dst[i] = from_f<T>(src[i]);
  }
}

int g_force_path = 0;
int g_tile = 0;    // channels per block; 0: automatic
int g_chunks = 0;  // chunk threads per channel (most lines a direction is cut into); 0: automatic (64)
int g_block_variant = 0;  // block-kernel variant for benchmarks (see launch_block); 0: automatic
char g_last_config[256] = "none";

const char* cuda_error(cudaError_t err, const char* what) {
  static thread_local char message[256];
  std::snprintf(message, sizeof(message), "%s: %s", what, cudaGetErrorString(err));
  return message;
}

// Shared-memory wavefronts of one warp-wide access: lanes' word addresses `words` (n of them, `width` consecutive
// words each: 1 or 4), served in phases of 128 bytes (32 lanes of 1 word, 8 lanes of 4); per phase, the most
// distinct words any bank must deliver.
int smem_wavefronts(const int* words, int n, int width) {
  const int per_phase = 32 / width;
  int total = 0;
  for (int p0 = 0; p0 < n; p0 += per_phase) {
    int bank_words[32][32];
    int bank_count[32] = {};
    int worst = 0;
    for (int l = p0; l < std::min(n, p0 + per_phase); ++l) {
      for (int e = 0; e < width; ++e) {
        const int w = words[l] + e;
        const int b = w & 31;
        bool seen = false;
        for (int i = 0; i < bank_count[b]; ++i) seen = seen || bank_words[b][i] == w;
        if (!seen) bank_words[b][bank_count[b]++] = w;
        worst = std::max(worst, bank_count[b]);
      }
    }
    total += worst;
  }
  return total;
}

// Wavefronts of the block kernel's shared-memory traffic at row stride `stride`, counted by replaying its address
// pattern on the host: the scan's (3 * cpb + 2) accesses per step (dt, u, y of each channel; B, C) for every warp,
// item and direction, and the staging stores of dt, B and C (float4 when rows are whole quads).
long long block_smem_cost(int height, int width, int stride, int items, int threads, int cpb, bool vec4) {
  const int len = height * width;
  long long cost = 0;
  int words[32];
  for (int k = 0; k < 4; ++k) {
    const bool rows = k % 2 == 0, reverse = k >= 2;
    const int line_len = rows ? width : height;
    for (int seg0 = 0; seg0 < len; seg0 += threads * items) {
      for (int w0 = 0; w0 < threads; w0 += 32) {
        for (int j = 0; j < items; ++j) {
          int n = 0;
          for (int t = w0; t < w0 + 32; ++t) {
            const int i = seg0 + t * items + j;
            if (i >= len) continue;
            const int q = reverse ? len - 1 - i : i;
            const int line = q / line_len, along = q - (q / line_len) * line_len;
            words[n++] = (rows ? line : along) * stride + (rows ? along : line);
          }
          if (n > 0) cost += static_cast<long long>(3 * cpb + 2) * smem_wavefronts(words, n, 1);
        }
      }
    }
    if (vec4) {
      const int wq = width / 4;
      for (int q0 = 0; q0 < len / 4; q0 += 32) {
        int n = 0;
        for (int qi = q0; qi < std::min(len / 4, q0 + 32); ++qi) words[n++] = (qi / wq) * stride + 4 * (qi % wq);
        cost += (stride % 4 == 0) ? static_cast<long long>(cpb + 2) * smem_wavefronts(words, n, 4)
                                  : 4LL * (cpb + 2) * smem_wavefronts(words, n, 1);
      }
    }
  }
  return cost;
}

// Row stride of the block kernel's planes: of `base` (the odd stride) and width + 1 .. width + 8, the one with the
// fewest replayed wavefronts (block_smem_cost) among those that keep as many blocks per multiprocessor as `base`.
// Why: with the odd stride 57 at 56 x 56, the column directions' lanes (7 rows apart) met two to a bank and the quad
// staging stores four to a bank (Nsight Compute: 2.8-way loads, 2.2-way stores). Cached per shape.
int block_smem_stride(int height, int width, int base, int items, int threads, int cpb, bool vec4, size_t smem_optin,
                      size_t smem_per_sm) {
  struct Entry {
    int height, width, items, threads, cpb, vec4, stride;
  };
  static std::mutex mutex;
  static std::vector<Entry> cache;
  std::lock_guard<std::mutex> lock(mutex);
  for (const Entry& e : cache) {
    if (e.height == height && e.width == width && e.items == items && e.threads == threads && e.cpb == cpb &&
        e.vec4 == static_cast<int>(vec4)) {
      return e.stride;
    }
  }
  auto blocks_per_sm = [&](int stride) {
    const size_t bytes = block_smem_bytes(height, stride, cpb);
    return bytes > smem_optin ? 0 : smem_per_sm / (bytes + 1024);  // 1 KB a block reserved by the driver
  };
  int best = base;
  long long best_cost = block_smem_cost(height, width, best, items, threads, cpb, vec4);
  for (int stride = width + 1; stride <= width + 8; ++stride) {
    if (stride == base || blocks_per_sm(stride) < blocks_per_sm(base)) continue;
    const long long cost = block_smem_cost(height, width, stride, items, threads, cpb, vec4);
    if (cost < best_cost) {
      best = stride;
      best_cost = cost;
    }
  }
  if (cache.size() < 256) cache.push_back({height, width, items, threads, cpb, static_cast<int>(vec4), best});
  return best;
}

template <typename T, int I, int CPB, int kThreads, int kMinBlocks>
const char* launch_block_variant(Params P, cudaStream_t stream, size_t smem_optin) {
  const int len = P.height * P.width;
  // Enough whole warps for one segment to cover the sequence, at most kThreads (then several segments).
  const int warps = std::min(kThreads / 32, std::max(1, (len + 32 * I - 1) / (32 * I)));
  if ((g_block_variant & 32) == 0) {
    int device = 0, smem_per_sm = 0;
    cudaGetDevice(&device);
    cudaDeviceGetAttribute(&smem_per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device);
    P.wp = block_smem_stride(P.height, P.width, P.wp, I, 32 * warps, CPB, P.vec4 != 0, smem_optin,
                             static_cast<size_t>(smem_per_sm));
  }
  const size_t bytes = block_smem_bytes(P.height, P.wp, CPB);
  auto kernel = scan_block_kernel<T, I, CPB, kThreads, kMinBlocks>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  if (err != cudaSuccess) return cuda_error(err, "cudaFuncSetAttribute");
  const dim3 grid(P.di / CPB, P.batch);
  const dim3 block(32 * warps);
  std::snprintf(g_last_config, sizeof(g_last_config),
                "block N=1 %s items=%d channels=%d vec4=%d stride=%d threads<=%d minblocks=%d grid=%ux%u block=%u "
                "smem=%zu",
                sizeof(T) == 2 ? "f16" : "f32", I, CPB, P.vec4, P.wp, kThreads, kMinBlocks, grid.x, grid.y, block.x,
                bytes);
  kernel<<<grid, block, bytes, stream>>>(P);
  err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cuda_error(err, "selective_scan_2d (block kernel) launch");
}

// The block kernel when it fits (null `*used` otherwise). Two channels a block when d_inner is even and their
// planes fit (default), else one; g_block_variant forces one for benchmarks (1: one channel, three blocks per
// multiprocessor; 2: two channels, two blocks; 4: two channels, registers uncapped; + 8: scalar staging loads;
// + 32: the odd row stride instead of block_smem_stride's).
template <typename T>
const char* launch_block(Params P, cudaStream_t stream, size_t smem_optin, bool* used) {
  P.wp = (P.width % 2 == 0) ? P.width + 1 : P.width;
  const uintptr_t align = 4 * sizeof(T) - 1;
  P.vec4 = (g_block_variant & 8) == 0 && P.width % 4 == 0 && ((reinterpret_cast<uintptr_t>(P.delta) | reinterpret_cast<uintptr_t>(P.B) |
                                 reinterpret_cast<uintptr_t>(P.C)) & align) == 0;
  const bool two_fit = P.di % 2 == 0 && block_smem_bytes(P.height, P.wp, 2) <= smem_optin;
  const bool one_fits = block_smem_bytes(P.height, P.wp, 1) <= smem_optin;
  *used = two_fit || one_fits;
  if (two_fit && (g_block_variant & 7) != 1) {
    if ((g_block_variant & 7) == 4) return launch_block_variant<T, 7, 2, 512, 1>(P, stream, smem_optin);
    return launch_block_variant<T, 7, 2, 448, 2>(P, stream, smem_optin);
  }
  if (one_fits) return launch_block_variant<T, 7, 1, 448, 3>(P, stream, smem_optin);
  return nullptr;
}

// Warp kernel (d_state 1, maps of at most kWarpMaxLen positions, few channels: batch 1 at the later stages). The line
// kernel spends a call of a 14 x 14 or 7 x 7 map at batch 1 (one 32-thread block a channel) on four rounds of loads and
// four barriers, about 9 us on an H100. Here a block is one channel, a warp one direction: lane l owns steps
// [l I, l I + I) of its direction's sequence, loads them in one round (u, delta, B, C at each step's position), scans
// them from a zero state keeping y = keep + q h_in per step (as the line kernel does), joins the lanes' (decay,
// state) pairs with a shuffle scan, and writes its direction's y terms into its own plane of shared memory; after the
// block's one barrier the planes are summed with D u and y is written.
constexpr int kWarpMaxLen = 256;
constexpr int kWarpMaxChannels = 4096;  // batch x d_inner up to which the warp kernel is chosen

// Position of step s of direction k's sequence (0: rows forward, 1: columns forward, 2 and 3 backward).
__device__ __forceinline__ int warp_scan_position(int k, int s, int height, int width) {
  const int len = height * width;
  const int f = k >= 2 ? len - 1 - s : s;
  return (k & 1) ? (f % height) * width + f / height : f;
}

// kPacked (the packed op, P.rank > 0): a step's delta is computed from its position's R dt-rank values of X and the
// channel's R dt weights, in the round of loads, off the recurrence (the line kernel's packed form has it on it).
template <typename T, int I, bool kPacked>
__global__ void __launch_bounds__(128) scan_warps_kernel(Params P) {
  __shared__ float planes[4][kWarpMaxLen];
  const int k = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int c = blockIdx.x, b = blockIdx.y, di = P.di, len = P.height * P.width;
  const int64_t map = (static_cast<int64_t>(b) * di + c) * len;
  const T* u = static_cast<const T*>(P.u) + map;
  // packed: X's dt-rank rows of direction k; else the channel's delta plane
  const T* delta = kPacked ? static_cast<const T*>(P.delta) + b * P.x_bstride + static_cast<int64_t>(k) * P.rank * len
                           : static_cast<const T*>(P.delta) + (static_cast<int64_t>(b) * P.delta_channels + k * di + c) * len;
  const T* Bm = static_cast<const T*>(P.B) + (static_cast<int64_t>(b) * P.bc_channels + k) * len;
  const T* Cm = static_cast<const T*>(P.C) + (static_cast<int64_t>(b) * P.bc_channels + k) * len;
  const float bias = to_f(static_cast<const T*>(P.delta_bias)[k * di + c]);
  const float a2 = -expf(to_f(static_cast<const T*>(P.A_logs)[k * di + c])) * kLog2e;
  const float dsum = k == 0 ? d_sum(static_cast<const T*>(P.D), di, c) : 0.0f;

  int pos[I];
  float uu[I], dt_in[I], b_in[I], c_in[I];
#pragma unroll
  for (int e = 0; e < I; ++e) {
    const int s = lane * I + e;
    pos[e] = s < len ? warp_scan_position(k, s, P.height, P.width) : 0;
    const bool live = s < len;
    uu[e] = live ? to_f(u[pos[e]]) : 0.0f;
    if constexpr (!kPacked) dt_in[e] = live ? to_f(delta[pos[e]]) : 0.0f;
    b_in[e] = live ? to_f(Bm[pos[e]]) : 0.0f;
    c_in[e] = live ? to_f(Cm[pos[e]]) : 0.0f;
  }
  if constexpr (kPacked) {
    const T* w = static_cast<const T*>(P.dt_weight) + (static_cast<int64_t>(k) * di + c) * P.rank;
#pragma unroll
    for (int e = 0; e < I; ++e) dt_in[e] = 0.0f;
#pragma unroll 2
    for (int r = 0; r < P.rank; ++r) {
      const float wr = to_f(__ldg(w + r));
      const T* row = delta + static_cast<int64_t>(r) * len;
#pragma unroll
      for (int e = 0; e < I; ++e) {
        if (lane * I + e < len) dt_in[e] = fmaf(wr, to_f(row[pos[e]]), dt_in[e]);
      }
    }
  }
  float a_run = 1.0f, h_run = 0.0f, keep[I], q[I];
#pragma unroll
  for (int e = 0; e < I; ++e) {
    if (lane * I + e < len) {
      const float dt = softplus_fast(dt_in[e] + bias);
      const float a = ex2(dt * a2);
      h_run = a * h_run + dt * uu[e] * b_in[e];
      a_run *= a;
    }
    keep[e] = c_in[e] * h_run + dsum * uu[e];
    q[e] = c_in[e] * a_run;
  }
  // Inclusive scan of the lanes' (decay, state) maps in sequence order; lanes past the end hold the identity (1, 0).
#pragma unroll
  for (int off = 1; off < 32; off *= 2) {
    const float a_prev = __shfl_up_sync(0xffffffffu, a_run, off);
    const float h_prev = __shfl_up_sync(0xffffffffu, h_run, off);
    if (lane >= off) {
      h_run = a_run * h_prev + h_run;
      a_run *= a_prev;
    }
  }
  float h_in = __shfl_up_sync(0xffffffffu, h_run, 1);
  if (lane == 0) h_in = 0.0f;
#pragma unroll
  for (int e = 0; e < I; ++e) {
    if (lane * I + e < len) planes[k][pos[e]] = keep[e] + q[e] * h_in;
  }
  __syncthreads();
  T* y = static_cast<T*>(P.y) + map;
  for (int p = threadIdx.x; p < len; p += blockDim.x) {
    y[p] = from_f<T>(planes[0][p] + planes[1][p] + planes[2][p] + planes[3][p]);
  }
}

// The warp kernel for maps of at most kWarpMaxLen positions when batch x d_inner is at most kWarpMaxChannels (null
// `*used` otherwise; `force` takes any map that fits).
template <typename T>
const char* launch_warps(const Params& P, cudaStream_t stream, bool force, bool* used) {
  const int len = P.height * P.width;
  *used = len <= kWarpMaxLen && (force || static_cast<int64_t>(P.batch) * P.di <= kWarpMaxChannels);
  if (!*used) return nullptr;
  const int steps = (len + 31) / 32;
  auto kernel = P.rank > 0 ? (steps <= 2   ? scan_warps_kernel<T, 2, true>
                              : steps <= 4 ? scan_warps_kernel<T, 4, true>
                                           : scan_warps_kernel<T, 8, true>)
                           : (steps <= 2   ? scan_warps_kernel<T, 2, false>
                              : steps <= 4 ? scan_warps_kernel<T, 4, false>
                                           : scan_warps_kernel<T, 8, false>);
  const dim3 grid(P.di, P.batch);
  std::snprintf(g_last_config, sizeof(g_last_config), "warps N=1 %s steps=%d rank=%d grid=%ux%u block=128",
                sizeof(T) == 2 ? "f16" : "f32", steps <= 2 ? 2 : steps <= 4 ? 4 : 8, P.rank, grid.x, grid.y);
  kernel<<<grid, 128, 0, stream>>>(P);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cuda_error(err, "selective_scan_2d (warp kernel) launch");
}

// Steps a chunk of the line kernel: 7 or 8, whichever leaves fewer idle steps in the partial chunks at the ends of
// the lines (8 on a tie: its chunks are whole vector loads).
int lines_items(int height, int width) {
  auto slots = [&](int items) {
    return items * std::max(lines_chunks(width, height, items), lines_chunks(height, width, items));
  };
  return slots(7) < slots(8) ? 7 : 8;
}

// The line kernel when the map has at most kLinesMaxThreads chunks a phase (null `*used` otherwise).
// Channels a block: about kLinesAutoThreads threads, fewer while the grid would not give every multiprocessor two
// blocks (batch 1: a block per channel of a stage-1 map).
constexpr int kLinesAutoThreads = 256;
constexpr int kLinesPrefetchMinLen = 2048;
template <typename T>
const char* launch_lines(Params P, cudaStream_t stream, size_t smem_optin, int sms, bool* used) {
  const int items = lines_items(P.height, P.width);
  const int chunks = std::max(lines_chunks(P.width, P.height, items), lines_chunks(P.height, P.width, items));
  *used = false;
  if (chunks > kLinesMaxThreads || lines_smem_bytes(P.height, P.width, items, 1) > smem_optin) return nullptr;
  *used = true;
  int cpb = g_tile > 0 ? g_tile : std::max(1, kLinesAutoThreads / chunks);
  cpb = std::max(1, std::min({cpb, kLinesMaxThreads / chunks, P.di}));
  while (cpb > 1 && (lines_smem_bytes(P.height, P.width, items, cpb) > smem_optin ||
                     (g_tile <= 0 && static_cast<int64_t>(P.batch) * ((P.di + cpb - 1) / cpb) < 2 * sms))) {
    --cpb;
  }
  P.ct = cpb;
  // L2 prefetch of the later planes: float16 maps of stage-1 size only. H100, run 24, 56 x 56, batch 128: float16
  // 0.776 -> 0.729 ms, float32 0.627 -> 0.636 ms; the smaller maps ran 2-46% slower with it in run 24 than without
  // it in run 23. Variant bit 128: never.
  P.prefetch = sizeof(T) == 2 && P.height * P.width >= kLinesPrefetchMinLen && (g_block_variant & 128) == 0;
  const size_t bytes = lines_smem_bytes(P.height, P.width, items, cpb);
  // One batch element: strides between batch elements are never used, so the merged op's inputs read as dense ones.
  const bool strided = P.batch > 1 && (P.delta_channels != 4 * P.di || P.bc_channels != 4);
  auto kernel = P.rank > 0
                    ? (items == 7 ? scan_lines_kernel<T, 7, kPackedInputs> : scan_lines_kernel<T, 8, kPackedInputs>)
                : strided
                    ? (items == 7 ? scan_lines_kernel<T, 7, kStridedInputs> : scan_lines_kernel<T, 8, kStridedInputs>)
                    : (items == 7 ? scan_lines_kernel<T, 7, kDenseInputs> : scan_lines_kernel<T, 8, kDenseInputs>);
  if (bytes > 48 * 1024) {
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
    if (err != cudaSuccess) return cuda_error(err, "cudaFuncSetAttribute");
  }
  const dim3 grid((P.di + cpb - 1) / cpb, P.batch);
  const dim3 block((cpb * chunks + 31) / 32 * 32);
  std::snprintf(g_last_config, sizeof(g_last_config),
                "lines N=1 %s items=%d channels=%d prefetch=%d rank=%d grid=%ux%u block=%u smem=%zu",
                sizeof(T) == 2 ? "f16" : "f32", items, cpb, P.prefetch, P.rank, grid.x, grid.y, block.x, bytes);
  kernel<<<grid, block, bytes, stream>>>(P);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cuda_error(err, "selective_scan_2d (line kernel) launch");
}

template <int N, typename T>
const char* launch_scan(const Params& base, cudaStream_t stream);

// d_state > 1: stage B and C position-major in a scratch buffer on the stream (gather_bc_kernel), scan, free it.
template <int N, typename T>
const char* launch(const Params& base, cudaStream_t stream) {
  if constexpr (N == 1) {
    return launch_scan<N, T>(base, stream);
  } else {
    Params P = base;
    const int64_t planes = static_cast<int64_t>(P.batch) * 4;
    const int64_t positions = planes * P.height * P.width;
    float* bc = nullptr;
    cudaError_t err = cudaMallocAsync(reinterpret_cast<void**>(&bc), positions * 2 * N * sizeof(float), stream);
    if (err != cudaSuccess) return cuda_error(err, "cudaMallocAsync (position-major B and C)");
    gather_bc_kernel<N, T><<<static_cast<unsigned>((positions + 255) / 256), 256, 0, stream>>>(
        static_cast<const T*>(P.B), static_cast<const T*>(P.C), bc, planes, P.height * P.width);
    err = cudaGetLastError();
    const char* result = err == cudaSuccess ? nullptr : cuda_error(err, "selective_scan_2d (B/C staging) launch");
    if (result == nullptr) {
      P.bc = bc;
      result = launch_scan<N, T>(P, stream);
    }
    const cudaError_t free_err = cudaFreeAsync(bc, stream);
    if (result == nullptr && free_err != cudaSuccess) result = cuda_error(free_err, "cudaFreeAsync");
    return result;
  }
}

template <int N, typename T>
const char* launch_scan(const Params& base, cudaStream_t stream) {
  Params P = base;
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return cuda_error(err, "cudaGetDevice");
  int sms = 0, smem_optin = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (sms <= 0) sms = 1;

  // d_state 1: the warp kernel for maps of at most kWarpMaxLen positions at small batch, the line kernel for maps of
  // at most kLinesMaxThreads chunks a phase (up to about 56 x 56), else the block-scan kernel whenever its planes fit
  // in shared memory (maps up to about 100 x 100).
  if constexpr (N == 1) {
    if ((g_force_path == 0 && (g_block_variant & 256) == 0) || g_force_path == 5) {
      bool used = false;
      const char* result = launch_warps<T>(P, stream, g_force_path == 5, &used);
      if (used) return result;
      if (g_force_path == 5) return "the warp kernel takes maps of at most 256 positions";
    }
    if (g_force_path == 0 || g_force_path == 4) {
      bool used = false;
      const char* result = launch_lines<T>(P, stream, static_cast<size_t>(smem_optin), sms, &used);
      if (used) return result;
      if (g_force_path == 4) return "the line kernel takes maps of at most 416 chunks of 7 or 8 steps a line";
    }
    if (g_force_path == 0 || g_force_path == 3) {
      bool used = false;
      const char* result = launch_block<T>(P, stream, static_cast<size_t>(smem_optin), &used);
      if (used) return result;
      if (g_force_path == 3) return "the block kernel's planes do not fit in shared memory for this map size";
    }
  }
  // One chunk per line up to 64 lines (no idle lanes), then 64 chunks of several lines.
  const int lines = std::max(P.height, P.width);
  P.nch = std::min(lines, g_chunks > 0 ? g_chunks : 64);
  P.wp = (P.width % 2 == 0) ? P.width + 1 : P.width;
  auto smem_bytes = [&](int ct) {
    const size_t planes = N == 1 ? 2 : 1;  // y, and u for d_state 1 (scan_smem_kernel)
    return static_cast<size_t>(ct) * (planes * P.height * P.wp + P.nch * (N + 1)) * sizeof(float);
  };
  // More channels per block share B and C through L1 (they are per direction, not per channel), fewer keep more
  // blocks in flight when the batch is small.
  // About 256 threads a block (small maps: many channels a block), at least two blocks per multiprocessor
  // (measured on the H100 at the vanilla tiny stage-1 shape: 4 channels of 56 lines 18% faster than 2).
  int ct = g_tile > 0 ? g_tile : std::max(1, kAutoThreads / P.nch);
  while (ct > 1 && (smem_bytes(ct) > static_cast<size_t>(smem_optin) ||
                    (g_tile <= 0 && static_cast<int64_t>(P.batch) * ((P.di + ct - 1) / ct) < 2 * sms))) {
    ct /= 2;
  }
  // d_state 16: two lanes per (channel, chunk), each with half the states (scan_smem_kernel's kSplit): twice the
  // warps in flight (vanilla tiny stage 1, batch 128, H200: 9.4 -> 8.4 ms fp32). Variant bit 64: one lane.
  const int split = (N % 8 == 0 && (g_block_variant & 64) == 0) ? 2 : 1;
  ct = std::min(ct, std::max(1, (split == 1 ? kMaxThreads : kSplitMaxThreads) / (P.nch * split)));
  const bool fits = smem_bytes(ct) <= static_cast<size_t>(smem_optin);
  const bool use_smem = g_force_path == 1 ? fits : (g_force_path == 2 ? false : fits);

  if (use_smem) {
    P.ct = ct;
    P.channel_major = (g_block_variant & 16) != 0;
    const size_t bytes = smem_bytes(ct);
    auto kernel = scan_smem_kernel<N, T, 1>;
    if constexpr (N % 8 == 0) {
      if (split == 2) kernel = scan_smem_kernel<N, T, 2>;
    }
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
    if (err != cudaSuccess) return cuda_error(err, "cudaFuncSetAttribute");
    const dim3 grid((P.di + ct - 1) / ct, P.batch);
    const dim3 block(ct * P.nch * split);
    std::snprintf(g_last_config, sizeof(g_last_config),
                  "smem N=%d %s ct=%d nch=%d split=%d%s grid=%ux%u block=%u smem=%zu", N,
                  sizeof(T) == 2 ? "f16" : "f32", ct, P.nch, split, P.channel_major ? " channel-major" : "", grid.x,
                  grid.y, block.x, bytes);
    kernel<<<grid, block, bytes, stream>>>(P);
    err = cudaGetLastError();
    return err == cudaSuccess ? nullptr : cuda_error(err, "selective_scan_2d (shared-memory kernel) launch");
  }

  const int64_t items = static_cast<int64_t>(P.batch) * P.di;
  const int64_t total = items * P.height * P.width;
  float* acc = nullptr;
  const bool f32 = sizeof(T) == sizeof(float);
  if (f32) {
    acc = static_cast<float*>(P.y);
  } else {
    err = cudaMallocAsync(reinterpret_cast<void**>(&acc), static_cast<size_t>(total) * sizeof(float), stream);
    if (err != cudaSuccess) return cuda_error(err, "cudaMallocAsync (fallback accumulator)");
  }
  const int threads = 128;
  const unsigned blocks = static_cast<unsigned>((items + threads - 1) / threads);
  std::snprintf(g_last_config, sizeof(g_last_config), "global N=%d %s grid=%u block=%d", N, f32 ? "f32" : "f16",
                blocks, threads);
  scan_global_kernel<N, T><<<blocks, threads, 0, stream>>>(P, acc);
  err = cudaGetLastError();
  if (err == cudaSuccess && !f32) {
    const unsigned cblocks = static_cast<unsigned>(std::min<int64_t>((total + 255) / 256, 65535));
    convert_kernel<T><<<cblocks, 256, 0, stream>>>(acc, static_cast<T*>(P.y), total);
    err = cudaGetLastError();
  }
  if (!f32) {
    const cudaError_t free_err = cudaFreeAsync(acc, stream);
    if (err == cudaSuccess) err = free_err;
  }
  return err == cudaSuccess ? nullptr : cuda_error(err, "selective_scan_2d (fallback kernel) launch");
}

template <typename T>
const char* dispatch_state(const Params& P, int64_t d_state, cudaStream_t stream) {
  switch (d_state) {
    // The two d_state values of every VMamba release (v2: 1, v0: 16); each more costs compile time for 4 archs.
    case 1: return launch<1, T>(P, stream);
    case 16: return launch<16, T>(P, stream);
    default: return "the CUDA kernel supports d_state 1 and 16 only (compiled in: state kept in registers)";
  }
}

// The packed and merged entry points: the warp kernel or the line kernel reading their wide tensors in place, where
// they take the map (d_state 1, maps up to about 56 x 56, no other path forced). `used` false: the caller copies the
// inputs out for another path. Variant bit 512: the packed op's X is never read in place by the line kernel (it is
// unpacked, then the usual dispatch), for A/B timing.
template <typename T>
const char* launch_lines_in_place(const Params& P, int64_t d_state, cudaStream_t stream, bool* used) {
  *used = false;
  if (d_state == 1 && ((g_force_path == 0 && (g_block_variant & 256) == 0) || g_force_path == 5)) {
    const char* result = launch_warps<T>(P, stream, g_force_path == 5, used);
    if (*used) return result;
  }
  if (d_state != 1 || (g_force_path != 0 && g_force_path != 4)) return nullptr;
  if (P.rank > 0 && (g_block_variant & 512) != 0 && g_force_path != 4) return nullptr;
  *used = true;
  int device = 0, sms = 0, smem_optin = 0;
  const cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return cuda_error(err, "cudaGetDevice");
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  const char* result = launch_lines<T>(P, stream, static_cast<size_t>(smem_optin), std::max(sms, 1), used);
  if (!*used && g_force_path == 4) {
    *used = true;
    return "the line kernel takes maps of at most 416 chunks of 7 or 8 steps a line";
  }
  return result;
}

// The packed tensor x (batch, 4R + 8N, len) unpacked into the separate inputs of the other kernels: delta (batch, 4,
// Di, len) = the dt projection of x's dt-rank planes (float32 sums, rounded to T as the unfused graph's MatMul
// rounds them), B and C (batch, 4N, len) copied. One thread an output element, grid-stride.
template <typename T>
__global__ void unpack_projections_kernel(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ delta,
                                          T* __restrict__ b_out, T* __restrict__ c_out, int batch, int di, int n,
                                          int rank, int len) {
  const int64_t n_delta = static_cast<int64_t>(batch) * 4 * di * len;
  const int64_t n_bc = static_cast<int64_t>(batch) * 4 * n * len;
  const int64_t ctot = 4 * static_cast<int64_t>(rank) + 8 * static_cast<int64_t>(n);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n_delta + 2 * n_bc;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (i < n_delta) {
      const int p = static_cast<int>(i % len);
      int64_t q = i / len;
      const int c = static_cast<int>(q % di);
      q /= di;
      const int k = static_cast<int>(q % 4);
      const int64_t b = q / 4;
      const T* xr = x + (b * ctot + static_cast<int64_t>(k) * rank) * len + p;
      const T* wr = w + (static_cast<int64_t>(k) * di + c) * rank;
      float acc = 0.0f;
      for (int r = 0; r < rank; ++r) acc = fmaf(to_f(wr[r]), to_f(xr[static_cast<int64_t>(r) * len]), acc);
      delta[i] = from_f<T>(acc);
    } else {
      int64_t j = i - n_delta;
      const bool is_c = j >= n_bc;
      if (is_c) j -= n_bc;
      const int64_t plane = (j / len) % (4 * n), b = j / (static_cast<int64_t>(len) * 4 * n);
      const int64_t from = (b * ctot + 4 * static_cast<int64_t>(rank) + (is_c ? 4 * n : 0) + plane) * len + j % len;
      (is_c ? c_out : b_out)[j] = x[from];
    }
  }
}

// Packed projections: the line kernel reads x in place when it takes the map (d_state 1, maps up to about 56 x 56);
// otherwise x is unpacked into a stream-ordered scratch buffer (capturable in a CUDA graph) and the unpacked inputs
// go through the usual dispatch.
template <typename T>
const char* launch_packed(const Params& P, int64_t d_state, cudaStream_t stream) {
  bool used = false;
  if (const char* result = launch_lines_in_place<T>(P, d_state, stream, &used); used) return result;
  const int len = P.height * P.width;
  const int64_t n_delta = static_cast<int64_t>(P.batch) * 4 * P.di * len;
  const int64_t n_bc = static_cast<int64_t>(P.batch) * 4 * d_state * len;
  T* scratch = nullptr;
  cudaError_t err = cudaMallocAsync(reinterpret_cast<void**>(&scratch), (n_delta + 2 * n_bc) * sizeof(T), stream);
  if (err != cudaSuccess) return cuda_error(err, "cudaMallocAsync (unpacked projections)");
  Params U = P;
  U.delta = scratch;
  U.B = scratch + n_delta;
  U.C = scratch + n_delta + n_bc;
  U.bc_channels = 4 * static_cast<int>(d_state);
  U.delta_channels = 4 * P.di;
  U.dt_weight = nullptr;
  U.rank = 0;
  U.x_bstride = 0;
  const int64_t total = n_delta + 2 * n_bc;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((total + 255) / 256, 8192));
  unpack_projections_kernel<T><<<blocks, 256, 0, stream>>>(
      static_cast<const T*>(P.delta), static_cast<const T*>(P.dt_weight), scratch, scratch + n_delta,
      scratch + n_delta + n_bc, P.batch, P.di, static_cast<int>(d_state), P.rank, len);
  err = cudaGetLastError();
  const char* result = err == cudaSuccess ? dispatch_state<T>(U, d_state, stream)
                                          : cuda_error(err, "selective_scan_2d (unpack projections) launch");
  const cudaError_t free_err = cudaFreeAsync(scratch, stream);
  if (result == nullptr && free_err != cudaSuccess) result = cuda_error(free_err, "cudaFreeAsync");
  return result;
}

// Merged projections (vmamba_selective_scan_2d_merged_cuda): delta and B, C are channel blocks of wider tensors, at
// P.delta_channels and P.bc_channels planes a batch element. The line kernel reads them in place; the other kernels
// assume dense (batch, 4, ...) tensors, so with more than one batch element the blocks are first copied into a
// stream-ordered scratch buffer (2-D copies, which a CUDA graph captures as memcpy nodes).
template <typename T>
const char* launch_merged(const Params& P, int64_t d_state, cudaStream_t stream) {
  bool used = false;
  if (const char* result = launch_lines_in_place<T>(P, d_state, stream, &used); used) return result;
  if (P.batch == 1) return dispatch_state<T>(P, d_state, stream);  // one batch element: the strides are never used
  const int64_t len = static_cast<int64_t>(P.height) * P.width;
  const int64_t delta_plane = 4 * static_cast<int64_t>(P.di) * len, bc_plane = 4 * d_state * len;
  T* scratch = nullptr;
  const size_t bytes = static_cast<size_t>(P.batch) * (delta_plane + 2 * bc_plane) * sizeof(T);
  cudaError_t err = cudaMallocAsync(reinterpret_cast<void**>(&scratch), bytes, stream);
  if (err != cudaSuccess) return cuda_error(err, "cudaMallocAsync (merged projections)");
  Params U = P;
  U.delta = scratch;
  U.B = scratch + P.batch * delta_plane;
  U.C = scratch + P.batch * (delta_plane + bc_plane);
  U.delta_channels = 4 * P.di;
  U.bc_channels = 4 * static_cast<int>(d_state);
  const struct {
    void* to;
    const void* from;
    int64_t width, pitch;
  } copies[] = {{scratch, P.delta, delta_plane, P.delta_channels * len},
                {const_cast<void*>(U.B), P.B, bc_plane, P.bc_channels * len},
                {const_cast<void*>(U.C), P.C, bc_plane, P.bc_channels * len}};
  for (const auto& c : copies) {
    if (err == cudaSuccess) {
      err = cudaMemcpy2DAsync(c.to, c.width * sizeof(T), c.from, c.pitch * sizeof(T), c.width * sizeof(T), P.batch,
                              cudaMemcpyDeviceToDevice, stream);
    }
  }
  const char* result = err == cudaSuccess ? dispatch_state<T>(U, d_state, stream)
                                          : cuda_error(err, "cudaMemcpy2DAsync (merged projections)");
  const cudaError_t free_err = cudaFreeAsync(scratch, stream);
  if (result == nullptr && free_err != cudaSuccess) result = cuda_error(free_err, "cudaFreeAsync");
  return result;
}

// The size checks and Params both entry points share (pointers are checked by the callers once sizes are known to be
// non-empty: an empty tensor may come with a null pointer).
const char* common_params(Params& P, const void* u, const void* A_logs, const void* D, const void* delta_bias, void* y,
                          int64_t batch, int64_t d_inner, int64_t d_state, int64_t height, int64_t width) {
  if (batch < 0 || d_inner < 0 || height < 0 || width < 0) return "batch, d_inner, height and width must be >= 0";
  if (d_state < 1) return "d_state must be >= 1";
  if (batch > 65535) return "batch must be <= 65535 for the CUDA kernel";
  // Flat indices inside one plane are 32-bit; planes are offset in 64-bit.
  if (height * width > (int64_t{1} << 30) || d_inner > (int64_t{1} << 24) || d_state * height * width > (int64_t{1} << 30)) {
    return "tensor too large for the CUDA kernel";
  }
  P = Params{};
  P.u = u;
  P.A_logs = A_logs;
  P.D = D;
  P.delta_bias = delta_bias;
  P.y = y;
  P.batch = static_cast<int>(batch);
  P.di = static_cast<int>(d_inner);
  P.height = static_cast<int>(height);
  P.width = static_cast<int>(width);
  return nullptr;
}

}  // namespace

extern "C" const char* vmamba_selective_scan_2d_cuda(int dtype, const void* u, const void* delta, const void* A_logs,
                                                     const void* B, const void* C, const void* D,
                                                     const void* delta_bias, void* y, int64_t batch, int64_t d_inner,
                                                     int64_t d_state, int64_t height, int64_t width, void* stream) {
  Params P;
  if (const char* bad = common_params(P, u, A_logs, D, delta_bias, y, batch, d_inner, d_state, height, width)) {
    return bad;
  }
  if (batch == 0 || d_inner == 0 || height == 0 || width == 0) return nullptr;  // empty y
  if (!u || !delta || !A_logs || !B || !C || !D || !delta_bias || !y) return "null tensor pointer";
  P.delta = delta;
  P.B = B;
  P.C = C;
  P.bc_channels = static_cast<int>(4 * d_state);
  P.delta_channels = static_cast<int>(4 * d_inner);
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case VMAMBA_SCAN_F32: return dispatch_state<float>(P, d_state, s);
    case VMAMBA_SCAN_F16: return dispatch_state<__half>(P, d_state, s);
    default: return "dtype must be 0 (float32) or 1 (float16)";
  }
}

extern "C" const char* vmamba_selective_scan_2d_packed_cuda(int dtype, const void* u, const void* x,
                                                            const void* dt_weight, const void* A_logs, const void* D,
                                                            const void* delta_bias, void* y, int64_t batch,
                                                            int64_t d_inner, int64_t d_state, int64_t rank,
                                                            int64_t height, int64_t width, void* stream) {
  Params P;
  if (const char* bad = common_params(P, u, A_logs, D, delta_bias, y, batch, d_inner, d_state, height, width)) {
    return bad;
  }
  if (rank < 1 || rank > 4096) return "rank (dt_rank) must be in 1..4096";
  if (batch == 0 || d_inner == 0 || height == 0 || width == 0) return nullptr;  // empty y
  if (!u || !x || !dt_weight || !A_logs || !D || !delta_bias || !y) return "null tensor pointer";
  const int64_t len = height * width;
  const size_t elem = dtype == VMAMBA_SCAN_F16 ? 2 : 4;
  const char* base = static_cast<const char*>(x);
  P.delta = x;
  P.B = base + 4 * rank * len * elem;
  P.C = base + (4 * rank + 4 * d_state) * len * elem;
  P.dt_weight = dt_weight;
  P.rank = static_cast<int>(rank);
  P.x_bstride = (4 * rank + 8 * d_state) * len;
  P.bc_channels = static_cast<int>(4 * rank + 8 * d_state);
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case VMAMBA_SCAN_F32: return launch_packed<float>(P, d_state, s);
    case VMAMBA_SCAN_F16: return launch_packed<__half>(P, d_state, s);
    default: return "dtype must be 0 (float32) or 1 (float16)";
  }
}

extern "C" const char* vmamba_selective_scan_2d_merged_cuda(int dtype, const void* u, const void* delta,
                                                            int64_t delta_channels, const void* x, int64_t x_channels,
                                                            const void* A_logs, const void* D, const void* delta_bias,
                                                            void* y, int64_t batch, int64_t d_inner, int64_t d_state,
                                                            int64_t height, int64_t width, void* stream) {
  Params P;
  if (const char* bad = common_params(P, u, A_logs, D, delta_bias, y, batch, d_inner, d_state, height, width)) {
    return bad;
  }
  if (delta_channels < 4 * d_inner) return "delta must have at least 4 * d_inner channels";
  if (x_channels < 8 * d_state) return "x must have at least 8 * d_state channels (B and C last)";
  if (batch == 0 || d_inner == 0 || height == 0 || width == 0) return nullptr;  // empty y
  if (!u || !delta || !x || !A_logs || !D || !delta_bias || !y) return "null tensor pointer";
  const int64_t len = height * width;
  const size_t elem = dtype == VMAMBA_SCAN_F16 ? 2 : 4;
  const char* base = static_cast<const char*>(x);
  P.delta = delta;
  P.delta_channels = static_cast<int>(delta_channels);
  P.B = base + (x_channels - 8 * d_state) * len * elem;
  P.C = base + (x_channels - 4 * d_state) * len * elem;
  P.bc_channels = static_cast<int>(x_channels);
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case VMAMBA_SCAN_F32: return launch_merged<float>(P, d_state, s);
    case VMAMBA_SCAN_F16: return launch_merged<__half>(P, d_state, s);
    default: return "dtype must be 0 (float32) or 1 (float16)";
  }
}

extern "C" void vmamba_selective_scan_2d_cuda_force_path(int path) { g_force_path = path; }

extern "C" void vmamba_selective_scan_2d_cuda_set_tuning(int channels_per_block, int chunk_threads) {
  g_tile = channels_per_block;
  g_chunks = chunk_threads;
}

extern "C" void vmamba_selective_scan_2d_cuda_set_block_variant(int variant) { g_block_variant = variant; }

extern "C" const char* vmamba_selective_scan_2d_cuda_last_config(void) { return g_last_config; }
