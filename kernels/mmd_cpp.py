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
    upstream gradient folded in (`_C.mmd_weights`, `_C.mmd_weight_grads`): no scaling pass
    over [C, n, D]. Otherwise (the tiled path, A would outgrow the features) the fused pass
    returns the unit-upstream gradients with the loss and backward scales them."""

    @staticmethod
    def forward(ctx, x, y, lx, ly, gammas, unbiased):  # type: ignore[override]
        from d3fast._ext import _C

        gx_on, gy_on = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.dtypes = (x.dtype, y.dtype)
        ctx.args = (lx, ly, gx_on, gy_on)
        ctx.weights = None
        # named range: `d3fast profile` finds the kernel's time by this name
        with torch.profiler.record_function("d3fast::mmd2_cpp"):
            if (gx_on or gy_on) and x.shape[1] + y.shape[1] <= x.shape[2]:
                loss, ctx.weights = _C.mmd_weights(cpu_array(x), cpu_array(y), lx.numpy(), ly.numpy(), list(gammas),
                                                   unbiased)
                ctx.save_for_backward(x, y)
                return torch.from_numpy(loss)
            loss, gx, gy = _C.mmd(cpu_array(x), cpu_array(y), lx.numpy(), ly.numpy(), list(gammas), unbiased, gx_on,
                                  gy_on)
        ctx.save_for_backward(x, y, *(torch.from_numpy(g) if g is not None else None for g in (gx, gy)))
        return torch.from_numpy(loss)

    @staticmethod
    @first_order_only
    def backward(ctx, grad_out):  # type: ignore[override]
        from d3fast._ext import _C

        # x and y unpacked on both paths: PyTorch's check that they were not changed in place
        x, y, *unit = ctx.saved_tensors
        if ctx.weights is None:
            scale = grad_out[:, None, None]
            grads = tuple(g * scale if g is not None else None for g in unit)
        else:
            lx, ly, gx_on, gy_on = ctx.args
            with torch.profiler.record_function("d3fast::mmd2_cpp_backward"):
                grads = tuple(torch.from_numpy(g) if g is not None else None for g in _C.mmd_weight_grads(
                    ctx.weights, cpu_array(x), cpu_array(y), lx.numpy(), ly.numpy(),
                    grad_out.detach().to(torch.float64).contiguous().numpy(), gx_on, gy_on))
        out = (g.to(dt) if g is not None else None for g, dt in zip(grads, ctx.dtypes, strict=True))
        return (*out, None, None, None, None)
