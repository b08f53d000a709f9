// CPU kernels of the elastic depthwise convolution (forward, input gradient, weight gradient).
//
// Per call, one parallel region of (batch chunk, channel-block group) tasks (TaskPlan). Each task
//   1. derives its blocks' active filters (centre slice + transform chain folded into one small
//      matrix, no chain of small ATen ops) in the [k][k][lanes] layout the tiles read;
//   2. runs the vectorised tile kernels (dwconv_tiles.h): forward, or grad_x and the filter
//      gradient from the same tiles;
//   3. backward, the last task of a block: takes the block's filter gradient back through the chain
//      (full-weight gradient rows, the block's share of the matrices' gradient).
// Batch chunks have fixed sizes and sums run in fixed orders, so results do not depend on the thread
// count or on which thread ran a task. (Under load, every parallel region waits for its threads to
// be scheduled: one region per call keeps that cost to one.)
// The _bn_act_dwconv2d ops are the same kernels with a batch norm + activation prologue on the input
// tiles and, backward, its epilogue on the input gradient (dwconv_tiles.h: BnActPrologue).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include <unistd.h>

#include "../elastic_dwconv.h"
#include "dwconv_tiles.h"

namespace tofa_fast {
namespace cpu {

namespace {

// 0 = baseline, 1 = AVX2, 2 = AVX-512 (csrc/cpu_isa.h).
int selected_level() { return static_cast<int>(cpu_isa()); }

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

namespace {
std::atomic<bool> software_prefetch{true}, multi_block_passes{true};
}  // namespace

bool set_software_prefetch(bool enabled) { return software_prefetch.exchange(enabled); }
bool set_multi_block_passes(bool enabled) { return multi_block_passes.exchange(enabled); }

}  // namespace cpu

namespace {

// Copies of the inputs the kernels read with plain pointer arithmetic, in the compute dtype: the tile
// kernels are compiled for float and double, so bfloat16/float16 tensors (x, and the weight unless it
// is float32 already) run through float32 copies — float32 accumulation, as in the CUDA and Triton
// kernels — and the results go back to each input's own dtype.
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
  const at::ScalarType dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf,
              "the C++ CPU kernel serves float32, float64, bfloat16 and float16, got x of dtype ", dtype);
  TORCH_CHECK(cpu::tile_kernels_support(kernel_size, stride),
              "the C++ CPU kernel is compiled for kernel_size in {1, 3, 5, 7} and stride 1 or 2, got kernel_size=",
              kernel_size, ", stride=", stride);
  const at::ScalarType compute = dtype == at::kDouble ? at::kDouble : at::kFloat;
  in.format = dwconv_memory_format(x);
  in.x = x.to(compute).contiguous(in.format);
  in.weight = weight.to(compute).contiguous();
  for (const auto& m : transforms) in.transforms.push_back(m.to(compute).contiguous());
  return in;
}

// Runs task(i, scratch) for i in [0, count) on the intra-op threads, each with its own zero-filled
// scratch of `scratch_elems`, 64-byte aligned: tile pixels are whole cache lines with AVX-512, and a
// misaligned base would split every vector access in two (malloc only promises 16 bytes).
// Threads pull tasks from a shared counter: a thread the OS preempts (a loaded machine) delays
// only the task it holds, where a static split would stall on its whole share. Each task writes its
// own outputs and partial sums, so results do not depend on who ran it.
template <typename T, typename Task>
void run_tasks(int64_t count, size_t scratch_elems, const Task& task) {
  constexpr size_t kAlign = 64;
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(count, at::get_num_threads());
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    std::vector<T> storage(scratch_elems + kAlign / sizeof(T), T(0));
    void* base = storage.data();
    size_t space = storage.size() * sizeof(T);
    T* scratch = static_cast<T*>(std::align(kAlign, scratch_elems * sizeof(T), base, space));
    for (int64_t i = next.fetch_add(1); i < count; i = next.fetch_add(1)) task(i, scratch);
  });
}

// Element count rounded up to whole 64-byte lines, so what follows in a scratch buffer stays aligned.
template <typename T>
size_t aligned_elems(size_t elems) {
  constexpr size_t per_line = 64 / sizeof(T);
  return (elems + per_line - 1) / per_line * per_line;
}

// Channels-last planes below this many pixels take NCHW's task plan (task_plan); it is also where
// several channel blocks per pass stop paying (blocks_per_pass).
constexpr int64_t kSmallPlane = 256;

