// jv5fast._C: exact Hamming top-k search and sign-bit packing for binary embedding codes.
//
// Codes are rows of B bytes (np.packbits order, MSB-first; any B >= 1). A search computes the
// Hamming distance of Q queries to N corpus rows and keeps an exact top-k per query under the faiss
// IndexBinaryFlat rule: ascending distance, ties by smaller id, k > N padded with (INT32_MAX, -1).
// Loop order: corpus block (L1-sized) outer, queries inner, so each corpus block is read from memory
// once per query chunk; threads split the corpus into contiguous ranges (each keeps its own heaps,
// merged at the end) or, when the corpus is small, split the queries. No Q x N matrix is formed.
// Popcounts use AVX-512 VPOPCNTQ where the CPU has it (runtime dispatch, 8 rows reduced at once by a
// transpose-add), else AVX2 (vpshufb nibble-table popcount, vpsadbw sums, 8 rows reduced at once),
// else the scalar 64-bit POPCNT. The GIL is released while searching.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif
#include "cpu_features.h"
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define JV5_X86 1
#endif

namespace py = pybind11;

namespace {

struct Cand {
  int32_t d;
  int64_t id;
};
inline bool cand_less(const Cand& a, const Cand& b) { return a.d < b.d || (a.d == b.d && a.id < b.id); }

// A bounded max-heap of the k best (d, id) pairs for one query; `thr` is the distance a new
// candidate must beat. Rows are visited in ascending id within one heap, so a candidate whose
// distance equals the current worst always has a larger id and is rightly rejected by `d < thr`.
struct TopK {
  Cand* h;
  int k;
  int size = 0;
  int32_t thr = INT32_MAX;
  inline void push(int32_t d, int64_t id) {
    if (size < k) {
      h[size++] = {d, id};
      std::push_heap(h, h + size, cand_less);
      if (size == k) thr = h[0].d;
    } else {
      std::pop_heap(h, h + k, cand_less);
      h[k - 1] = {d, id};
      std::push_heap(h, h + k, cand_less);
      thr = h[0].d;
    }
  }
};

inline int cpu_threads() {
#if defined(_OPENMP)
  return omp_get_max_threads();
#else
  return 1;
#endif
}

// ---------------------------------------------------------------------------------------------
// Distance kernels: out[i] = popcount(q XOR rows[i]) for i < n.

inline uint64_t load_u64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}
inline uint64_t load_tail(const uint8_t* p, size_t nbytes) {
  uint64_t v = 0;
  std::memcpy(&v, p, nbytes);
  return v;
}

// The scalar kernels, defined twice on x86: plain, and under target("popcnt") (the build has no ISA flags, so
// only the second compiles __builtin_popcountll to the POPCNT instruction; picked when the CPU has it).
#define JV5_SCALAR_KERNELS(SUFFIX) \
template <int W> /* W = B / 8 known at compile time (the common widths), B % 8 == 0 */ \
void dist_scalar_fixed##SUFFIX(const uint8_t* q, const uint8_t* rows, size_t n, size_t, int32_t* out) { \
  uint64_t qw[W]; \
  for (int w = 0; w < W; ++w) qw[w] = load_u64(q + 8 * w); \
  for (size_t i = 0; i < n; ++i) { \
    const uint8_t* r = rows + i * (8 * W); \
    int32_t s = 0; \
    for (int w = 0; w < W; ++w) s += __builtin_popcountll(qw[w] ^ load_u64(r + 8 * w)); \
    out[i] = s; \
  } \
} \
 \
void dist_scalar_any##SUFFIX(const uint8_t* q, const uint8_t* rows, size_t n, size_t B, int32_t* out) { \
  const size_t W = B / 8, tail = B % 8; \
  const uint64_t qt = tail ? load_tail(q + 8 * W, tail) : 0; \
  for (size_t i = 0; i < n; ++i) { \
    const uint8_t* r = rows + i * B; \
    int32_t s = 0; \
    for (size_t w = 0; w < W; ++w) s += __builtin_popcountll(load_u64(q + 8 * w) ^ load_u64(r + 8 * w)); \
    if (tail) s += __builtin_popcountll(qt ^ load_tail(r + 8 * W, tail)); \
    out[i] = s; \
  } \
}

