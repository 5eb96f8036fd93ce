// Building blocks of the CPU kernels: a register-blocked multiply-accumulate micro-kernel
// and a vectorisable exp. Header-only so each clone of a caller (D3FAST_CLONES below)
// inlines them compiled for its own instruction set.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

// GCC on x86-64: compile the hot entry points twice, for AVX2+FMA (x86-64-v3) and for the
// baseline, and pick one at load time. A wheel built here then runs on any x86-64 CPU.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define D3FAST_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define D3FAST_CLONES
#endif
#define D3FAST_INLINE inline __attribute__((always_inline))

namespace d3fast {
namespace simd {

// 32-byte vectors (one AVX register); the baseline clone splits them into SSE halves.
template <typename T>
struct Vec;
template <>
struct Vec<float> {
    typedef float type __attribute__((vector_size(32)));
    static constexpr int lanes = 8;
};
template <>
struct Vec<double> {
    typedef double type __attribute__((vector_size(32)));
    static constexpr int lanes = 4;
};

template <typename T>
D3FAST_INLINE typename Vec<T>::type load(const T* p) {
    typename Vec<T>::type v;
    std::memcpy(&v, p, sizeof(v));
    return v;
}

template <typename T>
D3FAST_INLINE void store(T* p, typename Vec<T>::type v) {
    std::memcpy(p, &v, sizeof(v));
}

// Micro-kernel shape: MR rows x NR columns of C in registers. 6 x 16 floats = 12 AVX
// accumulators + 2 loads of b + 1 broadcast fit the 16 registers of AVX2 (the BLIS
// Haswell shape).
constexpr int MR = 6;
constexpr int NR = 16;

// C[r][0:NR] += sum_k A(r, k) * B[k][0:NR] for r < mr, where A(r, k) = a[r*a_rs + k*a_ks]
// and B[k] starts at b + k*b_ks (NR contiguous values). Rows r >= mr of A are never read.
// add = false stores the sums instead of adding them (no pass to zero C first).
template <typename T>
D3FAST_INLINE void mac_tile(int64_t K, const T* a, int64_t a_rs, int64_t a_ks, const T* b, int64_t b_ks,
                            T* c, int64_t c_rs, int mr, bool add = true) {
    using V = typename Vec<T>::type;
    constexpr int L = Vec<T>::lanes;
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
        for (int v = 0; v < NV; ++v) bv[v] = load<T>(b + k * b_ks + v * L);
        for (int r = 0; r < MR; ++r) {
            const T av = arow[r][k * a_ks];
            for (int v = 0; v < NV; ++v) acc[r][v] += av * bv[v];
        }
    }
    for (int r = 0; r < mr; ++r) {
        for (int v = 0; v < NV; ++v) {
            T* p = c + r * c_rs + v * L;
            store<T>(p, add ? load<T>(p) + acc[r][v] : acc[r][v]);
        }
    }
}

// Dot-product register block: out[r * ld + s] = <a[r], b[s]> over k < K for r < ra <= DR,
// s < rb <= DC, rows given by pointers (no packing: the rows are read where they lie).
// 3 x 4 vector accumulators + 3 row loads + 1 column load = the 16 AVX2 registers; per
// 8 lanes of k it issues 12 FMAs for 7 loads, FMA-bound when the rows sit in L1/L2.
constexpr int DR = 3;
constexpr int DC = 4;

template <typename T>
D3FAST_INLINE void dot_block(int64_t K, const T* const* a, int ra, const T* const* b, int rb, T* out, int64_t ld) {
    using V = typename Vec<T>::type;
    constexpr int L = Vec<T>::lanes;
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
        for (int r = 0; r < DR; ++r) av[r] = load<T>(ap[r] + k);
        for (int s = 0; s < DC; ++s) {
            const V bv = load<T>(bp[s] + k);
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