// How a call splits into (batch chunk, channel-block group) tasks; a task runs its group's blocks one
// after another, each over all the chunk's samples. Depends on the shapes only, so the float sums
// (and results) do not depend on the thread count.
//   NCHW: one block per group and enough batch chunks for ~64 tasks: a block's planes are
//         contiguous, and a task amortises its setup (offset tables, filter) over several samples.
//   NHWC: a pixel's channels are contiguous and a block reads only `lanes` of them, so the blocks of
//         a chunk share cache lines. Chunks are sized to stay in L2 (kChunkBytes) while the task's
//         blocks go through them. Groups split the blocks, to keep ~64 tasks, only at whole 64-byte
//         lines (`unit` blocks): tasks that run at once on different cores never write the same
//         line of the output (with 16 channels, two single-block tasks on one chunk ran at half
//         NCHW's speed). Block by block over a batch-sized chunk instead, every block reloaded the
//         chunk from L3 or DRAM. Planes of fewer than kSmallPlane pixels take NCHW's plan (below).
struct TaskPlan {
  int64_t chunks, groups, blocks, unit;  // unit: blocks per group boundary step
  int64_t count() const { return chunks * groups; }
  int64_t boundary(int64_t group) const {
    const int64_t units = (blocks + unit - 1) / unit;
    return std::min(blocks, unit * (units * group / groups));
  }
  int64_t block_lo(int64_t task) const { return boundary(task % groups); }
  int64_t block_hi(int64_t task) const { return boundary(task % groups + 1); }
  int64_t sample_lo(int64_t batch, int64_t task) const { return batch * (task / groups) / chunks; }
  int64_t sample_hi(int64_t batch, int64_t task) const { return batch * (task / groups + 1) / chunks; }
};

TaskPlan task_plan(const cpu::DwconvGeometry& g, int64_t blocks, int64_t lanes, int64_t element_bytes) {
  constexpr int64_t kTasks = 64, kChunkBytes = 128 << 10, kLineBytes = 64;
  const int64_t batch = std::max<int64_t>(g.batch, 1);
  const int64_t unit = std::max<int64_t>(1, kLineBytes / (lanes * element_bytes));
  if (g.channels_last && g.height * g.width < kSmallPlane) {
    // A sample's pixel runs are few (≤ 255 pixels): a block over every sample of the batch, like NCHW,
    // one line-aligned group of blocks per task. Sized by bytes instead, the 4×4 and 8×8 planes of
    // OFA's late stages (C 576–1152, batch 32) cut the batch into up to 32 chunks, and each (chunk,
    // block) pass paid its set-up for one or two samples. With this plan (and active_filters), 2
    // threads, alternating builds: 4×4 C1152 k7 1.9–2.5× forward, 1.7–1.9× backward; 8×8 C576–816
    // 1.6–2.7× / 1.35–2.45×; the digits 4×4 C192 and 8×8 C128 layers (batch 64) 1.4–1.7× / 1.2–1.3×
    // (the default run's step itself does not move: its members' small-plane calls are narrower).
    const int64_t groups = (blocks + unit - 1) / unit;
    return {std::clamp<int64_t>((kTasks + groups - 1) / groups, 1, batch), groups, blocks, unit};
  }
  if (g.channels_last) {
    const int64_t bytes = g.batch * g.height * g.width * g.channels * element_bytes;
    const int64_t chunks = std::clamp<int64_t>((bytes + kChunkBytes - 1) / kChunkBytes, 1, batch);
    const int64_t groups = std::clamp<int64_t>((kTasks + chunks - 1) / chunks, 1, (blocks + unit - 1) / unit);
    return {chunks, groups, blocks, unit};
  }
  return {std::clamp<int64_t>((kTasks + blocks - 1) / blocks, 1, batch), blocks, blocks, 1};
}

// The scratch a kernel pass's tiles may take: 2/5 of a core's L2, the rest left to the chunk's input —
// 512 KiB of the 1.25 MiB where it was measured (256 KiB gave less, 1 MiB no more); 512 KiB where the
// C library does not say.
int64_t pass_bytes() {
  static const int64_t bytes = [] {
#if defined(_SC_LEVEL2_CACHE_SIZE)
    const long l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
    if (l2 > 0) return static_cast<int64_t>(l2) * 2 / 5;
#endif
    return int64_t(512) << 10;
  }();
  return bytes;
}

