"""Coreset selection (d3fast/coresets.py) against brute-force references written from the
papers' definitions, plus Gonzalez's 2-approximation bound checked over every k-subset."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from d3fast.coresets import herding, kcenter_greedy, select
from d3fast.errors import D3FastError


def brute_herding(f: np.ndarray, k: int) -> list[int]:
    """Welling's herding by definition: at step t every unpicked row is tried, the one whose
    addition brings the mean of the picks nearest the class mean wins (the lowest index on a tie)."""
    mu = f.mean(0)
    picks: list[int] = []
    for _ in range(k):
        best, best_gap = -1, np.inf
        for i in range(len(f)):
            if i in picks:
                continue
            gap = float(np.sum((mu - f[picks + [i]].mean(0)) ** 2))
            if gap < best_gap:
                best, best_gap = i, gap
        picks.append(best)
    return picks


def brute_kcenter(f: np.ndarray, k: int) -> list[int]:
    """k-center greedy by definition: the row nearest the mean, then each time the row whose
    nearest center is farthest, every distance recomputed from the centers."""
    mu = f.mean(0)
    picks = [int(np.argmin([np.sum((x - mu) ** 2) for x in f]))]
    while len(picks) < k:
        far = [-1.0 if i in picks else min(np.sum((x - f[c]) ** 2) for c in picks) for i, x in enumerate(f)]
        picks.append(int(np.argmax(far)))
    return picks


def radius(f: np.ndarray, centers: list[int] | tuple[int, ...]) -> float:
    return max(min(np.linalg.norm(x - f[c]) for c in centers) for x in f)


SHAPES = [(1, 3, 1), (5, 1, 3), (9, 4, 9), (17, 7, 5), (33, 2048, 6), (64, 30, 16)]


@pytest.mark.parametrize(("n", "d", "k"), SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_herding_and_kcenter_pick_as_the_brute_force_definitions(n, d, k, dtype):
    g = torch.Generator().manual_seed(n * 1000 + d)
    f = torch.randn(n, d, generator=g).to(dtype)
    ref = f.double().numpy()  # both see the same (rounded) values
    assert herding(f, k).tolist() == brute_herding(ref, k)
    assert kcenter_greedy(f, k).tolist() == brute_kcenter(ref, k)


def test_herding_follows_the_class_mean_better_than_random_picks():
    # what herding is for: the mean of its k picks is nearer the class mean than that of k
    # random rows (every k, against 200 random draws' median)
    g = torch.Generator().manual_seed(1)
    f = torch.randn(300, 16, generator=g) * torch.linspace(0.1, 3, 16)
    mu = f.mean(0)
    for k in (1, 4, 16):
        ours = float(((f[herding(f, k)].mean(0) - mu) ** 2).sum())
        rand = [float(((f[torch.randperm(300, generator=g)[:k]].mean(0) - mu) ** 2).sum()) for _ in range(200)]
        assert ours < np.median(rand)


@pytest.mark.parametrize("seed", range(6))
def test_kcenter_greedy_covers_within_twice_the_best_radius(seed):
    # Gonzalez (1985): the greedy centers' covering radius is at most 2x the optimum, checked
    # against every k-subset of a small set (clustered, so that the optimum is far from trivial)
    g = torch.Generator().manual_seed(seed)
    f = torch.cat([torch.randn(4, 3, generator=g) * 0.2 + 3 * torch.randn(3, generator=g) for _ in range(3)])
    x = f.double().numpy()
    for k in (1, 2, 3, 4):
        best = min(radius(x, c) for c in itertools.combinations(range(len(x)), k))
        assert radius(x, kcenter_greedy(f, k).tolist()) <= 2 * best + 1e-12


def test_orders_are_prefixes_and_picks_are_distinct():
    f = torch.randn(40, 5, generator=torch.Generator().manual_seed(3))
    for method in ("herding", "kcenter"):
        whole = select(method, f, 40)
        assert sorted(whole.tolist()) == list(range(40))  # every row once
        for k in (1, 7, 23):
            assert select(method, f, k).tolist() == whole[:k].tolist()


def test_duplicate_rows_tie_to_the_lowest_index_and_are_picked_once():
    f = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0], [-1.0, 0.0]])
    assert herding(f, 1).tolist() == [1]  # rows 1 and 2 are the mean
    assert kcenter_greedy(f, 3).tolist() == [1, 0, 3]
    # every remaining row at distance 0 from a center: still k distinct rows
    assert kcenter_greedy(f, 4).tolist() == [1, 0, 3, 2]
    assert kcenter_greedy(torch.zeros(5, 3), 3).tolist() == [0, 1, 2]
    assert kcenter_greedy(torch.tensor([[0.0, 0], [0, 0], [0, 0], [1, 1]]), 4).tolist() == [0, 3, 1, 2]


@pytest.mark.parametrize(("features", "k", "match"), [
    (torch.zeros(0, 3), 1, r"N >= 1"),
    (torch.zeros(4), 1, r"features \[N, D\]"),
    (torch.zeros(4, 3), 0, r"1\.\.4"),
    (torch.zeros(4, 3), 5, r"1\.\.4"),
    (torch.zeros(4, 3), True, r"whole number"),
    (torch.zeros(4, 3), 2.0, r"whole number"),
    (torch.tensor([[0.0, float("nan")], [1.0, 1.0]]), 1, r"non-finite"),
    (torch.tensor([[0.0, float("inf")], [1.0, 1.0]]), 1, r"non-finite"),
])
def test_bad_input_is_one_clear_error(features, k, match):
    for method in ("herding", "kcenter"):
        with pytest.raises(D3FastError, match=match):
            select(method, features, k)
    with pytest.raises(D3FastError, match="unknown coreset method 'kmeans'"):
        select("kmeans", torch.zeros(3, 2), 1)
