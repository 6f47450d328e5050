// Depthwise 3 x 3 convolution + SiLU, channels-last in, channel-first out (contract and why: depthwise_conv.cuh).
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "depthwise_conv.cuh"
#include "float_convert.cuh"

namespace {

using vmamba_cuda_detail::from_f;
using vmamba_cuda_detail::to_f;

constexpr int kTileW = 32;         // output columns a block computes (a warp's lanes)
constexpr int kTileC = 32;         // channels a block computes
constexpr int kThreads = 256;      // 8 warps, kTileC / 8 channels each
constexpr int kHaloW = kTileW + 2;  // input columns staged: the tile and one each side
constexpr int kPairs = kTileC / 2;  // channel pairs of a staged pixel: loads take two channels at once

template <typename T>
struct alignas(2 * sizeof(T)) Pair {
  T v[2];
};

// Block (column tile, row tile, batch * channel tile), `TileH` output rows. Stages input rows h0-1..h0+TileH,
// columns w0-1..w0+kTileW, channels c0..c0+kTileC of x as [row][column][channel + 1 pad] (reads of channel pairs,
// the contiguous axis), and the tile's weights; every load is issued before the first store, so a block waits for
// memory once. Each warp then computes kTileC / 8 channels, lane = output column, sliding a 3 x 3 window down the
// TileH rows; stores run along w, y's contiguous axis. TileH 4 reads each input row 1.5 times instead of 3 (large
// batches); TileH 1 gives four times the blocks and a quarter of the serial work each (batch 1, where latency counts).
template <typename T, int TileH>
__global__ void __launch_bounds__(kThreads, sizeof(T) == 2 ? 3 : 2)
    depthwise_conv_silu_kernel(const T* __restrict__ x, const T* __restrict__ weight, const T* __restrict__ bias,
                               T* __restrict__ y, int height, int width, int channels, int channel_tiles) {
  constexpr int kHaloH = TileH + 2;
  constexpr int kStageLoads = (kHaloH * kHaloW * kPairs + kThreads - 1) / kThreads;
  __shared__ float tile[kHaloH][kHaloW][kTileC + 1];
  __shared__ float taps[kTileC][9];
  const int w0 = blockIdx.x * kTileW, h0 = blockIdx.y * TileH;
  const int b = blockIdx.z / channel_tiles, c0 = (blockIdx.z % channel_tiles) * kTileC;
  const T* src = x + static_cast<int64_t>(b) * height * width * channels;
  Pair<T> staged[kStageLoads];
#pragma unroll
  for (int k = 0; k < kStageLoads; ++k) {
    const int i = threadIdx.x + k * kThreads;
    const int pair = i % kPairs, col = (i / kPairs) % kHaloW, r = i / (kPairs * kHaloW);
    const int hh = h0 + r - 1, ww = w0 + col - 1, c = c0 + 2 * pair;
    const bool inside = r < kHaloH && hh >= 0 && hh < height && ww >= 0 && ww < width && c < channels;
    staged[k].v[0] = staged[k].v[1] = from_f<T>(0.0f);
    const int64_t at = (static_cast<int64_t>(hh) * width + ww) * channels + c;
    if (inside) staged[k] = *reinterpret_cast<const Pair<T>*>(src + at);
  }
  float tap[2];
#pragma unroll
  for (int k = 0; k < 2; ++k) {
    const int i = threadIdx.x + k * kThreads;  // 288 taps: threads 0..31 take a second one
    tap[k] = i < kTileC * 9 && c0 + i / 9 < channels ? to_f(weight[static_cast<int64_t>(c0) * 9 + i]) : 0.0f;
  }
#pragma unroll
  for (int k = 0; k < kStageLoads; ++k) {
    const int i = threadIdx.x + k * kThreads;
    const int pair = i % kPairs, col = (i / kPairs) % kHaloW, r = i / (kPairs * kHaloW);
    if (r < kHaloH) {
      tile[r][col][2 * pair] = to_f(staged[k].v[0]);
      tile[r][col][2 * pair + 1] = to_f(staged[k].v[1]);
    }
  }
#pragma unroll
  for (int k = 0; k < 2; ++k) {
    const int i = threadIdx.x + k * kThreads;
    if (i < kTileC * 9) taps[i / 9][i % 9] = tap[k];
  }
  __syncthreads();
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int w = w0 + lane;
  if (w >= width) return;
  constexpr int kPerWarp = kTileC / (kThreads / 32);
#pragma unroll
  for (int k = 0; k < kPerWarp; ++k) {
    const int c = warp * kPerWarp + k;
    if (c0 + c >= channels) return;
    const float b0 = bias != nullptr ? to_f(bias[c0 + c]) : 0.0f;
    float window[3][3];  // rows t..t+2 of the staged input, columns lane..lane+2
#pragma unroll
    for (int i = 0; i < 2; ++i) {
#pragma unroll
      for (int j = 0; j < 3; ++j) window[i][j] = tile[i][lane + j][c];
    }
    T* out = y + ((static_cast<int64_t>(b) * channels + c0 + c) * height + h0) * width + w;
#pragma unroll
    for (int t = 0; t < TileH; ++t) {
#pragma unroll
      for (int j = 0; j < 3; ++j) window[2][j] = tile[t + 2][lane + j][c];
      float acc = b0;
#pragma unroll
      for (int i = 0; i < 3; ++i) {
#pragma unroll
        for (int j = 0; j < 3; ++j) acc = fmaf(taps[c][i * 3 + j], window[i][j], acc);
      }
      if (h0 + t < height) out[static_cast<int64_t>(t) * width] = from_f<T>(acc * __frcp_rn(1.0f + __expf(-acc)));
#pragma unroll
      for (int j = 0; j < 3; ++j) {
        window[0][j] = window[1][j];
        window[1][j] = window[2][j];
      }
    }
  }
}

// Blocks of 4 output rows when that still gives this many blocks or more, else blocks of one row.
constexpr int64_t kTallTileMinBlocks = 1024;

template <typename T, int TileH>
cudaError_t launch_rows(const void* x, const void* weight, const void* bias, void* y, int64_t batch, int height,
                        int width, int channels, cudaStream_t stream) {
  const int channel_tiles = (channels + kTileC - 1) / kTileC;
  const dim3 grid(static_cast<unsigned>((width + kTileW - 1) / kTileW),
                  static_cast<unsigned>((height + TileH - 1) / TileH), static_cast<unsigned>(batch * channel_tiles));
  depthwise_conv_silu_kernel<T, TileH><<<grid, kThreads, 0, stream>>>(
      static_cast<const T*>(x), static_cast<const T*>(weight), static_cast<const T*>(bias), static_cast<T*>(y), height,
      width, channels, channel_tiles);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch(const void* x, const void* weight, const void* bias, void* y, int64_t batch, int height, int width,
                   int channels, cudaStream_t stream) {
  const int64_t tall_blocks = ((width + kTileW - 1) / kTileW) * static_cast<int64_t>((height + 3) / 4) * batch *
                              ((channels + kTileC - 1) / kTileC);
  if (tall_blocks >= kTallTileMinBlocks) {
    return launch_rows<T, 4>(x, weight, bias, y, batch, height, width, channels, stream);
  }
  return launch_rows<T, 1>(x, weight, bias, y, batch, height, width, channels, stream);
}

}  // namespace

extern "C" const char* vmamba_depthwise_conv_silu_cuda(int dtype, const void* x, const void* weight, const void* bias,
                                                       void* y, int64_t batch, int64_t height, int64_t width,
                                                       int64_t channels, void* stream) {
  if (batch < 0 || height < 0 || width < 0 || channels < 0) return "negative dimension";
  if (channels % 2 != 0) return "the channel count must be even (the kernel reads channel pairs)";
  if (height > 65535) return "height must be at most 65535";
  if (width > (int64_t{1} << 30) || channels > (int64_t{1} << 20)) return "width or channel count too large";
  const int64_t tiles = batch * ((channels + kTileC - 1) / kTileC);
  if (tiles > 65535) return "batch x ceil(channels / 32) must be at most 65535";
  if (batch == 0 || height == 0 || width == 0 || channels == 0) return nullptr;
  auto s = static_cast<cudaStream_t>(stream);
  const int h = static_cast<int>(height), w = static_cast<int>(width), c = static_cast<int>(channels);
  cudaError_t err;
  if (dtype == 1) {
    err = launch<__half>(x, weight, bias, y, batch, h, w, c, s);
  } else if (dtype == 0) {
    err = launch<float>(x, weight, bias, y, batch, h, w, c, s);
  } else {
    return "dtype must be 0 (float32) or 1 (float16)";
  }
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}