// Channel blocks per kernel pass (dwconv_tiles.h): channels-last passes on planes of at least
// kSmallPlane pixels take as many of a task's blocks as keep the pass's tiles within pass_bytes() (in L2
// beside the chunk's input), so each pixel's run of their channels is read and written at once; NCHW
// passes take one (a block's planes are contiguous already). Measured against one block per pass,
// interleaved, 2 threads: 1.31× forward / 1.17× backward on the digits 64×64×32² stride-2 layer,
// 1.07–1.20× / 0.95–1.12× on OFA's 32² and 16² planes, 1.0× on 16×16 digits planes, and 0.90× on
// 8×8 ones (whose single-block tiles stay in L1): hence the plane threshold. Over the digits layers,
// forward + backward: 1.14× (bench/test_elastic_dwconv_layout_cpu.py, interleaved).
int64_t blocks_per_pass(const cpu::DwconvGeometry& g, int64_t block_bytes, const TaskPlan& plan) {
  if (!g.channels_last || !g.multi_block || g.height * g.width < kSmallPlane) return 1;
  int64_t widest = 0;
  for (int64_t group = 0; group < plan.groups; ++group)
    widest = std::max(widest, plan.boundary(group + 1) - plan.boundary(group));
  return std::clamp<int64_t>(pass_bytes() / std::max<int64_t>(block_bytes, 1), 1,
                             std::min<int64_t>(cpu::kMaxBlocksPerPass, std::max<int64_t>(widest, 1)));
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
          format == at::MemoryFormat::ChannelsLast,
          cpu::software_prefetch.load(std::memory_order_relaxed),
          cpu::multi_block_passes.load(std::memory_order_relaxed)};
}

template <typename T>
std::vector<const T*> matrix_pointers(const std::vector<at::Tensor>& transforms) {
  std::vector<const T*> out;
  for (const auto& m : transforms) out.push_back(m.data_ptr<T>());
  return out;
}

// ---- the active filter as one matrix ---------------------------------------------------------------
// The chain is linear in the window it reads first (t_1×t_1, the centre of W[c]):
//   active[c] = Q · window(W[c]),  Q (k² × t_1²) = M_m S_m ⋯ M_2 S_2 M_1,
// S_i selecting the centred t_i×t_i window. Q costs O(K⁶) once per call; a channel block then goes
// through one small matrix product, with channels as the contiguous (vectorised) dimension: the
// result comes out directly in the [k·k][lanes] layout the tile kernels read. Backward:
// dW = Qᵀ g (in the window, zero elsewhere), dQ = Σ_c g_c ⊗ window_c, and for each matrix
// dM_i = L_iᵀ · dP · R_iᵀ with dP = dQ on the window's columns, L_i = M_m S_m ⋯ M_{i+1} S_{i+1} and
// R_i = S_i M_{i−1} S_{i−1} ⋯ M_1 S_1. Without transforms the active filter is a plain window copy.

// Row-major dense matrix for the per-call chain algebra (at most K² × K²).
template <typename T>
struct Matrix {
  int64_t rows = 0, cols = 0;
  std::vector<T> data;
  Matrix(int64_t r, int64_t c) : rows(r), cols(c), data(r * c, T(0)) {}
  T& operator()(int64_t r, int64_t c) { return data[r * cols + c]; }
  T operator()(int64_t r, int64_t c) const { return data[r * cols + c]; }
};

template <typename T>
Matrix<T> identity(int64_t n) {
  Matrix<T> m(n, n);
  for (int64_t i = 0; i < n; ++i) m(i, i) = T(1);
  return m;
}

// Index in a size×size grid of element e of its centred t×t window.
inline int64_t window_position(int64_t e, int64_t t, int64_t size) {
  const int64_t off = (size - t) / 2;
  return (e / t + off) * size + e % t + off;
}

// S · A: the rows of A (size² rows) at the centred t×t window.
template <typename T>
Matrix<T> select_rows(const Matrix<T>& a, int64_t t, int64_t size) {
  Matrix<T> out(t * t, a.cols);
  for (int64_t e = 0; e < t * t; ++e)
    std::copy_n(a.data.begin() + window_position(e, t, size) * a.cols, a.cols, out.data.begin() + e * a.cols);
  return out;
}

// A · S: the t² columns of A scattered to the centred window of a size²-column zero matrix.
template <typename T>
Matrix<T> scatter_columns(const Matrix<T>& a, int64_t t, int64_t size) {
  Matrix<T> out(a.rows, size * size);
  for (int64_t r = 0; r < a.rows; ++r)
    for (int64_t e = 0; e < t * t; ++e) out(r, window_position(e, t, size)) = a(r, e);
  return out;
}

template <typename T>
Matrix<T> matmul(const Matrix<T>& a, const Matrix<T>& b, bool transpose_a = false, bool transpose_b = false) {
  const int64_t n = transpose_a ? a.cols : a.rows, inner = transpose_a ? a.rows : a.cols;
  const int64_t m = transpose_b ? b.rows : b.cols;
  Matrix<T> out(n, m);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t l = 0; l < inner; ++l) {
      const T av = transpose_a ? a(l, i) : a(i, l);
      for (int64_t j = 0; j < m; ++j) out(i, j) += av * (transpose_b ? b(j, l) : b(l, j));
    }
  return out;
}

template <typename T>
Matrix<T> transform_matrix(const T* data, int64_t t) {
  Matrix<T> m(t * t, t * t);
  std::copy_n(data, m.data.size(), m.data.begin());
  return m;
}

