// CUDA kernels of the elastic depthwise convolution (SPEC §4), registered for the CUDA dispatch key
// of tofa_fast::_elastic_dwconv2d_compiled_{forward,backward} (schemas: csrc/ops/elastic_dwconv.cpp).
//
// Per forward call: one launch computes the active filters of the C used channels (centre slice +
// the whole transform chain, one block per channel), one launch the convolution. The convolution and
// its two gradients run the register-tiled kernels of elastic_dwconv_tiled.cuh for k ∈ {3, 5, 7},
// stride ∈ {1, 2} in float32/float16/bfloat16 (the filter gradient: one more reduction launch), and
// the per-element kernels below otherwise. Backward: grad input, grad filter, then one launch walking the filter gradient back through the chain (full
// weight gradient, zero outside the window and channels ≥ C; matrix gradients by atomic adds into a
// zeroed accumulation buffer). Accumulation is in at::opmath_type (float for half/bfloat16).
// Mixed precision (autocast's fp32 master weights): a bfloat16/float16 x with float32 weight and
// transforms. The chain kernels are templated on the weight's type apart from x's, so the active
// filter is formed from the float32 weights and the weight/matrix gradients come back in float32.
// Strides are passed to the kernels, so NCHW, channels_last and non-contiguous inputs need no copy;
// threads are laid out in the output's memory order so neighbouring threads touch neighbouring
// addresses for both layouts. Only c10/cuda headers (no cuBLAS/cuSPARSE) are needed to compile.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../../csrc/ops/elastic_dwconv.h"
#include "elastic_dwconv_tiled.h"

