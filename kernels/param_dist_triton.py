"""Trajectory-parameter distance in one pass over memory, as Triton kernels (CUDA tensors).

Math (kernels/param_dist_ref.py): per student r, over its flat parameters

    L_r = ||a_r - t_r||^2 / ||s_r - t_r||^2
    dL/da = 2 (a - t) / den,  dL/ds = -2 L (s - t) / den,  dL/dt = -(dL/da + dL/ds)

Forward: each program reads BLOCK * ITERS values of a, t and s once and writes two fp32
partial sums; the few partials are added in float64 on the host (deterministic, no
atomics). The op is bandwidth-bound: 12 bytes per fp32 parameter forward, 16 backward.
Segments (a model's parameter list) are launched one after the other into one partial
buffer, so nothing is concatenated.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from d3fast.kernels._autograd import TRITON_OPTIONS, first_order_only
from d3fast.kernels.param_dist_ref import input_grads


@triton.jit
def _param_dist_fwd_kernel(
    a_ptr,  # [S, P] one segment, any float dtype
    t_ptr,
    s_ptr,
    partial_ptr,  # [S, num_partials, 2] fp32, this segment's slice starts at partial_offset
    P,
    num_partials,
    partial_offset,
    BLOCK: tl.constexpr,
    ITERS: tl.constexpr,
):
    pid = tl.program_id(0)
    r = tl.program_id(1).to(tl.int64)
    base = r * P
    start = pid.to(tl.int64) * BLOCK * ITERS
    offs = tl.arange(0, BLOCK)
    num = tl.zeros([BLOCK], dtype=tl.float32)
    den = tl.zeros([BLOCK], dtype=tl.float32)
    for it in tl.static_range(ITERS):
        idx = start + it * BLOCK + offs
        m = idx < P
        a = tl.load(a_ptr + base + idx, mask=m, other=0.0).to(tl.float32)
        t = tl.load(t_ptr + base + idx, mask=m, other=0.0).to(tl.float32)
        s = tl.load(s_ptr + base + idx, mask=m, other=0.0).to(tl.float32)
        num += (a - t) * (a - t)
        den += (s - t) * (s - t)
    out = partial_ptr + (r * num_partials + partial_offset + pid) * 2
    tl.store(out, tl.sum(num, axis=0))
    tl.store(out + 1, tl.sum(den, axis=0))


@triton.jit
def _param_dist_bwd_kernel(
    a_ptr,
    t_ptr,
    s_ptr,
    ca_ptr,  # [S] fp32: 2 g / den
    cs_ptr,  # [S] fp32: -2 g num / den^2
    ga_ptr,
    gt_ptr,
    gs_ptr,
    P,
    GRAD_A: tl.constexpr,
    GRAD_T: tl.constexpr,
    GRAD_S: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    r = tl.program_id(1).to(tl.int64)
    idx = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = idx < P
    off = r * P + idx
    ca = tl.load(ca_ptr + r)
    cs = tl.load(cs_ptr + r)
    a = tl.load(a_ptr + off, mask=m, other=0.0).to(tl.float32)
    t = tl.load(t_ptr + off, mask=m, other=0.0).to(tl.float32)
    va = ca * (a - t)
    if GRAD_A:
        tl.store(ga_ptr + off, va.to(ga_ptr.dtype.element_ty), mask=m)
    if GRAD_T or GRAD_S:
        s = tl.load(s_ptr + off, mask=m, other=0.0).to(tl.float32)
        vs = cs * (s - t)
        if GRAD_S:
            tl.store(gs_ptr + off, vs.to(gs_ptr.dtype.element_ty), mask=m)
        if GRAD_T:
            tl.store(gt_ptr + off, (-(va + vs)).to(gt_ptr.dtype.element_ty), mask=m)


def _blocks(device_type: str) -> tuple[int, int]:
    """(BLOCK, ITERS) for tensors on `device_type`."""
    # on the GPU 4096 values x 8 iterations per program keeps ~2k programs in flight at P = 16M
    return (4096, 8) if device_type == "cuda" else (64, 2)


def param_dist_sums(
    a: Sequence[torch.Tensor], t: Sequence[torch.Tensor], s: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Segments [S, P_k] (contiguous) -> (num [S], den [S]) in float64."""
    block, iters = _blocks(a[0].device.type)
    S = a[0].shape[0]
    counts = [triton.cdiv(ak.shape[1], block * iters) for ak in a]
    partial = torch.empty(S, sum(counts), 2, device=a[0].device, dtype=torch.float32)
    offset = 0
    for ak, tk, sk, n in zip(a, t, s, counts, strict=True):
        _param_dist_fwd_kernel[(n, S)](ak, tk, sk, partial, ak.shape[1], partial.shape[1], offset,
                                           BLOCK=block, ITERS=iters, **TRITON_OPTIONS)
        offset += n
    sums = partial.double().sum(1)
    return sums[:, 0], sums[:, 1]


def param_dist_grads(
    a: Sequence[torch.Tensor],
    t: Sequence[torch.Tensor],
    s: Sequence[torch.Tensor],
    num: torch.Tensor,
    den: torch.Tensor,
    grad_out: torch.Tensor,
    want: tuple[bool, bool, bool],
) -> tuple[list[torch.Tensor] | None, ...]:
    block, _ = _blocks(a[0].device.type)
    S = a[0].shape[0]
    g = grad_out.double()
    ca = (2 * g / den).float().contiguous()
    cs = (-2 * g * num / (den * den)).float().contiguous()
    outs: list[list[torch.Tensor]] = [[], [], []]
    for ak, tk, sk in zip(a, t, s, strict=True):
        grads = [torch.empty_like(x) if w else ak for x, w in zip((ak, tk, sk), want, strict=True)]
        _param_dist_bwd_kernel[(triton.cdiv(ak.shape[1], block), S)](
            ak, tk, sk, ca, cs, *grads, ak.shape[1],
            GRAD_A=want[0], GRAD_T=want[1], GRAD_S=want[2], BLOCK=block, **TRITON_OPTIONS,
        )
        for o, gr, w in zip(outs, grads, want, strict=True):
            if w:
                o.append(gr)
    return tuple(o if w else None for o, w in zip(outs, want, strict=True))


class ParamDistFunction(torch.autograd.Function):
    """(n_seg, a_1..a_n, t_1..t_n, s_1..s_n) with segments [S, P_k] -> [S]; one launch per
    segment for the sums, one more per segment for the wanted gradients."""

    @staticmethod
    def forward(ctx, n_seg, *flat):  # type: ignore[override]
        ctx.dtypes = [x.dtype for x in flat]
        flat = tuple(x.contiguous() for x in flat)
        num, den = param_dist_sums(flat[:n_seg], flat[n_seg : 2 * n_seg], flat[2 * n_seg :])
        ctx.n_seg = n_seg
        ctx.save_for_backward(*flat, num, den)
        dtype = torch.float64 if ctx.dtypes[0] == torch.float64 else torch.float32
        return (num / den).to(dtype)

    @staticmethod
    @first_order_only
    def backward(ctx, grad_out):  # type: ignore[override]
        n = ctx.n_seg
        *flat, num, den = ctx.saved_tensors
        need = ctx.needs_input_grad[1:]
        want = tuple(any(need[k * n : (k + 1) * n]) for k in range(3))
        grads = param_dist_grads(flat[:n], flat[n : 2 * n], flat[2 * n :], num, den, grad_out.reshape(-1), want)
        return input_grads(grads, ctx.dtypes, n)
