// Core C++ routines of d3fast, free of Python headers so they can be tested and
// reused on their own; bindings.cpp exposes them as d3fast._C.
#pragma once

#include <string>

namespace d3fast {

struct BuildInfo {
    std::string version;
    std::string compiler;
    int openmp_threads;  // 0 when built without OpenMP
    std::string simd;    // widest vector ISA the compiler targeted
};

BuildInfo build_info();

}  // namespace d3fast
