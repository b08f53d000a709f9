// Python bindings of the tiled CUDA kernels' host entry points, compiled for the CPU emulation
// (cuda_emulation.h); tests/test_elastic_dwconv_cuda_emulated.py builds and checks them.
#include <torch/extension.h>

// clang-format off: the emulation's CUDA stand-ins must come before the kernels
#include "cuda_emulation.h"
#include "../../kernels/cuda/elastic_dwconv_tiled.cuh"
// clang-format on

namespace {

using tofa_fast::tiled::Problem;

template <typename F>
auto with_dtype(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat:
      return f(float{});
    case at::kHalf:
      return f(c10::Half{});
    case at::kBFloat16:
      return f(c10::BFloat16{});
    default:
      TORCH_CHECK(false, "the tiled kernels serve float32, float16 and bfloat16, got ", dtype);
  }
}

int64_t out_size(int64_t in, int64_t k, int64_t stride) { return (in + 2 * (k / 2) - k) / stride + 1; }

at::MemoryFormat format_of(bool channels_last) {
  return channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// y = conv(x, filters (C, k·k) float32); the output is poisoned with NaN first, so every element
// must be written.
at::Tensor forward(const at::Tensor& x, const at::Tensor& filters, int64_t k, int64_t stride, bool channels_last) {
  const int64_t oh = out_size(x.size(2), k, stride), ow = out_size(x.size(3), k, stride);
  at::Tensor y = at::full({x.size(0), x.size(1), oh, ow}, NAN, x.options().memory_format(format_of(channels_last)));
  const Problem p{x.size(0), x.size(1), x.size(2), x.size(3), oh, ow, int(k), int(stride), channels_last};
  const bool served = with_dtype(x.scalar_type(), [&](auto zero) {
    return tofa_fast::tiled::forward<decltype(zero)>(x, filters, y, p, nullptr);
  });
  TORCH_CHECK(served, "no tiled forward kernel for k=", k, " stride=", stride);
  return y;
}

at::Tensor grad_input(const at::Tensor& grad_y, const at::Tensor& filters, int64_t height, int64_t width, int64_t k,
                      int64_t stride, bool channels_last) {
  at::Tensor grad_x = at::full({grad_y.size(0), grad_y.size(1), height, width}, NAN,
                               grad_y.options().memory_format(format_of(channels_last)));
  const Problem p{grad_y.size(0), grad_y.size(1), height, width, grad_y.size(2), grad_y.size(3), int(k), int(stride),
                  channels_last};
  const bool served = with_dtype(grad_y.scalar_type(), [&](auto zero) {
    return tofa_fast::tiled::grad_input<decltype(zero)>(grad_y, filters, grad_x, p, nullptr);
  });
  TORCH_CHECK(served, "no tiled grad-input kernel for k=", k, " stride=", stride);
  return grad_x;
}

at::Tensor grad_filters(const at::Tensor& x, const at::Tensor& grad_y, int64_t k, int64_t stride, bool channels_last,
                        int64_t multiprocessors) {
  emulation::multiprocessors = static_cast<int>(multiprocessors);
  const Problem p{x.size(0), x.size(1), x.size(2), x.size(3), grad_y.size(2), grad_y.size(3), int(k), int(stride),
                  channels_last};
  at::Tensor result = with_dtype(x.scalar_type(), [&](auto zero) {
    return tofa_fast::tiled::grad_filters<decltype(zero)>(x, grad_y, p, nullptr);
  });
  TORCH_CHECK(result.defined(), "no tiled grad-filter kernel for k=", k, " stride=", stride);
  return result;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward);
  m.def("grad_input", &grad_input);
  m.def("grad_filters", &grad_filters);
}
