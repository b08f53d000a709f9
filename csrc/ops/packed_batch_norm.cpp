// Schemas of the compiled packed batch norm + activation kernels (the fused multi-subnet step, SPEC §5).
//
// The public operator tofa_fast::packed_batch_norm_act is a Python custom op (tofa_fast/ops/
// packed_batch_norm.py: argument checks, fake kernels, autograd, backend table); the semantics and the
// oracle are in tofa_fast/ops/packed_batch_norm_reference.py. These two internal ops are what its C++
// backend calls; the dispatcher routes them to the CPU kernels of csrc/ops/cpu/packed_batch_norm_cpu.cpp.
//
// Forward: y (P, C) in x's dtype, and per segment (S, C) the mean and 1/sqrt(var + eps) that
// normalised it, in the compute dtype (float64 for float64 x, float32 otherwise): the batch statistics
// in training, the running statistics in eval. The backward reads them back, so it need not know
// where they came from; `training` only says whether the mean and variance depend on x (the two
// extra terms of the batch-norm input gradient). The running statistics are updated in place, in
// training, in `update_order` (empty: segment order).
// FRAGMENT: the tofa_fast namespace is shared with the other compiled ops and the Python ones.
#include <torch/library.h>

namespace tofa_fast {
// csrc/ops/cpu/packed_batch_norm_cpu.cpp: the elementwise passes' channel chunks on or off.
bool set_packed_bn_cpu_chunks(bool enabled);
}  // namespace tofa_fast

TORCH_LIBRARY_FRAGMENT(tofa_fast, m) {
  m.def(
      "_packed_batch_norm_act_forward(Tensor x, int[] offsets, int[] channels, Tensor weight, Tensor bias, "
      "Tensor(a!)? running_mean, Tensor(b!)? running_var, bool training, float[] momentum_factors, float eps, "
      "str activation, int[] update_order) -> (Tensor y, Tensor save_mean, Tensor save_rstd)");
  m.def(
      "_packed_batch_norm_act_backward(Tensor grad_y, Tensor x, int[] offsets, int[] channels, Tensor weight, "
      "Tensor bias, Tensor save_mean, Tensor save_rstd, bool training, str activation, bool[3] output_mask) "
      "-> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias)");
  // The forward's statistics (and running-statistics update) without the normalise pass.
  m.def(
      "_packed_batch_norm_stats(Tensor x, int[] offsets, int[] channels, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, bool training, float[] momentum_factors, float eps, int[] update_order) "
      "-> (Tensor save_mean, Tensor save_rstd)");
  // The backward's grad_x pass alone, from dz (the gradient before the activation) and the per-segment
  // sums (S, 2, C) float64 of dz and dz·x̂ that its caller computed along with dz.
  m.def(
      "_packed_batch_norm_grad_input(Tensor grad_z, Tensor x, int[] offsets, int[] channels, Tensor weight, "
      "Tensor save_mean, Tensor save_rstd, Tensor sums, bool training) -> Tensor grad_x");
  // CPU kernels: whether the elementwise passes work on channel chunks (default) or row by row, for
  // benchmarks that measure what that buys; returns the previous setting.
  m.def("_set_packed_bn_cpu_chunks(bool enabled) -> bool", &tofa_fast::set_packed_bn_cpu_chunks);
}
