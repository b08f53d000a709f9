// The vectorised CPU kernels compiled for AVX2 + FMA (8 float / 4 double lanes, 16 vector registers →
// 4-pixel depthwise row tiles, 12 accumulators in a pointwise block). Selected at run time on CPUs with
// AVX2 and FMA but no AVX-512 (dwconv_tiles.h, pointwise_tiles.h).
#include <cstdint>
#include <cstring>
#include <utility>

#include "dwconv_tiles.h"
#include "pointwise_tiles.h"

#if TOFA_FAST_X86_ISA_PATHS
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif

namespace tofa_fast::cpu::isa_avx2 {
#define TOFA_VECTOR_BYTES 32
#define TOFA_ACCUMULATORS 12
#define TOFA_ROW_TILE 4
#define TOFA_ISA_NAME "AVX2"
#include "dwconv_tiles_impl.h"
#include "pointwise_tiles_impl.h"
#undef TOFA_VECTOR_BYTES
#undef TOFA_ROW_TILE
#undef TOFA_ACCUMULATORS
#undef TOFA_ISA_NAME
}  // namespace tofa_fast::cpu::isa_avx2

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif
