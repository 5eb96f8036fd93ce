"""Trajectory-parameter distance in one pass over memory, as Triton kernels (CUDA tensors):
one launch forward, one backward (per segment).

Math (kernels/param_dist_ref.py): per student r, over its flat parameters

    L_r = ||a_r - t_r||^2 / ||s_r - t_r||^2
    dL/da = 2 (a - t) / den,  dL/ds = -2 L (s - t) / den,  dL/dt = -(dL/da + dL/ds)

Forward: each program reads whole BLOCKs of a, t and s with unmasked (vectorised) loads, the
row's last program also the masked tail, and writes two fp32 partial sums; then it takes a
ticket (`_autograd.tickets`), and the row's last program to arrive adds the row's partials in
order in float64 (deterministic, no atomic float adds) and writes num, den and L: no torch
op follows the kernel. Backward reads num, den and the upstream gradient itself. The op is
bandwidth-bound: 12 bytes per fp32 parameter forward, 16 to 24 backward. Segments (a model's
parameter list) are launched one after the other into one partial buffer, nothing
concatenated; the ticket counts the programs of every segment, so the last segment's last
program finishes the row.

Alignment: a row starts at r * P; a vector load needs it aligned, which Triton can only know
when P is a multiple of 16 (it specialises on that). One student (S = 1, D3's default) has
only row 0, so the kernel is told (ONE_ROW); otherwise ALIGN, the power of two (<= 16)
dividing P, is promised to the compiler: P = 615,690 gives 8-byte loads for S > 1.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from d3fast.kernels._autograd import TRITON_OPTIONS, first_order_only, sm_count, tickets
from d3fast.kernels.param_dist_ref import input_grads


@triton.jit
def _param_dist_fwd_kernel(
    a_ptr,  # [S, P] one segment, any float dtype
    t_ptr,
    s_ptr,
    partial_ptr,  # [S, num_partials, 2] fp32, this segment's slice starts at partial_offset
    sums_ptr,  # [S, 2] fp64 out: num, den (for backward)
    out_ptr,  # [S] fp32 out: num / den
    ticket_ptr,  # int32 [S], zero on entry and on exit
    P,
    num_partials,
    partial_offset,
    ITERS,  # whole blocks per program
    ONE_ROW: tl.constexpr,
    ALIGN: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    r = tl.program_id(1)
    # student r's row, with the alignment the compiler may assume
    if ONE_ROW:
        base = 0
    else:
        base = tl.multiple_of(r.to(tl.int64) * P, ALIGN)
    a_row = a_ptr + base
    t_row = t_ptr + base
    s_row = s_ptr + base
    offs = tl.arange(0, BLOCK)
    num = tl.zeros([BLOCK], dtype=tl.float32)
    den = tl.zeros([BLOCK], dtype=tl.float32)
    n_full = P // BLOCK
    b0 = pid * ITERS
    for b in range(b0, tl.minimum(b0 + ITERS, n_full)):
        # within a row: int32 offsets (P < 2^31); unmasked, so the loads are vectorised
        dn, dd = _sq_diffs(a_row, t_row, s_row, b * BLOCK + offs, None, None)
        num += dn
        den += dd
    if pid == tl.num_programs(0) - 1:  # the masked tail, P % BLOCK values
        idx = n_full * BLOCK + offs
        dn, dd = _sq_diffs(a_row, t_row, s_row, idx, idx < P, 0.0)
        num += dn
        den += dd
    row_partials = partial_ptr + r.to(tl.int64) * num_partials * 2
    out = row_partials + (partial_offset + pid) * 2
    tl.store(out, tl.sum(num, axis=0))
    tl.store(out + 1, tl.sum(den, axis=0))
    # the row's last program over every segment adds the partials, in order, in float64
    if tl.atomic_add(ticket_ptr + r, 1, sem="acq_rel") == num_partials - 1:
        tl.store(ticket_ptr + r, 0)
        num64 = tl.zeros([BLOCK], dtype=tl.float64)
        den64 = tl.zeros([BLOCK], dtype=tl.float64)
        for k0 in range(0, num_partials, BLOCK):
            k = k0 + offs
            km = k < num_partials
            num64 += tl.load(row_partials + k * 2, mask=km, other=0.0, cache_modifier=".cg").to(tl.float64)
            den64 += tl.load(row_partials + k * 2 + 1, mask=km, other=0.0, cache_modifier=".cg").to(tl.float64)
        n_sum = tl.sum(num64, axis=0)
        d_sum = tl.sum(den64, axis=0)
        tl.store(sums_ptr + r * 2, n_sum)
        tl.store(sums_ptr + r * 2 + 1, d_sum)
        tl.store(out_ptr + r, (n_sum / d_sum).to(tl.float32))


@triton.jit
def _param_dist_bwd_kernel(
    a_ptr,
    t_ptr,
    s_ptr,
    sums_ptr,  # [S, 2] fp64: num, den
    gout_ptr,  # [S] upstream gradient, any stride (0 for an expanded one)
    gout_stride,
    ga_ptr,
    gt_ptr,
    gs_ptr,
    P,
    GRAD_A: tl.constexpr,
    GRAD_T: tl.constexpr,
    GRAD_S: tl.constexpr,
    ONE_ROW: tl.constexpr,
    ALIGN: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    r = tl.program_id(1)
    # student r's row, with the alignment the compiler may assume
    if ONE_ROW:
        base = 0
    else:
        base = tl.multiple_of(r.to(tl.int64) * P, ALIGN)
    idx = pid * BLOCK + tl.arange(0, BLOCK)
    g = tl.load(gout_ptr + r * gout_stride).to(tl.float64)
    num = tl.load(sums_ptr + r * 2)
    den = tl.load(sums_ptr + r * 2 + 1)
    ca = (2.0 * g / den).to(tl.float32)
    cs = (-2.0 * g * num / (den * den)).to(tl.float32)
    if (pid + 1) * BLOCK <= P:  # a whole block: unmasked, vectorised
        _bwd_block(a_ptr + base, t_ptr + base, s_ptr + base, ga_ptr + base, gt_ptr + base, gs_ptr + base, idx,
                   None, None, ca, cs, GRAD_A, GRAD_T, GRAD_S)
    else:
        _bwd_block(a_ptr + base, t_ptr + base, s_ptr + base, ga_ptr + base, gt_ptr + base, gs_ptr + base, idx,
                   idx < P, 0.0, ca, cs, GRAD_A, GRAD_T, GRAD_S)


@triton.jit
def _sq_diffs(a_ptr, t_ptr, s_ptr, idx, m, other):
    """(a - t)^2 and (s - t)^2 at idx, fp32; m, other: the tail's mask and fill, or None for a
    whole block (unmasked loads: Triton vectorises those only)."""
    a = tl.load(a_ptr + idx, mask=m, other=other).to(tl.float32)
    t = tl.load(t_ptr + idx, mask=m, other=other).to(tl.float32)
    s = tl.load(s_ptr + idx, mask=m, other=other).to(tl.float32)
    return (a - t) * (a - t), (s - t) * (s - t)


@triton.jit
def _bwd_block(a_ptr, t_ptr, s_ptr, ga_ptr, gt_ptr, gs_ptr, idx, m, other, ca, cs,
               GRAD_A: tl.constexpr, GRAD_T: tl.constexpr, GRAD_S: tl.constexpr):
    """One block's gradients; m, other as `_sq_diffs`."""
    a = tl.load(a_ptr + idx, mask=m, other=other).to(tl.float32)
    t = tl.load(t_ptr + idx, mask=m, other=other).to(tl.float32)
    va = ca * (a - t)
    if GRAD_A:
        tl.store(ga_ptr + idx, va.to(ga_ptr.dtype.element_ty), mask=m)
    if GRAD_T or GRAD_S:
        s = tl.load(s_ptr + idx, mask=m, other=other).to(tl.float32)
        vs = cs * (s - t)
        if GRAD_S:
            tl.store(gs_ptr + idx, vs.to(gs_ptr.dtype.element_ty), mask=m)
        if GRAD_T:
            tl.store(gt_ptr + idx, (-(va + vs)).to(gt_ptr.dtype.element_ty), mask=m)


