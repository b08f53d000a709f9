// A host-side stand-in for the CUDA execution model, enough to run kernels/cuda/elastic_dwconv_tiled.cuh
// on a CPU: each CUDA thread of a block is an OS thread, __syncthreads is a std::barrier, blocks run
// one after another, __shared__ arrays are statics (one block alive at a time) and the dynamic
// shared memory is a per-launch buffer filled with a poison byte. Threads that return early drop out
// of the barrier, as exited CUDA threads do. It checks logic (indexing, tiling, border handling,
// block reductions), not timing or memory-model subtleties.
#pragma once

#include <barrier>
#include <cstddef>
#include <thread>
#include <vector>

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using cudaStream_t = void*;

namespace emulation {

inline thread_local dim3 thread_index, block_index;
inline dim3 block_dim, grid_dim;
inline thread_local std::barrier<>* block_barrier = nullptr;
inline std::vector<unsigned char> dynamic_shared;
inline int multiprocessors = 2;  // the filter gradient sizes its batch chunks by it

template <typename Body>
void run_grid(dim3 grid, int threads, size_t shared_bytes, const Body& body) {
  grid_dim = grid;
  block_dim = dim3(threads);
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        dynamic_shared.assign(shared_bytes + 1, 0xA5);
        std::barrier<> barrier(threads);
        std::vector<std::thread> pool;
        pool.reserve(threads);
        for (int t = 0; t < threads; ++t)
          pool.emplace_back([&, t] {
            thread_index = dim3(t);
            block_index = dim3(x, y, z);
            block_barrier = &barrier;
            body();
            barrier.arrive_and_drop();
          });
        for (auto& thread : pool) thread.join();
      }
}

}  // namespace emulation

#define threadIdx (::emulation::thread_index)
#define blockIdx (::emulation::block_index)
#define blockDim (::emulation::block_dim)
#define gridDim (::emulation::grid_dim)
#define __syncthreads() (::emulation::block_barrier->arrive_and_wait())
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define TOFA_FAST_DYNAMIC_SHARED (::emulation::dynamic_shared.data())
