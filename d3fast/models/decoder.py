"""The shared decoder f_theta of D3: latent z -> image.

Five layouts (docs/algorithm.md section 2); every BatchNorm is a RanksBatchNorm2d:
    paper   Linear(z -> 256*4*4) -> k x [ConvT(4, s2, p1) -> BN -> LeakyReLU], channels
            halving 256 -> 128 -> 64 -> ..., k = log2(res/4) -> Conv3x3 -> tanh
    tiny    the reference code's TinyVAE (decoder.py): width w, start at 2x2, channel
    small   divisors 1, 2, 4, 8, 8, ..., one more block than paper -> Conv3x3 -> tanh.
            "small" is the reference's name for it (its ImageNet-1K 1-IPC budget, w 256)
    medium  the reference's VanillaVAE decoder: start at 2x2 with `top` channels (medium
    large   512, large 1024), from Linear(z -> top*2*2) or, without it, z itself
            reshaped (z_dim = 4*top), then log2(res/2) - 1 blocks
            [ConvT(3, s2, p1, output_padding 1) -> BN -> LeakyReLU] halving the channels,
            one more such block keeping them, Conv3x3 -> tanh. At 64 px the ladder is the
            reference's hidden_dims (medium 512..32, large 1024..64); at other resolutions
            it keeps its top and has one step per doubling (medium 512..64 at 32 px, as
            the reference's CIFAR medium, and 512..16 at 128 px)
The tanh output t in [-1, 1] is read as a pixel value (t + 1) / 2 in [0, 1] and then
normalised with the dataset's mean/std, so decoded images span exactly the range of
normalised real data (about [-2.1, 2.6] on ImageNet statistics) rather than [-1, 1].
LeakyReLU uses PyTorch's default slope 0.01, as the reference does. 28 px decodes at 32
and center-crops.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from d3fast.config import DECODERS, VAE_TOP, vae_z_dim
from d3fast.errors import D3FastError

# start channels of the VanillaVAE layouts: the reference's hidden_dims[-1]


class RanksBatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d (same parameters, buffers and state dict) whose training-mode batch
    statistics span every rank's batch when `spans_ranks` is set (d3fast/dist.py): split
    over W ranks, a decode normalises with the moments a single process would compute on
    all the samples, and its running statistics move the same way (unbiased variance,
    momentum 0.1). The gradient flows through the shared moments (all-reduced back)."""

    spans_ranks: bool = False
    ranks_group: Any = None  # the process group of the ranks it spans (None: the whole job)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.spans_ranks):
            return super().forward(x)
        from d3fast.dist import batch_moments

        # the moments are float64 sums; the output is float32 (float64 in a float64 run)
        mean, var, n = batch_moments(x, self.ranks_group)
        dt = torch.promote_types(x.dtype, torch.float32)
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                m = self.momentum if self.momentum is not None else 0.1
                self.num_batches_tracked.add_(1)  # type: ignore[union-attr]
                self.running_mean.mul_(1 - m).add_(m * mean.to(self.running_mean.dtype))
                self.running_var.mul_(1 - m).add_(m * (var * n / (n - 1)).to(self.running_var.dtype))
        shape = (1, -1) + (1,) * (x.dim() - 2)
        scale = torch.rsqrt(var + self.eps).to(dt).view(shape)
        y = (x.to(dt) - mean.to(dt).view(shape)) * scale
        return y * self.weight.view(shape) + self.bias.view(shape) if self.affine else y


def _up_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.ConvTranspose2d(cin, cout, 4, 2, 1), RanksBatchNorm2d(cout), nn.LeakyReLU())


def _vae_block(cin: int, cout: int) -> nn.Sequential:
    # kernel 3 with output_padding 1 doubles the side exactly, as kernel 4 does above
    return nn.Sequential(nn.ConvTranspose2d(cin, cout, 3, 2, 1, output_padding=1), RanksBatchNorm2d(cout),
                         nn.LeakyReLU())


