#include <pybind11/pybind11.h>

#include "d3fast_core.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
    m.doc() = "d3fast C++ extension: CPU implementations of d3fast's fused ops.";
    m.attr("__version__") = D3FAST_VERSION;

    m.def(
        "build_info",
        []() {
            const auto info = d3fast::build_info();
            py::dict out;
            out["version"] = info.version;
            out["compiler"] = info.compiler;
            out["openmp_threads"] = info.openmp_threads;
            out["simd"] = info.simd;
            return out;
        },
        "How this extension was built.\n\n"
        "Returns:\n"
        "    dict with keys version (str), compiler (str), openmp_threads (int, 0 without\n"
        "    OpenMP) and simd (str, the widest vector ISA the compiler targeted).");
}
