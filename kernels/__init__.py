"""d3fast.kernels: fused ops and their dispatch.

Each op has one file per implementation: `<op>_triton.py` (Triton kernels and their autograd
Function, CUDA tensors), `<op>_cpp.py` (the autograd wrapper of the C++ extension d3fast._C,
CPU tensors) and `<op>_ref.py` (pure PyTorch: the tests' oracle and the fallback). Ops:
`mmd` (public function `mmd2`) and `param_dist`. This file holds the public functions, their
argument checks and the dispatch only. `backend(tensor)` picks one implementation per call:

    D3FAST_PUREPYTHON=1                                          -> "reference"
    CUDA tensor, Triton importable, D3FAST_DISABLE_TRITON unset  -> "triton"
    CPU tensor, d3fast._C built                                  -> "cpp"
    otherwise                                                    -> "reference"

The ops then send float64 inputs that `backend` gave to Triton to the reference instead (the
Triton kernels accumulate in fp32, and the MMD kernel's loop-carried dots do not compile for
fp64), so float64 on CUDA never reaches a compile error; `impl="triton"` with float64 is refused.

The Triton modules are imported only when a CUDA tensor needs them, so CPU-only runs never
import Triton. Tests run the Triton kernels on CPU tensors by calling them directly under
TRITON_INTERPRET=1.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import math
import os
from collections.abc import Sequence
from types import ModuleType

import torch

from d3fast.errors import D3FastError
from d3fast.kernels.mmd_cpp import MMDCppFunction, cpp_gammas
from d3fast.kernels.mmd_ref import DEFAULT_BANDWIDTHS, mmd2_ref, pairwise_sq_dists
from d3fast.kernels.param_dist_cpp import ParamDistCppFunction
from d3fast.kernels.param_dist_ref import param_dist_ref

__all__ = [
    "DEFAULT_BANDWIDTHS", "backend", "describe", "mmd2", "pairwise_sq_dists", "param_dist", "triton_status",
]


def triton_status() -> tuple[bool, str]:
    if os.environ.get("D3FAST_PUREPYTHON", "0") == "1":
        return False, "disabled by D3FAST_PUREPYTHON=1"
    if os.environ.get("D3FAST_DISABLE_TRITON", "0") == "1":
        return False, "disabled by D3FAST_DISABLE_TRITON=1"
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed"
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return True, "interpreter (TRITON_INTERPRET=1): slow, for tests"
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    return True, "CUDA"


def backend(t: torch.Tensor) -> str:
    """The implementation an op uses for tensor `t`: "triton", "cpp" or "reference"."""
    if os.environ.get("D3FAST_PUREPYTHON", "0") == "1":
        return "reference"
    if t.is_cuda:
        return "triton" if triton_status()[0] else "reference"
    if t.device.type == "cpu":
        from d3fast._ext import HAS_EXT

        if HAS_EXT:
            return "cpp"
    return "reference"


def describe() -> dict[str, str]:
    """Backend per device kind, with the reason, for `d3fast doctor`."""
    from d3fast._ext import HAS_EXT, REASON

    ok, why = triton_status()
    return {
        "cuda tensors": f"triton ({why})" if ok else f"reference (triton: {why})",
        "cpu tensors": "cpp (d3fast._C)" if HAS_EXT else f"reference (d3fast._C: {REASON})",
    }


def mmd2(
    x: torch.Tensor,
    y: torch.Tensor,
    bandwidths: Sequence[float] = DEFAULT_BANDWIDTHS,
    unbiased: bool = True,
    x_lengths: torch.Tensor | None = None,
    y_lengths: torch.Tensor | None = None,
    impl: str | None = None,
    bandwidth_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Squared MMD with a mixture of Gaussian kernels, for all classes at once.

    Args:
        x: [C, n, D] (or [n, D]) samples of the first distribution; any float dtype, any strides.
        y: [C, m, D] (or [m, D]) samples of the second.
        bandwidths: the sigmas s of k(a, b) = sum_s exp(-||a - b||^2 / (2 s^2)), 1 to 16 of them.
            Default: 1, 2, 4, 8, 16.
        unbiased: leave out the i = j terms of the within-sample means. Default: True.
        x_lengths, y_lengths: [C] integer rows used per class (the rest is padding and gets a
            zero gradient). Default: every row.
        impl: force "triton", "cpp" or "reference" (tests, benchmarks). Default: `backend(x)`.
        bandwidth_scale: a positive 0-d tensor that multiplies every bandwidth (the median
            heuristic's sqrt(median d^2)), kept on the device so that no value is read back;
            no gradient flows to it. Default: none.
    Returns:
        [C] (a scalar for 2-D inputs), float32 (float64 for float64 inputs). The unbiased
        estimate can be slightly negative. Gradients flow to x and y.
    Precision: every implementation here (and torch.compile of the reference) forms
        ||a - b||^2 as ||a||^2 + ||b||^2 - 2 <a, b>; in float32 that cancels when the features
        share an offset much larger than their spread (at D = 2048 with spread ~0.15, an
        offset of 10 gave MMD^2 0.163 against the float64 0.069). MMD does not change under a
        common shift: centre such features (e.g. on the real class mean) or pass float64.
        ReLU/pooled ConvNet features, unit-scale or zero-mean features stay at ~1e-5 relative.
    Raises:
        D3FastError: mismatched shapes, a zero dimension, non-floating inputs, inputs on two
            devices, bad lengths, bandwidths or bandwidth_scale, fewer than 2 rows on a side with
            the unbiased estimator, impl="triton" for CPU tensors (outside the interpreter), or
            create_graph=True through a fused (C++ or Triton) backward.

    Example:
        >>> mmd2(torch.randn(10, 64, 2048), torch.randn(10, 50, 2048)).shape
        torch.Size([10])
    """
    given = (list(x.shape), list(y.shape))
    squeeze = x.dim() == 2 and y.dim() == 2
    if squeeze:
        x, y = x.unsqueeze(0), y.unsqueeze(0)
    if x.dim() != 3 or y.dim() != 3 or x.shape[0] != y.shape[0] or x.shape[2] != y.shape[2] or 0 in (*x.shape, *y.shape):
        raise D3FastError(f"mmd2: need x [C, n, D] and y [C, m, D] (or both 2-D) with equal C and D, none of them "
                          f"0, got {given[0]} and {given[1]}")
    if not (x.is_floating_point() and y.is_floating_point()):
        raise D3FastError(f"mmd2: x and y must be real floating point, got {x.dtype} and {y.dtype}")
    if x.device != y.device:
        raise D3FastError(f"mmd2: x and y must be on one device, got {x.device} and {y.device}")
    bandwidths = _bandwidths(bandwidths)
    C, n, D = x.shape
    m = y.shape[1]
    # given lengths are checked on the host; without them nothing is built or read here
    full = x_lengths is None and y_lengths is None
    lx = _lengths(x_lengths, C, n, "x_lengths")
    ly = _lengths(y_lengths, C, m, "y_lengths")
    min_x = n if x_lengths is None else int(lx.min())
    min_y = m if y_lengths is None else int(ly.min())
    if unbiased and (min_x < 2 or min_y < 2):
        raise D3FastError(
            f"unbiased MMD needs >= 2 samples per side in every class, got {min_x} and {min_y}; "
            "use more samples or unbiased=False"
        )
    if x.dtype != y.dtype:
        dtype = torch.promote_types(x.dtype, y.dtype)
        x, y = x.to(dtype), y.to(dtype)

    which = _chosen(impl, x)
    if which == "triton" and x.dtype == torch.float64 and impl is None:
        which = "reference"  # float64 is for gradcheck; Triton's fp64 dot is not worth a kernel
    scale = _bandwidth_scale(bandwidth_scale, x.device)
    if which != "reference" and not torch.is_grad_enabled():
        # inside an autograd.Function needs_input_grad ignores no_grad: say it by detaching,
        # or the fused ops compute a gradient nobody can ask for
        x, y = x.detach(), y.detach()
    if which == "reference":
        # every row used: one batched pass (with lengths the reference loops over classes)
        out = mmd2_ref(x, y, bandwidths, unbiased, x_lengths=None if full else lx, y_lengths=None if full else ly,
                       bandwidth_scale=scale)
    elif which == "cpp":
        out = MMDCppFunction.apply(x, y, lx, ly, cpp_gammas(bandwidths, scale), unbiased)
    else:
        # the per-class constants live on the device, cached: no host-to-device copy per call
        gam = _gammas_on(tuple(bandwidths), x.device)
        if full:
            dx, dy, coef = _full_lengths_on(C, n, m, unbiased, x.device)
        else:
            dx, dy, coef = lx.to(x.device, torch.int32), ly.to(x.device, torch.int32), \
                mmd_coefficients(lx, ly, unbiased).to(x.device)
        out = _triton("mmd").MMDFunction.apply(x, y, dx, dy, gam, coef, unbiased, scale)
    return out[0] if squeeze else out


