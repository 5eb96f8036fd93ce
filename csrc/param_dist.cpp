// Trajectory-parameter distance ||a - t||^2 / ||s - t||^2 in one pass over memory.
//
// Each segment is read once (a, t and s together) in chunks of 64 Ki values spread over the
// threads; within a chunk, 1,024-value partial sums in T (vectorised) are added into double,
// so a 16M-parameter fp32 vector keeps ~1e-7 relative accuracy instead of drifting with P.
#include <algorithm>
#include <vector>

#include "d3fast_core.h"
#include "simd.h"

namespace d3fast {
namespace {

constexpr int64_t BLOCK = 1024;
constexpr int64_t CHUNK = 1 << 16;

template <typename T>
D3FAST_INLINE void chunk_sums(const T* a, const T* t, const T* s, int64_t n, double* num, double* den) {
    double nsum = 0, dsum = 0;
    for (int64_t b0 = 0; b0 < n; b0 += BLOCK) {
        const int64_t b1 = std::min(b0 + BLOCK, n);
        T nb = 0, db = 0;
        for (int64_t i = b0; i < b1; ++i) {
            const T da = a[i] - t[i], ds = s[i] - t[i];
            nb += da * da;
            db += ds * ds;
        }
        nsum += static_cast<double>(nb);
        dsum += static_cast<double>(db);
    }
    *num = nsum;
    *den = dsum;
}

template <typename T>
D3FAST_INLINE void chunk_grads(const T* a, const T* t, const T* s, int64_t n, T ca, T cs, T* ga, T* gt, T* gs) {
    // one branch per chunk, not per value, so each variant vectorises
    if (ga && !gt && !gs) {
        for (int64_t i = 0; i < n; ++i) ga[i] = ca * (a[i] - t[i]);
        return;
    }
    for (int64_t i = 0; i < n; ++i) {
        const T va = ca * (a[i] - t[i]), vs = cs * (s[i] - t[i]);
        if (ga) ga[i] = va;
        if (gs) gs[i] = vs;
        if (gt) gt[i] = -(va + vs);
    }
}

// float32 at each level (simd.h), below the OpenMP loops.
D3FAST_LEVELS(chunk_sums_f32, (const float* a, const float* t, const float* s, int64_t n, double* num, double* den),
              chunk_sums(a, t, s, n, num, den);)
void chunk_sums_f64(const double* a, const double* t, const double* s, int64_t n, double* num, double* den) {
    chunk_sums(a, t, s, n, num, den);
}
D3FAST_LEVELS(chunk_grads_f32,
              (const float* a, const float* t, const float* s, int64_t n, float ca, float cs, float* ga, float* gt,
               float* gs),
              chunk_grads(a, t, s, n, ca, cs, ga, gt, gs);)
void chunk_grads_f64(const double* a, const double* t, const double* s, int64_t n, double ca, double cs,
                     double* ga, double* gt, double* gs) {
    chunk_grads(a, t, s, n, ca, cs, ga, gt, gs);
}

inline void chunk_sums_t(const float* a, const float* t, const float* s, int64_t n, double* num, double* den) {
    D3FAST_PICK(chunk_sums_f32)(a, t, s, n, num, den);
}
inline void chunk_sums_t(const double* a, const double* t, const double* s, int64_t n, double* num, double* den) {
    chunk_sums_f64(a, t, s, n, num, den);
}
inline void chunk_grads_t(const float* a, const float* t, const float* s, int64_t n, float ca, float cs, float* ga,
                          float* gt, float* gs) {
    D3FAST_PICK(chunk_grads_f32)(a, t, s, n, ca, cs, ga, gt, gs);
}
inline void chunk_grads_t(const double* a, const double* t, const double* s, int64_t n, double ca, double cs,
                          double* ga, double* gt, double* gs) {
    chunk_grads_f64(a, t, s, n, ca, cs, ga, gt, gs);
}

}  // namespace

template <typename T>
void param_dist_sums(const std::vector<const T*>& a, const std::vector<const T*>& t,
                         const std::vector<const T*>& s, const std::vector<int64_t>& sizes, int64_t S,
                         double* num, double* den) {
    for (int64_t r = 0; r < S; ++r) {
        double nsum = 0, dsum = 0;
        for (size_t k = 0; k < sizes.size(); ++k) {
            const int64_t P = sizes[k], off = r * P;
#pragma omp parallel for schedule(static) reduction(+ : nsum, dsum) if (P > 2 * CHUNK)
            for (int64_t c0 = 0; c0 < P; c0 += CHUNK) {
                double n = 0, d = 0;
                chunk_sums_t(a[k] + off + c0, t[k] + off + c0, s[k] + off + c0, std::min(CHUNK, P - c0), &n, &d);
                nsum += n;
                dsum += d;
            }
        }
        num[r] = nsum;
        den[r] = dsum;
    }
}

template <typename T>
void param_dist_grads(const std::vector<const T*>& a, const std::vector<const T*>& t,
                          const std::vector<const T*>& s, const std::vector<int64_t>& sizes, int64_t S,
                          const double* num, const double* den, const double* go,
                          const std::vector<T*>& grad_a, const std::vector<T*>& grad_t,
                          const std::vector<T*>& grad_s) {
    for (int64_t r = 0; r < S; ++r) {
        const T ca = static_cast<T>(2 * go[r] / den[r]);
        const T cs = static_cast<T>(-2 * go[r] * num[r] / (den[r] * den[r]));
        for (size_t k = 0; k < sizes.size(); ++k) {
            const int64_t P = sizes[k], off = r * P;
            T* ga = grad_a[k] ? grad_a[k] + off : nullptr;
            T* gt = grad_t[k] ? grad_t[k] + off : nullptr;
            T* gs = grad_s[k] ? grad_s[k] + off : nullptr;
#pragma omp parallel for schedule(static) if (P > 2 * CHUNK)
            for (int64_t c0 = 0; c0 < P; c0 += CHUNK) {
                chunk_grads_t(a[k] + off + c0, t[k] + off + c0, s[k] + off + c0, std::min(CHUNK, P - c0), ca, cs,
                              ga ? ga + c0 : nullptr, gt ? gt + c0 : nullptr, gs ? gs + c0 : nullptr);
            }
        }
    }
}

template void param_dist_sums<float>(const std::vector<const float*>&, const std::vector<const float*>&,
                                         const std::vector<const float*>&, const std::vector<int64_t>&, int64_t,
                                         double*, double*);
template void param_dist_sums<double>(const std::vector<const double*>&, const std::vector<const double*>&,
                                          const std::vector<const double*>&, const std::vector<int64_t>&, int64_t,
                                          double*, double*);
template void param_dist_grads<float>(const std::vector<const float*>&, const std::vector<const float*>&,
                                          const std::vector<const float*>&, const std::vector<int64_t>&, int64_t,
                                          const double*, const double*, const double*,
                                          const std::vector<float*>&, const std::vector<float*>&,
                                          const std::vector<float*>&);
template void param_dist_grads<double>(const std::vector<const double*>&, const std::vector<const double*>&,
                                           const std::vector<const double*>&, const std::vector<int64_t>&, int64_t,
                                           const double*, const double*, const double*,
                                           const std::vector<double*>&, const std::vector<double*>&,
                                           const std::vector<double*>&);

}  // namespace d3fast
