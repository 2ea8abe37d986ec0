// jv5fast._C: the small per-layer ops of the CPU fp32 forward, fused (AVX2): RMSNorm with the residual add,
// and RoPE with Qwen3's optional per-head RMSNorm. Same formulas, in the same order, as the references
// kernels/rmsnorm.py::rms_norm_ref and kernels/rope.py::rope_ref:
//   rms_norm: h = x + residual;  y = w * (h * 1/sqrt(mean(h^2) + eps))
//   rope:     xn = w * (x * 1/sqrt(mean(x^2) + eps)) (norm optional);  y = xn * cos[p] + rotate_half(xn) * sin[p]
// At a query's 20 rows the references are ~10 tiny torch calls each, whose dispatch costs more than the math
// (~5 ms of a 40 ms nano query); here each is one call. The sums of squares use 8 lanes (another summation
// order than torch's, within fp32 rounding). Rows are split over OpenMP threads when there are enough.
// The AVX2/FMA code sits in `#pragma GCC target("avx2,fma")` regions (the *_avx2 functions); the entry points
// check shapes and active_isa() (cpu_features.h) outside them, so the .so loads on CPUs without AVX2 and
// jv5fast.ops then takes the references.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "cpu_features.h"
#if defined(JV5_X86_DISPATCH)
#include <immintrin.h>
#endif

namespace py = pybind11;

namespace {

constexpr int64_t kMaxHeadDim = 1024;  // rope's per-row buffer; jv5fast.ops takes the reference above it

constexpr int64_t kParallelElems = 1 << 16;  // below this many elements one thread is faster

#if defined(JV5_X86_DISPATCH)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
inline float sum_squares(const float* x, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    acc = _mm256_fmadd_ps(v, v, acc);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, acc);
  float s = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
  for (; i < n; ++i) s += x[i] * x[i];
  return s;
}

// y = w * (h * r) for one row
inline void scale_row(const float* h, const float* w, float r, float* y, int64_t n) {
  const __m256 vr = _mm256_set1_ps(r);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_loadu_ps(w + i), _mm256_mul_ps(_mm256_loadu_ps(h + i), vr)));
  for (; i < n; ++i) y[i] = w[i] * (h[i] * r);
}
#pragma GCC pop_options
#endif

void rms_norm_avx2(const float*, const float*, const float*, float*, float*, int64_t, int64_t, float, int);
void swiglu_avx2(const float*, float*, int64_t, int64_t, int);
void attention_avx2(const float*, const float*, const float*, float*, const int32_t*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, bool, bool, float, int);
void rope_avx2(const float*, int64_t, int64_t, const float*, const float*, const int64_t*, const float*, float*, int64_t, int64_t, int64_t, float, int);

void require(bool ok, const std::string& msg) {
  if (!ok) throw std::invalid_argument(msg);
}

using Arr = py::array_t<float, py::array::c_style>;

// y (T, N) = rms_norm(x + residual); with residual, h (T, N) receives x + residual.
void rms_norm(Arr x, py::object residual, Arr w, double eps, Arr y, py::object h, int threads) {
  if (!avx2_fma_available()) throw std::runtime_error("jv5fast._C.rms_norm needs a CPU with AVX2 and FMA");
  require(x.ndim() == 2 && y.ndim() == 2 && w.ndim() == 1, "rms_norm: x and y must be (T, N), w (N,)");
  const int64_t T = x.shape(0), N = x.shape(1);
  require(y.shape(0) == T && y.shape(1) == N && w.shape(0) == N, "rms_norm: shapes of x, w and y differ");
  require(residual.is_none() == h.is_none(), "rms_norm: residual and h go together");
  Arr res, hh;
  if (!residual.is_none()) {
    res = residual.cast<Arr>();
    hh = h.cast<Arr>();
    require(hh.ptr() == h.ptr(), "rms_norm: h must be a C-contiguous float32 array (it is written)");
    require(res.ndim() == 2 && hh.ndim() == 2 && res.shape(0) == T && res.shape(1) == N && hh.shape(0) == T &&
                hh.shape(1) == N,
            "rms_norm: residual and h must be (T, N) like x");
  }
  const float* X = x.data();
  const float* W = w.data();
  const float* R = residual.is_none() ? nullptr : res.data();
  float* H = residual.is_none() ? nullptr : hh.mutable_data();
  float* Y = y.mutable_data();
  const float e = float(eps);
    py::gil_scoped_release release;
  rms_norm_avx2(X, W, R, H, Y, T, N, e, threads);
}

