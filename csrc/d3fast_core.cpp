#include "d3fast_core.h"

#include <cstdlib>
#include <mutex>
#include <new>
#include <utility>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#ifndef D3FAST_VERSION
#define D3FAST_VERSION "unknown"
#endif

namespace d3fast {

namespace {

// Each buffer starts with a 64-byte header holding its size, so pool_free needs only the
// pointer (a Python capsule's destructor gets nothing else).
constexpr size_t kHeader = 64;
constexpr size_t kMaxKept = 8;
constexpr size_t kMaxKeptBytes = size_t(256) << 20;

struct Pool {
    std::mutex mu;
    std::vector<std::pair<size_t, void*>> kept;  // (size, base)
    size_t kept_bytes = 0;
};

// never destroyed: capsules may release buffers while the interpreter shuts down
Pool& pool() {
    static Pool* p = new Pool;
    return *p;
}

}  // namespace

void* pool_alloc(size_t bytes) {
    Pool& p = pool();
    {
        std::lock_guard<std::mutex> lock(p.mu);
        for (size_t i = 0; i < p.kept.size(); ++i) {
            if (p.kept[i].first == bytes) {
                void* base = p.kept[i].second;
                p.kept.erase(p.kept.begin() + static_cast<std::ptrdiff_t>(i));
                p.kept_bytes -= bytes;
                return static_cast<char*>(base) + kHeader;
            }
        }
    }
    void* base = std::aligned_alloc(kHeader, (kHeader + bytes + kHeader - 1) / kHeader * kHeader);
    if (base == nullptr) throw std::bad_alloc();
    *static_cast<size_t*>(base) = bytes;
    return static_cast<char*>(base) + kHeader;
}

void pool_free(void* ptr) {
    if (ptr == nullptr) return;
    void* base = static_cast<char*>(ptr) - kHeader;
    const size_t bytes = *static_cast<size_t*>(base);
    if (bytes > kMaxKeptBytes) {
        std::free(base);
        return;
    }
    // the oldest kept buffers make room: a loop whose shapes change keeps the new ones
    std::vector<void*> evicted;
    {
        Pool& p = pool();
        std::lock_guard<std::mutex> lock(p.mu);
        while (!p.kept.empty() && (p.kept.size() >= kMaxKept || p.kept_bytes + bytes > kMaxKeptBytes)) {
            p.kept_bytes -= p.kept.front().first;
            evicted.push_back(p.kept.front().second);
            p.kept.erase(p.kept.begin());
        }
        p.kept.emplace_back(bytes, base);
        p.kept_bytes += bytes;
    }
    for (void* e : evicted) std::free(e);
}

size_t pool_trim() {
    std::vector<std::pair<size_t, void*>> kept;
    {
        Pool& p = pool();
        std::lock_guard<std::mutex> lock(p.mu);
        kept.swap(p.kept);
        p.kept_bytes = 0;
    }
    size_t bytes = 0;
    for (const auto& [size, base] : kept) {
        bytes += size;
        std::free(base);
    }
    return bytes;
}

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
