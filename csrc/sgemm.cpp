// jv5fast._C: fp32 GEMM C = A @ W^T for CPU inference on prepacked weights (AVX-512 or AVX2 + FMA, picked at
// run time: cpu_features.h; each kernel compiled under its own GCC target, the .so needs neither).
//
// The weight W (N, K) is packed once (jv5fast.ops.pack_linear) into P = ceil(N / 16) panels of shape
// (K, 16), each the transpose of 16 consecutive rows of W, zero-padded past N, so a panel is one
// contiguous stream that the kernel reads exactly once from memory per block of rows of A.
//
// Why: at query-sized M (1-64 rows) a transformer forward is a stream of weights (452 MB for
// EuroBERT-210m) through ~49 GEMMs, and oneDNN's prepacked GEMM reads them at ~10 GB/s on a 2-core
// Zen3, where the memory gives ~20 GB/s per core. Work items are (block of Mc rows of A) x (8 panels);
// per K chunk of <= 768 (Mc x chunk of A stays in L2, ~256 KiB) and per panel the 6 x 16 register-blocked
// micro-kernel runs for every tile of <= 6 rows: 12 accumulators, two 8-wide loads of the panel and six
// broadcasts of A per k. The chunk loop is outside the panel loop, so a chunk of A is reused from cache by
// all 8 panels. A panel chunk comes from memory for the first tile and from cache for the rest; meanwhile
// the tiles prefetch the next panel's chunk, spread between them (tile i of S takes the i-th slice, one
// line every S k-steps; the last klen % S lines are left to the hardware) so that memory is asked at the
// pace of the compute instead of in bursts. Measured on a 2-core Zen3 over nano's 49 weights at 17 rows (a
// query): 23.6 ms (~19 GB/s, ~80% of the FMA peak) where prefetching the whole next panel from the later
// tiles took 27.5; at 524 rows 181 GFLOP/s (~89% of peak).
// AVX-512 (sgemm_item_avx512): the same panels, items, K chunks and prefetch spread; a micro-tile is <= 12 rows
// x two panels (24 zmm accumulators, two 16-wide panel loads and <= 12 broadcasts of A per k), so each
// broadcast feeds two FMAs and the loads stay under the two FMA pipes' rate; row blocks of A are 512 KiB
// (MC_FLOATS_512). Measured on a 2-core Sapphire Rapids (shared machine, one thread, fastest of 15 interleaved
// calls, nano's four projection shapes; bench/results/cpu_gemm_sapphire_rapids.md): 79-84 GFLOP/s at 16 rows
// (oneDNN 45-56, this file's AVX2 kernel 61), 137-148 at 128 and 512 rows (oneDNN 125-149, AVX2 92-101).
// Summation order (both ISAs): each C element is one fused multiply-add chain over k in order within a K
// chunk (chunks of kc = ceil(K / ceil(K / 768)), fixed by K alone), and the chunk sums are added to C in
// chunk order. Neither the row tiling, the panel grouping, the thread count nor the ISA changes any of that,
// so results are bit-equal across thread counts and between the AVX2 and AVX-512 kernels, and match a
// reference GEMM to fp32 rounding.
//
// Threads: OpenMP, dynamic over work items, `threads` given by the caller (torch.get_num_threads() of
// the calling thread).
// Imported after torch, this module shares torch's libgomp (same soname), so torch's pool and ours
// are the same threads and never spin against each other. The GIL is released while computing.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#if defined(_OPENMP)
#include <omp.h>
#endif
#include "cpu_features.h"
#if defined(JV5_X86_DISPATCH)
#include <immintrin.h>
#endif

namespace py = pybind11;