JV5_SCALAR_KERNELS()
#if defined(JV5_X86) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("popcnt")
JV5_SCALAR_KERNELS(_popcnt)
#pragma GCC pop_options
#define JV5_HAVE_POPCNT_CLONES 1
#endif

#if defined(JV5_X86) && defined(__GNUC__)
#define JV5_AVX512 __attribute__((target("avx512f,avx512bw,avx512vpopcntdq")))

// Sum each of 8 vectors of 8 u64 lanes: returns lane i = sum of v[i] (transpose-add, 14 shuffles
// for 8 rows instead of 3 per row for separate horizontal reductions).
JV5_AVX512 inline __m512i hsum8(__m512i v0, __m512i v1, __m512i v2, __m512i v3, __m512i v4, __m512i v5,
                                __m512i v6, __m512i v7) {
  // per 128-bit lane L: (v0[2L]+v0[2L+1], v1[2L]+v1[2L+1])
  __m512i a01 = _mm512_add_epi64(_mm512_unpacklo_epi64(v0, v1), _mm512_unpackhi_epi64(v0, v1));
  __m512i a23 = _mm512_add_epi64(_mm512_unpacklo_epi64(v2, v3), _mm512_unpackhi_epi64(v2, v3));
  __m512i a45 = _mm512_add_epi64(_mm512_unpacklo_epi64(v4, v5), _mm512_unpackhi_epi64(v4, v5));
  __m512i a67 = _mm512_add_epi64(_mm512_unpacklo_epi64(v6, v7), _mm512_unpackhi_epi64(v6, v7));
  // lanes [a01.L0+L1, a01.L2+L3, a23.L0+L1, a23.L2+L3]
  __m512i c0 = _mm512_add_epi64(_mm512_shuffle_i64x2(a01, a23, _MM_SHUFFLE(2, 0, 2, 0)),
                                _mm512_shuffle_i64x2(a01, a23, _MM_SHUFFLE(3, 1, 3, 1)));
  __m512i c1 = _mm512_add_epi64(_mm512_shuffle_i64x2(a45, a67, _MM_SHUFFLE(2, 0, 2, 0)),
                                _mm512_shuffle_i64x2(a45, a67, _MM_SHUFFLE(3, 1, 3, 1)));
  // lanes [(0,1), (2,3), (4,5), (6,7)]
  return _mm512_add_epi64(_mm512_shuffle_i64x2(c0, c1, _MM_SHUFFLE(2, 0, 2, 0)),
                          _mm512_shuffle_i64x2(c0, c1, _MM_SHUFFLE(3, 1, 3, 1)));
}

// One 64-byte chunk c of a code; the last chunk is a masked load, so any B works (masked-off bytes
// are zero on both sides and add nothing).
JV5_AVX512 inline __m512i load_chunk(const uint8_t* p, int c, int C, __mmask64 last) {
  return c == C - 1 ? _mm512_maskz_loadu_epi8(last, p + 64 * c) : _mm512_loadu_si512(p + 64 * c);
}

// popcount(q XOR r) as 8 u64 partial sums; qv holds the query's C chunks.
template <int CT>
JV5_AVX512 inline __m512i row_popcnt(const __m512i* qv, const uint8_t* r, int C, __mmask64 last) {
  __m512i acc = _mm512_popcnt_epi64(_mm512_xor_si512(qv[0], load_chunk(r, 0, C, last)));
  for (int c = 1; c < (CT > 0 ? CT : C); ++c)
    acc = _mm512_add_epi64(acc, _mm512_popcnt_epi64(_mm512_xor_si512(qv[c], load_chunk(r, c, C, last))));
  return acc;
}

// CT = number of 64-byte chunks known at compile time (CT == 0: up to kMaxChunks, read from B).
constexpr int kMaxChunks = 16;  // 8192-bit codes; wider ones take the scalar path
template <int CT>
JV5_AVX512 void dist_avx512(const uint8_t* q, const uint8_t* rows, size_t n, size_t B, int32_t* out) {
  const int C = CT > 0 ? CT : int((B + 63) / 64);
  const __mmask64 last = (B % 64) ? ((__mmask64(1) << (B % 64)) - 1) : ~__mmask64(0);
  __m512i qv[CT > 0 ? CT : kMaxChunks];
  for (int c = 0; c < C; ++c) qv[c] = load_chunk(q, c, C, last);
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const uint8_t* r = rows + i * B;
    __m512i s = hsum8(row_popcnt<CT>(qv, r, C, last), row_popcnt<CT>(qv, r + B, C, last),
                      row_popcnt<CT>(qv, r + 2 * B, C, last), row_popcnt<CT>(qv, r + 3 * B, C, last),
                      row_popcnt<CT>(qv, r + 4 * B, C, last), row_popcnt<CT>(qv, r + 5 * B, C, last),
                      row_popcnt<CT>(qv, r + 6 * B, C, last), row_popcnt<CT>(qv, r + 7 * B, C, last));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), _mm512_cvtepi64_epi32(s));
  }
  for (; i < n; ++i) out[i] = int32_t(_mm512_reduce_add_epi64(row_popcnt<CT>(qv, rows + i * B, C, last)));
}

// Push the candidates of one distance block that beat the heap threshold (16 compares at a time).
JV5_AVX512 void filter_avx512(const int32_t* d, size_t n, int64_t base, TopK& t) {
  size_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __mmask16 m = _mm512_cmplt_epi32_mask(_mm512_loadu_si512(d + i), _mm512_set1_epi32(t.thr));
    while (m) {
      int j = __builtin_ctz(m);
      m &= m - 1;
      if (d[i + j] < t.thr) t.push(d[i + j], base + int64_t(i + j));
    }
  }
  for (; i < n; ++i)
    if (d[i] < t.thr) t.push(d[i], base + int64_t(i));
}

bool cpu_has_avx512_popcnt() {
  __builtin_cpu_init();
  return active_isa() >= JV5_ISA_AVX512 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vpopcntdq");
}

// ---------------------------------------------------------------------------------------------
// AVX2 (no vector popcount instruction): per-byte popcount by two 16-entry table lookups (vpshufb
// on the low and high nibble), byte counts summed over a row's 32-byte chunks, then one vpsadbw
// per row turns the 32 byte counts into 4 u64 partial sums (the Mula-Kurz-Lemire scheme). Each
// byte count is <= 8 per chunk, so up to 31 chunks fit in a byte; rows are flushed every 16 chunks.
#define JV5_AVX2 __attribute__((target("avx2,popcnt")))

JV5_AVX2 inline __m256i popcnt_bytes(__m256i x) {
  const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,  //
                                       0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
  const __m256i low4 = _mm256_set1_epi8(0x0f);
  const __m256i lo = _mm256_and_si256(x, low4);
  const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(x, 4), low4);
  return _mm256_add_epi8(_mm256_shuffle_epi8(lut, lo), _mm256_shuffle_epi8(lut, hi));
}

JV5_AVX2 inline __m256i load32(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

// Sum the 4 u64 lanes of each of 4 vectors: lane i = sum of v[i].
JV5_AVX2 inline __m256i hsum4(__m256i v0, __m256i v1, __m256i v2, __m256i v3) {
  // [v0.0+v0.1, v1.0+v1.1 | v0.2+v0.3, v1.2+v1.3]
  __m256i a = _mm256_add_epi64(_mm256_unpacklo_epi64(v0, v1), _mm256_unpackhi_epi64(v0, v1));
  __m256i b = _mm256_add_epi64(_mm256_unpacklo_epi64(v2, v3), _mm256_unpackhi_epi64(v2, v3));
  return _mm256_add_epi64(_mm256_permute2x128_si256(a, b, 0x20), _mm256_permute2x128_si256(a, b, 0x31));
}

// Sums of 8 rows (two vectors of 4 u64 lanes, each < 2^31) stored as 8 consecutive int32.
JV5_AVX2 inline void store8(int32_t* out, __m256i s0123, __m256i s4567) {
  // u64 lane j of s0123 | s4567 << 32 holds rows (j, j + 4) as its two int32 halves
  __m256i x = _mm256_or_si256(s0123, _mm256_slli_epi64(s4567, 32));
  x = _mm256_permutevar8x32_epi32(x, _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), x);
}

// Query prepared for the AVX2 kernel: C full 32-byte chunks, and when B % 32 != 0 (B >= 32) a last
// chunk read from the 32 bytes ending at the row end, with the bytes already counted masked off.
struct QueryAvx2 {
  const uint8_t* q;
  int C;          // full chunks
  size_t tail_off;  // B - 32, offset of the overlapping last chunk
  bool tail;
  __m256i tail_mask, q_tail;
};

