// Register-tiled CUDA kernels of the depthwise convolution for the kernel sizes and strides the
// search spaces use (K ∈ {3, 5, 7}, stride ∈ {1, 2}); elastic_dwconv.cu keeps the per-element
// kernels for every other (k, stride) and for float64.
//
// Why tiles: the per-element kernels read k² inputs from global memory per output, and the old
// grad-filter kernel (one block per (channel, tap)) re-read all of dy and x k² times, with loads
// strided by C in channels_last. Here each thread owns one (channel, output column) and a strip of
// output rows: it keeps the K×K filter (or, for the filter gradient, its K×K accumulators) in
// registers and reads each input row of its strip once, K values wide, so one input row serves up
// to K outputs of the strip. Neighbouring threads of a warp own neighbouring addresses: consecutive
// channels in channels_last, consecutive columns in NCHW (`TileShape`), so every load is coalesced in
// both layouts. The overlap between neighbouring threads' windows is served by L1.
//
// channels_last with ≥ 24 channels (what training on CUDA uses) goes one step further: the forward,
// both input gradients and the filter gradient copy a block's input window into shared memory
// first (`SharedTile`: 16 bytes of channels per load where the layout allows; `forward_nhwc_kernel`,
// `grad_input_stride2_nhwc_kernel`, `grad_filter_nhwc_kernel`), and each thread then reads its rows
// there at compile-time offsets, for a 4 × 8 (2 × 4 at stride 2) block of outputs at once.
//
// Filter gradient: no atomics. Each block reduces its threads' K×K sums over the columns it covers
// (shared memory, one filter row at a time) and writes one partial per (block, channel, tap); the
// host sums the partials (a deterministic reduction over a small buffer).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#ifndef TOFA_FAST_CUDA_EMULATION
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#endif
// TOFA_FAST_CUDA_EMULATION: the same source compiled by a host compiler, each CUDA thread an OS
// thread (tests/cuda_emulation/cuda_emulation.h, included first), so that the kernels' indexing,
// tiling and block reductions are tested on machines without a GPU.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "elastic_dwconv_tiled.h"

#ifndef TOFA_FAST_CUDA_EMULATION
// The launch's dynamic shared memory (the emulation gives each emulated block its own buffer).
extern __shared__ __align__(16) unsigned char tofa_fast_tiled_dynamic_shared[];
#define TOFA_FAST_DYNAMIC_SHARED tofa_fast_tiled_dynamic_shared
#endif

namespace tofa_fast {
namespace tiled {

constexpr int kThreads = 128;
constexpr int kForwardRows = 4;  // output rows per thread, forward and grad input
constexpr int kFilterRows = 8;   // output rows per thread per step, filter gradient

// A block is kThreads threads = `channels` × `columns`. channels_last: lanes walk channels (the
// contiguous axis), up to 32; NCHW: lanes walk output columns, up to 32. Small extents take fewer
// lanes so that a 7-wide map or a 16-channel layer does not leave most of a warp idle.
struct TileShape {
  int channels, columns;
  bool channels_last;

  static int pow2_at_most_32(int64_t extent) {
    int p = 1;
    while (p < 32 && p < extent) p *= 2;
    return p;
  }
  static TileShape of(int64_t channels, int64_t out_width, bool channels_last) {
    if (channels_last) {
      const int c = pow2_at_most_32(channels);
      return {c, kThreads / c, true};
    }
    const int w = pow2_at_most_32(out_width);
    return {kThreads / w, w, false};
  }
  __device__ __forceinline__ int channel_of(int thread) const {
    return channels_last ? thread % channels : thread / columns;
  }
  __device__ __forceinline__ int column_of(int thread) const {
    return channels_last ? thread / channels : thread % columns;
  }
  __device__ __forceinline__ int thread_of(int channel, int column) const {
    return channels_last ? column * channels + channel : channel * columns + column;
  }
  int64_t channel_tiles(int64_t c) const { return (c + channels - 1) / channels; }
  int64_t column_tiles(int64_t w) const { return (w + columns - 1) / columns; }
};

// Sizes of one launch: input (h, w) and output (oh, ow). In-image sizes and offsets are 32-bit (the
// host checks they fit: `fits_int32`), which halves the index arithmetic of every load.
struct Extents {
  int64_t n, c;
  int h, w, oh, ow;
};

// Element strides: between images and channels 64-bit, within an image 32-bit.
struct Strides {
  int64_t n, c;
  int h, w;
};

// Block → (channel tile, column tile); blockIdx.x = channel tile × column tiles + column tile.
__device__ __forceinline__ void block_origin(const TileShape& tile, int out_width, int64_t& c0, int& w0) {
  const int column_tiles = (out_width + tile.columns - 1) / tile.columns;
  c0 = int64_t(blockIdx.x / column_tiles) * tile.channels;
  w0 = (blockIdx.x % column_tiles) * tile.columns;
}

// 16 bytes: the unit of the vectorised loads and stores (LDG.128 / STS.128).
struct alignas(16) Bytes16 {
  unsigned int word[4];
};

__device__ __forceinline__ bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// The 16 / sizeof(scalar_t) values packed in `raw`, converted.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void unpack(const Bytes16& raw, acc_t (&out)[sizeof(Bytes16) / sizeof(scalar_t)]) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16> && std::is_same_v<acc_t, float>) {
    // bfloat16 is the upper half of a float: one shift or mask per value (the generic conversion
    // takes a byte permute and a shift).
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const unsigned int low = raw.word[k] << 16, high = raw.word[k] & 0xffff0000u;
      memcpy(&out[2 * k], &low, sizeof(float));
      memcpy(&out[2 * k + 1], &high, sizeof(float));
    }
  } else {
    constexpr int N = sizeof(Bytes16) / sizeof(scalar_t);
    scalar_t values[N];
    memcpy(values, &raw, sizeof(raw));
#pragma unroll
    for (int v = 0; v < N; ++v) out[v] = static_cast<acc_t>(values[v]);
  }
}

// The block's filters, [tile.channels][K·K], staged in shared memory: one coalesced read of
// the contiguous [C, K·K] rows instead of K·K loads per thread strided by K·K across a warp's
// channels (channels_last). K·K is odd, so a warp reading one tap of 32 channels hits 32 banks.
// staged: where (16-byte aligned); the launch's dynamic shared memory unless given.
template <typename acc_t, int K>
__device__ __forceinline__ acc_t* stage_filters(const acc_t* __restrict__ filters, int64_t c0, int64_t channels,
                                                const TileShape& tile, acc_t* staged = nullptr) {
  if (staged == nullptr) staged = reinterpret_cast<acc_t*>(TOFA_FAST_DYNAMIC_SHARED);
  const int count = int(c0 + tile.channels <= channels ? tile.channels : channels - c0) * K * K;
  const acc_t* source = filters + c0 * K * K;
  int first_scalar = 0;
  if (aligned16(source)) {  // the usual case (c0 a multiple of 32): 16 bytes a load, a few per thread
    constexpr int PER = sizeof(Bytes16) / sizeof(acc_t);
    const int packs = count / PER;
    for (int e = threadIdx.x; e < packs; e += kThreads)
      reinterpret_cast<Bytes16*>(staged)[e] = reinterpret_cast<const Bytes16*>(source)[e];
    first_scalar = packs * PER;
  }
  for (int e = first_scalar + threadIdx.x; e < count; e += kThreads) staged[e] = source[e];
  __syncthreads();
  return staged;
}

