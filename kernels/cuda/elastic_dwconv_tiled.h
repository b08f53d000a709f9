// Host entry points of the tiled depthwise kernels (elastic_dwconv_tiled.cuh), for K ∈ {3, 5, 7} and
// stride ∈ {1, 2}; instantiated for float, c10::Half and c10::BFloat16 in elastic_dwconv_tiled_<dtype>.cu.
// Filters are the (C, K·K) float32 active filters; accumulation is in float32.
#pragma once

#include <ATen/core/Tensor.h>
#ifndef TOFA_FAST_CUDA_EMULATION
#include <cuda_runtime.h>
#endif

#include <cstdint>

namespace tofa_fast {
namespace tiled {

struct Problem {
  int64_t n, c, h, w, oh, ow;  // x is (n, c, h, w), y is (n, c, oh, ow)
  int k, stride;
  bool channels_last;  // the layout the threads are mapped for (coalescing); any strides are correct
};

// y ← conv(x, filters). False (nothing launched) when (k, stride, sizes) have no tiled kernel.
template <typename scalar_t>
bool forward(const at::Tensor& x, const at::Tensor& filters, at::Tensor& y, const Problem& p, cudaStream_t stream);

// grad_x ← the input gradient for grad_y. False (nothing launched) as forward.
template <typename scalar_t>
bool grad_input(const at::Tensor& grad_y, const at::Tensor& filters, at::Tensor& grad_x, const Problem& p,
                cudaStream_t stream);

// The (C, K·K) float32 filter gradient, or an undefined tensor when (k, stride, sizes) have no tiled kernel.
template <typename scalar_t>
at::Tensor grad_filters(const at::Tensor& x, const at::Tensor& grad_y, const Problem& p, cudaStream_t stream);

}  // namespace tiled
}  // namespace tofa_fast