JV5_AVX2 inline QueryAvx2 prep_avx2(const uint8_t* q, size_t B) {
  QueryAvx2 p;
  p.q = q;
  p.C = int(B / 32);
  p.tail = (B % 32) != 0;
  p.tail_off = B - 32;
  // keep the last B % 32 bytes of the overlapping chunk: byte j kept iff j >= 32 - B % 32
  alignas(32) uint8_t m[32];
  for (int j = 0; j < 32; ++j) m[j] = j >= 32 - int(B % 32) ? 0xff : 0x00;
  p.tail_mask = _mm256_load_si256(reinterpret_cast<const __m256i*>(m));
  p.q_tail = p.tail ? _mm256_and_si256(load32(q + p.tail_off), p.tail_mask) : _mm256_setzero_si256();
  return p;
}

// popcount(q XOR r) as 4 u64 partial sums. CT > 0: CT full chunks known at compile time (no tail).
template <int CT, bool TAIL>
JV5_AVX2 inline __m256i row_popcnt_avx2(const QueryAvx2& p, const __m256i* qv, const uint8_t* r) {
  const __m256i zero = _mm256_setzero_si256();
  if (CT > 0) {
    __m256i acc = popcnt_bytes(_mm256_xor_si256(qv[0], load32(r)));
    for (int c = 1; c < CT; ++c) acc = _mm256_add_epi8(acc, popcnt_bytes(_mm256_xor_si256(qv[c], load32(r + 32 * c))));
    if (TAIL)
      acc = _mm256_add_epi8(acc, popcnt_bytes(_mm256_and_si256(_mm256_xor_si256(p.q_tail, load32(r + p.tail_off)),
                                                               p.tail_mask)));
    return _mm256_sad_epu8(acc, zero);
  }
  __m256i sum = zero;
  int c = 0;
  while (c < p.C) {
    const int end = std::min(p.C, c + 16);
    __m256i acc = zero;
    for (; c < end; ++c) acc = _mm256_add_epi8(acc, popcnt_bytes(_mm256_xor_si256(load32(p.q + 32 * c), load32(r + 32 * c))));
    sum = _mm256_add_epi64(sum, _mm256_sad_epu8(acc, zero));
  }
  if (TAIL)
    sum = _mm256_add_epi64(sum, _mm256_sad_epu8(popcnt_bytes(_mm256_and_si256(
                                                    _mm256_xor_si256(p.q_tail, load32(r + p.tail_off)), p.tail_mask)),
                                                zero));
  return sum;
}

JV5_AVX2 inline int32_t reduce4(__m256i v) {
  __m128i s = _mm_add_epi64(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi64(s, _mm_unpackhi_epi64(s, s));
  return int32_t(_mm_cvtsi128_si64(s));
}

// Codes of B >= 32 bytes. CT > 0: B == 32 * CT exactly (TAIL false); CT == 0: any B >= 32.
template <int CT, bool TAIL>
JV5_AVX2 void dist_avx2(const uint8_t* q, const uint8_t* rows, size_t n, size_t B, int32_t* out) {
  const QueryAvx2 p = prep_avx2(q, B);
  __m256i qv[CT > 0 ? CT : 1];
  for (int c = 0; c < CT; ++c) qv[c] = load32(q + 32 * c);
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const uint8_t* r = rows + i * B;
    __m256i s0 = hsum4(row_popcnt_avx2<CT, TAIL>(p, qv, r), row_popcnt_avx2<CT, TAIL>(p, qv, r + B),
                       row_popcnt_avx2<CT, TAIL>(p, qv, r + 2 * B), row_popcnt_avx2<CT, TAIL>(p, qv, r + 3 * B));
    __m256i s1 = hsum4(row_popcnt_avx2<CT, TAIL>(p, qv, r + 4 * B), row_popcnt_avx2<CT, TAIL>(p, qv, r + 5 * B),
                       row_popcnt_avx2<CT, TAIL>(p, qv, r + 6 * B), row_popcnt_avx2<CT, TAIL>(p, qv, r + 7 * B));
    store8(out + i, s0, s1);
  }
  for (; i < n; ++i) out[i] = reduce4(row_popcnt_avx2<CT, TAIL>(p, qv, rows + i * B));
}