template <typename acc_t, int K>
size_t staged_filter_bytes(const TileShape& tile) {
  return size_t(tile.channels) * K * K * sizeof(acc_t);
}

// f = this lane's K×K filter out of the block's staged filters, rotated by 180° with FLIP.
template <bool FLIP, int K, typename acc_t>
__device__ __forceinline__ void load_filter(const acc_t* staged, int lane, acc_t (&f)[K * K]) {
#pragma unroll
  for (int t = 0; t < K * K; ++t) f[t] = staged[lane * K * K + (FLIP ? K * K - 1 - t : t)];
}

// A thread of the register-tiled kernels: its block's first channel, its own channel and output
// column (`TileShape`), and the block's staged filters (so every thread of the block constructs one).
template <typename acc_t, int K>
struct StripThread {
  int64_t c0, c;
  int lane_c, column;
  const acc_t* staged;

  __device__ __forceinline__ StripThread(const acc_t* __restrict__ filters, int out_width, int64_t channels,
                                         const TileShape& tile) {
    int w0;
    block_origin(tile, out_width, c0, w0);
    staged = stage_filters<acc_t, K>(filters, c0, channels, tile);
    lane_c = tile.channel_of(threadIdx.x);
    c = c0 + lane_c;
    column = w0 + tile.column_of(threadIdx.x);
  }
};

// A thread's K input columns, fixed for its whole strip: the offset of each within a row and whether
// it lies inside the image (`offset` holds 0 where it does not, so a load there stays in bounds).
template <int K>
struct Columns {
  int offset[K];
  bool inside[K];
  bool all_inside;

  // Columns first + j·step, j < K (step 2 with `parity`: only those of even first + j count; a column
  // value c there stands for c / 2 — the stride-2 input gradient's dy columns).
  __device__ __forceinline__ Columns(int first, int width, int stride_w, bool parity = false) {
    all_inside = true;
#pragma unroll
    for (int j = 0; j < K; ++j) {
      int column = first + (parity ? -j : j);
      bool ok = column >= 0;
      if (parity) {
        ok = ok && (column & 1) == 0;
        column >>= 1;
      }
      ok = ok && column < width;
      inside[j] = ok;
      offset[j] = ok ? column * stride_w : 0;
      all_inside = all_inside && ok;
    }
  }
};

// row[j] = the j-th column of the row at `row` (zero outside the image unless CHECKED is false).
template <bool CHECKED, typename scalar_t, typename acc_t, int K>
__device__ __forceinline__ void load_row(const scalar_t* __restrict__ row, const Columns<K>& columns, acc_t (&out)[K]) {
#pragma unroll
  for (int j = 0; j < K; ++j)
    out[j] = (!CHECKED || columns.inside[j]) ? static_cast<acc_t>(row[columns.offset[j]]) : acc_t(0);
}

// acc[t] += Σ_{i,j} f[i][j] · x[ih0 + t·S + i][columns j], t < TH: each of the strip's input rows is
// read once and serves every output row whose window holds it. CHECKED: rows and columns may leave
// the image (border strips); the interior takes the unchecked instance, free of compares.
template <bool CHECKED, int K, int S, int TH, typename scalar_t, typename acc_t>
__device__ __forceinline__ void convolve_strip(const scalar_t* __restrict__ plane, int stride_h, int ih0, int height,
                                               const Columns<K>& columns, const acc_t (&f)[K * K], acc_t (&acc)[TH]) {
  constexpr int ROWS = (TH - 1) * S + K;
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    const int ih = ih0 + r;
    if (CHECKED && (ih < 0 || ih >= height)) continue;
    acc_t row[K];
    load_row<CHECKED>(plane + ih * stride_h, columns, row);
#pragma unroll
    for (int t = 0; t < TH; ++t) {
      const int i = r - t * S;  // compile-time after unrolling: the filter stays in registers
      if (i < 0 || i >= K) continue;
#pragma unroll
      for (int j = 0; j < K; ++j) acc[t] += f[i * K + j] * row[j];
    }
  }
}

// y[n, c, oh, ow] = Σ_{i,j} F[i][j] · x[n, c, oh·S + i − K/2, ow·S + j − K/2] (zero outside x).
// FLIP reads the filter rotated by 180°: with S = 1 that is the input gradient of the same conv,
// run on dy (the convolution's transpose; odd K keeps the sizes).
// Grid: (channel tiles × column tiles, ⌈OH / kForwardRows⌉, N).
template <typename scalar_t, typename acc_t, int K, int S, bool FLIP>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const scalar_t* __restrict__ x, Strides sx, const acc_t* __restrict__ filters,
                   scalar_t* __restrict__ y, Strides sy, Extents e, TileShape tile) {
  constexpr int P = K / 2, TH = kForwardRows, ROWS = (TH - 1) * S + K;
  const StripThread<acc_t, K> me(filters, e.ow, e.c, tile);
  const int64_t c = me.c;
  const int ow = me.column;
  if (c >= e.c || ow >= e.ow) return;
  const int oh0 = blockIdx.y * TH;
  const int64_t n = blockIdx.z;

  acc_t f[K * K];
  load_filter<FLIP, K>(me.staged, me.lane_c, f);
  acc_t acc[TH];
#pragma unroll
  for (int t = 0; t < TH; ++t) acc[t] = acc_t(0);

  const scalar_t* plane = x + n * sx.n + c * sx.c;
  const Columns<K> columns(ow * S - P, e.w, sx.w);
  const int ih0 = oh0 * S - P;
  if (columns.all_inside && ih0 >= 0 && ih0 + ROWS <= e.h)
    convolve_strip<false, K, S, TH>(plane, sx.h, ih0, e.h, columns, f, acc);
  else
    convolve_strip<true, K, S, TH>(plane, sx.h, ih0, e.h, columns, f, acc);
  scalar_t* out = y + n * sy.n + c * sy.c + ow * sy.w;
#pragma unroll
  for (int t = 0; t < TH; ++t)
    if (oh0 + t < e.oh) out[(oh0 + t) * sy.h] = static_cast<scalar_t>(acc[t]);
}

// channels_last forward through a shared-memory input tile. A block covers 32 channels (the lanes of
// a warp) × 4·CPT output columns × nhwc_rows(S) output rows; it first copies the input window of
// that tile into shared memory as float (NhwcTile), then every thread computes CPT neighbouring
// columns × nhwc_rows(S) rows of its channel, reading the tile at offsets known at compile time: no
// address arithmetic or bounds tests in the inner loop, and each input row it reads serves all of
// its columns. FLIP as in forward_kernel.
// Grid: (channel tiles × ⌈OW / (4·CPT)⌉, ⌈OH / nhwc_rows(S)⌉, N).
constexpr int kNhwcLanes = 32;

// Channels of the channel tile that starts at c0: kNhwcLanes, fewer in the last tile.
__host__ __device__ __forceinline__ int tile_channel_count(int64_t channels, int64_t c0) {
  return int(channels - c0 < kNhwcLanes ? channels - c0 : kNhwcLanes);
}
// Outputs per thread (CPT columns × nhwc_rows(S) rows): 4 × 8 at stride 1; 2 × 4 at stride 2, whose
// input window per output is four times larger (the tile must fit the 48 KB of static shared
// memory); and 2 × 8 at stride 1 for maps at most 8 wide (7 × 7), which would leave 9 of a 16-column
// block's columns idle. Every output costs K² FMAs; the more outputs a thread owns, the fewer
// shared-memory reads, filter loads and copy instructions each carries (at K = 7 the kernels are
// bound by instruction issue, not memory).
constexpr int nhwc_columns_per_thread(int stride, int64_t out_width) {
  return stride == 1 && out_width > 2 * kThreads / kNhwcLanes ? 4 : 2;
}
constexpr int nhwc_rows(int stride) { return stride == 1 ? 8 : 4; }
constexpr int nhwc_block_columns(int columns_per_thread) { return kThreads / kNhwcLanes * columns_per_thread; }

