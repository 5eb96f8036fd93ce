// Core C++ routines of d3fast, free of Python headers so they can be tested and
// reused on their own; bindings.cpp exposes them as d3fast._C.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace d3fast {

struct BuildInfo {
    std::string version;
    std::string compiler;
    int openmp_threads;  // 0 when built without OpenMP
    std::string simd;    // vector ISA the hot kernels run with on this CPU
};

BuildInfo build_info();

// Instruction-set levels of the float32 CPU kernels (csrc/simd.h: each hot entry point is
// compiled once per level). best_cpu_isa() is the highest this CPU and its OS support (AVX-512
// counts only with F, VL, BW and DQ and the OS saving ZMM state); default_cpu_isa() the
// fastest measured for it (the best, but AVX2 on Zen 4); cpu_isa() the one the kernels run at:
// the default unless set_cpu_isa chose another (tests and benchmarks run every level;
// D3FAST_CPU_ISA through d3fast._ext). Other architectures have only the baseline.
enum class Isa : int { baseline = 0, avx2 = 1, avx512 = 2 };
Isa best_cpu_isa();
Isa default_cpu_isa();
Isa cpu_isa();
void set_cpu_isa(Isa level);      // throws std::invalid_argument above best_cpu_isa()
const char* isa_name(Isa level);  // "baseline", "avx2", "avx512"

// One of three builds of an entry point, by cpu_isa() (read per call: a switch is atomic).
template <typename F>
F by_isa(F baseline, F avx2, F avx512) {
    switch (cpu_isa()) {
        case Isa::avx512:
            return avx512;
        case Isa::avx2:
            return avx2;
        default:
            return baseline;
    }
}

// Large buffers handed out again instead of returned to the system (csrc/d3fast_core.cpp):
// the kernels' outputs and workspaces are fresh each call and fully written, so memory the
// allocator got back from the OS costs a page fault per 4 KiB at first touch (~3.5 us each on
// the 2-core VM: 580 faults added 2.0 ms to a 3.4 ms MMD call at (10, 30, 30, 2048)). A
// training loop asks for the same sizes every step; the pool keeps the last 8 freed buffers
// (256 MiB at most, the oldest released first) and reuses one of the exact size. 64-byte
// aligned; thread-safe.
void* pool_alloc(size_t bytes);
void pool_free(void* p);  // p from pool_alloc (or null)
size_t pool_trim();       // releases every kept buffer; returns the bytes released

// Batched multi-kernel MMD^2 (csrc/mmd.cpp; math in kernels/mmd_ref.py). x: [C, nx, D] and
// y: [C, ny, D] row-major; class c uses its first x_lengths[c] / y_lengths[c] rows. Writes
// loss[c] and, where grad_x / grad_y are not null, dloss[c]/dx and dloss[c]/dy (same shapes
// as x and y, zero past the lengths).
template <typename T>
struct MMDArgs {
    const T* x;
    const T* y;
    int64_t C, nx, ny, D;
    const int64_t* x_lengths;
    const int64_t* y_lengths;
    const double* gammas;  // the mixture's 1 / (2 sigma^2), at most 16
    int num_gammas;
    bool unbiased;
    T* loss;    // [C]
    T* grad_x;  // [C, nx, D] or nullptr
    T* grad_y;  // [C, ny, D] or nullptr
};

template <typename T>
void mmd_forward(const MMDArgs<T>& args);

// The same in two halves, for classes with nx + ny <= D or any others (memory C (nx+ny)^2):
// mmd_weights writes loss[c] and the gradient weights A_c = 4 (W - diag(sum_j W_ij)) of class
// c into weights [C, nx + ny, nx + ny] (an N_c x N_c row-major block at c (nx+ny)^2, N_c =
// x_lengths[c] + y_lengths[c]); grad_x / grad_y are ignored. mmd_weight_grads then writes
// grad_x[c] = scale[c] A_c[:lx] [X_c; Y_c] and grad_y[c] = scale[c] A_c[lx:] [X_c; Y_c]
// (where not null; scale null: 1), zero past the lengths; weights are only read.
template <typename T>
void mmd_weights(const MMDArgs<T>& args, T* weights);
template <typename T>
void mmd_weight_grads(const MMDArgs<T>& args, const T* weights, const double* scale);

// Trajectory-parameter distance over segments of flat parameter vectors (csrc/
// param_dist.cpp). Segment k holds a[k], t[k], s[k], each [S, sizes[k]] row-major.
// Sums per student: num[S] += ||a - t||^2 and den[S] += ||s - t||^2, in double.
template <typename T>
void param_dist_sums(const std::vector<const T*>& a, const std::vector<const T*>& t,
                         const std::vector<const T*>& s, const std::vector<int64_t>& sizes, int64_t S,
                         double* num, double* den);

// Gradients of L_r = num_r / den_r scaled by go[r], per segment; null outputs are skipped:
//   dL/da = 2 (a - t) / den,  dL/ds = -2 num (s - t) / den^2,  dL/dt = -(dL/da + dL/ds).
template <typename T>
void param_dist_grads(const std::vector<const T*>& a, const std::vector<const T*>& t,
                          const std::vector<const T*>& s, const std::vector<int64_t>& sizes, int64_t S,
                          const double* num, const double* den, const double* go,
                          const std::vector<T*>& grad_a, const std::vector<T*>& grad_t,
                          const std::vector<T*>& grad_s);

}  // namespace d3fast
