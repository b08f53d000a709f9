// The vectorised kernels of a 1×1 convolution's backward with its batch norm folded in, compiled once
// per ISA (see pointwise_tiles.h).
//
// Include only from simd_kernels_<isa>.cpp, inside that ISA's namespace and target region, after
// pointwise_tiles.h and dwconv_tiles_impl.h (whose vector types, vload and vstore it uses), with
//   TOFA_ACCUMULATORS   vector accumulators a register block keeps (24 of AVX-512's 32 registers, 12 of 16)
// defined besides that file's macros.
// No include guard on purpose: every ISA translation unit instantiates its own copy.
//
// A tile of R rows:
//   1. dy[r][e] for the tile into scratch (row stride padded(E), the padding zero): reads dz and y once;
//   2. dx rows = dy · W, vectorised over the input channels c: a block of RB rows × NV vectors of c
//      accumulates in registers over e, one broadcast dy[r][e] and NV vectors of W's row e per step;
//   3. dWᵀ[c][e] += Σ_r x[r][c] · dy[r][e], vectorised over e: a block of CB channels × NV vectors of e
//      accumulates in registers over the tile's rows, one broadcast x[r][c] and NV vectors of dy per step.
// Both products read the tile's dy from the cache, and W (E × padded(C)) stays there across tiles.

// Vectors of channels one register block spans (wider rows take several blocks).
constexpr int kPwMaxVectors = TOFA_ACCUMULATORS >= 24 ? 4 : 3;
// Rows (dx) or channels (dW) of a block with NV vectors: as many as the accumulators allow, ≤ 8.
template <int NV>
constexpr int pw_block() {
  return TOFA_ACCUMULATORS / NV < 8 ? TOFA_ACCUMULATORS / NV : 8;
}

template <typename T>
int64_t pw_padded(int64_t channels) {
  return (channels + kLanes<T> - 1) / kLanes<T> * kLanes<T>;
}

// ≈ 24 KiB of dy per tile (half an L1 data cache), 8 to 256 rows, a multiple of 8.
template <typename T>
int64_t pw_tile_rows(int64_t out_channels) {
  int64_t rows = (24 * 1024) / (pw_padded<T>(out_channels) * int64_t(sizeof(T)));
  rows = rows < 8 ? 8 : (rows > 256 ? 256 : rows);
  return rows / 8 * 8;
}

// dx[r][c0 : c0 + NV·L] for RB rows from dy (row stride ep) and W (row stride cp). `store_channels`:
// how many of the block's channels exist (the last block of a row stores a partial vector).
template <typename T, int RB, int NV>
inline void pw_dx_block(const T* __restrict__ dy, int64_t ep, int64_t e_count, const T* __restrict__ w, int64_t cp,
                        T* __restrict__ dx, int64_t c_stride, int64_t store_channels) {
  constexpr int L = kLanes<T>;
  vec_t<T> acc[RB][NV];
#pragma GCC unroll 8
  for (int i = 0; i < RB; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[i][v] = vec_t<T>{};
  for (int64_t e = 0; e < e_count; ++e) {
    vec_t<T> wv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) wv[v] = vload(w + e * cp + v * L);
#pragma GCC unroll 8
    for (int i = 0; i < RB; ++i) {
      const T b = dy[i * ep + e];  // scalar × vector: a broadcast (a vector 0 + b would add first)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[i][v] += b * wv[v];
    }
  }
  for (int i = 0; i < RB; ++i) {
    T* out = dx + i * c_stride;
    if (store_channels >= NV * L) {
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) vstore(out + v * L, acc[i][v]);
    } else {
      T lanes[NV * L];
      for (int v = 0; v < NV; ++v) vstore(lanes + v * L, acc[i][v]);
      std::memcpy(out, lanes, size_t(store_channels) * sizeof(T));
    }
  }
}

template <typename T, int NV>
void pw_dx_rows(const T* dy, int64_t rows, int64_t ep, int64_t e_count, const T* w, int64_t cp, T* dx,
                int64_t c_stride, int64_t store_channels) {
  constexpr int RB = pw_block<NV>();
  int64_t r = 0;
  for (; r + RB <= rows; r += RB)
    pw_dx_block<T, RB, NV>(dy + r * ep, ep, e_count, w, cp, dx + r * c_stride, c_stride, store_channels);
  for (; r < rows; ++r) pw_dx_block<T, 1, NV>(dy + r * ep, ep, e_count, w, cp, dx + r * c_stride, c_stride, store_channels);
}

