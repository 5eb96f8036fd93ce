"""The batched MMD^2 op: every implementation against the float64 reference, forward and
backward, on odd shapes, several dtypes, padded classes and strided inputs; the reference
itself against a double loop over pairs."""

import importlib.util
import itertools

import pytest
import torch

from d3fast import kernels
from d3fast.errors import D3FastError
from d3fast.kernels.mmd_ref import mmd2_ref
from tests._utils import assert_close
from tests.kernels.conftest import at_cpu_level, cpu_levels, device_for, impls

SHAPES = [  # C, n, m, D
    (1, 2, 2, 1),
    (3, 37, 5, 129),
    (2, 16, 16, 32),
    (4, 9, 23, 70),
    (2, 50, 51, 17),
]
# Error allowed relative to the largest value; for the loss, relative to the kernel terms it is
# a difference of (means of kernel values in [0, 5], >= 1 here), not to a loss that cancels to
# 1e-3. fp32: the outputs sum D <= 129 products and n + m <= 101 kernel values: float32's error
# bound for such sums, about (D + n + m) 2^-24 = 1.4e-5 of their terms, holds for any
# summation order; measured at most 0.07 of 2e-5 (every implementation, ATen default/avx2/
# avx512, oneDNN and MKL down to SSE4). fp64: the same bound is 3e-14; measured 1.6e-5 of
# 1e-10. Low precision follows flash-attention's rule: at most 2x the error of the fp32
# reference run on the same rounded inputs, + atol
RTOL = {torch.float32: 2e-5, torch.float64: 1e-10}
LOWP_ATOL = 1e-3


def term_scale(part: str, ref: torch.Tensor) -> float:
    """What an output's rounding is relative to: its largest value, and for the loss at least
    1 (the kernel terms it is a difference of)."""
    return max(float(ref.abs().max()), 1.0 if part == "loss" else 0.0)


