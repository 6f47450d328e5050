// CPU kernel of `ai.vmamba::BilinearResize`: bilinear resizing of the planes of an NCHW map, as ONNX Resize computes
// it with mode "linear", coordinate_transformation_mode "half_pixel", no antialias (torch's F.interpolate(...,
// mode="bilinear", align_corners=False), mmseg's `resize` at inference):
//
//   source coordinate s = (d + 0.5) * in / out - 0.5, clamped to [0, in - 1];
//   lo = floor(s), hi = min(lo + 1, in - 1), weight of hi = s - lo
//
// per axis, the two axes applied one after the other (rows first, into a small buffer; then each output row is a
// blend of two buffered rows). It exists for a segmenter's last node, the class logits upsampled 4x to the input
// size: ONNX Runtime runs that Resize in its blocked NCHWc layout and then converts the full-size result back to
// NCHW, two passes over the largest tensor of the model; this writes it once, in the output's own layout.
// Memory bound, so it is header-only and compiled at the library's baseline instruction set (no ISA variants).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <new>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "parallel_for.h"

namespace vmamba {

struct ResizeShape {
  int64_t planes;  // N * C
  int64_t in_h, in_w, out_h, out_w;
};

// nullptr when the kernel accepts the shape, otherwise a static message saying why not.
inline const char* check_resize_shape(const ResizeShape& s) {
  if (s.planes < 0 || s.in_h < 1 || s.in_w < 1 || s.out_h < 0 || s.out_w < 0) {
    return "input height and width must be >= 1 and the output sizes >= 0";
  }
  constexpr int64_t kMaxSide = int64_t{1} << 24;  // a sanity bound: positions and indices stay exact in double
  if (s.in_h > kMaxSide || s.in_w > kMaxSide || s.out_h > kMaxSide || s.out_w > kMaxSide) {
    return "height and width must be <= 2^24";
  }
  return nullptr;
}

namespace resize_detail {

// The two source indices and the weight of the second for every output position of one axis.
struct Taps {
  std::vector<int64_t> lo, hi;
  std::vector<float> weight;
};

inline Taps half_pixel_taps(int64_t in, int64_t out) {
  Taps taps;
  taps.lo.resize(out);
  taps.hi.resize(out);
  taps.weight.resize(out);
  // The coordinate in double, from in / out: exact for the 2^k ratios of a segmenter, and for others closer than
  // ONNX Runtime's float coordinate (at 40 -> 121 pixels its positions are off by up to 4e-6 pixels).
  const double step = static_cast<double>(in) / static_cast<double>(out);
  for (int64_t d = 0; d < out; ++d) {
    double s = (static_cast<double>(d) + 0.5) * step - 0.5;
    s = std::min(std::max(s, 0.0), static_cast<double>(in - 1));
    const int64_t lo = std::min(static_cast<int64_t>(s), in - 1);
    taps.lo[d] = lo;
    taps.hi[d] = std::min(lo + 1, in - 1);
    taps.weight[d] = static_cast<float>(s - static_cast<double>(lo));
  }
  return taps;
}

struct Job {
  const float* x;
  float* y;
  ResizeShape shape;
  int64_t row_blocks;  // output rows of one plane are split into this many items
  const Taps* rows;
  const Taps* cols;
  std::atomic<bool> out_of_memory{false};  // an item's row buffer could not be allocated (no exception leaves a pool)
};

inline void resize_rows(const Job& job, int64_t item) {
  const ResizeShape& s = job.shape;
  const int64_t plane = item / job.row_blocks, block = item % job.row_blocks;
  const int64_t per_block = (s.out_h + job.row_blocks - 1) / job.row_blocks;
  const int64_t r0 = block * per_block, r1 = std::min(s.out_h, r0 + per_block);
  if (r0 >= r1) return;
  const float* x = job.x + plane * s.in_h * s.in_w;
  float* y = job.y + plane * s.out_h * s.out_w;
  const Taps& rows = *job.rows;
  const Taps& cols = *job.cols;
  const int64_t first = rows.lo[r0], last = rows.hi[r1 - 1];  // the input rows these output rows read
  const int64_t width = s.out_w;
  // The input rows resized along the width, once each.
  std::vector<float> buffer(static_cast<size_t>((last - first + 1) * width));
  for (int64_t r = first; r <= last; ++r) {
    const float* src = x + r * s.in_w;
    float* dst = buffer.data() + (r - first) * width;
    for (int64_t c = 0; c < width; ++c) {
      const float a = src[cols.lo[c]], b = src[cols.hi[c]];
      dst[c] = a + cols.weight[c] * (b - a);
    }
  }
  for (int64_t r = r0; r < r1; ++r) {
    const float* a = buffer.data() + (rows.lo[r] - first) * width;
    const float* b = buffer.data() + (rows.hi[r] - first) * width;
    const float w = rows.weight[r];
    float* out = y + r * width;
    int64_t c = 0;
#if defined(__SSE2__)
    // Streaming stores: the output is written once and read by nobody here, so it need not be fetched into the
    // cache first (the read for ownership would double the traffic of the largest tensor).
    if (reinterpret_cast<uintptr_t>(out) % 16 == 0) {
      const __m128 wv = _mm_set1_ps(w);
      for (; c + 4 <= width; c += 4) {
        const __m128 av = _mm_loadu_ps(a + c), bv = _mm_loadu_ps(b + c);
        _mm_stream_ps(out + c, _mm_add_ps(av, _mm_mul_ps(wv, _mm_sub_ps(bv, av))));
      }
    }
#endif
    for (; c < width; ++c) out[c] = a[c] + w * (b[c] - a[c]);
  }
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

inline void run_item(void* arg, int64_t item) {
  auto& job = *static_cast<Job*>(arg);
  try {
    resize_rows(job, item);
  } catch (const std::bad_alloc&) {
    job.out_of_memory = true;
  }
}

}  // namespace resize_detail

// y (planes, out_h, out_w) from x (planes, in_h, in_w), both dense. Returns nullptr on success, otherwise a static
// error message. `parallel_for` may be null (runs serially on the calling thread).
inline const char* bilinear_resize_f32(const float* x, float* y, const ResizeShape& shape, ParallelFor parallel_for,
                                       void* parallel_ctx) {
  if (const char* err = check_resize_shape(shape)) return err;
  if (shape.planes == 0 || shape.out_h == 0 || shape.out_w == 0) return nullptr;
  const resize_detail::Taps rows = resize_detail::half_pixel_taps(shape.in_h, shape.out_h);
  const resize_detail::Taps cols = resize_detail::half_pixel_taps(shape.in_w, shape.out_w);
  // Enough items to keep a pool busy when there are few planes (a batch-1 map of few classes).
  constexpr int64_t kMinItems = 64;
  const int64_t per_plane = std::max<int64_t>(1, kMinItems / std::max<int64_t>(1, shape.planes));
  const int64_t row_blocks = std::min(shape.out_h, per_plane);
  resize_detail::Job job{x, y, shape, row_blocks, &rows, &cols};
  const int64_t items = shape.planes * row_blocks;
  if (parallel_for == nullptr) {
    for (int64_t i = 0; i < items; ++i) resize_detail::run_item(&job, i);
  } else {
    parallel_for(parallel_ctx, items, resize_detail::run_item, &job);
  }
  return job.out_of_memory ? "out of memory for a row buffer" : nullptr;
}

}  // namespace vmamba