class Decoder(nn.Module):
    """Args:
        res: output side (28 decodes at 32 and center-crops).
        channels: image channels.
        mean, std: per-channel normalisation of the dataset, [channels] each.
        z_dim: latent size. Default: 64.
        kind: "paper", "tiny", "small", "medium" or "large" (module docstring). Default:
            "paper".
        width: start channels of paper (256) and tiny/small (the reference's kernel_num:
            128 or 256); medium and large ignore it (their top is 512 / 1024). Default: 256.
        linear: medium/large: map z to the 2x2 start with a Linear layer; False reshapes z
            itself, which needs z_dim = 4 * top. paper, tiny and small always have their
            Linear and ignore it. Default: True.
    Input z: [B, z_dim]; output: normalised images [B, channels, res, res].

    Raises:
        D3FastError: an unknown kind, a resolution that is not a power of two >= 8 (or
            28), or medium/large without the linear layer and z_dim != 4 * top.
    """

    mean: torch.Tensor  # [1, channels, 1, 1] buffers
    std: torch.Tensor
    project: nn.Linear | None

    def __init__(
        self,
        res: int,
        channels: int,
        mean: list[float],
        std: list[float],
        z_dim: int = 64,
        kind: str = "paper",
        width: int = 256,
        linear: bool = True,
    ):
        super().__init__()
        out_res = 32 if res == 28 else res
        if out_res < 8 or out_res & (out_res - 1):
            raise D3FastError(f"decoder needs a power-of-two resolution >= 8 (or 28), got {res}")
        self.res, self.z_dim, self.kind = res, z_dim, kind
        doublings = (out_res // 2).bit_length() - 1  # from a 2x2 start: 5 at 64 px
        block = _up_block
        if kind == "paper":
            start, chans = 4, []
            c = width
            for _ in range(doublings - 1):
                chans.append((c, max(c // 2, 1)))
                c = max(c // 2, 1)
        elif kind in ("tiny", "small"):
            start = 2
            div = [1, 2, 4] + [8] * (doublings - 2)
            chans = [(width // div[i], width // div[i + 1]) for i in range(doublings)]
        elif kind in VAE_TOP:
            start, width, block = 2, VAE_TOP[kind], _vae_block
            dims = [max(width >> i, 1) for i in range(doublings)]
            chans = [*zip(dims, dims[1:], strict=False), (dims[-1], dims[-1])]
            if not linear and z_dim != vae_z_dim(kind):
                raise D3FastError(f"a {kind} decoder without its linear layer reshapes z to {width} x 2 x 2: "
                                  f"it needs z_dim {vae_z_dim(kind)}, got {z_dim}")
        else:
            raise D3FastError(f"unknown decoder kind {kind!r}; expected one of {', '.join(DECODERS)}")
        self.linear = linear or kind not in VAE_TOP
        self.start, self.width = start, width  # width: channels of the start tensor
        self.project = nn.Linear(z_dim, width * start * start) if self.linear else None
        self.blocks = nn.Sequential(*[block(a, b) for a, b in chans])
        self.to_image = nn.Conv2d(chans[-1][1], channels, 3, padding=1)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def span_ranks(self, on: bool, group: Any = None) -> None:
        """Batch statistics over every rank's samples (distributed distillation; `group`: the
        ranks of one subtask's world, None the whole job) or this process's alone."""
        for m in self.modules():
            if isinstance(m, RanksBatchNorm2d):
                m.spans_ranks, m.ranks_group = on, group

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = (z if self.project is None else self.project(z)).reshape(-1, self.width, self.start, self.start)
        t = torch.tanh(self.to_image(self.blocks(h)))  # [B, C, R, R] in [-1, 1]
        if self.res == 28:
            t = t[:, :, 2:30, 2:30]
        return ((t + 1) * 0.5 - self.mean) / self.std