// A shared-memory tile of the channels_last kernels: [ROWS][PADDED_COLS][32 channels] floats, a
// window of the image of those sizes, and the two ways to fill it.
//
// `Copier` (any strides): warp `group` takes tile columns group, group + GROUPS, … of every row, one
// element per lane (the tile is padded to a multiple of GROUPS columns).
// `PackedCopier` (`packed_channels`: channels contiguous, every pixel's channels 16-byte aligned):
// 16 bytes of channels per load, N = 16 / sizeof(scalar_t) of them, so a pixel's 32 channels take
// 32 / N threads and a block copies 4·N pixels of a row per step: per N elements a load, N
// conversions and N / 4 shared stores, against a load, a conversion, a select and a store each.
// Both work out column offsets and bounds once (a thread's columns are fixed for the whole walk);
// in `copy` the rows are unrolled, so the loads are independent and in flight together and the
// shared-memory addresses are constants past a per-thread base.
template <int ROWS_, int COLS_>
struct SharedTile {
  static constexpr int ROWS = ROWS_, COLS = COLS_, GROUPS = kThreads / kNhwcLanes;
  static constexpr int COLUMNS_PER_GROUP = (COLS + GROUPS - 1) / GROUPS, PADDED_COLS = COLUMNS_PER_GROUP * GROUPS;
  static constexpr int ELEMENTS = ROWS * PADDED_COLS * kNhwcLanes;

  struct Copier {
    int column_offset[COLUMNS_PER_GROUP];
    bool column_inside[COLUMNS_PER_GROUP];
    int lane_offset;  // of this thread's first tile element

    // iw0: the image column of tile column 0.
    __device__ __forceinline__ Copier(int iw0, int width, int stride_w) {
      const int group = threadIdx.x / kNhwcLanes;
#pragma unroll
      for (int m = 0; m < COLUMNS_PER_GROUP; ++m) {
        const int iw = iw0 + group + m * GROUPS;
        column_inside[m] = iw >= 0 && iw < width;
        column_offset[m] = column_inside[m] ? iw * stride_w : 0;
      }
      lane_offset = group * kNhwcLanes + threadIdx.x % kNhwcLanes;
    }

    // plane: this thread's channel of the image (a channel of the tile that does not exist may pass
    // any valid one: its column is never read). ih0: the image row of tile row 0. No load is
    // conditional: one outside the image reads row 0, column 0 and stores a zero instead.
    template <typename scalar_t, typename acc_t>
    __device__ __forceinline__ void copy(const scalar_t* __restrict__ plane, int stride_h, int ih0, int height,
                                         acc_t* tile) const {
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        const int ih = ih0 + r;
        const bool row_inside = ih >= 0 && ih < height;
        const scalar_t* row = plane + (row_inside ? ih : 0) * stride_h;
#pragma unroll
        for (int m = 0; m < COLUMNS_PER_GROUP; ++m) {
          const acc_t value = static_cast<acc_t>(row[column_offset[m]]);
          tile[lane_offset + (r * PADDED_COLS + m * GROUPS) * kNhwcLanes] =
              row_inside && column_inside[m] ? value : acc_t(0);
        }
      }
    }
  };

  template <typename scalar_t>
  struct PackedCopier {
    static constexpr int N = sizeof(Bytes16) / sizeof(scalar_t), THREADS_PER_PIXEL = kNhwcLanes / N;
    static constexpr int PIXELS_PER_STEP = kThreads / THREADS_PER_PIXEL;
    static constexpr int COLUMN_STEPS = (COLS + PIXELS_PER_STEP - 1) / PIXELS_PER_STEP;
    int column_offset[COLUMN_STEPS];
    bool column_inside[COLUMN_STEPS];
    int tile_offset;  // of this thread's first tile element (tile column `first_column`)
    int first_column;

    // (iw0: as Copier's) channels: those of the tile that exist (≤ 32, a multiple of N).
    __device__ __forceinline__ PackedCopier(int iw0, int width, int stride_w, int channels) {
      const int part = threadIdx.x % THREADS_PER_PIXEL;
      first_column = threadIdx.x / THREADS_PER_PIXEL;
#pragma unroll
      for (int m = 0; m < COLUMN_STEPS; ++m) {
        const int iw = iw0 + first_column + m * PIXELS_PER_STEP;
        column_inside[m] = part * N < channels && iw >= 0 && iw < width;
        column_offset[m] = iw * stride_w + part * N;
      }
      tile_offset = first_column * kNhwcLanes + part * N;
    }

    // channel_base: the image at the tile's first channel; ih0 as Copier's.
    template <typename acc_t>
    __device__ __forceinline__ void copy(const scalar_t* __restrict__ channel_base, int stride_h, int ih0, int height,
                                         acc_t* tile) const {
      constexpr int OUT_PACKS = N * sizeof(acc_t) / sizeof(Bytes16);
      static_assert(N * sizeof(acc_t) % sizeof(Bytes16) == 0, "whole 16-byte shared stores");
      const scalar_t* column_base[COLUMN_STEPS];  // per row, one 32-bit multiply-add off these
#pragma unroll
      for (int m = 0; m < COLUMN_STEPS; ++m) column_base[m] = channel_base + column_offset[m];
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        const int ih = ih0 + r;
        const bool row_inside = ih >= 0 && ih < height;
#pragma unroll
        for (int m = 0; m < COLUMN_STEPS; ++m) {
          if (COLS % PIXELS_PER_STEP != 0 && first_column + m * PIXELS_PER_STEP >= COLS) continue;
          Bytes16 raw{{0, 0, 0, 0}};  // all-zero bits are 0.0 in every floating type
          if (row_inside && column_inside[m]) raw = *reinterpret_cast<const Bytes16*>(column_base[m] + ih * stride_h);
          acc_t converted[N];
          unpack<scalar_t>(raw, converted);
          Bytes16* out =
              reinterpret_cast<Bytes16*>(tile + tile_offset + (r * PADDED_COLS + m * PIXELS_PER_STEP) * kNhwcLanes);
#pragma unroll
          for (int o = 0; o < OUT_PACKS; ++o) memcpy(&out[o], &converted[o * N / OUT_PACKS], sizeof(Bytes16));
        }
      }
    }
  };

  // Fill the tile for the strip whose tile row 0 is image row ih0: x_image is the image, c0 the
  // tile's first channel, `packed` whether PackedCopier applies (uniform over the launch).
  template <typename scalar_t, typename acc_t>
  __device__ __forceinline__ static void fill(bool packed, const PackedCopier<scalar_t>& packed_copier,
                                              const Copier& copier, const scalar_t* __restrict__ x_image,
                                              const Strides& sx, int64_t c0, int64_t channel, int ih0, int height,
                                              acc_t* tile) {
    if (packed)
      packed_copier.copy(x_image + c0, sx.h, ih0, height, tile);
    else
      copier.copy(x_image + channel * sx.c, sx.h, ih0, height, tile);
  }

  // The prologue of the kernels that compute one tile: the block's filters are staged in the tile's
  // own shared memory and read into f (FLIP: rotated by 180°), then the tile takes the image window
  // whose row 0, column 0 is image position (ih0, iw0). So the kernel needs no more shared memory
  // than the tile. image: the image of the block; c0: its first channel.
  template <bool FLIP, int K, typename scalar_t, typename acc_t>
  __device__ __forceinline__ static void filters_then_window(const acc_t* __restrict__ filters,
                                                             const scalar_t* __restrict__ image, const Strides& s,
                                                             int64_t c0, int64_t channels, int ih0, int iw0,
                                                             int height, int width, bool packed, acc_t (&f)[K * K],
                                                             acc_t* tile) {
    static_assert(ELEMENTS >= kNhwcLanes * K * K, "the tile holds the block's filters first");
    const int lane = threadIdx.x % kNhwcLanes;
    stage_filters<acc_t, K>(filters, c0, channels, TileShape{kNhwcLanes, GROUPS, true}, tile);
    load_filter<FLIP, K>(tile, lane, f);
    __syncthreads();  // every thread has its filter: the tile may take the window
    const int tile_channels = tile_channel_count(channels, c0);
    const Copier copier(iw0, width, s.w);
    const PackedCopier<scalar_t> packed_copier(iw0, width, s.w, tile_channels);
    fill(packed, packed_copier, copier, image, s, c0, lane < tile_channels ? c0 + lane : c0, ih0, height, tile);
    __syncthreads();
  }

  // window[q] = tile row r, column q past `mine` (a thread's first column + its lane), q < SPAN.
  template <int SPAN, typename acc_t>
  __device__ __forceinline__ static void read(const acc_t* mine, int r, acc_t (&window)[SPAN]) {
#pragma unroll
    for (int q = 0; q < SPAN; ++q) window[q] = mine[(r * PADDED_COLS + q) * kNhwcLanes];
  }
};