// Codes of B < 32 bytes (only when simd='avx2' is asked for explicitly; 'auto' takes the scalar
// kernel there): each row is copied into a zeroed 32-byte buffer, so nothing is read past the row.
JV5_AVX2 void dist_avx2_short(const uint8_t* q, const uint8_t* rows, size_t n, size_t B, int32_t* out) {
  alignas(32) uint8_t buf[32] = {0};
  std::memcpy(buf, q, B);
  const __m256i qv = _mm256_load_si256(reinterpret_cast<const __m256i*>(buf));
  const __m256i zero = _mm256_setzero_si256();
  for (size_t i = 0; i < n; ++i) {
    std::memcpy(buf, rows + i * B, B);
    __m256i x = _mm256_xor_si256(qv, _mm256_load_si256(reinterpret_cast<const __m256i*>(buf)));
    out[i] = reduce4(_mm256_sad_epu8(popcnt_bytes(x), zero));
  }
}

// Push the candidates of one distance block that beat the heap threshold (8 compares at a time).
JV5_AVX2 void filter_avx2(const int32_t* d, size_t n, int64_t base, TopK& t) {
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256i lt = _mm256_cmpgt_epi32(_mm256_set1_epi32(t.thr), load32(reinterpret_cast<const uint8_t*>(d + i)));
    unsigned m = unsigned(_mm256_movemask_ps(_mm256_castsi256_ps(lt)));
    while (m) {
      int j = __builtin_ctz(m);
      m &= m - 1;
      if (d[i + j] < t.thr) t.push(d[i + j], base + int64_t(i + j));
    }
  }
  for (; i < n; ++i)
    if (d[i] < t.thr) t.push(d[i], base + int64_t(i));
}

bool cpu_has_avx2() {
  __builtin_cpu_init();
  return active_isa() >= JV5_ISA_AVX2 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt");
}
#else
bool cpu_has_avx512_popcnt() { return false; }
bool cpu_has_avx2() { return false; }
#endif

void filter_scalar(const int32_t* d, size_t n, int64_t base, TopK& t) {
  for (size_t i = 0; i < n; ++i)
    if (d[i] < t.thr) t.push(d[i], base + int64_t(i));
}

using DistFn = void (*)(const uint8_t*, const uint8_t*, size_t, size_t, int32_t*);
using FilterFn = void (*)(const int32_t*, size_t, int64_t, TopK&);

struct Kernel {
  DistFn dist;
  FilterFn filter;
  const char* name;
};

// Kernel for codes of B bytes. 'auto': AVX-512 VPOPCNTDQ, else AVX2, else scalar; codes under 32
// bytes take the scalar kernel under 'auto' (a few 64-bit POPCNTs beat a vector setup there). An
// explicit 'avx512' / 'avx2' is an error where the CPU lacks it; 'avx512' on codes wider than
// kMaxChunks * 64 bytes runs the AVX2 kernel.
Kernel pick_kernel(size_t B, const std::string& simd) {
  if (simd != "auto" && simd != "avx512" && simd != "avx2" && simd != "scalar")
    throw std::invalid_argument("simd must be 'auto', 'avx512', 'avx2' or 'scalar', got '" + simd + "'");
  const bool avx512 = cpu_has_avx512_popcnt(), avx2 = cpu_has_avx2();
  if (simd == "avx512" && !avx512) throw std::invalid_argument("simd='avx512' requested but this CPU lacks AVX-512 VPOPCNTDQ");
  if (simd == "avx2" && !avx2) throw std::invalid_argument("simd='avx2' requested but this CPU lacks AVX2");
#if defined(JV5_X86) && defined(__GNUC__)
  const bool want512 = simd == "avx512" || (simd == "auto" && avx512 && B >= 32);
  if (want512 && (B + 63) / 64 <= size_t(kMaxChunks)) {
    switch ((B + 63) / 64) {
      case 1: return {dist_avx512<1>, filter_avx512, "avx512"};
      case 2: return {dist_avx512<2>, filter_avx512, "avx512"};
      case 3: return {dist_avx512<3>, filter_avx512, "avx512"};
      case 4: return {dist_avx512<4>, filter_avx512, "avx512"};
      default: return {dist_avx512<0>, filter_avx512, "avx512"};
    }
  }
  if (want512 || simd == "avx2" || (simd == "auto" && avx2 && B >= 32)) {
    if (B < 32) return {dist_avx2_short, filter_avx2, "avx2"};
    if (B % 32 == 0) {
      switch (B / 32) {
        case 1: return {dist_avx2<1, false>, filter_avx2, "avx2"};
        case 2: return {dist_avx2<2, false>, filter_avx2, "avx2"};
        case 3: return {dist_avx2<3, false>, filter_avx2, "avx2"};
        case 4: return {dist_avx2<4, false>, filter_avx2, "avx2"};
        default: return {dist_avx2<0, false>, filter_avx2, "avx2"};
      }
    }
    return {dist_avx2<0, true>, filter_avx2, "avx2"};
  }
#endif
#if defined(JV5_HAVE_POPCNT_CLONES)
  if (__builtin_cpu_supports("popcnt")) {
    if (B % 8 == 0) {
      switch (B / 8) {
        case 1: return {dist_scalar_fixed_popcnt<1>, filter_scalar, "scalar"};
        case 2: return {dist_scalar_fixed_popcnt<2>, filter_scalar, "scalar"};
        case 4: return {dist_scalar_fixed_popcnt<4>, filter_scalar, "scalar"};
        case 8: return {dist_scalar_fixed_popcnt<8>, filter_scalar, "scalar"};
        case 12: return {dist_scalar_fixed_popcnt<12>, filter_scalar, "scalar"};
        case 16: return {dist_scalar_fixed_popcnt<16>, filter_scalar, "scalar"};
        default: break;
      }
    }
    return {dist_scalar_any_popcnt, filter_scalar, "scalar"};
  }
#endif
  if (B % 8 == 0) {
    switch (B / 8) {
      case 1: return {dist_scalar_fixed<1>, filter_scalar, "scalar"};
      case 2: return {dist_scalar_fixed<2>, filter_scalar, "scalar"};
      case 4: return {dist_scalar_fixed<4>, filter_scalar, "scalar"};
      case 8: return {dist_scalar_fixed<8>, filter_scalar, "scalar"};
      case 12: return {dist_scalar_fixed<12>, filter_scalar, "scalar"};
      case 16: return {dist_scalar_fixed<16>, filter_scalar, "scalar"};
      default: break;
    }
  }
  return {dist_scalar_any, filter_scalar, "scalar"};
}

// Rows per corpus block: about 24 KiB of codes, so the block stays in L1 while all queries of the
// chunk pass over it; a multiple of 16 for the vector filter.
size_t corpus_block_rows(size_t B) {
  size_t rows = 24576 / B;
  rows = std::max<size_t>(64, std::min<size_t>(2048, rows));
  return rows & ~size_t(15);
}

// Scan corpus rows [lo, hi) for queries [0, nq): heaps[q] receives candidates in ascending id.
void scan(const Kernel& kern, const uint8_t* Qp, size_t nq, const uint8_t* Cp, int64_t lo, int64_t hi, size_t B,
          TopK* heaps, std::vector<int32_t>& buf) {
  const size_t CB = corpus_block_rows(B);
  buf.resize(CB);
  for (int64_t c0 = lo; c0 < hi; c0 += int64_t(CB)) {
    size_t n = size_t(std::min<int64_t>(hi - c0, int64_t(CB)));
    const uint8_t* rows = Cp + size_t(c0) * B;
    for (size_t q = 0; q < nq; ++q) {
      kern.dist(Qp + q * B, rows, n, B, buf.data());
      kern.filter(buf.data(), n, c0, heaps[q]);
    }
  }
}

// Sorted output of one query from one or more heaps (ascending (d, id), padded with INT32_MAX / -1).
void emit(std::vector<Cand>& pool, int k, int32_t* D, int64_t* I) {
  size_t m = std::min<size_t>(pool.size(), size_t(k));
  std::partial_sort(pool.begin(), pool.begin() + m, pool.end(), cand_less);
  for (size_t j = 0; j < m; ++j) D[j] = pool[j].d, I[j] = pool[j].id;
  for (size_t j = m; j < size_t(k); ++j) D[j] = INT32_MAX, I[j] = -1;
}

