// CPU kernels of the packed batch norm + activation (schemas and semantics: ../packed_batch_norm.cpp).
//
// x is (P, C) row-major: a row holds one pixel's channels, so the inner loops run over contiguous
// channels (vectorised: by the compiler in the sums passes, on GCC vectors in the elementwise ones);
// rows are the parallel dimension.
//   forward:  one statistics pass (training only) + one normalise / activate / zero-pad pass;
//   backward: one pass for the per-segment Σdz and Σdz·x̂ (z recomputed from x for the activation
//             derivative) + one pass for grad_x.
// Each pass is one parallel region over fixed row chunks ("tasks", never crossing a segment). A task
// writes its partial sums to its own slot and the slots are added in task order afterwards, so the
// results do not depend on the thread count or on which thread ran what. Threads pull tasks from a
// shared counter: on a loaded machine a preempted thread delays only the task it holds.
//
// Precision: bfloat16 and float32 compute in float32, float64 in float64; every sum over rows adds
// blocks of 16 rows, each summed in the compute dtype, in double (kBlockRows). The batch variance comes
// from one pass of shifted sums: with each segment's first row as the shift, Σ(x − K)² − (Σ(x − K))²/n
// does not cancel catastrophically (the shift is within a few standard deviations of the mean), and in
// double it is as accurate as a two-pass variance, for one read of x instead of two.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

namespace tofa_fast {
namespace {

// The element math and the row kernels are compiled without -ftrapping-math (GCC's default: every
// floating-point operation may raise a signal). With it GCC will not evaluate both sides of a select
// on floats (the activations, their derivatives, the exp clamp), so those loops stay scalar. Nothing
// here enables FP exceptions, so the flag changes no result. The row kernels are noinline: a kernel
// inlined into a caller outside this region would be compiled under the caller's options.
//
// The build targets baseline x86-64 (SSE2: 4 float lanes). On x86-64 Linux with GCC each row kernel
// is also cloned for AVX2 (8 lanes) and an ifunc picks the clone once, at load time, from the CPU:
// the same C++ loops compiled twice, no intrinsics — the sums passes auto-vectorised, the elementwise
// passes on GCC vectors (f32x8, below). (The dwconv tiles do the same with one translation unit per
// ISA; a kernel this small does not need the split, nor TOFA_FAST_CPU_ISA.) The lane helpers return
// f32x8 by value, always inlined into a row kernel (setup.py's -Wno-psabi says why that is safe).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")
#endif
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define TOFA_FAST_ROW_KERNEL __attribute__((noinline, target_clones("avx2", "default")))
#else
#define TOFA_FAST_ROW_KERNEL __attribute__((noinline))
#endif

// ---- lanes --------------------------------------------------------------------------------------
// The element math below is written once for a "lane pack" P: a scalar (one channel: float32 or
// float64) or f32x8, a GCC vector of 8 neighbouring channels in float32 (AVX2 registers in the avx2
// clone, pairs of SSE registers in the baseline one). Both run the same IEEE operations in the same
// order (no FMA: neither target enables it), so a channel's result does not depend on which pack
// computed it, and the results are those of the scalar loops bit for bit.
typedef float f32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));
typedef uint16_t u16x8 __attribute__((vector_size(16)));
typedef float f32x8_unaligned __attribute__((vector_size(32), __may_alias__, __aligned__(4)));
typedef uint16_t u16x8_unaligned __attribute__((vector_size(16), __may_alias__, __aligned__(2)));

template <typename P>
constexpr bool kIsVector = std::is_same_v<P, f32x8>;
template <typename P>
constexpr int64_t kLanesOf = kIsVector<P> ? 8 : 1;

// P with every lane = v (a vector plus a scalar broadcasts the scalar).
template <typename P>
inline P splat(double v) {
  if constexpr (kIsVector<P>) {
    return P{} + static_cast<float>(v);
  } else {
    return static_cast<P>(v);
  }
}

// mask ? a : b lane by lane (GCC's vector conditional; a plain one for scalars).
template <typename P, typename M>
inline P select(M mask, P a, P b) {
  return mask ? a : b;
}