template <typename T>
struct ActiveFilterChain {
  int64_t big, k, first;  // first: the window size the chain reads (k without transforms)
  std::vector<const T*> mats;
  std::vector<int64_t> sizes;
  Matrix<T> q;  // k² × first²; unused without transforms

  ActiveFilterChain(int64_t big_, int64_t k_, std::vector<const T*> mats_, std::vector<int64_t> sizes_)
      : big(big_),
        k(k_),
        first(sizes_.empty() ? k_ : sizes_[0]),
        mats(std::move(mats_)),
        sizes(std::move(sizes_)),
        q(0, 0) {
    if (mats.empty()) return;
    q = transform_matrix(mats[0], sizes[0]);
    for (size_t i = 1; i < mats.size(); ++i)
      q = matmul(transform_matrix(mats[i], sizes[i]), select_rows(q, sizes[i], sizes[i - 1]));
  }
  bool plain() const { return mats.empty(); }
};

// Channel block b's active filters, [k·k][lanes] (lanes past `channels` zero). `window`: ff·lanes.
template <typename T>
void active_filter_block(const T* weight, const ActiveFilterChain<T>& chain, int64_t channels, int64_t lanes,
                         int64_t b, T* out, T* window) {
  const int64_t kk = chain.k * chain.k, ff = chain.first * chain.first, bb = chain.big * chain.big;
  const int64_t c0 = b * lanes, nc = std::min(lanes, channels - c0);
  T* win = chain.plain() ? out : window;
  for (int64_t e = 0; e < ff; ++e) {
    const int64_t pos = window_position(e, chain.first, chain.big);
    for (int64_t l = 0; l < nc; ++l) win[e * lanes + l] = weight[(c0 + l) * bb + pos];
    for (int64_t l = nc; l < lanes; ++l) win[e * lanes + l] = T(0);
  }
  if (chain.plain()) return;
  std::fill_n(out, kk * lanes, T(0));
  for (int64_t q = 0; q < kk; ++q)
    for (int64_t e = 0; e < ff; ++e) {
      const T qe = chain.q(q, e);
      for (int64_t l = 0; l < lanes; ++l) out[q * lanes + l] += qe * window[e * lanes + l];  // vectorised over l
    }
}

// Every channel block's active filter ([blocks][k][k][lanes]), derived once per call, in parallel over
// the blocks: the tasks then read it. Derived inside each task instead, a block's filter was computed
// once per batch chunk (up to 32 times), and with a transform chain that product cost as much as the
// convolution: once per call, 16×16 C288 k5 (chain 7→5) runs 1.7–1.9× faster forward and 1.35×
// backward, 16×16 C576 stride 2 2.4× / 1.45×, 4×4 C1152 k5 5.8× / 3.2× (with the small-plane plan).
template <typename T>
at::Tensor active_filters(const T* weight, const ActiveFilterChain<T>& chain, int64_t channels, int64_t lanes,
                          int64_t blocks, const at::TensorOptions& options) {
  const int64_t kk = chain.k * chain.k, ff = chain.first * chain.first;
  at::Tensor filters = at::empty({blocks * kk * lanes}, options);  // ATen aligns it to 64 bytes
  T* out = filters.data_ptr<T>();
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<T> window(ff * lanes);
    for (int64_t b = b0; b < b1; ++b) active_filter_block(weight, chain, channels, lanes, b, out + b * kk * lanes, window.data());
  });
  return filters;
}

// Channel block b's share of the chain backward, from its filter gradient g ([k·k][lanes]):
// grad_weight rows of its channels (when non-null) and dq (k² × t_1², when non-null) = Σ_l g ⊗ window.
// `work`: 2·ff·lanes.
template <typename T>
void active_filter_block_backward(const T* weight, const ActiveFilterChain<T>& chain, int64_t channels,
                                  int64_t lanes, int64_t b, const T* g, T* grad_weight, T* dq, T* work) {
  const int64_t kk = chain.k * chain.k, ff = chain.first * chain.first, bb = chain.big * chain.big;
  const int64_t c0 = b * lanes, nc = std::min(lanes, channels - c0);
  T* window = work;
  T* grad_window = work + ff * lanes;
  const T* gw = g;  // the window's gradient: g itself without transforms
  if (!chain.plain()) {
    std::fill_n(grad_window, ff * lanes, T(0));
    for (int64_t q = 0; q < kk; ++q)
      for (int64_t e = 0; e < ff; ++e) {
        const T qe = chain.q(q, e);
        for (int64_t l = 0; l < lanes; ++l) grad_window[e * lanes + l] += qe * g[q * lanes + l];
      }
    gw = grad_window;
  }
  if (grad_weight != nullptr)
    for (int64_t e = 0; e < ff; ++e) {
      const int64_t pos = window_position(e, chain.first, chain.big);
      for (int64_t l = 0; l < nc; ++l) grad_weight[(c0 + l) * bb + pos] = gw[e * lanes + l];
    }
  if (dq == nullptr) return;
  for (int64_t e = 0; e < ff; ++e) {
    const int64_t pos = window_position(e, chain.first, chain.big);
    for (int64_t l = 0; l < nc; ++l) window[e * lanes + l] = weight[(c0 + l) * bb + pos];
    for (int64_t l = nc; l < lanes; ++l) window[e * lanes + l] = T(0);
  }
  for (int64_t q = 0; q < kk; ++q)
    for (int64_t e = 0; e < ff; ++e) {
      T acc = 0;
      for (int64_t l = 0; l < lanes; ++l) acc += g[q * lanes + l] * window[e * lanes + l];
      dq[q * ff + e] = acc;
    }
}

// dM_i = L_iᵀ · dP · R_iᵀ for every matrix of the chain, from dq = Σ_c g_c ⊗ window_c (k² × t_1²).
template <typename T>
void transform_gradients(const ActiveFilterChain<T>& chain, const Matrix<T>& dq, const std::vector<T*>& grad_mats) {
  const int64_t kk = chain.k * chain.k, bb = chain.big * chain.big;
  std::vector<Matrix<T>> prefixes{identity<T>(bb)};  // M_i S_i ⋯ M_1 S_1 (K² columns)
  int64_t size = chain.big;
  for (size_t i = 0; i < chain.mats.size(); ++i) {
    prefixes.push_back(
        matmul(transform_matrix(chain.mats[i], chain.sizes[i]), select_rows(prefixes.back(), chain.sizes[i], size)));
    size = chain.sizes[i];
  }
  const Matrix<T> dp = scatter_columns(dq, chain.first, chain.big);
  Matrix<T> left = identity<T>(kk);  // L_i, from the last step down
  for (int64_t i = static_cast<int64_t>(chain.mats.size()) - 1; i >= 0; --i) {
    const int64_t t = chain.sizes[i], previous = i == 0 ? chain.big : chain.sizes[i - 1];
    const Matrix<T> dm = matmul(matmul(left, dp, true, false), select_rows(prefixes[i], t, previous), false, true);
    std::copy(dm.data.begin(), dm.data.end(), grad_mats[i]);
    left = scatter_columns(matmul(left, transform_matrix(chain.mats[i], t)), t, previous);
  }
}

// ---- the batch norm + activation prologue (dwconv_tiles.h: BnActPrologue) ------------------------------

// Its per-channel vectors in the compute dtype, and the activation.
struct PrologueInputs {
  at::Tensor mean, scale, bias;
  cpu::PrologueActivation activation;
  at::Tensor rstd, weight;  // backward: the epilogue's (BnActPrologue); undefined in the forward
};

cpu::PrologueActivation parse_prologue_activation(c10::string_view name) {
  if (name == "none") return cpu::PrologueActivation::kNone;
  if (name == "relu") return cpu::PrologueActivation::kRelu;
  if (name == "relu6") return cpu::PrologueActivation::kRelu6;
  if (name == "hswish") return cpu::PrologueActivation::kHswish;
  TORCH_CHECK(false, "the depthwise prologue's activation must be one of none, relu, relu6, hswish, got '",
              std::string(name), "'");
  return cpu::PrologueActivation::kNone;  // unreachable
}

PrologueInputs prologue_inputs(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& scale,
                               const at::Tensor& bias, c10::string_view activation,
                               const at::Tensor& rstd = at::Tensor(), const at::Tensor& weight = at::Tensor()) {
  const at::ScalarType compute = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  PrologueInputs p;
  std::vector<std::tuple<const char*, const at::Tensor*, at::Tensor*>> vectors = {
      {"mean", &mean, &p.mean}, {"scale", &scale, &p.scale}, {"bias", &bias, &p.bias}};
  if (rstd.defined()) {
    vectors.emplace_back("rstd", &rstd, &p.rstd);
    vectors.emplace_back("bn_weight", &weight, &p.weight);
  }
  for (auto [name, t, out] : vectors) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == x.size(1), "the prologue's ", name, " must have shape (", x.size(1),
                ",), got ", t->sizes());
    TORCH_CHECK(t->device() == x.device(), "the prologue's ", name, " is on ", t->device(), " but x is on ",
                x.device());
    *out = t->to(compute).contiguous();
  }
  p.activation = parse_prologue_activation(activation);
  return p;
}

