// The vectorised depthwise-convolution tile kernels, compiled once per ISA (see dwconv_tiles.h).
//
// Include only from simd_kernels_<isa>.cpp, inside that ISA's namespace and target region, after
// <cstring>, <utility> and dwconv_tiles.h, and after defining
//   TOFA_VECTOR_BYTES  SIMD width in bytes (64 AVX-512, 32 AVX2, 16 baseline)
//   TOFA_ROW_TILE      output pixels accumulated in registers (8 needs 32 vector registers)
//   TOFA_ISA_NAME      for `tofa-fast info`.
// No include guard on purpose: every ISA translation unit instantiates its own copy.
//
// Math (per channel; the block's channels are the SIMD lanes). Padded input X (pad p = k/2), filter F:
//   forward      Y[r][c]  = Σ_{i,j} F[i][j] · X[rS + i][cS + j]
//   grad filter  dF[i][j] = Σ_{r,c} dY[r][c] · X[rS + i][cS + j]
//   grad input   dX[R][C] = Σ_{i ≡ R, j ≡ C (mod S)} F[i][j] · dY[(R − i)/S][(C − j)/S]   (R = h + p)
// The last is S² stride-1 correlations of dY with the polyphase sub-filters
//   F_ab[α][β] = F[S(Ka − 1 − α) + a][S(Kb − 1 − β) + b],  Ka = ⌈(k − a)/S⌉,
// one per residue class (a, b) of (R, C), which is how it runs below (for S = 1: the flipped filter).

template <typename T>
struct Simd;
template <>
struct Simd<float> {
  typedef float vec __attribute__((vector_size(TOFA_VECTOR_BYTES)));
  typedef float vec_unaligned __attribute__((vector_size(TOFA_VECTOR_BYTES), __may_alias__, __aligned__(4)));
  typedef int32_t index __attribute__((vector_size(TOFA_VECTOR_BYTES)));
};
template <>
struct Simd<double> {
  typedef double vec __attribute__((vector_size(TOFA_VECTOR_BYTES)));
  typedef double vec_unaligned __attribute__((vector_size(TOFA_VECTOR_BYTES), __may_alias__, __aligned__(8)));
  typedef int64_t index __attribute__((vector_size(TOFA_VECTOR_BYTES)));
};

template <typename T>
using vec_t = typename Simd<T>::vec;
template <typename T>
constexpr int kLanes = TOFA_VECTOR_BYTES / sizeof(T);