// bfloat16 is handled as its raw 16 bits (uint16_t): the conversions below are plain integer and
// bit-cast operations (c10::BFloat16's operators would keep loops scalar).
inline float to_compute(float v) { return v; }
inline double to_compute(double v) { return v; }
inline float to_compute(uint16_t bfloat16_bits) {
  const uint32_t bits = static_cast<uint32_t>(bfloat16_bits) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

inline void store(float* p, float v) { *p = v; }
inline void store(double* p, double v) { *p = v; }
// Round to nearest even, NaN to the canonical quiet NaN: c10::BFloat16's rounding, bit for bit.
inline void store(uint16_t* p, float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  *p = v != v ? static_cast<uint16_t>(0x7FC0) : static_cast<uint16_t>(rounded);
}

// kLanesOf<P> consecutive elements of storage S, in the compute type.
template <typename P, typename S>
inline P load_lanes(const S* p) {
  if constexpr (!kIsVector<P>) {
    return to_compute(*p);
  } else if constexpr (std::is_same_v<S, float>) {
    return *reinterpret_cast<const f32x8_unaligned*>(p);
  } else {  // bfloat16 bits
    const u16x8 half = *reinterpret_cast<const u16x8_unaligned*>(p);
    return reinterpret_cast<f32x8>(__builtin_convertvector(half, u32x8) << 16);
  }
}

template <typename P, typename S>
inline void store_lanes(S* p, P v) {
  if constexpr (!kIsVector<P>) {
    store(p, v);
  } else if constexpr (std::is_same_v<S, float>) {
    *reinterpret_cast<f32x8_unaligned*>(p) = v;
  } else {  // the scalar store's rounding, lane by lane
    const u32x8 bits = reinterpret_cast<u32x8>(v);
    const u32x8 rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
    const u32x8 out = select(v != v, u32x8{} + 0x7FC0u, rounded);
    *reinterpret_cast<u16x8_unaligned*>(p) = __builtin_convertvector(out, u16x8);
  }
}

// Storage type S → compute type: float64 for float64, float32 for float32 and bfloat16; and the
// widest pack of it (float64 serves exactness, not speed: scalar).
template <typename S>
using compute_t = std::conditional_t<std::is_same_v<S, double>, double, float>;
template <typename S>
using pack_t = std::conditional_t<std::is_same_v<S, double>, double, f32x8>;

// ---- activations --------------------------------------------------------------------------------

enum class Activation { kNone, kRelu, kRelu6, kHswish, kSwish };

Activation parse_activation(c10::string_view name) {
  if (name == "none") return Activation::kNone;
  if (name == "relu") return Activation::kRelu;
  if (name == "relu6") return Activation::kRelu6;
  if (name == "hswish") return Activation::kHswish;
  if (name == "swish") return Activation::kSwish;
  TORCH_CHECK(false, "activation must be one of none, relu, relu6, hswish, swish, got '", std::string(name), "'");
  return Activation::kNone;  // unreachable
}

// exp(x) for x ≤ 0 in float32 (a scalar or f32x8), in plain arithmetic: Cephes' expf — range
// reduction by ln 2 (in two parts), a degree-6 polynomial, 2ⁿ built in the exponent bits; within 2 ulp
// of expf. x is clamped below at −87, where 2ⁿ is still a normal float (exp(−87) ≈ 1.6e−38; the
// sigmoid it serves is saturated there).
template <typename P>
inline P exp_of_nonpositive(P x) {
  x = select(x < splat<P>(-87.0), splat<P>(-87.0), x);
  // n = round(x / ln 2): adding and subtracting 1.5·2²³ rounds to an integer with plain adds (floor
  // or rint calls would not vectorise without SSE4.1).
  const P n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  P r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  P p = splat<P>(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  if constexpr (kIsVector<P>) {
    const i32x8 exponent_bits = (__builtin_convertvector(n, i32x8) + 127) * (1 << 23);
    return p * reinterpret_cast<f32x8>(exponent_bits);
  } else {
    const int32_t exponent_bits = (static_cast<int32_t>(n) + 127) * (1 << 23);
    float scale;
    std::memcpy(&scale, &exponent_bits, sizeof(scale));
    return p * scale;
  }
}

// The logistic sigmoid. float32: from e = exp(−|z|) ∈ (0, 1], so no exp overflows and no value that
// is computed for both sides of the select is a denormal (those cost a microcode assist per vector:
// an earlier z / (1 + exp(−z)) with exp clamped at 88 spent most of its time there). float64 is for
// exactness: libm's exp, as PyTorch's silu.
template <typename P>
inline P sigmoid(P z) {
  if constexpr (std::is_same_v<P, double>) {
    return 1.0 / (1.0 + std::exp(-z));
  } else {
    const P e = exp_of_nonpositive(select(z < splat<P>(0.0), z, -z));
    const P inverse = 1.0f / (1.0f + e);
    return select(z >= splat<P>(0.0), inverse, e * inverse);
  }
}

// clamp(v, 0, 6) with NaN propagating, as PyTorch's clamp-based kernels do.
template <typename P>
inline P clamp_0_6(P v) {
  v = select(v < splat<P>(0.0), splat<P>(0.0), v);
  return select(v > splat<P>(6.0), splat<P>(6.0), v);
}

// Branch-free by construction: every value a selection picks from is computed unconditionally.

// The forward activations, as PyTorch computes them.
template <Activation A, typename P>
inline P activate(P z) {
  if constexpr (A == Activation::kRelu) {
    return select(z < splat<P>(0.0), splat<P>(0.0), z);
  } else if constexpr (A == Activation::kRelu6) {
    return clamp_0_6(z);
  } else if constexpr (A == Activation::kHswish) {
    return z * clamp_0_6(z + splat<P>(3.0)) / splat<P>(6.0);
  } else if constexpr (A == Activation::kSwish) {
    return z * sigmoid(z);
  } else {
    return z;
  }
}

// dy · activation'(z) with PyTorch's own backward conventions at the kinks: relu passes the gradient
// where z > 0 (threshold_backward on the result); relu6 where 0 < z < 6 (hardtanh_backward);
// hardswish is 0 below −3, z/3 + 1/2 up to 3 inclusive, 1 above; silu is s(1 + z(1 − s)).
template <Activation A, typename P>
inline P activation_grad(P z, P dy) {
  if constexpr (A == Activation::kRelu) {
    return select(z > splat<P>(0.0), dy, splat<P>(0.0));
  } else if constexpr (A == Activation::kRelu6) {
    return select((z > splat<P>(0.0)) & (z < splat<P>(6.0)), dy, splat<P>(0.0));
  } else if constexpr (A == Activation::kHswish) {
    const P slope = dy * (z / splat<P>(3.0) + splat<P>(0.5));
    const P above_or_middle = select(z <= splat<P>(3.0), slope, dy);
    return select(z < splat<P>(-3.0), splat<P>(0.0), above_or_middle);
  } else if constexpr (A == Activation::kSwish) {
    const P s = sigmoid(z);
    return dy * s * (splat<P>(1.0) + z * (splat<P>(1.0) - s));
  } else {
    return dy;
  }
}

template <typename F>
void with_activation(Activation a, const F& f) {
  switch (a) {
    case Activation::kNone: return f(std::integral_constant<Activation, Activation::kNone>{});
    case Activation::kRelu: return f(std::integral_constant<Activation, Activation::kRelu>{});
    case Activation::kRelu6: return f(std::integral_constant<Activation, Activation::kRelu6>{});
    case Activation::kHswish: return f(std::integral_constant<Activation, Activation::kHswish>{});
    case Activation::kSwish: return f(std::integral_constant<Activation, Activation::kSwish>{});
  }
}

// ---- the elementwise passes' layout switch ----------------------------------------------------------
// Whether the normalise and grad_x passes of a segment with `active` channels walk rows (an inner loop
// over a row's channels) or channel chunks (normalise_chunks, grad_input_chunks below): chunks up to
// kChunkMaxChannels. Measured interleaved on 10⁶-element inputs, 2 threads, chunks against rows: at
// 8–24 channels the forward 1.05–1.50× (hswish gains most) and the backward 1.05–1.22×; at 32–128
// channels the forward 0.97–1.16× and the backward 0.89–1.02×, where a row's loop is long enough to
// pay for its set-up. Process-wide, on by default; off (rows everywhere) only to measure what the
// chunks buy: _set_packed_bn_cpu_chunks, tofa_fast.ops.packed_batch_norm.cpu_channel_chunks.
constexpr int64_t kChunkMaxChannels = 24;
std::atomic<bool> channel_chunks{true};

bool takes_channel_chunks(int64_t active) {
  return active <= kChunkMaxChannels && channel_chunks.load(std::memory_order_relaxed);
}

// ---- tasks --------------------------------------------------------------------------------------

struct RowTask {
  int64_t segment, begin, end;  // rows [begin, end) of one segment
};

// Target elements per task (256 KiB of float32: long enough to amortise a task's setup and its C-wide
// partial sums, short enough to balance 2–16 threads on 10⁴-row inputs) and a cap on the task count
// (so the per-task partial sums stay a few MB at P = 10⁶, C = 1200). Depends on the shapes only.
constexpr int64_t kTaskElements = 1 << 16;
constexpr int64_t kMaxTasks = 256;

std::vector<RowTask> split_rows(at::IntArrayRef offsets, int64_t width) {
  const int64_t total = offsets.back();
  const int64_t per_task =
      std::max<int64_t>({1, (kTaskElements + width - 1) / std::max<int64_t>(width, 1), (total + kMaxTasks - 1) / kMaxTasks});
  std::vector<RowTask> tasks;
  for (size_t i = 0; i + 1 < offsets.size(); ++i)
    for (int64_t begin = offsets[i]; begin < offsets[i + 1]; begin += per_task)
      tasks.push_back({static_cast<int64_t>(i), begin, std::min(begin + per_task, offsets[i + 1])});
  return tasks;
}

// Runs task(i) for i in [0, count) on the intra-op threads, pulling indices from a shared counter.
template <typename Task>
void run_tasks(int64_t count, const Task& task) {
  const int64_t workers = std::min<int64_t>(count, at::get_num_threads());
  if (workers <= 1) {
    for (int64_t i = 0; i < count; ++i) task(i);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t i = next.fetch_add(1); i < count; i = next.fetch_add(1)) task(i);
  });
}

