// Batched multi-kernel MMD^2 on the CPU, loss and gradient in one tiled pass.
//
// Per class, with Z = [X; Y] (N = nx + ny rows), k(a, b) = sum_b exp(-g_b ||a - b||^2) and
// group coefficients c_xx, c_yy, c_xy (kernels/mmd_ref.py has the formulas):
//     L = sum_{i, j in pairs} c(i, j) k(z_i, z_j)
//     dL/dz_i = -4 [ (sum_j W_ij) z_i - sum_j W_ij z_j ],   W_ij = c(i, j) sum_b g_b e_b,ij
// k and W are symmetric, so only the row tiles' upper triangle of Gram tiles is computed:
// an off-diagonal tile counts twice in L and feeds both its rows and (mirrored) its columns.
// Nothing n x m is stored: a row tile's Gram panel (MI x N) is the largest temporary.
#include <algorithm>
#include <cstring>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "d3fast_core.h"
#include "simd.h"

namespace d3fast {
namespace {

using simd::MR;
using simd::NR;

// Row tile: 96 = 16 micro-rows of 6 and a multiple of the 16-row panel. Depth block 256:
// a 16 KiB packed B panel stays in L1 while a 96 KiB A block sits in L2.
constexpr int64_t MI = 96;
constexpr int64_t KC = 256;

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

template <typename T>
struct ClassWork {
    int64_t lx, ly, lxp, N, D;  // lxp: X rows padded to a panel; N: padded total
    int64_t ldz;                // D padded to NR: W z products run 16 columns at a time
    std::vector<T> z;           // [N, ldz] rows of X then Y, zero padding
    std::vector<T> packed;      // [N / NR, D, NR] row panels of z, d-major, for the Gram tiles
    std::vector<T> dpanels;     // [ldz / NR, N, NR] column panels of z for the W z products
    std::vector<T> sq;          // [N] squared norms
    std::vector<T> acc;         // [N, ldz] sum_j W_ij z_j (gradient runs only)
    std::vector<T> rsum;        // [N] sum_j W_ij
    std::vector<T> gram;        // [MI, N] one row tile's Gram panel, then its W panel

