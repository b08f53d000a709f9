// Schemas of the compiled elastic depthwise convolution kernels.
//
// The public operator tofa_fast::elastic_dwconv2d is a Python custom op (tofa_fast/ops/
// elastic_dwconv.py: fake kernel, autograd, backend table). These two internal ops are what its
// C++ and CUDA backends call; the dispatcher routes them by device to csrc/ops/cpu and kernels/cuda.
// FRAGMENT: the tofa_fast namespace is shared with the other compiled ops and the Python ones.
#include <torch/library.h>

#include "cpu/dwconv_tiles.h"

TORCH_LIBRARY_FRAGMENT(tofa_fast, m) {
  m.def(
      "_elastic_dwconv2d_compiled_forward(Tensor x, Tensor weight, int kernel_size, int stride, "
      "Tensor[] transforms) -> Tensor");
  m.def(
      "_elastic_dwconv2d_compiled_backward(Tensor grad_output, Tensor x, Tensor weight, int kernel_size, "
      "int stride, Tensor[] transforms, bool[3] output_mask) -> (Tensor, Tensor, Tensor[])");
  m.def("_elastic_dwconv2d_cpu_isa() -> str", &tofa_fast::cpu::tile_kernels_description);
}
