"""Batched multi-kernel MMD^2 on CPU tensors: the autograd wrapper of d3fast._C.mmd
(csrc/mmd.cpp). Math as in kernels/mmd_ref.py; the C++ pass returns the loss and, when
wanted, dloss/dx and dloss/dy together, so backward only scales them."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from d3fast.kernels._autograd import first_order_only


def cpu_array(t: torch.Tensor) -> np.ndarray:
    """A C-contiguous float32 (float64 stays float64) numpy view or copy of t."""
    dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
    return t.detach().to(dtype).contiguous().numpy()


def cpp_gammas(bandwidths: Sequence[float], scale: torch.Tensor | None) -> tuple[float, ...]:
    """gamma_s = 1 / (2 (s scale)^2) as numbers; `scale` is a CPU tensor here (the C++
    kernels take CPU tensors only), so reading it waits for no device."""
    s2 = 1.0 if scale is None else float(scale) ** 2
    return tuple(1.0 / (2.0 * s * s * s2) for s in bandwidths)


class MMDCppFunction(torch.autograd.Function):
    """(x [C, n, D], y [C, m, D], x_lengths [C], y_lengths [C] int64, gammas, unbiased) -> [C].

    n + m <= D (every shape D3 runs): forward computes the loss and the gradient weights A
    ([C, n+m, n+m], no larger than the features), backward the gradient from A with the
    upstream gradient folded in (`_C.mmd_weights`, `_C.mmd_weight_grads`), so no scaling pass
    over [C, n, D] is made and backward can run again (retain_graph). Otherwise the fused pass
    returns the unit-upstream gradients with the loss, and backward scales them in place (a
    fresh product cost 0.1-1.2 ms per call at (10, 30, 30, 2048), mostly page faults); a second
    backward through a retained graph recomputes them."""

    @staticmethod
    def forward(ctx, x, y, lx, ly, gammas, unbiased):  # type: ignore[override]
        from d3fast._ext import _C

        gx_on, gy_on = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.dtypes = (x.dtype, y.dtype)
        ctx.args = (lx, ly, gammas, unbiased, gx_on, gy_on)
        ctx.weights, ctx.grads = None, None
        if gx_on or gy_on:
            ctx.save_for_backward(x, y)
        # named range: `d3fast profile` finds the kernel's time by this name
        with torch.profiler.record_function("d3fast::mmd2_cpp"):
            if (gx_on or gy_on) and x.shape[1] + y.shape[1] <= x.shape[2]:
                loss, ctx.weights = _C.mmd_weights(cpu_array(x), cpu_array(y), lx.numpy(), ly.numpy(), list(gammas),
                                                   unbiased)
                return torch.from_numpy(loss)
            loss, gx, gy = _C.mmd(cpu_array(x), cpu_array(y), lx.numpy(), ly.numpy(), list(gammas), unbiased, gx_on,
                                  gy_on)
        # kept on ctx, not saved: backward consumes them (saved tensors may not change in place)
        ctx.grads = tuple(torch.from_numpy(g) if g is not None else None for g in (gx, gy))
        return torch.from_numpy(loss)

    @staticmethod
    @first_order_only
    def backward(ctx, grad_out):  # type: ignore[override]
        from d3fast._ext import _C

        lx, ly, gammas, unbiased, gx_on, gy_on = ctx.args
        # unpacked on every path: PyTorch's check that x and y were not changed in place since
        x, y = ctx.saved_tensors
        if ctx.weights is not None:
            scale = grad_out.detach().to(torch.float64).contiguous().numpy()
            with torch.profiler.record_function("d3fast::mmd2_cpp_backward"):
                gx, gy = _C.mmd_weight_grads(ctx.weights, cpu_array(x), cpu_array(y), lx.numpy(), ly.numpy(), scale,
                                             gx_on, gy_on)
            return (*(torch.from_numpy(g).to(dt) if g is not None else None for g, dt in zip((gx, gy), ctx.dtypes, strict=True)),
                    None, None, None, None)
        if ctx.grads is None:  # a second backward: the first scaled them in place
            _, gx, gy = _C.mmd(cpu_array(x), cpu_array(y), lx.numpy(), ly.numpy(), list(gammas), unbiased, gx_on,
                               gy_on)
            gx, gy = (torch.from_numpy(g) if g is not None else None for g in (gx, gy))
        else:
            (gx, gy), ctx.grads = ctx.grads, None
        scale = grad_out[:, None, None]
        out_x = gx.mul_(scale).to(ctx.dtypes[0]) if gx is not None else None
        out_y = gy.mul_(scale).to(ctx.dtypes[1]) if gy is not None else None
        return out_x, out_y, None, None, None, None
