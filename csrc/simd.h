// Building blocks of the CPU kernels: a register-blocked multiply-accumulate micro-kernel
// and a vectorisable exp. Header-only so each build of a caller (D3FAST_LEVELS below)
// inlines them compiled for its own instruction set.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

// GCC on x86-64: the hot entry points are compiled three times, for the baseline (SSE2), for
// AVX2+FMA (x86-64-v3) and for AVX-512 (x86-64-v4: F, VL, BW, DQ), and the caller picks one
// per call from d3fast::cpu_isa() (d3fast_core.h): a wheel built here runs on any x86-64 CPU,
// uses the widest vectors it has, and a test can run every level this CPU supports.
// Explicit targets rather than target_clones, whose ifunc cannot be overridden at run time.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define D3FAST_X86_LEVELS 1
#define D3FAST_TARGET_V3 __attribute__((target("arch=x86-64-v3")))
#define D3FAST_TARGET_V4 __attribute__((target("arch=x86-64-v4")))
#else
#define D3FAST_X86_LEVELS 0
#define D3FAST_TARGET_V3
#define D3FAST_TARGET_V4
#endif
#define D3FAST_INLINE inline __attribute__((always_inline))

// name_v1, name_v3, name_v4 (signature sig): the body (...) compiled at the baseline, x86-64-v3
// and x86-64-v4 with `I` the register-block shapes of each (Xmm, Ymm, Zmm below); D3FAST_PICK
// (name) is the one for d3fast::cpu_isa(). Define them below any OpenMP loop: GCC's outlined
// parallel regions do not inherit a target (measured: no FMA in the loop body, 10x slower).
#define D3FAST_LEVELS(name, sig, ...)                                  \
    void name##_v1 sig {                                                \
        using I [[maybe_unused]] = ::d3fast::simd::Xmm;                 \
        __VA_ARGS__                                                     \
    }                                                                   \
    D3FAST_TARGET_V3 void name##_v3 sig {                               \
        using I [[maybe_unused]] = ::d3fast::simd::Ymm;                 \
        __VA_ARGS__                                                     \
    }                                                                   \
    D3FAST_TARGET_V4 void name##_v4 sig {                               \
        using I [[maybe_unused]] = ::d3fast::simd::Zmm;                 \
        __VA_ARGS__                                                     \
    }
#define D3FAST_PICK(name) ::d3fast::by_isa(name##_v1, name##_v3, name##_v4)

namespace d3fast {
namespace simd {

// Register-block shapes per vector width. Xmm: 16-byte vectors, 16 registers (the baseline:
// SSE2, or NEON; 32-byte vectors there, split in halves, ran 22x slower than AVX2 at D3's
// shape, not 2x). Ymm: 32-byte vectors, 16 registers (AVX2). Zmm: 64-byte vectors, 32
// registers (AVX-512).
//   mac_tile: MR rows x NR columns of C in registers, NR / lanes vectors a row, plus NR / lanes
//     loads of B and one broadcast of A: Xmm 6 x 8 floats = 12 + 2 + 1 of 16 registers; Ymm
//     6 x 16 floats = 12 + 2 + 1 of 16 (the BLIS Haswell shape); Zmm 6 x 64 floats = 24 + 4 + 1 of 32 (MR stays 6: the 30-row sides
//     of D3's classes split into whole blocks).
//   dot_block: DR x DC vector accumulators + DR row loads + 1 column load: Xmm and Ymm 3 x 4 =
//     12 + 3 + 1 of 16; Zmm 4 x 6 = 24 + 4 + 1 of 32 (24 FMAs for 10 loads per vector of k, against
//     12 for 7).
struct Xmm {
    static constexpr int bytes = 16, MR = 6, NR = 8, DR = 3, DC = 4;
};
struct Ymm {
    static constexpr int bytes = 32, MR = 6, NR = 16, DR = 3, DC = 4;
};
struct Zmm {
    static constexpr int bytes = 64, MR = 6, NR = 64, DR = 4, DC = 6;
};

template <typename T, int Bytes = 32>
struct Vec {
    typedef T type __attribute__((vector_size(Bytes)));
    static constexpr int lanes = Bytes / static_cast<int>(sizeof(T));
};

template <typename T, int Bytes = 32>
D3FAST_INLINE typename Vec<T, Bytes>::type load(const T* p) {
    typename Vec<T, Bytes>::type v;
    std::memcpy(&v, p, sizeof(v));
    return v;
}

template <typename T, int Bytes = 32>
D3FAST_INLINE void store(T* p, typename Vec<T, Bytes>::type v) {
    std::memcpy(p, &v, sizeof(v));
}

// Every lane = s, as one shuffle of a vector holding s (shufps / vbroadcastss / dup): GCC
// lowers a plain `scalar * vector` at the SSE2 baseline through four stack stores and a
// reload, a store-forwarding stall per product (measured: the baseline's MMD gradient 26x the
// AVX2 time at D3's shape).
template <typename T, int Bytes>
D3FAST_INLINE typename Vec<T, Bytes>::type splat(T s) {
    using V = typename Vec<T, Bytes>::type;
    typedef typename std::conditional<sizeof(T) == 4, int32_t, int64_t>::type I;
    typedef I M __attribute__((vector_size(Bytes)));
    return __builtin_shuffle(V{s}, M{});
}

// C[r][0:NR] += sum_k A(r, k) * B[k][0:NR] for r < mr, where A(r, k) = a[r*a_rs + k*a_ks]
// and B[k] starts at b + k*b_ks (NR contiguous values), NR = I::NR. Rows r >= mr of A are never
// read. add = false stores the sums instead of adding them (no pass to zero C first).
template <typename T, typename I = Ymm>
D3FAST_INLINE void mac_tile(int64_t K, const T* a, int64_t a_rs, int64_t a_ks, const T* b, int64_t b_ks,
                            T* c, int64_t c_rs, int mr, bool add = true) {
    using V = typename Vec<T, I::bytes>::type;
    constexpr int MR = I::MR, NR = I::NR;
    constexpr int L = Vec<T, I::bytes>::lanes;
    constexpr int NV = NR / L;
    V acc[MR][NV];
    const T* arow[MR];
    for (int r = 0; r < MR; ++r) {
        // missing rows re-read row 0; their sums are discarded below
        arow[r] = a + (r < mr ? r : 0) * a_rs;
        for (int v = 0; v < NV; ++v) acc[r][v] = V{} ;
    }
    for (int64_t k = 0; k < K; ++k) {
        V bv[NV];
        for (int v = 0; v < NV; ++v) bv[v] = load<T, I::bytes>(b + k * b_ks + v * L);
        for (int r = 0; r < MR; ++r) {
            const V av = splat<T, I::bytes>(arow[r][k * a_ks]);
            for (int v = 0; v < NV; ++v) acc[r][v] += av * bv[v];
        }
    }
    for (int r = 0; r < mr; ++r) {
        for (int v = 0; v < NV; ++v) {
            T* p = c + r * c_rs + v * L;
            store<T, I::bytes>(p, add ? load<T, I::bytes>(p) + acc[r][v] : acc[r][v]);
        }
    }
}

// Dot-product register block: out[r * ld + s] = <a[r], b[s]> over k < K for r < ra <= I::DR,
// s < rb <= I::DC, rows given by pointers (no packing: the rows are read where they lie).
// FMA-bound when the rows sit in L1/L2 (shapes at Ymm and Zmm above).
template <typename T, typename I = Ymm>
D3FAST_INLINE void dot_block(int64_t K, const T* const* a, int ra, const T* const* b, int rb, T* out, int64_t ld) {
    using V = typename Vec<T, I::bytes>::type;
    constexpr int DR = I::DR, DC = I::DC;
    constexpr int L = Vec<T, I::bytes>::lanes;
    const T* ap[DR];
    const T* bp[DC];
    // missing rows re-read row 0; their sums are discarded below
    for (int r = 0; r < DR; ++r) ap[r] = a[r < ra ? r : 0];
    for (int s = 0; s < DC; ++s) bp[s] = b[s < rb ? s : 0];
    V acc[DR][DC];
    for (int r = 0; r < DR; ++r)
        for (int s = 0; s < DC; ++s) acc[r][s] = V{};
    int64_t k = 0;
    for (; k + L <= K; k += L) {
        V av[DR];
        for (int r = 0; r < DR; ++r) av[r] = load<T, I::bytes>(ap[r] + k);
        for (int s = 0; s < DC; ++s) {
            const V bv = load<T, I::bytes>(bp[s] + k);
            for (int r = 0; r < DR; ++r) acc[r][s] += av[r] * bv;
        }
    }
    for (int r = 0; r < ra; ++r) {
        for (int s = 0; s < rb; ++s) {
            T sum = 0;
            for (int l = 0; l < L; ++l) sum += acc[r][s][l];
            for (int64_t kk = k; kk < K; ++kk) sum += ap[r][kk] * bp[s][kk];
            out[r * ld + s] = sum;
        }
    }
}

// exp(x) for x <= 0 in float: 2^n * p(r) with r = x - n ln2 in [-ln2/2, ln2/2] and a degree-6
// polynomial (Cephes expf's coefficients). Max relative error 8.5e-8 (< 1 ulp) over every
// float in [-87, 0], checked against double exp; below -87 it returns exp(-87) = 1.6e-38.
// Plain arithmetic and bit casts, so GCC vectorises the loops that call it; std::exp is a
// scalar libm call.
D3FAST_INLINE float exp_neg(float x) {
    x = x < -87.0f ? -87.0f : x;
    // round to nearest by adding and removing 1.5 * 2^23 (std::floor is a branch to GCC)
    const float n = (x * 1.44269504089f + 12582912.0f) - 12582912.0f;
    float r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, sizeof(scale));
    return p * scale;
}

D3FAST_INLINE double exp_neg(double x) { return std::exp(x); }

}  // namespace simd
}  // namespace d3fast
