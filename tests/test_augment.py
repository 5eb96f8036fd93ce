import math

import pytest
import torch

from d3fast.config import AugConfig
from d3fast.data.augment import DSA, OPS, AugParams


def dsa(strategy="color_crop_cutout_flip_scale_rotate", mode="single", **kw):
    return DSA(AugConfig(strategy=strategy, mode=mode, **kw))


def test_flip_exact():
    x = torch.randn(4, 3, 5, 7)
    flags = torch.tensor([True, False, True, False])
    out = dsa("flip").apply(x, AugParams(["flip"], {"flip": {"flip": flags}}))
    assert torch.equal(out[0], x[0].flip(2)) and torch.equal(out[1], x[1])


def test_crop_is_integer_translation_with_zero_fill():
    x = torch.randn(2, 3, 9, 8)
    p = AugParams(["crop"], {"crop": {"dy": torch.tensor([1, -1]), "dx": torch.tensor([-2, 0])}})
    out = dsa("crop", ratio_crop_pad=0.25).apply(x, p)  # shifts of up to 2 px
    # independent formula: out[i, j] = x[i - dy, j - dx], zero outside
    for b, (dy, dx) in enumerate([(1, -2), (-1, 0)]):
        ref = torch.zeros_like(x[b])
        for i in range(9):
            for j in range(8):
                si, sj = i - dy, j - dx
                if 0 <= si < 9 and 0 <= sj < 8:
                    ref[:, i, j] = x[b, :, si, sj]
        assert torch.equal(out[b], ref)


def test_cutout_zeroes_a_clipped_square():
    x = torch.ones(2, 1, 10, 10)
    p = AugParams(["cutout"], {"cutout": {"cy": torch.tensor([5, 0]), "cx": torch.tensor([5, 9])}})
    out = dsa("cutout").apply(x, p)
    assert (out[0] == 0).sum() == 25  # 5x5 square inside
    assert torch.all(out[0, 0, 3:8, 3:8] == 0)
    assert (out[1] == 0).sum() == 3 * 3  # clipped at the corner: rows 0..2, cols 7..9


def test_color_brightness_alone():
    x = torch.randn(3, 3, 4, 4)
    half = torch.full((3,), 0.5)  # saturation 2*0.5 = 1 and contrast 0.5+0.5 = 1: no-ops
    b = torch.tensor([0.0, 0.5, 0.9])
    out = dsa("color").apply(x, AugParams(["color"], {"color": {"brightness": b, "saturation": half, "contrast": half}}))
    # float32 elementwise (no summation order) on unit-scale values: a few roundings of 6e-8
    # (measured: 0.008 of the allowance)
    torch.testing.assert_close(out, x + (b - 0.5).view(-1, 1, 1, 1), rtol=1e-5, atol=1e-5)


def test_identity_scale_and_rotation_and_quarter_turn():
    x = torch.randn(2, 3, 6, 6)
    one = torch.ones(2)
    aug = dsa("scale_rotate", mode="all")
    out = aug.apply(x, AugParams(["scale"], {"scale": {"sx": one, "sy": one}}))
    # bilinear sampling at grid points computed in float32 (measured: 0.013 of the allowance)
    torch.testing.assert_close(out, x, rtol=1e-5, atol=1e-5)
    quarter = torch.full((2,), math.pi / 2)
    out = aug.apply(x, AugParams(["rotate"], {"rotate": {"angle": quarter}}))
    # a positive angle turns the picture clockwise (torch.rot90 with k=-1)
    # cos(pi/2) = -4.4e-8 in float32 moves the grid by that much (measured: 0.07 of the allowance)
    torch.testing.assert_close(out, torch.rot90(x, -1, dims=(2, 3)), rtol=1e-5, atol=1e-5)


def test_sampling_is_reproducible_and_single_mode_picks_one():
    x = torch.randn(8, 3, 16, 16)
    aug = dsa()
    outs = []
    for seed in (5, 5, 6):
        g = torch.Generator().manual_seed(seed)
        outs.append(aug(x, g))
    assert torch.equal(outs[0], outs[1])
    seen = set()
    for seed in range(40):
        p = aug.sample(x, torch.Generator().manual_seed(seed))
        assert len(p.ops) == 1
        seen.add(p.ops[0])
    assert seen == set(OPS)
    p = dsa(mode="all").sample(x, torch.Generator().manual_seed(0))
    assert p.ops == list(OPS)
    # replaying sampled parameters reproduces the call exactly
    p = dsa(mode="all").sample(x, torch.Generator().manual_seed(3))
    assert torch.equal(dsa(mode="all").apply(x, p), dsa(mode="all").apply(x, p))


@pytest.mark.parametrize("op", OPS)
def test_gradients_flow_exactly(op):
    """gradcheck in float64: every op is differentiable w.r.t. the images (odd shape)."""
    x = torch.randn(2, 3, 5, 7, dtype=torch.float64, requires_grad=True)
    aug = dsa(op)
    p = aug.sample(x, torch.Generator().manual_seed(1))
    p.values = {k: {n: (t.double() if t.is_floating_point() else t) for n, t in v.items()} for k, v in p.values.items()}
    assert torch.autograd.gradcheck(lambda t: aug.apply(t, p), (x,))


def test_one_channel_and_none():
    x = torch.randn(3, 1, 11, 13)
    assert dsa(mode="all")(x, torch.Generator().manual_seed(0)).shape == x.shape
    assert dsa("none")(x) is x
    with pytest.raises(Exception, match="unknown augmentation op"):
        dsa("color_blur")
