"""Trajectory-parameter distance on CPU tensors: the autograd wrapper of
d3fast._C.param_dist_sums / param_dist_grads (csrc/param_dist.cpp). Math as in
kernels/param_dist_ref.py: one pass for the two sums, one more for the wanted gradients."""

from __future__ import annotations

import torch

from d3fast.kernels._autograd import first_order_only
from d3fast.kernels.mmd_cpp import cpu_array
from d3fast.kernels.param_dist_ref import input_grads


class ParamDistCppFunction(torch.autograd.Function):
    """(n_seg, a_1..a_n, t_1..t_n, s_1..s_n) with segments [S, P_k] -> [S] ||a-t||^2 / ||s-t||^2."""

    @staticmethod
    def forward(ctx, n_seg, *flat):  # type: ignore[override]
        from d3fast._ext import _C

        ctx.dtypes = [x.dtype for x in flat]
        # fp32/fp64 numpy views, made once and kept for backward
        arrays = [cpu_array(x) for x in flat]
        a, t, s = arrays[:n_seg], arrays[n_seg : 2 * n_seg], arrays[2 * n_seg :]
        with torch.profiler.record_function("d3fast::param_dist_sums_cpp"):
            num, den = (torch.from_numpy(v) for v in _C.param_dist_sums(a, t, s))
        ctx.n_seg = n_seg
        ctx.save_for_backward(*(torch.from_numpy(x) for x in arrays), num, den)
        dtype = torch.float64 if ctx.dtypes[0] == torch.float64 else torch.float32
        return (num / den).to(dtype)

    @staticmethod
    @first_order_only
    def backward(ctx, grad_out):  # type: ignore[override]
        from d3fast._ext import _C

        n = ctx.n_seg
        *arrays, num, den = (x.numpy() for x in ctx.saved_tensors)
        need = ctx.needs_input_grad[1:]
        want = [any(need[k * n : (k + 1) * n]) for k in range(3)]
        with torch.profiler.record_function("d3fast::param_dist_grads_cpp"):
            raw = _C.param_dist_grads(
                arrays[:n], arrays[n : 2 * n], arrays[2 * n :], num, den,
                grad_out.detach().double().reshape(-1).numpy(), *want,
            )
        sides = [None if side is None else [torch.from_numpy(g) for g in side] for side in raw]
        return input_grads(sides, ctx.dtypes, n)
