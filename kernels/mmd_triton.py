"""Batched multi-kernel MMD^2 as Triton kernels (CUDA tensors): one launch forward, one backward.

Math (kernels/mmd_ref.py has the estimators): per class, Z = [X; Y] with N = n + m rows,
gamma_s = 1/(2 s^2), and group coefficients c(i, j) (c_xx, c_yy, c_xy = -1/(nm); the
unbiased estimator zeroes i = j)

    L       = sum_{i,j} c(i, j) sum_s exp(-gamma_s d_ij),          d_ij = ||z_i - z_j||^2
    dL/dz_i = -4 [ (sum_j W_ij) z_i - sum_j W_ij z_j ],  W_ij = c(i, j) sum_s gamma_s exp(-gamma_s d_ij)

Forward (`_mmd_fwd_kernel`, grid (tiles, splits, C)): program (tile (I, J), split s, class c),
I <= J (W and the loss are symmetric: the tiles below the diagonal are mirrors, written by
their twin, whose loss share counts twice), forms the [BM, BN] Gram tile Z_I Z_J^T and the squared norms of its rows and columns over its
slice of the D features. At D3's shape (C = 10, n = m = 30, D = 2,048) one 64 x 64 tile holds a
class, so the D features are split into 16 slices: 160 programs for an H100's 132 SMs, where
one program per class (the previous kernel) left 122 of them idle. The programs of a tile
write their partial sums to a workspace and take a ticket (an atomic counter); the last to
arrive adds the partials in split order (deterministic), turns the tile into kernel values,
W and its share of the loss, and takes the class's ticket; the last tile of a class adds the
tiles' shares in order into the loss. Counters are reset by the program that empties them,
so the buffer (`_autograd.tickets`) is zero between launches and never refilled.

Backward (`_mmd_bwd_kernel`, grid (row blocks, D blocks, C)): program (I, d, c) walks the
column blocks, sums W_IJ (row sums) and W_IJ @ Z_J[:, d] in registers, and writes
-4 g_c (rsum_i z_i - (W Z)_i) for its slice straight into dL/dx and dL/dy in their dtypes.

Precision: fp32 inputs take the tensor cores through 3xTF32 (`input_precision="tf32x3"`:
a = a_hi + a_lo with both parts rounded to TF32, a.b ~ a_hi.b_hi + a_hi.b_lo + a_lo.b_hi):
TF32 alone would make ||a||^2 + ||b||^2 - 2 <a, b> wrong by ~1e-3 ||a|| ||b||, more than d
itself for near neighbours at bandwidth 1; the split's error is ~2^-21 of |a||b| per product,
under the fp32 reference's own summation error (tests/kernels/test_mmd.py emulates it against
float64). fp16/bf16 inputs take the native tensor-core dot with fp32 accumulation (their
products are exact in fp32); the backward's W is fp32, so its dot is 3xTF32 for every dtype.

Memory: the fp32 W [C, N, N] saved for backward, the split workspace [C, tiles, splits,
BM BN + BM + BN] (splits > 1 only where tiles are few), nothing of size D beyond the inputs
and their gradients.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from d3fast.kernels._autograd import TRITON_OPTIONS, first_order_only, sm_count, tickets


@triton.jit
def _load_rows(x_ptr, y_ptr, sx_r, sy_r, rows, ok, NX, d, dm):
    """[R, BD] fp-any: rows of Z = [X; Y] (x_ptr, y_ptr already at the class), features d.
    Two loads masked by side, not one through a pointer select: a select hides the rows'
    contiguity and every load would be a 32-bit scalar."""
    is_x = rows < NX
    mx = (ok & is_x)[:, None] & dm[None, :]
    my = (ok & ~is_x)[:, None] & dm[None, :]
    a = tl.load(x_ptr + rows[:, None].to(tl.int64) * sx_r + d[None, :], mask=mx, other=0.0)
    b = tl.load(y_ptr + (rows - NX)[:, None].to(tl.int64) * sy_r + d[None, :], mask=my, other=0.0)
    return tl.where(is_x[:, None], a, b)


@triton.jit
def _valid(rows, lx, ly, N, NX):
    """Rows within the class's lengths: x rows < lx, y rows (after NX) < NX + ly."""
    return tl.where(rows < NX, rows < lx, rows - NX < ly) & (rows < N)


