// jv5fast._C: the module's entry point; each csrc/*.cpp registers its functions here.
#include <pybind11/pybind11.h>

namespace py = pybind11;

void register_hamming(py::module_& m);
void register_sgemm(py::module_& m);

PYBIND11_MODULE(_C, m) {
  m.doc() = "jv5fast C++ kernels: Hamming top-k search, sign-bit packing (csrc/hamming.cpp) and the CPU fp32 "
            "GEMM on prepacked weights (csrc/sgemm.cpp)";
  register_hamming(m);
  register_sgemm(m);
}