    bool valid(int64_t i) const { return i < lxp ? i < lx : i - lxp < ly; }
    bool is_y(int64_t i) const { return i >= lxp; }
};

template <typename T>
void load_class(ClassWork<T>& w, const T* x, const T* y, int64_t lx, int64_t ly, int64_t D, bool grad) {
    w.lx = lx;
    w.ly = ly;
    w.lxp = round_up(lx, NR);
    w.N = w.lxp + round_up(ly, NR);
    w.D = D;
    w.ldz = round_up(D, NR);
    const int64_t ldz = w.ldz;
    w.z.assign(w.N * ldz, T(0));
    for (int64_t i = 0; i < lx; ++i) std::memcpy(w.z.data() + i * ldz, x + i * D, sizeof(T) * D);
    for (int64_t i = 0; i < ly; ++i) std::memcpy(w.z.data() + (w.lxp + i) * ldz, y + i * D, sizeof(T) * D);
    w.packed.resize(w.N * D);
    for (int64_t p = 0; p < w.N / NR; ++p) {
        T* dst = w.packed.data() + p * D * NR;
        for (int64_t r = 0; r < NR; ++r) {
            const T* src = w.z.data() + (p * NR + r) * ldz;
            for (int64_t k = 0; k < D; ++k) dst[k * NR + r] = src[k];
        }
    }
    if (grad) {
        // contiguous 16-column slabs: W z then streams 64 bytes per row instead of touching
        // a new page every row (rows are 8 KiB apart at D = 2048)
        w.dpanels.resize(ldz * w.N);
        for (int64_t q = 0; q < ldz / NR; ++q) {
            T* dst = w.dpanels.data() + q * w.N * NR;
            for (int64_t i = 0; i < w.N; ++i) std::memcpy(dst + i * NR, w.z.data() + i * ldz + q * NR, sizeof(T) * NR);
        }
    }
    w.sq.assign(w.N, T(0));
    for (int64_t i = 0; i < w.N; ++i) {
        const T* r = w.z.data() + i * ldz;
        T s = 0;
        for (int64_t k = 0; k < D; ++k) s += r[k] * r[k];
        w.sq[i] = s;
    }
    if (grad) {
        w.acc.assign(w.N * ldz, T(0));
        w.rsum.assign(w.N, T(0));
    }
    w.gram.resize(MI * w.N);
}

// gram[r][j - j0] = <z_{i0+r}, z_j> for r < mi, j in [j0, N).
template <typename T>
D3FAST_INLINE void gram_panel(ClassWork<T>& w, int64_t i0, int64_t mi, int64_t j0) {
    const int64_t D = w.D, ldz = w.ldz, ld = w.N - j0;
    std::fill(w.gram.begin(), w.gram.begin() + mi * ld, T(0));
    for (int64_t k0 = 0; k0 < D; k0 += KC) {
        const int64_t kc = std::min(KC, D - k0);
        for (int64_t j = j0; j < w.N; j += NR) {
            const T* bp = w.packed.data() + (j / NR) * D * NR + k0 * NR;
            for (int64_t r = 0; r < mi; r += MR) {
                const T* a = w.z.data() + (i0 + r) * ldz + k0;
                simd::mac_tile<T>(kc, a, ldz, 1, bp, NR, w.gram.data() + r * ld + (j - j0), ld,
                                  static_cast<int>(std::min<int64_t>(MR, mi - r)));
            }
        }
    }
}

// One class: returns L (double) and fills w.acc / w.rsum when grad_x or grad_y.
template <typename T>
D3FAST_INLINE double class_loss(ClassWork<T>& w, const double* gammas, int nb, bool unbiased, bool grad_x,
                                bool grad_y) {
    const double lx = static_cast<double>(w.lx), ly = static_cast<double>(w.ly);
    const T cxx = static_cast<T>(unbiased ? 1.0 / (lx * (lx - 1)) : 1.0 / (lx * lx));
    const T cyy = static_cast<T>(unbiased ? 1.0 / (ly * (ly - 1)) : 1.0 / (ly * ly));
    const T cxy = static_cast<T>(-1.0 / (lx * ly));
    T g[16];
    for (int b = 0; b < nb; ++b) g[b] = static_cast<T>(gammas[b]);
    const bool grad = grad_x || grad_y;
    const int64_t ldz = w.ldz;
    double loss = 0;
    std::vector<T> coef_row(w.N), mask_row(w.N);

    std::vector<T> d2(w.N), kk(w.N), gk(w.N);
    for (int64_t i0 = 0, i1 = 0; i0 < w.N; i0 = i1) {
        // row tiles never straddle X and Y (both blocks start on a multiple of NR)
        i1 = std::min(i0 + MI, i0 < w.lxp ? w.lxp : w.N);
        const int64_t mi = i1 - i0, j0 = i0, ld = w.N - j0;
        const bool row_y = w.is_y(i0);
        const bool row_grad = row_y ? grad_y : grad_x;
        gram_panel(w, i0, mi, j0);

        for (int64_t j = j0; j < w.N; ++j) {
            const bool col_y = w.is_y(j);
            coef_row[j] = row_y != col_y ? cxy : (row_y ? cyy : cxx);
            // a pair in an off-diagonal tile stands for (i, j) and (j, i)
            mask_row[j] = w.valid(j) ? (j >= i1 ? T(2) : T(1)) : T(0);
        }
        for (int64_t r = 0; r < mi; ++r) {
            const int64_t i = i0 + r;
            T* row = w.gram.data() + r * ld;
            if (!w.valid(i)) {
                std::fill(row, row + ld, T(0));
                continue;
            }
            // Gram entry -> squared distance -> k (into L) and W (written over the Gram entry);
            // split into flat loops over j so that each one vectorises
            const T sqi = w.sq[i];
            const T* sqj = w.sq.data() + j0;
            for (int64_t jj = 0; jj < ld; ++jj) {
                const T v = sqi + sqj[jj] - 2 * row[jj];
                d2[jj] = v > T(0) ? v : T(0);
                kk[jj] = T(0);
                gk[jj] = T(0);
            }
            // the diagonal is exactly 0 apart (no cancellation error in sq_i + sq_i - 2 <z_i, z_i>)
            if (r < ld) d2[r] = T(0);
            for (int b = 0; b < nb; ++b) {
                const T gb = g[b];
                for (int64_t jj = 0; jj < ld; ++jj) {
                    const T e = simd::exp_neg(-gb * d2[jj]);
                    kk[jj] += e;
                    gk[jj] += gb * e;
                }
            }
            const T* cf = coef_row.data() + j0;
            T* mk = mask_row.data() + j0;
            // the unbiased estimator leaves out i = j
            const T diag_mask = mk[r];
            if (unbiased) mk[r] = T(0);
            T lsum = 0;
            for (int64_t jj = 0; jj < ld; ++jj) {
                const T m = mk[jj];
                lsum += m * cf[jj] * kk[jj];
                row[jj] = m > T(0) ? cf[jj] * gk[jj] : T(0);
            }
            mk[r] = diag_mask;
            loss += static_cast<double>(lsum);
        }
        if (!grad) continue;

        // rows of this tile: acc_i += sum_{j >= i0} W_ij z_j
        if (row_grad) {
            for (int64_t r = 0; r < mi; ++r) {
                const T* row = w.gram.data() + r * ld;
                T s = 0;
                for (int64_t jj = 0; jj < ld; ++jj) s += row[jj];
                w.rsum[i0 + r] += s;
            }
            for (int64_t d0 = 0; d0 < ldz; d0 += NR) {
                for (int64_t r = 0; r < mi; r += MR) {
                    simd::mac_tile<T>(ld, w.gram.data() + r * ld, ld, 1, w.dpanels.data() + d0 * w.N + j0 * NR, NR,
                                      w.acc.data() + (i0 + r) * ldz + d0, ldz,
                                      static_cast<int>(std::min<int64_t>(MR, mi - r)));
                }
            }
        }
        // columns right of the tile, mirrored: acc_j += sum_{i in tile} W_ij z_i
        for (int64_t jb = i1; jb < w.N;) {
            const int64_t jend = std::min(jb + MR, jb < w.lxp ? w.lxp : w.N);
            const int64_t next = jend;
            if (!(w.is_y(jb) ? grad_y : grad_x)) {
                jb = next;
                continue;
            }
            for (int64_t j = jb; j < jend; ++j) {
                T s = 0;
                for (int64_t r = 0; r < mi; ++r) s += w.gram[r * ld + (j - j0)];
                w.rsum[j] += s;
            }
            for (int64_t d0 = 0; d0 < ldz; d0 += NR) {
                simd::mac_tile<T>(mi, w.gram.data() + (jb - j0), 1, ld, w.dpanels.data() + d0 * w.N + i0 * NR, NR,
                                  w.acc.data() + jb * ldz + d0, ldz, static_cast<int>(jend - jb));
            }
            jb = next;
        }
    }
    return loss;
}

// One class, start to end: gather, tiles, gradient rows.
template <typename T>
D3FAST_INLINE void run_class(ClassWork<T>& w, const MMDArgs<T>& a, int64_t c) {
    const int64_t lx = a.x_lengths[c], ly = a.y_lengths[c], D = a.D;
    load_class(w, a.x + c * a.nx * D, a.y + c * a.ny * D, lx, ly, D, a.grad_x != nullptr || a.grad_y != nullptr);
    a.loss[c] = static_cast<T>(
        class_loss(w, a.gammas, a.num_gammas, a.unbiased, a.grad_x != nullptr, a.grad_y != nullptr));
    // dL/dz_i = -4 (rsum_i z_i - acc_i); padding rows past the lengths get 0
    auto finish = [&](T* out, int64_t rows, int64_t len, int64_t offset) {
        for (int64_t i = 0; i < rows; ++i) {
            T* o = out + i * D;
            if (i >= len) {
                std::fill(o, o + D, T(0));
                continue;
            }
            const T* z = w.z.data() + (offset + i) * w.ldz;
            const T* s = w.acc.data() + (offset + i) * w.ldz;
            const T rs = w.rsum[offset + i];
            for (int64_t k = 0; k < D; ++k) o[k] = T(-4) * (rs * z[k] - s[k]);
        }
    };
    if (a.grad_x) finish(a.grad_x + c * a.nx * D, a.nx, lx, 0);
    if (a.grad_y) finish(a.grad_y + c * a.ny * D, a.ny, ly, w.lxp);
}

// The clones sit below the OpenMP loop: GCC outlines a parallel region into a new function
// that does not inherit target_clones, so a cloned function holding the loop would run its
// body at the baseline ISA (measured: no FMA instruction in the build, 10x slower).
D3FAST_CLONES void run_class_f32(ClassWork<float>& w, const MMDArgs<float>& a, int64_t c) { run_class(w, a, c); }
void run_class_f64(ClassWork<double>& w, const MMDArgs<double>& a, int64_t c) { run_class(w, a, c); }

// Classes in parallel: each thread owns whole classes, so the mirrored tile updates never
// race (C below the thread count leaves threads idle).
template <typename T, typename F>
void mmd_parallel(const MMDArgs<T>& a, F run) {
#pragma omp parallel
    {
        ClassWork<T> w;
#pragma omp for schedule(dynamic, 1)
        for (int64_t c = 0; c < a.C; ++c) run(w, a, c);
    }
}

}  // namespace

template <>
void mmd_forward<float>(const MMDArgs<float>& a) {
    mmd_parallel(a, run_class_f32);
}
template <>
void mmd_forward<double>(const MMDArgs<double>& a) {
    mmd_parallel(a, run_class_f64);
}

}  // namespace d3fast
