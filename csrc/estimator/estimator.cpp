// Batched efficiency estimation: sum the per-part lookup-table entries of many encoded archs.
//
//   tofa_fast::estimator_sum(Tensor codes, Tensor header, Tensor plan, Tensor depths,
//                            Tensor expand_masks, Tensor table) -> Tensor
//
// codes:  int32 (n, code_length), the rows of SearchSpace.encode (choice indices, -1 past the depth).
// header: int64 (10,), plan: int64 (n_stages, 9), depths: int64 (n_stages, >= max #depth choices),
// expand_masks: int64 (n_stages, >= max depth), bit e set when that layer allows expand index e,
//         table: int64 or float64 (table_size,) — built by tofa_fast/estimator/layout.py, whose module
//         docstring documents the layout; table_sum_reference there is the pure-Python reference.
// Returns (n,) of the table's dtype: FLOPs / parameters (int64, exact) or latency (float64).
//
// Every row is validated while it is summed (ranges, -1 beyond the active depth, one kernel/expand
// per stage in stage-granularity spaces, expands allowed at their layer): codes of another space or
// corrupted codes raise a ValueError naming the first bad row and field, never read outside the table.
//
// Two kernels compute the same sums and reject the same rows: on CPUs with AVX2 the plan is compiled
// into a row program without data-dependent branches (compile_plan; estimator_kernels.h,
// estimator_avx2.cpp); elsewhere, with TOFA_FAST_CPU_ISA=baseline, or for a plan beyond the
// program's limits (more than 8 stages, 31 choices of a field or 8 layers in a stage, codes shorter
// than 8), the scalar sum_row below runs. Both add float entries in the same order, so even latency
// sums are identical bit for bit (tests/test_estimator_kernels.py).
#include "estimator_kernels.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