// Runs accumulate(sums, block) on a zeroed private buffer of `count` doubles, then copies it to
// `slot`; `block` is `count` elements of the compute type for the row kernels' block sums. The row
// kernels add into their sums once per block of rows; on the task's own slot of the shared array,
// two threads on neighbouring tasks would write the same cache line again and again (false sharing:
// with C = 8 that made two threads 5× slower than one).
template <typename T, typename Accumulate>
void accumulate_privately(double* slot, int64_t count, const Accumulate& accumulate) {
  std::vector<double> sums(count, 0.0);
  std::vector<T> block(count, T(0));
  accumulate(sums.data(), block.data());
  std::copy(sums.begin(), sums.end(), slot);
}

// ---- row kernels (raw pointers) -------------------------------------------------------------------
// The sums passes run row by row, every inner loop over the row's contiguous channels; the
// elementwise passes in channel chunks (below).

// Sums over rows run in blocks of kBlockRows in the compute type, each block then added to the
// double sums: the per-element work stays in float32 (8 lanes with AVX2; converting every element
// to double took these passes twice as long as the normalise pass), and a float32 sum of 16 terms
// loses at most ~16 ulp of the block's magnitude before it joins the double total.
constexpr int64_t kBlockRows = 16;

// sum_a += block_a, sum_b += block_b on the first `active` entries, then zeroes both blocks for the
// next rows (they start zeroed: accumulate_privately).
template <typename T>
inline void flush_block_sums(T* __restrict__ block_a, T* __restrict__ block_b, int64_t active, double* __restrict__ sum_a,
                             double* __restrict__ sum_b) {
  for (int64_t c = 0; c < active; ++c) {
    sum_a[c] += static_cast<double>(block_a[c]);
    sum_b[c] += static_cast<double>(block_b[c]);
    block_a[c] = block_b[c] = T(0);
  }
}

// sum[c] += Σ_rows (x − shift[c]), sum_sq[c] += Σ_rows (x − shift[c])², c < active. `block`: 2·width,
// zeroed.
template <typename S, typename T = compute_t<S>>
TOFA_FAST_ROW_KERNEL void accumulate_shifted_moments(const S* __restrict__ x, int64_t rows, int64_t width, int64_t active,
                                const T* __restrict__ shift, double* __restrict__ sum,
                                double* __restrict__ sum_sq, T* __restrict__ block) {
  T* __restrict__ block_sum = block;
  T* __restrict__ block_sq = block + width;
  for (int64_t r0 = 0; r0 < rows; r0 += kBlockRows) {
    const int64_t r1 = r0 + kBlockRows < rows ? r0 + kBlockRows : rows;
    for (int64_t r = r0; r < r1; ++r) {
      const S* row = x + r * width;
      for (int64_t c = 0; c < active; ++c) {
        const T d = to_compute(row[c]) - shift[c];
        block_sum[c] += d;
        block_sq[c] += d * d;
      }
    }
    flush_block_sums(block_sum, block_sq, active, sum, sum_sq);
  }
}

// y = act((x − mean) · scale + bias) on the active columns, 0 on the others.
template <Activation A, typename S, typename T = compute_t<S>>
TOFA_FAST_ROW_KERNEL void normalise_rows(const S* __restrict__ x, S* __restrict__ y, int64_t rows, int64_t width, int64_t active,
                    const T* __restrict__ mean, const T* __restrict__ scale, const T* __restrict__ bias) {
  for (int64_t r = 0; r < rows; ++r) {
    const S* in = x + r * width;
    S* out = y + r * width;
    for (int64_t c = 0; c < active; ++c)
      store(out + c, activate<A>((to_compute(in[c]) - mean[c]) * scale[c] + bias[c]));
    std::memset(out + active, 0, (width - active) * sizeof(S));
  }
}

// sum_dz[c] += Σ dz, sum_dz_xhat[c] += Σ dz·x̂ with x̂ = (x − mean)·rstd, z = x̂·w + b, dz = dy·act'(z),
// in blocks of kBlockRows rows as above. `block`: 2·width, zeroed.
template <Activation A, typename S, typename T = compute_t<S>>
TOFA_FAST_ROW_KERNEL void accumulate_grad_sums(const S* __restrict__ x, const S* __restrict__ grad_y, int64_t rows, int64_t width,
                          int64_t active, const T* __restrict__ mean, const T* __restrict__ rstd,
                          const T* __restrict__ weight, const T* __restrict__ bias, double* __restrict__ sum_dz,
                          double* __restrict__ sum_dz_xhat, T* __restrict__ block) {
  T* __restrict__ block_dz = block;
  T* __restrict__ block_dz_xhat = block + width;
  for (int64_t r0 = 0; r0 < rows; r0 += kBlockRows) {
    const int64_t r1 = r0 + kBlockRows < rows ? r0 + kBlockRows : rows;
    for (int64_t r = r0; r < r1; ++r) {
      const S* in = x + r * width;
      const S* dy = grad_y + r * width;
      for (int64_t c = 0; c < active; ++c) {
        const T xhat = (to_compute(in[c]) - mean[c]) * rstd[c];
        const T dz = activation_grad<A>(xhat * weight[c] + bias[c], to_compute(dy[c]));
        block_dz[c] += dz;
        block_dz_xhat[c] += dz * xhat;
      }
    }
    flush_block_sums(block_dz, block_dz_xhat, active, sum_dz, sum_dz_xhat);
  }
}