@triton.jit
def _mmd_fwd_kernel(
    x_ptr, y_ptr,  # [C, n, D], [C, m, D], unit stride along D
    sx_c, sx_r, sy_c, sy_r,  # their class and row strides (elements)
    lx_ptr, ly_ptr,  # [C] int32 rows used per side
    coef_ptr,  # [C, 3] fp32: c_xx, c_yy, c_xy
    gam_ptr,  # [NUM_GAMMAS] fp32
    scale_ptr,  # [1] bandwidth scale (HAS_SCALE): gamma_s / scale^2
    pairs_ptr,  # [T, 2] int32: tile t's (row block, column block), row block <= column block
    ws_ptr,  # [C, T, SPLIT, BM * BN + BM + BN] fp32 partial sums (SPLIT > 1)
    w_ptr,  # [C, N, N] fp32 W (STORE_W)
    tile_loss_ptr,  # [C, T] fp32
    loss_ptr,  # [C] fp32 out
    ticket_ptr,  # int32 [C * T + C], zero on entry and on exit
    N, NX, D, D_SPLIT,
    NUM_GAMMAS: tl.constexpr, UNBIASED: tl.constexpr, STORE_W: tl.constexpr, HAS_SCALE: tl.constexpr,
    SPLIT: tl.constexpr, T_POW2: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
):
    tile = tl.program_id(0)
    s = tl.program_id(1)
    c = tl.program_id(2)
    T = tl.num_programs(0)
    C = tl.num_programs(2)
    # W and the loss are symmetric in (i, j): only tiles on or above the diagonal are formed
    ti = tl.load(pairs_ptr + 2 * tile)
    tj = tl.load(pairs_ptr + 2 * tile + 1)
    lx = tl.load(lx_ptr + c)
    ly = tl.load(ly_ptr + c)
    xc = x_ptr + c.to(tl.int64) * sx_c
    yc = y_ptr + c.to(tl.int64) * sy_c
    rows = ti * BM + tl.arange(0, BM)
    cols = tj * BN + tl.arange(0, BN)
    row_ok = _valid(rows, lx, ly, N, NX)
    col_ok = _valid(cols, lx, ly, N, NX)
    offs_d = tl.arange(0, BD)

    # this split's slice of the features: the Gram tile and the norms, fp32
    dots = tl.zeros([BM, BN], dtype=tl.float32)
    sq_r = tl.zeros([BM], dtype=tl.float32)
    sq_c = tl.zeros([BN], dtype=tl.float32)
    d_end = tl.minimum(D, (s + 1) * D_SPLIT)
    for d0 in range(s * D_SPLIT, d_end, BD):
        d = d0 + offs_d
        dm = d < d_end
        a = _load_rows(xc, yc, sx_r, sy_r, rows, row_ok, NX, d, dm)
        b = _load_rows(xc, yc, sx_r, sy_r, cols, col_ok, NX, d, dm)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if PRECISION == "native":
            dots += tl.dot(a, tl.trans(b))
        else:
            dots += tl.dot(a, tl.trans(b), input_precision=PRECISION)
        af = a.to(tl.float32)
        bf = b.to(tl.float32)
        sq_r += tl.sum(af * af, axis=1)
        sq_c += tl.sum(bf * bf, axis=1)

    last = True
    if SPLIT > 1:
        # partials out, ticket in; the last split of the tile adds them in split order
        PART: tl.constexpr = BM * BN + BM + BN
        offs_mn = tl.arange(0, BM)[:, None] * BN + tl.arange(0, BN)[None, :]
        slot = ws_ptr + ((c * T + tile) * SPLIT).to(tl.int64) * PART
        mine = slot + s * PART
        tl.store(mine + offs_mn, dots)
        tl.store(mine + BM * BN + tl.arange(0, BM), sq_r)
        tl.store(mine + BM * BN + BM + tl.arange(0, BN), sq_c)
        last = tl.atomic_add(ticket_ptr + c * T + tile, 1, sem="acq_rel") == SPLIT - 1
        if last:
            tl.store(ticket_ptr + c * T + tile, 0)
            dots = tl.zeros([BM, BN], dtype=tl.float32)
            sq_r = tl.zeros([BM], dtype=tl.float32)
            sq_c = tl.zeros([BN], dtype=tl.float32)
            for k in tl.static_range(SPLIT):
                # .cg: read at L2, where the other programs' stores are, not a stale L1 line
                dots += tl.load(slot + k * PART + offs_mn, cache_modifier=".cg")
                sq_r += tl.load(slot + k * PART + BM * BN + tl.arange(0, BM), cache_modifier=".cg")
                sq_c += tl.load(slot + k * PART + BM * BN + BM + tl.arange(0, BN), cache_modifier=".cg")

    if last:
        row_y = rows >= NX
        col_y = cols >= NX
        diag = rows[:, None] == cols[None, :]
        d2 = tl.maximum(sq_r[:, None] + sq_c[None, :] - 2.0 * dots, 0.0)
        d2 = tl.where(diag, 0.0, d2)  # exactly 0 on the diagonal (no cancellation residue)
        cxx = tl.load(coef_ptr + c * 3)
        cyy = tl.load(coef_ptr + c * 3 + 1)
        cxy = tl.load(coef_ptr + c * 3 + 2)
        coef = tl.where(row_y[:, None] == col_y[None, :], tl.where(row_y[:, None], cyy, cxx), cxy)
        keep = row_ok[:, None] & col_ok[None, :]
        if UNBIASED:
            keep = keep & (~diag)
        coef = tl.where(keep, coef, 0.0)
        inv = 1.0
        if HAS_SCALE:
            sc = tl.load(scale_ptr).to(tl.float32)
            inv = 1.0 / (sc * sc)
        kern = tl.zeros([BM, BN], dtype=tl.float32)
        wsum = tl.zeros([BM, BN], dtype=tl.float32)
        for g in tl.static_range(NUM_GAMMAS):
            gam = tl.load(gam_ptr + g) * inv
            e = tl.exp(-gam * d2)
            kern += e
            wsum += gam * e
        if STORE_W:
            wm = (rows < N)[:, None] & (cols < N)[None, :]
            w_c = w_ptr + c.to(tl.int64) * N * N
            tl.store(w_c + rows[:, None] * N + cols[None, :], coef * wsum, mask=wm)
            if ti != tj:  # the mirror tile W_JI = W_IJ^T
                tl.store(w_c + cols[None, :] * N + rows[:, None], coef * wsum, mask=wm)
        share = tl.sum(tl.sum(coef * kern, axis=1), axis=0)
        tl.store(tile_loss_ptr + c * T + tile, tl.where(ti == tj, share, 2.0 * share))
        # the class's last tile adds the tiles' shares in tile order
        if tl.atomic_add(ticket_ptr + C * T + c, 1, sem="acq_rel") == T - 1:
            tl.store(ticket_ptr + C * T + c, 0)
            t = tl.arange(0, T_POW2)
            shares = tl.load(tile_loss_ptr + c * T + t, mask=t < T, other=0.0, cache_modifier=".cg")
            tl.store(loss_ptr + c, tl.sum(shares, axis=0))


