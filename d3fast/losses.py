"""The loss terms of D3 (docs/algorithm.md section 5), as plain PyTorch.

mmd2 and param_dist run the fused ops of d3fast.kernels (references beside them in
kernels/<op>_ref.py); the other terms are small and stay plain PyTorch.

    mmd2(x, y)            per class c, with k(a, b) = sum_s exp(-||a - b||^2 / (2 s^2)):
                          unbiased  mean_{i!=j} k(x_i, x_j) + mean_{i!=j} k(y_i, y_j) - 2 mean_{i,j} k(x_i, y_j)
                          biased    the same with i = j included
    param_dist        ||a - t||^2 / ||s - t||^2 over the flat parameter vector
    kl_standard_normal    KL(N(mu, diag exp(logvar)) || N(0, I)) = 1/2 sum(exp(logvar) + mu^2 - 1 - logvar),
                          averaged over priors
    diversity             minus the mean, over classes with >= 2 priors and over their pairs,
                          of the mean squared difference of two decoded mean images
    soft_cross_entropy    T^2 mean_b sum_c -q_T[b, c] log softmax(z[b] / T)_c, q_T = q^(1/T) / sum q^(1/T)
                          (students on soft labels; Hinton et al. 2015, "Distilling the knowledge
                          in a neural network", with stored probabilities instead of logits)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from d3fast import kernels
from d3fast.kernels import DEFAULT_BANDWIDTHS, pairwise_sq_dists

__all__ = ["diversity", "kl_standard_normal", "mmd2", "pairwise_sq_dists", "param_dist", "soft_cross_entropy"]


def mmd2(
    x: torch.Tensor,
    y: torch.Tensor,
    bandwidths: Sequence[float] = DEFAULT_BANDWIDTHS,
    unbiased: bool = True,
    bandwidth_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Squared MMD with a mixture of Gaussian kernels, batched over classes: [C, n, D] and
    [C, m, D] (or [n, D] and [m, D]) -> [C] (or a scalar). The fused op of d3fast.kernels
    (Triton on CUDA, C++ on CPU, kernels/mmd_ref.py otherwise); see `kernels.mmd2`.
    `bandwidth_scale`: a 0-d tensor multiplying every bandwidth (the median heuristic).

    Raises:
        D3FastError: n < 2 or m < 2 with the unbiased estimator.
    """
    return kernels.mmd2(x, y, bandwidths, unbiased, bandwidth_scale=bandwidth_scale)


def param_dist(a: torch.Tensor, target: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """||a - target||^2 / ||start - target||^2 for flat vectors [P] (or batches [S, P] -> [S]);
    the fused op of d3fast.kernels, see `kernels.param_dist`."""
    return kernels.param_dist(a, target, start)


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


def soft_cross_entropy(logits: torch.Tensor, probs: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Cross-entropy of a student against soft labels, at temperature T.

    Args:
        logits: [B, C] student outputs.
        probs: [B, C] target probabilities (rows sum to 1), e.g. an expert's softmax.
        temperature: T > 0; the targets are sharpened (T < 1) or flattened (T > 1) as
            q^(1/T) renormalised, which is softmax(log q / T): the softmax of the expert's
            logits at temperature T. The T^2 factor keeps the gradient's scale independent of T.
    Returns:
        0-d tensor: the mean over the batch. At T = 1 this is torch's cross-entropy with
        probability targets (the reference's soft-label training).
    """
    log_q = torch.log(probs.clamp_min(1e-12)) / temperature
    target = torch.softmax(log_q, dim=1)
    return -(target * torch.log_softmax(logits / temperature, dim=1)).sum(1).mean() * temperature**2