// grad_x = w·rstd · (dz − mean(dz) − x̂·mean(dz·x̂)) in training (the batch mean and variance depend
// on x), w·rstd · dz in eval; 0 on the inactive columns. gain = w·rstd; mean_dz, mean_dz_xhat are per
// segment (unused in eval).
template <Activation A, bool kTraining, typename S, typename T = compute_t<S>>
TOFA_FAST_ROW_KERNEL void grad_input_rows(const S* __restrict__ x, const S* __restrict__ grad_y, S* __restrict__ grad_x, int64_t rows,
                     int64_t width, int64_t active, const T* __restrict__ mean, const T* __restrict__ rstd,
                     const T* __restrict__ weight, const T* __restrict__ bias, const T* __restrict__ gain,
                     const T* __restrict__ mean_dz, const T* __restrict__ mean_dz_xhat) {
  for (int64_t r = 0; r < rows; ++r) {
    const S* in = x + r * width;
    const S* dy = grad_y + r * width;
    S* out = grad_x + r * width;
    for (int64_t c = 0; c < active; ++c) {
      const T xhat = (to_compute(in[c]) - mean[c]) * rstd[c];
      const T dz = activation_grad<A>(xhat * weight[c] + bias[c], to_compute(dy[c]));
      if constexpr (kTraining) {
        store(out + c, gain[c] * (dz - mean_dz[c] - xhat * mean_dz_xhat[c]));
      } else {
        store(out + c, gain[c] * dz);
      }
    }
    std::memset(out + active, 0, (width - active) * sizeof(S));
  }
}

// ---- the elementwise passes: channel chunks in vector registers ----------------------------------
// normalise_chunks and grad_input_chunks walk rows in blocks of kBlockRows and, within a block, the
// active channels in chunks: of up to two f32x8 packs (16 float32 channels), then one (8), then single
// channels (and every float64 channel: scalar packs). A chunk's parameters stay in registers across
// the block's rows, and a block (16 rows) stays in L1 while its chunks pass over it. Row by row, GCC
// left the hswish loop scalar (its selects) and every loop paid its set-up once per 16-channel row: at
// 16 channels (the default run's stem and first stage, its largest maps) the normalise pass took
// 1.9–2.7× a copy of x, chunked 1.3–1.5×. The sums passes vectorise on their own, row by row, at
// about the speed of reading x, and stay so (chunked, they were slower). Which segments take the
// chunks: takes_channel_chunks above.

// Calls chunk.template operator()<P, NP>(c, r0, r1) for the chunks [c, c + NP·lanes) covering
// [begin, end) of every block of rows [r0, r1).
template <typename S, int kMaxPacks, typename Chunk>
inline __attribute__((always_inline)) void for_each_chunk(int64_t rows, int64_t begin, int64_t end, const Chunk& chunk) {
  using P = pack_t<S>;
  using T = compute_t<S>;
  constexpr int64_t L = kLanesOf<P>;
  for (int64_t r0 = 0; r0 < rows; r0 += kBlockRows) {
    const int64_t r1 = r0 + kBlockRows < rows ? r0 + kBlockRows : rows;
    int64_t c = begin;
    if constexpr (kIsVector<P>) {
      if constexpr (kMaxPacks >= 2) {
        for (; c + 2 * L <= end; c += 2 * L) chunk.template operator()<P, 2>(c, r0, r1);
      }
      for (; c + L <= end; c += L) chunk.template operator()<P, 1>(c, r0, r1);
    }
    for (; c < end; ++c) chunk.template operator()<T, 1>(c, r0, r1);
  }
}

#define TOFA_FAST_CHUNK __attribute__((always_inline))

// Columns [active, width) of every row are zero (a segment's inactive channels).
template <typename S>
inline __attribute__((always_inline)) void zero_columns(S* __restrict__ y, int64_t rows, int64_t width, int64_t active) {
  if (active == width) return;
  for_each_chunk<S, 2>(rows, active, width, [&]<typename P, int NP>(int64_t c0, int64_t r0, int64_t r1) TOFA_FAST_CHUNK {
    constexpr int64_t L = kLanesOf<P>;
    for (int64_t r = r0; r < r1; ++r)
#pragma GCC unroll 2
      for (int k = 0; k < NP; ++k) store_lanes(y + r * width + c0 + k * L, P{});
  });
}

// normalise_rows in channel chunks.
template <Activation A, typename S, typename T = compute_t<S>>
TOFA_FAST_ROW_KERNEL void normalise_chunks(const S* __restrict__ x, S* __restrict__ y, int64_t rows, int64_t width,
                                           int64_t active, const T* __restrict__ mean, const T* __restrict__ scale,
                                           const T* __restrict__ bias) {
  for_each_chunk<S, 2>(rows, 0, active, [&]<typename P, int NP>(int64_t c0, int64_t r0, int64_t r1) TOFA_FAST_CHUNK {
    constexpr int64_t L = kLanesOf<P>;
    P m[NP], s[NP], b[NP];
#pragma GCC unroll 2
    for (int i = 0; i < NP; ++i) {
      m[i] = load_lanes<P>(mean + c0 + i * L), s[i] = load_lanes<P>(scale + c0 + i * L);
      b[i] = load_lanes<P>(bias + c0 + i * L);
    }
    for (int64_t r = r0; r < r1; ++r)
#pragma GCC unroll 2
      for (int i = 0; i < NP; ++i) {
        const int64_t at = r * width + c0 + i * L;
        store_lanes(y + at, activate<A>((load_lanes<P>(x + at) - m[i]) * s[i] + b[i]));
      }
  });
  zero_columns(y, rows, width, active);
}

