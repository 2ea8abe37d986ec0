// jv5fast._C: the module's entry point; each csrc/*.cpp registers its functions here.
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

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
        "Whether sgemm, rms_norm, rope, swiglu and attention run here (the CPU has AVX2/FMA and the ISA cap allows it)");
  static const char* kIsaNames[] = {"scalar", "avx2", "avx512"};
  m.def("cpu_isa_supported", [] { return std::string(kIsaNames[cpu_isa_supported()]); },
        "The highest ISA level the kernels can use on this CPU: 'avx512', 'avx2' or 'scalar'");
  m.def("cpu_isa", [] { return std::string(kIsaNames[active_isa()]); },
        "The ISA level the kernels use now (the CPU's, capped by set_isa_limit)");
  m.def("set_isa_limit", [](const std::string& name) {
        for (int i = 0; i < 3; ++i)
          if (name == kIsaNames[i]) {
            isa_limit().store(i);
            return;
          }
        throw std::invalid_argument("set_isa_limit: '" + name + "' is not one of scalar, avx2, avx512");
      }, py::arg("name"), "Cap the ISA level of every kernel (process-wide; never raises it above the CPU's)");
}
