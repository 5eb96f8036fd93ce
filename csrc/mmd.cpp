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

// the tiled path (classes with nx + ny > D, none of D3's) keeps the Ymm shapes at every level
constexpr int MR = simd::Ymm::MR;
constexpr int NR = simd::Ymm::NR;

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
                d2[jj] = v < T(0) ? T(0) : v;  // NaN stays NaN: a NaN or inf input gives a NaN loss
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

D3FAST_LEVELS(run_class_f32, (ClassWork<float>& w, const MMDArgs<float>& a, int64_t c), run_class(w, a, c);)
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

// ---- Direct path: classes with N = nx + ny <= D rows, every shape D3 runs ----
// The tiled path above copies each class three times (rows, d-major panels, column slabs) and
// keeps an [N, D] accumulator: at (10, 30, 30, 2048) those copies and their page faults cost
// more than the arithmetic. When the Gram matrix is no larger than the features (N <= D), it
// is stored whole instead ([C, N, N] floats, at most the inputs' size) and nothing else:
//   1. Gram tiles of Z = [X; Y] (upper triangle) by dot-product blocks over rows read in place;
//   2. per class, kernel values -> loss, and A = 4 (W - diag(sum_j W_ij)) over the Gram;
//   3. dL/dX = A[:lx] Z and dL/dY = A[lx:] Z (the formula at the top, regrouped), two GEMMs
//      per output block reading X and Y in place and writing the gradient once.
// Tasks are (class, row block) and (class, column block), not classes: C = 10 keeps 16
// threads busy. Phases 1-2 and 3 are also callable apart (mmd_weights, mmd_weight_grads), so
// that an autograd op runs phase 3 in its backward with the upstream gradient folded into A.
constexpr int64_t DIRECT_ROWS = 12;  // phase-1 task: 4 dot blocks of 3 rows
constexpr int64_t DIRECT_COLS = 256;  // phase-3 task: 16 panels of NR columns

template <typename T>
struct Direct {
    const MMDArgs<T>* a;
    int64_t nmax;     // nx + ny: the per-class stride of gram is nmax^2
    T* gram = nullptr;  // [C, N_c, N_c] (class c at c * nmax^2): Gram, then A
    const double* scale = nullptr;  // phase 3: [C] factors of A (the upstream gradient), null = 1
    std::vector<int64_t> task_class, task_start;  // phase-1 tasks

    int64_t rows(int64_t c) const { return a->x_lengths[c] + a->y_lengths[c]; }
    // row i of Z = [X; Y] of class c, where it lies in x or y
    const T* z(int64_t c, int64_t i) const {
        const int64_t lx = a->x_lengths[c];
        return i < lx ? a->x + (c * a->nx + i) * a->D : a->y + (c * a->ny + i - lx) * a->D;
    }
};

template <typename T, typename I>
D3FAST_INLINE void direct_gram(Direct<T>& d, int64_t t, std::vector<const T*>& zp) {
    const int64_t c = d.task_class[t], i0 = d.task_start[t], N = d.rows(c), D = d.a->D;
    const int64_t i1 = std::min(i0 + DIRECT_ROWS, N);
    zp.resize(N);
    for (int64_t i = 0; i < N; ++i) zp[i] = d.z(c, i);
    T* g = d.gram + c * d.nmax * d.nmax;
    // the whole depth per block: splitting it into L2-sized chunks was slower at every size
    // measured (N = 60 and 512, D = 2048: 1.0-1.45x the time), the partial sums' reductions
    // costing more than the misses they save
    for (int64_t r = i0; r < i1; r += I::DR) {
        const int ra = static_cast<int>(std::min<int64_t>(I::DR, i1 - r));
        // columns from the block's first row: j < i inside the block is a few spare sums; the
        // entries left unwritten lie below the diagonal, which phase 2 writes before reading
        for (int64_t j = r; j < N; j += I::DC) {
            const int rb = static_cast<int>(std::min<int64_t>(I::DC, N - j));
            simd::dot_block<T, I>(D, zp.data() + r, ra, zp.data() + j, rb, g + r * N + j, N);
        }
    }
}

