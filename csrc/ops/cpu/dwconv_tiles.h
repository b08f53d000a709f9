// Interface of the vectorised CPU depthwise-convolution tile kernels.
//
// Layout. The kernels work on blocks of `lanes` channels (one SIMD vector: 16 floats with AVX-512)
// stored pixel-major: a tile pixel is one vector holding the block's channels. Every pixel of a
// small plane then fills whole vectors (an 8×8 or 4×4 MobileNet plane wastes no lanes), NHWC
// tensors load with plain vector copies and NCHW tensors with in-register transposes. Tiles carry
// zero borders, so the inner loops have no bounds checks.
//
// Each ISA (AVX-512, AVX2+FMA, baseline) compiles the same source (dwconv_tiles_impl.h) under its
// own target options in its own translation unit (simd_kernels_<isa>.cpp) and namespace;
// select_tile_kernels() picks the best the running CPU supports (TOFA_FAST_CPU_ISA=avx512|avx2|baseline caps it). This keeps the build
// portable (no -march=native) and still uses the wide vectors where they exist.
//
// These files contain no ATen: only raw pointers, so no library inline function is compiled with
// wider target options than the rest of the program.
#pragma once

#include "../../cpu_isa.h"

#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>

namespace tofa_fast::cpu {

// One depthwise convolution (all sizes in elements / pixels). Tensors are dense NCHW or NHWC.
struct DwconvGeometry {
  int64_t batch, channels, height, width, out_height, out_width;
  int kernel_size, stride, pad;
  bool channels_last;
  // Channels-last only: prefetch the pixels a block reads and writes ahead of use (dwconv_tiles_impl.h,
  // "software prefetch"). Off only to measure what it buys (_set_dwconv_cpu_prefetch).
  bool prefetch = true;
  // Channels-last only: passes of several channel blocks (kMaxBlocksPerPass). Off only to measure what
  // it buys (_set_dwconv_cpu_multi_block).
  bool multi_block = true;
};

// A batch norm + activation applied to every input pixel as the tile loads it (the padding stays
// zero): the kernels then convolve act((x − mean) · scale + bias), per channel, without that tensor
// ever being written (an MBConv's expansion batch norm + activation fused into its depthwise conv).
// The math is the packed batch norm's normalise pass (csrc/ops/cpu/packed_batch_norm_cpu.cpp), so
// both give the same values. The arrays hold the call's `channels` entries.
enum class PrologueActivation : int { kNone = 0, kRelu = 1, kRelu6 = 2, kHswish = 3 };

template <typename T>
struct BnActPrologue {
  const T* mean;
  const T* scale;  // weight · rstd
  const T* bias;
  PrologueActivation activation;
  // Backward, channels-last only: with `rstd` and `weight` set, grad_x comes out as the gradient of
  // the batch norm's output z = x̂ · weight + bias (x̂ = (x − mean) · rstd) instead of act(z)'s —
  // dz = grad · act'(z), the packed batch norm backward's first step — and the block's Σ dz and
  // Σ dz · x̂ are added to the `sums` the caller passes (2 · lanes doubles): what that backward's
  // statistics pass would read grad and x again for.
  const T* rstd = nullptr;
  const T* weight = nullptr;
};

// The most channel blocks one pass takes (the kernels keep per-block state on the stack).
constexpr int64_t kMaxBlocksPerPass = 8;

// A pass covers `nb` consecutive channel blocks [c0, c0 + nb·lanes) of samples [n0, n1): on channels-last
// tensors it reads and writes each pixel's run of those channels at once (dwconv_tiles_impl.h, "several
// channel blocks per pass"). Per-block arrays (filters, filter gradients, sums) hold the pass's blocks
// one after another.
template <typename T>
struct DwconvTileKernels {
  const char* isa;
  int lanes;  // channels per block
  // Scratch (elements of T) one worker needs for passes of up to nb blocks; the caller zero-fills it
  // once before the first pass. The *_block_elems part grows with nb; the rest is shared.
  size_t (*forward_scratch)(const DwconvGeometry&, int64_t nb);
  size_t (*backward_scratch)(const DwconvGeometry&, int64_t nb);
  // y[n, block j] = depthwise conv of x[n, block j] with filters[j] ([k][k][lanes]); of prologue(x)
  // when `prologue` is non-null.
  void (*forward_blocks)(const DwconvGeometry&, const T* x, T* y, const T* filters, int64_t n0, int64_t n1,
                         int64_t c0, int64_t nb, T* scratch, const BnActPrologue<T>* prologue);
  // grad_x (when non-null) and, when grad_filters ([nb][k][k][lanes]) is non-null, grad_filters[j] +=
  // Σ_n Σ_pixels grad_y · x over block j. With a `prologue`, x is read as prologue(x) and grad_x is the
  // gradient with respect to prologue(x); with `sums` too ([nb][2][lanes]), see BnActPrologue.
  void (*backward_blocks)(const DwconvGeometry&, const T* x, const T* grad_y, T* grad_x, const T* filters,
                          T* grad_filters, int64_t n0, int64_t n1, int64_t c0, int64_t nb, T* scratch,
                          const BnActPrologue<T>* prologue, double* sums);
};

#define TOFA_FAST_DECLARE_TILE_KERNELS(ns)                \
  namespace ns {                                          \
  extern const DwconvTileKernels<float> kernels_float;   \
  extern const DwconvTileKernels<double> kernels_double; \
  }

TOFA_FAST_DECLARE_TILE_KERNELS(isa_baseline)
#if TOFA_FAST_X86_ISA_PATHS
TOFA_FAST_DECLARE_TILE_KERNELS(isa_avx2)
TOFA_FAST_DECLARE_TILE_KERNELS(isa_avx512)
#endif

// Kernel sizes and strides the tile kernels are compiled for.
constexpr bool tile_kernels_support(int64_t kernel_size, int64_t stride) {
  return (kernel_size == 1 || kernel_size == 3 || kernel_size == 5 || kernel_size == 7) && (stride == 1 || stride == 2);
}

// The best kernels this CPU runs (capped by TOFA_FAST_CPU_ISA), chosen once per process.
template <typename T>
const DwconvTileKernels<T>& select_tile_kernels();

// "AVX-512 (16 float lanes)"-style description of the selected kernels, for `tofa-fast info`.
std::string tile_kernels_description();

// Turns DwconvGeometry::prefetch on or off for the calls that follow (on by default); returns the
// previous setting. For benchmarks that measure what the prefetch buys, in one process.
bool set_software_prefetch(bool enabled);
// The same for DwconvGeometry::multi_block.
bool set_multi_block_passes(bool enabled);

}  // namespace tofa_fast::cpu
