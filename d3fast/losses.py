"""The loss terms of D3 (SPEC.md section 5), as plain PyTorch.

These are the references: the fused kernels (issue 4) plug in behind the same functions.

    mmd2(x, y)            per class c, with k(a, b) = sum_s exp(-||a - b||^2 / (2 s^2)):
                          unbiased  mean_{i!=j} k(x_i, x_j) + mean_{i!=j} k(y_i, y_j) - 2 mean_{i,j} k(x_i, y_j)
                          biased    the same with i = j included
    param_distance        ||a - t||^2 / ||s - t||^2 over the flat parameter vector
    kl_standard_normal    KL(N(mu, diag exp(logvar)) || N(0, I)) = 1/2 sum(exp(logvar) + mu^2 - 1 - logvar),
                          averaged over priors
    diversity             minus the mean, over classes with >= 2 priors and over their pairs,
                          of the mean squared difference of two decoded mean images
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from d3fast.errors import D3FastError


def pairwise_sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[..., n, D], [..., m, D] -> [..., n, m] squared Euclidean distances (>= 0)."""
    a2 = (a * a).sum(-1, keepdim=True)  # [..., n, 1]
    b2 = (b * b).sum(-1, keepdim=True).transpose(-1, -2)  # [..., 1, m]
    return (a2 + b2 - 2 * a @ b.transpose(-1, -2)).clamp_min(0)


def mmd2(
    x: torch.Tensor,
    y: torch.Tensor,
    bandwidths: Sequence[float] = (1.0, 2.0, 4.0, 8.0, 16.0),
    unbiased: bool = True,
) -> torch.Tensor:
    """Squared MMD with a mixture of Gaussian kernels, batched over classes.

    Args:
        x: [C, n, D] (or [n, D]) samples of the first distribution (synthetic).
        y: [C, m, D] (or [m, D]) samples of the second (real).
        bandwidths: the sigmas s of the kernel mixture. Default: 1, 2, 4, 8, 16.
        unbiased: drop the i = j terms of the within-sample means. Default: True.
    Returns:
        [C] (or a scalar) MMD^2 estimates; the unbiased one can be slightly negative.
    Raises:
        D3FastError: n < 2 or m < 2 with the unbiased estimator.
    """
    squeeze = x.dim() == 2
    if squeeze:
        x, y = x[None], y[None]
    n, m = x.shape[-2], y.shape[-2]
    if unbiased and (n < 2 or m < 2):
        raise D3FastError(f"unbiased MMD needs >= 2 samples per side, got {n} and {m}")
    x, y = x.float(), y.float()

    def k(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        d2 = pairwise_sq_dists(a, b)
        return sum(torch.exp(-d2 / (2 * s * s)) for s in bandwidths)

    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    if unbiased:
        # the diagonal of a Gaussian kernel is exactly len(bandwidths)
        diag = float(len(bandwidths))
        xx = (kxx.sum((-1, -2)) - n * diag) / (n * (n - 1))
        yy = (kyy.sum((-1, -2)) - m * diag) / (m * (m - 1))
    else:
        xx, yy = kxx.mean((-1, -2)), kyy.mean((-1, -2))
    out = xx + yy - 2 * kxy.mean((-1, -2))
    return out[0] if squeeze else out


def param_distance(a: torch.Tensor, target: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """||a - target||^2 / ||start - target||^2 for flat vectors [P] (or batches [S, P] -> [S])."""
    num = ((a - target) ** 2).sum(-1)
    den = ((start - target) ** 2).sum(-1)
    return num / den


def kl_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Mean over priors of KL(N(mu, exp(logvar)) || N(0, I)); mu, logvar: [K, z]."""
    return 0.5 * (logvar.exp() + mu * mu - 1 - logvar).sum(-1).mean()


def diversity(mean_images: torch.Tensor) -> torch.Tensor:
    """mean_images: [C, PPC, ...] decoded f(mu). Returns minus the mean pairwise mean squared
    difference within classes (0 when PPC < 2), so minimising it pushes priors apart. The
    decoder's tanh bounds the images, so the term is bounded below."""
    c, p = mean_images.shape[:2]
    if p < 2:
        return mean_images.new_zeros(())
    flat = mean_images.reshape(c, p, -1)
    d2 = pairwise_sq_dists(flat, flat) / flat.shape[-1]  # [C, P, P]
    return -d2.sum((-1, -2)).mean() / (p * (p - 1))