void search_impl(const uint8_t* Qp, size_t nq, const uint8_t* Cp, int64_t N, size_t B, int kout, int threads,
                 const Kernel& kern, int32_t* D, int64_t* I) {
  if (nq == 0) return;
  if (N == 0) {
    std::fill(D, D + nq * size_t(kout), INT32_MAX);
    std::fill(I, I + nq * size_t(kout), int64_t(-1));
    return;
  }
  // Heaps never need more than N slots; emit() pads the output rows up to kout.
  const int k = int(std::min<int64_t>(kout, N));
  const int T = std::max(1, threads);
  // Small corpus: split the queries; each thread scans the whole corpus for its queries.
  const int64_t min_rows_per_thread = 16384;
  if (T == 1 || N < int64_t(T) * min_rows_per_thread) {
    const size_t QB = 32;
    const int64_t nblocks = int64_t((nq + QB - 1) / QB);
#pragma omp parallel num_threads(T) if (T > 1 && nblocks > 1)
    {
      std::vector<Cand> hbuf(QB * size_t(k)), pool;
      std::vector<int32_t> buf;
      std::vector<TopK> heaps(QB);
#pragma omp for schedule(dynamic, 1)
      for (int64_t b = 0; b < nblocks; ++b) {
        size_t q0 = size_t(b) * QB, nb = std::min(QB, nq - q0);
        for (size_t q = 0; q < nb; ++q) heaps[q] = TopK{hbuf.data() + q * size_t(k), k};
        scan(kern, Qp + q0 * B, nb, Cp, 0, N, B, heaps.data(), buf);
        for (size_t q = 0; q < nb; ++q) {
          pool.assign(heaps[q].h, heaps[q].h + heaps[q].size);
          emit(pool, kout, D + (q0 + q) * size_t(kout), I + (q0 + q) * size_t(kout));
        }
      }
    }
    return;
  }
  // Large corpus: each thread takes a contiguous corpus range and keeps heaps for a chunk of queries;
  // the per-thread heaps are merged per query. The chunk bounds heap memory to ~64 MiB in all.
  size_t QC = std::max<size_t>(1, (size_t(64) << 20) / (sizeof(Cand) * size_t(k) * size_t(T)));
  QC = std::min(QC, std::max<size_t>(nq, 1));
  std::vector<Cand> hbuf(size_t(T) * QC * size_t(k));
  std::vector<TopK> heaps(size_t(T) * QC);
  for (size_t q0 = 0; q0 < nq; q0 += QC) {
    const size_t nb = std::min(QC, nq - q0);
#pragma omp parallel num_threads(T)
    {
#if defined(_OPENMP)
      const int t = omp_get_thread_num(), nt = omp_get_num_threads();
#else
      const int t = 0, nt = 1;
#endif
      // Range split in units of 16 rows so every thread's blocks stay vector-aligned.
      const int64_t units = (N + 15) / 16;
      const int64_t lo = std::min(N, units * t / nt * 16), hi = std::min(N, units * (t + 1) / nt * 16);
      TopK* mine = heaps.data() + size_t(t) * QC;
      for (size_t q = 0; q < nb; ++q) mine[q] = TopK{hbuf.data() + (size_t(t) * QC + q) * size_t(k), k};
      std::vector<int32_t> buf;
      scan(kern, Qp + q0 * B, nb, Cp, lo, hi, B, mine, buf);
#pragma omp barrier
      std::vector<Cand> pool;
#pragma omp for schedule(static)
      for (int64_t q = 0; q < int64_t(nb); ++q) {
        pool.clear();
        for (int s = 0; s < nt; ++s) {
          const TopK& h = heaps[size_t(s) * QC + size_t(q)];
          pool.insert(pool.end(), h.h, h.h + h.size);
        }
        emit(pool, kout, D + (q0 + size_t(q)) * size_t(kout), I + (q0 + size_t(q)) * size_t(kout));
      }
    }
  }
}

using U8 = py::array_t<uint8_t, py::array::c_style>;

py::tuple hamming_topk(U8 queries, U8 corpus, int k, int threads, const std::string& simd) {
  if (queries.ndim() != 2 || corpus.ndim() != 2)
    throw std::invalid_argument("queries and corpus must be 2-D uint8 arrays (rows of packed codes)");
  const size_t B = size_t(corpus.shape(1));
  if (size_t(queries.shape(1)) != B)
    throw std::invalid_argument("queries have " + std::to_string(queries.shape(1)) + " bytes per code, corpus has " +
                                std::to_string(B));
  if (B == 0) throw std::invalid_argument("codes must have at least one byte");
  if (k <= 0) throw std::invalid_argument("k must be positive, got " + std::to_string(k));
  const size_t nq = size_t(queries.shape(0));
  const int64_t N = int64_t(corpus.shape(0));
  if (threads <= 0) threads = cpu_threads();
  const Kernel kern = pick_kernel(B, simd);
  py::array_t<int32_t> D({py::ssize_t(nq), py::ssize_t(k)});
  py::array_t<int64_t> I({py::ssize_t(nq), py::ssize_t(k)});
  const uint8_t* Qp = queries.data();
  const uint8_t* Cp = corpus.data();
  int32_t* Dp = D.mutable_data();
  int64_t* Ip = I.mutable_data();
  {
    py::gil_scoped_release release;
    search_impl(Qp, nq, Cp, N, B, k, threads, kern, Dp, Ip);
  }
  return py::make_tuple(D, I);
}

