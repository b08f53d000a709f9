// The vectorised CPU kernels compiled for AVX-512 (16 float / 8 double lanes, 32 vector registers →
// 8-pixel depthwise row tiles, 24 accumulators in a pointwise block). Selected at run time only on CPUs
// that report AVX-512F/BW/DQ/VL (dwconv_tiles.h, pointwise_tiles.h).
#include <cstdint>
#include <cstring>
#include <utility>

#include "dwconv_tiles.h"
#include "pointwise_tiles.h"

#if TOFA_FAST_X86_ISA_PATHS
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")
#endif

namespace tofa_fast::cpu::isa_avx512 {
#define TOFA_VECTOR_BYTES 64
#define TOFA_ACCUMULATORS 24
#define TOFA_ROW_TILE 8
#define TOFA_ISA_NAME "AVX-512"
#include "dwconv_tiles_impl.h"
#include "pointwise_tiles_impl.h"
#undef TOFA_VECTOR_BYTES
#undef TOFA_ROW_TILE
#undef TOFA_ACCUMULATORS
#undef TOFA_ISA_NAME
}  // namespace tofa_fast::cpu::isa_avx512

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif
