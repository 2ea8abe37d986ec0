// jv5fast._C: the one runtime check the AVX2/FMA kernels (sgemm.cpp, cpu_ops.cpp) share.
#pragma once

#if defined(__x86_64__) && defined(__AVX2__) && defined(__FMA__)
#define JV5_AVX2_FMA 1
#endif

// Whether this build has the AVX2/FMA kernels and this CPU can run them.
inline bool avx2_fma_available() {
#if defined(JV5_AVX2_FMA)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}