template <typename T>
D3FAST_INLINE void direct_kernel(Direct<T>& d, int64_t c) {
    const MMDArgs<T>& a = *d.a;
    const int64_t lx = a.x_lengths[c], ly = a.y_lengths[c], N = lx + ly;
    const double flx = static_cast<double>(lx), fly = static_cast<double>(ly);
    const T cxx = static_cast<T>(a.unbiased ? 1.0 / (flx * (flx - 1)) : 1.0 / (flx * flx));
    const T cyy = static_cast<T>(a.unbiased ? 1.0 / (fly * (fly - 1)) : 1.0 / (fly * fly));
    const T cxy = static_cast<T>(-1.0 / (flx * fly));
    T gam[16];
    for (int b = 0; b < a.num_gammas; ++b) gam[b] = static_cast<T>(a.gammas[b]);
    T* g = d.gram + c * d.nmax * d.nmax;
    std::vector<T> sq(N), rsum(N, T(0)), d2(N), kk(N), gk(N);
    for (int64_t i = 0; i < N; ++i) sq[i] = g[i * N + i];
    double loss = 0;
    for (int64_t i = 0; i < N; ++i) {
        // pairs (i, j > i): each stands for (i, j) and (j, i)
        T* row = g + i * N;
        const int64_t j0 = i + 1, len = N - j0;
        const T sqi = sq[i];
        for (int64_t jj = 0; jj < len; ++jj) {
            const T v = sqi + sq[j0 + jj] - 2 * row[j0 + jj];
            d2[jj] = v < T(0) ? T(0) : v;  // NaN stays NaN: a NaN or inf input gives a NaN loss
            kk[jj] = T(0);
            gk[jj] = T(0);
        }
        for (int b = 0; b < a.num_gammas; ++b) {
            const T gb = gam[b];
            for (int64_t jj = 0; jj < len; ++jj) {
                const T e = simd::exp_neg(-gb * d2[jj]);
                kk[jj] += e;
                gk[jj] += gb * e;
            }
        }
        // the columns split at lx into two coefficient groups
        const bool row_x = i < lx;
        const int64_t split = std::max<int64_t>(lx - j0, 0);
        const T c1 = row_x ? cxx : cxy, c2 = row_x ? cxy : cyy;
        T s1 = 0, s2 = 0;
        for (int64_t jj = 0; jj < split; ++jj) {
            s1 += kk[jj];
            gk[jj] *= c1;
        }
        for (int64_t jj = split; jj < len; ++jj) {
            s2 += kk[jj];
            gk[jj] *= c2;
        }
        loss += 2.0 * (static_cast<double>(c1) * s1 + static_cast<double>(c2) * s2);
        // W_ij -> A_ij = A_ji = 4 W_ij, row sums of W on both sides
        T ws = 0;
        for (int64_t jj = 0; jj < len; ++jj) {
            const T w = gk[jj];
            ws += w;
            rsum[j0 + jj] += w;
            row[j0 + jj] = 4 * w;
        }
        rsum[i] += ws;
        for (int64_t jj = 0; jj < len; ++jj) g[(j0 + jj) * N + i] = row[j0 + jj];
        // the i = j term of the biased estimator: k(z_i, z_i) = number of bandwidths
        if (!a.unbiased) loss += static_cast<double>(row_x ? cxx : cyy) * a.num_gammas;
    }
    for (int64_t i = 0; i < N; ++i) g[i * N + i] = -4 * rsum[i];
    a.loss[c] = static_cast<T>(loss);
}

