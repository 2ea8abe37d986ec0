// jv5fast._C: the ISA levels the CPU kernels dispatch on at run time, and the process-wide cap on them.
//
// The extension is built without global ISA flags (-mavx2 etc.), so the .so loads on any x86-64 (and builds
// on ARM, where only the portable code exists). Each ISA-specific function sits in a `#pragma GCC target`
// region and is only called after active_isa() says the CPU has it. set_isa_limit (jv5fast.ops, from JV5FAST_CPU_ISA) caps the level for
// tests and benchmarks; it never raises one above what the CPU has.
#pragma once

#include <atomic>

#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__)
#define JV5_X86_DISPATCH 1
#endif

enum JvIsa : int { JV5_ISA_SCALAR = 0, JV5_ISA_AVX2 = 1, JV5_ISA_AVX512 = 2 };

// The highest level this CPU runs (AVX2 means AVX2 + FMA; AVX-512 means F, BW, DQ and VL).
inline int cpu_isa_supported() {
#if defined(JV5_X86_DISPATCH)
  __builtin_cpu_init();
  if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))) return JV5_ISA_SCALAR;
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
    return JV5_ISA_AVX512;
  return JV5_ISA_AVX2;
#else
  return JV5_ISA_SCALAR;
#endif
}

inline std::atomic<int>& isa_limit() {
  static std::atomic<int> limit{JV5_ISA_AVX512};
  return limit;
}

// The level the kernels use now: what the CPU has, capped by set_isa_limit.
inline int active_isa() {
  static const int supported = cpu_isa_supported();
  const int cap = isa_limit().load(std::memory_order_relaxed);
  return supported < cap ? supported : cap;
}

// Whether the AVX2/FMA kernels (sgemm, rms_norm, rope, swiglu, attention) run here now.
inline bool avx2_fma_available() { return active_isa() >= JV5_ISA_AVX2; }