@triton.jit
def _mmd_bwd_kernel(
    x_ptr, y_ptr, sx_c, sx_r, sy_c, sy_r,
    lx_ptr, ly_ptr,
    w_ptr,  # [C, N, N] fp32 W from the forward
    gout_ptr, gout_stride,  # [C] upstream gradient (any stride, 0 for an expanded one)
    gx_ptr, gy_ptr,  # [C, n, D], [C, m, D] contiguous, the inputs' dtypes
    N, NX, NY, D,
    GRAD_X: tl.constexpr, GRAD_Y: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BDO: tl.constexpr,
):
    ti = tl.program_id(0)
    pd = tl.program_id(1)
    c = tl.program_id(2)
    lx = tl.load(lx_ptr + c)
    ly = tl.load(ly_ptr + c)
    xc = x_ptr + c.to(tl.int64) * sx_c
    yc = y_ptr + c.to(tl.int64) * sy_c
    w_c = w_ptr + c.to(tl.int64) * N * N
    rows = ti * BM + tl.arange(0, BM)
    d = pd * BDO + tl.arange(0, BDO)
    dm = d < D
    acc = tl.zeros([BM, BDO], dtype=tl.float32)
    rsum = tl.zeros([BM], dtype=tl.float32)
    for n0 in range(0, N, BN):
        cols = n0 + tl.arange(0, BN)
        w = tl.load(w_c + rows[:, None] * N + cols[None, :], mask=(rows < N)[:, None] & (cols < N)[None, :], other=0.0)
        rsum += tl.sum(w, axis=1)
        # padding columns have W = 0; masked to 0 too, so a NaN there cannot reach the product
        zc = _load_rows(xc, yc, sx_r, sy_r, cols, _valid(cols, lx, ly, N, NX), NX, d, dm).to(tl.float32)
        acc += tl.dot(w, zc, input_precision="tf32x3")
    zr = _load_rows(xc, yc, sx_r, sy_r, rows, _valid(rows, lx, ly, N, NX), NX, d, dm).to(tl.float32)
    g = -4.0 * tl.load(gout_ptr + c * gout_stride).to(tl.float32)
    out = g * (rsum[:, None] * zr - acc)
    if GRAD_X:
        mx = (rows < NX)[:, None] & dm[None, :]
        tl.store(gx_ptr + (c * NX + rows[:, None]).to(tl.int64) * D + d[None, :], out.to(gx_ptr.dtype.element_ty), mask=mx)
    if GRAD_Y:
        my = ((rows >= NX) & (rows < N))[:, None] & dm[None, :]
        tl.store(gy_ptr + (c * NY + rows[:, None] - NX).to(tl.int64) * D + d[None, :], out.to(gy_ptr.dtype.element_ty),
                 mask=my)