// dWᵀ[c0 + i][e0 : e0 + NV·L] += Σ_r x[r][c0 + i] · dy[r][e0 : …] for i < CB.
template <typename T, int CB, int NV>
inline void pw_dw_block(const T* __restrict__ dy, int64_t ep, const T* __restrict__ x, int64_t c_stride, int64_t rows,
                        T* __restrict__ dwt) {
  constexpr int L = kLanes<T>;
  vec_t<T> acc[CB][NV];
#pragma GCC unroll 8
  for (int i = 0; i < CB; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[i][v] = vload(dwt + i * ep + v * L);
  for (int64_t r = 0; r < rows; ++r) {
    vec_t<T> d[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) d[v] = vload(dy + r * ep + v * L);
#pragma GCC unroll 8
    for (int i = 0; i < CB; ++i) {
      const T b = x[r * c_stride + i];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[i][v] += b * d[v];
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < CB; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) vstore(dwt + i * ep + v * L, acc[i][v]);
}

template <typename T, int NV>
void pw_dw_channels(const T* dy, int64_t ep, const T* x, int64_t c_stride, int64_t rows, int64_t channels, T* dwt) {
  constexpr int CB = pw_block<NV>();
  int64_t c = 0;
  for (; c + CB <= channels; c += CB) pw_dw_block<T, CB, NV>(dy, ep, x + c, c_stride, rows, dwt + c * ep);
  for (; c < channels; ++c) pw_dw_block<T, 1, NV>(dy, ep, x + c, c_stride, rows, dwt + c * ep);
}

// Calls f.template operator()<NV>(offset, count) over `vectors` vectors in blocks of ≤ kPwMaxVectors.
#define TOFA_PW_FOR_VECTOR_BLOCKS(vectors, CALL)                   \
  for (int64_t v0 = 0; v0 < (vectors);) {                          \
    const int64_t nv = (vectors) - v0 < kPwMaxVectors ? (vectors) - v0 : kPwMaxVectors; \
    switch (nv) {                                                  \
      case 1: CALL(1); break;                                      \
      case 2: CALL(2); break;                                      \
      case 3: CALL(3); break;                                      \
      default: CALL(4); break;                                     \
    }                                                              \
    v0 += nv;                                                      \
  }

template <typename T>
void pw_tile(const BnGradPointwiseProblem<T>& p, int64_t r0, int64_t r1, T* grad_x, T* grad_weight_t, T* scratch) {
  constexpr int L = kLanes<T>;
  const int64_t C = p.in_channels, E = p.out_channels, cp = pw_padded<T>(C), ep = pw_padded<T>(E);
  const int64_t rows = r1 - r0;
  // 1. dy, the packed batch norm's grad_x arithmetic operation for operation (grad_input_rows).
  for (int64_t r = 0; r < rows; ++r) {
    const T* __restrict__ dz = p.grad_z + (r0 + r) * E;
    const T* __restrict__ y = p.y + (r0 + r) * E;
    T* __restrict__ out = scratch + r * ep;
    if (p.training) {
      for (int64_t e = 0; e < E; ++e) {
        const T yhat = (y[e] - p.mean[e]) * p.rstd[e];
        out[e] = p.gain[e] * (dz[e] - p.mean_dz[e] - yhat * p.mean_dz_yhat[e]);
      }
    } else {
      for (int64_t e = 0; e < E; ++e) out[e] = p.gain[e] * dz[e];
    }
    for (int64_t e = E; e < ep; ++e) out[e] = T(0);
  }
  // 2. dx rows = dy · W (only the E real channels of dy enter).
  if (grad_x != nullptr) {
#define TOFA_PW_DX(NV)                                                                                      \
  pw_dx_rows<T, NV>(scratch, rows, ep, E, p.weight_padded + v0 * L, cp, grad_x + r0 * C + v0 * L, C, \
                    C - v0 * L)
    TOFA_PW_FOR_VECTOR_BLOCKS(cp / L, TOFA_PW_DX)
#undef TOFA_PW_DX
  }
  // 3. dWᵀ += xᵀ · dy.
  if (grad_weight_t != nullptr) {
#define TOFA_PW_DW(NV) pw_dw_channels<T, NV>(scratch + v0 * L, ep, p.x + r0 * C, C, rows, C, grad_weight_t + v0 * L)
    TOFA_PW_FOR_VECTOR_BLOCKS(ep / L, TOFA_PW_DW)
#undef TOFA_PW_DW
  }
}

#undef TOFA_PW_FOR_VECTOR_BLOCKS

const BnGradPointwiseKernels<float> pointwise_float = {pw_tile_rows<float>, pw_padded<float>, pw_tile<float>};
const BnGradPointwiseKernels<double> pointwise_double = {pw_tile_rows<double>, pw_padded<double>, pw_tile<double>};