inline int64_t min_i(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t max_i(int64_t a, int64_t b) { return a > b ? a : b; }
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename T>
inline vec_t<T> vload(const T* p) {
  return *reinterpret_cast<const typename Simd<T>::vec_unaligned*>(p);
}
template <typename T>
inline void vstore(T* p, vec_t<T> v) {
  *reinterpret_cast<typename Simd<T>::vec_unaligned*>(p) = v;
}
template <typename T>
inline vec_t<T> vload_partial(const T* p, int64_t count) {
  vec_t<T> v = {};
  std::memcpy(&v, p, count * sizeof(T));
  return v;
}
template <typename T>
inline void vstore_partial(T* p, vec_t<T> v, int64_t count) {
  std::memcpy(p, &v, count * sizeof(T));
}

// ---- in-register transpose of a lanes×lanes block ------------------------------------------------
// Stage h swaps the off-diagonal h×h blocks of every 2h×2h block; log2(lanes) stages of two-source
// shuffles (vpermt2ps with AVX-512) turn r[i][k] into r[k][i].
constexpr int butterfly_index(int lanes, int half, bool second, int k) {
  return second ? ((k & half) ? lanes + k : (k ^ half)) : ((k & half) ? lanes + (k ^ half) : k);
}

template <typename T, int HALF, bool SECOND, size_t... I>
inline vec_t<T> butterfly(vec_t<T> a, vec_t<T> b, std::index_sequence<I...>) {
#if defined(__clang__)
  return __builtin_shufflevector(a, b, butterfly_index(kLanes<T>, HALF, SECOND, int(I))...);
#else
  return __builtin_shuffle(a, b, typename Simd<T>::index{butterfly_index(kLanes<T>, HALF, SECOND, int(I))...});
#endif
}

template <typename T, int HALF>
inline void transpose_stage(vec_t<T>* r) {
  constexpr int L = kLanes<T>;
#pragma GCC unroll 16
  for (int i = 0; i < L; ++i) {
    if (i & HALF) continue;
    const vec_t<T> a = r[i], b = r[i + HALF];
    r[i] = butterfly<T, HALF, false>(a, b, std::make_index_sequence<L>{});
    r[i + HALF] = butterfly<T, HALF, true>(a, b, std::make_index_sequence<L>{});
  }
}

template <typename T>
inline void transpose(vec_t<T>* r) {
  constexpr int L = kLanes<T>;
  if constexpr (L >= 16) transpose_stage<T, 8>(r);
  if constexpr (L >= 8) transpose_stage<T, 4>(r);
  if constexpr (L >= 4) transpose_stage<T, 2>(r);
  if constexpr (L >= 2) transpose_stage<T, 1>(r);
}

// ---- tensor ↔ tile --------------------------------------------------------------------------------
// Where the pixels of a rows × cols plane go in a tile: pixel (h, w) at tile pixel
// (top + h) · tile_w + left + w. For NCHW the kernels walk planes in chunks of `lanes` consecutive
// pixels (across row ends), so `offsets` tabulates that tile pixel per plane pixel once per block.
struct TileMap {
  int64_t rows, cols, tile_w, top, left;
  int32_t* offsets;  // rows · cols entries; null for NHWC
};

inline TileMap make_map(int64_t rows, int64_t cols, int64_t tile_w, int64_t top, int64_t left, int32_t*& storage,
                        bool channels_last) {
  TileMap map{rows, cols, tile_w, top, left, nullptr};
  if (channels_last) return map;
  map.offsets = storage;
  storage += rows * cols;
  for (int64_t h = 0; h < rows; ++h)
    for (int64_t w = 0; w < cols; ++w) map.offsets[h * cols + w] = static_cast<int32_t>((top + h) * tile_w + left + w);
  return map;
}

// ---- the load prologue (dwconv_tiles.h: BnActPrologue) --------------------------------------------
struct NoPrologue {
  template <typename V>
  V operator()(V v) const {
    return v;
  }
};

// act((x − mean) · scale + bias) on one pixel's lanes, written as packed_batch_norm_cpu.cpp's
// normalise pass and its activations (same operations in the same order, NaN propagating).
template <typename T, PrologueActivation A>
struct BnActVector {
  vec_t<T> mean, scale, bias;
  vec_t<T> operator()(vec_t<T> x) const {
    const vec_t<T> z = (x - mean) * scale + bias;
    const vec_t<T> zero = {};
    if constexpr (A == PrologueActivation::kRelu) {
      return z < zero ? zero : z;
    } else if constexpr (A == PrologueActivation::kRelu6) {
      return clamp_0_6(z);
    } else if constexpr (A == PrologueActivation::kHswish) {
      return z * clamp_0_6(z + T(3)) / T(6);
    } else {
      return z;
    }
  }
  static vec_t<T> clamp_0_6(vec_t<T> v) {
    const vec_t<T> zero = {}, six = zero + T(6);
    v = v < zero ? zero : v;
    return v > six ? six : v;
  }
};

// ---- software prefetch (channels-last) ------------------------------------------------------------
// A block reads and writes only its `lanes` channels of each pixel: one 64-byte line every
// C · sizeof(T) bytes, a quarter of the lines with 64 channels. The hardware prefetchers keep few such
// strided lines in flight, and the channels-last loads and stores waited on memory (perf: load_tile and
// store_tile took 55 % of a 64×64×32×32 stride-2 forward, the convolution 13 %). So a load asks for
// the line kLoadAhead pixels ahead, and a store for its line kStoreAhead pixels ahead, with write
// intent (prefetchw): the read-for-ownership a store would otherwise wait for. Load prefetch only on
// planes of at least kLoadAheadMinPlane pixels: on 8×8 planes it cost 5-10 %. The distances were
// chosen by interleaved A/B runs on the digits layers (one or two image rows ahead for loads did no
// better; 16, 32 or 64 pixels for stores within noise); what the prefetch buys is measured by
// bench/test_elastic_dwconv_layout_cpu.py. A prefetch never faults, so one past the end of a tensor
// is harmless.
constexpr int64_t kLoadAhead = 32, kStoreAhead = 16, kLoadAheadMinPlane = 256;

template <typename T>
inline void prefetch_read(const T* p) {
  __builtin_prefetch(p, 0);
}
template <typename T>
inline void prefetch_write(T* p) {
  __builtin_prefetch(p, 1);
}

// Tile pixels of `map` ← op(src[n, c0 : c0 + nc]) (lanes ≥ nc get op(0)). NCHW planes are read
// lanes pixels at a time and transposed in registers.
template <typename T, typename Op = NoPrologue>
void load_tile(const T* src, bool channels_last, int64_t channels, int64_t n, int64_t c0, int64_t nc,
               const TileMap& map, T* tile, bool prefetch, const Op& op = Op{}) {
  constexpr int L = kLanes<T>;
  const int64_t plane = map.rows * map.cols;
  if (channels_last) {
    const T* s = src + n * plane * channels + c0;
    const int64_t ahead = prefetch && plane >= kLoadAheadMinPlane ? kLoadAhead * channels : 0;
    for (int64_t h = 0; h < map.rows; ++h) {
      T* d = tile + ((map.top + h) * map.tile_w + map.left) * L;
      const T* sr = s + h * map.cols * channels;
      for (int64_t w = 0; w < map.cols; ++w) {
        const T* pixel = sr + w * channels;
        if (ahead != 0) prefetch_read(pixel + ahead);
        vstore(d + w * L, op(nc == L ? vload(pixel) : vload_partial(pixel, nc)));
      }
    }
    return;
  }
  const T* s = src + (n * channels + c0) * plane;
  const int32_t* offsets = map.offsets;
  int64_t q0 = 0;
  for (; q0 + L <= plane; q0 += L) {
    vec_t<T> r[L];
    // One bumped pointer rather than `lanes` plane addresses: keeps the general registers free for
    // the transpose (otherwise the compiler spills).
    const T* row = s + q0;
    if (nc == L) {
#pragma GCC unroll 16
      for (int l = 0; l < L; ++l, row += plane) r[l] = vload(row);
    } else {
#pragma GCC unroll 16
      for (int l = 0; l < L; ++l, row += plane) r[l] = l < nc ? vload(row) : vec_t<T>{};
    }
    transpose<T>(r);
    const int32_t* offset = offsets + q0;
#pragma GCC unroll 16
    for (int t = 0; t < L; ++t) vstore(tile + int64_t(offset[t]) * L, op(r[t]));
  }
  if (q0 < plane) {  // the plane's last, partial chunk
    const int64_t count = plane - q0;
    vec_t<T> r[L];
#pragma GCC unroll 16
    for (int l = 0; l < L; ++l) r[l] = l < nc ? vload_partial(s + l * plane + q0, count) : vec_t<T>{};
    transpose<T>(r);
#pragma GCC unroll 16
    for (int t = 0; t < L; ++t) {
      if (t < count) vstore(tile + int64_t(offsets[q0 + t]) * L, op(r[t]));
    }
  }
}

// f(std::integral_constant<PrologueActivation, a>{}): a loop specialised per activation.
template <typename F>
void with_prologue_activation(PrologueActivation a, const F& f) {
  using A = PrologueActivation;
  switch (a) {
    case A::kNone: return f(std::integral_constant<A, A::kNone>{});
    case A::kRelu: return f(std::integral_constant<A, A::kRelu>{});
    case A::kRelu6: return f(std::integral_constant<A, A::kRelu6>{});
    case A::kHswish: return f(std::integral_constant<A, A::kHswish>{});
  }
}

// dst[n, c0 : c0 + nc] ← the tile pixels of `map`.
template <typename T>
void store_tile(const T* tile, const TileMap& map, T* dst, bool channels_last, int64_t channels, int64_t n,
                int64_t c0, int64_t nc, bool prefetch) {
  constexpr int L = kLanes<T>;
  const int64_t plane = map.rows * map.cols;
  if (channels_last) {
    T* d = dst + n * plane * channels + c0;
    // Only within the sample's plane: the next sample's lines may belong to another task.
    const int64_t ahead = prefetch ? kStoreAhead : 0;
    for (int64_t h = 0; h < map.rows; ++h) {
      const T* s = tile + ((map.top + h) * map.tile_w + map.left) * L;
      T* dr = d + h * map.cols * channels;
      for (int64_t w = 0; w < map.cols; ++w) {
        if (ahead != 0 && h * map.cols + w + ahead < plane) prefetch_write(dr + (w + ahead) * channels);
        if (nc == L) {
          vstore(dr + w * channels, vload(s + w * L));
        } else {
          vstore_partial(dr + w * channels, vload(s + w * L), nc);
        }
      }
    }
    return;
  }
  T* d = dst + (n * channels + c0) * plane;
  const int32_t* offsets = map.offsets;
  int64_t q0 = 0;
  for (; q0 + L <= plane; q0 += L) {
    vec_t<T> r[L];
    const int32_t* offset = offsets + q0;
#pragma GCC unroll 16
    for (int t = 0; t < L; ++t) r[t] = vload(tile + int64_t(offset[t]) * L);
    transpose<T>(r);
    T* row = d + q0;
    if (nc == L) {
#pragma GCC unroll 16
      for (int l = 0; l < L; ++l, row += plane) vstore(row, r[l]);
    } else {
#pragma GCC unroll 16
      for (int l = 0; l < L; ++l, row += plane) {
        if (l < nc) vstore(row, r[l]);
      }
    }
  }
  if (q0 < plane) {
    const int64_t count = plane - q0;
    vec_t<T> r[L];
#pragma GCC unroll 16
    for (int t = 0; t < L; ++t) r[t] = t < count ? vload(tile + int64_t(offsets[q0 + t]) * L) : vec_t<T>{};
    transpose<T>(r);
#pragma GCC unroll 16
    for (int l = 0; l < L; ++l) {
      if (l < nc) vstore_partial(d + l * plane + q0, r[l], count);
    }
  }
}

// ---- several channel blocks per pass (channels-last) ----------------------------------------------
// In NHWC the `nb` blocks [c0, c0 + nb·lanes) of a pixel are one contiguous run of its channels: loading
// (and storing) them together reads each pixel's run once, front to back, where block by block every
// pass read one line in C/lanes. Tile j of the pass starts `tile_elems` after tile j − 1. NCHW planes
// take the single-block path, block after block.
inline int64_t block_channels(int64_t channels, int64_t c0, int64_t j, int64_t lanes) {
  return min_i(lanes, channels - c0 - j * lanes);
}

template <typename T, typename Op>
void load_tiles(const T* src, const DwconvGeometry& g, int64_t n, int64_t c0, int64_t nb, const TileMap& map, T* tiles,
                int64_t tile_elems, const Op* ops) {
  constexpr int L = kLanes<T>;
  if (!g.channels_last || nb == 1) {
    for (int64_t j = 0; j < nb; ++j)
      load_tile(src, g.channels_last, g.channels, n, c0 + j * L, block_channels(g.channels, c0, j, L), map,
                tiles + j * tile_elems, g.prefetch, ops[j]);
    return;
  }
  const int64_t plane = map.rows * map.cols, channels = g.channels;
  const T* s = src + n * plane * channels + c0;
  const int64_t ahead = g.prefetch && plane >= kLoadAheadMinPlane ? kLoadAhead * channels : 0;
  const int64_t last_nc = block_channels(channels, c0, nb - 1, L);
  for (int64_t h = 0; h < map.rows; ++h) {
    const int64_t row = (map.top + h) * map.tile_w + map.left;
    for (int64_t w = 0; w < map.cols; ++w) {
      const T* pixel = s + (h * map.cols + w) * channels;
      if (ahead != 0) {
        for (int64_t j = 0; j < nb; ++j) prefetch_read(pixel + ahead + j * L);
      }
      T* d = tiles + (row + w) * L;
      for (int64_t j = 0; j + 1 < nb; ++j) vstore(d + j * tile_elems, ops[j](vload(pixel + j * L)));
      const T* tail = pixel + (nb - 1) * L;
      vstore(d + (nb - 1) * tile_elems, ops[nb - 1](last_nc == L ? vload(tail) : vload_partial(tail, last_nc)));
    }
  }
}

template <typename T>
void load_tiles_prologue(const T* src, const DwconvGeometry& g, int64_t n, int64_t c0, int64_t nb, const TileMap& map,
                         T* tiles, int64_t tile_elems, const BnActPrologue<T>* prologue) {
  constexpr int L = kLanes<T>;
  if (prologue == nullptr) {
    NoPrologue none[kMaxBlocksPerPass];
    return load_tiles(src, g, n, c0, nb, map, tiles, tile_elems, none);
  }
  with_prologue_activation(prologue->activation, [&](auto a) {
    BnActVector<T, decltype(a)::value> ops[kMaxBlocksPerPass];
    for (int64_t j = 0; j < nb; ++j) {
      const int64_t cj = c0 + j * L, nc = block_channels(g.channels, c0, j, L);
      ops[j] = {vload_partial(prologue->mean + cj, nc), vload_partial(prologue->scale + cj, nc),
                vload_partial(prologue->bias + cj, nc)};
    }
    load_tiles(src, g, n, c0, nb, map, tiles, tile_elems, ops);
  });
}

template <typename T>
void store_tiles(const T* tiles, int64_t tile_elems, const TileMap& map, T* dst, const DwconvGeometry& g, int64_t n,
                 int64_t c0, int64_t nb) {
  constexpr int L = kLanes<T>;
  if (!g.channels_last || nb == 1) {
    for (int64_t j = 0; j < nb; ++j)
      store_tile(tiles + j * tile_elems, map, dst, g.channels_last, g.channels, n, c0 + j * L,
                 block_channels(g.channels, c0, j, L), g.prefetch);
    return;
  }
  const int64_t plane = map.rows * map.cols, channels = g.channels;
  T* d = dst + n * plane * channels + c0;
  const int64_t ahead = g.prefetch ? kStoreAhead : 0;
  const int64_t last_nc = block_channels(channels, c0, nb - 1, L);
  for (int64_t h = 0; h < map.rows; ++h) {
    const int64_t row = (map.top + h) * map.tile_w + map.left;
    for (int64_t w = 0; w < map.cols; ++w) {
      const int64_t q = h * map.cols + w;
      T* pixel = d + q * channels;
      if (ahead != 0 && q + ahead < plane) {
        for (int64_t j = 0; j < nb; ++j) prefetch_write(pixel + ahead * channels + j * L);
      }
      const T* s = tiles + (row + w) * L;
      for (int64_t j = 0; j + 1 < nb; ++j) vstore(pixel + j * L, vload(s + j * tile_elems));
      const vec_t<T> tail = vload(s + (nb - 1) * tile_elems);
      if (last_nc == L) {
        vstore(pixel + (nb - 1) * L, tail);
      } else {
        vstore_partial(pixel + (nb - 1) * L, tail, last_nc);
      }
    }
  }
}

// ---- the two register-tiled loops ----------------------------------------------------------------
// The rectangle of an input tile that holds data (the rest is zero padding), in tile pixels.
struct Window {
  int64_t row_lo, row_hi, col_lo, col_hi;
};

// out pixel (r, c) = Σ_{i<KH, j<KW} filt[i][j] · in pixel (rS + i, cS + j) for r < rows, c < cols.
// Pixels are L-wide vectors; `in`/`out` rows are in_row/out_row elements apart, out pixels out_pix.
// Input rows outside [valid.row_lo, valid.row_hi) and columns outside [valid.col_lo, valid.col_hi)
// are zero and skipped: the padding taps of small planes (most of a 7×7 kernel on a 4×4 plane)
// cost nothing. The input must be readable up to column (⌈cols/RW⌉·RW − 1)·S + KW − 1.
// RW output pixels stay in registers; each input pixel is loaded once per kernel row and multiplied
// into every output pixel whose window holds it. FMA latency × issue width needs about 8 independent
// accumulation chains, so narrow tiles (RW = 4) keep two accumulators per pixel (by column parity).
template <typename T, int KH, int KW, int S, int RW>
void conv_rows(const T* in, int64_t in_row, const T* filt, T* out, int64_t out_row, int64_t out_pix, int64_t rows,
               int64_t cols, const Window& valid) {
  constexpr int L = kLanes<T>;
  constexpr int SPAN = (RW - 1) * S + KW;
  constexpr int CHAINS = RW < 8 ? 2 : 1;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i_lo = max_i(0, valid.row_lo - r * S), i_hi = min_i(KH, valid.row_hi - r * S);
    const T* in_r = in + r * S * in_row;
    T* out_r = out + r * out_row;
    for (int64_t c = 0; c < cols; c += RW) {
      const int64_t col_lo = valid.col_lo - c * S, col_hi = valid.col_hi - c * S;
      vec_t<T> acc[CHAINS][RW];
#pragma GCC unroll 8
      for (int w = 0; w < RW; ++w) {
#pragma GCC unroll 2
        for (int h = 0; h < CHAINS; ++h) acc[h][w] = vec_t<T>{};
      }
      for (int64_t i = i_lo; i < i_hi; ++i) {
        const T* src = in_r + i * in_row + c * S * L;
        vec_t<T> fv[KW];
#pragma GCC unroll 8
        for (int j = 0; j < KW; ++j) fv[j] = vload(filt + (i * KW + j) * L);
#pragma GCC unroll 32
        for (int col = 0; col < SPAN; ++col) {
          if (col < col_lo || col >= col_hi) continue;
          const vec_t<T> xv = vload(src + col * L);
#pragma GCC unroll 8
          for (int w = 0; w < RW; ++w) {
            const int j = col - w * S;
            if (j >= 0 && j < KW) acc[col % CHAINS][w] += fv[j] * xv;
          }
        }
      }
      const int64_t count = min_i(RW, cols - c);
#pragma GCC unroll 8
      for (int w = 0; w < RW; ++w) {
        if (CHAINS == 2) acc[0][w] += acc[CHAINS - 1][w];
        if (w < count) vstore(out_r + (c + w) * out_pix, acc[0][w]);
      }
    }
  }
}