// The input tile of nhwc_rows(S) × 4·CPT outputs of a K×K, stride-S convolution.
template <int K, int S, int CPT_>
struct NhwcTile : SharedTile<(nhwc_rows(S) - 1) * S + K, (nhwc_block_columns(CPT_) - 1) * S + K> {
  static constexpr int P = K / 2, TH = nhwc_rows(S), CPT = CPT_, BLOCK_COLUMNS = nhwc_block_columns(CPT);
  static constexpr int SPAN = (CPT - 1) * S + K;  // input columns under one thread's CPT outputs
};

// out[t·row_stride + u·column_stride] ← acc[u][t] for a thread's TH rows × CPT columns of outputs,
// those of them that exist (rows_left, columns_left: how many rows and columns the output has from
// the thread's first on); no tests when all do.
template <int CPT, int TH, typename scalar_t, typename acc_t>
__device__ __forceinline__ void store_outputs(const acc_t (&acc)[CPT][TH], scalar_t* __restrict__ out, int row_stride,
                                              int column_stride, int rows_left, int columns_left) {
  if (rows_left >= TH && columns_left >= CPT) {
#pragma unroll
    for (int t = 0; t < TH; ++t)
#pragma unroll
      for (int u = 0; u < CPT; ++u) out[t * row_stride + u * column_stride] = static_cast<scalar_t>(acc[u][t]);
    return;
  }
#pragma unroll
  for (int t = 0; t < TH; ++t)
#pragma unroll
    for (int u = 0; u < CPT; ++u)
      if (t < rows_left && u < columns_left) out[t * row_stride + u * column_stride] = static_cast<scalar_t>(acc[u][t]);
}

// A thread of a channels_last tile kernel: its block's first channel and output column
// (blockIdx.x = channel tile × column tiles + column tile), its lane (its channel: c = c0 + lane)
// and its group (its warp); for the kernels that compute one tile, also the block's first output
// row and image (blockIdx.y = row tile, blockIdx.z = image).
struct TileThread {
  int64_t c0, c, n;
  int w0, h0, lane, group, column_tiles, column_tile;

  // A block that walks every row of its images (the filter gradient; blockIdx.y is its batch
  // chunk): h0 and n are 0.
  __device__ __forceinline__ TileThread(int out_width, int block_columns) {
    column_tiles = (out_width + block_columns - 1) / block_columns;
    column_tile = blockIdx.x % column_tiles;
    c0 = int64_t(blockIdx.x / column_tiles) * kNhwcLanes;
    w0 = column_tile * block_columns;
    h0 = 0;
    n = 0;
    lane = threadIdx.x % kNhwcLanes;
    group = threadIdx.x / kNhwcLanes;
    c = c0 + lane;
  }

  // A block that computes one tile: rows [h0, h0 + block_rows) of image n.
  __device__ __forceinline__ TileThread(int out_width, int block_columns, int block_rows)
      : TileThread(out_width, block_columns) {
    h0 = blockIdx.y * block_rows;
    n = blockIdx.z;
  }
};

template <typename scalar_t, typename acc_t, int K, int S, bool FLIP, int CPT_>
__global__ void __launch_bounds__(kThreads)
    forward_nhwc_kernel(const scalar_t* __restrict__ x, Strides sx, const acc_t* __restrict__ filters,
                        scalar_t* __restrict__ y, Strides sy, Extents e, bool packed) {
  using Tile = NhwcTile<K, S, CPT_>;
  constexpr int P = K / 2, TH = Tile::TH, CPT = Tile::CPT, BLOCK_COLUMNS = Tile::BLOCK_COLUMNS;
  __shared__ __align__(16) acc_t tile[Tile::ELEMENTS];
  const TileThread me(e.ow, BLOCK_COLUMNS, TH);
  const int64_t c = me.c, n = me.n;
  const int w0 = me.w0, oh0 = me.h0, lane = me.lane, group = me.group;

  acc_t f[K * K];
  Tile::template filters_then_window<FLIP, K>(filters, x + n * sx.n, sx, me.c0, e.c, oh0 * S - P, w0 * S - P, e.h,
                                              e.w, packed, f, tile);
  if (c >= e.c) return;

  acc_t acc[CPT][TH] = {};

  const acc_t* mine = tile + group * CPT * S * kNhwcLanes + lane;  // this thread's first input column
#pragma unroll
  for (int r = 0; r < Tile::ROWS; ++r) {
    acc_t row[Tile::SPAN];
    Tile::read(mine, r, row);
#pragma unroll
    for (int t = 0; t < TH; ++t) {
      const int i = r - t * S;
      if (i < 0 || i >= K) continue;
#pragma unroll
      for (int u = 0; u < CPT; ++u)
#pragma unroll
        for (int j = 0; j < K; ++j) acc[u][t] += f[i * K + j] * row[u * S + j];
    }
  }
  const int ow0 = w0 + group * CPT;
  store_outputs(acc, y + n * sy.n + c * sy.c + oh0 * sy.h + ow0 * sy.w, sy.h, sy.w, e.oh - oh0, e.ow - ow0);
}

