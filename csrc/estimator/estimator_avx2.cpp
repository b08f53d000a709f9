// AVX2 row kernel of the batched estimator (estimator_kernels.h describes the row program it runs).
// Selected at run time on CPUs with AVX2 (estimator.cpp; TOFA_FAST_CPU_ISA=baseline turns it off).
//
// Per row: the static check is one vpsrlvd per 8 positions; the dynamic check a few logic ops per
// stage, all OR-ed into one vector tested once. While checking a stage, its width, kernel and
// expand are blended into lane s of three vectors, so the lookup index of every stage comes out of
// one vector multiply-add; the sums themselves are scalar loads, added in the scalar kernel's order.
// Nothing branches on the data except "is the row valid". Rows are streamed once (a few hundred
// bytes each; the tables stay in L1/L2), so one core runs close to its memory bandwidth.
#include "estimator_kernels.h"

#if TOFA_FAST_ESTIMATOR_AVX2
#include <immintrin.h>

#include <cstring>
#include <utility>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2")
#endif

namespace tofa_fast::estimator::isa_avx2 {
namespace {

#define TOFA_INLINE inline __attribute__((always_inline))

constexpr uintptr_t kPrefetchBytes = 4096;  // ~11 tofa rows; measured best of 2–6 KiB on Zen 3

TOFA_INLINE __m256i load(const int32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
TOFA_INLINE __m256i load(const uint32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
TOFA_INLINE __m256i bcast(const int32_t* p) { return _mm256_set1_epi32(*p); }

// What the row pass collects for the table sums: lane s holds stage s's field (d_offset: d · d_stride).
struct Fields {
  __m256i w, k, e, d_offset;
};

// The dynamic check of stage S (bad |= …); its fields go into lane S of `f`.
template <int S, bool kStage>
TOFA_INLINE void stage_pass(const int32_t* c, const RowProgram& p, __m256i& bad, Fields& f) {
  if (S >= p.n_stages) return;
  const StageProgram& st = p.stages[S];
  const int32_t* sc = c + st.code_offset;
  const int32_t* ks = sc + 2;
  const int32_t* es = c + st.expand_offset;
  const int32_t* lanes = p.stage_lanes + S * kStageRows * kLanes;
  const int32_t di = sc[1] & (kDepthRows - 1);  // a larger index fails the static check anyway
  const __m256i inactive = load(lanes + (kInactive + di) * kLanes);
  const __m256i k0 = bcast(ks), e0 = bcast(es);
  __m256i x;
  if constexpr (kStage) {  // active layers repeat layer 0's choices, inactive ones hold -1
    x = _mm256_or_si256(_mm256_xor_si256(load(ks), _mm256_or_si256(k0, inactive)),
                        _mm256_xor_si256(load(es), _mm256_or_si256(e0, inactive)));
    f.d_offset = _mm256_add_epi32(f.d_offset, load(lanes + (kDepthOffset + di) * kLanes));
  } else {  // only "is it -1" (the sign; values are -1..30 by the static check) follows the depth
    x = _mm256_or_si256(_mm256_xor_si256(load(ks), inactive), _mm256_xor_si256(load(es), inactive));
  }
  bad = _mm256_or_si256(bad, _mm256_and_si256(x, load(lanes + kCare * kLanes)));
  f.w = _mm256_blend_epi32(f.w, bcast(sc), 1 << S);
  f.k = _mm256_blend_epi32(f.k, k0, 1 << S);
  f.e = _mm256_blend_epi32(f.e, e0, 1 << S);
}

template <bool kStage, int... S>
TOFA_INLINE void stage_passes(const int32_t* c, const RowProgram& p, __m256i& bad, Fields& f,
                              std::integer_sequence<int, S...>) {
  (stage_pass<S, kStage>(c, p, bad, f), ...);
}

// All checks of one row (true when it is a valid code); its fields go into `f`.
template <bool kStage>
TOFA_INLINE bool row_pass(const int32_t* c, const RowProgram& p, Fields& f) {
  const __m256i one = _mm256_set1_epi32(1);
  // Static: bit (v + 1) of allowed[p] at every position. Vector v covers positions [8v, 8v + 8),
  // the last one [code_length - 8, code_length) (overlapping the one before). Unrolled: the
  // switch enters a straight run of checks at the count the program needs.
  __m256i ok0 = _mm256_set1_epi32(-1), ok1 = ok0;
  const uint32_t* allowed = p.allowed;
  const int64_t last = p.n_static - 1;
  {
    const __m256i x = _mm256_add_epi32(load(c + p.code_length - kLanes), one);
    ok1 = _mm256_and_si256(ok1, _mm256_srlv_epi32(load(allowed + last * kLanes), x));
  }
#define TOFA_STATIC_CHECK(V, OK)                                                    \
  case V + 1: {                                                                     \
    const __m256i x = _mm256_add_epi32(load(c + V * kLanes), one);                  \
    OK = _mm256_and_si256(OK, _mm256_srlv_epi32(load(allowed + V * kLanes), x));    \
  }                                                                                 \
    [[fallthrough]];
  switch (last) {  // last < kMaxStatic (compile_plan)
    TOFA_STATIC_CHECK(19, ok0)
    TOFA_STATIC_CHECK(18, ok1)
    TOFA_STATIC_CHECK(17, ok0)
    TOFA_STATIC_CHECK(16, ok1)
    TOFA_STATIC_CHECK(15, ok0)
    TOFA_STATIC_CHECK(14, ok1)
    TOFA_STATIC_CHECK(13, ok0)
    TOFA_STATIC_CHECK(12, ok1)
    TOFA_STATIC_CHECK(11, ok0)
    TOFA_STATIC_CHECK(10, ok1)
    TOFA_STATIC_CHECK(9, ok0)
    TOFA_STATIC_CHECK(8, ok1)
    TOFA_STATIC_CHECK(7, ok0)
    TOFA_STATIC_CHECK(6, ok1)
    TOFA_STATIC_CHECK(5, ok0)
    TOFA_STATIC_CHECK(4, ok1)
    TOFA_STATIC_CHECK(3, ok0)
    TOFA_STATIC_CHECK(2, ok1)
    TOFA_STATIC_CHECK(1, ok0)
    TOFA_STATIC_CHECK(0, ok1)
    default:
      break;
  }
#undef TOFA_STATIC_CHECK
  __m256i bad = _mm256_andnot_si256(_mm256_and_si256(ok0, ok1), one);
  // Dynamic: which layers are active (and, with stage granularity, repeat layer 0's choices).
  stage_passes<kStage>(c, p, bad, f, std::make_integer_sequence<int, kMaxStages>{});
  return _mm256_testz_si256(bad, bad);
}

// The table sum of one valid row, adding in the order of the scalar kernel (stem, stages — first
// layer then later ones —, head) so that float sums are bit-identical.
template <typename T, bool kStage>
TOFA_INLINE T row_sum(const int32_t* c, const RowProgram& p, const Fields& f, const T* table, const T* later) {
  const int32_t* lanes = p.lanes;
  const __m256i r = bcast(c);
  // Lane s: the width entering stage s (the stem's for stage 0).
  const __m256i w_in =
      _mm256_blend_epi32(_mm256_permutevar8x32_epi32(f.w, _mm256_setr_epi32(0, 0, 1, 2, 3, 4, 5, 6)), bcast(c + 1), 1);
  __m256i index = _mm256_add_epi32(load(lanes + kBase * kLanes), f.e);
  if constexpr (kStage) index = _mm256_add_epi32(index, f.d_offset);
  index = _mm256_add_epi32(index, _mm256_mullo_epi32(r, load(lanes + kRStride * kLanes)));
  index = _mm256_add_epi32(index, _mm256_mullo_epi32(w_in, load(lanes + kInStride * kLanes)));
  index = _mm256_add_epi32(index, _mm256_mullo_epi32(f.w, load(lanes + kWStride * kLanes)));
  index = _mm256_add_epi32(index, _mm256_mullo_epi32(f.k, load(lanes + kKStride * kLanes)));
  alignas(32) int32_t at[kLanes];
  _mm256_store_si256(reinterpret_cast<__m256i*>(at), index);
  alignas(32) int32_t later_at[kLanes];
  if constexpr (!kStage) {
    __m256i row = _mm256_add_epi32(load(lanes + kLaterBase * kLanes),
                                   _mm256_mullo_epi32(r, load(lanes + kLaterRStride * kLanes)));
    row = _mm256_add_epi32(row, _mm256_mullo_epi32(f.w, load(lanes + kLaterWStride * kLanes)));
    _mm256_store_si256(reinterpret_cast<__m256i*>(later_at), row);
  }
  const int64_t rr = c[0];
  T acc = table[p.stem_offset + rr * p.n_stem + c[1]];
  const int64_t n_stages = p.n_stages;
  for (int64_t s = 0; s < n_stages; ++s) {
    acc += table[at[s]];
    if constexpr (!kStage) {
      const StageProgram& st = p.stages[s];
      if (st.max_depth > 1) {
        // Later layers j ≥ 1, inactive ones (-1, -1) adding the padding's identity.
        const __m256i k = load(c + st.code_offset + 2), e = load(c + st.expand_offset);
        const __m256i k_stride = _mm256_set1_epi32(static_cast<int32_t>(st.later_k_stride));
        const __m256i li =
            _mm256_add_epi32(_mm256_add_epi32(_mm256_set1_epi32(later_at[s]), e), _mm256_mullo_epi32(k, k_stride));
        alignas(32) int32_t layer_at[kLanes];
        _mm256_store_si256(reinterpret_cast<__m256i*>(layer_at), li);
        for (int64_t j = 1; j < st.max_depth; ++j) acc += later[layer_at[j]];
      }
    }
  }
  const int64_t w_last = c[p.last_width_offset];
  return acc + table[p.head_offset + (rr * p.n_last + w_last) * p.n_head + c[2]];
}

template <typename T, bool kStage>
int64_t sum_rows(const int32_t* codes, int64_t begin, int64_t end, int64_t safe_end, const RowProgram& p,
                 const T* table, const T* later, T* out, int32_t* scratch) {
  const int64_t length = p.code_length;
  const int64_t row_bytes = length * static_cast<int64_t>(sizeof(int32_t));
  const int64_t stop = safe_end < end ? (safe_end > begin ? safe_end : begin) : end;
  for (int64_t i = begin; i < stop; ++i) {
    const int32_t* c = codes + i * length;
    // The hardware prefetcher alone leaves the loads waiting on memory: ask for the row
    // kPrefetchBytes ahead (prefetches never fault, past the end of the buffer included).
    const uintptr_t ahead = reinterpret_cast<uintptr_t>(c) + kPrefetchBytes;
    for (int64_t b = 0; b < row_bytes; b += 64) _mm_prefetch(reinterpret_cast<const char*>(ahead + b), _MM_HINT_T0);
    Fields f{};
    if (!row_pass<kStage>(c, p, f)) return i;
    out[i] = row_sum<T, kStage>(c, p, f, table, later);
  }
  for (int64_t i = stop; i < end; ++i) {  // the last rows: their over-reads land in the scratch padding
    std::memcpy(scratch, codes + i * length, sizeof(int32_t) * length);
    Fields f{};
    if (!row_pass<kStage>(scratch, p, f)) return i;
    out[i] = row_sum<T, kStage>(scratch, p, f, table, later);
  }
  return end;
}

template <typename T>
int64_t dispatch(const int32_t* codes, int64_t begin, int64_t end, int64_t safe_end, const RowProgram& p,
                 const T* table, const T* later, T* out, int32_t* scratch) {
  return p.stage_granularity ? sum_rows<T, true>(codes, begin, end, safe_end, p, table, later, out, scratch)
                             : sum_rows<T, false>(codes, begin, end, safe_end, p, table, later, out, scratch);
}

#undef TOFA_INLINE

}  // namespace

int64_t sum_rows_i64(const int32_t* codes, int64_t begin, int64_t end, int64_t safe_end, const RowProgram& program,
                     const int64_t* table, const int64_t* later, int64_t* out, int32_t* scratch) {
  return dispatch(codes, begin, end, safe_end, program, table, later, out, scratch);
}

int64_t sum_rows_f64(const int32_t* codes, int64_t begin, int64_t end, int64_t safe_end, const RowProgram& program,
                     const double* table, const double* later, double* out, int32_t* scratch) {
  return dispatch(codes, begin, end, safe_end, program, table, later, out, scratch);
}

}  // namespace tofa_fast::estimator::isa_avx2

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif
