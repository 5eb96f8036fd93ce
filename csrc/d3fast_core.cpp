#include "d3fast_core.h"
#include "simd.h"

#include <atomic>
#include <cstdlib>
#include <stdexcept>
#include <string>
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

Isa best_cpu_isa() {
#if D3FAST_X86_LEVELS
    // libgcc's checks include the OS saving the vector state (XCR0), not only CPUID
    __builtin_cpu_init();
    if (__builtin_cpu_supports("x86-64-v4")) return Isa::avx512;
    if (__builtin_cpu_supports("x86-64-v3")) return Isa::avx2;
#endif
    return Isa::baseline;
}

Isa default_cpu_isa() {
    const Isa best = best_cpu_isa();
#if D3FAST_X86_LEVELS
    // AMD family 19h with AVX-512 (Zen 4) runs each 512-bit operation as two 256-bit halves:
    // no more FLOPs per cycle than AVX2, and its MMD step measured 0.94x (C = 10) and 0.84x
    // (C = 200) the AVX2 build's at D3's shapes, 1 thread (benchmarks/bench_mmd.py
    // test_mmd_vs_peers, "cpp at avx2"). Intel's cores and Zen 5 run 512-bit vectors whole.
    if (best == Isa::avx512 && __builtin_cpu_is("amdfam19h")) return Isa::avx2;
#endif
    return best;
}

namespace {
std::atomic<int>& isa_level() {
    static std::atomic<int> level{static_cast<int>(default_cpu_isa())};
    return level;
}
}  // namespace

Isa cpu_isa() { return static_cast<Isa>(isa_level().load(std::memory_order_relaxed)); }

void set_cpu_isa(Isa level) {
    if (static_cast<int>(level) > static_cast<int>(best_cpu_isa()))
        throw std::invalid_argument(std::string("this CPU cannot run the ") + isa_name(level) + " kernels (best: " +
                                    isa_name(best_cpu_isa()) + ")");
    isa_level().store(static_cast<int>(level), std::memory_order_relaxed);
}

const char* isa_name(Isa level) {
    switch (level) {
        case Isa::avx512:
            return "avx512";
        case Isa::avx2:
            return "avx2";
        default:
            return "baseline";
    }
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
    info.simd = std::string(isa_name(cpu_isa())) + " (this CPU: up to " + isa_name(best_cpu_isa()) + ", default " +
                isa_name(default_cpu_isa()) + ")";
    return info;
}

}  // namespace d3fast
