// jv5fast._C: the small per-layer ops of the CPU fp32 forward, fused (AVX2): RMSNorm with the residual add,
// and RoPE with Qwen3's optional per-head RMSNorm. Same formulas, in the same order, as the references
// kernels/rmsnorm.py::rms_norm_ref and kernels/rope.py::rope_ref:
//   rms_norm: h = x + residual;  y = w * (h * 1/sqrt(mean(h^2) + eps))
//   rope:     xn = w * (x * 1/sqrt(mean(x^2) + eps)) (norm optional);  y = xn * cos[p] + rotate_half(xn) * sin[p]
// At a query's 20 rows the references are ~10 tiny torch calls each, whose dispatch costs more than the math
// (~5 ms of a 40 ms nano query); here each is one call. The sums of squares use 8 lanes (another summation
// order than torch's, within fp32 rounding). Rows are split over OpenMP threads when there are enough.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "cpu_features.h"
#if defined(JV5_AVX2_FMA)
#include <immintrin.h>
#endif

namespace py = pybind11;

namespace {

constexpr int64_t kMaxHeadDim = 1024;  // rope's per-row buffer; jv5fast.ops takes the reference above it

#if defined(JV5_AVX2_FMA)
constexpr int64_t kParallelElems = 1 << 16;  // below this many elements one thread is faster

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
#endif

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
#if defined(JV5_AVX2_FMA)
  const float* X = x.data();
  const float* W = w.data();
  const float* R = residual.is_none() ? nullptr : res.data();
  float* H = residual.is_none() ? nullptr : hh.mutable_data();
  float* Y = y.mutable_data();
  const float e = float(eps);
  py::gil_scoped_release release;
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
#endif
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
#if defined(JV5_AVX2_FMA)
  const float* X = x.data();
  const int64_t sT = x.strides(0) / sizeof(float), sH = x.strides(1) / sizeof(float);
  const float* C = cos.data();
  const float* S = sin.data();
  const float* NW = norm.is_none() ? nullptr : nw.data();
  float* Y = y.mutable_data();
  const float e = float(eps);
  const int64_t half = D / 2;
  py::gil_scoped_release release;
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
#endif
}

}  // namespace

void register_cpu_ops(py::module_& m) {
  m.def("rms_norm", &rms_norm, py::arg("x"), py::arg("residual"), py::arg("w"), py::arg("eps"),
        py::arg("y").noconvert(), py::arg("h").noconvert(), py::arg("threads") = 1,
        "y = w * (h / sqrt(mean(h^2) + eps)), h = x (+ residual, written to h); float32 (T, N) C-contiguous");
  m.def("rope", &rope, py::arg("x"), py::arg("cos"), py::arg("sin"), py::arg("pos"), py::arg("norm"), py::arg("eps"),
        py::arg("y").noconvert(), py::arg("threads") = 1,
        "y (T, H, D) = rotate-half RoPE of x (optionally per-head RMSNormed first) at rows pos of cos/sin");
}