// Rows [0, len) of one side's gradient, columns [p0, p0 + NR): out_r = sum_k A[r0 + r, k] z_k.
template <typename T, typename I>
D3FAST_INLINE void direct_grad_panel(const Direct<T>& d, int64_t c, const T* A, int64_t len, T* out, int64_t p0,
                                     T* scratch) {
    const MMDArgs<T>& a = *d.a;
    const int64_t lx = a.x_lengths[c], ly = a.y_lengths[c], N = lx + ly, D = a.D;
    const T* xc = a.x + c * a.nx * D;
    const T* yc = a.y + c * a.ny * D;
    constexpr int MR = I::MR, NR = I::NR;
    if (p0 + NR <= D) {
        for (int64_t r = 0; r < len; r += MR) {
            const int mr = static_cast<int>(std::min<int64_t>(MR, len - r));
            simd::mac_tile<T, I>(lx, A + r * N, N, 1, xc + p0, D, out + r * D + p0, D, mr, false);
            simd::mac_tile<T, I>(ly, A + r * N + lx, N, 1, yc + p0, D, out + r * D + p0, D, mr, true);
        }
        return;
    }
    // last, partial panel: its columns copied into a zero-padded [N, NR] block first (a full
    // panel read would run past the end of the array), results through a [MR, NR] block
    const int64_t w = D - p0;
    T* bz = scratch;
    T* cz = scratch + N * NR;
    std::fill(bz, bz + N * NR, T(0));
    for (int64_t k = 0; k < N; ++k) std::memcpy(bz + k * NR, d.z(c, k) + p0, sizeof(T) * w);
    for (int64_t r = 0; r < len; r += MR) {
        const int mr = static_cast<int>(std::min<int64_t>(MR, len - r));
        simd::mac_tile<T, I>(N, A + r * N, N, 1, bz, NR, cz, NR, mr, false);
        for (int q = 0; q < mr; ++q) std::memcpy(out + (r + q) * D + p0, cz + q * NR, sizeof(T) * w);
    }
}

template <typename T, typename I>
D3FAST_INLINE void direct_grad(const Direct<T>& d, int64_t t, std::vector<T>& scratch) {
    const MMDArgs<T>& a = *d.a;
    const int64_t blocks = (a.D + DIRECT_COLS - 1) / DIRECT_COLS;
    const int64_t c = t / blocks, q0 = (t % blocks) * DIRECT_COLS, q1 = std::min(q0 + DIRECT_COLS, a.D);
    const int64_t lx = a.x_lengths[c], ly = a.y_lengths[c], N = lx + ly, D = a.D;
    const T* A = d.gram + c * d.nmax * d.nmax;
    constexpr int MR = I::MR, NR = I::NR;
    static_assert(DIRECT_COLS % NR == 0, "a task's columns are whole panels");
    // [N, NR] + [MR, NR] for a partial panel, then the side's rows of A times the scale
    scratch.resize(N * NR + MR * NR + std::max(lx, ly) * N);
    T* As = scratch.data() + N * NR + MR * NR;
    const T f = d.scale != nullptr ? static_cast<T>(d.scale[c]) : T(1);
    struct Side {
        T* out;
        int64_t rows, len, first;
    };
    const Side sides[2] = {{a.grad_x ? a.grad_x + c * a.nx * D : nullptr, a.nx, lx, 0},
                           {a.grad_y ? a.grad_y + c * a.ny * D : nullptr, a.ny, ly, lx}};
    for (const Side& s : sides) {
        if (s.out == nullptr) continue;
        // A is read-only here (a second backward reads it again): the scaled rows are a copy,
        // len x N values against the len x N x 256 multiply-adds of the block
        for (int64_t k = 0; k < s.len * N; ++k) As[k] = f * A[s.first * N + k];
        // the panel loop outside the row loop: one panel of Z (N x NR) stays in L1 for all rows
        for (int64_t p0 = q0; p0 < q1; p0 += NR) direct_grad_panel<T, I>(d, c, As, s.len, s.out, p0, scratch.data());
        for (int64_t i = s.len; i < s.rows; ++i) std::fill(s.out + i * D + q0, s.out + i * D + q1, T(0));
    }
}

// Entry points of the three phases per dtype; the float32 ones at each level (simd.h), below
// the OpenMP loops.
D3FAST_LEVELS(direct_gram_f32, (Direct<float>& d, int64_t t, std::vector<const float*>& zp),
              direct_gram<float, I>(d, t, zp);)
D3FAST_LEVELS(direct_kernel_f32, (Direct<float>& d, int64_t c), direct_kernel(d, c);)
D3FAST_LEVELS(direct_grad_f32, (const Direct<float>& d, int64_t t, std::vector<float>& s),
              direct_grad<float, I>(d, t, s);)