// Sign-bit packing, np.packbits(x > 0, axis=-1): dimension j goes to bit 7 - j % 8 of byte j / 8.
// "> 0" is strict; NaN and -0.0 give 0. The tail bits of the last byte are zero.
template <typename T, typename Pos>
py::array_t<uint8_t> pack_rows(py::array_t<T, py::array::c_style> x, Pos positive) {
  if (x.ndim() != 2) throw std::invalid_argument("embeddings must be a 2-D array (n, dim)");
  const int64_t n = x.shape(0), d = x.shape(1), nb = (d + 7) / 8;
  py::array_t<uint8_t> out({py::ssize_t(n), py::ssize_t(nb)});
  const T* src = x.data();
  uint8_t* dst = out.mutable_data();
  {
    py::gil_scoped_release release;
#pragma omp parallel for schedule(static) if (n * d > (1 << 20))
    for (int64_t i = 0; i < n; ++i) {
      const T* r = src + i * d;
      uint8_t* o = dst + i * nb;
      int64_t j = 0;
      for (; j + 8 <= d; j += 8) {
        unsigned b = 0;
        for (int t = 0; t < 8; ++t) b |= unsigned(positive(r[j + t])) << (7 - t);
        o[j / 8] = uint8_t(b);
      }
      if (j < d) {
        unsigned b = 0;
        for (int t = 0; j + t < d; ++t) b |= unsigned(positive(r[j + t])) << (7 - t);
        o[j / 8] = uint8_t(b);
      }
    }
  }
  return out;
}

py::array_t<uint8_t> pack_signs_f32(py::array_t<float, py::array::c_style> x) {
  return pack_rows<float>(x, [](float v) { return v > 0.0f; });
}

// float16 given as its raw uint16 bits: positive iff 0 < bits <= 0x7c00 (+inf counts, NaN does not).
py::array_t<uint8_t> pack_signs_f16(py::array_t<uint16_t, py::array::c_style> x) {
  return pack_rows<uint16_t>(x, [](uint16_t h) { return h != 0 && h <= 0x7c00; });
}

}  // namespace

void register_hamming(py::module_& m) {
  m.def("hamming_topk", &hamming_topk, py::arg("queries"), py::arg("corpus"), py::arg("k"), py::arg("threads") = 0,
        py::arg("simd") = "auto",
        "Exact top-k Hamming search. queries (Q, B) and corpus (N, B) uint8, C-contiguous. Returns (D int32 "
        "(Q, k), I int64 (Q, k)): ascending distance, ties by smaller id, padding INT32_MAX / -1. threads <= 0 "
        "means all cores; simd is 'auto', 'avx512', 'avx2' or 'scalar'.");
  m.def("pack_signs_f32", &pack_signs_f32, py::arg("x"), "np.packbits(x > 0, axis=-1) for float32 (n, d)");
  m.def("pack_signs_f16", &pack_signs_f16, py::arg("x"), "np.packbits(x > 0, axis=-1) for float16 bits (n, d) uint16");
  m.def("simd_kernel", [](size_t nbytes, const std::string& simd) { return std::string(pick_kernel(nbytes, simd).name); },
        py::arg("nbytes"), py::arg("simd") = "auto", "Name of the distance kernel used for codes of nbytes bytes");
  m.def(
      "simd_available",
      []() {
        std::vector<std::string> v;
        if (cpu_has_avx512_popcnt()) v.push_back("avx512");
        if (cpu_has_avx2()) v.push_back("avx2");
        v.push_back("scalar");
        return v;
      },
      "Popcount kernels this CPU can run, best first (values for simd=)");
  m.def("num_threads", &cpu_threads, "Threads a search uses by default (OpenMP max threads)");
}