// Input gradient of a stride-2 conv: dx[h][w] = Σ_{i,j} F[i][j] · dy[(h + P − i)/2][(w + P − j)/2]
// over even, in-range numerators. A thread's strip starts at an even row, so which taps i meet an
// even numerator for each row of the strip is known at compile time; for the columns it is fixed per
// thread (`Columns` with parity). Grid as forward_kernel's over (H, W): e.oh/e.ow are dy's sizes.
template <typename scalar_t, typename acc_t, int K>
__global__ void __launch_bounds__(kThreads)
    grad_input_stride2_kernel(const scalar_t* __restrict__ gy, Strides sg, const acc_t* __restrict__ filters,
                              scalar_t* __restrict__ gx, Strides sx, Extents e, TileShape tile) {
  constexpr int P = K / 2, TH = kForwardRows;
  static_assert(TH % 2 == 0, "strips must start at even rows");
  // dy rows touched by the strip, relative to h0 / 2: (t + P − i) / 2 over t < TH, i < K; numerators
  // run from P − (K − 1) = −P up, and the lowest even one is −2·⌊P/2⌋.
  constexpr int LO = -(P / 2), HI = (TH - 1 + P) / 2;
  const StripThread<acc_t, K> me(filters, e.w, e.c, tile);
  const int64_t c = me.c;
  const int w = me.column;
  if (c >= e.c || w >= e.w) return;
  const int h0 = blockIdx.y * TH;
  const int64_t n = blockIdx.z;

  acc_t f[K * K];
  load_filter<false, K>(me.staged, me.lane_c, f);
  acc_t acc[TH];
#pragma unroll
  for (int t = 0; t < TH; ++t) acc[t] = acc_t(0);

  const scalar_t* plane = gy + n * sg.n + c * sg.c;
  const Columns<K> columns(w + P, e.ow, sg.w, /*parity=*/true);  // column j: dy[.][(w + P − j)/2]
#pragma unroll
  for (int rho = LO; rho <= HI; ++rho) {
    const int q = h0 / 2 + rho;
    if (q < 0 || q >= e.oh) continue;
    acc_t row[K];
    load_row<true>(plane + q * sg.h, columns, row);
#pragma unroll
    for (int t = 0; t < TH; ++t) {
      const int i = t + P - 2 * rho;  // the tap that maps row h0 + t onto dy row q
      if (i < 0 || i >= K) continue;
#pragma unroll
      for (int j = 0; j < K; ++j) acc[t] += f[i * K + j] * row[j];
    }
  }
  scalar_t* out = gx + n * sx.n + c * sx.c + w * sx.w;
#pragma unroll
  for (int t = 0; t < TH; ++t)
    if (h0 + t < e.h) out[(h0 + t) * sx.h] = static_cast<scalar_t>(acc[t]);
}

// The stride-2 input gradient in channels_last through a shared-memory tile of dy: the counterpart of
// forward_nhwc_kernel for grad_input_stride2_kernel's formula. A block covers 32 channels × 16 dx
// columns × 8 dx rows, starting at an even row and column, so which taps (i, j) meet an even
// numerator for each of a thread's 4 columns × 8 rows is known at compile time, and so is where
// in the tile each of them reads: every FMA does work (the register kernel multiplies the taps of
// odd numerators by zeros), about K²/4 per dx element. The dy window of the block is ~half its size
// in each direction plus the filter's reach: (7 + P)/2 + ⌊P/2⌋ + 1 rows by (15 + P)/2 + ⌊P/2⌋ + 1
// columns (7 × 11 for K = 7). The filters go through the tile first, as in forward_nhwc_kernel.
// Grid: (channel tiles × ⌈W / 16⌉, ⌈H / 8⌉, N); e.h, e.w are dx's sizes, e.oh, e.ow dy's.
constexpr int kStride2Rows = 8, kStride2ColumnsPerThread = 4;
constexpr int kStride2BlockColumns = kThreads / kNhwcLanes * kStride2ColumnsPerThread;

// Tile sizes: dy rows (h + P − i)/2 over the block's rows h and taps i run from −⌊P/2⌋ to
// (rows − 1 + P)/2 past the block's first row / 2 (and so for columns).
constexpr int stride2_tile_extent(int outputs, int k) { return (outputs - 1 + k / 2) / 2 + (k / 2) / 2 + 1; }

template <int K>
struct Stride2GradTile
    : SharedTile<stride2_tile_extent(kStride2Rows, K), stride2_tile_extent(kStride2BlockColumns, K)> {
  static constexpr int P = K / 2, HALF = P / 2;  // tile row 0 is dy row h0 / 2 − HALF
  static constexpr int TH = kStride2Rows, CPT = kStride2ColumnsPerThread;
  static constexpr int SPAN = (CPT - 1 + P) / 2 + HALF + 1;  // dy columns under one thread's CPT dx columns
};

template <typename scalar_t, typename acc_t, int K>
__global__ void __launch_bounds__(kThreads)
    grad_input_stride2_nhwc_kernel(const scalar_t* __restrict__ gy, Strides sg, const acc_t* __restrict__ filters,
                                   scalar_t* __restrict__ gx, Strides sx, Extents e, bool packed) {
  using Tile = Stride2GradTile<K>;
  constexpr int P = Tile::P, HALF = Tile::HALF, TH = Tile::TH, CPT = Tile::CPT;
  static_assert(TH % 2 == 0 && CPT % 2 == 0, "threads start at even rows and columns");
  __shared__ __align__(16) acc_t tile[Tile::ELEMENTS];
  const TileThread me(e.w, kStride2BlockColumns, TH);
  const int64_t c = me.c, n = me.n;
  const int w0 = me.w0, h0 = me.h0, lane = me.lane, group = me.group;

  acc_t f[K * K];
  // Tile row 0, column 0: dy position (h0 / 2 − HALF, w0 / 2 − HALF).
  Tile::template filters_then_window<false, K>(filters, gy + n * sg.n, sg, me.c0, e.c, h0 / 2 - HALF, w0 / 2 - HALF,
                                               e.oh, e.ow, packed, f, tile);
  if (c >= e.c) return;

  acc_t acc[CPT][TH] = {};
  // This thread's dx columns start at w0 + group·CPT (even): its first dy column is group·CPT/2 in the tile.
  const acc_t* mine = tile + group * (CPT / 2) * kNhwcLanes + lane;
#pragma unroll
  for (int r = 0; r < Tile::ROWS; ++r) {
    acc_t row[Tile::SPAN];
    Tile::read(mine, r, row);
#pragma unroll
    for (int t = 0; t < TH; ++t) {
      const int i = t + P - 2 * (r - HALF);  // the tap that maps dx row h0 + t onto tile row r
      if (i < 0 || i >= K) continue;
#pragma unroll
      for (int u = 0; u < CPT; ++u)
#pragma unroll
        for (int j = 0; j < K; ++j) {
          if ((u + P - j) % 2 != 0) continue;  // odd numerator: no dy column
          acc[u][t] += f[i * K + j] * row[(u + P - j) / 2 + HALF];
        }
    }
  }
  const int w = w0 + group * CPT;
  store_outputs(acc, gx + n * sx.n + c * sx.c + h0 * sx.h + w * sx.w, sx.h, sx.w, e.h - h0, e.w - w);
}

// acc[i][j] += Σ_t g[t] · x[ih0 + t·S + i][columns j]: the filter gradient's share of one strip.
template <bool CHECKED, int K, int S, int TH, typename scalar_t, typename acc_t>
__device__ __forceinline__ void correlate_strip(const scalar_t* __restrict__ plane, int stride_h, int ih0, int height,
                                                const Columns<K>& columns, const acc_t (&g)[TH],
                                                acc_t (&acc)[K * K]) {
  constexpr int ROWS = (TH - 1) * S + K;
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    const int ih = ih0 + r;
    if (CHECKED && (ih < 0 || ih >= height)) continue;
    acc_t row[K];
    load_row<CHECKED>(plane + ih * stride_h, columns, row);
#pragma unroll
    for (int t = 0; t < TH; ++t) {
      const int i = r - t * S;
      if (i < 0 || i >= K) continue;
#pragma unroll
      for (int j = 0; j < K; ++j) acc[i * K + j] += g[t] * row[j];
    }
  }
}