// gf[i][j] += Σ_{r<rows, c<cols} gy pixel (r, c) · x pixel (rS + i, cS + j). x pixels outside `valid`
// are zero and skipped; gy must read as zero from column cols to ⌈cols/RW⌉·RW.
// One kernel row at a time keeps its K accumulators and RW gradient pixels in registers. Sums run per
// output row, then over rows, then (in gf) over samples: float32 rounding then grows with the square
// root of each level's length rather than of the whole plane.
template <typename T, int K, int S, int RW>
void wgrad_rows(const T* x, int64_t x_row, const T* gy, int64_t gy_row, int64_t rows, int64_t cols,
                const Window& valid, T* gf) {
  constexpr int L = kLanes<T>;
  constexpr int SPAN = (RW - 1) * S + K;
  for (int i = 0; i < K; ++i) {
    vec_t<T> plane[K];
#pragma GCC unroll 8
    for (int j = 0; j < K; ++j) plane[j] = vec_t<T>{};
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t xr = r * S + i;
      if (xr < valid.row_lo || xr >= valid.row_hi) continue;
      vec_t<T> acc[K];
#pragma GCC unroll 8
      for (int j = 0; j < K; ++j) acc[j] = vec_t<T>{};
      const T* xs = x + xr * x_row;
      const T* g = gy + r * gy_row;
      for (int64_t c = 0; c < cols; c += RW) {
        const int64_t col_lo = valid.col_lo - c * S, col_hi = valid.col_hi - c * S;
        vec_t<T> gv[RW];
#pragma GCC unroll 8
        for (int w = 0; w < RW; ++w) gv[w] = vload(g + (c + w) * L);
        const T* src = xs + c * S * L;
#pragma GCC unroll 32
        for (int col = 0; col < SPAN; ++col) {
          if (col < col_lo || col >= col_hi) continue;
          const vec_t<T> xv = vload(src + col * L);
#pragma GCC unroll 8
          for (int w = 0; w < RW; ++w) {
            const int j = col - w * S;
            if (j >= 0 && j < K) acc[j] += gv[w] * xv;
          }
        }
      }
#pragma GCC unroll 8
      for (int j = 0; j < K; ++j) plane[j] += acc[j];
    }
#pragma GCC unroll 8
    for (int j = 0; j < K; ++j) vstore(gf + (i * K + j) * L, vload(gf + (i * K + j) * L) + plane[j]);
  }
}