// grad_input_rows in channel chunks (one pack each: the pass keeps seven per-channel parameters).
template <Activation A, bool kTraining, typename S, typename T = compute_t<S>>
TOFA_FAST_ROW_KERNEL void grad_input_chunks(const S* __restrict__ x, const S* __restrict__ grad_y,
                                            S* __restrict__ grad_x, int64_t rows, int64_t width, int64_t active,
                                            const T* __restrict__ mean, const T* __restrict__ rstd,
                                            const T* __restrict__ weight, const T* __restrict__ bias,
                                            const T* __restrict__ gain, const T* __restrict__ mean_dz,
                                            const T* __restrict__ mean_dz_xhat) {
  for_each_chunk<S, 1>(rows, 0, active, [&]<typename P, int NP>(int64_t c0, int64_t r0, int64_t r1) TOFA_FAST_CHUNK {
    constexpr int64_t L = kLanesOf<P>;
    P m[NP], rs[NP], w[NP], b[NP], g[NP], mdz[NP], mdzx[NP];
#pragma GCC unroll 2
    for (int i = 0; i < NP; ++i) {
      const int64_t c = c0 + i * L;
      m[i] = load_lanes<P>(mean + c), rs[i] = load_lanes<P>(rstd + c), w[i] = load_lanes<P>(weight + c);
      b[i] = load_lanes<P>(bias + c), g[i] = load_lanes<P>(gain + c);
      mdz[i] = load_lanes<P>(mean_dz + c), mdzx[i] = load_lanes<P>(mean_dz_xhat + c);
    }
    for (int64_t r = r0; r < r1; ++r)
#pragma GCC unroll 2
      for (int i = 0; i < NP; ++i) {
        const int64_t at = r * width + c0 + i * L;
        const P xhat = (load_lanes<P>(x + at) - m[i]) * rs[i];
        const P dz = activation_grad<A>(xhat * w[i] + b[i], load_lanes<P>(grad_y + at));
        if constexpr (kTraining) {
          store_lanes(grad_x + at, g[i] * (dz - mdz[i] - xhat * mdzx[i]));
        } else {
          store_lanes(grad_x + at, g[i] * dz);
        }
      }
  });
  zero_columns(grad_x, rows, width, active);
}

#undef TOFA_FAST_CHUNK

#undef TOFA_FAST_ROW_KERNEL
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

// ---- argument checks ----------------------------------------------------------------------------
// The Python op raises ValueError with the same rules first (check_packed_batch_norm_args); these
// guard direct calls of the internal ops.

int64_t check_layout(const at::Tensor& x, at::IntArrayRef offsets, at::IntArrayRef channels) {
  TORCH_CHECK(x.dim() == 2, "x must be 2-D (rows, channels), got ", x.sizes());
  TORCH_CHECK(x.device().is_cpu(), "x must be a CPU tensor for the C++ kernel, got ", x.device());
  const int64_t segments = static_cast<int64_t>(channels.size());
  TORCH_CHECK(static_cast<int64_t>(offsets.size()) == segments + 1 && offsets.front() == 0 &&
                  offsets.back() == x.size(0),
              "offsets must have len(channels) + 1 = ", segments + 1, " entries from 0 to ", x.size(0), ", got ",
              offsets);
  for (int64_t i = 0; i < segments; ++i) {
    TORCH_CHECK(offsets[i + 1] >= offsets[i], "offsets must be non-decreasing, got ", offsets);
    TORCH_CHECK(channels[i] >= 0 && channels[i] <= x.size(1), "channels must be in [0, ", x.size(1), "], got ",
                channels);
  }
  return segments;
}

void check_parameter(const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == x.size(1), name, " must have shape (", x.size(1), ",), got ", t.sizes());
  TORCH_CHECK(t.device() == x.device(), name, " is on ", t.device(), " but x is on ", x.device());
  const bool mixed = x.scalar_type() == at::kBFloat16 && t.scalar_type() == at::kFloat;
  TORCH_CHECK(t.scalar_type() == x.scalar_type() || mixed, name, " dtype ", t.scalar_type(),
              " does not match x dtype ", x.scalar_type(), " (a float32 ", name,
              " also serves bfloat16 x: mixed precision)");
}

at::ScalarType compute_dtype(const at::Tensor& x) {
  const at::ScalarType dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16,
              "the C++ packed batch norm serves float32, float64 and bfloat16 x, got ", dtype);
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

template <typename F>
void with_storage(at::ScalarType dtype, const F& f) {
  switch (dtype) {
    case at::kFloat: return f(float{});
    case at::kDouble: return f(double{});
    case at::kBFloat16: return f(uint16_t{});
    default: TORCH_CHECK(false, "unsupported dtype ", dtype);
  }
}

template <typename S>
S* storage_ptr(const at::Tensor& t) {
  return static_cast<S*>(t.data_ptr());
}

// ---- forward ------------------------------------------------------------------------------------

