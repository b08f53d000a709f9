// CPU kernels of the elastic depthwise convolution (forward, input gradient, weight gradient).
//
// Per call:
//   1. the active filter (centre slice + transform chain) of the C used channels in one parallel
//      loop over channels (no chain of small ATen ops), repacked into [k][k][lanes] channel blocks;
//   2. the convolution in vectorised tile kernels (dwconv_tiles.h), parallel over
//      (sample, channel block) for the forward and over (channel block, batch chunk) for the
//      backward, which computes grad_x and the filter gradient from the same tiles;
//   3. backward only: the filter gradient walked back through the transform chain in one parallel
//      loop over channel groups, giving the full-weight gradient and every matrix's gradient.
// Batch chunks and channel groups have fixed sizes, so results do not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

#include "../elastic_dwconv.h"
#include "dwconv_tiles.h"

namespace tofa_fast {
namespace cpu {

namespace {

std::string requested_isa() {
  const char* env = std::getenv("TOFA_FAST_CPU_ISA");
  return env == nullptr ? std::string() : std::string(env);
}

bool cpu_has_avx512() {
#if TOFA_FAST_X86_ISA_PATHS
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
#else
  return false;
#endif
}

bool cpu_has_avx2() {
#if TOFA_FAST_X86_ISA_PATHS
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

// 0 = baseline, 1 = AVX2, 2 = AVX-512: the best the CPU runs, capped by TOFA_FAST_CPU_ISA.
int selected_level() {
  static const int level = [] {
    const std::string want = requested_isa();
    int cap = 2;
    if (want == "avx2") cap = 1;
    if (want == "baseline") cap = 0;
    if (cap >= 2 && cpu_has_avx512()) return 2;
    if (cap >= 1 && cpu_has_avx2()) return 1;
    return 0;
  }();
  return level;
}

}  // namespace

template <>
const DwconvTileKernels<float>& select_tile_kernels<float>() {
#if TOFA_FAST_X86_ISA_PATHS
  if (selected_level() == 2) return isa_avx512::kernels_float;
  if (selected_level() == 1) return isa_avx2::kernels_float;
#endif
  return isa_baseline::kernels_float;
}

template <>
const DwconvTileKernels<double>& select_tile_kernels<double>() {
#if TOFA_FAST_X86_ISA_PATHS
  if (selected_level() == 2) return isa_avx512::kernels_double;
  if (selected_level() == 1) return isa_avx2::kernels_double;
#endif
  return isa_baseline::kernels_double;
}

std::string tile_kernels_description() {
  const auto& k = select_tile_kernels<float>();
  return std::string(k.isa) + " (" + std::to_string(k.lanes) + " float lanes)";
}

}  // namespace cpu

namespace {

// Copies of the inputs the kernels read with plain pointer arithmetic.
struct DenseInputs {
  at::MemoryFormat format;
  at::Tensor x, weight;
  std::vector<at::Tensor> transforms;
  std::vector<int64_t> sizes;  // target size of each transform
};

DenseInputs dense_inputs(const at::Tensor& x, const at::Tensor& weight, int64_t kernel_size, int64_t stride,
                         at::TensorList transforms) {
  DenseInputs in;
  in.sizes = check_elastic_dwconv_args(x, weight, kernel_size, stride, transforms);
  TORCH_CHECK(x.device().is_cpu(), "x must be a CPU tensor for the C++ kernel, got ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "the C++ CPU kernel is compiled for float32 and float64, got x of dtype ", x.scalar_type());
  TORCH_CHECK(cpu::tile_kernels_support(kernel_size, stride),
              "the C++ CPU kernel is compiled for kernel_size in {1, 3, 5, 7} and stride 1 or 2, got kernel_size=",
              kernel_size, ", stride=", stride);
  in.format = dwconv_memory_format(x);
  in.x = x.contiguous(in.format);
  in.weight = weight.contiguous();
  for (const auto& m : transforms) in.transforms.push_back(m.contiguous());
  return in;
}

cpu::DwconvGeometry geometry(const at::Tensor& x, int64_t kernel_size, int64_t stride, at::MemoryFormat format) {
  return {x.size(0),
          x.size(1),
          x.size(2),
          x.size(3),
          dwconv_out_size(x.size(2), kernel_size, stride),
          dwconv_out_size(x.size(3), kernel_size, stride),
          static_cast<int>(kernel_size),
          static_cast<int>(stride),
          static_cast<int>(kernel_size / 2),
          format == at::MemoryFormat::ChannelsLast};
}

template <typename T>
std::vector<const T*> matrix_pointers(const std::vector<at::Tensor>& transforms) {
  std::vector<const T*> out;
  for (const auto& m : transforms) out.push_back(m.data_ptr<T>());
  return out;
}

// filters[c] (k×k, c < channels) = the transform chain applied to weight[c], one pass per channel.
template <typename T>
void active_filter_forward(const T* weight, int64_t big, const std::vector<const T*>& mats,
                           const std::vector<int64_t>& sizes, int64_t k, int64_t channels, T* filters) {
  at::parallel_for(0, channels, 64, [&](int64_t begin, int64_t end) {
    std::vector<T> window(big * big), current(big * big);
    for (int64_t c = begin; c < end; ++c) {
      const T* cur = weight + c * big * big;
      int64_t size = big;
      for (size_t i = 0; i < mats.size(); ++i) {
        const int64_t t = sizes[i], tt = t * t, off = (size - t) / 2;
        for (int64_t r = 0; r < t; ++r)
          for (int64_t s = 0; s < t; ++s) window[r * t + s] = cur[(r + off) * size + s + off];
        const T* m = mats[i];
        for (int64_t q = 0; q < tt; ++q) {
          T acc = 0;
          for (int64_t p = 0; p < tt; ++p) acc += m[q * tt + p] * window[p];
          current[q] = acc;
        }
        cur = current.data();
        size = t;
      }
      const int64_t off = (size - k) / 2;
      for (int64_t r = 0; r < k; ++r)
        for (int64_t s = 0; s < k; ++s) filters[(c * k + r) * k + s] = cur[(r + off) * size + s + off];
    }
  });
}

// Walks grad_filters (channels×k×k) back through the chain: grad_weight (C_max×K×K, zero-filled by
// the caller, or null) and grad_mats (zero-filled, or empty). Per channel: recompute the windows,
// then for each step back from k: dM += g ⊗ window, g ← centre-padded Mᵀ g.
template <typename T>
void active_filter_backward(const T* weight, int64_t big, const std::vector<const T*>& mats,
                            const std::vector<int64_t>& sizes, int64_t k, int64_t channels, const T* grad_filters,
                            T* grad_weight, const std::vector<T*>& grad_mats) {
  constexpr int64_t kGroup = 64;  // channels per partial sum of the matrix gradients
  const int64_t steps = static_cast<int64_t>(mats.size());
  std::vector<int64_t> window_offset(steps + 1, 0), matrix_offset(steps + 1, 0);
  for (int64_t i = 0; i < steps; ++i) {
    window_offset[i + 1] = window_offset[i] + sizes[i] * sizes[i];
    matrix_offset[i + 1] = matrix_offset[i] + sizes[i] * sizes[i] * sizes[i] * sizes[i];
  }
  const int64_t groups = (channels + kGroup - 1) / kGroup;
  const bool want_mats = !grad_mats.empty();
  std::vector<T> partial(want_mats ? groups * matrix_offset[steps] : 0, T(0));
  at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> windows(window_offset[steps]), current(big * big), grad(big * big), padded(big * big);
    for (int64_t group = begin; group < end; ++group) {
      T* part = want_mats ? partial.data() + group * matrix_offset[steps] : nullptr;
      for (int64_t c = group * kGroup; c < std::min(channels, (group + 1) * kGroup); ++c) {
        const T* cur = weight + c * big * big;
        int64_t size = big;
        for (int64_t i = 0; i < steps; ++i) {
          const int64_t t = sizes[i], tt = t * t, off = (size - t) / 2;
          T* window = windows.data() + window_offset[i];
          for (int64_t r = 0; r < t; ++r)
            for (int64_t s = 0; s < t; ++s) window[r * t + s] = cur[(r + off) * size + s + off];
          for (int64_t q = 0; q < tt; ++q) {
            T acc = 0;
            for (int64_t p = 0; p < tt; ++p) acc += mats[i][q * tt + p] * window[p];
            current[q] = acc;
          }
          cur = current.data();
          size = t;
        }
        std::memcpy(grad.data(), grad_filters + c * k * k, k * k * sizeof(T));
        int64_t gsize = k;
        for (int64_t i = steps - 1; i >= 0; --i) {
          const int64_t t = sizes[i], tt = t * t;
          const T* window = windows.data() + window_offset[i];
          if (want_mats) {
            T* dm = part + matrix_offset[i];
            for (int64_t q = 0; q < tt; ++q)
              for (int64_t p = 0; p < tt; ++p) dm[q * tt + p] += grad[q] * window[p];
          }
          const int64_t prev = i == 0 ? big : sizes[i - 1], off = (prev - t) / 2;
          std::fill(padded.begin(), padded.begin() + prev * prev, T(0));
          for (int64_t p = 0; p < tt; ++p) {
            T acc = 0;
            for (int64_t q = 0; q < tt; ++q) acc += mats[i][q * tt + p] * grad[q];
            padded[(p / t + off) * prev + p % t + off] = acc;
          }
          std::swap(grad, padded);
          gsize = prev;
        }
        if (grad_weight != nullptr) {
          T* dst = grad_weight + c * big * big;
          const int64_t off = (big - gsize) / 2;
          for (int64_t r = 0; r < gsize; ++r)
            for (int64_t s = 0; s < gsize; ++s) dst[(r + off) * big + s + off] = grad[r * gsize + s];
        }
      }
    }
  });
  for (int64_t i = 0; i < steps && want_mats; ++i) {
    const int64_t count = matrix_offset[i + 1] - matrix_offset[i];
    for (int64_t group = 0; group < groups; ++group) {
      const T* src = partial.data() + group * matrix_offset[steps] + matrix_offset[i];
      for (int64_t e = 0; e < count; ++e) grad_mats[i][e] += src[e];
    }
  }
}

// [C][k][k] → [blocks][k][k][lanes], zero lanes past C.
template <typename T>
std::vector<T> pack_filter_blocks(const std::vector<T>& filters, int64_t channels, int64_t kk, int64_t lanes) {
  const int64_t blocks = (channels + lanes - 1) / lanes;
  std::vector<T> packed(blocks * kk * lanes, T(0));
  for (int64_t c = 0; c < channels; ++c)
    for (int64_t tap = 0; tap < kk; ++tap) packed[((c / lanes) * kk + tap) * lanes + c % lanes] = filters[c * kk + tap];
  return packed;
}

at::Tensor elastic_dwconv2d_forward_cpu(const at::Tensor& x_arg, const at::Tensor& weight_arg, int64_t kernel_size,
                                        int64_t stride, at::TensorList transforms_arg) {
  const DenseInputs in = dense_inputs(x_arg, weight_arg, kernel_size, stride, transforms_arg);
  const cpu::DwconvGeometry g = geometry(in.x, kernel_size, stride, in.format);
  at::Tensor y = at::empty({g.batch, g.channels, g.out_height, g.out_width}, in.x.options().memory_format(in.format));
  if (y.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES(in.x.scalar_type(), "elastic_dwconv2d_forward_cpu", [&] {
    const auto& kernels = cpu::select_tile_kernels<scalar_t>();
    const int64_t lanes = kernels.lanes, kk = kernel_size * kernel_size;
    const int64_t blocks = (g.channels + lanes - 1) / lanes;
    std::vector<scalar_t> filters(g.channels * kk);
    active_filter_forward(in.weight.data_ptr<scalar_t>(), in.weight.size(2), matrix_pointers<scalar_t>(in.transforms),
                          in.sizes, kernel_size, g.channels, filters.data());
    const std::vector<scalar_t> packed = pack_filter_blocks(filters, g.channels, kk, lanes);
    const scalar_t* x = in.x.data_ptr<scalar_t>();
    scalar_t* out = y.data_ptr<scalar_t>();
    const size_t scratch = kernels.forward_scratch(g);
    at::parallel_for(0, g.batch * blocks, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> buffer(scratch, scalar_t(0));
      for (int64_t task = begin; task < end; ++task) {
        const int64_t n = task / blocks, block = task % blocks;
        kernels.forward_block(g, x, out, packed.data() + block * kk * lanes, n, block * lanes, buffer.data());
      }
    });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> elastic_dwconv2d_backward_cpu(
    const at::Tensor& grad_output_arg, const at::Tensor& x_arg, const at::Tensor& weight_arg, int64_t kernel_size,
    int64_t stride, at::TensorList transforms_arg, std::array<bool, 3> output_mask) {
  const DenseInputs in = dense_inputs(x_arg, weight_arg, kernel_size, stride, transforms_arg);
  check_grad_output(grad_output_arg, x_arg, kernel_size, stride);
  const cpu::DwconvGeometry g = geometry(in.x, kernel_size, stride, in.format);
  const at::Tensor grad_y = grad_output_arg.to(in.x.scalar_type()).contiguous(in.format);
  const bool need_x = output_mask[0], need_weight = output_mask[1];
  const bool need_mats = output_mask[2] && !in.transforms.empty();
  const bool need_filter = need_weight || need_mats;
  // Masked-off gradients are (0,) tensors, each its own: op outputs must not alias one another.
  const auto empty = [&] { return at::empty({0}, in.x.options()); };
  at::Tensor grad_x = need_x ? at::empty_like(in.x, in.format) : empty();
  at::Tensor grad_weight = need_weight ? at::zeros_like(in.weight, at::MemoryFormat::Contiguous) : empty();
  std::vector<at::Tensor> grad_mats;
  for (const auto& m : in.transforms) grad_mats.push_back(output_mask[2] ? at::zeros_like(m) : empty());
  if (g.batch == 0 || (!need_x && !need_filter)) return {grad_x, grad_weight, grad_mats};

  AT_DISPATCH_FLOATING_TYPES(in.x.scalar_type(), "elastic_dwconv2d_backward_cpu", [&] {
    const auto& kernels = cpu::select_tile_kernels<scalar_t>();
    const int64_t lanes = kernels.lanes, kk = kernel_size * kernel_size;
    const int64_t blocks = (g.channels + lanes - 1) / lanes;
    const auto mats = matrix_pointers<scalar_t>(in.transforms);
    const int64_t big = in.weight.size(2);
    std::vector<scalar_t> filters(g.channels * kk);
    active_filter_forward(in.weight.data_ptr<scalar_t>(), big, mats, in.sizes, kernel_size, g.channels,
                          filters.data());
    const std::vector<scalar_t> packed = pack_filter_blocks(filters, g.channels, kk, lanes);
    // Enough (block, batch chunk) tasks to balance any core count; the split depends on shapes only.
    const int64_t chunks = std::min<int64_t>(g.batch, std::max<int64_t>(1, (64 + blocks - 1) / blocks));
    std::vector<scalar_t> partial(need_filter ? chunks * blocks * kk * lanes : 0, scalar_t(0));
    const scalar_t* x = in.x.data_ptr<scalar_t>();
    const scalar_t* gy = grad_y.data_ptr<scalar_t>();
    scalar_t* gx = need_x ? grad_x.data_ptr<scalar_t>() : nullptr;
    const size_t scratch = kernels.backward_scratch(g);
    at::parallel_for(0, chunks * blocks, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> buffer(scratch, scalar_t(0));
      for (int64_t task = begin; task < end; ++task) {
        const int64_t chunk = task / blocks, block = task % blocks;
        const int64_t n0 = g.batch * chunk / chunks, n1 = g.batch * (chunk + 1) / chunks;
        scalar_t* gf = need_filter ? partial.data() + task * kk * lanes : nullptr;
        kernels.backward_block(g, x, gy, gx, packed.data() + block * kk * lanes, gf, n0, n1, block * lanes,
                               buffer.data());
      }
    });
    if (!need_filter) return;
    std::vector<scalar_t> grad_filters(g.channels * kk, scalar_t(0));
    for (int64_t chunk = 0; chunk < chunks; ++chunk)
      for (int64_t c = 0; c < g.channels; ++c)
        for (int64_t tap = 0; tap < kk; ++tap)
          grad_filters[c * kk + tap] += partial[((chunk * blocks + c / lanes) * kk + tap) * lanes + c % lanes];
    std::vector<scalar_t*> mat_grads;
    if (need_mats)
      for (auto& m : grad_mats) mat_grads.push_back(m.data_ptr<scalar_t>());
    active_filter_backward(in.weight.data_ptr<scalar_t>(), big, mats, in.sizes, kernel_size, g.channels,
                           grad_filters.data(), need_weight ? grad_weight.data_ptr<scalar_t>() : nullptr, mat_grads);
  });
  return {grad_x, grad_weight, grad_mats};
}

}  // namespace
}  // namespace tofa_fast

TORCH_LIBRARY_IMPL(tofa_fast, CPU, m) {
  m.impl("_elastic_dwconv2d_compiled_forward", &tofa_fast::elastic_dwconv2d_forward_cpu);
  m.impl("_elastic_dwconv2d_compiled_backward", &tofa_fast::elastic_dwconv2d_backward_cpu);
}
