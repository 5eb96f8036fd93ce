"""The trajectory-parameter distance: every implementation against an explicit float64
formula, forward and every gradient, over flat, batched and segmented inputs."""

import importlib.util

import pytest
import torch

from d3fast import kernels
from d3fast.errors import D3FastError
from tests._utils import assert_close
from tests.kernels.conftest import at_cpu_level, cpu_levels, device_for, impls

# P values: 1, odd, a few Triton blocks on CPU (64 x 2), and more than one C++ chunk (2^17)
SIZES = [1, 7, 1000, 4097, (1 << 17) + 3]
# Tolerances, against float64 formulas. The loss is a ratio of two sums of squares (terms of
# one sign): the C++ op sums in float64, the reference and Triton in float32 trees (torch's
# cascade sum, tl.sum), whose error bound ~log2(P) 2^-24 = 1e-6 holds for any order; the output
# is rounded to float32 once more (6e-8). The gradients are elementwise (no summation order at
# all) from those two sums. Measured usage of each tolerance is noted beside it (every
# implementation, ATen default/avx2/avx512, oneDNN and MKL down to SSE4).


def vectors(shape, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g)
    # a ends near t (a student close to the target), s further away: L ~ 0.1
    return (t + 0.3 * torch.randn(shape, generator=g)).to(dtype), t.to(dtype), (t + torch.randn(shape, generator=g)).to(dtype)


def formula(a, t, s):
    """The distance and its three gradients written out by hand, in float64."""
    a, t, s = a.double(), t.double(), s.double()
    num, den = ((a - t) ** 2).sum(-1, keepdim=True), ((s - t) ** 2).sum(-1, keepdim=True)
    ga = 2 * (a - t) / den
    gs = -2 * num * (s - t) / den**2
    return (num / den).squeeze(-1), ga, -(ga + gs), gs


def run(impl, a, t, s, up):
    leaves = [v.detach().clone().requires_grad_(True) for v in (a, t, s)]
    out = kernels.param_dist(*leaves, impl=impl)
    (out * up.to(out.device, out.dtype)).sum().backward()
    return (out.detach(), *(v.grad for v in leaves))


@pytest.mark.parametrize("impl", impls())
@pytest.mark.parametrize("P", SIZES)
@pytest.mark.parametrize("students", [None, 3], ids=["flat", "S3"])
def test_matches_formula_fp32(impl, P, students):
    if impl == "triton" and P > 5000 and not torch.cuda.is_available():
        pytest.skip("the interpreter is slow at this size; 4097 covers partial blocks")
    shape = (P,) if students is None else (students, P)
    a, t, s = vectors(shape, P)
    up = torch.randn(() if students is None else (students,), generator=torch.Generator().manual_seed(1))
    dev = device_for(impl)
    out = run(impl, a.to(dev), t.to(dev), s.to(dev), up)
    ref = formula(a, t, s)
    assert out[0].shape == up.shape and out[0].dtype == torch.float32
    for name, r, o, scale in zip(("L", "da", "dt", "ds"), ref, out, (1.0, up, up, up), strict=True):
        r = r * (scale[..., None] if name != "L" and students else scale)
        assert o.dtype == (torch.float32 if name == "L" else a.dtype)
        # measured: at most 0.15 of it
        assert_close(f"{impl} P={P} {name}", r, o.cpu(), atol=1e-6 * float(r.abs().max()) + 1e-30, rtol=1e-5)


@pytest.mark.parametrize("level", cpu_levels())
def test_cpp_at_every_cpu_level(level):
    # each instruction-set build of the C++ sums and gradients (csrc/simd.h), a size past one
    # chunk with an odd tail, 2 students
    a, t, s = vectors((2, (1 << 16) + 37), 3)
    up = torch.tensor([0.7, -1.3])
    with at_cpu_level(level):
        out = run("cpp", a, t, s, up)
    for name, r, o in zip(("L", "da", "dt", "ds"), formula(a, t, s), out, strict=True):
        r = r if name == "L" else r * up[:, None]
        assert_close(f"cpp at {level} {name}", r, o, atol=1e-6 * float(r.abs().max()) + 1e-30, rtol=1e-5)


@pytest.mark.parametrize("impl", impls())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision(impl, dtype):
    a, t, s = vectors((2, 3001), 5, dtype)
    truth = formula(a.float(), t.float(), s.float())  # the same rounded inputs, exact math
    dev = device_for(impl)
    out = run(impl, a.to(dev), t.to(dev), s.to(dev), torch.ones(2))
    # sums accumulate in fp32 or better: the loss is as good as fp32 (measured: 0.15 of it)
    assert_close(f"{impl} {dtype} L", truth[0], out[0].cpu(), atol=0, rtol=1e-5)
    for r, o in zip(truth[1:], out[1:], strict=True):
        assert o.dtype == dtype
        # one rounding to the output dtype: half an ulp (2^-11 fp16, 2^-8 bf16) plus slack;
        # elementwise, so the same on every CPU (measured: 0.74 of it, on every kernel set)
        assert_close(f"{impl} {dtype} grad", r, o.cpu(), atol=1e-6, rtol=2 ** -7)