template <typename T>
cpu::BnActPrologue<T> prologue_args(const PrologueInputs& p) {
  cpu::BnActPrologue<T> args{p.mean.data_ptr<T>(), p.scale.data_ptr<T>(), p.bias.data_ptr<T>(), p.activation};
  if (p.rstd.defined()) {
    args.rstd = p.rstd.data_ptr<T>();
    args.weight = p.weight.data_ptr<T>();
  }
  return args;
}

// ---- forward and backward -------------------------------------------------------------------------

at::Tensor dwconv_forward(const at::Tensor& x_arg, const at::Tensor& weight_arg, int64_t kernel_size, int64_t stride,
                          at::TensorList transforms_arg, const std::optional<PrologueInputs>& prologue_in) {
  const DenseInputs in = dense_inputs(x_arg, weight_arg, kernel_size, stride, transforms_arg);
  const cpu::DwconvGeometry g = geometry(in.x, kernel_size, stride, in.format);
  at::Tensor y = at::empty({g.batch, g.channels, g.out_height, g.out_width}, in.x.options().memory_format(in.format));
  if (y.numel() == 0) return y.to(x_arg.scalar_type());
  AT_DISPATCH_FLOATING_TYPES(in.x.scalar_type(), "elastic_dwconv2d_forward_cpu", [&] {
    const auto& kernels = cpu::select_tile_kernels<scalar_t>();
    const ActiveFilterChain<scalar_t> chain(in.weight.size(2), kernel_size, matrix_pointers<scalar_t>(in.transforms),
                                            in.sizes);
    const int64_t lanes = kernels.lanes, kk = kernel_size * kernel_size;
    const int64_t blocks = (g.channels + lanes - 1) / lanes;
    const TaskPlan plan = task_plan(g, blocks, lanes, sizeof(scalar_t));
    // One block's share of a pass's scratch: what a second block adds.
    const int64_t nb = blocks_per_pass(g, (kernels.forward_scratch(g, 2) - kernels.forward_scratch(g, 1)) *
                                              sizeof(scalar_t), plan);
    const size_t tiles = aligned_elems<scalar_t>(kernels.forward_scratch(g, nb));
    const scalar_t* x = in.x.data_ptr<scalar_t>();
    const at::Tensor filter_storage =
        active_filters(in.weight.data_ptr<scalar_t>(), chain, g.channels, lanes, blocks, in.x.options());
    const scalar_t* filters = filter_storage.data_ptr<scalar_t>();
    scalar_t* out = y.data_ptr<scalar_t>();
    cpu::BnActPrologue<scalar_t> prologue_storage{};
    const cpu::BnActPrologue<scalar_t>* prologue = nullptr;
    if (prologue_in) prologue = &(prologue_storage = prologue_args<scalar_t>(*prologue_in));
    run_tasks<scalar_t>(plan.count(), tiles, [&](int64_t task, scalar_t* scratch) {
      const int64_t n0 = plan.sample_lo(g.batch, task), n1 = plan.sample_hi(g.batch, task);
      const int64_t b_hi = plan.block_hi(task);
      for (int64_t b0 = plan.block_lo(task); b0 < b_hi; b0 += nb) {
        const int64_t count = std::min(nb, b_hi - b0);
        kernels.forward_blocks(g, x, out, filters + b0 * kk * lanes, n0, n1, b0 * lanes, count, scratch, prologue);
      }
    });
  });
  return y.to(x_arg.scalar_type());
}

using DwconvGrads = std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>>;