def _blocks(device_type: str) -> tuple[int, int]:
    """(BLOCK, programs per SM) for tensors on `device_type`: on the GPU, blocks of 1,024
    values (8 per thread at 4 warps: 128-bit loads of fp32, no spills) and 4 programs per SM,
    each looping over its share of blocks; on the interpreter small blocks, so that the tests'
    sizes take several programs, loops and tails."""
    return (1024, 4) if device_type == "cuda" else (64, 2)


def _layout(P: int, S: int) -> dict[str, int | bool]:
    """The alignment promises for rows of P values, S rows."""
    return {"ONE_ROW": S == 1, "ALIGN": min(P & -P, 16)}


def param_dist_sums(
    a: Sequence[torch.Tensor], t: Sequence[torch.Tensor], s: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Segments [S, P_k] (contiguous) -> (L [S] fp32, sums [S, 2] fp64: num, den)."""
    dev = a[0].device
    block, per_sm = _blocks(dev.type)
    S = a[0].shape[0]
    # whole blocks per program so that every segment's programs fill each SM per_sm times
    iters = [max(triton.cdiv(ak.shape[1] // block, per_sm * sm_count(dev)), 1) for ak in a]
    counts = [max(triton.cdiv(ak.shape[1] // block, it), 1) for ak, it in zip(a, iters, strict=True)]
    partial = torch.empty(S, sum(counts), 2, device=dev, dtype=torch.float32)
    sums = torch.empty(S, 2, device=dev, dtype=torch.float64)
    out = torch.empty(S, device=dev, dtype=torch.float32)
    offset = 0
    with tickets(dev, S) as ticket:  # one counter per row over every segment's launch
        for ak, tk, sk, n, it in zip(a, t, s, counts, iters, strict=True):
            _param_dist_fwd_kernel[(n, S)](ak, tk, sk, partial, sums, out, ticket, ak.shape[1], partial.shape[1],
                                           offset, it, BLOCK=block, **_layout(ak.shape[1], S), **TRITON_OPTIONS)
            offset += n
    return out, sums


def param_dist_grads(
    a: Sequence[torch.Tensor],
    t: Sequence[torch.Tensor],
    s: Sequence[torch.Tensor],
    sums: torch.Tensor,
    grad_out: torch.Tensor,
    want: tuple[bool, bool, bool],
) -> tuple[list[torch.Tensor] | None, ...]:
    block, _ = _blocks(a[0].device.type)
    S = a[0].shape[0]
    outs: list[list[torch.Tensor]] = [[], [], []]
    for ak, tk, sk in zip(a, t, s, strict=True):
        grads = [torch.empty_like(x) if w else ak for x, w in zip((ak, tk, sk), want, strict=True)]
        _param_dist_bwd_kernel[(triton.cdiv(ak.shape[1], block), S)](
            ak, tk, sk, sums, grad_out, grad_out.stride(0), *grads, ak.shape[1],
            GRAD_A=want[0], GRAD_T=want[1], GRAD_S=want[2], BLOCK=block, **_layout(ak.shape[1], S), **TRITON_OPTIONS,
        )
        for o, gr, w in zip(outs, grads, want, strict=True):
            if w:
                o.append(gr)
    return tuple(o if w else None for o, w in zip(outs, want, strict=True))


class ParamDistFunction(torch.autograd.Function):
    """(n_seg, a_1..a_n, t_1..t_n, s_1..s_n) with segments [S, P_k] -> [S] fp32; one launch
    per segment forward, one per segment backward."""

    @staticmethod
    def forward(ctx, n_seg, *flat):  # type: ignore[override]
        ctx.dtypes = [x.dtype for x in flat]
        flat = tuple(x.contiguous() for x in flat)
        out, sums = param_dist_sums(flat[:n_seg], flat[n_seg : 2 * n_seg], flat[2 * n_seg :])
        ctx.n_seg = n_seg
        ctx.save_for_backward(*flat, sums)
        return out

    @staticmethod
    @first_order_only
    def backward(ctx, grad_out):  # type: ignore[override]
        n = ctx.n_seg
        *flat, sums = ctx.saved_tensors
        need = ctx.needs_input_grad[1:]
        want = tuple(any(need[k * n : (k + 1) * n]) for k in range(3))
        grads = param_dist_grads(flat[:n], flat[n : 2 * n], flat[2 * n :], sums, grad_out.reshape(-1), want)
        return input_grads(grads, ctx.dtypes, n)