// ---- tile geometry --------------------------------------------------------------------------------
struct Range {
  int64_t lo, hi;  // [lo, hi)
};

// Outputs u of residue class a whose padded position S·u + a lands on a real input row [p, p + size).
inline Range class_range(int64_t a, int64_t p, int64_t size, int64_t S) {
  const int64_t lo = p > a ? ceil_div(p - a, S) : 0;
  const int64_t last = p + size - 1 - a;
  return {lo, last >= 0 ? max_i(lo, last / S + 1) : lo};
}

inline int64_t class_taps(int64_t k, int64_t a, int64_t S) { return k > a ? ceil_div(k - a, S) : 0; }

struct Plan {
  int64_t rw;        // output pixels per register tile
  int64_t x_h, x_w;  // zero-padded input tile (pixels)
  int64_t pt;        // zero border of the grad_y tile
  int64_t g_h, g_w;  // grad_y tile (pixels)
};

inline int64_t row_tile(const DwconvGeometry& g) { return g.out_width <= 4 ? 4 : TOFA_ROW_TILE; }

inline Plan make_plan(const DwconvGeometry& g) {
  const int64_t k = g.kernel_size, S = g.stride, p = g.pad, rw = row_tile(g);
  const int64_t ow_r = ceil_div(g.out_width, rw) * rw;
  Plan pl;
  pl.rw = rw;
  pl.x_h = g.height + 2 * p;
  pl.x_w = max_i(g.width + 2 * p, (ow_r - 1) * S + k);
  pl.pt = ceil_div(k, S) - 1;
  pl.g_h = g.out_height + 2 * pl.pt;
  pl.g_w = max_i(g.out_width + 2 * pl.pt, pl.pt + ow_r);
  for (int64_t a = 0; a < S; ++a) {
    if (class_taps(k, a, S) == 0) continue;
    const Range u = class_range(a, p, g.height, S), v = class_range(a, p, g.width, S);
    pl.g_h = max_i(pl.g_h, u.hi + pl.pt);
    pl.g_w = max_i(pl.g_w, v.lo + ceil_div(v.hi - v.lo, rw) * rw + pl.pt);
  }
  return pl;
}