#if defined(JV5_X86_DISPATCH)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
// e^x for 8 lanes: x = n ln2 + r with |r| <= ln2/2, e^r by its Taylor series to r^7/7! (Horner, FMA; the
// truncation error r^8/8! < 4e-9 is below fp32's half-ulp), times 2^n built in the exponent field. x is
// clamped to [-87, 88]: e^x stays a normal float (silu's 1 + e^-g is then 1 or huge, as with the true value);
// NaN passes through.
inline __m256 exp8(__m256 x) {
  // min/max return their second operand when either is NaN: x second, so a NaN score stays NaN
  x = _mm256_max_ps(_mm256_set1_ps(-87.0f), _mm256_min_ps(_mm256_set1_ps(88.0f), x));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);   // ln2 split in two: r exact to ~1e-11
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.0f / 5040.0f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
#pragma GCC pop_options
#endif

// y (T, F) = silu(gate) * up for gate_up (T, 2F) = [gate | up]: kernels/swiglu.py::swiglu_ref in one pass
// (torch's silu and mul_ are two passes and two parallel regions, each a scheduler quantum when another
// process holds a core). silu(g) = g / (1 + e^-g).
void swiglu(Arr gate_up, Arr y, int threads) {
  if (!avx2_fma_available()) throw std::runtime_error("jv5fast._C.swiglu needs a CPU with AVX2 and FMA");
  require(gate_up.ndim() == 2 && y.ndim() == 2, "swiglu: gate_up must be (T, 2F) and y (T, F)");
  const int64_t T = gate_up.shape(0), F = y.shape(1);
  require(gate_up.shape(1) == 2 * F && y.shape(0) == T, "swiglu: gate_up must be (T, 2F) for y (T, F)");
  const float* G = gate_up.data();
  float* Y = y.mutable_data();
    py::gil_scoped_release release;
  swiglu_avx2(G, Y, T, F, threads);
}

constexpr int64_t kMaxAttnLen = 1024;  // attention's per-row score buffer; jv5fast.ops takes SDPA above it

#if defined(JV5_X86_DISPATCH)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
inline float dot(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, acc);
  float s = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// One query row against keys [0, n) of its sequence: out = softmax(scale q.k_j) @ v_j, the running sum and
// the weighted values in fp32 (kernels/attention.py's references, one row at a time).
inline void attend_row(const float* q, const float* K, const float* V, int64_t n, int64_t kv_stride, int64_t D,
                       float scale, float* out) {
  alignas(32) float s[kMaxAttnLen];
  float m = -INFINITY;
  for (int64_t j = 0; j < n; ++j) {
    s[j] = dot(q, K + j * kv_stride, D) * scale;
    m = s[j] > m ? s[j] : m;
  }
  float l = 0.0f;
  int64_t j = 0;
  const __m256 vm = _mm256_set1_ps(m);
  __m256 vl = _mm256_setzero_ps();
  for (; j + 8 <= n; j += 8) {
    const __m256 p = exp8(_mm256_sub_ps(_mm256_load_ps(s + j), vm));
    _mm256_store_ps(s + j, p);
    vl = _mm256_add_ps(vl, p);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, vl);
  l = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
  for (; j < n; ++j) {
    s[j] = std::exp(s[j] - m);
    l += s[j];
  }
  const float inv = 1.0f / l;
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t t = 0; t < n; ++t)
      acc = _mm256_fmadd_ps(_mm256_set1_ps(s[t]), _mm256_loadu_ps(V + t * kv_stride + d), acc);
    _mm256_storeu_ps(out + d, _mm256_mul_ps(acc, _mm256_set1_ps(inv)));
  }
  for (; d < D; ++d) {
    float acc = 0.0f;
    for (int64_t t = 0; t < n; ++t) acc += s[t] * V[t * kv_stride + d];
    out[d] = acc * inv;
  }
}
#pragma GCC pop_options
#endif

