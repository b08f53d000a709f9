// The vectorised CPU kernels for the build's baseline target (SSE2 on x86-64, NEON on arm64): 16-byte
// vectors, 4-pixel depthwise row tiles, 12 accumulators in a pointwise block. Always compiled; the
// fallback when the CPU has neither AVX2 nor AVX-512.
#include <cstdint>
#include <cstring>
#include <utility>

#include "dwconv_tiles.h"
#include "pointwise_tiles.h"

namespace tofa_fast::cpu::isa_baseline {
#define TOFA_VECTOR_BYTES 16
#define TOFA_ACCUMULATORS 12
#define TOFA_ROW_TILE 4
#define TOFA_ISA_NAME "baseline (16-byte vectors)"
#include "dwconv_tiles_impl.h"
#include "pointwise_tiles_impl.h"
#undef TOFA_VECTOR_BYTES
#undef TOFA_ROW_TILE
#undef TOFA_ACCUMULATORS
#undef TOFA_ISA_NAME
}  // namespace tofa_fast::cpu::isa_baseline
