// The tiled depthwise kernels for c10::BFloat16 (see elastic_dwconv_tiled.cuh; one file per dtype builds in parallel).
#include "elastic_dwconv_tiled.cuh"

namespace tofa_fast {
namespace tiled {
TOFA_FAST_INSTANTIATE_TILED(c10::BFloat16)
}  // namespace tiled
}  // namespace tofa_fast