namespace tofa_fast {
namespace estimator {
namespace {

// Indices into `header` and into a row of `plan` (HEADER_FIELDS / STAGE_FIELDS in layout.py).
enum Header : int64_t {
  kCodeLength, kNumResolutions, kNumStem, kNumHead, kNumStages, kStageGranularity,
  kStemOffset, kHeadOffset, kNumLast, kTableSize, kHeaderSize
};
enum Stage : int64_t {
  kCodeOffset, kMaxDepth, kNumWidths, kNumInWidths, kNumDepths, kNumKernels, kNumExpands,
  kTableOffset, kLayer0Block, kStageFields
};

struct StagePlan {
  int64_t code_offset, max_depth, n_w, n_in, n_d, n_k, n_e, table_offset, layer0_block;
  const int64_t* depth_values;  // n_d depth values
  const int64_t* expand_masks;  // max_depth bit masks of allowed expand indices
  // stage_expands[di]: the expand indices every active layer allows at depth index di (AND of the
  // first depth_values[di] masks): with stage granularity all active layers take layer 0's expand.
  std::vector<int64_t> stage_expands;
  // inactive[di * max_depth + j] = -1 (all bits) when layer j is beyond depth_values[di], else 0:
  // lets the per-layer checks run as branch-free OR-reductions the compiler vectorises.
  std::vector<int32_t> inactive;
};

struct Plan {
  int64_t code_length, n_res, n_stem, n_head, n_last, stem_offset, head_offset, table_size;
  bool stage_granularity;
  std::vector<StagePlan> stages;
};

// Index v is a valid choice among n (one unsigned compare covers v < 0 too).
inline bool out_of_range(int32_t v, int64_t n) {
  return static_cast<uint32_t>(v) >= static_cast<uint64_t>(n);
}

Plan read_plan(const at::Tensor& header, const at::Tensor& plan, const at::Tensor& depths,
               const at::Tensor& expand_masks) {
  TORCH_CHECK(header.device().is_cpu() && header.scalar_type() == at::kLong && header.dim() == 1 &&
                  header.numel() == kHeaderSize && header.is_contiguous(),
              "estimator_sum: header must be a contiguous CPU int64 tensor of shape (", kHeaderSize,
              ",), got ", header.scalar_type(), " ", header.sizes());
  const int64_t* h = header.data_ptr<int64_t>();
  Plan p;
  p.code_length = h[kCodeLength];
  p.n_res = h[kNumResolutions];
  p.n_stem = h[kNumStem];
  p.n_head = h[kNumHead];
  p.n_last = h[kNumLast];
  p.stem_offset = h[kStemOffset];
  p.head_offset = h[kHeadOffset];
  p.table_size = h[kTableSize];
  p.stage_granularity = h[kStageGranularity] != 0;
  const int64_t n_stages = h[kNumStages];
  TORCH_CHECK(n_stages >= 1 && p.n_res >= 1 && p.n_stem >= 1 && p.n_head >= 1 && p.n_last >= 1,
              "estimator_sum: header has an empty dimension");
  TORCH_CHECK(plan.device().is_cpu() && plan.scalar_type() == at::kLong && plan.dim() == 2 &&
                  plan.size(0) == n_stages && plan.size(1) == kStageFields && plan.is_contiguous(),
              "estimator_sum: plan must be a contiguous CPU int64 tensor of shape (", n_stages, ", ",
              kStageFields, "), got ", plan.scalar_type(), " ", plan.sizes());
  TORCH_CHECK(depths.device().is_cpu() && depths.scalar_type() == at::kLong && depths.dim() == 2 &&
                  depths.size(0) == n_stages && depths.is_contiguous(),
              "estimator_sum: depths must be a contiguous CPU int64 tensor of shape (", n_stages,
              ", D), got ", depths.scalar_type(), " ", depths.sizes());
  TORCH_CHECK(expand_masks.device().is_cpu() && expand_masks.scalar_type() == at::kLong &&
                  expand_masks.dim() == 2 && expand_masks.size(0) == n_stages && expand_masks.is_contiguous(),
              "estimator_sum: expand_masks must be a contiguous CPU int64 tensor of shape (", n_stages,
              ", max depth), got ", expand_masks.scalar_type(), " ", expand_masks.sizes());
  // The plan comes from Python, but a wrong plan would read outside the table: check it once here
  // so that the per-row loop only has to check the codes.
  auto within = [&](int64_t offset, int64_t size) {
    return offset >= 0 && size >= 0 && offset + size <= p.table_size;
  };
  TORCH_CHECK(within(p.stem_offset, p.n_res * p.n_stem), "estimator_sum: stem block outside the table");
  TORCH_CHECK(within(p.head_offset, p.n_res * p.n_last * p.n_head), "estimator_sum: head block outside the table");
  const int64_t* rows = plan.data_ptr<int64_t>();
  int64_t previous_widths = p.n_stem;
  for (int64_t s = 0; s < n_stages; ++s) {
    const int64_t* r = rows + s * kStageFields;
    StagePlan st{r[kCodeOffset], r[kMaxDepth], r[kNumWidths], r[kNumInWidths], r[kNumDepths], r[kNumKernels],
                 r[kNumExpands], r[kTableOffset], r[kLayer0Block], depths.data_ptr<int64_t>() + s * depths.size(1),
                 expand_masks.data_ptr<int64_t>() + s * expand_masks.size(1)};
    TORCH_CHECK(st.max_depth >= 1 && st.n_w >= 1 && st.n_d >= 1 && st.n_k >= 1 && st.n_e >= 1 && st.n_e <= 62 &&
                    st.n_d <= depths.size(1) && st.max_depth <= expand_masks.size(1) && st.n_in == previous_widths,
                "estimator_sum: plan row ", s, " is inconsistent");
    TORCH_CHECK(st.code_offset >= 3 && st.code_offset + 2 + 2 * st.max_depth <= p.code_length,
                "estimator_sum: plan row ", s, " points outside a code row of length ", p.code_length);
    for (int64_t d = 0; d < st.n_d; ++d) {
      TORCH_CHECK(st.depth_values[d] >= 1 && st.depth_values[d] <= st.max_depth,
                  "estimator_sum: depth value ", st.depth_values[d], " of stage ", s, " is outside 1..",
                  st.max_depth);
    }
    const int64_t per_choice = p.n_res * st.n_in * st.n_w * st.n_k * st.n_e;
    if (p.stage_granularity) {
      TORCH_CHECK(st.layer0_block == per_choice * st.n_d && within(st.table_offset, st.layer0_block),
                  "estimator_sum: stage ", s, " block outside the table");
    } else {
      TORCH_CHECK(st.layer0_block == per_choice &&
                      within(st.table_offset, st.layer0_block + p.n_res * st.n_w * st.n_k * st.n_e),
                  "estimator_sum: stage ", s, " block outside the table");
    }
    st.inactive.assign(st.n_d * st.max_depth, 0);
    st.stage_expands.assign(st.n_d, -1);
    for (int64_t d = 0; d < st.n_d; ++d) {
      for (int64_t j = st.depth_values[d]; j < st.max_depth; ++j) st.inactive[d * st.max_depth + j] = -1;
      for (int64_t j = 0; j < st.depth_values[d]; ++j) st.stage_expands[d] &= st.expand_masks[j];
    }
    previous_widths = st.n_w;
    p.stages.push_back(std::move(st));
  }
  TORCH_CHECK(p.n_last == previous_widths, "estimator_sum: n_last does not match the last stage");
  return p;
}

// Sums one row; returns false (and leaves `total` meaningless) when the row is not a valid code.
// Validation is accumulated branch-free into `bad` and tested once per stage: the happy path is a
// straight run of loads, compares and a handful of table lookups.
template <typename scalar_t, bool kStageGranularity>
inline bool sum_row(const int32_t* c, const Plan& p, const scalar_t* table, scalar_t& total) {
  const int32_t r = c[0], stem = c[1], head = c[2];
  if (out_of_range(r, p.n_res) | out_of_range(stem, p.n_stem) | out_of_range(head, p.n_head)) return false;
  scalar_t acc = table[p.stem_offset + r * p.n_stem + stem];
  int64_t prev = stem;
  for (const StagePlan& st : p.stages) {
    const int32_t* sc = c + st.code_offset;
    const int32_t w = sc[0], di = sc[1];
    if (out_of_range(w, st.n_w) | out_of_range(di, st.n_d)) return false;
    const int64_t depth = st.depth_values[di];
    const int32_t* ks = sc + 2;
    const int32_t* es = sc + 2 + st.max_depth;
    const int32_t k0 = ks[0], e0 = es[0];
    bool bad = out_of_range(k0, st.n_k) | out_of_range(e0, st.n_e);
    if (bad) return false;
    bad |= !(((kStageGranularity ? st.stage_expands[di] : st.expand_masks[0]) >> e0) & 1);
    const int64_t base = (r * st.n_in + prev) * st.n_w + w;
    const int32_t* inactive = st.inactive.data() + di * st.max_depth;
    if constexpr (kStageGranularity) {
      // Active layers repeat layer 0's choices, inactive ones hold -1 (= k0 | inactive[j]).
      int32_t diff = 0;
      for (int64_t j = 1; j < st.max_depth; ++j) {
        diff |= (ks[j] ^ (k0 | inactive[j])) | (es[j] ^ (e0 | inactive[j]));
      }
      bad |= diff != 0;
      acc += table[st.table_offset + ((base * st.n_d + di) * st.n_k + k0) * st.n_e + e0];
    } else {
      acc += table[st.table_offset + (base * st.n_k + k0) * st.n_e + e0];
      const scalar_t* later = table + st.table_offset + st.layer0_block + (r * st.n_w + w) * st.n_k * st.n_e;
      for (int64_t j = 1; j < depth; ++j) {
        const int32_t k = ks[j], e = es[j];
        const bool bad_layer = out_of_range(k, st.n_k) | out_of_range(e, st.n_e);
        // Clamp instead of branching so a bad index is never used; the row is rejected anyway.
        bad |= bad_layer | !((st.expand_masks[j] >> (bad_layer ? 0 : e)) & 1);
        acc += later[bad_layer ? 0 : k * st.n_e + e];
      }
      // Inactive layers hold -1: (v ^ -1) is 0 exactly then; active ones are masked out (& 0).
      int32_t diff = 0;
      for (int64_t j = 1; j < st.max_depth; ++j) diff |= ((ks[j] ^ -1) | (es[j] ^ -1)) & inactive[j];
      bad |= diff != 0;
    }
    if (bad) return false;
    prev = w;
  }
  acc += table[p.head_offset + (r * p.n_last + prev) * p.n_head + head];
  total = acc;
  return true;
}

// The message for the first invalid field of a row that sum_row rejected (the slow, rare path).
std::string describe_bad_row(const int32_t* c, int64_t row, const Plan& p) {
  std::ostringstream msg;
  msg << "codes[" << row << "] ";
  auto range = [&](const char* what, int32_t v, int64_t n) {
    msg << what << " index " << v << " is out of range 0.." << n - 1;
    return msg.str();
  };
  if (out_of_range(c[0], p.n_res)) return range("resolution", c[0], p.n_res);
  if (out_of_range(c[1], p.n_stem)) return range("stem", c[1], p.n_stem);
  if (out_of_range(c[2], p.n_head)) return range("head", c[2], p.n_head);
  for (size_t s = 0; s < p.stages.size(); ++s) {
    const StagePlan& st = p.stages[s];
    const int32_t* sc = c + st.code_offset;
    const std::string where = "stages[" + std::to_string(s) + "].";
    if (out_of_range(sc[0], st.n_w)) return range((where + "width").c_str(), sc[0], st.n_w);
    if (out_of_range(sc[1], st.n_d)) return range((where + "depth").c_str(), sc[1], st.n_d);
    const int64_t depth = st.depth_values[sc[1]];
    for (int part = 0; part < 2; ++part) {
      const char* name = part == 0 ? "kernel" : "expand";
      const int64_t n = part == 0 ? st.n_k : st.n_e;
      const int32_t* v = sc + 2 + part * st.max_depth;
      for (int64_t j = 0; j < st.max_depth; ++j) {
        const std::string field = where + name + "[" + std::to_string(j) + "]";
        if (j < depth && out_of_range(v[j], n)) return range(field.c_str(), v[j], n);
        if (j >= depth && v[j] != -1) {
          msg << field << " is " << v[j] << " but layers beyond the active depth " << depth << " must hold -1";
          return msg.str();
        }
        if (p.stage_granularity && j > 0 && j < depth && v[j] != v[0]) {
          msg << field << " index " << v[j] << " differs from layer 0's " << v[0]
              << "; the space has stage granularity (one " << name << " per stage)";
          return msg.str();
        }
        if (part == 1 && j < depth && !((st.expand_masks[j] >> v[j]) & 1)) {
          msg << field << " index " << v[j] << " is not allowed at layer " << j << " (allowed indices: [";
          for (int64_t e = 0, first = 1; e < st.n_e; ++e) {
            if ((st.expand_masks[j] >> e) & 1) {
              msg << (first ? "" : ", ") << e;
              first = 0;
            }
          }
          msg << "])";
          return msg.str();
        }
      }
    }
  }
  msg << "is invalid";
  return msg.str();
}

// ---- the row program of the AVX2 kernel (estimator_kernels.h) --------------------------------

// The plan compiled for the vectorised kernel; `program` points into the vectors.
struct CompiledPlan {
  CompiledPlan() = default;
  CompiledPlan(CompiledPlan&&) = default;  // moving keeps the vectors' buffers, so `program` stays valid
  CompiledPlan(const CompiledPlan&) = delete;
  CompiledPlan& operator=(const CompiledPlan&) = delete;
  bool usable = false;  // false: the plan is outside the program's limits, sum_row runs instead
  RowProgram program{};
  std::vector<StageProgram> stages;
  std::vector<uint32_t> allowed;
  std::vector<int32_t> index_lanes;  // RowProgram::lanes
  std::vector<int32_t> stage_lanes;  // RowProgram::stage_lanes
  int64_t later_size = 1;            // elements of the padded later table
};

// Bits (v + 1) for v in [0, n): the values a field with n choices may hold.
inline uint32_t choice_bits(int64_t n) { return ((uint32_t{1} << n) - 1) << 1; }

// Where later layer (r, w, k, e) of stage `st` lands in the padded later table, minus the
// (k + 1, e + 1) padding shift that kLaterBase folds in.
struct LaterBlock {
  int64_t base, r_stride, w_stride, k_stride;
};

LaterBlock later_block(const StagePlan& st, int64_t base) {
  const int64_t k_stride = st.n_e + 1, w_stride = (st.n_k + 1) * k_stride;
  return {base, st.n_w * w_stride, w_stride, k_stride};
}

CompiledPlan compile_plan(const Plan& p) {
  CompiledPlan out;
  const int64_t length = p.code_length;
  const int64_t n_stages = static_cast<int64_t>(p.stages.size());
  const int64_t limit = 31;  // choice_bits and vpsrlvd work on 32-bit lanes
  if (length < kLanes || n_stages > kMaxStages || p.n_res > limit || p.n_stem > limit || p.n_head > limit) return out;
  // Lookup indices are computed in int32 lanes.
  if (p.table_size > std::numeric_limits<int32_t>::max()) return out;
  std::vector<uint32_t> allowed(length, 0);
  std::vector<int> covered(length, 0);
  allowed[0] = choice_bits(p.n_res);
  allowed[1] = choice_bits(p.n_stem);
  allowed[2] = choice_bits(p.n_head);
  covered[0] = covered[1] = covered[2] = 1;
  int64_t read_extent = length;
  for (const StagePlan& st : p.stages) {
    if (st.max_depth > kLanes || st.n_w > limit || st.n_d > limit || st.n_k > limit || st.n_e > limit) return out;
    const int64_t o = st.code_offset;
    allowed[o] = choice_bits(st.n_w);
    allowed[o + 1] = choice_bits(st.n_d);
    for (int64_t j = 0; j < st.max_depth; ++j) {
      const uint32_t minus_one = j > 0 ? 1u : 0u;  // layer 0 is always active
      allowed[o + 2 + j] = choice_bits(st.n_k) | minus_one;
      const uint32_t expands = static_cast<uint32_t>(st.expand_masks[j]) & (choice_bits(st.n_e) >> 1);
      allowed[o + 2 + st.max_depth + j] = (expands << 1) | minus_one;
    }
    for (int64_t q = o; q < o + 2 + 2 * st.max_depth; ++q) ++covered[q];
    read_extent = std::max(read_extent, o + 2 + st.max_depth + kLanes);
  }
  // The static check must see every position exactly once as the field the plan says it is.
  if (std::any_of(covered.begin(), covered.end(), [](int c) { return c != 1; })) return out;

  const int64_t n_static = (length + kLanes - 1) / kLanes;
  if (n_static > kMaxStatic) return out;
  out.allowed.resize(n_static * kLanes);
  for (int64_t v = 0; v < n_static; ++v) {
    const int64_t start = v + 1 < n_static ? v * kLanes : length - kLanes;
    std::copy(allowed.begin() + start, allowed.begin() + start + kLanes, out.allowed.begin() + v * kLanes);
  }
  out.index_lanes.assign(kIndexLanes * kLanes, 0);
  out.stage_lanes.assign(n_stages * kStageRows * kLanes, 0);
  auto lane = [&](IndexLane row, int64_t s) -> int32_t& { return out.index_lanes[row * kLanes + s]; };
  int64_t later_size = 1;  // slot 0: never used, keeps the table non-empty
  for (int64_t s = 0; s < n_stages; ++s) {
    const StagePlan& st = p.stages[s];
    const int64_t k_stride = st.n_e;
    const int64_t d_stride = p.stage_granularity ? st.n_k * st.n_e : 0;
    const int64_t w_stride = p.stage_granularity ? st.n_d * d_stride : st.n_k * st.n_e;
    lane(kBase, s) = static_cast<int32_t>(st.table_offset);
    lane(kKStride, s) = static_cast<int32_t>(k_stride);
    lane(kWStride, s) = static_cast<int32_t>(w_stride);
    lane(kInStride, s) = static_cast<int32_t>(st.n_w * w_stride);
    lane(kRStride, s) = static_cast<int32_t>(st.n_in * st.n_w * w_stride);
    StageProgram sp{};
    sp.code_offset = st.code_offset;
    sp.expand_offset = st.code_offset + 2 + st.max_depth;
    sp.max_depth = st.max_depth;
    if (!p.stage_granularity && st.max_depth > 1) {
      const LaterBlock b = later_block(st, later_size);
      sp.later_k_stride = b.k_stride;
      lane(kLaterBase, s) = static_cast<int32_t>(b.base + b.k_stride + 1);
      lane(kLaterRStride, s) = static_cast<int32_t>(b.r_stride);
      lane(kLaterWStride, s) = static_cast<int32_t>(b.w_stride);
      later_size += p.n_res * b.r_stride;
      if (later_size > std::numeric_limits<int32_t>::max()) return out;
    }
    int32_t* rows = out.stage_lanes.data() + s * kStageRows * kLanes;
    for (int64_t d = 0; d < st.n_d; ++d) {
      for (int64_t j = st.depth_values[d]; j < st.max_depth; ++j) rows[(kInactive + d) * kLanes + j] = -1;
      rows[(kDepthOffset + d) * kLanes + s] = static_cast<int32_t>(d * d_stride);
    }
    const int32_t care = p.stage_granularity ? -1 : std::numeric_limits<int32_t>::min();
    for (int64_t j = 0; j < st.max_depth; ++j) rows[kCare * kLanes + j] = care;
    out.stages.push_back(sp);
  }
  out.later_size = later_size;
  RowProgram& rp = out.program;
  rp.code_length = length;
  rp.n_stages = n_stages;
  rp.stage_granularity = p.stage_granularity;
  rp.stem_offset = p.stem_offset;
  rp.n_stem = p.n_stem;
  rp.head_offset = p.head_offset;
  rp.n_last = p.n_last;
  rp.n_head = p.n_head;
  rp.last_width_offset = p.stages.back().code_offset;
  rp.n_static = n_static;
  rp.allowed = out.allowed.data();
  rp.stages = out.stages.data();
  rp.stage_lanes = out.stage_lanes.data();
  rp.lanes = out.index_lanes.data();
  rp.read_extent = read_extent;
  out.usable = true;
  return out;
}

// The later-layer blocks of a layer-granularity table, padded to (k + 1, e + 1) with the additive
// identity in the k = -1 / e = -1 slots (-0.0 for floats: x + -0.0 == x for every x, -0.0 included).
template <typename scalar_t>
std::vector<scalar_t> padded_later_table(const Plan& p, const CompiledPlan& cp, const scalar_t* table) {
  const scalar_t identity = std::is_floating_point_v<scalar_t> ? -scalar_t(0) : scalar_t(0);
  std::vector<scalar_t> later(cp.later_size, identity);
  for (size_t s = 0; s < p.stages.size(); ++s) {
    const StagePlan& st = p.stages[s];
    if (p.stage_granularity || st.max_depth <= 1) continue;
    const int32_t shifted_base = cp.index_lanes[kLaterBase * kLanes + s];
    const LaterBlock b = later_block(st, shifted_base - (st.n_e + 1) - 1);
    const scalar_t* block = table + st.table_offset + st.layer0_block;
    for (int64_t r = 0; r < p.n_res; ++r) {
      for (int64_t w = 0; w < st.n_w; ++w) {
        for (int64_t k = 0; k < st.n_k; ++k) {
          for (int64_t e = 0; e < st.n_e; ++e) {
            later[b.base + r * b.r_stride + w * b.w_stride + (k + 1) * b.k_stride + e + 1] =
                block[((r * st.n_w + w) * st.n_k + k) * st.n_e + e];
          }
        }
      }
    }
  }
  return later;
}

// Whether this CPU runs the AVX2 kernel (csrc/cpu_isa.h: TOFA_FAST_CPU_ISA=baseline turns it off).
bool use_avx2() {
#if TOFA_FAST_ESTIMATOR_AVX2
  return cpu_isa() >= CpuIsa::kAvx2;
#else
  return false;
#endif
}

// Which kernel estimator_sum runs for plans within the row program's limits (tests and benchmarks ask).
std::string kernel_description() { return use_avx2() ? "AVX2" : "baseline"; }

template <typename scalar_t>
int64_t sum_rows_avx2(const int32_t* codes, int64_t begin, int64_t end, int64_t safe_end, const RowProgram& program,
                      const scalar_t* table, const scalar_t* later, scalar_t* out, int32_t* scratch) {
#if TOFA_FAST_ESTIMATOR_AVX2
  if constexpr (std::is_same_v<scalar_t, double>) {
    return isa_avx2::sum_rows_f64(codes, begin, end, safe_end, program, table, later, out, scratch);
  } else {
    return isa_avx2::sum_rows_i64(codes, begin, end, safe_end, program, table, later, out, scratch);
  }
#else
  TORCH_CHECK(false, "estimator_sum: built without the AVX2 kernel");
  return begin;
#endif
}

template <typename scalar_t>
void sum_rows_program(const int32_t* codes, int64_t n, const Plan& p, const CompiledPlan& cp, const scalar_t* table,
                      scalar_t* out, std::atomic<int64_t>& first_bad) {
  const std::vector<scalar_t> later = padded_later_table(p, cp, table);
  const RowProgram& program = cp.program;
  // Rows whose over-reads (up to read_extent int32 from their start) would leave the buffer.
  const int64_t tail_rows = (program.read_extent - program.code_length + program.code_length - 1) / program.code_length;
  const int64_t safe_end = std::max<int64_t>(0, n - tail_rows);
  at::parallel_for(0, n, 1 << 14, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> scratch(end > safe_end ? program.read_extent : 0, 0);
    const int64_t bad =
        sum_rows_avx2(codes, begin, end, safe_end, program, table, later.data(), out, scratch.data());
    if (bad < end) {
      int64_t seen = first_bad.load();
      while (bad < seen && !first_bad.compare_exchange_weak(seen, bad)) {
      }
    }
  });
}

template <typename scalar_t, bool kStageGranularity>
void sum_rows(const int32_t* codes, int64_t n, const Plan& p, const scalar_t* table, scalar_t* out,
              std::atomic<int64_t>& first_bad) {
  // Rows are independent; a grain of 16k rows keeps thread start-up negligible next to the work.
  at::parallel_for(0, n, 1 << 14, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      if (!sum_row<scalar_t, kStageGranularity>(codes + i * p.code_length, p, table, out[i])) {
        int64_t seen = first_bad.load();
        while (i < seen && !first_bad.compare_exchange_weak(seen, i)) {
        }
        return;  // this chunk's later rows cannot be the first bad one
      }
    }
  });
}

