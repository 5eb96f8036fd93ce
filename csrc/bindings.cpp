#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "d3fast_core.h"

namespace py = pybind11;

namespace {

// The kernels take raw row-major buffers: refuse anything else instead of copying silently.
template <typename T>
const T* data_of(const py::array& a, const char* name) {
    if (!py::isinstance<py::array_t<T>>(a)) throw std::invalid_argument(std::string(name) + ": wrong dtype");
    if (!(a.flags() & py::array::c_style)) throw std::invalid_argument(std::string(name) + ": not C-contiguous");
    return static_cast<const T*>(a.data());
}

// A fresh C-contiguous array of the given shape from d3fast's buffer pool (see pool_alloc).
template <typename T>
py::array_t<T> pooled_array(const std::vector<py::ssize_t>& shape) {
    size_t n = 1;
    for (const auto s : shape) n *= static_cast<size_t>(s);
    void* p = d3fast::pool_alloc(n * sizeof(T));
    py::capsule owner(p, [](void* q) { d3fast::pool_free(q); });
    return py::array_t<T>(shape, static_cast<T*>(p), owner);
}

// Per-class row counts: pybind11 copies a strided or other-typed array into a contiguous int64
// one (a column of a [C, 2] table would otherwise be read as if it were contiguous).
using Lengths = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;

// The arguments every MMD entry point checks: shapes, dtype, layout, lengths, bandwidths.
template <typename T>
d3fast::MMDArgs<T> mmd_args(const py::array& x, const py::array& y, const Lengths& lx,
                            const Lengths& ly) {
    if (x.ndim() != 3 || y.ndim() != 3 || x.shape(0) != y.shape(0) || x.shape(2) != y.shape(2))
        throw std::invalid_argument("mmd: x [C, nx, D] and y [C, ny, D] must agree in C and D");
    const int64_t C = x.shape(0);
    if (lx.size() != C || ly.size() != C) throw std::invalid_argument("mmd: one length per class");
    d3fast::MMDArgs<T> a{};
    a.x = data_of<T>(x, "x");
    a.y = data_of<T>(y, "y");
    a.C = C;
    a.nx = x.shape(1);
    a.ny = y.shape(1);
    a.D = x.shape(2);
    a.x_lengths = lx.data();
    a.y_lengths = ly.data();
    for (int64_t c = 0; c < C; ++c) {
        if (a.x_lengths[c] < 1 || a.x_lengths[c] > a.nx || a.y_lengths[c] < 1 || a.y_lengths[c] > a.ny)
            throw std::invalid_argument("mmd: lengths must be in [1, rows]");
    }
    return a;
}

// mmd_args plus the kernel's bandwidths (gammas must outlive the call) and a loss output.
template <typename T>
std::pair<d3fast::MMDArgs<T>, py::array_t<T>> mmd_loss_args(const py::array& x, const py::array& y,
                                                              const Lengths& lx,
                                                              const Lengths& ly,
                                                              const std::vector<double>& gammas, bool unbiased) {
    if (gammas.empty() || gammas.size() > 16) throw std::invalid_argument("mmd: 1 to 16 bandwidths");
    auto a = mmd_args<T>(x, y, lx, ly);
    a.gammas = gammas.data();
    a.num_gammas = static_cast<int>(gammas.size());
    a.unbiased = unbiased;
    py::array_t<T> loss(a.C);
    a.loss = loss.mutable_data();
    return {a, loss};
}

// Gradient outputs where wanted (None where not), pointers set in a.
template <typename T>
std::pair<py::object, py::object> mmd_grad_outputs(d3fast::MMDArgs<T>& a, bool grad_x, bool grad_y) {
    py::object gx = py::none(), gy = py::none();
    if (grad_x) {
        auto g = pooled_array<T>({a.C, a.nx, a.D});
        a.grad_x = g.mutable_data();
        gx = g;
    }
    if (grad_y) {
        auto g = pooled_array<T>({a.C, a.ny, a.D});
        a.grad_y = g.mutable_data();
        gy = g;
    }
    return {gx, gy};
}

template <typename T>
py::tuple mmd_typed(const py::array& x, const py::array& y, const Lengths& lx,
                    const Lengths& ly, const std::vector<double>& gammas, bool unbiased, bool grad_x,
                    bool grad_y) {
    auto [a, loss] = mmd_loss_args<T>(x, y, lx, ly, gammas, unbiased);
    auto [gx, gy] = mmd_grad_outputs(a, grad_x, grad_y);
    {
        py::gil_scoped_release nogil;
        d3fast::mmd_forward<T>(a);
    }
    return py::make_tuple(loss, gx, gy);
}

template <typename T>
py::tuple mmd_weights_typed(const py::array& x, const py::array& y, const Lengths& lx,
                            const Lengths& ly, const std::vector<double>& gammas, bool unbiased) {
    auto [a, loss] = mmd_loss_args<T>(x, y, lx, ly, gammas, unbiased);
    auto w = pooled_array<T>({a.C, a.nx + a.ny, a.nx + a.ny});
    T* wp = w.mutable_data();
    {
        py::gil_scoped_release nogil;
        d3fast::mmd_weights<T>(a, wp);
    }
    return py::make_tuple(loss, w);
}

template <typename T>
py::tuple mmd_weight_grads_typed(const py::array& weights, const py::array& x, const py::array& y,
                                 const Lengths& lx, const Lengths& ly,
                                 const py::array_t<double>& scale, bool grad_x, bool grad_y) {
    auto a = mmd_args<T>(x, y, lx, ly);
    const int64_t N = a.nx + a.ny;
    if (weights.ndim() != 3 || weights.shape(0) != a.C || weights.shape(1) != N || weights.shape(2) != N)
        throw std::invalid_argument("mmd_weight_grads: weights must be [C, nx + ny, nx + ny]");
    if (scale.ndim() != 1 || scale.shape(0) != a.C || !(scale.flags() & py::array::c_style))
        throw std::invalid_argument("mmd_weight_grads: scale must be [C] contiguous float64");
    const T* w = data_of<T>(weights, "weights");
    auto [gx, gy] = mmd_grad_outputs(a, grad_x, grad_y);
    {
        py::gil_scoped_release nogil;
        d3fast::mmd_weight_grads<T>(a, w, scale.data());
    }
    return py::make_tuple(gx, gy);
}

template <typename T>
struct Segments {
    std::vector<const T*> a, t, s;
    std::vector<int64_t> sizes;
    int64_t S = 0;
};

template <typename T>
Segments<T> segments_of(const py::list& a, const py::list& t, const py::list& s) {
    if (a.size() != t.size() || a.size() != s.size() || a.size() == 0)
        throw std::invalid_argument("param_dist: a, target and start need the same number of segments");
    Segments<T> seg;
    for (size_t k = 0; k < a.size(); ++k) {
        const py::array ak = a[k], tk = t[k], sk = s[k];
        if (ak.ndim() != 2 || tk.ndim() != 2 || sk.ndim() != 2)
            throw std::invalid_argument("param_dist: segments are [S, P_k]");
        for (const py::array* o : {&tk, &sk}) {
            if (o->shape(0) != ak.shape(0) || o->shape(1) != ak.shape(1))
                throw std::invalid_argument("param_dist: a, target and start segments differ in shape");
        }
        if (k == 0) seg.S = ak.shape(0);
        if (ak.shape(0) != seg.S) throw std::invalid_argument("param_dist: segments differ in S");
        seg.a.push_back(data_of<T>(ak, "a"));
        seg.t.push_back(data_of<T>(tk, "target"));
        seg.s.push_back(data_of<T>(sk, "start"));
        seg.sizes.push_back(ak.shape(1));
    }
    return seg;
}

template <typename T>
py::tuple sums_typed(const py::list& a, const py::list& t, const py::list& s) {
    const auto seg = segments_of<T>(a, t, s);
    py::array_t<double> num(seg.S), den(seg.S);
    double* n = num.mutable_data();
    double* d = den.mutable_data();
    {
        py::gil_scoped_release nogil;
        d3fast::param_dist_sums<T>(seg.a, seg.t, seg.s, seg.sizes, seg.S, n, d);
    }
    return py::make_tuple(num, den);
}

template <typename T>
py::tuple grads_typed(const py::list& a, const py::list& t, const py::list& s, const py::array_t<double>& num,
                      const py::array_t<double>& den, const py::array_t<double>& go, bool want_a, bool want_t,
                      bool want_s) {
    const auto seg = segments_of<T>(a, t, s);
    if (num.size() != seg.S || den.size() != seg.S || go.size() != seg.S)
        throw std::invalid_argument("param_dist: num, den and grad_output need S values");
    std::vector<T*> ga, gt, gs;
    py::list out_a, out_t, out_s;
    auto alloc = [&](bool want, std::vector<T*>& ptrs, py::list& out) {
        for (size_t k = 0; k < seg.sizes.size(); ++k) {
            if (!want) {
                ptrs.push_back(nullptr);
                continue;
            }
            auto g = pooled_array<T>({seg.S, seg.sizes[k]});
            ptrs.push_back(g.mutable_data());
            out.append(g);
        }
    };
    alloc(want_a, ga, out_a);
    alloc(want_t, gt, out_t);
    alloc(want_s, gs, out_s);
    {
        py::gil_scoped_release nogil;
        d3fast::param_dist_grads<T>(seg.a, seg.t, seg.s, seg.sizes, seg.S, num.data(), den.data(), go.data(),
                                        ga, gt, gs);
    }
    auto or_none = [](bool want, py::list& l) -> py::object { return want ? py::object(l) : py::object(py::none()); };
    return py::make_tuple(or_none(want_a, out_a), or_none(want_t, out_t), or_none(want_s, out_s));
}

bool is_f64(const py::array& a) { return py::isinstance<py::array_t<double>>(a); }

}  // namespace