namespace {

constexpr int NR = 16;  // panel width: two 8-float AVX registers
constexpr int MR = 6;   // rows per micro-tile: 12 accumulators + 2 panel loads + 1 broadcast <= 16 ymm

constexpr int64_t KC = 768;           // K chunk: a 6 x 768 tile of A (18 KiB) stays in L1 for K = 3072
constexpr int64_t MC_FLOATS = 65536;  // Mc x chunk of A: 256 KiB, half of a Zen3 core's L2
// AVX-512 parts have >= 1 MiB of L2 per core (Skylake-SP 1, Ice Lake 1.25, Sapphire Rapids 2, Zen4 1): 512 KiB
// blocks of A read each weight panel half as often (measured on a 2-core Sapphire Rapids, one thread, at 128
// and 512 rows: 117-124 -> 125-135 GFLOP/s; 1 MiB gave the same).
constexpr int64_t MC_FLOATS_512 = 131072;
constexpr int64_t PANELS_PER_ITEM = 8;  // work item = Mc rows x 8 panels, handed out dynamically

// The blocking of one call, shared by the ISA kernels (kc depends on K only: it fixes the summation order).
struct Geometry {
  const float* A;
  const float* B;
  float* C;
  int64_t M, K, N, P, kc, Mc, chunks;
};

inline Geometry geometry(const float* A, int64_t M, int64_t K, const float* B, int64_t N, float* C, int mr,
                         int64_t mc_floats) {
  const int64_t P = (N + NR - 1) / NR;
  const int64_t kchunks = (K + KC - 1) / KC, kc = (K + kchunks - 1) / kchunks;
  // Rows of A per block: Mc x kc floats in L2, reused by every panel of the item (large M only).
  const int64_t Mc = std::max<int64_t>(mr, (mc_floats / kc) / mr * mr);
  return {A, B, C, M, K, N, P, kc, Mc, (P + PANELS_PER_ITEM - 1) / PANELS_PER_ITEM};
}

#if defined(JV5_X86_DISPATCH)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
// C[r, :ncols] (+)= A[r, :K] . panel[:K] for r < R (R <= MR); ``accumulate`` adds to C (a later K chunk).
// ``next`` (or null): lines of another panel to prefetch into L2, one every S k-steps (K / S lines), so they
// arrive while the tiles compute from cache. Accumulators are named variables: an array of __m256 is kept on the stack by
// GCC and stored every iteration.
template <int R, int S>
inline void micro(const float* A, int64_t lda, const float* B, int64_t K, float* C, int64_t ldc, int ncols,
                  bool accumulate, const float* next) {
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00,
         c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  const float *a0 = A, *a1 = A + lda, *a2 = A + 2 * lda, *a3 = A + 3 * lda, *a4 = A + 4 * lda, *a5 = A + 5 * lda;
#define JV5_STEP_AT(r, kk)                             \
  if constexpr (R > r) {                               \
    const __m256 a = _mm256_broadcast_ss(a##r + (kk)); \
    c##r##0 = _mm256_fmadd_ps(a, b0, c##r##0);         \
    c##r##1 = _mm256_fmadd_ps(a, b1, c##r##1);         \
  }
#define JV5_STEP(r) JV5_STEP_AT(r, k)
  if (next != nullptr) {
    int64_t k = 0, line = 0;
    for (; k + S <= K; k += S, ++line) {
      _mm_prefetch(reinterpret_cast<const char*>(next + line * NR), _MM_HINT_T1);
#pragma GCC unroll 4
      for (int j = 0; j < S; ++j) {
        const __m256 b0 = _mm256_loadu_ps(B + (k + j) * NR), b1 = _mm256_loadu_ps(B + (k + j) * NR + 8);
        JV5_STEP_AT(0, k + j) JV5_STEP_AT(1, k + j) JV5_STEP_AT(2, k + j) JV5_STEP_AT(3, k + j)
        JV5_STEP_AT(4, k + j) JV5_STEP_AT(5, k + j)
      }
    }
    for (; k < K; ++k) {
      const __m256 b0 = _mm256_loadu_ps(B + k * NR), b1 = _mm256_loadu_ps(B + k * NR + 8);
      JV5_STEP(0) JV5_STEP(1) JV5_STEP(2) JV5_STEP(3) JV5_STEP(4) JV5_STEP(5)
    }
  } else {
#pragma GCC unroll 4
    for (int64_t k = 0; k < K; ++k) {
      const __m256 b0 = _mm256_loadu_ps(B + k * NR), b1 = _mm256_loadu_ps(B + k * NR + 8);
      JV5_STEP(0) JV5_STEP(1) JV5_STEP(2) JV5_STEP(3) JV5_STEP(4) JV5_STEP(5)
    }
  }
#undef JV5_STEP
#undef JV5_STEP_AT
  alignas(32) float tile[NR];
#define JV5_OUT(r)                                              \
  if constexpr (R > r) {                                        \
    float* cr = C + r * ldc;                                    \
    if (ncols == NR) {                                          \
      if (accumulate) {                                         \
        c##r##0 = _mm256_add_ps(c##r##0, _mm256_loadu_ps(cr));  \
        c##r##1 = _mm256_add_ps(c##r##1, _mm256_loadu_ps(cr + 8)); \
      }                                                         \
      _mm256_storeu_ps(cr, c##r##0);                            \
      _mm256_storeu_ps(cr + 8, c##r##1);                        \
    } else {                                                    \
      _mm256_store_ps(tile, c##r##0);                           \
      _mm256_store_ps(tile + 8, c##r##1);                       \
      for (int j = 0; j < ncols; ++j) cr[j] = accumulate ? cr[j] + tile[j] : tile[j]; \
    }                                                           \
  }
  JV5_OUT(0) JV5_OUT(1) JV5_OUT(2) JV5_OUT(3) JV5_OUT(4) JV5_OUT(5)
#undef JV5_OUT
}

using MicroFn = void (*)(const float*, int64_t, const float*, int64_t, float*, int64_t, int, bool, const float*);
#define JV5_MICRO_ROW(S) {nullptr, micro<1, S>, micro<2, S>, micro<3, S>, micro<4, S>, micro<5, S>, micro<6, S>}
constexpr MicroFn kMicro[3][MR + 1] = {JV5_MICRO_ROW(1), JV5_MICRO_ROW(2), JV5_MICRO_ROW(4)};  // S = 1, 2, 4
#undef JV5_MICRO_ROW

// One work item (a block of Mc rows x <= 8 panels) of the AVX2 kernel.
void sgemm_item_avx2(const Geometry& g, int64_t it) {
  const float *A = g.A, *B = g.B;
  float* C = g.C;
  const int64_t K = g.K, N = g.N, P = g.P, kc = g.kc;
  const int64_t m0 = (it / g.chunks) * g.Mc, m1 = std::min(g.M, m0 + g.Mc);
  const int64_t p0 = (it % g.chunks) * PANELS_PER_ITEM, p1 = std::min(P, p0 + PANELS_PER_ITEM);
  // Rows split evenly over ceil(rows / MR) tiles (20 rows: 4 x 5, not 6 + 6 + 6 + 2).
  const int64_t rows = m1 - m0, tiles = (rows + MR - 1) / MR, base = rows / tiles, extra = rows % tiles;
  // The tiles share the prefetch of the next panel's chunk: S slices for the first S tiles (1, 2 or 4).
  const int si = tiles >= 4 ? 2 : tiles >= 2 ? 1 : 0, S = 1 << si;
  for (int64_t k0 = 0; k0 < K; k0 += kc) {
    const int64_t klen = std::min(kc, K - k0), slice = klen / S;
    for (int64_t p = p0; p < p1; ++p) {
      const float* panel = B + p * K * NR;
      const int ncols = int(std::min<int64_t>(NR, N - p * NR));
      const float* next = p + 1 < p1 ? panel + K * NR + k0 * NR : nullptr;
      int64_t m = m0;
      for (int64_t i = 0; i < tiles; ++i) {
        const int r = int(base + (i < extra));
        kMicro[si][r](A + m * K + k0, K, panel + k0 * NR, klen, C + m * N + p * NR, N, ncols, k0 > 0,
                      next != nullptr && i < S ? next + i * slice * NR : nullptr);
        m += r;
      }
    }
  }
}
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")
constexpr int MR512 = 12;  // rows per AVX-512 micro-tile: 24 accumulators + 2 panel loads + 1 broadcast <= 32 zmm

// C[r, :] (+)= A[r, :K] . panels for r < R (R <= 12) and NP (1 or 2) consecutive panels (stride ldb), the
// second one's columns at C + 16; ncols0 / ncols1 valid columns in each (masked stores past N). ``next``
// (or null): this tile's slice of the next panels' chunk to prefetch, one line per S k-steps from each of
// next_np panels. Same per-element FMA chain as the AVX2 micro-kernel.
template <int R, int NP>
inline void micro512(const float* A, int64_t lda, const float* B, int64_t ldb, int64_t K, float* C, int64_t ldc,
                     int ncols0, int ncols1, bool accumulate, const float* next, int next_np, int S) {
  const __m512 z = _mm512_setzero_ps();
#define JV5_DECL(r) __m512 c##r##0 = z, c##r##1 = z; const float* a##r = A + (r) * lda;
  JV5_DECL(0) JV5_DECL(1) JV5_DECL(2) JV5_DECL(3) JV5_DECL(4) JV5_DECL(5) JV5_DECL(6) JV5_DECL(7) JV5_DECL(8)
  JV5_DECL(9) JV5_DECL(10) JV5_DECL(11)
#undef JV5_DECL
#define JV5_STEP(r)                                         \
  if constexpr (R > r) {                                    \
    const __m512 a = _mm512_set1_ps(a##r[k]);               \
    c##r##0 = _mm512_fmadd_ps(a, b0, c##r##0);              \
    if constexpr (NP == 2) c##r##1 = _mm512_fmadd_ps(a, b1, c##r##1); \
  }
#define JV5_KSTEP                                                                                   \
  const __m512 b0 = _mm512_loadu_ps(B + k * NR);                                                     \
  const __m512 b1 = NP == 2 ? _mm512_loadu_ps(B + ldb + k * NR) : b0;                                \
  JV5_STEP(0) JV5_STEP(1) JV5_STEP(2) JV5_STEP(3) JV5_STEP(4) JV5_STEP(5) JV5_STEP(6) JV5_STEP(7)    \
  JV5_STEP(8) JV5_STEP(9) JV5_STEP(10) JV5_STEP(11)
  int64_t k = 0;
  if (next != nullptr) {
    for (int64_t line = 0; k + S <= K; ++line) {
      _mm_prefetch(reinterpret_cast<const char*>(next + line * NR), _MM_HINT_T1);
      if (next_np == 2) _mm_prefetch(reinterpret_cast<const char*>(next + ldb + line * NR), _MM_HINT_T1);
      for (int j = 0; j < S; ++j, ++k) {
        JV5_KSTEP
      }
    }
  }
#pragma GCC unroll 4
  for (; k < K; ++k) {
    JV5_KSTEP
  }
#undef JV5_KSTEP
#undef JV5_STEP
  const __mmask16 m0 = ncols0 >= NR ? __mmask16(0xFFFF) : __mmask16((1u << ncols0) - 1);
  const __mmask16 m1 = ncols1 >= NR ? __mmask16(0xFFFF) : __mmask16((1u << ncols1) - 1);
#define JV5_OUT(r)                                                                       \
  if constexpr (R > r) {                                                                 \
    float* cr = C + (r) * ldc;                                                           \
    if (accumulate) c##r##0 = _mm512_add_ps(c##r##0, _mm512_maskz_loadu_ps(m0, cr));     \
    _mm512_mask_storeu_ps(cr, m0, c##r##0);                                              \
    if constexpr (NP == 2) {                                                             \
      if (accumulate) c##r##1 = _mm512_add_ps(c##r##1, _mm512_maskz_loadu_ps(m1, cr + NR)); \
      _mm512_mask_storeu_ps(cr + NR, m1, c##r##1);                                       \
    }                                                                                    \
  }
  JV5_OUT(0) JV5_OUT(1) JV5_OUT(2) JV5_OUT(3) JV5_OUT(4) JV5_OUT(5) JV5_OUT(6) JV5_OUT(7) JV5_OUT(8) JV5_OUT(9)
  JV5_OUT(10) JV5_OUT(11)
#undef JV5_OUT
}

using Micro512Fn = void (*)(const float*, int64_t, const float*, int64_t, int64_t, float*, int64_t, int, int, bool,
                            const float*, int, int);
#define JV5_ROW512(NP)                                                                                         \
  {nullptr, micro512<1, NP>, micro512<2, NP>, micro512<3, NP>, micro512<4, NP>, micro512<5, NP>, micro512<6, NP>, \
   micro512<7, NP>, micro512<8, NP>, micro512<9, NP>, micro512<10, NP>, micro512<11, NP>, micro512<12, NP>}
constexpr Micro512Fn kMicro512[2][MR512 + 1] = {JV5_ROW512(1), JV5_ROW512(2)};
#undef JV5_ROW512

// One work item of the AVX-512 kernel: panels two at a time, rows in tiles of <= 12.
void sgemm_item_avx512(const Geometry& g, int64_t it) {
  const float *A = g.A, *B = g.B;
  float* C = g.C;
  const int64_t K = g.K, N = g.N, P = g.P, kc = g.kc;
  const int64_t m0 = (it / g.chunks) * g.Mc, m1 = std::min(g.M, m0 + g.Mc);
  const int64_t p0 = (it % g.chunks) * PANELS_PER_ITEM, p1 = std::min(P, p0 + PANELS_PER_ITEM);
  const int64_t rows = m1 - m0, tiles = (rows + MR512 - 1) / MR512, base = rows / tiles, extra = rows % tiles;
  const int S = tiles >= 4 ? 4 : tiles >= 2 ? 2 : 1;
  for (int64_t k0 = 0; k0 < K; k0 += kc) {
    const int64_t klen = std::min(kc, K - k0), slice = klen / S;
    for (int64_t p = p0; p < p1; p += 2) {
      const int np = int(std::min<int64_t>(2, p1 - p));
      const float* panel = B + p * K * NR;
      const int ncols0 = int(std::min<int64_t>(NR, N - p * NR));
      const int ncols1 = np == 2 ? int(std::min<int64_t>(NR, N - (p + 1) * NR)) : 0;
      const float* next = p + np < p1 ? B + (p + np) * K * NR + k0 * NR : nullptr;
      const int next_np = int(std::min<int64_t>(2, p1 - (p + np)));
      int64_t m = m0;
      for (int64_t i = 0; i < tiles; ++i) {
        const int r = int(base + (i < extra));
        kMicro512[np - 1][r](A + m * K + k0, K, panel + k0 * NR, K * NR, klen, C + m * N + p * NR, N, ncols0, ncols1,
                             k0 > 0, next != nullptr && i < S ? next + i * slice * NR : nullptr, next_np, S);
        m += r;
      }
    }
  }
}
#pragma GCC pop_options
#endif  // JV5_X86_DISPATCH

// The whole GEMM on ``isa`` (>= JV5_ISA_AVX2; the caller checked the CPU has it).
void sgemm_impl(const float* A, int64_t M, int64_t K, const float* B, int64_t N, float* C, int threads, int isa) {
#if defined(JV5_X86_DISPATCH)
  const bool wide = isa >= JV5_ISA_AVX512;
  const Geometry g = geometry(A, M, K, B, N, C, wide ? MR512 : MR, wide ? MC_FLOATS_512 : MC_FLOATS);
  const int64_t items = ((M + g.Mc - 1) / g.Mc) * g.chunks;
  const int T = int(std::max<int64_t>(1, std::min<int64_t>(threads, items)));
  void (*item)(const Geometry&, int64_t) = wide ? sgemm_item_avx512 : sgemm_item_avx2;
  // Dynamic items, not a fixed split: a thread the OS takes away (a busy machine) delays only its item.
#pragma omp parallel for num_threads(T) schedule(dynamic, 1) if (T > 1)
  for (int64_t it = 0; it < items; ++it) item(g, it);
#endif
}


// out (M, N) = a (M, K) @ W^T, W given as its panels (P, K, 16). Shapes are checked here: the caller
// is jv5fast.ops.linear, but a wrong shape must never read or write out of bounds.
void sgemm(py::array_t<float, py::array::c_style> a, py::array_t<float, py::array::c_style> panels,
           py::array_t<float, py::array::c_style> out, int threads) {
  const int isa = active_isa();
  if (isa < JV5_ISA_AVX2) throw std::runtime_error("jv5fast._C.sgemm needs a CPU with AVX2 and FMA (or JV5FAST_CPU_ISA "
                                                   "forces it off)");
  if (a.ndim() != 2 || panels.ndim() != 3 || out.ndim() != 2)
    throw std::invalid_argument("sgemm: a must be (M, K), panels (P, K, 16), out (M, N)");
  const int64_t M = a.shape(0), K = a.shape(1), P = panels.shape(0), N = out.shape(1);
  if (panels.shape(1) != K || panels.shape(2) != NR || out.shape(0) != M || (N + NR - 1) / NR != P)
    throw std::invalid_argument("sgemm: shapes do not match: a (" + std::to_string(M) + ", " + std::to_string(K) +
                                "), panels (" + std::to_string(P) + ", " + std::to_string(panels.shape(1)) + ", " +
                                std::to_string(panels.shape(2)) + "), out (" + std::to_string(out.shape(0)) + ", " +
                                std::to_string(N) + ")");
  if (M == 0 || N == 0) return;
  if (K == 0) {
    std::memset(out.mutable_data(), 0, sizeof(float) * M * N);
    return;
  }
  const float* A = a.data();
  const float* B = panels.data();
  float* C = out.mutable_data();
  py::gil_scoped_release release;
  sgemm_impl(A, M, K, B, N, C, std::max(1, threads), isa);
}

}  // namespace

void register_sgemm(py::module_& m) {
  m.def("sgemm", &sgemm, py::arg("a"), py::arg("panels"), py::arg("out").noconvert(), py::arg("threads") = 1,
        "out (M, N) = a (M, K) @ W^T for float32 C-contiguous arrays, W (N, K) given as panels (ceil(N/16), K, 16) "
        "(jv5fast.ops.pack_linear). AVX-512 or AVX2 + FMA, whichever active_isa() allows (see cpu_isa).");
}
