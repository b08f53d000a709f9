// CPU implementation of tofa_fast::_bn_grad_pointwise_backward (schema in csrc/ops/elastic_dwconv.cpp):
// an MBConv expansion's backward — the batch norm's input gradient and the 1×1 convolution's two
// matrix products — in one pass over dz and y (pointwise_tiles.h says how; the tile kernels are there).
//
// Work split: the rows in tiles of pointwise_tiles' size, tiles split over at::parallel_for's workers
// in contiguous ranges. dx rows belong to one tile each. dW: each worker adds its tiles into its own
// partial dWᵀ, and the partials are summed in worker order afterwards, so a given thread count gives
// the same bits on every call.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "pointwise_tiles.h"

namespace tofa_fast {
namespace cpu {

template <>
const BnGradPointwiseKernels<float>& select_pointwise_kernels<float>() {
#if TOFA_FAST_X86_ISA_PATHS
  if (cpu_isa() == CpuIsa::kAvx512) return isa_avx512::pointwise_float;
  if (cpu_isa() == CpuIsa::kAvx2) return isa_avx2::pointwise_float;
#endif
  return isa_baseline::pointwise_float;
}

template <>
const BnGradPointwiseKernels<double>& select_pointwise_kernels<double>() {
#if TOFA_FAST_X86_ISA_PATHS
  if (cpu_isa() == CpuIsa::kAvx512) return isa_avx512::pointwise_double;
  if (cpu_isa() == CpuIsa::kAvx2) return isa_avx2::pointwise_double;
#endif
  return isa_baseline::pointwise_double;
}

}  // namespace cpu

namespace {

void check_rows(const char* name, const at::Tensor& t, int64_t rows, int64_t channels, const at::Tensor& like) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == channels, name, " must have shape (", rows, ", ",
              channels, "), got ", t.sizes());
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), name, " dtype ", t.scalar_type(), " differs from x's ",
              like.scalar_type());
}

// A per-channel vector given as (E,), (1, E) or (1, 2, E)[, which], in the compute dtype.
at::Tensor channel_vector(const at::Tensor& t, int64_t channels, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(t.numel() == channels, name, " must hold ", channels, " values, got shape ", t.sizes());
  return t.reshape({channels}).to(dtype).contiguous();
}

std::tuple<at::Tensor, at::Tensor> bn_grad_pointwise_backward_cpu(
    const at::Tensor& grad_z_in, const at::Tensor& y_in, const at::Tensor& x_in, const at::Tensor& weight_in,
    const at::Tensor& bn_weight, const at::Tensor& save_mean, const at::Tensor& save_rstd, const at::Tensor& sums_in,
    bool training, std::array<bool, 2> output_mask) {
  TORCH_CHECK(x_in.dim() == 2, "x must be 2-D (rows, in_channels), got ", x_in.sizes());
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kDouble,
              "the fused expansion backward serves float32 and float64, got ", x_in.scalar_type());
  const int64_t rows = x_in.size(0), in_channels = x_in.size(1);
  TORCH_CHECK(weight_in.dim() == 2 && weight_in.size(1) == in_channels, "weight must have shape (E, ", in_channels,
              "), got ", weight_in.sizes());
  const int64_t out_channels = weight_in.size(0);
  check_rows("grad_z", grad_z_in, rows, out_channels, x_in);
  check_rows("y", y_in, rows, out_channels, x_in);
  check_rows("weight", weight_in, out_channels, in_channels, x_in);
  TORCH_CHECK(sums_in.numel() == 2 * out_channels, "sums must hold (2, ", out_channels, ") values, got shape ",
              sums_in.sizes());

  const at::ScalarType dtype = x_in.scalar_type();
  const at::Tensor grad_z = grad_z_in.contiguous(), y = y_in.contiguous(), x = x_in.contiguous();
  const at::Tensor mean = channel_vector(save_mean, out_channels, dtype, "save_mean");
  const at::Tensor rstd = channel_vector(save_rstd, out_channels, dtype, "save_rstd");
  const at::Tensor gain = channel_vector(bn_weight, out_channels, dtype, "bn_weight") * rstd;
  // Σ dz / P and Σ dz·ŷ / P divided in float64, then rounded: the packed batch norm's order.
  const at::Tensor means = (sums_in.reshape({2, out_channels}).to(at::kDouble) / static_cast<double>(rows)).to(dtype);
  const at::Tensor mean_dz = means[0].contiguous(), mean_dz_yhat = means[1].contiguous();

  at::Tensor grad_x = output_mask[0] ? at::empty({rows, in_channels}, x.options()) : at::Tensor();
  at::Tensor grad_weight = output_mask[1] ? at::zeros({out_channels, in_channels}, x.options()) : at::Tensor();
  if (rows == 0 || !(output_mask[0] || output_mask[1])) return {grad_x, grad_weight};

  AT_DISPATCH_FLOATING_TYPES(dtype, "bn_grad_pointwise_backward_cpu", [&] {
    using T = scalar_t;
    const auto& kernels = cpu::select_pointwise_kernels<T>();
    const int64_t cp = kernels.padded(in_channels), ep = kernels.padded(out_channels);
    at::Tensor weight_padded = at::zeros({out_channels, cp}, x.options());
    weight_padded.narrow(1, 0, in_channels).copy_(weight_in);
    cpu::BnGradPointwiseProblem<T> problem{in_channels,
                                           out_channels,
                                           grad_z.data_ptr<T>(),
                                           y.data_ptr<T>(),
                                           x.data_ptr<T>(),
                                           weight_padded.data_ptr<T>(),
                                           mean.data_ptr<T>(),
                                           rstd.data_ptr<T>(),
                                           gain.data_ptr<T>(),
                                           mean_dz.data_ptr<T>(),
                                           mean_dz_yhat.data_ptr<T>(),
                                           training};
    const int64_t tile_rows = kernels.tile_rows(out_channels);
    const int64_t tiles = (rows + tile_rows - 1) / tile_rows;
    const int64_t workers = at::get_num_threads();
    // One dWᵀ partial per worker (C × padded(E)); a tensor for ATen's 64-byte alignment.
    at::Tensor partials = output_mask[1] ? at::zeros({workers, in_channels, ep}, x.options()) : at::Tensor();
    const size_t scratch_elems = static_cast<size_t>(tile_rows * ep);
    at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
      const int64_t worker = at::get_thread_num();
      TORCH_CHECK(worker < workers, "at::parallel_for ran on worker ", worker, " of ", workers);
      std::vector<T> scratch(scratch_elems);
      T* gx = output_mask[0] ? grad_x.data_ptr<T>() : nullptr;
      T* dwt = output_mask[1] ? partials[worker].data_ptr<T>() : nullptr;
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t r0 = t * tile_rows, r1 = r0 + tile_rows < rows ? r0 + tile_rows : rows;
        kernels.tile(problem, r0, r1, gx, dwt, scratch.data());
      }
    });
    if (output_mask[1]) {
      // Σ over workers in worker order, then dWᵀ → dW.
      at::Tensor total = partials[0].clone();
      for (int64_t w = 1; w < workers; ++w) total.add_(partials[w]);
      grad_weight.copy_(total.narrow(1, 0, out_channels).t());
    }
  });
  return {grad_x, grad_weight};
}

}  // namespace
}  // namespace tofa_fast

TORCH_LIBRARY_IMPL(tofa_fast, CPU, m) {
  m.impl("_bn_grad_pointwise_backward", &tofa_fast::bn_grad_pointwise_backward_cpu);
}