// dF[c][i][j] = Σ_{n, oh, ow} dy[n, c, oh, ow] · x[n, c, oh·S + i − P, ow·S + j − P].
// Grid: (channel tiles × column tiles, batch chunks). Each thread sums K×K products in registers over
// its column, all output rows, and the batch chunk's images; the block then sums its columns and
// writes partials[(chunk × column tiles + column tile), c, tap] for its channels.
// At most 128 registers (4 blocks per multiprocessor): left free, ptxas hoists whole strips of loads
// for K = 3 and 5 and spills.
template <typename scalar_t, typename acc_t, int K, int S>
__global__ void __launch_bounds__(kThreads, 4)
    grad_filter_kernel(const scalar_t* __restrict__ x, Strides sx, const scalar_t* __restrict__ gy, Strides sg,
                       acc_t* __restrict__ partials, Extents e, TileShape tile, int64_t images_per_chunk) {
  constexpr int P = K / 2, TH = kFilterRows, ROWS = (TH - 1) * S + K;
  __shared__ acc_t row_sums[K * kThreads];
  int64_t c0;
  int w0;
  block_origin(tile, e.ow, c0, w0);
  const int lane_c = tile.channel_of(threadIdx.x);
  const int64_t c = c0 + lane_c;
  const int ow = w0 + tile.column_of(threadIdx.x);
  const bool active = c < e.c && ow < e.ow;

  acc_t acc[K * K];
#pragma unroll
  for (int t = 0; t < K * K; ++t) acc[t] = acc_t(0);
  if (active) {
    const int64_t n_begin = int64_t(blockIdx.y) * images_per_chunk;
    const int64_t n_end = n_begin + images_per_chunk < e.n ? n_begin + images_per_chunk : e.n;
    const Columns<K> columns(ow * S - P, e.w, sx.w);
    // Not unrolled: unrolling these hoists loads of the next strip and spills the K×K accumulators.
#pragma unroll 1
    for (int64_t n = n_begin; n < n_end; ++n) {
      const scalar_t* plane = x + n * sx.n + c * sx.c;
      const scalar_t* grad = gy + n * sg.n + c * sg.c + ow * sg.w;
#pragma unroll 1
      for (int oh0 = 0; oh0 < e.oh; oh0 += TH) {
        const bool full = oh0 + TH <= e.oh;
        acc_t g[TH];
#pragma unroll
        for (int t = 0; t < TH; ++t) g[t] = full || oh0 + t < e.oh ? static_cast<acc_t>(grad[(oh0 + t) * sg.h]) : acc_t(0);
        const int ih0 = oh0 * S - P;
        if (columns.all_inside && ih0 >= 0 && ih0 + ROWS <= e.h)
          correlate_strip<false, K, S, TH>(plane, sx.h, ih0, e.h, columns, g, acc);
        else
          correlate_strip<true, K, S, TH>(plane, sx.h, ih0, e.h, columns, g, acc);
      }
    }
  }
  // Sum over the block's columns, one filter row (K taps) at a time through shared memory.
  const int column_tiles = (e.ow + tile.columns - 1) / tile.columns;
  const int64_t partial_row = int64_t(blockIdx.y) * column_tiles + blockIdx.x % column_tiles;
#pragma unroll
  for (int i = 0; i < K; ++i) {
#pragma unroll
    for (int j = 0; j < K; ++j) row_sums[j * kThreads + threadIdx.x] = acc[i * K + j];
    __syncthreads();
    for (int slot = threadIdx.x; slot < K * tile.channels; slot += kThreads) {
      const int j = slot / tile.channels, channel = slot % tile.channels;
      if (c0 + channel >= e.c) continue;
      acc_t sum = 0;
      for (int column = 0; column < tile.columns; ++column)
        sum += row_sums[j * kThreads + tile.thread_of(channel, column)];
      partials[(partial_row * e.c + c0 + channel) * (K * K) + i * K + j] = sum;
    }
    __syncthreads();
  }
}

// channels_last filter gradient through the same shared-memory input tiles as forward_nhwc_kernel.
// A block covers 32 channels × 4·CPT output columns and walks all output rows of its batch chunk's
// images, nhwc_rows(S) at a time: copy the strip's input window to shared memory, then each thread
// adds g · window for its CPT columns × nhwc_rows(S) rows into K×K sums
// held in registers. Last, the block sums its four warps' sums per channel (shared memory again) and
// writes partials[(chunk × column tiles + column tile), c, tap]; the host adds the partials.
// Grid: (channel tiles × ⌈OW / (4·CPT)⌉, batch chunks).
template <typename scalar_t, typename acc_t, int K, int S, int CPT_>
__global__ void __launch_bounds__(kThreads, 4)
    grad_filter_nhwc_kernel(const scalar_t* __restrict__ x, Strides sx, const scalar_t* __restrict__ gy,
                            Strides sg, acc_t* __restrict__ partials, Extents e, int64_t images_per_chunk,
                            bool packed) {
  using Tile = NhwcTile<K, S, CPT_>;
  constexpr int P = K / 2, TH = Tile::TH, CPT = Tile::CPT, GROUPS = Tile::GROUPS;
  constexpr int BLOCK_COLUMNS = Tile::BLOCK_COLUMNS, TILE = Tile::ELEMENTS, SUMS = K * K * kThreads;
  __shared__ __align__(16) acc_t shared[TILE > SUMS ? TILE : SUMS];  // the input tile, then the warps' sums
  const TileThread me(e.ow, BLOCK_COLUMNS);
  const int64_t c0 = me.c0, c = me.c;
  const int w0 = me.w0, lane = me.lane, group = me.group;
  const bool channel_inside = c < e.c;
  // Both copiers' columns are fixed for the whole walk.
  const typename Tile::Copier copier(w0 * S - P, e.w, sx.w);
  const typename Tile::template PackedCopier<scalar_t> packed_copier(w0 * S - P, e.w, sx.w,
                                                                      tile_channel_count(e.c, c0));
  // This thread's output columns (dy reads) and its first input column in the tile.
  int grad_column_offset[CPT];
  bool grad_column_inside[CPT];
#pragma unroll
  for (int u = 0; u < CPT; ++u) {
    const int ow = w0 + group * CPT + u;
    grad_column_inside[u] = channel_inside && ow < e.ow;
    grad_column_offset[u] = grad_column_inside[u] ? ow * sg.w : 0;
  }
  const acc_t* mine = shared + group * CPT * S * kNhwcLanes + lane;

  acc_t acc[K * K];
#pragma unroll
  for (int t = 0; t < K * K; ++t) acc[t] = acc_t(0);
  const int64_t n_begin = int64_t(blockIdx.y) * images_per_chunk;
  const int64_t n_end = n_begin + images_per_chunk < e.n ? n_begin + images_per_chunk : e.n;
  const int64_t channel = channel_inside ? c : c0;
#pragma unroll 1
  for (int64_t n = n_begin; n < n_end; ++n) {
    const scalar_t* grad = gy + n * sg.n + channel * sg.c;
#pragma unroll 1
    for (int oh0 = 0; oh0 < e.oh; oh0 += TH) {
      const int ih0 = oh0 * S - P;
      __syncthreads();  // every thread is done with the previous strip's tile
      Tile::fill(packed, packed_copier, copier, x + n * sx.n, sx, c0, channel, ih0, e.h, shared);
      acc_t g[CPT][TH];
#pragma unroll
      for (int t = 0; t < TH; ++t) {
        const bool row_inside = oh0 + t < e.oh;
        const scalar_t* row = grad + (row_inside ? oh0 + t : 0) * sg.h;
#pragma unroll
        for (int u = 0; u < CPT; ++u) {
          const acc_t value = static_cast<acc_t>(row[grad_column_offset[u]]);
          g[u][t] = row_inside && grad_column_inside[u] ? value : acc_t(0);
        }
      }
      __syncthreads();
#pragma unroll
      for (int r = 0; r < Tile::ROWS; ++r) {
        acc_t window[Tile::SPAN];
        Tile::read(mine, r, window);
#pragma unroll
        for (int t = 0; t < TH; ++t) {
          const int i = r - t * S;
          if (i < 0 || i >= K) continue;
#pragma unroll
          for (int u = 0; u < CPT; ++u)
#pragma unroll
            for (int j = 0; j < K; ++j) acc[i * K + j] += g[u][t] * window[u * S + j];
        }
      }
    }
  }
  // Sum the four warps' K×K sums per channel.
  __syncthreads();
#pragma unroll
  for (int t = 0; t < K * K; ++t) shared[t * kThreads + threadIdx.x] = acc[t];
  __syncthreads();
  const int64_t partial_row = int64_t(blockIdx.y) * me.column_tiles + me.column_tile;
  for (int slot = threadIdx.x; slot < K * K * kNhwcLanes; slot += kThreads) {
    const int tap = slot / kNhwcLanes, channel_lane = slot % kNhwcLanes;
    if (c0 + channel_lane >= e.c) continue;
    acc_t sum = 0;
#pragma unroll
    for (int other = 0; other < GROUPS; ++other) sum += shared[tap * kThreads + other * kNhwcLanes + channel_lane];
    partials[(partial_row * e.c + c0 + channel_lane) * (K * K) + tap] = sum;
  }
}