at::Tensor estimator_sum(const at::Tensor& codes, const at::Tensor& header, const at::Tensor& plan,
                         const at::Tensor& depths, const at::Tensor& expand_masks, const at::Tensor& table) {
  const Plan p = read_plan(header, plan, depths, expand_masks);
  TORCH_CHECK_VALUE(codes.device().is_cpu() && codes.dim() == 2 && codes.size(1) == p.code_length,
                    "codes must be a CPU tensor of shape (n, ", p.code_length, ") (SearchSpace.encode), got ",
                    codes.sizes(), " on ", codes.device());
  TORCH_CHECK_VALUE(codes.scalar_type() == at::kInt, "codes must be int32 (SearchSpace.encode), got ",
                    codes.scalar_type());
  TORCH_CHECK(table.device().is_cpu() && table.dim() == 1 && table.numel() == p.table_size,
              "estimator_sum: table must be a CPU tensor of shape (", p.table_size, ",), got ", table.sizes());
  TORCH_CHECK(table.scalar_type() == at::kLong || table.scalar_type() == at::kDouble,
              "estimator_sum: table must be int64 or float64, got ", table.scalar_type());
  const at::Tensor c = codes.contiguous();
  const at::Tensor t = table.contiguous();
  at::Tensor out = at::empty({c.size(0)}, t.options());
  const int64_t n = c.size(0);
  if (n == 0) return out;
  std::atomic<int64_t> first_bad{n};
  const int32_t* code_ptr = c.data_ptr<int32_t>();
  const CompiledPlan compiled = use_avx2() ? compile_plan(p) : CompiledPlan{};
  auto run = [&](auto tag) {
    using scalar_t = decltype(tag);
    if (compiled.usable) {
      sum_rows_program<scalar_t>(code_ptr, n, p, compiled, t.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), first_bad);
    } else if (p.stage_granularity) {
      sum_rows<scalar_t, true>(code_ptr, n, p, t.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), first_bad);
    } else {
      sum_rows<scalar_t, false>(code_ptr, n, p, t.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), first_bad);
    }
  };
  if (t.scalar_type() == at::kLong) {
    run(int64_t{});
  } else {
    run(double{});
  }
  const int64_t bad = first_bad.load();
  TORCH_CHECK_VALUE(bad == n, describe_bad_row(code_ptr + bad * p.code_length, bad, p));
  return out;
}

}  // namespace
}  // namespace estimator
}  // namespace tofa_fast

// FRAGMENT: the tofa_fast namespace is shared with the elastic depthwise op (csrc/ops).
TORCH_LIBRARY_FRAGMENT(tofa_fast, m) {
  m.def(
      "estimator_sum(Tensor codes, Tensor header, Tensor plan, Tensor depths, Tensor expand_masks, Tensor table) "
      "-> Tensor");
  m.def("_estimator_sum_isa() -> str", &tofa_fast::estimator::kernel_description);
}

TORCH_LIBRARY_IMPL(tofa_fast, CPU, m) {
  m.impl("estimator_sum", &tofa_fast::estimator::estimator_sum);
}