# compile options on a GPU, per kernel (the interpreter ignores them)
# (benchmarks/kernel_audit.py compiled the choices at ImageWoof's shape. Forward: 4 warps, 2
# stages and 16-feature steps are the fastest without spills on sm_90; 32-feature steps spill
# 39 registers, 3 stages add only shared memory, 8 warps add 20% issue time. Backward: 1
# stage: 2 spill 6 registers for bf16 on sm_80 and add 27% issue time on sm_90; at D3's
# shapes its loop runs once, so there is nothing to pipeline)
CUDA_OPTIONS = {"fwd": {"num_warps": 4, "num_stages": 2}, "bwd": {"num_warps": 4, "num_stages": 1}}


def plan(C: int, N: int, D: int, device: torch.device) -> dict[str, int]:
    """Tile and split sizes for the forward at [C, N = n + m, D] on `device`: BM = BN rows a
    tile, BD features a step, T tiles a class (those on or above the diagonal of the TJ x TJ
    grid), the D features split so that the T x splits x C programs fill the SMs once, no more
    (split > 1 only while C x T is below the SM count, at most 16)."""
    bm, bd = (64, 16) if device.type == "cuda" else (16, 16)
    tj = triton.cdiv(N, bm)
    tiles = tj * (tj + 1) // 2
    steps = triton.cdiv(D, bd)
    # as many splits as fit the SMs once (a second program on an SM would double its issue
    # time), at most 16: the last program of a tile adds them, unrolled
    per_split = max(triton.cdiv(steps, max(sm_count(device) // (C * tiles), 1)), triton.cdiv(steps, 16))
    d_split = per_split * bd
    return {"BM": bm, "BD": bd, "TJ": tj, "T": tiles, "SPLIT": triton.cdiv(D, d_split), "D_SPLIT": d_split}


@functools.lru_cache(maxsize=32)
def _tile_pairs(tj: int, device: torch.device) -> torch.Tensor:
    """[T, 2] int32 (row block, column block) of the tiles on or above the diagonal, row by
    row, on `device`, cached: copied to a device once per grid size (never modified: shared)."""
    pairs = [(i, j) for i in range(tj) for j in range(i, tj)]
    return torch.tensor(pairs, dtype=torch.int32).to(device)


def _bwd_blocks(C: int, N: int, D: int, device: torch.device) -> tuple[int, int, int]:
    """(BM, BN, BDO) for the backward: the widest BDO (<= 64: 128 spills 211 registers on
    sm_90) that still gives a program per SM."""
    bm = 64 if device.type == "cuda" else 16
    bdo = 64 if device.type == "cuda" else 16
    while bdo > 32 and C * triton.cdiv(N, bm) * triton.cdiv(D, bdo) < sm_count(device):
        bdo //= 2
    return bm, bm, bdo


def _precision(dtype: torch.dtype, device: torch.device) -> tuple[str, bool]:
    """The Gram dot's input_precision and whether to upcast first."""
    if dtype == torch.float32:
        return "tf32x3", False
    # triton 3.9's interpreter computes bf16 dots on the raw bits (errors of 1e10 measured)
    if dtype == torch.bfloat16 and device.type != "cuda":
        return "tf32x3", True
    return "native", False


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t with unit stride along the features (a copy only where it had none)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def mmd_fwd(
    x: torch.Tensor,
    y: torch.Tensor,
    x_lengths: torch.Tensor,
    y_lengths: torch.Tensor,
    gammas: torch.Tensor,
    coef: torch.Tensor,
    unbiased: bool,
    store_w: bool,
    scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-class loss [C] (fp32) and, with store_w, W as fp32 [C, n + m, n + m]. One launch.
    x [C, n, D], y [C, m, D] with unit stride along D; x_lengths, y_lengths: [C] int32,
    coef [C, 3] and gammas fp32, scale a one-value tensor or None, all on x's device."""
    C, nx, D = x.shape
    N = nx + y.shape[1]
    p = plan(C, N, D, x.device)
    bm, split, T = p["BM"], p["SPLIT"], p["T"]
    dev = x.device
    ws = torch.empty(C * T * split * (bm * bm + 2 * bm) if split > 1 else 1, device=dev, dtype=torch.float32)
    w = torch.empty(C, N, N, device=dev, dtype=torch.float32) if store_w else ws
    tile_loss = torch.empty(C, T, device=dev, dtype=torch.float32)
    loss = torch.empty(C, device=dev, dtype=torch.float32)
    precision, upcast = _precision(x.dtype, dev)
    with tickets(dev, C * T + C) as ticket:
        _mmd_fwd_kernel[(T, split, C)](
            x, y, x.stride(0), x.stride(1), y.stride(0), y.stride(1), x_lengths, y_lengths, coef, gammas,
            scale if scale is not None else gammas, _tile_pairs(p["TJ"], dev), ws, w, tile_loss, loss, ticket,
            N, nx, D, p["D_SPLIT"],
            NUM_GAMMAS=gammas.numel(), UNBIASED=unbiased, STORE_W=store_w, HAS_SCALE=scale is not None,
            SPLIT=split, T_POW2=triton.next_power_of_2(T), PRECISION=precision, UPCAST=upcast,
            BM=bm, BN=bm, BD=p["BD"], **TRITON_OPTIONS, **CUDA_OPTIONS["fwd"],
        )
    return loss, (w if store_w else None)


def mmd_bwd(
    x: torch.Tensor, y: torch.Tensor, x_lengths: torch.Tensor, y_lengths: torch.Tensor, w: torch.Tensor,
    grad_out: torch.Tensor, want: tuple[bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """dL/dx, dL/dy (None where not wanted) in x's and y's dtypes, scaled per class by
    grad_out [C]. One launch."""
    C, nx, D = x.shape
    ny = y.shape[1]
    N = nx + ny
    bm, bn, bdo = _bwd_blocks(C, N, D, x.device)
    gx = torch.empty(C, nx, D, device=x.device, dtype=x.dtype) if want[0] else None
    gy = torch.empty(C, ny, D, device=y.device, dtype=y.dtype) if want[1] else None
    _mmd_bwd_kernel[(triton.cdiv(N, bm), triton.cdiv(D, bdo), C)](
        x, y, x.stride(0), x.stride(1), y.stride(0), y.stride(1), x_lengths, y_lengths, w,
        grad_out, grad_out.stride(0), gx if gx is not None else w, gy if gy is not None else w, N, nx, ny, D,
        GRAD_X=want[0], GRAD_Y=want[1], BM=bm, BN=bn, BDO=bdo, **TRITON_OPTIONS, **CUDA_OPTIONS["bwd"],
    )
    return gx, gy


class MMDFunction(torch.autograd.Function):
    """Forward: the loss in one launch (keeping W when a gradient is wanted); backward: both
    gradients in one launch, already scaled by the upstream gradient."""

    @staticmethod
    def forward(ctx, x, y, x_lengths, y_lengths, gammas, coef, unbiased, scale):  # type: ignore[override]
        x, y = _rows(x), _rows(y)
        want = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        loss, w = mmd_fwd(x, y, x_lengths, y_lengths, gammas, coef, unbiased, want, scale)
        if w is not None:
            ctx.save_for_backward(x, y, x_lengths, y_lengths, w)
        return loss

    @staticmethod
    @first_order_only
    def backward(ctx, grad_out):  # type: ignore[override]
        x, y, lx, ly, w = ctx.saved_tensors
        gx, gy = mmd_bwd(x, y, lx, ly, w, grad_out, (ctx.needs_input_grad[0], ctx.needs_input_grad[1]))
        return gx, gy, None, None, None, None, None, None