// Calls f(std::integral_constant<int, K>{}, std::integral_constant<int, S>{}) for the (k, stride)
// pairs with a tiled kernel; false (nothing called) for the others.
template <typename F>
bool with_tiled_shape(int64_t k, int64_t stride, F&& f) {
  using std::integral_constant;
  if (stride == 1) {
    if (k == 3) return f(integral_constant<int, 3>{}, integral_constant<int, 1>{}), true;
    if (k == 5) return f(integral_constant<int, 5>{}, integral_constant<int, 1>{}), true;
    if (k == 7) return f(integral_constant<int, 7>{}, integral_constant<int, 1>{}), true;
  } else if (stride == 2) {
    if (k == 3) return f(integral_constant<int, 3>{}, integral_constant<int, 2>{}), true;
    if (k == 5) return f(integral_constant<int, 5>{}, integral_constant<int, 2>{}), true;
    if (k == 7) return f(integral_constant<int, 7>{}, integral_constant<int, 2>{}), true;
  }
  return false;
}

// Grid limits: rows and batch ride on gridDim.y / .z (≤ 65535).
inline bool fits_grid(int64_t rows, int64_t batch) {
  return (rows + kForwardRows - 1) / kForwardRows <= 65535 && batch <= 65535;
}

inline Strides strides_of(const at::Tensor& t) {
  return {t.stride(0), t.stride(1), static_cast<int>(t.stride(2)), static_cast<int>(t.stride(3))};
}

// Whether one image-channel plane of t is addressed in 32 bits (offsets up to (h−1)·stride_h +
// (w−1)·stride_w, plus the < 32 channels past a tile's first that PackedCopier adds), as the tiled
// kernels do; anything larger takes the per-element kernels.
inline bool fits_int32(const at::Tensor& t) {
  constexpr int64_t limit = int64_t(1) << 31;
  const int64_t last = (t.size(2) - 1) * t.stride(2) + (t.size(3) - 1) * t.stride(3) + kNhwcLanes;
  return t.size(2) < limit && t.size(3) < limit && t.stride(2) < limit && t.stride(3) < limit && last < limit;
}

inline Extents extents_of(const Problem& p) {
  return {p.n, p.c, static_cast<int>(p.h), static_cast<int>(p.w), static_cast<int>(p.oh), static_cast<int>(p.ow)};
}

// The current device's multiprocessor count (ATen's device-properties cache lives in a header that
// pulls in cuSPARSE; these files compile against c10/cuda alone).
#ifndef TOFA_FAST_CUDA_EMULATION
inline int multiprocessors() {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
  return count;
}

// kernel<<<grid, kThreads, shared, stream>>>(args...), checked.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, size_t shared, cudaStream_t stream, Args... args) {
  kernel<<<grid, kThreads, shared, stream>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
#else
inline int multiprocessors() { return emulation::multiprocessors; }

template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, size_t shared, cudaStream_t, Args... args) {
  emulation::run_grid(grid, kThreads, shared, [&] { kernel(args...); });
}
#endif

// Whether the channels_last tile kernels may copy t 16 bytes of channels at a time
// (NhwcTile::PackedCopier): channels contiguous, their count and every pixel's offset a multiple of
// 16 bytes, and the data 16-byte aligned.
template <typename scalar_t>
bool packed_channels(const at::Tensor& t) {
  constexpr int64_t N = sizeof(Bytes16) / sizeof(scalar_t);
  return t.stride(1) == 1 && t.size(1) % N == 0 && t.stride(0) % N == 0 && t.stride(2) % N == 0 &&
         t.stride(3) % N == 0 && reinterpret_cast<uintptr_t>(t.data_ptr()) % sizeof(Bytes16) == 0;
}

// channels_last with at least 24 channels takes forward_nhwc_kernel (32 channel lanes a block; fewer
// channels leave too many lanes idle, and take the register-only kernel's narrower tiles).
inline bool uses_nhwc_tile(const Problem& p) { return p.channels_last && p.c >= 24; }

inline int64_t nhwc_column_tiles(int64_t out_width, int stride) {
  const int columns = nhwc_block_columns(nhwc_columns_per_thread(stride, out_width));
  return (out_width + columns - 1) / columns;
}

inline dim3 nhwc_grid(int64_t channels, int64_t out_height, int64_t out_width, int64_t batch, int stride) {
  const int64_t channel_tiles = (channels + kNhwcLanes - 1) / kNhwcLanes;
  return dim3(channel_tiles * nhwc_column_tiles(out_width, stride),
              (out_height + nhwc_rows(stride) - 1) / nhwc_rows(stride), batch);
}

// Calls f(std::integral_constant<int, CPT>{}) with the channels_last kernels' columns per thread.
template <int S, typename F>
void with_nhwc_columns_per_thread(int64_t out_width, F&& f) {
  if constexpr (S == 1) {
    if (nhwc_columns_per_thread(S, out_width) == 4) return f(std::integral_constant<int, 4>{});
  }
  f(std::integral_constant<int, 2>{});
}

