#include "d3fast_core.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#ifndef D3FAST_VERSION
#define D3FAST_VERSION "unknown"
#endif

namespace d3fast {

BuildInfo build_info() {
    BuildInfo info;
    info.version = D3FAST_VERSION;
#if defined(__clang__)
    info.compiler = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
    info.compiler = std::string("gcc ") + __VERSION__;
#else
    info.compiler = "unknown";
#endif
#ifdef _OPENMP
    info.openmp_threads = omp_get_max_threads();
#else
    info.openmp_threads = 0;
#endif
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
    // the hot kernels are built twice (simd.h, D3FAST_CLONES); this is the one the loader picked
    __builtin_cpu_init();
    const bool v3 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    info.simd = v3 ? "avx2+fma (x86-64-v3 clone, picked at load)" : "sse2 (baseline clone; no avx2+fma)";
#elif defined(__ARM_NEON)
    info.simd = "neon";
#else
    info.simd = "baseline";
#endif
    return info;
}

}  // namespace d3fast