// Scratch: the T tiles, then the int32 offset tables (T-sized slots, so the tables stay aligned).
template <typename T>
int64_t table_slots(int64_t entries) {
  return (entries * int64_t(sizeof(int32_t)) + int64_t(sizeof(T)) - 1) / int64_t(sizeof(T));
}

// Per block of a pass: [x tile][output tile] forward, [x tile][grad_y tile][grad_x tile][sub-filters]
// backward (tile_elems: one block's share); the offset tables after the pass's `nb` blocks.
template <typename T>
int64_t forward_block_elems(const DwconvGeometry& g) {
  const Plan pl = make_plan(g);
  return (pl.x_h * pl.x_w + g.out_height * g.out_width) * kLanes<T>;
}

template <typename T>
int64_t backward_block_elems(const DwconvGeometry& g) {
  const Plan pl = make_plan(g);
  const int64_t k = g.kernel_size;
  return (pl.x_h * pl.x_w + pl.g_h * pl.g_w + g.height * g.width + k * k) * kLanes<T>;
}

template <typename T>
size_t forward_scratch(const DwconvGeometry& g, int64_t nb) {
  const int64_t planes = g.height * g.width + g.out_height * g.out_width;
  return size_t(nb * forward_block_elems<T>(g) + table_slots<T>(planes));
}