template <typename S>
void forward_impl(const at::Tensor& x, at::IntArrayRef offsets, at::IntArrayRef channels, const at::Tensor& weight,
                  const at::Tensor& bias, const std::optional<at::Tensor>& running_mean,
                  const std::optional<at::Tensor>& running_var, bool training, at::ArrayRef<double> momentum_factors,
                  double eps, Activation activation, at::IntArrayRef update_order, const at::Tensor& y,
                  const at::Tensor& save_mean, const at::Tensor& save_rstd, bool normalise = true) {
  using T = compute_t<S>;
  const int64_t width = x.size(1), segments = static_cast<int64_t>(channels.size());
  const S* xp = storage_ptr<S>(x);
  S* yp = normalise ? storage_ptr<S>(y) : nullptr;
  T* mean = save_mean.data_ptr<T>();  // (S, C), zero-filled
  T* rstd = save_rstd.data_ptr<T>();
  const std::vector<RowTask> tasks = split_rows(offsets, width);
  auto rows_of = [&](int64_t i) { return offsets[i + 1] - offsets[i]; };
  auto active = [&](int64_t i) { return rows_of(i) > 0 ? channels[i] : int64_t(0); };

  if (training) {
    // Shifted sums: per task, then per segment in task order (deterministic).
    std::vector<double> shift(segments * width, 0.0);
    for (int64_t i = 0; i < segments; ++i)
      for (int64_t c = 0; c < active(i); ++c)
        shift[i * width + c] = static_cast<double>(to_compute(xp[offsets[i] * width + c]));
    const std::vector<T> shift_t(shift.begin(), shift.end());  // exact: each is an element of x
    std::vector<double> partial(tasks.size() * 2 * width, 0.0);
    run_tasks(static_cast<int64_t>(tasks.size()), [&](int64_t t) {
      const RowTask& task = tasks[t];
      accumulate_privately<T>(partial.data() + t * 2 * width, 2 * width, [&](double* sum, T* block) {
        accumulate_shifted_moments(xp + task.begin * width, task.end - task.begin, width, active(task.segment),
                                   shift_t.data() + task.segment * width, sum, sum + width, block);
      });
    });
    std::vector<double> sum(segments * width, 0.0), sum_sq(segments * width, 0.0);
    for (size_t t = 0; t < tasks.size(); ++t) {
      const int64_t i = tasks[t].segment;
      for (int64_t c = 0; c < active(i); ++c) {
        sum[i * width + c] += partial[t * 2 * width + c];
        sum_sq[i * width + c] += partial[t * 2 * width + width + c];
      }
    }
    // Batch mean and biased variance in double; the running statistics take them in double too
    // (as ATen's CPU batch norm does), in update order, with the unbiased variance.
    std::vector<double> batch_mean(segments * width, 0.0), batch_var(segments * width, 0.0);
    for (int64_t i = 0; i < segments; ++i) {
      const double n = static_cast<double>(rows_of(i));
      for (int64_t c = 0; c < active(i); ++c) {
        const int64_t k = i * width + c;
        const double mean_shifted = sum[k] / n;
        batch_mean[k] = shift[k] + mean_shifted;
        batch_var[k] = std::max(0.0, sum_sq[k] / n - mean_shifted * mean_shifted);
        mean[k] = static_cast<T>(batch_mean[k]);
        rstd[k] = static_cast<T>(1.0 / std::sqrt(batch_var[k] + eps));
      }
    }
    if (running_mean.has_value()) {
      at::Tensor running_mean64 = running_mean->to(at::kDouble).contiguous();
      at::Tensor running_var64 = running_var->to(at::kDouble).contiguous();
      double* rm = running_mean64.data_ptr<double>();
      double* rv = running_var64.data_ptr<double>();
      for (int64_t i : update_order) {
        const double factor = momentum_factors[i];
        const int64_t n = rows_of(i);
        if (factor == 0.0 || active(i) == 0) continue;
        const double bessel = static_cast<double>(n) / static_cast<double>(n - 1);
        for (int64_t c = 0; c < active(i); ++c) {
          rm[c] = factor * batch_mean[i * width + c] + (1.0 - factor) * rm[c];
          rv[c] = factor * batch_var[i * width + c] * bessel + (1.0 - factor) * rv[c];
        }
      }
      running_mean->copy_(running_mean64);
      running_var->copy_(running_var64);
    }
  } else {
    at::Tensor running_mean64 = running_mean->to(at::kDouble).contiguous();
    at::Tensor running_var64 = running_var->to(at::kDouble).contiguous();
    const double* rm = running_mean64.data_ptr<double>();
    const double* rv = running_var64.data_ptr<double>();
    for (int64_t i = 0; i < segments; ++i)
      for (int64_t c = 0; c < active(i); ++c) {
        mean[i * width + c] = static_cast<T>(rm[c]);
        rstd[i * width + c] = static_cast<T>(1.0 / std::sqrt(rv[c] + eps));
      }
  }

  if (!normalise) return;
  const T* w = weight.data_ptr<T>();
  const T* b = bias.data_ptr<T>();
  std::vector<T> scale(segments * width, T(0));
  for (int64_t i = 0; i < segments; ++i)
    for (int64_t c = 0; c < active(i); ++c) scale[i * width + c] = w[c] * rstd[i * width + c];
  with_activation(activation, [&](auto act) {
    run_tasks(static_cast<int64_t>(tasks.size()), [&](int64_t t) {
      const RowTask& task = tasks[t];
      const int64_t offset = task.segment * width;
      const int64_t channels_active = active(task.segment);
      auto* pass = takes_channel_chunks(channels_active) ? normalise_chunks<decltype(act)::value, S>
                                                         : normalise_rows<decltype(act)::value, S>;
      pass(xp + task.begin * width, yp + task.begin * width, task.end - task.begin, width, channels_active,
           mean + offset, scale.data() + offset, b);
    });
  });
}

// Checks the statistics arguments of a forward; returns the running-statistics update order.
std::vector<int64_t> check_statistics_args(const at::Tensor& x_in, int64_t segments, at::IntArrayRef offsets,
                                           at::IntArrayRef channels, const std::optional<at::Tensor>& running_mean,
                                           const std::optional<at::Tensor>& running_var, bool training,
                                           at::ArrayRef<double> momentum_factors, at::IntArrayRef update_order) {
  TORCH_CHECK(running_mean.has_value() == running_var.has_value(),
              "running_mean and running_var must both be tensors or both be None");
  if (running_mean.has_value()) {
    check_parameter("running_mean", *running_mean, x_in);
    check_parameter("running_var", *running_var, x_in);
  }
  TORCH_CHECK(training || running_mean.has_value(),
              "eval mode normalises with running statistics: running_mean and running_var are required");
  TORCH_CHECK(static_cast<int64_t>(momentum_factors.size()) == segments,
              "momentum_factors must have one entry per segment (", segments, "), got ", momentum_factors.size());
  std::vector<int64_t> order(update_order.begin(), update_order.end());
  if (order.empty())
    for (int64_t i = 0; i < segments; ++i) order.push_back(i);
  std::vector<int64_t> sorted_order = order;
  std::sort(sorted_order.begin(), sorted_order.end());
  bool permutation = static_cast<int64_t>(sorted_order.size()) == segments;
  for (int64_t i = 0; permutation && i < segments; ++i) permutation = sorted_order[i] == i;
  TORCH_CHECK(permutation, "update_order must be a permutation of range(", segments, "), got ", update_order);
  if (training)
    for (int64_t i = 0; i < segments; ++i)
      TORCH_CHECK(channels[i] == 0 || offsets[i + 1] - offsets[i] != 1,
                  "training needs more than one row per active segment, segment ", i, " has one");
  return order;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> packed_batch_norm_act_forward_cpu(
    const at::Tensor& x_in, at::IntArrayRef offsets, at::IntArrayRef channels, const at::Tensor& weight,
    const at::Tensor& bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, bool training, at::ArrayRef<double> momentum_factors, double eps,
    c10::string_view activation_name, at::IntArrayRef update_order) {
  const int64_t segments = check_layout(x_in, offsets, channels);
  const at::ScalarType compute = compute_dtype(x_in);
  check_parameter("weight", weight, x_in);
  check_parameter("bias", bias, x_in);
  const std::vector<int64_t> order = check_statistics_args(x_in, segments, offsets, channels, running_mean, running_var,
                                                           training, momentum_factors, update_order);
  const Activation activation = parse_activation(activation_name);

  const at::Tensor x = x_in.contiguous();
  const at::Tensor w = weight.to(compute).contiguous();
  const at::Tensor b = bias.to(compute).contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options());
  at::Tensor save_mean = at::zeros({segments, x.size(1)}, x.options().dtype(compute));
  at::Tensor save_rstd = at::zeros({segments, x.size(1)}, x.options().dtype(compute));
  with_storage(x.scalar_type(), [&](auto storage) {
    forward_impl<decltype(storage)>(x, offsets, channels, w, b, running_mean, running_var, training, momentum_factors,
                                    eps, activation, order, y, save_mean, save_rstd);
  });
  return {y, save_mean, save_rstd};
}

