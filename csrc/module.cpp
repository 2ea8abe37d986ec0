// jv5fast._C: the module's entry point; each csrc/*.cpp registers its functions here.
#include <pybind11/pybind11.h>

#include "cpu_features.h"

namespace py = pybind11;

void register_hamming(py::module_& m);
void register_sgemm(py::module_& m);
void register_cpu_ops(py::module_& m);

PYBIND11_MODULE(_C, m) {
  m.doc() = "jv5fast C++ kernels: Hamming top-k search, sign-bit packing (csrc/hamming.cpp), the CPU fp32 GEMM "
            "on prepacked weights (csrc/sgemm.cpp), fused CPU RMSNorm and RoPE (csrc/cpu_ops.cpp)";
  register_hamming(m);
  register_sgemm(m);
  register_cpu_ops(m);
  m.def("avx2_fma_available", &avx2_fma_available,
        "Whether sgemm, rms_norm and rope run here (built with AVX2/FMA, and the CPU has them)");
}
