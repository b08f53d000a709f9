#pragma once
// The x86 vector instruction sets tofa_fast's CPU kernels are compiled for, and which one this CPU
// runs: decided once per process, shared by the depthwise tiles (csrc/ops/cpu) and the estimator's
// table sums (csrc/estimator), so that one variable caps both.
//
// Every x86-64 GCC/Clang build compiles the AVX2 (and, for the tiles, AVX-512) translation units with
// their own target flags; the running CPU picks among them. TOFA_FAST_CPU_ISA=avx512|avx2|baseline
// caps the choice (tests and benchmarks compare the paths on one machine).

#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define TOFA_FAST_X86_ISA_PATHS 1
#else
#define TOFA_FAST_X86_ISA_PATHS 0
#endif

namespace tofa_fast {

enum class CpuIsa : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

// The best instruction set this CPU runs (AVX2 means AVX2 + FMA; AVX-512 means F, BW, DQ and VL),
// capped by TOFA_FAST_CPU_ISA.
inline CpuIsa cpu_isa() {
  static const CpuIsa isa = [] {
#if TOFA_FAST_X86_ISA_PATHS
    const char* want = std::getenv("TOFA_FAST_CPU_ISA");
    int cap = 2;
    if (want != nullptr && std::strcmp(want, "avx2") == 0) cap = 1;
    if (want != nullptr && std::strcmp(want, "baseline") == 0) cap = 0;
    __builtin_cpu_init();
    const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (cap >= 2 && avx512) return CpuIsa::kAvx512;
    if (cap >= 1 && avx2) return CpuIsa::kAvx2;
#endif
    return CpuIsa::kBaseline;
  }();
  return isa;
}

}  // namespace tofa_fast