// The forward's statistics alone (its first pass, and the running-statistics update): for a consumer
// that normalises as it reads x (the depthwise prologue, csrc/ops/cpu/dwconv_tiles.h).
std::tuple<at::Tensor, at::Tensor> packed_batch_norm_stats_cpu(const at::Tensor& x_in, at::IntArrayRef offsets,
                                                               at::IntArrayRef channels,
                                                               const std::optional<at::Tensor>& running_mean,
                                                               const std::optional<at::Tensor>& running_var,
                                                               bool training, at::ArrayRef<double> momentum_factors,
                                                               double eps, at::IntArrayRef update_order) {
  const int64_t segments = check_layout(x_in, offsets, channels);
  const at::ScalarType compute = compute_dtype(x_in);
  const std::vector<int64_t> order = check_statistics_args(x_in, segments, offsets, channels, running_mean, running_var,
                                                           training, momentum_factors, update_order);
  const at::Tensor x = x_in.contiguous();
  at::Tensor save_mean = at::zeros({segments, x.size(1)}, x.options().dtype(compute));
  at::Tensor save_rstd = at::zeros({segments, x.size(1)}, x.options().dtype(compute));
  with_storage(x.scalar_type(), [&](auto storage) {
    forward_impl<decltype(storage)>(x, offsets, channels, at::Tensor(), at::Tensor(), running_mean, running_var,
                                    training, momentum_factors, eps, Activation::kNone, order, at::Tensor(), save_mean,
                                    save_rstd, /*normalise=*/false);
  });
  return {save_mean, save_rstd};
}

// ---- backward -----------------------------------------------------------------------------------