template <typename T>
size_t backward_scratch(const DwconvGeometry& g, int64_t nb) {
  const int64_t planes = 2 * g.height * g.width + g.out_height * g.out_width;
  return size_t(nb * backward_block_elems<T>(g) + table_slots<T>(planes));
}

// ---- the backward epilogue of the prologue (dwconv_tiles.h: BnActPrologue) -------------------------
// dy · act'(z), as packed_batch_norm_cpu.cpp's activation_grad (the same kinks, the same operations).
template <typename T, PrologueActivation A>
inline vec_t<T> activation_grad_vec(vec_t<T> z, vec_t<T> dy) {
  const vec_t<T> zero = {};
  if constexpr (A == PrologueActivation::kRelu) {
    return z > zero ? dy : zero;
  } else if constexpr (A == PrologueActivation::kRelu6) {
    return (z > zero) & (z < zero + T(6)) ? dy : zero;
  } else if constexpr (A == PrologueActivation::kHswish) {
    const vec_t<T> slope = dy * (z / T(3) + T(0.5));
    const vec_t<T> above_or_middle = z <= zero + T(3) ? slope : dy;
    return z < zero - T(3) ? zero : above_or_middle;
  } else {
    return dy;
  }
}

// The unpadded grad-input tile gxt of sample n (rows × cols pixels, channels-last source x) becomes dz
// (see BnActPrologue), its Σ dz and Σ dz·x̂ added to sums[0, lanes) and sums[lanes, 2·lanes): per image
// row in the vector type, then in double.
template <typename T, PrologueActivation A>
void grad_z_tile(const T* x, const DwconvGeometry& g, int64_t n, int64_t c0, int64_t nc, const BnActPrologue<T>& p,
                 T* gxt, double* sums) {
  constexpr int L = kLanes<T>;
  const vec_t<T> mean = vload_partial(p.mean + c0, nc), rstd = vload_partial(p.rstd + c0, nc),
                 weight = vload_partial(p.weight + c0, nc), bias = vload_partial(p.bias + c0, nc);
  const T* xs = x + n * g.height * g.width * g.channels + c0;
  const int64_t ahead = g.prefetch && g.height * g.width >= kLoadAheadMinPlane ? kLoadAhead * g.channels : 0;
  for (int64_t h = 0; h < g.height; ++h) {
    vec_t<T> sum_dz = {}, sum_dz_xhat = {};
    for (int64_t w = 0; w < g.width; ++w) {
      const int64_t pixel = h * g.width + w;
      const T* src = xs + pixel * g.channels;
      if (ahead != 0) prefetch_read(src + ahead);
      const vec_t<T> xv = nc == L ? vload(src) : vload_partial(src, nc);
      const vec_t<T> xhat = (xv - mean) * rstd;
      const vec_t<T> dz = activation_grad_vec<T, A>(xhat * weight + bias, vload(gxt + pixel * L));
      vstore(gxt + pixel * L, dz);
      sum_dz += dz;
      sum_dz_xhat += dz * xhat;
    }
    for (int l = 0; l < L; ++l) {
      sums[l] += static_cast<double>(sum_dz[l]);
      sums[L + l] += static_cast<double>(sum_dz_xhat[l]);
    }
  }
}

