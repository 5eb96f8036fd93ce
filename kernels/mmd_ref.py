"""Batched multi-kernel MMD^2 in plain PyTorch: the reference for kernels/mmd_triton.py (Triton)
and csrc/mmd.cpp, and the fallback where neither runs. Imports no Triton.

Per class c, with x_1..x_n and y_1..y_m its rows and k(a, b) = sum_s exp(-||a - b||^2 / (2 s^2)):

    unbiased  MMD^2 = 1/(n(n-1)) sum_{i!=j} k(x_i, x_j) + 1/(m(m-1)) sum_{i!=j} k(y_i, y_j)
                      - 2/(nm) sum_{i,j} k(x_i, y_j)
    biased    the same with 1/n^2 and 1/m^2 and the i = j terms included

Written over Z = [X; Y] and group coefficients c(i, j) (c_xx, c_yy above, c_xy = -1/(nm)),
MMD^2 = sum_{i,j} c(i, j) k(z_i, z_j), and with gamma_s = 1/(2 s^2)

    dMMD^2/dz_i = -4 sum_j c(i, j) G_ij (z_i - z_j),   G_ij = sum_s gamma_s exp(-gamma_s ||z_i - z_j||^2)

which is what the fused kernels accumulate tile by tile.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

DEFAULT_BANDWIDTHS = (1.0, 2.0, 4.0, 8.0, 16.0)


def pairwise_sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[..., n, D], [..., m, D] -> [..., n, m] squared Euclidean distances (>= 0)."""
    a2 = (a * a).sum(-1, keepdim=True)  # [..., n, 1]
    b2 = (b * b).sum(-1, keepdim=True).transpose(-1, -2)  # [..., 1, m]
    return (a2 + b2 - 2 * a @ b.transpose(-1, -2)).clamp_min(0)


def _gram_kernels(
    x: torch.Tensor, y: torch.Tensor, bandwidths: Sequence[float], scale: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """k(x_i, x_j), k(y_i, y_j), k(x_i, y_j) for [C, n, D], [C, m, D] -> [C, n, n], [C, m, m],
    [C, n, m], bandwidths multiplied by `scale`.

    Squared distances come from the three Gram matrices, norms from their diagonals: the only
    [C, n, D]-sized work is the three batched matmuls (and their backward). Norms computed as
    (x * x).sum(-1) cost an elementwise pass over the features and another in backward each:
    at (200, 30, 30, 2048) those passes took half the time. On a diagonal the distance is
    exactly 0 (2 g_ii - 2 g_ii) and masked to 0 anyway."""
    gxx = x @ x.transpose(-1, -2)
    gyy = y @ y.transpose(-1, -2)
    gxy = x @ y.transpose(-1, -2)
    sx, sy = gxx.diagonal(dim1=-2, dim2=-1), gyy.diagonal(dim1=-2, dim2=-1)

    def k(g: torch.Tensor, sa: torch.Tensor, sb: torch.Tensor, same: bool) -> torch.Tensor:
        d2 = (sa[..., :, None] + sb[..., None, :] - 2 * g).clamp_min(0)
        if scale is not None:  # exp(-d^2 / (2 (s scale)^2))
            d2 = d2 / scale.to(d2.dtype).square()
        if same:
            d2 = d2 * (1 - torch.eye(d2.shape[-1], dtype=d2.dtype, device=d2.device))
        out = torch.zeros_like(d2)
        for s in bandwidths:
            out = out + torch.exp(-d2 / (2 * s * s))
        return out

    return k(gxx, sx, sx, True), k(gyy, sy, sy, True), k(gxy, sx, sy, False)


def _mmd2_dense(
    x: torch.Tensor, y: torch.Tensor, bandwidths: Sequence[float], unbiased: bool, scale: torch.Tensor | None = None
) -> torch.Tensor:
    """[C, n, D], [C, m, D] -> [C], every row used; bandwidths multiplied by `scale`."""
    n, m = x.shape[-2], y.shape[-2]
    kxx, kyy, kxy = _gram_kernels(x, y, bandwidths, scale)
    if unbiased:
        # the diagonal of each Gaussian kernel is exactly 1
        diag = float(len(bandwidths))
        xx = (kxx.sum((-1, -2)) - n * diag) / (n * (n - 1))
        yy = (kyy.sum((-1, -2)) - m * diag) / (m * (m - 1))
    else:
        xx, yy = kxx.mean((-1, -2)), kyy.mean((-1, -2))
    return xx + yy - 2 * kxy.mean((-1, -2))


def mmd2_ref(
    x: torch.Tensor,
    y: torch.Tensor,
    bandwidths: Sequence[float] = DEFAULT_BANDWIDTHS,
    unbiased: bool = True,
    x_lengths: torch.Tensor | None = None,
    y_lengths: torch.Tensor | None = None,
    bandwidth_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference MMD^2 per class; arguments as `d3fast.kernels.mmd2` (checked there).

    Computes in float32 (float64 inputs stay float64) and returns [C] in that dtype.
    With lengths, class c uses x[c, :x_lengths[c]] and y[c, :y_lengths[c]].
    """
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    x, y = x.to(dtype), y.to(dtype)
    if x_lengths is None and y_lengths is None:
        return _mmd2_dense(x, y, bandwidths, unbiased, bandwidth_scale)
    C, n, m = x.shape[0], x.shape[1], y.shape[1]
    lx = x_lengths if x_lengths is not None else torch.full((C,), n)
    ly = y_lengths if y_lengths is not None else torch.full((C,), m)
    if bool((lx == n).all()) and bool((ly == m).all()):  # lengths that cut nothing
        return _mmd2_dense(x, y, bandwidths, unbiased, bandwidth_scale)
    return _mmd2_masked(x, y, lx.to(x.device), ly.to(x.device), bandwidths, unbiased, bandwidth_scale)


def _mmd2_masked(
    x: torch.Tensor, y: torch.Tensor, lx: torch.Tensor, ly: torch.Tensor, bandwidths: Sequence[float],
    unbiased: bool, scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """`_mmd2_dense` with class c using its first lx[c] / ly[c] rows: every class in one
    batched pass, the padding zeroed first (so a NaN there cannot reach the result or the
    gradient) and masked out of the sums. Slicing each class instead (an earlier version) made
    the backward fill a [C, n, D] zero tensor per class: O(C^2 n D), 35x the C++ op at C = 200."""
    n, m = x.shape[1], y.shape[1]
    mx = torch.arange(n, device=x.device)[None] < lx[:, None]  # [C, n]
    my = torch.arange(m, device=x.device)[None] < ly[:, None]
    x = torch.where(mx[..., None], x, 0)
    y = torch.where(my[..., None], y, 0)
    fx, fy = mx.to(x.dtype), my.to(x.dtype)
    kxx, kyy, kxy = _gram_kernels(x, y, bandwidths, scale)

    def masked_sum(k: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor, same: bool) -> torch.Tensor:
        w = wa[:, :, None] * wb[:, None, :]  # [C, n, m]: 1 where both rows are real
        if same and unbiased:
            w = w * (1 - torch.eye(w.shape[-1], dtype=w.dtype, device=w.device))
        return (k * w).sum((-1, -2))

    nx, ny = lx.to(x.dtype), ly.to(x.dtype)
    cxx, cyy = (nx * (nx - 1), ny * (ny - 1)) if unbiased else (nx * nx, ny * ny)
    xx = masked_sum(kxx, fx, fx, True) / cxx
    yy = masked_sum(kyy, fy, fy, True) / cyy
    return xx + yy - 2 * masked_sum(kxy, fx, fy, False) / (nx * ny)