// With an epilogue (prologue_in->rstd defined, channels-last), grad_x is dz (BnActPrologue) and
// `grad_z_sums` receives (2, C) doubles: Σ dz and Σ dz·x̂ per channel.
DwconvGrads dwconv_backward(const at::Tensor& grad_output_arg, const at::Tensor& x_arg, const at::Tensor& weight_arg,
                            int64_t kernel_size, int64_t stride, at::TensorList transforms_arg,
                            std::array<bool, 3> output_mask, const std::optional<PrologueInputs>& prologue_in,
                            at::Tensor* grad_z_sums = nullptr) {
  const DenseInputs in = dense_inputs(x_arg, weight_arg, kernel_size, stride, transforms_arg);
  check_grad_output(grad_output_arg, x_arg, kernel_size, stride);
  const cpu::DwconvGeometry g = geometry(in.x, kernel_size, stride, in.format);
  const at::Tensor grad_y = grad_output_arg.to(in.x.scalar_type()).contiguous(in.format);
  const bool need_x = output_mask[0], need_weight = output_mask[1];
  const bool need_mats = output_mask[2] && !in.transforms.empty();
  const bool need_filter = need_weight || need_mats;
  // Masked-off gradients are (0,) tensors, each its own: op outputs must not alias one another.
  const auto empty = [&] { return at::empty({0}, x_arg.options()); };
  at::Tensor grad_x = need_x ? at::empty_like(in.x, in.format) : empty();
  at::Tensor grad_weight = need_weight ? at::zeros_like(in.weight, at::MemoryFormat::Contiguous) : empty();
  std::vector<at::Tensor> grad_mats;
  for (const auto& m : in.transforms) grad_mats.push_back(output_mask[2] ? at::zeros_like(m) : empty());
  // Each gradient in its input's dtype (no copy where the compute dtype is that already).
  const auto cast_to_input_dtypes = [&] {
    std::vector<at::Tensor> mats;
    for (size_t i = 0; i < grad_mats.size(); ++i)
      mats.push_back(output_mask[2] ? grad_mats[i].to(transforms_arg[i].scalar_type()) : grad_mats[i]);
    return std::make_tuple(need_x ? grad_x.to(x_arg.scalar_type()) : grad_x,
                           need_weight ? grad_weight.to(weight_arg.scalar_type()) : grad_weight, mats);
  };
  const bool epilogue = need_x && prologue_in && prologue_in->rstd.defined();
  TORCH_CHECK(!epilogue || g.channels_last, "the batch norm backward epilogue needs a channels-last x");
  if (grad_z_sums != nullptr) *grad_z_sums = at::zeros({2, g.channels}, x_arg.options().dtype(at::kDouble));
  if (g.batch == 0 || (!need_x && !need_filter)) return cast_to_input_dtypes();

  AT_DISPATCH_FLOATING_TYPES(in.x.scalar_type(), "elastic_dwconv2d_backward_cpu", [&] {
    const auto& kernels = cpu::select_tile_kernels<scalar_t>();
    const ActiveFilterChain<scalar_t> chain(in.weight.size(2), kernel_size, matrix_pointers<scalar_t>(in.transforms),
                                            in.sizes);
    const int64_t lanes = kernels.lanes, kk = kernel_size * kernel_size, ff = chain.first * chain.first;
    const int64_t blocks = (g.channels + lanes - 1) / lanes;
    const TaskPlan plan = task_plan(g, blocks, lanes, sizeof(scalar_t));
    const int64_t nb = blocks_per_pass(g, (kernels.backward_scratch(g, 2) - kernels.backward_scratch(g, 1)) *
                                              sizeof(scalar_t), plan);
    const size_t tiles = aligned_elems<scalar_t>(kernels.backward_scratch(g, nb));
    // Filter-gradient partial sums, one per (batch chunk, block). A tensor, not a std::vector: ATen's
    // allocator aligns to 64 bytes, as the vector updates want.
    const at::Tensor partial_sums =
        at::zeros({need_filter ? plan.chunks * blocks * kk * lanes : 0}, in.x.options());
    scalar_t* partial = partial_sums.data_ptr<scalar_t>();
    std::vector<scalar_t> dq_blocks(need_mats ? blocks * kk * ff : 0, scalar_t(0));
    // The epilogue's sums, one slot of 2·lanes per (batch chunk, block), added in chunk order below.
    std::vector<double> epilogue_sums(epilogue ? plan.chunks * blocks * 2 * lanes : 0, 0.0);
    std::vector<std::atomic<int64_t>> unfinished(blocks);
    for (auto& count : unfinished) count.store(plan.chunks);
    const scalar_t* x = in.x.data_ptr<scalar_t>();
    const scalar_t* weight = in.weight.data_ptr<scalar_t>();
    const at::Tensor filter_storage = active_filters(weight, chain, g.channels, lanes, blocks, in.x.options());
    const scalar_t* filters = filter_storage.data_ptr<scalar_t>();
    const scalar_t* gy = grad_y.data_ptr<scalar_t>();
    scalar_t* gx = need_x ? grad_x.data_ptr<scalar_t>() : nullptr;
    scalar_t* gw = need_weight ? grad_weight.data_ptr<scalar_t>() : nullptr;
    cpu::BnActPrologue<scalar_t> prologue_storage{};
    const cpu::BnActPrologue<scalar_t>* prologue = nullptr;
    if (prologue_in) prologue = &(prologue_storage = prologue_args<scalar_t>(*prologue_in));
    // One parallel region for the tasks (after active_filters' own). The task that finishes a channel
    // block's last batch chunk sums the block's chunks (in chunk order: deterministic) and takes the
    // block back through the chain.
    run_tasks<scalar_t>(plan.count(), tiles + (kk + 2 * ff) * lanes, [&](int64_t task, scalar_t* scratch) {
      const int64_t chunk = task / plan.groups;
      const int64_t n0 = plan.sample_lo(g.batch, task), n1 = plan.sample_hi(g.batch, task);
      const int64_t b0 = plan.block_lo(task), b1 = plan.block_hi(task);
      scalar_t* block_grad = scratch + tiles;
      scalar_t* work = block_grad + kk * lanes;
      // A pass's blocks are consecutive, so their filters, partial sums and epilogue slots are too.
      for (int64_t b = b0; b < b1; b += nb) {
        const int64_t count = std::min(nb, b1 - b);
        scalar_t* gf = need_filter ? partial + (chunk * blocks + b) * kk * lanes : nullptr;
        double* sums = epilogue ? epilogue_sums.data() + (chunk * blocks + b) * 2 * lanes : nullptr;
        kernels.backward_blocks(g, x, gy, gx, filters + b * kk * lanes, gf, n0, n1, b * lanes, count, scratch,
                                prologue, sums);
      }
      if (!need_filter) return;
      for (int64_t b = b0; b < b1; ++b) {
        if (unfinished[b].fetch_sub(1) != 1) continue;
        std::fill_n(block_grad, kk * lanes, scalar_t(0));
        for (int64_t c = 0; c < plan.chunks; ++c) {
          const scalar_t* src = partial + (c * blocks + b) * kk * lanes;
          for (int64_t e = 0; e < kk * lanes; ++e) block_grad[e] += src[e];
        }
        active_filter_block_backward(weight, chain, g.channels, lanes, b, block_grad, gw,
                                     need_mats ? dq_blocks.data() + b * kk * ff : nullptr, work);
      }
    });
    if (epilogue) {
      double* out = grad_z_sums->data_ptr<double>();
      for (int64_t c = 0; c < plan.chunks; ++c)
        for (int64_t b = 0; b < blocks; ++b) {
          const double* slot = epilogue_sums.data() + (c * blocks + b) * 2 * lanes;
          for (int64_t l = 0; l < lanes && b * lanes + l < g.channels; ++l) {
            out[b * lanes + l] += slot[l];
            out[g.channels + b * lanes + l] += slot[lanes + l];
          }
        }
    }
    if (!need_mats) return;
    Matrix<scalar_t> dq(kk, ff);
    for (int64_t block = 0; block < blocks; ++block)
      for (int64_t e = 0; e < kk * ff; ++e) dq.data[e] += dq_blocks[block * kk * ff + e];
    std::vector<scalar_t*> mat_grads;
    for (auto& m : grad_mats) mat_grads.push_back(m.data_ptr<scalar_t>());
    transform_gradients(chain, dq, mat_grads);
  });
  return cast_to_input_dtypes();
}