def features(C, n, D, seed, shift=0.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    # scaled so that squared distances are O(1) to O(10) at every D: all 5 bandwidths matter
    return (torch.randn(C, n, D, generator=g) * (1.5 / D**0.5) + shift).to(dtype)


def run(impl, x, y, up, **kw):
    """Loss and gradients for a random upstream gradient `up` [C]."""
    x = x.detach().clone().requires_grad_(True)
    y = y.detach().clone().requires_grad_(True)
    loss = kernels.mmd2(x, y, impl=impl, **kw)
    (loss * up.to(loss.device, loss.dtype)).sum().backward()
    return loss.detach(), x.grad, y.grad


def check(name, impl, x, y, rtol, **kw):
    dev = device_for(impl)
    up = torch.randn(x.shape[0], generator=torch.Generator().manual_seed(1))
    ref = run("reference", x.double(), y.double(), up, **kw)
    out = run(impl, x.to(dev), y.to(dev), up, **kw)
    for part, r, o in zip(("loss", "dx", "dy"), ref, out, strict=True):
        assert o.dtype == (torch.float32 if part == "loss" and x.dtype != torch.float64 else x.dtype if part != "loss" else torch.float64)
        assert_close(f"{name} {part}", r, o.cpu(), atol=rtol * term_scale(part, r), rtol=0)


@pytest.mark.parametrize("impl", impls())
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("unbiased", [True, False], ids=["unbiased", "biased"])
def test_matches_reference_fp32(impl, shape, unbiased):
    C, n, m, D = shape
    x, y = features(C, n, D, 0), features(C, m, D, 1, shift=0.1)
    check(f"{impl} {shape}", impl, x, y, RTOL[torch.float32], unbiased=unbiased)


@pytest.mark.parametrize("impl", [p for p in impls() if p.values[0] != "triton"])
def test_float64_exact(impl):
    x, y = features(3, 37, 129, 0, dtype=torch.float64), features(3, 5, 129, 1, 0.1, dtype=torch.float64)
    check(impl, impl, x, y, RTOL[torch.float64])


@pytest.mark.parametrize("impl", impls())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision(impl, dtype):
    C, n, m, D = 3, 21, 19, 65
    x32, y32 = features(C, n, D, 0), features(C, m, D, 1, 0.1)
    truth = mmd2_ref(x32.double(), y32.double())
    x, y = x32.to(dtype), y32.to(dtype)
    torch_err = (mmd2_ref(x, y).double() - truth).abs().max()
    dev = device_for(impl)
    out = kernels.mmd2(x.to(dev), y.to(dev), impl=impl).cpu().double()
    assert (out - truth).abs().max() <= 2 * torch_err + LOWP_ATOL * truth.abs().max()
    # gradients in the input dtype, against the reference's on the same rounded inputs
    up = torch.randn(C, generator=torch.Generator().manual_seed(2))
    ref_g, out_g = run("reference", x, y, up), run(impl, x.to(dev), y.to(dev), up)
    for r, o in zip(ref_g[1:], out_g[1:], strict=True):
        assert o.dtype == dtype
        # the reference's own low-precision gradient is the floor here; 2e-2 of the largest value
        # is ~5 bf16 roundings (2^-8) of it (measured: 0.013 of it)
        assert_close(f"{impl} {dtype} grad", r.float(), o.float().cpu(), atol=2e-2 * float(r.float().abs().max()), rtol=0)


@pytest.mark.parametrize("impl", impls())
def test_uneven_class_sizes_equal_per_class_slices(impl):
    C, n, m, D = 3, 12, 10, 33
    x, y = features(C, n, D, 0), features(C, m, D, 1, 0.1)
    lx, ly = torch.tensor([12, 2, 7]), torch.tensor([3, 10, 5])
    # padding rows hold garbage: they must not leak into the loss or get gradient
    x[0, :0], x[1, 2:], x[2, 7:] = 0, 1e3, float("nan")
    y[0, 3:], y[2, 5:] = -1e3, float("nan")
    dev = device_for(impl)
    up = torch.randn(C, generator=torch.Generator().manual_seed(3))
    loss, gx, gy = run(impl, x.to(dev), y.to(dev), up, x_lengths=lx, y_lengths=ly)
    for c in range(C):
        xs, ys = x[c : c + 1, : lx[c]].double(), y[c : c + 1, : ly[c]].double()
        l_ref, gx_ref, gy_ref = run("reference", xs, ys, up[c : c + 1])
        rt = RTOL[torch.float32]
        assert_close(f"class {c} loss", l_ref, loss[c : c + 1].cpu(), atol=rt * term_scale("loss", l_ref), rtol=0)
        assert_close(f"class {c} dx", gx_ref, gx[c : c + 1, : lx[c]].cpu(), atol=rt * term_scale("dx", gx_ref), rtol=0)
        assert_close(f"class {c} dy", gy_ref, gy[c : c + 1, : ly[c]].cpu(), atol=rt * term_scale("dy", gy_ref), rtol=0)
        assert torch.all(gx[c, lx[c] :] == 0) and torch.all(gy[c, ly[c] :] == 0)


@pytest.mark.parametrize("impl", impls())
def test_strided_inputs(impl):
    C, n, m, D = 2, 13, 11, 40
    base_x = features(C, D, 2 * n, 0).transpose(1, 2)[:, ::2]  # [C, n, D], non-contiguous
    base_y = features(C, D, m, 1, 0.1).transpose(1, 2)
    assert not base_x.is_contiguous() and not base_y.is_contiguous()
    check(f"{impl} strided", impl, base_x, base_y, RTOL[torch.float32])


@pytest.mark.parametrize("impl", [p for p in impls() if p.values[0] != "triton"])
@pytest.mark.parametrize("unbiased", [True, False], ids=["unbiased", "biased"])
@pytest.mark.parametrize("D", [7, 12], ids=["tiled", "direct"])  # the C++ op's two paths: n + m > D, <= D
def test_float64_gradcheck(impl, unbiased, D):
    x = features(2, 5, D, 0, dtype=torch.float64).requires_grad_(True)
    y = features(2, 4, D, 1, 0.1, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: kernels.mmd2(a, b, impl=impl, unbiased=unbiased), (x, y))


@pytest.mark.parametrize("impl", [p for p in impls() if p.values[0] != "triton"])
def test_d3_shape_with_uneven_lengths(impl):
    # the shape D3 runs (30 samples a side, 2,048 ConvNet features; 2 of its classes), lengths
    # cutting both sides: the C++ op's direct path and the fallback's masked one
    x, y = features(2, 30, 2048, 0), features(2, 30, 2048, 1, 0.05)
    lengths = {"x_lengths": torch.tensor([30, 17]), "y_lengths": torch.tensor([23, 30])}
    check(f"{impl} d3 shape", impl, x, y, RTOL[torch.float32], **lengths)


@pytest.mark.parametrize("level", cpu_levels())
@pytest.mark.parametrize("D", [16, 4], ids=["direct", "tiled"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_a_non_finite_input_row_gives_a_nan_loss_as_the_reference_does(level, D, bad):
    # issue 31's breaker: `d2 > 0 ? d2 : 0` turned a NaN distance into 0, so a class with a
    # NaN or inf feature got a finite loss (only its gradient was NaN)
    x, y = features(2, 5, D, 0), features(2, 6, D, 1, 0.1)
    x[1, 2, 0] = bad
    ref = kernels.mmd2(x.double(), y.double(), impl="reference")
    with at_cpu_level(level):
        got = kernels.mmd2(x, y, impl="cpp")
    assert torch.isnan(ref[1]) and torch.isnan(got[1]), (ref, got)
    assert torch.isfinite(got[0]) and abs(float(got[0]) - float(ref[0])) <= RTOL[torch.float32] * 5


@pytest.mark.parametrize("level", cpu_levels())
def test_cpp_at_every_cpu_level_on_the_d3_shape(level):
    # each instruction-set build (Xmm, Ymm, Zmm register blocks: csrc/simd.h) on D3's shape,
    # uneven lengths and a D that leaves a partial panel at every block width (2,047 = 31 x 64
    # + 63), both estimators
    x, y = features(3, 30, 2047, 0), features(3, 30, 2047, 1, 0.05)
    lengths = {"x_lengths": torch.tensor([30, 17, 29]), "y_lengths": torch.tensor([23, 30, 30])}
    with at_cpu_level(level):
        for unbiased in (True, False):
            check(f"cpp at {level}", "cpp", x, y, RTOL[torch.float32], unbiased=unbiased, **lengths)


@pytest.mark.parametrize("impl", [p for p in impls() if p.values[0] != "triton"])
@pytest.mark.parametrize("D", [8, 16], ids=["tiled", "direct"])
def test_a_second_backward_through_a_retained_graph(impl, D):
    # tiled C++ path: each backward scales the saved unit-upstream gradients, which it must
    # not change; direct path: backward applies each upstream gradient to the saved weights,
    # which it must not change either
    x = features(3, 6, D, 0).requires_grad_(True)
    y = features(3, 5, D, 1, 0.1).requires_grad_(True)
    loss = kernels.mmd2(x, y, impl=impl)
    first = torch.autograd.grad((loss * torch.tensor([1.0, -2.0, 3.0])).sum(), (x, y), retain_graph=True)
    second = torch.autograd.grad((loss * torch.tensor([0.5, 4.0, -1.0])).sum(), (x, y))
    ref = kernels.mmd2(x.double(), y.double(), impl="reference")
    for weights, got in (([1.0, -2.0, 3.0], first), ([0.5, 4.0, -1.0], second)):
        want = torch.autograd.grad((ref * torch.tensor(weights, dtype=torch.float64)).sum(), (x, y), retain_graph=True)
        for g, w in zip(got, want, strict=True):
            # fp32 against float64, as RTOL (measured: 0.03 of it)
            assert_close(f"{impl} {weights}", w, g.double(), atol=1e-5 * float(w.abs().max()), rtol=0)


@pytest.mark.parametrize("impl", impls())
def test_a_bandwidth_scale_tensor_equals_scaled_bandwidths(impl):
    # the median heuristic's scale stays a device tensor: same loss and gradient as the
    # bandwidths multiplied on the host
    x, y = features(3, 11, 24, 0) * 3, features(3, 9, 24, 1, 0.1) * 3
    scale, bw = torch.tensor(2.5), (1.0, 2.0, 4.0)
    up = torch.randn(3, generator=torch.Generator().manual_seed(4))
    ref = run("reference", x.double(), y.double(), up, bandwidths=tuple(b * 2.5 for b in bw))
    dev = device_for(impl)
    out = run(impl, x.to(dev), y.to(dev), up, bandwidths=bw, bandwidth_scale=scale.to(dev))
    for part, r, o in zip(("loss", "dx", "dy"), ref, out, strict=True):
        assert_close(f"{impl} scaled {part}", r, o.cpu().double(), atol=RTOL[torch.float32] * term_scale(part, r), rtol=0)


def test_reference_equals_a_double_loop_over_pairs():
    x, y = features(1, 6, 5, 0, dtype=torch.float64)[0], features(1, 4, 5, 1, 0.1, dtype=torch.float64)[0]
    bw = (1.0, 3.0)

    def k(a, b):
        return sum(torch.exp(-((a - b) ** 2).sum() / (2 * s * s)) for s in bw)

    n, m = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i, j in itertools.product(range(n), repeat=2) if i != j) / (n * (n - 1))
    yy = sum(k(y[i], y[j]) for i, j in itertools.product(range(m), repeat=2) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(n) for j in range(m)) / (n * m)
    # float64 on both sides, 46 kernel values of one sign per mean: 1e-12 is 10^4 x float64's
    # rounding of such sums in any order (measured: 1.3e-7 of the allowance)
    assert torch.allclose(mmd2_ref(x[None], y[None], bw)[0], xx + yy - 2 * xy, rtol=1e-12)


def test_public_dispatch_matches_reference_and_mmd_is_zero_for_identical_sets():
    x = features(3, 8, 16, 0)
    # a float32 difference of kernel means of size ~5: a few roundings of 5 x 2^-24 (measured: 0.27 of 1e-6)
    assert torch.allclose(kernels.mmd2(x, x.clone(), unbiased=False), torch.zeros(3), atol=1e-6)
    y = features(3, 9, 16, 1, 0.5)
    assert torch.allclose(kernels.mmd2(x, y), mmd2_ref(x, y), rtol=1e-5, atol=1e-7)  # fp32 both (measured: 0.1 of it)


def test_float64_on_a_triton_device_takes_the_reference(monkeypatch):
    """distill.dtype=float64 on CUDA: both fused ops run their references, never a Triton
    compile; forcing impl="triton" on float64 is a clear error."""
    from d3fast.kernels.param_dist_ref import param_dist_ref

    monkeypatch.setattr(kernels, "backend", lambda t: "triton")  # what a CUDA tensor gets
    monkeypatch.setattr(kernels, "_triton", lambda op: pytest.fail(f"Triton's {op} was imported for float64"))
    x, y = features(3, 8, 16, 0, dtype=torch.float64), features(3, 9, 16, 1, 0.5, dtype=torch.float64)
    assert torch.equal(kernels.mmd2(x, y), mmd2_ref(x, y))
    a, t, s = x.flatten(1), y[:, :8].flatten(1), (x + 1).flatten(1)
    assert torch.equal(kernels.param_dist(a, t, s), param_dist_ref([a], [t], [s]))
    for call in (lambda: kernels.mmd2(x, y, impl="triton"), lambda: kernels.param_dist(a, t, s, impl="triton")):
        with pytest.raises(D3FastError, match="float64 runs on the reference"):
            call()


def test_bad_input_is_a_clear_error():
    x = torch.randn(2, 5, 8)
    with pytest.raises(D3FastError, match=">= 2 samples"):
        kernels.mmd2(x, torch.randn(2, 1, 8))
    with pytest.raises(D3FastError, match="equal C and D"):
        kernels.mmd2(x, torch.randn(2, 5, 9))
    with pytest.raises(D3FastError, match="x_lengths"):
        kernels.mmd2(x, x, x_lengths=torch.tensor([5, 6]))
    with pytest.raises(D3FastError, match=">= 2 samples"):
        kernels.mmd2(x, x, x_lengths=torch.tensor([5, 1]))
    with pytest.raises(D3FastError, match="bandwidths"):
        kernels.mmd2(x, x, bandwidths=())
    with pytest.raises(D3FastError, match="implementation"):
        kernels.mmd2(x, x, impl="cuda")
    # found by a breaker pass: each was a raw error, a silent acceptance or a NaN
    bad = [
        ({"y": torch.randn(2, 0, 8), "unbiased": False}, "none of them 0"),
        ({"x": torch.randn(0, 5, 8), "y": torch.randn(0, 5, 8), "x_lengths": torch.zeros(0, dtype=torch.long)},
         "none of them 0"),
        ({"x": torch.randn(2, 5, 8, dtype=torch.complex64)}, "real floating point"),
        ({"bandwidths": (float("nan"),)}, "finite positive bandwidths"),
        ({"bandwidths": 2.0}, "sequence of numbers"),
        ({"bandwidth_scale": torch.tensor(0.0)}, "finite and positive"),
        ({"bandwidth_scale": torch.tensor(-2.0)}, "finite and positive"),
        ({"bandwidth_scale": torch.ones(2)}, "one floating-point value"),
        ({"bandwidth_scale": "wide"}, "a number or a one-value tensor"),
        ({"x_lengths": torch.tensor([True, True])}, "x_lengths must be 2 integers"),
        # a second pass: shapes as given, devices, Triton on a CPU tensor outside the interpreter
        ({"y": torch.randn(3, 2, 5, 8)}, r"got \[2, 5, 8\] and \[3, 2, 5, 8\]"),
        ({"y": torch.randn(2, 5, 8, device="meta")}, "one device"),
    ]
    for kw, message in bad:
        args = {"x": x, "y": x, **kw}
        with pytest.raises(D3FastError, match=message):
            kernels.mmd2(args.pop("x"), args.pop("y"), **args)
    if importlib.util.find_spec("triton") is not None and not torch.cuda.is_available():
        with pytest.MonkeyPatch.context() as mp:
            mp.delenv("TRITON_INTERPRET", raising=False)
            with pytest.raises(D3FastError, match="Triton kernels take CUDA tensors"):
                kernels.mmd2(x, x, impl="triton")
    # a plain number is a scale like a tensor
    assert torch.equal(kernels.mmd2(x, x, bandwidth_scale=2.0), kernels.mmd2(x, x, bandwidth_scale=torch.tensor(2.0)))


@pytest.mark.parametrize("impl", [p for p in impls() if p.values[0] != "triton"])
def test_strided_and_expanded_lengths(impl):
    # a column of a [C, 2] table of counts is strided, an expanded tensor has stride 0: the C++
    # op read both as if contiguous (wrong lengths, silently) before they were made contiguous
    x, y = features(3, 6, 16, 0), features(3, 5, 16, 1, 0.1)
    counts = torch.tensor([[6, 2], [3, 5], [4, 4]])
    for lx, ly in ((counts[:, 0], counts[:, 1]), (torch.tensor([4]).expand(3), torch.tensor([3]).expand(3))):
        check(f"{impl} lengths strides {lx.stride()}", impl, x, y, RTOL[torch.float32], x_lengths=lx, y_lengths=ly)


@pytest.mark.parametrize("impl", impls())
@pytest.mark.parametrize("D", [6, 16], ids=["tiled", "direct"])
def test_double_backward_raises_instead_of_dropping_terms(impl, D):
    # the fused ops' backward is not itself differentiable: create_graph must not give a
    # gradient whose own gradient silently lacks the second-order terms
    dev = device_for(impl)
    x = features(2, 4, D, 0).to(dev).requires_grad_(True)
    y = features(2, 3, D, 1, 0.1).to(dev)
    loss = kernels.mmd2(x, y, impl=impl).sum()
    if impl == "reference":
        (gx,) = torch.autograd.grad(loss, x, create_graph=True)
        assert gx.requires_grad  # plain autograd: the second order exists
        return
    with pytest.raises(D3FastError, match="first-order only"):
        torch.autograd.grad(loss, x, create_graph=True)
    # without create_graph the same graph still gives the gradient
    assert torch.autograd.grad(loss, x)[0].shape == x.shape


@pytest.mark.parametrize("impl", [p for p in impls() if p.values[0] != "triton"])
@pytest.mark.parametrize("D", [6, 16], ids=["tiled", "direct"])
def test_changing_an_input_in_place_before_backward_raises(impl, D):
    x = features(2, 4, D, 0).requires_grad_(True)
    xa = x * 1.0
    loss = kernels.mmd2(xa, features(2, 3, D, 1, 0.1), impl=impl)
    xa.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.sum().backward()


@pytest.mark.skipif(not __import__("d3fast._ext", fromlist=["HAS_EXT"]).HAS_EXT, reason="d3fast._C not built")
def test_cpp_outputs_from_the_buffer_pool_are_fully_written_and_never_shared():
    # the C++ op hands out freed gradient buffers again (csrc/d3fast_core.cpp, pool_alloc):
    # a reused buffer must be overwritten everywhere, padding rows included, and two live
    # results must not share memory
    import numpy as np

    from d3fast._ext import _C

    C, n, m, D = 3, 20, 20, 64  # n + m <= D: the direct path
    x, y = features(C, n, D, 0).numpy(), features(C, m, D, 1, 0.1).numpy()
    full, gam = np.full(C, n, dtype=np.int64), [0.5, 0.125]
    first = _C.mmd(x, y, full, full, gam, True, True, True)
    second = _C.mmd(x, y, full, full, gam, True, True, True)
    assert not np.shares_memory(first[1], second[1]) and not np.shares_memory(first[2], second[2])
    del first, second  # both buffers back in the pool, holding nonzero gradients
    lx, ly = np.array([20, 5, 11]), np.array([3, 20, 8])
    _, gx, gy = _C.mmd(x, y, lx, ly, gam, True, True, True)
    assert all((gx[c, lx[c]:] == 0).all() and (gy[c, ly[c]:] == 0).all() for c in range(C))
    bw = tuple(1 / (2 * g) ** 0.5 for g in gam)
    xr = torch.from_numpy(x).double().requires_grad_(True)
    yr = torch.from_numpy(y).double().requires_grad_(True)
    loss = kernels.mmd2(xr, yr, bw, impl="reference", x_lengths=torch.from_numpy(lx), y_lengths=torch.from_numpy(ly))
    rx, ry = torch.autograd.grad(loss.sum(), (xr, yr))
    # fp32 against float64, as RTOL (measured: 0.02 of it)
    assert_close("pooled dx", rx, torch.from_numpy(gx).double(), atol=2e-5 * float(rx.abs().max()), rtol=0)
    assert_close("pooled dy", ry, torch.from_numpy(gy).double(), atol=2e-5 * float(ry.abs().max()), rtol=0)
    # trimming releases what the pool keeps (here at least the workspace of the last call)
    _C.pool_trim()
    del gx, gy
    assert _C.pool_trim() >= 2 * C * n * D * 4 and _C.pool_trim() == 0


@pytest.mark.parametrize("level", cpu_levels())
def test_cpp_matches_reference_on_random_shapes_and_lengths(level):
    # hypothesis over both C++ paths (n + m > D tiled, <= D direct: fused, and split into
    # forward and backward by autograd), at each instruction-set level, every register-block
    # and panel remainder (rows mod 3/4/6, D mod 4/8/16/64), uneven lengths, both estimators
    from hypothesis import given, settings
    from hypothesis import strategies as st

    @settings(max_examples=60, deadline=None, derandomize=True)
    @given(C=st.integers(1, 6), n=st.integers(2, 14), m=st.integers(2, 14), D=st.integers(1, 140),
           unbiased=st.booleans(), data=st.data())
    def prop(C, n, m, D, unbiased, data):
        lo = 2 if unbiased else 1
        lx = torch.tensor(data.draw(st.lists(st.integers(lo, n), min_size=C, max_size=C)))
        ly = torch.tensor(data.draw(st.lists(st.integers(lo, m), min_size=C, max_size=C)))
        x, y = features(C, n, D, n * 100 + D), features(C, m, D, m * 100 + D + 1, 0.1)
        kw = {"unbiased": unbiased, "x_lengths": lx, "y_lengths": ly}
        up = torch.randn(C, generator=torch.Generator().manual_seed(5))
        ref, out = run("reference", x.double(), y.double(), up, **kw), run("cpp", x, y, up, **kw)
        for part, r, o in zip(("loss", "dx", "dy"), ref, out, strict=True):
            assert_close(f"cpp C={C} n={n} m={m} D={D} {lx.tolist()} {ly.tolist()} {part}", r, o.double(),
                         atol=RTOL[torch.float32] * term_scale(part, r), rtol=0)

    with at_cpu_level(level):
        prop()


@pytest.mark.skipif(not __import__("d3fast._ext", fromlist=["HAS_EXT"]).HAS_EXT, reason="d3fast._C not built")
def test_cpp_weight_halves_refuse_mismatched_inputs():
    import numpy as np

    from d3fast._ext import _C

    x, y = features(2, 4, 16, 0).numpy(), features(2, 3, 16, 1).numpy()
    lx, ly = np.array([4, 4]), np.array([3, 3])
    loss, w = _C.mmd_weights(x, y, lx, ly, [0.5], True)
    assert w.shape == (2, 7, 7) and loss.shape == (2,)
    gx, gy = _C.mmd_weight_grads(w, x, y, lx, ly, np.ones(2), True, False)
    assert gx.shape == x.shape and gy is None
    with pytest.raises(ValueError, match="weights must be"):
        _C.mmd_weight_grads(w[:1], x, y, lx, ly, np.ones(2), True, False)
    with pytest.raises(ValueError, match="scale must be"):
        _C.mmd_weight_grads(w, x, y, lx, ly, np.ones(3), True, False)
    with pytest.raises(ValueError, match="wrong dtype"):
        _C.mmd_weight_grads(w.astype(np.float64), x, y, lx, ly, np.ones(2), True, False)
    with pytest.raises(ValueError, match="lengths"):
        _C.mmd_weights(x, y, np.array([5, 4]), ly, [0.5], True)


def _tf32(t: torch.Tensor) -> torch.Tensor:
    """fp32 rounded to TF32 as cvt.rna.tf32.f32 does: 10 mantissa bits, nearest, ties away."""
    return ((t.view(torch.int32) + 0x1000) & ~0x1FFF).view(torch.float32)


def _dot_3xtf32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b as Triton's input_precision="tf32x3" forms it: each side split into a TF32 head
    and a TF32 tail, the tail x tail product dropped, fp32 accumulation."""
    ah, bh = _tf32(a), _tf32(b)
    al, bl = _tf32(a - ah), _tf32(b - bh)
    return al @ bh + ah @ bl + ah @ bh


def _mmd_through(dot, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss [C] and dL/dZ [C, N, D] (unbiased, bandwidths 1..16) as the Triton kernels form
    them, with their two matrix products (Gram, W @ Z) done by `dot`."""
    z = torch.cat([x, y], 1)
    N, n = z.shape[1], x.shape[1]
    m = N - n
    sq = (z * z).sum(-1)
    d2 = (sq[:, :, None] + sq[:, None, :] - 2 * dot(z, z.transpose(1, 2))).clamp_min(0)
    eye = torch.eye(N, dtype=torch.bool)
    isx = torch.arange(N) < n
    coef = torch.where(isx[:, None] & isx[None, :], 1 / (n * (n - 1)),
                       torch.where(~isx[:, None] & ~isx[None, :], 1 / (m * (m - 1)), -1 / (n * m)))
    coef = coef.masked_fill(eye, 0).to(z.dtype)
    d2 = d2.masked_fill(eye, 0)
    gam = [1 / (2 * s * s) for s in kernels.DEFAULT_BANDWIDTHS]
    k = sum(torch.exp(-g * d2) for g in gam)
    w = coef * sum(g * torch.exp(-g * d2) for g in gam)
    return (coef * k).sum((1, 2)), -4 * (w.sum(-1, keepdim=True) * z - dot(w, z))


def test_3xtf32_keeps_the_fp32_error_and_tf32_alone_would_not():
    """The fp32 Triton path's tensor-core products (3xTF32), emulated bit for bit in PyTorch at
    D3's shape, against float64: the worst loss and gradient error stays within 4x the plain
    fp32 computation's own (measured: at most 1.25x, over these seeds, both feature kinds and
    ATen default/avx2/avx512); plain TF32, the default of an fp32 tl.dot, is 250x to 1,400x
    off, so the comparison can fail."""
    plain = torch.matmul
    for kind in ("unit", "relu+offset"):
        errors: dict[str, list[float]] = {"fp32": [], "3xtf32": [], "tf32": []}
        for seed in range(4):
            g = torch.Generator().manual_seed(seed)
            if kind == "unit":
                x = features(2, 30, 2048, seed)
            else:  # the worse case for ||a||^2 + ||b||^2 - 2 <a, b>
                x = (torch.randn(2, 30, 2048, generator=g) * 0.05 + 0.3).relu()
            y = x + 1e-2 * x.std() * torch.randn(2, 30, 2048, generator=g)  # a second side close to the first
            l64, g64 = _mmd_through(plain, x.double(), y.double())
            for name, dot in (("fp32", plain), ("3xtf32", _dot_3xtf32), ("tf32", lambda a, b: _tf32(a) @ _tf32(b))):
                loss, grad = _mmd_through(dot, x, y)
                errors[name].append(max(float((loss.double() - l64).abs().max()) / max(float(l64.abs().max()), 1.0),
                                        float((grad.double() - g64).abs().max() / g64.abs().max())))
        worst = {k: max(v) for k, v in errors.items()}
        assert worst["3xtf32"] <= 4 * worst["fp32"] < worst["tf32"], (kind, worst)


@pytest.mark.parametrize("impl", [p for p in impls() if p.values[0] == "triton"])
def test_triton_split_over_features_is_exact_deterministic_and_leaves_its_counters_at_zero(impl):
    """A shape the launcher splits over D (and over several tiles on the interpreter's 16-row
    tiles): same as the reference, bitwise the same on a second run, and the ticket counters
    that find each tile's last split are all zero afterwards (the next launch relies on it)."""
    from d3fast.kernels._autograd import tickets
    from d3fast.kernels.mmd_triton import plan

    dev = device_for(impl)
    C, n, m, D = 3, 37, 5, 129
    assert plan(C, n + m, D, dev)["SPLIT"] > 1
    x, y = features(C, n, D, 0), features(C, m, D, 1, 0.1)
    check(f"{impl} split", impl, x, y, RTOL[torch.float32])
    up = torch.randn(C, generator=torch.Generator().manual_seed(1))
    first, second = run(impl, x.to(dev), y.to(dev), up), run(impl, x.to(dev), y.to(dev), up)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    with tickets(dev, 1) as counters:
        assert int(counters.abs().sum()) == 0