template <typename T>
void grad_z_tile(const T* x, const DwconvGeometry& g, int64_t n, int64_t c0, int64_t nc, const BnActPrologue<T>& p,
                 T* gxt, double* sums) {
  with_prologue_activation(p.activation,
                           [&](auto a) { grad_z_tile<T, decltype(a)::value>(x, g, n, c0, nc, p, gxt, sums); });
}

// ---- blocks ---------------------------------------------------------------------------------------
template <typename T, int K, int S, int RW>
void forward_block_t(const DwconvGeometry& g, const T* x, T* y, const T* filt, int64_t n0, int64_t n1, int64_t c0,
                     int64_t nb, T* scratch, const BnActPrologue<T>* prologue) {
  constexpr int L = kLanes<T>;
  const Plan pl = make_plan(g);
  const int64_t p = g.pad, block = forward_block_elems<T>(g);
  T* xt = scratch;  // tile j at xt + j·block, its output tile after it
  T* ot = xt + pl.x_h * pl.x_w * L;
  // The NCHW offset tables (NCHW passes have one block, so they never move; NHWC writes none).
  int32_t* tables = reinterpret_cast<int32_t*>(scratch + nb * block);
  const TileMap x_map = make_map(g.height, g.width, pl.x_w, p, p, tables, g.channels_last);
  const TileMap out_map = make_map(g.out_height, g.out_width, g.out_width, 0, 0, tables, g.channels_last);
  for (int64_t n = n0; n < n1; ++n) {
    load_tiles_prologue(x, g, n, c0, nb, x_map, xt, block, prologue);
    for (int64_t j = 0; j < nb; ++j)
      conv_rows<T, K, K, S, RW>(xt + j * block, pl.x_w * L, filt + j * K * K * L, ot + j * block, g.out_width * L, L,
                                g.out_height, g.out_width, Window{p, p + g.height, p, p + g.width});
    store_tiles(ot, block, out_map, y, g, n, c0, nb);
  }
}

// Grad-input pixels of residue class (A, B): a stride-1 correlation of the grad_y tile with F_AB.
template <typename T, int K, int S, int RW, int A, int B>
void grad_input_class(const DwconvGeometry& g, const Plan& pl, const T* gt, const T* sub, T* gxt) {
  constexpr int L = kLanes<T>;
  constexpr int KA = K > A ? (K - A + S - 1) / S : 0, KB = K > B ? (K - B + S - 1) / S : 0;
  const int64_t p = g.pad, W = g.width;
  const Range u = class_range(A, p, g.height, S), v = class_range(B, p, W, S);
  const int64_t rows = u.hi - u.lo, cols = v.hi - v.lo;
  if (rows <= 0 || cols <= 0) return;
  T* out = gxt + ((S * u.lo + A - p) * W + (S * v.lo + B - p)) * L;
  if constexpr (KA == 0 || KB == 0) {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) vstore(out + (r * S * W + c * S) * L, vec_t<T>{});
  } else {
    const int64_t base_row = u.lo - KA + 1 + pl.pt, base_col = v.lo - KB + 1 + pl.pt;
    conv_rows<T, KA, KB, 1, RW>(
        gt + (base_row * pl.g_w + base_col) * L, pl.g_w * L, sub, out, S * W * L, S * L, rows, cols,
        Window{pl.pt - base_row, pl.pt + g.out_height - base_row, pl.pt - base_col, pl.pt + g.out_width - base_col});
  }
}

