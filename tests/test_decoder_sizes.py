"""The reference code's decoder sizes: small (TinyVAE), medium and large (VanillaVAE)."""

import pytest
import torch

from d3fast.config import resolve_config
from d3fast.distilled import Distilled, build_decoder, init_distilled
from d3fast.errors import D3FastError
from d3fast.models import Decoder
from d3fast.models.decoder import VAE_TOP


def _counts(dec: Decoder) -> tuple[int, int]:
    """(learnable parameters, BatchNorm running statistics)."""
    params = sum(p.numel() for p in dec.parameters())
    stats = sum(b.numel() for n, b in dec.named_buffers() if n.endswith(("running_mean", "running_var")))
    return params, stats


@pytest.mark.parametrize("kind, width, linear", [
    ("paper", 256, True), ("tiny", 64, True), ("small", 128, True),
    ("medium", 256, True), ("medium", 256, False), ("large", 256, True), ("large", 256, False),
])
@pytest.mark.parametrize("res, channels", [(28, 1), (32, 3), (64, 3), (64, 1), (128, 3)])
def test_output_shapes_and_range(kind, width, linear, res, channels):
    z_dim = 64 if linear else 4 * VAE_TOP[kind]
    dec = Decoder(res, channels, [0.4] * channels, [0.2] * channels, z_dim=z_dim, kind=kind, width=width,
                  linear=linear)
    x = dec(torch.randn(3, z_dim) * 10)
    assert x.shape == (3, channels, res, res)
    lo, hi = (0 - 0.4) / 0.2, (1 - 0.4) / 0.2
    # elementwise float32 on values <= 3: a few ulps (2.4e-7) past the exact bounds at most
    assert x.min() >= lo - 1e-5 and x.max() <= hi + 1e-5


@pytest.mark.parametrize("res, medium", [(32, [256, 128, 64, 64]), (64, [256, 128, 64, 32, 32]),
                                         (128, [256, 128, 64, 32, 16, 16])])
def test_ladders(res, medium):
    # the reference's VanillaVAE at 64 px: hidden_dims [32, 64, 128, 256, 512] reversed, 4
    # halving blocks (2 -> 32 px) and a final block 32 -> 64 px keeping 32 channels; its
    # CIFAR medium (32 px) is [64, 128, 256, 512]
    dec = Decoder(res, 3, [0.5] * 3, [0.5] * 3, kind="medium")
    convt = [m for m in dec.modules() if isinstance(m, torch.nn.ConvTranspose2d)]
    assert convt[0].in_channels == 512 and [m.out_channels for m in convt] == medium
    assert all(m.kernel_size == (3, 3) and m.output_padding == (1, 1) for m in convt)
    large = Decoder(res, 3, [0.5] * 3, [0.5] * 3, kind="large")
    assert [m.out_channels for m in large.modules() if isinstance(m, torch.nn.ConvTranspose2d)] == [2 * c for c in medium]
    assert dec.project is not None and dec.project.out_features == 512 * 4
    # the layout width is ignored by medium and large
    assert Decoder(res, 3, [0.5] * 3, [0.5] * 3, kind="medium", width=7).state_dict().keys() == dec.state_dict().keys()


