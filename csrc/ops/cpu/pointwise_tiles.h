// Interface of the vectorised CPU kernels of a 1×1 convolution's backward with the batch norm that
// follows it folded in: an MBConv's expansion (tofa_fast/ops/bn_act_dwconv.py with an expansion).
//
// The problem, on the (P, ·) row views of channels-last maps: y = x · Wᵀ is the expansion (x: P×C
// block input, W: E×C), z = bn(y) feeds the depthwise convolution, whose backward hands back dz and
// the per-channel Σ dz, Σ dz·ŷ. The batch norm's input gradient is then per channel affine in dz and y,
//   dy = gain · (dz − mean_dz − ŷ · mean_dz_yhat),  ŷ = (y − mean) · rstd   (training; gain · dz in eval),
// the packed batch norm's grad_x pass (csrc/ops/cpu/packed_batch_norm_cpu.cpp), and the convolution's
//   dx = dy · W   (P×C)      dW = dyᵀ · x   (E×C).
// Unfused that is three passes over the P×E tensors (read dz and y, write dy) and two more reads of dy
// by the two matrix products. Here a worker takes a tile of rows, computes its dy into a scratch
// buffer that stays in the L1/L2 cache, and multiplies it there: dz and y are read once, dy is never
// written to memory.
//
// Like the depthwise tiles (dwconv_tiles.h), the same source (pointwise_tiles_impl.h) is compiled
// once per ISA, in the same translation units (simd_kernels_<isa>.cpp) and namespaces;
// select_pointwise_kernels() picks the best the CPU runs (TOFA_FAST_CPU_ISA caps it). Raw pointers
// only, no ATen.
#pragma once

#include "../../cpu_isa.h"

#include <cstddef>
#include <cstdint>

namespace tofa_fast::cpu {

// All pointers to dense row-major arrays in the compute dtype T (float for float32 maps, double for
// float64 ones). Per-channel arrays have E entries.
template <typename T>
struct BnGradPointwiseProblem {
  int64_t in_channels;         // C
  int64_t out_channels;        // E
  const T* grad_z;             // P×E: the gradient of the batch norm's output
  const T* y;                  // P×E: the expansion's output (the batch norm's input)
  const T* x;                  // P×C: the block input
  const T* weight_padded;      // E×padded_in(C): W, each row zero-padded to whole vectors
  const T* mean;               // the batch norm's mean and rstd (batch statistics in training)
  const T* rstd;
  const T* gain;               // bn weight · rstd
  const T* mean_dz;            // Σ dz / P and Σ dz·ŷ / P (training; ignored in eval)
  const T* mean_dz_yhat;
  bool training;
};

template <typename T>
struct BnGradPointwiseKernels {
  // Rows per tile.
  int64_t (*tile_rows)(int64_t out_channels);
  // Whole vectors a row of `channels` takes, in elements (the padded row length).
  int64_t (*padded)(int64_t channels);
  // Rows [r0, r1): grad_x rows (P×C, when non-null) and, when grad_weight_t is non-null,
  // grad_weight_t (C × padded(E), dWᵀ) += the tile's contribution. r1 − r0 ≤ tile_rows(E);
  // `scratch`: one worker's tile_rows(E) × padded(E) elements.
  void (*tile)(const BnGradPointwiseProblem<T>&, int64_t r0, int64_t r1, T* grad_x, T* grad_weight_t, T* scratch);
};

#define TOFA_FAST_DECLARE_POINTWISE_KERNELS(ns)                  \
  namespace ns {                                                 \
  extern const BnGradPointwiseKernels<float> pointwise_float;   \
  extern const BnGradPointwiseKernels<double> pointwise_double; \
  }

TOFA_FAST_DECLARE_POINTWISE_KERNELS(isa_baseline)
#if TOFA_FAST_X86_ISA_PATHS
TOFA_FAST_DECLARE_POINTWISE_KERNELS(isa_avx2)
TOFA_FAST_DECLARE_POINTWISE_KERNELS(isa_avx512)
#endif

// The best kernels this CPU runs (capped by TOFA_FAST_CPU_ISA).
template <typename T>
const BnGradPointwiseKernels<T>& select_pointwise_kernels();

}  // namespace tofa_fast::cpu