// Varlen attention of a packed batch for short sequences (each <= kMaxAttnLen), inference only:
//   last_only = false: q (T, H, D), out (T, H, D); row t of sequence b attends to keys [cu[b], cu[b] + i + 1)
//     (causal, i its position) or [cu[b], cu[b + 1]) (bidirectional);
//   last_only = true:  q (B, H, D) holds each sequence's last query row, out (B, H, D); it sees every key.
// k, v (T, Hkv, D); query head h reads KV head h / (H / Hkv) (GQA). At a query's few dozen tokens the
// reference's padding, masks and SDPA dispatch cost more than the math; (sequence, head) pairs are split over
// OpenMP threads when there is enough work.
void attention(Arr q, Arr k, Arr v, py::array_t<int32_t, py::array::c_style> cu, bool causal, bool last_only,
               double scale, Arr out, int threads) {
  if (!avx2_fma_available()) throw std::runtime_error("jv5fast._C.attention needs a CPU with AVX2 and FMA");
  require(q.ndim() == 3 && k.ndim() == 3 && v.ndim() == 3 && out.ndim() == 3 && cu.ndim() == 1 && cu.shape(0) >= 2,
          "attention: q, k, v and out must be 3-D, cu_seqlens (B+1,)");
  const int64_t R = q.shape(0), H = q.shape(1), D = q.shape(2), T = k.shape(0), Hkv = k.shape(1);
  const int64_t B = cu.shape(0) - 1;
  require(k.shape(2) == D && v.shape(0) == T && v.shape(1) == Hkv && v.shape(2) == D && Hkv > 0 && H % Hkv == 0,
          "attention: k and v must be (T, Hkv, D) with Hkv dividing q's heads");
  require(out.shape(0) == R && out.shape(1) == H && out.shape(2) == D, "attention: out must have q's shape");
  require(last_only ? R == B : R == T, "attention: q must have one row per token (or per sequence, last_only)");
  const int32_t* C = cu.data();
  require(C[0] == 0 && C[B] == T, "attention: cu_seqlens must run from 0 to the token count");
  for (int64_t b = 0; b < B; ++b) {  // offsets index k/v: check them all before reading any
    const int64_t len = int64_t(C[b + 1]) - C[b];
    if (len < 1 || len > kMaxAttnLen)
      throw std::out_of_range("attention: sequence " + std::to_string(b) + " has " + std::to_string(len) +
                              " tokens; this kernel takes 1.." + std::to_string(kMaxAttnLen));
  }
  const float *Q = q.data(), *K = k.data(), *V = v.data();
  float* O = out.mutable_data();
  const float sc = float(scale);
  const int64_t group = H / Hkv, kv_stride = Hkv * D;
  int64_t work = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t len = int64_t(C[b + 1]) - C[b];
    work += (last_only ? len : len * len) * H * D;
  }
    py::gil_scoped_release release;
  attention_avx2(Q, K, V, O, C, B, H, D, group, kv_stride, work, causal, last_only, sc, threads);
}

