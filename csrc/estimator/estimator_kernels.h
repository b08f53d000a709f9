// Row kernel of the batched estimator (estimator.cpp): the table layout (layout.py) compiled into a
// flat "row program" — compile_plan in estimator.cpp builds it —, and the AVX2 kernel that runs it
// (estimator_avx2.cpp).
//
// The program turns every check of a code row into data, so that the kernel has no branch on the
// row's contents beyond "is this row valid":
//
// * a *static* check: for each position p of the row, allowed[p] has bit (v + 1) set when value v
//   may stand there whatever the other fields hold (resolution/stem/head/width/depth in range;
//   kernel and expand in range or -1, never -1 at layer 0; expand allowed at that layer). AVX2
//   checks eight positions with one variable shift (vpsrlvd gives 0 for shift counts ≥ 32, so
//   values outside -1..30 fail too; hence at most 31 choices per field);
// * a *dynamic* check per stage: layers at or beyond the row's depth hold -1 and active ones do
//   not (kInactive lane masks, one row per depth index); in a stage-granularity space, active
//   layers also repeat layer 0's kernel and expand;
// * table sums through strides: every lookup index is a dot product of a few fields with
//   precomputed strides, one vector lane per stage. Layer-granularity stages add all their later
//   layers from a padded copy of the later-layer block indexed by (k + 1, e + 1), whose k = -1 /
//   e = -1 slots hold the additive identity (-0.0 for floats): inactive layers add nothing, and the
//   sum is bit for bit the one over the active layers in the same order (the scalar kernel's).
//
// This header holds plain data and raw pointers only (no ATen, no std containers): the AVX2
// translation unit (estimator_avx2.cpp) is compiled with wider target options, and must not emit
// any inline library function that the rest of the program could end up calling.
#pragma once

#include "../cpu_isa.h"

#include <cstdint>

namespace tofa_fast::estimator {

// Limits of the row program; compile_plan leaves plans beyond them to the scalar kernel.
constexpr int kLanes = 8;       // int32 lanes of one AVX2 vector; also the deepest stage (one lane per layer)
constexpr int kMaxStages = 8;   // one lane per stage in the index vectors
constexpr int kMaxStatic = 21;  // static-check vectors: code_length ≤ 168 (8 stages of depth 8 need 147)
constexpr int kDepthRows = 32;  // depth indices pass the static check only below 32; the kernel masks to 5 bits

struct StageProgram {
  int64_t code_offset;    // w at [0], depth index at [1], kernels at [2, 2 + max_depth), expands after
  int64_t expand_offset;  // code_offset + 2 + max_depth
  int64_t max_depth;      // ≤ kLanes
  int64_t later_k_stride;  // layer granularity: n_expands + 1 (see RowProgram::lanes)
};

// Per-stage lane tables (RowProgram::stage_lanes, kStageRows × kLanes int32 per stage).
enum StageRow : int {
  // [kInactive + d]: lane j is -1 when layer j is at or beyond depth index d's depth (0 otherwise).
  // Rows d ≥ n_depths are all 0: the static check rejects such a depth index anyway.
  kInactive = 0,
  // [kDepthOffset + d]: d · d_stride in lane s (stage granularity), 0 in the other lanes.
  kDepthOffset = kDepthRows,
  // Which lanes of the dynamic check count (lanes ≥ max_depth read the next fields): -1 in
  // stage-granularity spaces (every bit must match), the sign bit in layer-granularity ones (only
  // "is it -1" is checked there; the static check covers the rest).
  kCare = 2 * kDepthRows,
  kStageRows
};

// Rows of RowProgram::lanes (int32, lane s for stage s, 0 in lanes ≥ n_stages).
enum IndexLane : int {
  kBase, kRStride, kInStride, kWStride, kKStride,  // the whole stage / its first layer
  kLaterBase, kLaterRStride, kLaterWStride,        // later layers (layer granularity)
  kIndexLanes
};

struct RowProgram {
  int64_t code_length;  // ≥ kLanes
  int64_t n_stages;     // ≤ kMaxStages
  bool stage_granularity;
  int64_t stem_offset, n_stem;          // stem: stem_offset + r · n_stem + s
  int64_t head_offset, n_last, n_head;  // head: head_offset + (r · n_last + w_last) · n_head + h
  int64_t last_width_offset;            // code position of the last stage's width
  int64_t n_static;                     // static vectors: positions [8v, 8v + 8), the last at code_length - 8
  const uint32_t* allowed;              // n_static × kLanes allowed-bit masks (see above)
  const StageProgram* stages;
  const int32_t* stage_lanes;           // n_stages × kStageRows × kLanes (StageRow)
  // kIndexLanes × kLanes. Stage s's whole-stage (stage granularity) or first-layer lookup is
  //   base + r · r_stride + w_in · in_stride + w · w_stride + d · d_stride + k0 · k_stride + e0
  // in the table (the d term from kDepthOffset; none with layer granularity); its later layers
  // j ≥ 1 are
  //   later_base + r · later_r_stride + w · later_w_stride + k_j · later_k_stride + e_j
  // in the padded later table (later_base includes the + later_k_stride + 1 of the padding).
  const int32_t* lanes;
  // Reads reach up to this many int32 past the start of a row (≥ code_length): rows closer than
  // that to the end of the buffer are copied into a padded scratch row first.
  int64_t read_extent;
};

// sum_rows_*: sums rows [begin, end) of `codes` (code_length int32 each) into out[begin, end). Rows
// at index ≥ safe_end are first copied into `scratch` (read_extent int32, zero past code_length).
// `later` is the padded later-layer table (never null; unused with stage granularity). Returns the
// first row in [begin, end) that is not a valid code (its out entry is left unspecified, later rows
// are not summed), or end.
#if TOFA_FAST_X86_ISA_PATHS
#define TOFA_FAST_ESTIMATOR_AVX2 1
namespace isa_avx2 {
int64_t sum_rows_i64(const int32_t* codes, int64_t begin, int64_t end, int64_t safe_end, const RowProgram& program,
                     const int64_t* table, const int64_t* later, int64_t* out, int32_t* scratch);
int64_t sum_rows_f64(const int32_t* codes, int64_t begin, int64_t end, int64_t safe_end, const RowProgram& program,
                     const double* table, const double* later, double* out, int32_t* scratch);
}  // namespace isa_avx2
#else
#define TOFA_FAST_ESTIMATOR_AVX2 0
#endif

}  // namespace tofa_fast::estimator
