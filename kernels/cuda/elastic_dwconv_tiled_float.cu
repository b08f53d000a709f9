// The tiled depthwise kernels for float (see elastic_dwconv_tiled.cuh; one file per dtype builds in parallel).
#include "elastic_dwconv_tiled.cuh"

namespace tofa_fast {
namespace tiled {
TOFA_FAST_INSTANTIATE_TILED(float)
}  // namespace tiled
}  // namespace tofa_fast