void direct_gram_f64(Direct<double>& d, int64_t t, std::vector<const double*>& zp) {
    direct_gram<double, simd::Ymm>(d, t, zp);
}
void direct_kernel_f64(Direct<double>& d, int64_t c) { direct_kernel(d, c); }
void direct_grad_f64(const Direct<double>& d, int64_t t, std::vector<double>& s) {
    direct_grad<double, simd::Ymm>(d, t, s);
}

// Phases 1-2 into d.gram (sized C * nmax^2 by the caller), losses into a.loss.
template <typename T, typename G, typename K>
void direct_weights(Direct<T>& d, G gram, K kernel) {
    const MMDArgs<T>& a = *d.a;
    for (int64_t c = 0; c < a.C; ++c) {
        for (int64_t i = 0; i < d.rows(c); i += DIRECT_ROWS) {
            d.task_class.push_back(c);
            d.task_start.push_back(i);
        }
    }
    const int64_t n_gram = static_cast<int64_t>(d.task_class.size());
#pragma omp parallel
    {
        std::vector<const T*> zp;
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < n_gram; ++t) gram(d, t, zp);
#pragma omp for schedule(dynamic, 1)
        for (int64_t c = 0; c < a.C; ++c) kernel(d, c);
    }
}

// Phase 3 from d.gram (A) into a.grad_x / a.grad_y.
template <typename T, typename R>
void direct_grads(const Direct<T>& d, R grad) {
    const MMDArgs<T>& a = *d.a;
    const int64_t n_grad = a.C * ((a.D + DIRECT_COLS - 1) / DIRECT_COLS);
#pragma omp parallel
    {
        std::vector<T> scratch;
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < n_grad; ++t) grad(d, t, scratch);
    }
}

template <typename T>
Direct<T> direct_of(const MMDArgs<T>& a, T* weights, const double* scale = nullptr) {
    Direct<T> d;
    d.a = &a;
    d.nmax = a.nx + a.ny;
    d.gram = weights;
    d.scale = scale;
    return d;
}

template <typename T, typename G, typename K, typename R>
void mmd_direct(const MMDArgs<T>& a, G gram, K kernel, R grad) {
    // pooled: at C = 200 the buffer is 2.9 MB, past malloc's mmap threshold, so a fresh one
    // would fault in every call
    const int64_t nmax = a.nx + a.ny;
    struct Pooled {
        void* p;
        ~Pooled() { pool_free(p); }
    } hold{pool_alloc(sizeof(T) * a.C * nmax * nmax)};
    Direct<T> d = direct_of(a, static_cast<T*>(hold.p));
    direct_weights(d, gram, kernel);
    if (a.grad_x != nullptr || a.grad_y != nullptr) direct_grads(d, grad);
}

}  // namespace

template <>
void mmd_weights<float>(const MMDArgs<float>& a, float* weights) {
    Direct<float> d = direct_of(a, weights);
    direct_weights(d, D3FAST_PICK(direct_gram_f32), D3FAST_PICK(direct_kernel_f32));
}
template <>
void mmd_weights<double>(const MMDArgs<double>& a, double* weights) {
    Direct<double> d = direct_of(a, weights);
    direct_weights(d, direct_gram_f64, direct_kernel_f64);
}
template <>
void mmd_weight_grads<float>(const MMDArgs<float>& a, const float* weights, const double* scale) {
    direct_grads(direct_of(a, const_cast<float*>(weights), scale), D3FAST_PICK(direct_grad_f32));
}
template <>
void mmd_weight_grads<double>(const MMDArgs<double>& a, const double* weights, const double* scale) {
    direct_grads(direct_of(a, const_cast<double*>(weights), scale), direct_grad_f64);
}

template <>
void mmd_forward<float>(const MMDArgs<float>& a) {
    if (a.nx + a.ny <= a.D)
        mmd_direct(a, D3FAST_PICK(direct_gram_f32), D3FAST_PICK(direct_kernel_f32), D3FAST_PICK(direct_grad_f32));
    else
        mmd_parallel(a, D3FAST_PICK(run_class_f32));
}
template <>
void mmd_forward<double>(const MMDArgs<double>& a) {
    if (a.nx + a.ny <= a.D)
        mmd_direct(a, direct_gram_f64, direct_kernel_f64, direct_grad_f64);
    else
        mmd_parallel(a, run_class_f64);
}

}  // namespace d3fast
