"""Batched multi-kernel MMD^2 as one Triton launch for all classes (CUDA tensors).

Math (kernels/mmd_ref.py has the estimators): per class, Z = [X; Y] with N = n + m rows,
gamma_s = 1/(2 s^2), and group coefficients c(i, j) (c_xx, c_yy, c_xy = -1/(nm); the
unbiased estimator zeroes i = j)

    L       = sum_{i,j} c(i, j) sum_s exp(-gamma_s d_ij),          d_ij = ||z_i - z_j||^2
    dL/dz_i = -4 [ (sum_j W_ij) z_i - sum_j W_ij z_j ],  W_ij = c(i, j) sum_s gamma_s exp(-gamma_s d_ij)

Tiled like flash attention: program (row block, class) walks the column blocks, builds the
[BM, BN] distance tile from dot products over D in BD chunks, and reduces it at once; no
[N, N] matrix exists. When a gradient is wanted, the same walk adds W_tile @ Z_cols into an
fp32 [C, N, D] buffer (rows owned by one program, so no atomics), and a last pass over the
row block turns it into dL/dz. Backward is then a per-class scale by the incoming gradient.
Memory: O((n + m) D).

Distances use IEEE fp32 dot products for fp32 inputs: TF32's 10-bit mantissa makes
||a||^2 + ||b||^2 - 2 <a, b> wrong by ~1e-3 ||a|| ||b||, more than d itself for near
neighbours at bandwidth 1. fp16/bf16 inputs take the tensor-core dot with fp32 accumulation
(their products are exact in fp32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from d3fast.kernels._autograd import TRITON_OPTIONS, first_order_only


@triton.jit
def _mmd_fwd_kernel(
    z_ptr,  # [C, N, D] rows of X (the first NX) then Y
    sq_ptr,  # [C, N] fp32 squared norms
    lx_ptr,  # [C] int32 rows of X used
    ly_ptr,  # [C] int32 rows of Y used
    coef_ptr,  # [C, 3] fp32: c_xx, c_yy, c_xy
    gam_ptr,  # [NUM_GAMMAS] fp32
    partial_ptr,  # [C, cdiv(N, BM)] fp32 partial losses
    acc_ptr,  # [C, N, D] fp32 gradient buffer (COMPUTE_GRAD)
    N,
    NX,
    D,
    NUM_GAMMAS: tl.constexpr,
    UNBIASED: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BD: tl.constexpr,
):
    pid_m = tl.program_id(0)
    c = tl.program_id(1).to(tl.int64)
    lx = tl.load(lx_ptr + c)
    ly = tl.load(ly_ptr + c)
    cxx = tl.load(coef_ptr + c * 3)
    cyy = tl.load(coef_ptr + c * 3 + 1)
    cxy = tl.load(coef_ptr + c * 3 + 2)
    z_base = z_ptr + c * N * D
    rows = pid_m * BM + tl.arange(0, BM)  # [BM]
    row_y = rows >= NX
    row_ok = tl.where(row_y, rows - NX < ly, rows < lx) & (rows < N)
    # loads are masked by validity: padding rows may hold anything, NaN included
    sq_r = tl.load(sq_ptr + c * N + rows, mask=row_ok, other=0.0)
    offs_d = tl.arange(0, BD)
    loss_acc = tl.zeros([BM], dtype=tl.float32)
    rsum = tl.zeros([BM], dtype=tl.float32)

    for n0 in range(0, N, BN):
        cols = n0 + tl.arange(0, BN)  # [BN]
        col_y = cols >= NX
        col_ok = tl.where(col_y, cols - NX < ly, cols < lx) & (cols < N)
        sq_c = tl.load(sq_ptr + c * N + cols, mask=col_ok, other=0.0)
        dots = tl.zeros([BM, BN], dtype=tl.float32)
        for d0 in range(0, D, BD):
            dm = d0 + offs_d < D
            a = tl.load(z_base + rows[:, None] * D + d0 + offs_d[None, :], mask=row_ok[:, None] & dm[None, :], other=0.0)
            b = tl.load(z_base + cols[:, None] * D + d0 + offs_d[None, :], mask=col_ok[:, None] & dm[None, :], other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            if IEEE:
                dots += tl.dot(a, tl.trans(b), input_precision="ieee")
            else:
                dots += tl.dot(a, tl.trans(b))
        diag = rows[:, None] == cols[None, :]
        d2 = tl.maximum(sq_r[:, None] + sq_c[None, :] - 2.0 * dots, 0.0)
        # the diagonal is exactly 0 apart (no cancellation residue)
        d2 = tl.where(diag, 0.0, d2)
        coef = tl.where(row_y[:, None] == col_y[None, :], tl.where(row_y[:, None], cyy, cxx), cxy)
        keep = row_ok[:, None] & col_ok[None, :]
        if UNBIASED:
            keep = keep & (~diag)
        coef = tl.where(keep, coef, 0.0)  # [BM, BN]
        k = tl.zeros([BM, BN], dtype=tl.float32)
        g = tl.zeros([BM, BN], dtype=tl.float32)
        for s in tl.static_range(NUM_GAMMAS):
            gam = tl.load(gam_ptr + s)
            e = tl.exp(-gam * d2)
            k += e
            g += gam * e
        loss_acc += tl.sum(coef * k, axis=1)
        if COMPUTE_GRAD:
            w = coef * g  # [BM, BN]
            rsum += tl.sum(w, axis=1)
            for d0 in range(0, D, BD):
                dm = d0 + offs_d < D
                zc = tl.load(z_base + cols[:, None] * D + d0 + offs_d[None, :], mask=col_ok[:, None] & dm[None, :], other=0.0).to(tl.float32)
                a_ptrs = acc_ptr + c * N * D + rows[:, None] * D + d0 + offs_d[None, :]
                amask = (rows < N)[:, None] & dm[None, :]
                cur = tl.load(a_ptrs, mask=amask, other=0.0)
                tl.store(a_ptrs, cur + tl.dot(w, zc, input_precision="ieee"), mask=amask)

    tl.store(partial_ptr + c * tl.num_programs(0) + pid_m, tl.sum(loss_acc, axis=0))
    if COMPUTE_GRAD:
        # dL/dz_i = -4 (rsum_i z_i - sum_j W_ij z_j); rows past the lengths have W = 0
        for d0 in range(0, D, BD):
            dm = d0 + offs_d < D
            amask = (rows < N)[:, None] & dm[None, :]
            zr = tl.load(z_base + rows[:, None] * D + d0 + offs_d[None, :], mask=row_ok[:, None] & dm[None, :], other=0.0).to(tl.float32)
            a_ptrs = acc_ptr + c * N * D + rows[:, None] * D + d0 + offs_d[None, :]
            cur = tl.load(a_ptrs, mask=amask, other=0.0)
            tl.store(a_ptrs, -4.0 * (rsum[:, None] * zr - cur), mask=amask)


def _blocks(device_type: str) -> tuple[int, int, int]:
    """(BM, BN, BD) for tensors on `device_type`."""
    if device_type != "cuda":
        # the interpreter runs the program on numpy: small tiles keep the tests fast
        return 16, 16, 32
    return 64, 64, 32


def mmd_fwd(
    x: torch.Tensor,
    y: torch.Tensor,
    x_lengths: torch.Tensor,
    y_lengths: torch.Tensor,
    gammas: torch.Tensor,
    coef: torch.Tensor,
    unbiased: bool,
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-class loss [C] (fp32) and, with compute_grad, dloss[c]/dZ as fp32 [C, n + m, D].
    x_lengths, y_lengths: [C] int32, coef [C, 3] and gammas fp32, all contiguous on z's device."""
    C, nx, D = x.shape
    z = torch.cat([x, y], dim=1).contiguous()  # [C, N, D], one copy, O((n + m) D)
    N = z.shape[1]
    sq = z.float().pow(2).sum(-1).contiguous()  # [C, N]
    BM, BN, BD = _blocks(z.device.type)
    grid = (triton.cdiv(N, BM), C)
    partial = torch.empty(C, grid[0], device=z.device, dtype=torch.float32)
    acc = torch.zeros_like(z, dtype=torch.float32) if compute_grad else partial
    _mmd_fwd_kernel[grid](
        z, sq, x_lengths, y_lengths, coef, gammas,
        partial, acc, N, nx, D,
        NUM_GAMMAS=gammas.numel(), UNBIASED=unbiased, COMPUTE_GRAD=compute_grad,
        IEEE=z.dtype == torch.float32 or z.dtype == torch.float64,
        # triton 3.9's interpreter computes bf16 dots on the raw bits (errors of 1e10 measured)
        UPCAST=z.dtype == torch.bfloat16 and z.device.type != "cuda", BM=BM, BN=BN, BD=BD, **TRITON_OPTIONS,
    )
    return partial.sum(1), (acc if compute_grad else None)


class MMDFunction(torch.autograd.Function):
    """Loss and gradient come out of one forward launch; backward scales the stored gradient."""

    @staticmethod
    def forward(ctx, x, y, x_lengths, y_lengths, gammas, coef, unbiased):  # type: ignore[override]
        want = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        loss, grad = mmd_fwd(x, y, x_lengths, y_lengths, gammas, coef, unbiased, want)
        ctx.nx = x.shape[1]
        ctx.dtypes = (x.dtype, y.dtype)
        ctx.save_for_backward(grad if grad is not None else loss)
        return loss

    @staticmethod
    @first_order_only
    def backward(ctx, grad_out):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        g = grad * grad_out.float()[:, None, None]
        gx = g[:, : ctx.nx].to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
        gy = g[:, ctx.nx :].to(ctx.dtypes[1]) if ctx.needs_input_grad[1] else None
        return gx, gy, None, None, None, None, None
