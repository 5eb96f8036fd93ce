"""Batched multi-kernel MMD^2 on CPU tensors: the autograd wrapper of d3fast._C.mmd
(csrc/mmd.cpp). Math as in kernels/mmd_ref.py; the C++ pass returns the loss and, when
wanted, dloss/dx and dloss/dy together, so backward only scales them."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


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
    """(x [C, n, D], y [C, m, D], x_lengths [C], y_lengths [C] int64, gammas, unbiased) -> [C]."""

    @staticmethod
    def forward(ctx, x, y, lx, ly, gammas, unbiased):  # type: ignore[override]
        from d3fast._ext import _C

        gx_on, gy_on = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # named range: `d3fast profile` finds the kernel's time by this name
        with torch.profiler.record_function("d3fast::mmd2_cpp"):
            loss, gx, gy = _C.mmd(cpu_array(x), cpu_array(y), lx.numpy(), ly.numpy(), list(gammas), unbiased, gx_on, gy_on)
        ctx.dtypes = (x.dtype, y.dtype)
        ctx.save_for_backward(*(torch.from_numpy(g) if g is not None else None for g in (gx, gy)))
        return torch.from_numpy(loss)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        gx, gy = ctx.saved_tensors
        scale = grad_out[:, None, None]
        out_x = (gx * scale).to(ctx.dtypes[0]) if gx is not None else None
        out_y = (gy * scale).to(ctx.dtypes[1]) if gy is not None else None
        return out_x, out_y, None, None, None, None