template <typename scalar_t>
bool forward(const at::Tensor& x, const at::Tensor& filters, at::Tensor& y, const Problem& p, cudaStream_t stream) {
  using acc_t = float;
  if (!fits_grid(p.oh, p.n) || !fits_int32(x) || !fits_int32(y)) return false;
  const TileShape tile = TileShape::of(p.c, p.ow, p.channels_last);
  const Extents e = extents_of(p);
  return with_tiled_shape(p.k, p.stride, [&](auto K, auto S) {
    if (uses_nhwc_tile(p)) {
      with_nhwc_columns_per_thread<S()>(p.ow, [&](auto CPT) {
        launch(forward_nhwc_kernel<scalar_t, acc_t, K(), S(), false, CPT()>, nhwc_grid(p.c, p.oh, p.ow, p.n, S()),
               /*shared=*/0, stream, x.data_ptr<scalar_t>(), strides_of(x), filters.data_ptr<acc_t>(),
               y.data_ptr<scalar_t>(), strides_of(y), e, packed_channels<scalar_t>(x));
      });
      return;
    }
    const dim3 grid(tile.channel_tiles(p.c) * tile.column_tiles(p.ow), (p.oh + kForwardRows - 1) / kForwardRows, p.n);
    launch(forward_kernel<scalar_t, acc_t, K(), S(), false>, grid, staged_filter_bytes<acc_t, K()>(tile), stream,
           x.data_ptr<scalar_t>(), strides_of(x), filters.data_ptr<acc_t>(), y.data_ptr<scalar_t>(), strides_of(y), e,
           tile);
  });
}

template <typename scalar_t>
bool grad_input(const at::Tensor& grad_y, const at::Tensor& filters, at::Tensor& grad_x, const Problem& p,
                cudaStream_t stream) {
  using acc_t = float;
  if (!fits_grid(p.h, p.n) || !fits_int32(grad_y) || !fits_int32(grad_x)) return false;
  const TileShape tile = TileShape::of(p.c, p.w, p.channels_last);
  const dim3 grid(tile.channel_tiles(p.c) * tile.column_tiles(p.w), (p.h + kForwardRows - 1) / kForwardRows, p.n);
  return with_tiled_shape(p.k, p.stride, [&](auto K, auto S) {
    const size_t shared = staged_filter_bytes<acc_t, K()>(tile);
    if constexpr (S() == 1) {
      // The forward kernel reads dy as its input (oh × ow) and writes dx (h × w).
      const Extents e{p.n, p.c, static_cast<int>(p.oh), static_cast<int>(p.ow), static_cast<int>(p.h),
                      static_cast<int>(p.w)};
      if (uses_nhwc_tile(p)) {
        with_nhwc_columns_per_thread<1>(p.w, [&](auto CPT) {
          launch(forward_nhwc_kernel<scalar_t, acc_t, K(), 1, true, CPT()>, nhwc_grid(p.c, p.h, p.w, p.n, 1),
                 /*shared=*/0, stream, grad_y.data_ptr<scalar_t>(), strides_of(grad_y), filters.data_ptr<acc_t>(),
                 grad_x.data_ptr<scalar_t>(), strides_of(grad_x), e, packed_channels<scalar_t>(grad_y));
        });
        return;
      }
      launch(forward_kernel<scalar_t, acc_t, K(), 1, true>, grid, shared, stream, grad_y.data_ptr<scalar_t>(),
             strides_of(grad_y), filters.data_ptr<acc_t>(), grad_x.data_ptr<scalar_t>(), strides_of(grad_x), e, tile);
    } else {
      const Extents e = extents_of(p);
      if (uses_nhwc_tile(p)) {
        const int64_t channel_tiles = (p.c + kNhwcLanes - 1) / kNhwcLanes;
        const dim3 tile_grid(channel_tiles * ((p.w + kStride2BlockColumns - 1) / kStride2BlockColumns),
                             (p.h + kStride2Rows - 1) / kStride2Rows, p.n);
        launch(grad_input_stride2_nhwc_kernel<scalar_t, acc_t, K()>, tile_grid, /*shared=*/0, stream,
               grad_y.data_ptr<scalar_t>(), strides_of(grad_y), filters.data_ptr<acc_t>(),
               grad_x.data_ptr<scalar_t>(), strides_of(grad_x), e, packed_channels<scalar_t>(grad_y));
        return;
      }
      launch(grad_input_stride2_kernel<scalar_t, acc_t, K()>, grid, shared, stream, grad_y.data_ptr<scalar_t>(),
             strides_of(grad_y), filters.data_ptr<acc_t>(), grad_x.data_ptr<scalar_t>(), strides_of(grad_x), e, tile);
    }
  });
}

template <typename scalar_t>
at::Tensor grad_filters(const at::Tensor& x, const at::Tensor& grad_y, const Problem& p, cudaStream_t stream) {
  using acc_t = float;
  if (p.n > 65535 || p.n == 0 || p.c == 0 || p.oh == 0 || p.ow == 0 || !fits_int32(x) || !fits_int32(grad_y)) return {};
  const TileShape tile = TileShape::of(p.c, p.ow, p.channels_last);
  const bool nhwc = uses_nhwc_tile(p);
  const int64_t column_tiles = nhwc ? nhwc_column_tiles(p.ow, int(p.stride)) : tile.column_tiles(p.ow);
  const int64_t channel_tiles = nhwc ? (p.c + kNhwcLanes - 1) / kNhwcLanes : tile.channel_tiles(p.c);
  const int64_t base_blocks = channel_tiles * column_tiles;
  // Batch chunks: about 8 blocks per multiprocessor in all.
  const int64_t wanted_chunks = std::min<int64_t>(p.n, std::max<int64_t>(1, 8 * multiprocessors() / base_blocks));
  const int64_t images_per_chunk = (p.n + wanted_chunks - 1) / wanted_chunks;
  const int64_t chunks = (p.n + images_per_chunk - 1) / images_per_chunk;
  const Extents e = extents_of(p);
  at::Tensor result;
  with_tiled_shape(p.k, p.stride, [&](auto K, auto S) {
    at::Tensor partials = at::empty({chunks * column_tiles, p.c, K() * K()}, x.options().dtype(at::kFloat));
    if (nhwc)
      with_nhwc_columns_per_thread<S()>(p.ow, [&](auto CPT) {
        launch(grad_filter_nhwc_kernel<scalar_t, acc_t, K(), S(), CPT()>, dim3(base_blocks, chunks), 0, stream,
               x.data_ptr<scalar_t>(), strides_of(x), grad_y.data_ptr<scalar_t>(), strides_of(grad_y),
               partials.data_ptr<acc_t>(), e, images_per_chunk, packed_channels<scalar_t>(x));
      });
    else
      launch(grad_filter_kernel<scalar_t, acc_t, K(), S()>, dim3(base_blocks, chunks), 0, stream,
             x.data_ptr<scalar_t>(), strides_of(x), grad_y.data_ptr<scalar_t>(), strides_of(grad_y),
             partials.data_ptr<acc_t>(), e, tile, images_per_chunk);
    result = partials.size(0) == 1 ? partials[0] : partials.sum(0);
  });
  return result;
}

// One translation unit per dtype (elastic_dwconv_tiled_<dtype>.cu), so that the build compiles them in parallel.
#define TOFA_FAST_INSTANTIATE_TILED(scalar_t)                                                                    \
  template bool forward<scalar_t>(const at::Tensor&, const at::Tensor&, at::Tensor&, const Problem&, cudaStream_t); \
  template bool grad_input<scalar_t>(const at::Tensor&, const at::Tensor&, at::Tensor&, const Problem&,           \
                                     cudaStream_t);                                                             \
  template at::Tensor grad_filters<scalar_t>(const at::Tensor&, const at::Tensor&, const Problem&, cudaStream_t);

}  // namespace tiled
}  // namespace tofa_fast
