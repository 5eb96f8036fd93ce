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
#if defined(__AVX512F__)
    info.simd = "avx512f";
#elif defined(__AVX2__)
    info.simd = "avx2";
#elif defined(__SSE4_2__)
    info.simd = "sse4.2";
#elif defined(__ARM_NEON)
    info.simd = "neon";
#else
    info.simd = "baseline";
#endif
    return info;
}

}  // namespace d3fast
