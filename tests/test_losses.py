"""Each loss against an independent computation in float64."""

import math

import pytest
import torch

from d3fast import losses
from d3fast.errors import D3FastError

SIGMAS = (1.0, 2.0, 4.0, 8.0, 16.0)


def kernel(a, b, sigmas=SIGMAS):
    d2 = float(((a - b) ** 2).sum())
    return sum(math.exp(-d2 / (2 * s * s)) for s in sigmas)


def mmd2_loops(x, y, unbiased=True, sigmas=SIGMAS):
    """MMD^2 straight from its definition, one pair at a time, in Python floats."""
    n, m = len(x), len(y)
    pairs = lambda a, b, same: [(i, j) for i in range(len(a)) for j in range(len(b)) if not (same and unbiased and i == j)]  # noqa: E731
    xx = [kernel(x[i], x[j], sigmas) for i, j in pairs(x, x, True)]
    yy = [kernel(y[i], y[j], sigmas) for i, j in pairs(y, y, True)]
    xy = [kernel(x[i], y[j], sigmas) for i, j in pairs(x, y, False)]
    assert len(xx) == (n * (n - 1) if unbiased else n * n)
    assert len(yy) == (m * (m - 1) if unbiased else m * m) and len(xy) == n * m
    return sum(xx) / len(xx) + sum(yy) / len(yy) - 2 * sum(xy) / len(xy)


@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("C, n, m, D, scale", [(3, 5, 4, 7, 1.0), (1, 2, 9, 3, 3.0), (2, 6, 6, 129, 0.2)])
def test_mmd2_matches_definition(unbiased, C, n, m, D, scale):
    g = torch.Generator().manual_seed(C * 100 + n)
    x = torch.randn(C, n, D, generator=g, dtype=torch.float64) * scale
    y = torch.randn(C, m, D, generator=g, dtype=torch.float64) * scale + 0.3
    out = losses.mmd2(x.float(), y.float(), SIGMAS, unbiased=unbiased)
    assert out.shape == (C,)
    for c in range(C):
        # float32 op against the float64 definition: its error is relative to the kernel terms
        # (<= 5), ~1e-6 for any summation order (measured: 0.03 of the allowance)
        assert out[c].item() == pytest.approx(mmd2_loops(x[c], y[c], unbiased), rel=1e-4, abs=1e-5)


def test_mmd2_properties_and_errors():
    x = torch.randn(40, 5)
    assert losses.mmd2(x, x, unbiased=False).item() == pytest.approx(0.0, abs=1e-5)  # as above (measured: 0.03)
    assert losses.mmd2(x, x + 3).item() > 0.5
    with pytest.raises(D3FastError, match="unbiased MMD needs >= 2 samples"):
        losses.mmd2(torch.randn(2, 1, 3), torch.randn(2, 5, 3))
    xg = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 5, 3, dtype=torch.float64)
    # the estimator's float64 gradient w.r.t. the synthetic side matches central differences of
    # the float64 definition: their error is O(eps^2) = 1e-10 plus rounding O(2^-53 / eps) = 1e-11,
    # far inside rel 1e-3 (measured: 7e-7 of it)
    out = losses.mmd2(xg, y).sum()
    (grad,) = torch.autograd.grad(out, xg)
    eps, i = 1e-5, (1, 2, 0)
    bump = torch.zeros_like(xg)
    bump[i] = eps
    fd = (mmd2_loops((xg + bump)[1].detach(), y[1]) - mmd2_loops((xg - bump)[1].detach(), y[1])) / (2 * eps)
    assert grad[i].item() == pytest.approx(fd, rel=1e-3, abs=1e-6)


def test_param_dist():
    a, t, s = torch.randn(3, 50, dtype=torch.float64).unbind(0)
    expected = sum((a[i] - t[i]) ** 2 for i in range(50)) / sum((s[i] - t[i]) ** 2 for i in range(50))
    # float64 sums of 50 squares (one sign) both ways: 1e-12 is 100x their rounding bound in any order
    assert losses.param_dist(a, t, s).item() == pytest.approx(expected.item(), rel=1e-12)
    batched = losses.param_dist(torch.stack([a, s]), t, s)
    assert batched[1].item() == pytest.approx(1.0) and batched[0].item() == pytest.approx(expected.item())


def test_kl_matches_torch_distributions():
    mu = torch.randn(6, 64, dtype=torch.float64)
    logvar = torch.randn(6, 64, dtype=torch.float64)
    q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    ref = torch.distributions.kl_divergence(q, p).sum(-1).mean()
    # float64, terms exp(l) - 1 - l + mu^2 >= 0: 1e-12 is 20x their rounding bound in any order (measured: 0)
    assert losses.kl_standard_normal(mu, logvar).item() == pytest.approx(ref.item(), rel=1e-12)
    assert losses.kl_standard_normal(torch.zeros(2, 3), torch.zeros(2, 3)).item() == 0.0


def test_diversity_matches_pairwise_loop():
    imgs = torch.randn(3, 4, 2, 5, 5, dtype=torch.float64)  # [C, PPC, ch, H, W]
    total = 0.0
    for c in range(3):
        pair = [((imgs[c, i] - imgs[c, j]) ** 2).mean().item() for i in range(4) for j in range(4) if i != j]
        total += sum(pair) / len(pair)
    # float64 means of squares both ways (measured: 1e-4 of 1e-12)
    assert losses.diversity(imgs).item() == pytest.approx(-total / 3, rel=1e-12)
    assert losses.diversity(imgs[:, :1]).item() == 0.0
