// Elastic depthwise convolution (SPEC §4): argument checks and shape helpers shared by the CPU
// (csrc/ops/cpu) and CUDA (kernels/cuda) kernels. Header-only so nvcc can compile a .cu alone.
//
// Semantics (also tofa_fast/ops/elastic_dwconv_reference.py): x (N, C, H, W), weight (C_max, 1, K, K) with K
// odd, active kernel k ≤ K odd; transforms: a chain of t²×t² matrices with t odd, strictly
// decreasing below K and ending at k; each step takes the centred t×t window of the current filter
// and maps it through `window @ Mᵀ`. Output: depthwise conv of x with the first C active filters,
// stride s, padding k/2.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace tofa_fast {

// Odd t with t*t == rows == cols, or 0 when `matrix` is not a t²×t² matrix.
inline int64_t transform_target_size(const at::Tensor& matrix) {
  if (matrix.dim() != 2 || matrix.size(0) != matrix.size(1)) return 0;
  int64_t t = 1;
  while (t * t < matrix.size(0)) ++t;
  return t * t == matrix.size(0) ? t : 0;
}

// Mixed precision (autocast's fp32 master weights): x bfloat16/float16 with float32 weight and
// transforms. The active filter is formed in float32; gradients keep each input's dtype.
inline bool is_mixed_precision(const at::Tensor& x, const at::Tensor& weight) {
  return (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf) && weight.scalar_type() == at::kFloat;
}

// Checks every argument and returns the target sizes of the transform chain.
inline std::vector<int64_t> check_elastic_dwconv_args(
    const at::Tensor& x, const at::Tensor& weight, int64_t kernel_size, int64_t stride, at::TensorList transforms) {
  TORCH_CHECK(x.dim() == 4, "x must have shape (N, C, H, W), got ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "x must be a floating-point tensor, got ", x.scalar_type());
  TORCH_CHECK(
      weight.dim() == 4 && weight.size(1) == 1 && weight.size(2) == weight.size(3) && weight.size(2) % 2 == 1,
      "weight must have shape (C_max, 1, K, K) with K odd, got ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() || is_mixed_precision(x, weight), "weight dtype ",
              weight.scalar_type(), " does not match x dtype ", x.scalar_type(),
              " (a float32 weight also serves bfloat16/float16 x: mixed precision)");
  TORCH_CHECK(weight.device() == x.device(), "weight is on ", weight.device(), " but x is on ", x.device());
  const int64_t big = weight.size(2);
  TORCH_CHECK(kernel_size >= 1 && kernel_size % 2 == 1 && kernel_size <= big,
              "kernel_size must be odd and between 1 and K=", big, " (the weight's kernel size), got ", kernel_size);
  TORCH_CHECK(stride >= 1, "stride must be positive, got ", stride);
  TORCH_CHECK(x.size(1) >= 1 && x.size(1) <= weight.size(0), "x has C=", x.size(1),
              " channels; it must have 1 <= C <= C_max=", weight.size(0), " (weight.size(0))");
  TORCH_CHECK(x.size(2) >= 1 && x.size(3) >= 1, "x must have non-empty spatial dims, got ", x.sizes());
  std::vector<int64_t> sizes;
  int64_t previous = big;
  for (size_t i = 0; i < transforms.size(); ++i) {
    const at::Tensor& m = transforms[i];
    const int64_t t = transform_target_size(m);
    TORCH_CHECK(t > 0 && t % 2 == 1 && t < previous, "transforms[", i,
                "] must be a t²×t² matrix with t odd and below the previous size ", previous, ", got ", m.sizes());
    TORCH_CHECK(m.scalar_type() == weight.scalar_type(), "transforms[", i, "] dtype ", m.scalar_type(),
                " does not match weight dtype ", weight.scalar_type());
    TORCH_CHECK(m.device() == weight.device(), "transforms[", i, "] is on ", m.device(), " but weight is on ",
                weight.device());
    sizes.push_back(t);
    previous = t;
  }
  TORCH_CHECK(sizes.empty() || previous == kernel_size, "transforms must lead from K=", big,
              " down to kernel_size=", kernel_size, ", but the chain ends at ", previous);
  return sizes;
}

inline int64_t dwconv_out_size(int64_t in, int64_t kernel_size, int64_t stride) {
  return (in + 2 * (kernel_size / 2) - kernel_size) / stride + 1;
}

// NCHW unless x is channels_last (and not also NCHW-contiguous); output and grad_x keep it.
inline at::MemoryFormat dwconv_memory_format(const at::Tensor& x) {
  return (!x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast)) ? at::MemoryFormat::ChannelsLast
                                                                                 : at::MemoryFormat::Contiguous;
}

inline void check_grad_output(const at::Tensor& grad_output, const at::Tensor& x, int64_t kernel_size,
                              int64_t stride) {
  const auto expected = std::vector<int64_t>{x.size(0), x.size(1), dwconv_out_size(x.size(2), kernel_size, stride),
                                             dwconv_out_size(x.size(3), kernel_size, stride)};
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef(expected), "grad_output must have shape ",
              at::IntArrayRef(expected), " (the forward output's), got ", grad_output.sizes());
  TORCH_CHECK(grad_output.device() == x.device(), "grad_output is on ", grad_output.device(), " but x is on ",
              x.device());
}

}  // namespace tofa_fast
