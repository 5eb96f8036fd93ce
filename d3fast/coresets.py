"""Coreset selection: the real-image baselines that pick their images rather than draw them
(docs/algorithm.md section 6), as the dataset-condensation papers report them beside random
real images (DC, Zhao et al. 2021, Table 1; DM, Zhao & Bilen 2023, Table 1).

Both work on one class's feature vectors, features [N, D] of a network trained on the real
data (d3fast: the whole-dataset expert, `d3fast.recipes.label.labelling_network`), and return
k row indices in the order picked. Arithmetic in float64, so a pick does not turn on the
summation order of one CPU; ties go to the lowest index.

herding (Welling 2009, "Herding dynamical weights to learn"; the selection of Rebuffi et al.
2017, iCaRL, Algorithm 4): with mu the class mean, pick at step t = 1..k the unpicked row i
that minimises || mu - (s_{t-1} + f_i) / t ||, s_{t-1} the sum of the rows picked so far: the
running mean of the picks follows the class mean.

k-center greedy (Gonzalez 1985; Sener & Savarese 2018, "Active learning for convolutional
neural networks: a core-set approach", Algorithm 1): the first center is the row nearest the
class mean (a fixed start rather than a random one, so a selection is reproducible without a
seed); then repeatedly the unpicked row farthest from its nearest center (so k distinct rows,
also among duplicates). Its covering radius is at
most 2x the best k centers' (Gonzalez's bound; tests/test_coresets.py checks it by brute
force).
"""

from __future__ import annotations

import torch

from d3fast.errors import D3FastError

CORESETS = ("herding", "kcenter")


def _check(features: torch.Tensor, k: int) -> torch.Tensor:
    if features.dim() != 2 or features.shape[0] < 1:
        raise D3FastError(f"coreset selection takes features [N, D] with N >= 1, got shape {list(features.shape)}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= features.shape[0]:
        raise D3FastError(f"a coreset of {k!r} rows out of {features.shape[0]}: k must be a whole number in "
                          f"1..{features.shape[0]}")
    f = features.detach().to(torch.float64)
    if not torch.isfinite(f).all():
        raise D3FastError("coreset selection got non-finite features (NaN or inf): the feature network diverged")
    return f


def herding(features: torch.Tensor, k: int) -> torch.Tensor:
    """Herding selection (module docstring): k row indices [k] (int64, the order picked).

    Args:
        features: [N, D] one class's features, any floating dtype (computed in float64).
        k: rows to pick, 1 <= k <= N.

    Raises:
        D3FastError: a shape other than [N >= 1, D], k out of range, non-finite features.
    """
    f = _check(features, k)
    mu = f.mean(0)
    picked = torch.zeros(len(f), dtype=torch.bool, device=f.device)
    total = torch.zeros_like(mu)
    out = []
    for t in range(1, k + 1):
        # || mu - (s + f_i) / t ||^2 for every row; picked rows excluded
        gap = ((mu - (total + f) / t) ** 2).sum(1).masked_fill(picked, float("inf"))
        i = int(torch.argmin(gap))  # the first of equal minima: the lowest index
        picked[i] = True
        total += f[i]
        out.append(i)
    return torch.tensor(out, dtype=torch.int64)


def kcenter_greedy(features: torch.Tensor, k: int) -> torch.Tensor:
    """k-center greedy selection (module docstring): k row indices [k] (int64, the order picked).

    Args:
        features: [N, D] one class's features, any floating dtype (computed in float64).
        k: centers to pick, 1 <= k <= N.

    Raises:
        D3FastError: a shape other than [N >= 1, D], k out of range, non-finite features.
    """
    f = _check(features, k)
    first = int(torch.argmin(((f - f.mean(0)) ** 2).sum(1)))
    # squared distance of every row to its nearest center so far
    nearest = ((f - f[first]) ** 2).sum(1)
    out = [first]
    nearest[first] = -1.0  # a picked row is never picked again, even where every other row is at 0
    for _ in range(k - 1):
        i = int(torch.argmax(nearest))  # ties: the lowest index
        out.append(i)
        nearest = torch.minimum(nearest, ((f - f[i]) ** 2).sum(1))
        nearest[out] = -1.0
    return torch.tensor(out, dtype=torch.int64)


def select(method: str, features: torch.Tensor, k: int) -> torch.Tensor:
    """`herding` or `kcenter_greedy` by name ("herding", "kcenter").

    Raises:
        D3FastError: an unknown method, or as the method.
    """
    if method == "herding":
        return herding(features, k)
    if method == "kcenter":
        return kcenter_greedy(features, k)
    raise D3FastError(f"unknown coreset method {method!r}: one of {', '.join(CORESETS)}")
