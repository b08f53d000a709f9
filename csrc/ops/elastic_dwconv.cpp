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
  // The same convolution of act(z), z = (x − mean) · scale + bias per channel (scale = bn weight ·
  // rstd): an MBConv's expansion batch norm + activation applied as the kernel loads its input tiles
  // (tofa_fast/ops/bn_act_dwconv.py). The backward (channels-last x) returns dz, the gradient with
  // respect to z, and sums (2, C) float64: Σ dz and Σ dz·x̂ with x̂ = (x − mean) · rstd — what the
  // batch norm's input and parameter gradients need (_packed_batch_norm_grad_input). CPU only.
  m.def(
      "_bn_act_dwconv2d_compiled_forward(Tensor x, Tensor mean, Tensor scale, Tensor bias, str activation, "
      "Tensor weight, int kernel_size, int stride, Tensor[] transforms) -> Tensor");
  m.def(
      "_bn_act_dwconv2d_compiled_backward(Tensor grad_output, Tensor x, Tensor mean, Tensor scale, Tensor bias, "
      "Tensor rstd, Tensor bn_weight, str activation, Tensor weight, int kernel_size, int stride, "
      "Tensor[] transforms, bool[3] output_mask) -> (Tensor grad_z, Tensor sums, Tensor grad_weight, "
      "Tensor[] grad_transforms)");
  // The expansion before it, backward: y = x · weightᵀ (rows of channels-last maps, weight (E, C)) was
  // the batch norm's input; from dz and sums as above, the batch norm's input gradient dy (never
  // written) and the 1×1 convolution's grad_x = dy · weight and grad_weight = dyᵀ · x, in one pass over
  // dz and y (csrc/ops/cpu/pointwise_tiles.h). CPU only, float32 and float64.
  m.def(
      "_bn_grad_pointwise_backward(Tensor grad_z, Tensor y, Tensor x, Tensor weight, Tensor bn_weight, "
      "Tensor save_mean, Tensor save_rstd, Tensor sums, bool training, bool[2] output_mask) "
      "-> (Tensor grad_x, Tensor grad_weight)");
  m.def("_elastic_dwconv2d_cpu_isa() -> str", &tofa_fast::cpu::tile_kernels_description);
  // Software prefetch in the channels-last tile loads and stores, on by default; returns the previous
  // setting (benchmarks measure what it buys: bench/test_elastic_dwconv_layout_cpu.py).
  m.def("_set_dwconv_cpu_prefetch(bool enabled) -> bool", &tofa_fast::cpu::set_software_prefetch);
  // Channels-last passes of several channel blocks, on by default; returns the previous setting.
  m.def("_set_dwconv_cpu_multi_block(bool enabled) -> bool", &tofa_fast::cpu::set_multi_block_passes);
}