@pytest.mark.parametrize("impl", impls())
def test_segments_equal_the_concatenation(impl):
    dev = device_for(impl)
    shapes = [(5, 3), (17,), (2, 2, 2), (1,)]
    parts = [vectors(sh, i) for i, sh in enumerate(shapes)]
    a, t, s = ([p[k].to(dev).requires_grad_(True) for p in parts] for k in range(3))
    out = kernels.param_dist(a, t, s, impl=impl)
    out.backward()
    flat = [torch.cat([p[k].reshape(-1) for p in parts]) for k in range(3)]
    ref = formula(*flat)
    assert out.dim() == 0
    # 36 values: float32's rounding of the sums and of the ratio, a few 6e-8 (measured: 0.17 of it)
    assert_close("segments L", ref[0], out.detach().cpu(), atol=0, rtol=1e-6)
    for k, side in enumerate((a, t, s)):
        got = torch.cat([v.grad.reshape(-1).cpu() for v in side])
        assert_close(f"segments grad {k}", ref[k + 1], got, atol=1e-7, rtol=1e-5)  # measured: 0.02 of it


@pytest.mark.parametrize("impl", impls())
def test_strided_inputs(impl):
    dev = device_for(impl)
    a, t, s = (v.to(dev) for v in vectors((3, 2 * 301), 9))
    a, t, s = a[:, ::2], t[:, ::2], s[:, 1::2]
    assert not a.is_contiguous()
    out = run(impl, a, t, s, torch.ones(3))
    ref = formula(a.cpu(), t.cpu(), s.cpu())
    for r, o in zip(ref, out, strict=True):
        assert_close(f"{impl} strided", r, o.cpu(), atol=1e-7, rtol=1e-5)  # measured: 0.03 of it


@pytest.mark.parametrize("impl", [p for p in impls() if p.values[0] != "triton"])
def test_float64_gradcheck(impl):
    a, t, s = (v.requires_grad_(True) for v in vectors((2, 9), 3, torch.float64))
    assert torch.autograd.gradcheck(lambda x, y, z: kernels.param_dist(x, y, z, impl=impl), (a, t, s))


def test_only_a_needs_grad_leaves_the_expert_alone():
    a, t, s = vectors(50, 0)
    a.requires_grad_(True)
    kernels.param_dist(a, t, s).backward()
    assert t.grad is None and s.grad is None
    assert_close("da", formula(a.detach(), t, s)[1], a.grad, atol=0, rtol=1e-5)  # measured: 0.02 of it


def test_bad_input_is_a_clear_error():
    a, t, s = vectors(10, 0)
    with pytest.raises(D3FastError, match="shapes differ"):
        kernels.param_dist(a, t[:5], s)
    with pytest.raises(D3FastError, match="number of segments"):
        kernels.param_dist([a, a], [t], [s, s])
    with pytest.raises(D3FastError, match="empty"):
        kernels.param_dist(a[:0], t[:0], s[:0])
    # found by a breaker pass: refused before any launch (a later segment's refusal used to
    # leave the first launch's ticket counters taken)
    z = torch.zeros(3, dtype=torch.complex64)
    for bad in ([a, z], [a, torch.zeros(3, dtype=torch.int64)], [a, torch.zeros(3, device="meta")]):
        with pytest.raises(D3FastError, match="real floating point on cpu"):
            kernels.param_dist(bad, bad, bad)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_a_group_of_launches_stopped_midway_leaves_the_counters_at_zero(monkeypatch):
    """The forward's launches (one per segment) share one ticket counter per student: Ctrl-C
    (or a refused launch) after the first leaves it counted, and every later call would then
    find its last program at the wrong count (wrong losses, silently). The counters are zeroed
    when the group raises; the next call is exact."""
    from d3fast.kernels import param_dist_triton as pdt
    from d3fast.kernels._autograd import tickets

    dev = device_for("triton")
    real = pdt._param_dist_fwd_kernel
    launched = []

    class StopSecond:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                if launched:
                    raise KeyboardInterrupt
                launched.append(grid)
                return real[grid](*args, **kwargs)
            return launch

    segs = [[v.to(dev) for v in vectors(n, k)] for k, n in enumerate((300, 70))]
    a, t, s = ([seg[i] for seg in segs] for i in range(3))
    monkeypatch.setattr(pdt, "_param_dist_fwd_kernel", StopSecond())
    with pytest.raises(KeyboardInterrupt):
        kernels.param_dist(a, t, s, impl="triton")
    monkeypatch.setattr(pdt, "_param_dist_fwd_kernel", real)
    assert launched
    with tickets(dev, 1) as counters:
        assert int(counters.abs().sum()) == 0
    want = formula(torch.cat(a).cpu(), torch.cat(t).cpu(), torch.cat(s).cpu())[0]
    got = kernels.param_dist(a, t, s, impl="triton")
    assert_close("after a stopped call", want, got.cpu().double(), atol=1e-6 * float(want), rtol=0)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_the_triton_module_does_not_shadow_the_function():
    # kernels/param_dist_triton.py is imported on first use, as the package attribute
    # `param_dist_triton`: the function `param_dist` keeps its name
    a, t, s = vectors(10, 0)
    kernels.param_dist(a.to(device_for("triton")), t.to(device_for("triton")), s.to(device_for("triton")), impl="triton")
    assert callable(kernels.param_dist) and kernels.param_dist.__module__ == "d3fast.kernels"