template <typename T, int K, int S, int RW>
void backward_block_t(const DwconvGeometry& g, const T* x, const T* gy, T* gx, const T* filt, T* gf, int64_t n0,
                      int64_t n1, int64_t c0, int64_t nb, T* scratch, const BnActPrologue<T>* prologue,
                      double* sums) {
  constexpr int L = kLanes<T>;
  const Plan pl = make_plan(g);
  const int64_t p = g.pad, block = backward_block_elems<T>(g);
  T* xt = scratch;  // per block j, at + j·block: x tile, grad_y tile, grad_x tile, sub-filters
  T* gt = xt + pl.x_h * pl.x_w * L;
  T* gxt = gt + pl.g_h * pl.g_w * L;
  T* sub = gxt + g.height * g.width * L;
  int32_t* tables = reinterpret_cast<int32_t*>(scratch + nb * block);
  const TileMap x_map = make_map(g.height, g.width, pl.x_w, p, p, tables, g.channels_last);
  const TileMap gy_map = make_map(g.out_height, g.out_width, pl.g_w, pl.pt, pl.pt, tables, g.channels_last);
  const TileMap gx_map = make_map(g.height, g.width, g.width, 0, 0, tables, g.channels_last);
  // Polyphase sub-filters of each block, class (a, b) at offset[a][b].
  int64_t offset[S][S];
  for (int64_t j = 0; j < nb; ++j) {
    const T* f = filt + j * K * K * L;
    T* sj = sub + j * block;
    int64_t next = 0;
    for (int a = 0; a < S; ++a) {
      for (int b = 0; b < S; ++b) {
        const int64_t ka = class_taps(K, a, S), kb = class_taps(K, b, S);
        offset[a][b] = next;
        for (int64_t al = 0; al < ka; ++al)
          for (int64_t be = 0; be < kb; ++be)
            vstore(sj + next + (al * kb + be) * L, vload(f + ((S * (ka - 1 - al) + a) * K + S * (kb - 1 - be) + b) * L));
        next += ka * kb * L;
      }
    }
  }
  NoPrologue none[kMaxBlocksPerPass];
  for (int64_t n = n0; n < n1; ++n) {
    load_tiles(gy, g, n, c0, nb, gy_map, gt, block, none);
    if (gf != nullptr) {
      load_tiles_prologue(x, g, n, c0, nb, x_map, xt, block, prologue);
      for (int64_t j = 0; j < nb; ++j)
        wgrad_rows<T, K, S, RW>(xt + j * block, pl.x_w * L, gt + j * block + (pl.pt * pl.g_w + pl.pt) * L,
                                pl.g_w * L, g.out_height, g.out_width, Window{p, p + g.height, p, p + g.width},
                                gf + j * K * K * L);
    }
    if (gx != nullptr) {
      for (int64_t j = 0; j < nb; ++j) {
        const T* gtj = gt + j * block;
        const T* sj = sub + j * block;
        T* gxj = gxt + j * block;
        grad_input_class<T, K, S, RW, 0, 0>(g, pl, gtj, sj + offset[0][0], gxj);
        if constexpr (S == 2) {
          grad_input_class<T, K, S, RW, 0, 1>(g, pl, gtj, sj + offset[0][1], gxj);
          grad_input_class<T, K, S, RW, 1, 0>(g, pl, gtj, sj + offset[1][0], gxj);
          grad_input_class<T, K, S, RW, 1, 1>(g, pl, gtj, sj + offset[1][1], gxj);
        }
        if (sums != nullptr)
          grad_z_tile(x, g, n, c0 + j * L, block_channels(g.channels, c0, j, L), *prologue, gxj, sums + j * 2 * L);
      }
      store_tiles(gxt, block, gx_map, gx, g, n, c0, nb);
    }
  }
}

// ---- runtime (k, stride, row tile) → compiled instance --------------------------------------------
#define TOFA_DWCONV_DISPATCH(FN, RW, ...)                     \
  switch (g.kernel_size * 10 + g.stride) {                   \
    case 11: FN<T, 1, 1, RW>(__VA_ARGS__); break;            \
    case 12: FN<T, 1, 2, RW>(__VA_ARGS__); break;            \
    case 31: FN<T, 3, 1, RW>(__VA_ARGS__); break;            \
    case 32: FN<T, 3, 2, RW>(__VA_ARGS__); break;            \
    case 51: FN<T, 5, 1, RW>(__VA_ARGS__); break;            \
    case 52: FN<T, 5, 2, RW>(__VA_ARGS__); break;            \
    case 71: FN<T, 7, 1, RW>(__VA_ARGS__); break;            \
    case 72: FN<T, 7, 2, RW>(__VA_ARGS__); break;            \
    default: break; /* refused earlier: tile_kernels_support */ \
  }

template <typename T>
void forward_blocks(const DwconvGeometry& g, const T* x, T* y, const T* filt, int64_t n0, int64_t n1, int64_t c0,
                    int64_t nb, T* scratch, const BnActPrologue<T>* prologue) {
  if (row_tile(g) == 4) {
    TOFA_DWCONV_DISPATCH(forward_block_t, 4, g, x, y, filt, n0, n1, c0, nb, scratch, prologue)
  } else {
    TOFA_DWCONV_DISPATCH(forward_block_t, TOFA_ROW_TILE, g, x, y, filt, n0, n1, c0, nb, scratch, prologue)
  }
}

template <typename T>
void backward_blocks(const DwconvGeometry& g, const T* x, const T* gy, T* gx, const T* filt, T* gf, int64_t n0,
                     int64_t n1, int64_t c0, int64_t nb, T* scratch, const BnActPrologue<T>* prologue, double* sums) {
  if (row_tile(g) == 4) {
    TOFA_DWCONV_DISPATCH(backward_block_t, 4, g, x, gy, gx, filt, gf, n0, n1, c0, nb, scratch, prologue, sums)
  } else {
    TOFA_DWCONV_DISPATCH(backward_block_t, TOFA_ROW_TILE, g, x, gy, gx, filt, gf, n0, n1, c0, nb, scratch, prologue,
                         sums)
  }
}

#undef TOFA_DWCONV_DISPATCH

const DwconvTileKernels<float> kernels_float = {TOFA_ISA_NAME,          kLanes<float>,          &forward_scratch<float>,
                                                &backward_scratch<float>, &forward_blocks<float>, &backward_blocks<float>};
const DwconvTileKernels<double> kernels_double = {
    TOFA_ISA_NAME,         kLanes<double>,         &forward_scratch<double>, &backward_scratch<double>,
    &forward_blocks<double>, &backward_blocks<double>};