PYBIND11_MODULE(_C, m) {
    m.doc() = "d3fast C++ extension: CPU implementations of d3fast's fused ops.";
    m.attr("__version__") = D3FAST_VERSION;

    m.def(
        "build_info",
        []() {
            const auto info = d3fast::build_info();
            py::dict out;
            out["version"] = info.version;
            out["compiler"] = info.compiler;
            out["openmp_threads"] = info.openmp_threads;
            out["simd"] = info.simd;
            return out;
        },
        "How this extension was built.\n\n"
        "Returns:\n"
        "    dict with keys version (str), compiler (str), openmp_threads (int, 0 without\n"
        "    OpenMP) and simd (str, the vector ISA the kernels run with on this CPU).");

    m.def(
        "cpu_isa", []() { return std::string(d3fast::isa_name(d3fast::cpu_isa())); },
        "The instruction-set level the float32 kernels run at now.\n\n"
        "Returns:\n"
        "    str, one of cpu_isas().");
    m.def(
        "cpu_isas",
        []() {
            std::vector<std::string> out;
            for (int l = 0; l <= static_cast<int>(d3fast::best_cpu_isa()); ++l)
                out.emplace_back(d3fast::isa_name(static_cast<d3fast::Isa>(l)));
            return out;
        },
        "The levels this CPU and OS can run, lowest first: \"baseline\" (SSE2 on x86-64),\n"
        "\"avx2\" (x86-64-v3: AVX2+FMA), \"avx512\" (x86-64-v4: AVX-512 F, VL, BW, DQ).\n\n"
        "Returns:\n"
        "    list of str.");
    m.def(
        "set_cpu_isa",
        [](const std::string& name) {
            for (int l = 0; l <= static_cast<int>(d3fast::Isa::avx512); ++l) {
                const auto level = static_cast<d3fast::Isa>(l);
                if (name == d3fast::isa_name(level)) {
                    try {
                        d3fast::set_cpu_isa(level);
                    } catch (const std::invalid_argument& e) {
                        throw py::value_error(e.what());
                    }
                    return;
                }
            }
            throw py::value_error("unknown instruction-set level '" + name + "' (baseline, avx2 or avx512)");
        },
        py::arg("level"),
        "Runs the float32 kernels at `level` from now on (process-wide). The default is the\n"
        "fastest measured for this CPU: the last of cpu_isas(), but avx2 on AMD Zen 4, whose\n"
        "512-bit operations run as two 256-bit halves. For tests, benchmarks and D3FAST_CPU_ISA.\n\n"
        "Raises:\n"
        "    ValueError: an unknown level, or one this CPU cannot run.");

    m.def(
        "pool_trim", []() { return d3fast::pool_trim(); },
        "Releases the freed output and workspace buffers the kernels keep for reuse (at most 8,\n"
        "256 MiB; see csrc/d3fast_core.h).\n\n"
        "Returns:\n"
        "    int, the bytes released.");

    m.def(
        "mmd",
        [](const py::array& x, const py::array& y, const Lengths& x_lengths,
           const Lengths& y_lengths, const std::vector<double>& gammas, bool unbiased, bool grad_x,
           bool grad_y) {
            return is_f64(x) ? mmd_typed<double>(x, y, x_lengths, y_lengths, gammas, unbiased, grad_x, grad_y)
                             : mmd_typed<float>(x, y, x_lengths, y_lengths, gammas, unbiased, grad_x, grad_y);
        },
        py::arg("x"), py::arg("y"), py::arg("x_lengths"), py::arg("y_lengths"), py::arg("gammas"),
        py::arg("unbiased"), py::arg("grad_x"), py::arg("grad_y"),
        "Per-class MMD^2 with a Gaussian mixture kernel, and its gradient in the same pass.\n\n"
        "Args:\n"
        "    x: [C, nx, D] float32 or float64, C-contiguous.\n"
        "    y: [C, ny, D], same dtype.\n"
        "    x_lengths, y_lengths: [C] int64, rows used per class (1..nx, 1..ny).\n"
        "    gammas: the kernels' 1 / (2 sigma^2), 1 to 16 of them.\n"
        "    unbiased: leave out the i = j terms of the within-sample means.\n"
        "    grad_x, grad_y: also return dloss[c]/dx and dloss[c]/dy.\n"
        "Returns:\n"
        "    (loss [C], grad_x [C, nx, D] or None, grad_y [C, ny, D] or None); gradient rows past\n"
        "    the lengths are 0.\n"
        "Raises:\n"
        "    ValueError: wrong shapes, dtype, layout or lengths.");

    m.def(
        "mmd_weights",
        [](const py::array& x, const py::array& y, const Lengths& x_lengths,
           const Lengths& y_lengths, const std::vector<double>& gammas, bool unbiased) {
            return is_f64(x) ? mmd_weights_typed<double>(x, y, x_lengths, y_lengths, gammas, unbiased)
                             : mmd_weights_typed<float>(x, y, x_lengths, y_lengths, gammas, unbiased);
        },
        py::arg("x"), py::arg("y"), py::arg("x_lengths"), py::arg("y_lengths"), py::arg("gammas"),
        py::arg("unbiased"),
        "The first half of mmd: the loss and the gradient weights, for a backward that applies\n"
        "the upstream gradient (mmd_weight_grads).\n\n"
        "Args: as mmd.\n"
        "Returns:\n"
        "    (loss [C], weights [C, nx + ny, nx + ny]): class c's weights A_c = 4 (W - diag(sum_j W_ij))\n"
        "    fill the first N_c x N_c values of its block, row-major, N_c = x_lengths[c] + y_lengths[c].\n"
        "    Memory: C (nx + ny)^2 values, no more than x and y when nx + ny <= D.\n"
        "Raises:\n"
        "    ValueError: wrong shapes, dtype, layout or lengths.");

    m.def(
        "mmd_weight_grads",
        [](const py::array& weights, const py::array& x, const py::array& y, const Lengths& x_lengths,
           const Lengths& y_lengths, const py::array_t<double>& scale, bool grad_x, bool grad_y) {
            return is_f64(x) ? mmd_weight_grads_typed<double>(weights, x, y, x_lengths, y_lengths, scale, grad_x, grad_y)
                             : mmd_weight_grads_typed<float>(weights, x, y, x_lengths, y_lengths, scale, grad_x, grad_y);
        },
        py::arg("weights"), py::arg("x"), py::arg("y"), py::arg("x_lengths"), py::arg("y_lengths"), py::arg("scale"),
        py::arg("grad_x"), py::arg("grad_y"),
        "The second half of mmd: scale[c] dloss[c]/dx and scale[c] dloss[c]/dy from mmd_weights's\n"
        "weights and the same x, y and lengths.\n\n"
        "Args:\n"
        "    weights: [C, nx + ny, nx + ny] from mmd_weights (only read).\n"
        "    scale: [C] float64, the upstream gradient.\n"
        "Returns:\n"
        "    (grad_x [C, nx, D] or None, grad_y [C, ny, D] or None), zero past the lengths.\n"
        "Raises:\n"
        "    ValueError: wrong shapes, dtype, layout or lengths.");

    m.def(
        "param_dist_sums",
        [](const py::list& a, const py::list& t, const py::list& s) {
            const py::array first = a[0];
            return is_f64(first) ? sums_typed<double>(a, t, s) : sums_typed<float>(a, t, s);
        },
        py::arg("a"), py::arg("target"), py::arg("start"),
        "||a - target||^2 and ||start - target||^2 per student, in one pass.\n\n"
        "Args:\n"
        "    a, target, start: lists of segments, segment k [S, P_k] float32 or float64,\n"
        "        C-contiguous, the same shapes on all three.\n"
        "Returns:\n"
        "    (num [S] float64, den [S] float64).");

    m.def(
        "param_dist_grads",
        [](const py::list& a, const py::list& t, const py::list& s, const py::array_t<double>& num,
           const py::array_t<double>& den, const py::array_t<double>& grad_output, bool want_a, bool want_t,
           bool want_s) {
            const py::array first = a[0];
            return is_f64(first) ? grads_typed<double>(a, t, s, num, den, grad_output, want_a, want_t, want_s)
                                 : grads_typed<float>(a, t, s, num, den, grad_output, want_a, want_t, want_s);
        },
        py::arg("a"), py::arg("target"), py::arg("start"), py::arg("num"), py::arg("den"), py::arg("grad_output"),
        py::arg("want_a"), py::arg("want_target"), py::arg("want_start"),
        "Gradients of grad_output[r] * num[r] / den[r] for the segments of a, target and start.\n\n"
        "Returns:\n"
        "    (grads of a, of target, of start): each a list of [S, P_k] arrays, or None when not\n"
        "    wanted.");
}