# Parameter counts of the reference code (sunnytqin/D3, decoder.py), obtained once by
# instantiating its classes with 3 channels and summing `p.numel()` over `parameters()`
# (learnable) and over the BatchNorm running_mean/running_var buffers (statistics):
#   TinyVAE("t", 64, 3, kernel_num=256, z_size=64)
#   VanillaVAE(3, latent_dim=2048, hidden_dims=[32, 64, 128, 256, 512], linear_decode=True)
#   VanillaVAE(3, latent_dim=64, hidden_dims=[32, 64, 128, 256, 512], linear_decode=True)
#   VanillaVAE(3, latent_dim=4096, hidden_dims=[64, 128, 256, 512, 1024], linear_decode=False)
#   VanillaVAE(3, latent_dim=64, hidden_dims=[64, 128, 256, 512, 1024], linear_decode=True)
@pytest.mark.parametrize("kind, width, z_dim, linear, params, stats", [
    ("small", 256, 64, True, 789_187, 576),
    ("medium", 256, 2048, True, 5_774_691, 1024),
    ("medium", 256, 64, True, 1_711_459, 1024),
    ("large", 256, 4096, False, 6_308_547, 2048),
    ("large", 256, 64, True, 6_574_787, 2048),
])
def test_parameter_counts_equal_the_reference(kind, width, z_dim, linear, params, stats):
    with torch.device("meta"):
        dec = Decoder(64, 3, [0.5] * 3, [0.5] * 3, z_dim=z_dim, kind=kind, width=width, linear=linear)
    assert _counts(dec) == (params, stats)


def test_small_is_tiny():
    torch.manual_seed(0)
    a = Decoder(64, 3, [0.5] * 3, [0.5] * 3, kind="tiny", width=128)
    torch.manual_seed(0)
    b = Decoder(64, 3, [0.5] * 3, [0.5] * 3, kind="small", width=128, linear=False)  # linear ignored
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    z = torch.randn(4, 64)
    assert torch.equal(a(z), b(z))


@pytest.mark.parametrize("kind, need", [("medium", 2048), ("large", 4096)])
def test_without_linear_layer_z_dim_must_fill_the_start(kind, need):
    with pytest.raises(D3FastError, match=f"needs z_dim {need}, got 64"):
        Decoder(64, 3, [0.5] * 3, [0.5] * 3, z_dim=64, kind=kind, linear=False)
    dec = Decoder(64, 3, [0.5] * 3, [0.5] * 3, z_dim=need, kind=kind, linear=False)
    assert dec.project is None and not any(k.startswith("project") for k in dec.state_dict())
    with pytest.raises(D3FastError, match=f"distill.decoder_linear=false.*needs z_dim {need}, got 64"):
        resolve_config("digits", overrides=[f"distill.decoder={kind}", "distill.decoder_linear=false"])
    cfg = resolve_config("digits", overrides=[f"distill.decoder={kind}", "distill.decoder_linear=false",
                                              f"distill.z_dim={need}"])
    assert not cfg.distill.decoder_linear


def test_unknown_kind_is_refused():
    with pytest.raises(D3FastError, match="paper, tiny, small, medium, large"):
        Decoder(32, 3, [0.5] * 3, [0.5] * 3, kind="huge")


def test_mean_images_without_linear_layer():
    # mean images feed the latents' means, a strided view, straight into the reshape
    meta = {"resolution": 32, "channels": 3, "mean": [0.5] * 3, "std": [0.5] * 3, "z_dim": 2048,
            "decoder": "medium", "decoder_width": 256, "decoder_linear": False}
    d = init_distilled(2, 2, ["a", "b"], meta, 0.01, torch.device("cpu"), 0)
    assert d.mean_images().shape == (4, 3, 32, 32)
    back = Distilled.from_state_dict(d.state_dict())
    assert back.decoder.project is None and torch.equal(back.latents, d.latents.detach())


def test_meta_without_decoder_linear_builds():
    # checkpoints and exports written before decoder_linear existed
    meta = {"resolution": 32, "channels": 3, "mean": [0.5] * 3, "std": [0.5] * 3, "z_dim": 64,
            "decoder": "paper", "decoder_width": 32}
    dec = build_decoder(meta)
    assert dec.linear and dec.project is not None
    d = init_distilled(2, 1, ["a", "b"], meta, 0.01, torch.device("cpu"), 0)
    back = Distilled.from_state_dict(d.state_dict())
    assert back.decoder.state_dict().keys() == d.decoder.state_dict().keys()
    assert build_decoder({**meta, "decoder": "medium"}).project is not None
    with pytest.raises(D3FastError, match="decoder_linear must be true or false"):
        build_decoder({**meta, "decoder_linear": "no"})