template <typename S>
void backward_impl(const at::Tensor& grad_y, const at::Tensor& x, at::IntArrayRef offsets, at::IntArrayRef channels,
                   const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& save_mean,
                   const at::Tensor& save_rstd, bool training, Activation activation, bool need_x,
                   bool need_sums, const at::Tensor& grad_x, std::vector<double>& grad_weight,
                   std::vector<double>& grad_bias, const double* given_sums = nullptr) {
  using T = compute_t<S>;
  const int64_t width = x.size(1), segments = static_cast<int64_t>(channels.size());
  const S* xp = storage_ptr<S>(x);
  const S* gyp = storage_ptr<S>(grad_y);
  const T* mean = save_mean.data_ptr<T>();
  const T* rstd = save_rstd.data_ptr<T>();
  const T* w = weight.data_ptr<T>();
  const T* b = bias.data_ptr<T>();
  const std::vector<RowTask> tasks = split_rows(offsets, width);
  auto rows_of = [&](int64_t i) { return offsets[i + 1] - offsets[i]; };
  auto active = [&](int64_t i) { return rows_of(i) > 0 ? channels[i] : int64_t(0); };

  std::vector<double> sum_dz(segments * width, 0.0), sum_dz_xhat(segments * width, 0.0);
  if (given_sums != nullptr) {  // (S, 2, C): computed where grad_y was (the depthwise epilogue)
    for (int64_t i = 0; i < segments; ++i)
      for (int64_t c = 0; c < active(i); ++c) {
        sum_dz[i * width + c] = given_sums[(2 * i) * width + c];
        sum_dz_xhat[i * width + c] = given_sums[(2 * i + 1) * width + c];
      }
  } else if (need_sums) {
    std::vector<double> partial(tasks.size() * 2 * width, 0.0);
    with_activation(activation, [&](auto act) {
      run_tasks(static_cast<int64_t>(tasks.size()), [&](int64_t t) {
        const RowTask& task = tasks[t];
        const int64_t offset = task.segment * width;
        accumulate_privately<T>(partial.data() + t * 2 * width, 2 * width, [&](double* sums, T* block) {
          accumulate_grad_sums<decltype(act)::value>(xp + task.begin * width, gyp + task.begin * width,
                                                     task.end - task.begin, width, active(task.segment),
                                                     mean + offset, rstd + offset, w, b, sums, sums + width, block);
        });
      });
    });
    for (size_t t = 0; t < tasks.size(); ++t) {
      const int64_t i = tasks[t].segment;
      for (int64_t c = 0; c < active(i); ++c) {
        sum_dz[i * width + c] += partial[t * 2 * width + c];
        sum_dz_xhat[i * width + c] += partial[t * 2 * width + width + c];
      }
    }
    // The parameter gradients: each segment's sums, added in segment order.
    for (int64_t i = 0; i < segments; ++i)
      for (int64_t c = 0; c < active(i); ++c) {
        grad_bias[c] += sum_dz[i * width + c];
        grad_weight[c] += sum_dz_xhat[i * width + c];
      }
  }
  if (!need_x) return;

  std::vector<T> gain(segments * width, T(0)), mean_dz(segments * width, T(0)), mean_dz_xhat(segments * width, T(0));
  for (int64_t i = 0; i < segments; ++i) {
    const double n = static_cast<double>(rows_of(i));
    for (int64_t c = 0; c < active(i); ++c) {
      const int64_t k = i * width + c;
      gain[k] = w[c] * rstd[k];
      mean_dz[k] = static_cast<T>(sum_dz[k] / n);
      mean_dz_xhat[k] = static_cast<T>(sum_dz_xhat[k] / n);
    }
  }
  S* gxp = storage_ptr<S>(grad_x);
  with_activation(activation, [&](auto act) {
    auto run = [&](auto training_constant) {
      run_tasks(static_cast<int64_t>(tasks.size()), [&](int64_t t) {
        const RowTask& task = tasks[t];
        const int64_t offset = task.segment * width;
        constexpr Activation A = decltype(act)::value;
        constexpr bool kTraining = decltype(training_constant)::value;
        const int64_t channels_active = active(task.segment);
        auto* pass = takes_channel_chunks(channels_active) ? grad_input_chunks<A, kTraining, S>
                                                           : grad_input_rows<A, kTraining, S>;
        pass(xp + task.begin * width, gyp + task.begin * width, gxp + task.begin * width, task.end - task.begin,
             width, channels_active, mean + offset, rstd + offset, w, b, gain.data() + offset,
             mean_dz.data() + offset, mean_dz_xhat.data() + offset);
      });
    };
    if (training) {
      run(std::true_type{});
    } else {
      run(std::false_type{});
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> packed_batch_norm_act_backward_cpu(
    const at::Tensor& grad_y_in, const at::Tensor& x_in, at::IntArrayRef offsets, at::IntArrayRef channels,
    const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& save_mean_in, const at::Tensor& save_rstd_in,
    bool training, c10::string_view activation_name, std::array<bool, 3> output_mask) {
  const int64_t segments = check_layout(x_in, offsets, channels);
  const at::ScalarType compute = compute_dtype(x_in);
  check_parameter("weight", weight, x_in);
  check_parameter("bias", bias, x_in);
  TORCH_CHECK(grad_y_in.sizes() == x_in.sizes(), "grad_y must have x's shape ", x_in.sizes(), ", got ",
              grad_y_in.sizes());
  for (const at::Tensor* t : {&save_mean_in, &save_rstd_in})
    TORCH_CHECK(t->dim() == 2 && t->size(0) == segments && t->size(1) == x_in.size(1),
                "save_mean and save_rstd must have shape (segments, C) = (", segments, ", ", x_in.size(1), "), got ",
                t->sizes());
  const Activation activation = parse_activation(activation_name);
  const auto [need_x, need_weight, need_bias] = output_mask;

  const at::Tensor x = x_in.contiguous();
  const at::Tensor grad_y = grad_y_in.to(x.scalar_type()).contiguous();
  const at::Tensor save_mean = save_mean_in.to(compute).contiguous();
  const at::Tensor save_rstd = save_rstd_in.to(compute).contiguous();
  const at::Tensor w = weight.to(compute).contiguous();
  const at::Tensor b = bias.to(compute).contiguous();
  // grad_x needs the sums only in training (the mean and variance terms).
  const bool need_sums = need_weight || need_bias || (need_x && training);
  at::Tensor grad_x = need_x ? at::empty(x.sizes(), x.options()) : at::empty({0}, x.options());
  std::vector<double> grad_weight(x.size(1), 0.0), grad_bias(x.size(1), 0.0);
  with_storage(x.scalar_type(), [&](auto storage) {
    backward_impl<decltype(storage)>(grad_y, x, offsets, channels, w, b, save_mean, save_rstd, training, activation,
                                     need_x, need_sums, grad_x, grad_weight, grad_bias);
  });
  // Parameter gradients in the parameters' dtype (float32 for bfloat16 x with float32 weights).
  auto parameter_grad = [&](bool needed, const std::vector<double>& values, const at::Tensor& like) {
    if (!needed) return at::empty({0}, x.options());
    at::Tensor out = at::empty({x.size(1)}, like.options().dtype(at::kDouble));
    std::copy(values.begin(), values.end(), out.data_ptr<double>());
    return out.to(like.scalar_type());
  };
  return {grad_x, parameter_grad(need_weight, grad_weight, weight), parameter_grad(need_bias, grad_bias, bias)};
}

// grad_x of the batch norm from dz, the gradient of its output before the activation, and the sums
// Σ dz, Σ dz·x̂ per segment ((S, 2, C) float64) that the caller computed with dz: the backward's
// second pass alone (activation none: dz is the gradient it would have derived).
at::Tensor packed_batch_norm_grad_input_cpu(const at::Tensor& grad_z_in, const at::Tensor& x_in,
                                            at::IntArrayRef offsets, at::IntArrayRef channels,
                                            const at::Tensor& weight, const at::Tensor& save_mean_in,
                                            const at::Tensor& save_rstd_in, const at::Tensor& sums_in,
                                            bool training) {
  const int64_t segments = check_layout(x_in, offsets, channels);
  const at::ScalarType compute = compute_dtype(x_in);
  check_parameter("weight", weight, x_in);
  TORCH_CHECK(grad_z_in.sizes() == x_in.sizes(), "grad_z must have x's shape ", x_in.sizes(), ", got ",
              grad_z_in.sizes());
  TORCH_CHECK(sums_in.dim() == 3 && sums_in.size(0) == segments && sums_in.size(1) == 2 &&
                  sums_in.size(2) == x_in.size(1),
              "sums must have shape (segments, 2, C) = (", segments, ", 2, ", x_in.size(1), "), got ",
              sums_in.sizes());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor grad_z = grad_z_in.to(x.scalar_type()).contiguous();
  const at::Tensor save_mean = save_mean_in.to(compute).contiguous();
  const at::Tensor save_rstd = save_rstd_in.to(compute).contiguous();
  const at::Tensor sums = sums_in.to(at::kDouble).contiguous();
  const at::Tensor w = weight.to(compute).contiguous();
  at::Tensor grad_x = at::empty(x.sizes(), x.options());
  std::vector<double> unused_weight(x.size(1), 0.0), unused_bias(x.size(1), 0.0);
  with_storage(x.scalar_type(), [&](auto storage) {
    // The bias only enters z for the activation's derivative: none here.
    backward_impl<decltype(storage)>(grad_z, x, offsets, channels, w, w, save_mean, save_rstd, training,
                                     Activation::kNone, /*need_x=*/true, /*need_sums=*/false, grad_x, unused_weight,
                                     unused_bias, sums.data_ptr<double>());
  });
  return grad_x;
}

}  // namespace

bool set_packed_bn_cpu_chunks(bool enabled) { return channel_chunks.exchange(enabled); }

}  // namespace tofa_fast

TORCH_LIBRARY_IMPL(tofa_fast, CPU, m) {
  m.impl("_packed_batch_norm_act_forward", &tofa_fast::packed_batch_norm_act_forward_cpu);
  m.impl("_packed_batch_norm_act_backward", &tofa_fast::packed_batch_norm_act_backward_cpu);
  m.impl("_packed_batch_norm_stats", &tofa_fast::packed_batch_norm_stats_cpu);
  m.impl("_packed_batch_norm_grad_input", &tofa_fast::packed_batch_norm_grad_input_cpu);
}
