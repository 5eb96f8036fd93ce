#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <stdexcept>
#include <string>
#include <tuple>
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

template <typename T>
py::tuple mmd_typed(const py::array& x, const py::array& y, const py::array_t<int64_t>& lx,
                    const py::array_t<int64_t>& ly, const std::vector<double>& gammas, bool unbiased, bool grad_x,
                    bool grad_y) {
    if (x.ndim() != 3 || y.ndim() != 3 || x.shape(0) != y.shape(0) || x.shape(2) != y.shape(2))
        throw std::invalid_argument("mmd: x [C, nx, D] and y [C, ny, D] must agree in C and D");
    if (gammas.empty() || gammas.size() > 16) throw std::invalid_argument("mmd: 1 to 16 bandwidths");
    const int64_t C = x.shape(0), nx = x.shape(1), ny = y.shape(1), D = x.shape(2);
    if (lx.size() != C || ly.size() != C) throw std::invalid_argument("mmd: one length per class");
    d3fast::MMDArgs<T> a{};
    a.x = data_of<T>(x, "x");
    a.y = data_of<T>(y, "y");
    a.C = C;
    a.nx = nx;
    a.ny = ny;
    a.D = D;
    a.x_lengths = lx.data();
    a.y_lengths = ly.data();
    for (int64_t c = 0; c < C; ++c) {
        if (a.x_lengths[c] < 1 || a.x_lengths[c] > nx || a.y_lengths[c] < 1 || a.y_lengths[c] > ny)
            throw std::invalid_argument("mmd: lengths must be in [1, rows]");
    }
    a.gammas = gammas.data();
    a.num_gammas = static_cast<int>(gammas.size());
    a.unbiased = unbiased;
    py::array_t<T> loss(C);
    a.loss = loss.mutable_data();
    py::object gx = py::none(), gy = py::none();
    if (grad_x) {
        auto g = pooled_array<T>({C, nx, D});
        a.grad_x = g.mutable_data();
        gx = g;
    }
    if (grad_y) {
        auto g = pooled_array<T>({C, ny, D});
        a.grad_y = g.mutable_data();
        gy = g;
    }
    {
        py::gil_scoped_release nogil;
        d3fast::mmd_forward<T>(a);
    }
    return py::make_tuple(loss, gx, gy);
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
        "mmd",
        [](const py::array& x, const py::array& y, const py::array_t<int64_t>& x_lengths,
           const py::array_t<int64_t>& y_lengths, const std::vector<double>& gammas, bool unbiased, bool grad_x,
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
