// jv5fast._C: fp32 GEMM C = A @ W^T for CPU inference on prepacked weights (AVX2 + FMA).
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
// Summation runs over k in order in fp32 (chunks added in order), so results match a reference GEMM to
// fp32 rounding.
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
#if defined(JV5_AVX2_FMA)
#include <immintrin.h>
#endif

namespace py = pybind11;

namespace {

constexpr int NR = 16;  // panel width: two 8-float AVX registers
constexpr int MR = 6;   // rows per micro-tile: 12 accumulators + 2 panel loads + 1 broadcast <= 16 ymm

#if defined(JV5_AVX2_FMA)
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

constexpr int64_t KC = 768;           // K chunk: a 6 x 768 tile of A (18 KiB) stays in L1 for K = 3072
constexpr int64_t MC_FLOATS = 65536;  // Mc x chunk of A: 256 KiB, half of a Zen3 core's L2
constexpr int64_t PANELS_PER_ITEM = 8;  // work item = Mc rows x 8 panels, handed out dynamically

void sgemm_impl(const float* A, int64_t M, int64_t K, const float* B, int64_t N, float* C, int threads) {
  const int64_t P = (N + NR - 1) / NR;
  const int64_t kchunks = (K + KC - 1) / KC, kc = (K + kchunks - 1) / kchunks;
  // Rows of A per block: Mc x kc floats in L2, reused by every panel of the item (large M only).
  const int64_t Mc = std::max<int64_t>(MR, (MC_FLOATS / kc) / MR * MR);
  const int64_t mblocks = (M + Mc - 1) / Mc, chunks = (P + PANELS_PER_ITEM - 1) / PANELS_PER_ITEM;
  const int64_t items = mblocks * chunks;
  const int T = int(std::max<int64_t>(1, std::min<int64_t>(threads, items)));
  // Dynamic items, not a fixed split: a thread the OS takes away (a busy machine) delays only its item.
#pragma omp parallel for num_threads(T) schedule(dynamic, 1) if (T > 1)
  for (int64_t it = 0; it < items; ++it) {
    const int64_t m0 = (it / chunks) * Mc, m1 = std::min(M, m0 + Mc);
    const int64_t p0 = (it % chunks) * PANELS_PER_ITEM, p1 = std::min(P, p0 + PANELS_PER_ITEM);
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
}
#endif  // JV5_AVX2_FMA

// out (M, N) = a (M, K) @ W^T, W given as its panels (P, K, 16). Shapes are checked here: the caller
// is jv5fast.ops.linear, but a wrong shape must never read or write out of bounds.
void sgemm(py::array_t<float, py::array::c_style> a, py::array_t<float, py::array::c_style> panels,
           py::array_t<float, py::array::c_style> out, int threads) {
  if (!avx2_fma_available()) throw std::runtime_error("jv5fast._C.sgemm needs a CPU with AVX2 and FMA");
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
#if defined(JV5_AVX2_FMA)
  const float* A = a.data();
  const float* B = panels.data();
  float* C = out.mutable_data();
  py::gil_scoped_release release;
  sgemm_impl(A, M, K, B, N, C, std::max(1, threads));
#endif
}

}  // namespace

void register_sgemm(py::module_& m) {
  m.def("sgemm", &sgemm, py::arg("a"), py::arg("panels"), py::arg("out").noconvert(), py::arg("threads") = 1,
        "out (M, N) = a (M, K) @ W^T for float32 C-contiguous arrays, W (N, K) given as panels (ceil(N/16), K, 16) "
        "(jv5fast.ops.pack_linear). AVX2 + FMA only (see avx2_fma_available).");
}