// y (T, H, D) contiguous = rope(x) for x (T, H, D) with any row/head strides and contiguous D.
void rope(py::array_t<float> x, Arr cos, Arr sin, py::array_t<int64_t, py::array::c_style> pos, py::object norm,
          double eps, Arr y, int threads) {
  if (!avx2_fma_available()) throw std::runtime_error("jv5fast._C.rope needs a CPU with AVX2 and FMA");
  require(x.ndim() == 3 && y.ndim() == 3 && cos.ndim() == 2 && sin.ndim() == 2 && pos.ndim() == 1,
          "rope: x and y must be (T, H, D), cos/sin (P, D), pos (T,)");
  const int64_t T = x.shape(0), Hn = x.shape(1), D = x.shape(2), P = cos.shape(0);
  require(D <= kMaxHeadDim, "rope: head dim " + std::to_string(D) + " is above " + std::to_string(kMaxHeadDim));
  require(D % 2 == 0 && x.strides(2) == sizeof(float) && x.strides(0) % sizeof(float) == 0 &&
              x.strides(1) % sizeof(float) == 0,
          "rope: the head dim must be even and contiguous");
  require(y.shape(0) == T && y.shape(1) == Hn && y.shape(2) == D && cos.shape(1) == D && sin.shape(0) == P &&
              sin.shape(1) == D && pos.shape(0) == T,
          "rope: shapes of x, cos, sin, pos and y differ");
  Arr nw;
  if (!norm.is_none()) {
    nw = norm.cast<Arr>();
    require(nw.ndim() == 1 && nw.shape(0) == D, "rope: the norm weight must be (D,)");
  }
  const int64_t* Pp = pos.data();
  for (int64_t t = 0; t < T; ++t)  // positions index the tables: check them all before reading any
    if (Pp[t] < 0 || Pp[t] >= P)
      throw std::out_of_range("rope: position " + std::to_string(Pp[t]) + " at row " + std::to_string(t) +
                              " is outside the tables' " + std::to_string(P) + " rows");
  const float* X = x.data();
  const int64_t sT = x.strides(0) / sizeof(float), sH = x.strides(1) / sizeof(float);
  const float* C = cos.data();
  const float* S = sin.data();
  const float* NW = norm.is_none() ? nullptr : nw.data();
  float* Y = y.mutable_data();
  const float e = float(eps);
  const int64_t half = D / 2;
    py::gil_scoped_release release;
  rope_avx2(X, sT, sH, C, S, Pp, NW, Y, T, Hn, D, e, threads);
}


#if defined(JV5_X86_DISPATCH)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
// The kernels' loops (the entry points below check everything first).
void rms_norm_avx2(const float* X, const float* W, const float* R, float* H, float* Y, int64_t T, int64_t N, float e, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && T * N >= kParallelElems)
  for (int64_t t = 0; t < T; ++t) {
    const float* row = X + t * N;
    if (R != nullptr) {
      float* hr = H + t * N;
      const float* rr = R + t * N;
      int64_t i = 0;
      for (; i + 8 <= N; i += 8)
        _mm256_storeu_ps(hr + i, _mm256_add_ps(_mm256_loadu_ps(row + i), _mm256_loadu_ps(rr + i)));
      for (; i < N; ++i) hr[i] = row[i] + rr[i];
      row = hr;
    }
    const float r = 1.0f / std::sqrt(sum_squares(row, N) / float(N) + e);
    scale_row(row, W, r, Y + t * N, N);
  }
}

void swiglu_avx2(const float* G, float* Y, int64_t T, int64_t F, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && T * F >= 4 * kParallelElems)
  for (int64_t t = 0; t < T; ++t) {
    const float* g = G + t * 2 * F;
    const float* u = g + F;
    float* out = Y + t * F;
    const __m256 one = _mm256_set1_ps(1.0f);
    int64_t i = 0;
    for (; i + 8 <= F; i += 8) {
      const __m256 gv = _mm256_loadu_ps(g + i);
      const __m256 den = _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv)));
      _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_div_ps(gv, den), _mm256_loadu_ps(u + i)));
    }
    for (; i < F; ++i) out[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
  }
}

void attention_avx2(const float* Q, const float* K, const float* V, float* O, const int32_t* C, int64_t B, int64_t H, int64_t D, int64_t group, int64_t kv_stride, int64_t work, bool causal, bool last_only, float sc, int threads) {
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1) if (threads > 1 && work >= 4 * kParallelElems)
  for (int64_t item = 0; item < B * H; ++item) {
    const int64_t b = item / H, h = item % H, start = C[b], len = int64_t(C[b + 1]) - C[b];
    const float* Kh = K + start * kv_stride + (h / group) * D;
    const float* Vh = V + start * kv_stride + (h / group) * D;
    if (last_only) {
      attend_row(Q + (b * H + h) * D, Kh, Vh, len, kv_stride, D, sc, O + (b * H + h) * D);
      continue;
    }
    for (int64_t i = 0; i < len; ++i) {
      const int64_t row = start + i;
      attend_row(Q + (row * H + h) * D, Kh, Vh, causal ? i + 1 : len, kv_stride, D, sc, O + (row * H + h) * D);
    }
  }
}