namespace tofa_fast {
namespace {

constexpr int kMaxTransforms = 8;  // the chain travels by value in the kernel parameters
constexpr int kThreads = 256;

template <typename weight_t>
struct TransformChain {
  const weight_t* mats[kMaxTransforms];
  int sizes[kMaxTransforms];
  int count;
};

struct Dims {
  int64_t n, c, h, w, oh, ow;
  int k, stride, pad, big;
};

struct Strides4 {
  int64_t n, c, h, w;
};

Strides4 strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

// Element `index` of an (N, C, A, B) tensor in memory order: NCHW or NHWC.
__device__ __forceinline__ void unravel(int64_t index, int64_t C, int64_t A, int64_t B, bool channels_last,
                                        int64_t& n, int64_t& c, int64_t& a, int64_t& b) {
  if (channels_last) {
    c = index % C;
    index /= C;
    b = index % B;
    index /= B;
    a = index % A;
    n = index / A;
  } else {
    b = index % B;
    index /= B;
    a = index % A;
    index /= A;
    c = index % C;
    n = index / C;
  }
}

// Block `blockIdx.x` = channel c: filters[c] (k·k, acc_t) = chain applied to weight[c].
// Shared memory: two K·K buffers (current filter, window).
template <typename weight_t, typename acc_t>
__global__ void active_filter_kernel(const weight_t* __restrict__ weight, TransformChain<weight_t> chain, int big,
                                     int k, acc_t* __restrict__ filters) {
  extern __shared__ unsigned char shared_raw[];
  acc_t* current = reinterpret_cast<acc_t*>(shared_raw);
  acc_t* window = current + big * big;
  const int64_t c = blockIdx.x;
  for (int e = threadIdx.x; e < big * big; e += blockDim.x) current[e] = static_cast<acc_t>(weight[c * big * big + e]);
  __syncthreads();
  int size = big;
  for (int i = 0; i < chain.count; ++i) {
    const int t = chain.sizes[i], tt = t * t, off = (size - t) / 2;
    for (int e = threadIdx.x; e < tt; e += blockDim.x) window[e] = current[(e / t + off) * size + e % t + off];
    __syncthreads();
    for (int q = threadIdx.x; q < tt; q += blockDim.x) {
      acc_t acc = 0;
      for (int p = 0; p < tt; ++p) acc += static_cast<acc_t>(chain.mats[i][q * tt + p]) * window[p];
      current[q] = acc;
    }
    __syncthreads();
    size = t;
  }
  const int off = (size - k) / 2;
  for (int e = threadIdx.x; e < k * k; e += blockDim.x)
    filters[c * k * k + e] = current[(e / k + off) * size + e % k + off];
}

// Block `blockIdx.x` = channel c < C_max. Recomputes the chain's windows, then walks the filter
// gradient back: dM += g ⊗ window (atomics across channels), g ← centre-padded Mᵀ g.
// Shared memory: the windows of every step, plus two K·K gradient buffers.
template <typename weight_t, typename acc_t>
__global__ void active_filter_backward_kernel(const weight_t* __restrict__ weight, TransformChain<weight_t> chain,
                                              int big, int k, int64_t channels, const acc_t* __restrict__ grad_filters,
                                              weight_t* __restrict__ grad_weight, acc_t* __restrict__ grad_mats,
                                              int window_total) {
  extern __shared__ unsigned char shared_raw[];
  acc_t* windows = reinterpret_cast<acc_t*>(shared_raw);
  acc_t* grad = windows + window_total;
  acc_t* padded = grad + big * big;
  const int64_t c = blockIdx.x;
  if (c >= channels) {
    if (grad_weight != nullptr)
      for (int e = threadIdx.x; e < big * big; e += blockDim.x) grad_weight[c * big * big + e] = weight_t(0);
    return;
  }
  // Forward again, keeping each step's window (the current filter lives in `grad` meanwhile).
  for (int e = threadIdx.x; e < big * big; e += blockDim.x) grad[e] = static_cast<acc_t>(weight[c * big * big + e]);
  __syncthreads();
  int size = big, window_offset = 0;
  for (int i = 0; i < chain.count; ++i) {
    const int t = chain.sizes[i], tt = t * t, off = (size - t) / 2;
    acc_t* window = windows + window_offset;
    for (int e = threadIdx.x; e < tt; e += blockDim.x) window[e] = grad[(e / t + off) * size + e % t + off];
    __syncthreads();
    for (int q = threadIdx.x; q < tt; q += blockDim.x) {
      acc_t acc = 0;
      for (int p = 0; p < tt; ++p) acc += static_cast<acc_t>(chain.mats[i][q * tt + p]) * window[p];
      grad[q] = acc;
    }
    __syncthreads();
    size = t;
    window_offset += tt;
  }
  for (int e = threadIdx.x; e < k * k; e += blockDim.x) grad[e] = grad_filters[c * k * k + e];
  __syncthreads();
  int matrix_offset = 0;
  for (int i = 0; i < chain.count; ++i) matrix_offset += chain.sizes[i] * chain.sizes[i] * chain.sizes[i] * chain.sizes[i];
  for (int i = chain.count - 1; i >= 0; --i) {
    const int t = chain.sizes[i], tt = t * t;
    window_offset -= tt;
    matrix_offset -= tt * tt;
    const acc_t* window = windows + window_offset;
    if (grad_mats != nullptr)
      for (int e = threadIdx.x; e < tt * tt; e += blockDim.x)
        atomicAdd(grad_mats + matrix_offset + e, grad[e / tt] * window[e % tt]);
    const int prev = i == 0 ? big : chain.sizes[i - 1], off = (prev - t) / 2;
    for (int e = threadIdx.x; e < prev * prev; e += blockDim.x) padded[e] = acc_t(0);
    __syncthreads();
    for (int p = threadIdx.x; p < tt; p += blockDim.x) {
      acc_t acc = 0;
      for (int q = 0; q < tt; ++q) acc += static_cast<acc_t>(chain.mats[i][q * tt + p]) * grad[q];
      padded[(p / t + off) * prev + p % t + off] = acc;
    }
    __syncthreads();
    for (int e = threadIdx.x; e < prev * prev; e += blockDim.x) grad[e] = padded[e];
    __syncthreads();
  }
  if (grad_weight == nullptr) return;
  const int gsize = chain.count > 0 ? big : k, off = (big - gsize) / 2;
  for (int e = threadIdx.x; e < big * big; e += blockDim.x) {
    const int r = e / big - off, s = e % big - off;
    const bool inside = r >= 0 && r < gsize && s >= 0 && s < gsize;
    grad_weight[c * big * big + e] = inside ? static_cast<weight_t>(grad[r * gsize + s]) : weight_t(0);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void dwconv_forward_kernel(const scalar_t* __restrict__ x, Strides4 sx, const acc_t* __restrict__ filters,
                                      scalar_t* __restrict__ y, Strides4 sy, Dims d, bool channels_last,
                                      int64_t total) {
  for (int64_t index = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; index < total;
       index += int64_t(gridDim.x) * blockDim.x) {
    int64_t n, c, oh, ow;
    unravel(index, d.c, d.oh, d.ow, channels_last, n, c, oh, ow);
    const scalar_t* xb = x + n * sx.n + c * sx.c;
    const acc_t* f = filters + c * d.k * d.k;
    acc_t acc = 0;
    for (int i = 0; i < d.k; ++i) {
      const int64_t ih = oh * d.stride + i - d.pad;
      if (ih < 0 || ih >= d.h) continue;
      for (int j = 0; j < d.k; ++j) {
        const int64_t iw = ow * d.stride + j - d.pad;
        if (iw < 0 || iw >= d.w) continue;
        acc += static_cast<acc_t>(xb[ih * sx.h + iw * sx.w]) * f[i * d.k + j];
      }
    }
    y[n * sy.n + c * sy.c + oh * sy.h + ow * sy.w] = static_cast<scalar_t>(acc);
  }
}

// dx[h][w] = Σ_{i,j} F[i][j] · dy[(h + p − i)/S][(w + p − j)/S] over exact, in-range quotients.
template <typename scalar_t, typename acc_t>
__global__ void dwconv_grad_input_kernel(const scalar_t* __restrict__ gy, Strides4 sg,
                                         const acc_t* __restrict__ filters, scalar_t* __restrict__ gx, Strides4 sx,
                                         Dims d, bool channels_last, int64_t total) {
  for (int64_t index = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; index < total;
       index += int64_t(gridDim.x) * blockDim.x) {
    int64_t n, c, h, w;
    unravel(index, d.c, d.h, d.w, channels_last, n, c, h, w);
    const scalar_t* gb = gy + n * sg.n + c * sg.c;
    const acc_t* f = filters + c * d.k * d.k;
    acc_t acc = 0;
    for (int i = 0; i < d.k; ++i) {
      const int64_t th = h + d.pad - i;
      if (th < 0 || th % d.stride != 0 || th / d.stride >= d.oh) continue;
      for (int j = 0; j < d.k; ++j) {
        const int64_t tw = w + d.pad - j;
        if (tw < 0 || tw % d.stride != 0 || tw / d.stride >= d.ow) continue;
        acc += static_cast<acc_t>(gb[(th / d.stride) * sg.h + (tw / d.stride) * sg.w]) * f[i * d.k + j];
      }
    }
    gx[n * sx.n + c * sx.c + h * sx.h + w * sx.w] = static_cast<scalar_t>(acc);
  }
}

// Block (c, tap): dF[c][tap] = Σ_{n, r, s} dy · x, a block-wide reduction (deterministic, no atomics).
template <typename scalar_t, typename acc_t>
__global__ void dwconv_grad_filter_kernel(const scalar_t* __restrict__ x, Strides4 sx, const scalar_t* __restrict__ gy,
                                          Strides4 sg, acc_t* __restrict__ grad_filters, Dims d) {
  __shared__ acc_t partial[kThreads];
  const int64_t c = blockIdx.x;
  const int tap = blockIdx.y, i = tap / d.k, j = tap % d.k;
  const int64_t total = d.n * d.oh * d.ow;
  acc_t acc = 0;
  for (int64_t e = threadIdx.x; e < total; e += blockDim.x) {
    const int64_t ow = e % d.ow, oh = (e / d.ow) % d.oh, n = e / (d.ow * d.oh);
    const int64_t ih = oh * d.stride + i - d.pad, iw = ow * d.stride + j - d.pad;
    if (ih < 0 || ih >= d.h || iw < 0 || iw >= d.w) continue;
    acc += static_cast<acc_t>(gy[n * sg.n + c * sg.c + oh * sg.h + ow * sg.w]) *
           static_cast<acc_t>(x[n * sx.n + c * sx.c + ih * sx.h + iw * sx.w]);
  }
  partial[threadIdx.x] = acc;
  __syncthreads();
  for (int half = blockDim.x / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) partial[threadIdx.x] += partial[threadIdx.x + half];
    __syncthreads();
  }
  if (threadIdx.x == 0) grad_filters[c * d.k * d.k + tap] = partial[0];
}

int grid_for(int64_t total) {
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  return static_cast<int>(std::min<int64_t>(blocks, 65535 * 8));
}

Dims dims_of(const at::Tensor& x, const at::Tensor& weight, int64_t k, int64_t stride) {
  return {x.size(0), x.size(1), x.size(2), x.size(3), dwconv_out_size(x.size(2), k, stride),
          dwconv_out_size(x.size(3), k, stride), static_cast<int>(k), static_cast<int>(stride),
          static_cast<int>(k / 2), static_cast<int>(weight.size(2))};
}

template <typename weight_t>
TransformChain<weight_t> chain_of(const std::vector<at::Tensor>& mats, const std::vector<int64_t>& sizes) {
  TransformChain<weight_t> chain{};
  chain.count = static_cast<int>(mats.size());
  for (size_t i = 0; i < mats.size(); ++i) {
    chain.mats[i] = mats[i].data_ptr<weight_t>();
    chain.sizes[i] = static_cast<int>(sizes[i]);
  }
  return chain;
}

std::vector<int64_t> check_cuda_args(const at::Tensor& x, const at::Tensor& weight, int64_t k, int64_t stride,
                                     at::TensorList transforms) {
  auto sizes = check_elastic_dwconv_args(x, weight, k, stride, transforms);
  TORCH_CHECK(x.is_cuda(), "x must be a CUDA tensor for the CUDA kernel, got ", x.device());
  TORCH_CHECK(transforms.size() <= kMaxTransforms, "the CUDA kernel takes at most ", kMaxTransforms,
              " transforms, got ", transforms.size());
  return sizes;
}

std::vector<at::Tensor> contiguous_all(at::TensorList tensors) {
  std::vector<at::Tensor> out;
  for (const auto& t : tensors) out.push_back(t.contiguous());
  return out;
}

template <typename weight_t, typename acc_t>
at::Tensor active_filters(const at::Tensor& weight, const std::vector<at::Tensor>& mats,
                          const std::vector<int64_t>& sizes, int64_t k, int64_t channels, cudaStream_t stream) {
  const int big = static_cast<int>(weight.size(2));
  at::Tensor filters = at::empty({channels, k * k}, weight.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  const size_t shared = 2 * big * big * sizeof(acc_t);
  active_filter_kernel<weight_t, acc_t><<<channels, 64, shared, stream>>>(
      weight.data_ptr<weight_t>(), chain_of<weight_t>(mats, sizes), big, static_cast<int>(k),
      filters.data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return filters;
}

// The (C, k·k) active filters in acc_t from weights of x's type, or of float32 in mixed precision.
template <typename scalar_t, typename acc_t>
at::Tensor active_filters_for(const at::Tensor& x, const at::Tensor& weight, const std::vector<at::Tensor>& mats,
                              const std::vector<int64_t>& sizes, int64_t k, int64_t channels, cudaStream_t stream) {
  if (is_mixed_precision(x, weight)) return active_filters<float, acc_t>(weight, mats, sizes, k, channels, stream);
  return active_filters<scalar_t, acc_t>(weight, mats, sizes, k, channels, stream);
}

// Walks the filter gradient back through the chain: grad_weight (weight_t, when defined) and the
// matrices' gradients, atomically added into grad_mats_acc (acc_t, when defined).
template <typename weight_t, typename acc_t>
void active_filters_backward(const at::Tensor& weight, const std::vector<at::Tensor>& mats,
                             const std::vector<int64_t>& sizes, int64_t k, int64_t channels,
                             const at::Tensor& grad_filters, at::Tensor* grad_weight, at::Tensor* grad_mats_acc,
                             int64_t window_total, cudaStream_t stream) {
  const int big = static_cast<int>(weight.size(2));
  const size_t shared = (window_total + 2 * big * big) * sizeof(acc_t);
  active_filter_backward_kernel<weight_t, acc_t><<<weight.size(0), 64, shared, stream>>>(
      weight.data_ptr<weight_t>(), chain_of<weight_t>(mats, sizes), big, static_cast<int>(k), channels,
      grad_filters.data_ptr<acc_t>(), grad_weight ? grad_weight->data_ptr<weight_t>() : nullptr,
      grad_mats_acc ? grad_mats_acc->data_ptr<acc_t>() : nullptr, static_cast<int>(window_total));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The tiled kernels (elastic_dwconv_tiled.h) serve K ∈ {3, 5, 7}, stride ∈ {1, 2} in float32, float16
// and bfloat16; float64 keeps the per-element kernels (a testing dtype; K×K register tiles would spill).
template <typename scalar_t>
constexpr bool kTiledDtype = !std::is_same_v<scalar_t, double>;

tiled::Problem tiled_problem(const Dims& d, bool channels_last) {
  return {d.n, d.c, d.h, d.w, d.oh, d.ow, d.k, d.stride, channels_last};
}

at::Tensor elastic_dwconv2d_forward_cuda(const at::Tensor& x, const at::Tensor& weight_arg, int64_t k, int64_t stride,
                                         at::TensorList transforms_arg) {
  const auto sizes = check_cuda_args(x, weight_arg, k, stride, transforms_arg);
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::MemoryFormat format = dwconv_memory_format(x);
  const Dims d = dims_of(x, weight_arg, k, stride);
  at::Tensor y = at::empty({d.n, d.c, d.oh, d.ow}, x.options().memory_format(format));
  if (y.numel() == 0) return y;
  const at::Tensor weight = weight_arg.contiguous();
  const auto mats = contiguous_all(transforms_arg);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "elastic_dwconv2d_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor filters = active_filters_for<scalar_t, acc_t>(x, weight, mats, sizes, k, d.c, stream);
    const bool channels_last = format == at::MemoryFormat::ChannelsLast;
    if constexpr (kTiledDtype<scalar_t>)
      if (tiled::forward<scalar_t>(x, filters, y, tiled_problem(d, channels_last), stream)) return;
    const int64_t total = y.numel();
    dwconv_forward_kernel<scalar_t, acc_t><<<grid_for(total), kThreads, 0, stream>>>(
        x.data_ptr<scalar_t>(), strides_of(x), filters.data_ptr<acc_t>(), y.data_ptr<scalar_t>(), strides_of(y), d,
        channels_last, total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> elastic_dwconv2d_backward_cuda(
    const at::Tensor& grad_output_arg, const at::Tensor& x, const at::Tensor& weight_arg, int64_t k, int64_t stride,
    at::TensorList transforms_arg, std::array<bool, 3> output_mask) {
  const auto sizes = check_cuda_args(x, weight_arg, k, stride, transforms_arg);
  check_grad_output(grad_output_arg, x, k, stride);
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::MemoryFormat format = dwconv_memory_format(x);
  const Dims d = dims_of(x, weight_arg, k, stride);
  const at::Tensor weight = weight_arg.contiguous();
  const auto mats = contiguous_all(transforms_arg);
  const at::Tensor grad_y = grad_output_arg.to(x.scalar_type());
  const bool need_x = output_mask[0], need_weight = output_mask[1];
  const bool need_mats = output_mask[2] && !mats.empty();
  // Masked-off gradients are (0,) tensors, each its own: op outputs must not alias one another.
  const auto empty = [&] { return at::empty({0}, x.options()); };
  at::Tensor grad_x = need_x ? at::empty_like(x, format) : empty();
  at::Tensor grad_weight = need_weight ? at::empty_like(weight, at::MemoryFormat::Contiguous) : empty();
  std::vector<at::Tensor> grad_mats;
  for (size_t i = 0; i < mats.size(); ++i) grad_mats.push_back(empty());
  if (!need_x && !need_weight && !need_mats) return {grad_x, grad_weight, grad_mats};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "elastic_dwconv2d_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor filters = active_filters_for<scalar_t, acc_t>(x, weight, mats, sizes, k, d.c, stream);
    const bool channels_last = format == at::MemoryFormat::ChannelsLast;
    if (need_x && grad_x.numel() > 0) {
      bool done = false;
      if constexpr (kTiledDtype<scalar_t>)
        done = tiled::grad_input<scalar_t>(grad_y, filters, grad_x, tiled_problem(d, channels_last), stream);
      if (!done) {
        const int64_t total = grad_x.numel();
        dwconv_grad_input_kernel<scalar_t, acc_t><<<grid_for(total), kThreads, 0, stream>>>(
            grad_y.data_ptr<scalar_t>(), strides_of(grad_y), filters.data_ptr<acc_t>(), grad_x.data_ptr<scalar_t>(),
            strides_of(grad_x), d, channels_last, total);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    }
    if (!need_weight && !need_mats) return;
    const auto acc_options = x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    at::Tensor grad_filters;
    if constexpr (kTiledDtype<scalar_t>)
      if (d.n > 0 && d.c > 0 && d.oh > 0 && d.ow > 0)
        grad_filters = tiled::grad_filters<scalar_t>(x, grad_y, tiled_problem(d, channels_last), stream);
    if (!grad_filters.defined()) {
      grad_filters = at::zeros({d.c, k * k}, acc_options);
      if (d.n > 0) {
        dwconv_grad_filter_kernel<scalar_t, acc_t><<<dim3(d.c, k * k), kThreads, 0, stream>>>(
            x.data_ptr<scalar_t>(), strides_of(x), grad_y.data_ptr<scalar_t>(), strides_of(grad_y),
            grad_filters.data_ptr<acc_t>(), d);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    }
    int64_t window_total = 0, matrix_total = 0;
    for (int64_t t : sizes) window_total += t * t, matrix_total += t * t * t * t;
    at::Tensor grad_mats_acc = at::zeros({need_mats ? matrix_total : 0}, acc_options);
    at::Tensor* gw = need_weight ? &grad_weight : nullptr;
    at::Tensor* gm = need_mats ? &grad_mats_acc : nullptr;
    if (is_mixed_precision(x, weight))
      active_filters_backward<float, acc_t>(weight, mats, sizes, k, d.c, grad_filters, gw, gm, window_total, stream);
    else
      active_filters_backward<scalar_t, acc_t>(weight, mats, sizes, k, d.c, grad_filters, gw, gm, window_total,
                                               stream);
    if (need_mats) {
      int64_t offset = 0;
      for (size_t i = 0; i < mats.size(); ++i) {
        const int64_t tt = sizes[i] * sizes[i];
        // copy: views of one buffer would alias each other, which op outputs must not.
        grad_mats[i] = grad_mats_acc.narrow(0, offset, tt * tt).view({tt, tt}).to(mats[i].scalar_type(), false, true);
        offset += tt * tt;
      }
    }
  });
  return {grad_x, grad_weight, grad_mats};
}

}  // namespace
}  // namespace tofa_fast

TORCH_LIBRARY_IMPL(tofa_fast, CUDA, m) {
  m.impl("_elastic_dwconv2d_compiled_forward", &tofa_fast::elastic_dwconv2d_forward_cuda);
  m.impl("_elastic_dwconv2d_compiled_backward", &tofa_fast::elastic_dwconv2d_backward_cuda);
}