at::Tensor elastic_dwconv2d_forward_cpu(const at::Tensor& x, const at::Tensor& weight, int64_t kernel_size,
                                        int64_t stride, at::TensorList transforms) {
  return dwconv_forward(x, weight, kernel_size, stride, transforms, std::nullopt);
}

DwconvGrads elastic_dwconv2d_backward_cpu(const at::Tensor& grad_output, const at::Tensor& x, const at::Tensor& weight,
                                          int64_t kernel_size, int64_t stride, at::TensorList transforms,
                                          std::array<bool, 3> output_mask) {
  return dwconv_backward(grad_output, x, weight, kernel_size, stride, transforms, output_mask, std::nullopt);
}

at::Tensor bn_act_dwconv2d_forward_cpu(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& scale,
                                       const at::Tensor& bias, c10::string_view activation, const at::Tensor& weight,
                                       int64_t kernel_size, int64_t stride, at::TensorList transforms) {
  return dwconv_forward(x, weight, kernel_size, stride, transforms, prologue_inputs(x, mean, scale, bias, activation));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> bn_act_dwconv2d_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& scale,
    const at::Tensor& bias, const at::Tensor& rstd, const at::Tensor& bn_weight, c10::string_view activation,
    const at::Tensor& weight, int64_t kernel_size, int64_t stride, at::TensorList transforms,
    std::array<bool, 3> output_mask) {
  at::Tensor sums;
  auto [grad_z, grad_weight, grad_transforms] =
      dwconv_backward(grad_output, x, weight, kernel_size, stride, transforms, output_mask,
                      prologue_inputs(x, mean, scale, bias, activation, rstd, bn_weight), &sums);
  return {grad_z, sums, grad_weight, grad_transforms};
}

}  // namespace
}  // namespace tofa_fast

TORCH_LIBRARY_IMPL(tofa_fast, CPU, m) {
  m.impl("_elastic_dwconv2d_compiled_forward", &tofa_fast::elastic_dwconv2d_forward_cpu);
  m.impl("_elastic_dwconv2d_compiled_backward", &tofa_fast::elastic_dwconv2d_backward_cpu);
  m.impl("_bn_act_dwconv2d_compiled_forward", &tofa_fast::bn_act_dwconv2d_forward_cpu);
  m.impl("_bn_act_dwconv2d_compiled_backward", &tofa_fast::bn_act_dwconv2d_backward_cpu);
}