def _chosen(impl: str | None, t: torch.Tensor) -> str:
    if impl is None:
        return backend(t)
    if impl not in ("triton", "cpp", "reference"):
        raise D3FastError(f"unknown kernel implementation {impl!r}: use triton, cpp or reference")
    if impl == "triton" and not t.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise D3FastError(f"the Triton kernels take CUDA tensors (CPU tensors only under TRITON_INTERPRET=1, the "
                          f"tests' interpreter), got a {t.device.type} tensor; impl=None picks the right one")
    if impl == "triton" and t.dtype == torch.float64:
        # the Triton kernels accumulate in fp32 (mmd's loop-carried dots do not compile for fp64)
        raise D3FastError("the Triton kernels take float32, bfloat16 or float16; float64 runs on the reference "
                          "(the default dispatch, impl=None, picks it)")
    if impl == "cpp":
        from d3fast._ext import HAS_EXT, REASON

        if not HAS_EXT or t.device.type != "cpu":
            raise D3FastError(f"the C++ kernels take CPU tensors and a built d3fast._C ({REASON})")
    return impl


@functools.lru_cache(maxsize=16)
def _gammas_on(bandwidths: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """gamma_s = 1 / (2 s^2) as a float32 tensor on `device` (never modified: shared)."""
    return torch.tensor([1.0 / (2.0 * s * s) for s in bandwidths], dtype=torch.float32, device=device)


@functools.lru_cache(maxsize=32)
def _full_lengths_on(C: int, n: int, m: int, unbiased: bool, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lengths n and m (int32 [C]) and the pair coefficients [C, 3] on `device`, cached by
    shape: a training loop copies them to the device once (never modified: shared)."""
    lx, ly = torch.full((C,), n, dtype=torch.int64), torch.full((C,), m, dtype=torch.int64)
    coef = mmd_coefficients(lx, ly, unbiased)
    return lx.to(device, torch.int32), ly.to(device, torch.int32), coef.to(device)


def mmd_coefficients(lx: torch.Tensor, ly: torch.Tensor, unbiased: bool) -> torch.Tensor:
    """[C, 3] float32 weights c_xx, c_yy, c_xy of the pair sums (kernels/mmd_ref.py)."""
    nx, ny = lx.double(), ly.double()
    cxx = 1 / (nx * (nx - 1)) if unbiased else 1 / (nx * nx)
    cyy = 1 / (ny * (ny - 1)) if unbiased else 1 / (ny * ny)
    return torch.stack([cxx, cyy, -1 / (nx * ny)], 1).float().contiguous()


def _bandwidths(bandwidths: Sequence[float]) -> tuple[float, ...]:
    """1 to 16 finite positive numbers, as a tuple."""
    try:
        values = tuple(float(b) for b in bandwidths)
    except (TypeError, ValueError):
        raise D3FastError(f"mmd2: bandwidths must be a sequence of numbers, got {bandwidths!r}") from None
    if not 1 <= len(values) <= 16 or not all(math.isfinite(b) and b > 0 for b in values):
        raise D3FastError(f"mmd2: need 1 to 16 finite positive bandwidths, got {list(values)}")
    return values


def _bandwidth_scale(scale: torch.Tensor | float | None, device: torch.device) -> torch.Tensor | None:
    """A one-value tensor, detached; on the CPU also checked finite and positive (on a GPU that
    would read the value back, a sync per call: there a bad scale gives NaN)."""
    if scale is None:
        return None
    if not isinstance(scale, torch.Tensor):
        try:
            scale = torch.tensor(float(scale), device=device)
        except (TypeError, ValueError):
            raise D3FastError(f"mmd2: bandwidth_scale must be a number or a one-value tensor, got {scale!r}") from None
    if scale.numel() != 1 or not scale.is_floating_point():
        raise D3FastError(f"mmd2: bandwidth_scale must be one floating-point value, got {scale.dtype} "
                          f"{list(scale.shape)}")
    scale = scale.detach().reshape(())
    if scale.device.type == "cpu" and not (math.isfinite(float(scale)) and float(scale) > 0):
        raise D3FastError(f"mmd2: bandwidth_scale must be finite and positive, got {float(scale)}")
    # a CPU scale for CUDA features: one copy (the kernels read it on the device)
    return scale.to(device)


def _lengths(lengths: torch.Tensor | None, C: int, rows: int, name: str) -> torch.Tensor:
    """Given lengths checked, as int64 on the CPU; None: every row (a CPU tensor, built
    without reading any device)."""
    if lengths is None:
        return torch.full((C,), rows, dtype=torch.int64)
    lengths = torch.as_tensor(lengths).detach().cpu()
    if lengths.shape != (C,) or lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
        raise D3FastError(f"mmd2: {name} must be {C} integers, got {lengths.dtype} {list(lengths.shape)}")
    if int(lengths.min()) < 1 or int(lengths.max()) > rows:
        raise D3FastError(f"mmd2: {name} must lie in [1, {rows}], got {lengths.tolist()}")
    # contiguous: the C++ op reads them as a plain array (a column of a [C, 2] table is strided)
    return lengths.to(torch.int64).contiguous()


def param_dist(
    a: torch.Tensor | Sequence[torch.Tensor],
    target: torch.Tensor | Sequence[torch.Tensor],
    start: torch.Tensor | Sequence[torch.Tensor],
    impl: str | None = None,
) -> torch.Tensor:
    """||a - target||^2 / ||start - target||^2, each tensor read once.

    Args:
        a: the student's parameters after the unroll: a flat [P] vector, a batch of students
            [S, P], or a list of tensors of any shapes (one model's parameters, read in place,
            not concatenated).
        target: the expert's parameters M epochs after the start; same shapes as a, or [P]
            for a batch [S, P] (broadcast over the students).
        start: the expert's parameters the student started from; like target.
        impl: force "triton", "cpp" or "reference" (tests, benchmarks). Default: `backend(a)`.
    Returns:
        a scalar for [P] inputs, [S] for [S, P]; float32 (float64 for float64 inputs).
        Gradients flow to every input that requires them.
    Raises:
        D3FastError: empty or mismatched inputs, a segment that is not real floating point or
            sits on another device than the first, impl="triton" for CPU tensors.

    Example:
        >>> param_dist(torch.ones(5), torch.zeros(5), torch.full((5,), 2.0))
        tensor(0.2500)
    """
    segs = [_segments(v, name) for v, name in ((a, "a"), (target, "target"), (start, "start"))]
    sa, st, ss = segs
    if not sa or len(sa) != len(st) or len(sa) != len(ss):
        raise D3FastError(f"param_dist: need the same non-zero number of segments, got {[len(s) for s in segs]}")
    batched = sa[0][1]
    if batched and len(sa) == 1:
        # one expert trajectory for a batch of students: broadcast [P] over [S, P]
        st, ss = ([(v[0].expand_as(sa[0][0]), True) if not v[1] else v for v in side] for side in (st, ss))
        segs = [sa, st, ss]
    device = sa[0][0].device
    for k, (x, y, z) in enumerate(zip(sa, st, ss, strict=True)):
        # checked before any launch: a segment refused by the second launch would leave the
        # first launch's ticket counters taken (kernels/_autograd.py)
        if not all(v[0].is_floating_point() and v[0].device == device for v in (x, y, z)):
            raise D3FastError(f"param_dist: segment {k} must be real floating point on {device}, got "
                              f"{[f'{v[0].dtype} on {v[0].device}' for v in (x, y, z)]}")
        if not (x[0].shape == y[0].shape == z[0].shape) or x[0].shape[1] == 0 or x[1] != batched:
            raise D3FastError(
                f"param_dist: segment {k} shapes differ or are empty: {list(x[0].shape)}, "
                f"{list(y[0].shape)}, {list(z[0].shape)}"
            )
        if x[0].shape[0] != sa[0][0].shape[0]:
            raise D3FastError("param_dist: segments hold different numbers of students")
    which = _chosen(impl, sa[0][0])
    if which == "triton" and sa[0][0].dtype == torch.float64 and impl is None:
        which = "reference"  # the Triton kernels sum in fp32: float64 (gradcheck, tests) stays exact
    if which == "reference":
        tensors = [[s[0] for s in side] for side in segs]
        out = param_dist_ref(*tensors)
    else:
        flat = [s[0] for side in segs for s in side]
        fn = ParamDistCppFunction if which == "cpp" else _triton("param_dist").ParamDistFunction
        out = fn.apply(len(sa), *flat)
    return out if batched else out[0]


def _segments(v: torch.Tensor | Sequence[torch.Tensor], name: str) -> list[tuple[torch.Tensor, bool]]:
    """Each segment as [S, P_k] plus whether it is a batch of students: a tensor is [P] (one
    student) or [S, P]; a list holds one student's parameters, any shapes, each flattened."""
    if isinstance(v, torch.Tensor):
        if v.dim() not in (1, 2):
            raise D3FastError(f"param_dist: {name} must be [P] or [S, P], got {list(v.shape)}; pass a list for a model's parameters")
        return [(v if v.dim() == 2 else v.unsqueeze(0), v.dim() == 2)]
    return [(p.reshape(1, -1), False) for p in v]


def _triton(op: str) -> ModuleType:
    """The Triton module of `op` (kernels/<op>_triton.py), imported on first use (CPU-only
    runs never import Triton)."""
    return importlib.import_module(f"{__name__}.{op}_triton")