void rope_avx2(const float* X, int64_t sT, int64_t sH, const float* C, const float* S, const int64_t* Pp, const float* NW, float* Y, int64_t T, int64_t Hn, int64_t D, float e, int threads) {
  const int64_t half = D / 2;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && T * Hn * D >= kParallelElems)
  for (int64_t t = 0; t < T; ++t) {
    const float* c = C + Pp[t] * D;
    const float* s = S + Pp[t] * D;
    alignas(32) float buf[kMaxHeadDim];
    for (int64_t hd = 0; hd < Hn; ++hd) {
      const float* in = X + t * sT + hd * sH;
      float* out = Y + (t * Hn + hd) * D;
      const float* xn = in;
      if (NW != nullptr) {
        const float r = 1.0f / std::sqrt(sum_squares(in, D) / float(D) + e);
        scale_row(in, NW, r, buf, D);
        xn = buf;
      }
      int64_t i = 0;
      for (; i + 8 <= half; i += 8) {
        const __m256 a = _mm256_loadu_ps(xn + i), b = _mm256_loadu_ps(xn + half + i);
        const __m256 nb = _mm256_sub_ps(_mm256_setzero_ps(), b);
        _mm256_storeu_ps(out + i, _mm256_add_ps(_mm256_mul_ps(a, _mm256_loadu_ps(c + i)),
                                                _mm256_mul_ps(nb, _mm256_loadu_ps(s + i))));
        _mm256_storeu_ps(out + half + i, _mm256_add_ps(_mm256_mul_ps(b, _mm256_loadu_ps(c + half + i)),
                                                       _mm256_mul_ps(a, _mm256_loadu_ps(s + half + i))));
      }
      for (; i < half; ++i) {
        const float a = xn[i], b = xn[i + half];
        out[i] = a * c[i] + (-b) * s[i];
        out[i + half] = b * c[i + half] + a * s[i + half];
      }
    }
  }
}
#pragma GCC pop_options
#else
void rms_norm_avx2(const float*, const float*, const float*, float*, float*, int64_t, int64_t, float, int) {}
void swiglu_avx2(const float*, float*, int64_t, int64_t, int) {}
void attention_avx2(const float*, const float*, const float*, float*, const int32_t*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, bool, bool, float, int) {}
void rope_avx2(const float*, int64_t, int64_t, const float*, const float*, const int64_t*, const float*, float*, int64_t, int64_t, int64_t, float, int) {}
#endif

}  // namespace

void register_cpu_ops(py::module_& m) {
  m.def("rms_norm", &rms_norm, py::arg("x"), py::arg("residual"), py::arg("w"), py::arg("eps"),
        py::arg("y").noconvert(), py::arg("h").noconvert(), py::arg("threads") = 1,
        "y = w * (h / sqrt(mean(h^2) + eps)), h = x (+ residual, written to h); float32 (T, N) C-contiguous");
  m.def("attention", &attention, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("cu_seqlens"), py::arg("causal"),
        py::arg("last_only"), py::arg("scale"), py::arg("out").noconvert(), py::arg("threads") = 1,
        "varlen attention of short sequences (float32 C-contiguous; q (T or B, H, D), k/v (T, Hkv, D))");
  m.def("swiglu", &swiglu, py::arg("gate_up"), py::arg("y").noconvert(), py::arg("threads") = 1,
        "y (T, F) = silu(gate) * up for gate_up (T, 2F) = [gate | up]; float32 C-contiguous");
  m.def("rope", &rope, py::arg("x"), py::arg("cos"), py::arg("sin"), py::arg("pos"), py::arg("norm"), py::arg("eps"),
        py::arg("y").noconvert(), py::arg("threads") = 1,
        "y (T, H, D) = rotate-half RoPE of x (optionally per-head RMSNormed first) at rows pos of cos/sin");
}
