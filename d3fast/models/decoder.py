"""The shared decoder f_theta of D3: latent z (64-d) -> image.

Two layouts (docs/algorithm.md section 2):
    paper  Linear(z -> 256*4*4) -> k x [ConvT(4, s2, p1) -> BN -> LeakyReLU], channels
           halving 256 -> 128 -> 64 -> ..., k = log2(res/4) -> Conv3x3 -> tanh
    tiny   the reference code's TinyVAE: width w (128/256), start at 2x2, channel
           divisors 1, 2, 4, 8, 8, ..., one more block than paper -> Conv3x3 -> tanh
The tanh output t in [-1, 1] is read as a pixel value (t + 1) / 2 in [0, 1] and then
normalised with the dataset's mean/std, so decoded images span exactly the range of
normalised real data (about [-2.1, 2.6] on ImageNet statistics) rather than [-1, 1].
LeakyReLU uses PyTorch's default slope 0.01, as the reference does.
"""

from __future__ import annotations

import torch
from torch import nn

from d3fast.errors import D3FastError


class RanksBatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d (same parameters, buffers and state dict) whose training-mode batch
    statistics span every rank's batch when `spans_ranks` is set (d3fast/dist.py): split
    over W ranks, a decode normalises with the moments a single process would compute on
    all the samples, and its running statistics move the same way (unbiased variance,
    momentum 0.1). The gradient flows through the shared moments (all-reduced back)."""

    spans_ranks: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.spans_ranks):
            return super().forward(x)
        from d3fast.dist import batch_moments

        mean, var, n = batch_moments(x.float())
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                m = self.momentum if self.momentum is not None else 0.1
                self.num_batches_tracked.add_(1)  # type: ignore[union-attr]
                self.running_mean.mul_(1 - m).add_(m * mean.float())
                self.running_var.mul_(1 - m).add_(m * (var * n / (n - 1)).float())
        shape = (1, -1) + (1,) * (x.dim() - 2)
        scale = torch.rsqrt(var + self.eps).float().view(shape)
        y = (x.float() - mean.float().view(shape)) * scale
        return y * self.weight.view(shape) + self.bias.view(shape) if self.affine else y


def _up_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.ConvTranspose2d(cin, cout, 4, 2, 1), RanksBatchNorm2d(cout), nn.LeakyReLU())


class Decoder(nn.Module):
    """Args:
        res: output side (28 decodes at 32 and center-crops).
        channels: image channels.
        mean, std: per-channel normalisation of the dataset, [channels] each.
        z_dim: latent size. Default: 64.
        kind: "paper" or "tiny". Default: "paper".
        width: start channels (paper: 256; tiny: kernel_num, 128 or 256). Default: 256.
    Input z: [B, z_dim]; output: normalised images [B, channels, res, res].
    """

    mean: torch.Tensor  # [1, channels, 1, 1] buffers
    std: torch.Tensor

    def __init__(
        self,
        res: int,
        channels: int,
        mean: list[float],
        std: list[float],
        z_dim: int = 64,
        kind: str = "paper",
        width: int = 256,
    ):
        super().__init__()
        out_res = 32 if res == 28 else res
        if out_res < 8 or out_res & (out_res - 1):
            raise D3FastError(f"decoder needs a power-of-two resolution >= 8 (or 28), got {res}")
        self.res, self.z_dim, self.kind = res, z_dim, kind
        if kind == "paper":
            start, chans = 4, []
            c = width
            for _ in range((out_res // 4).bit_length() - 1):
                chans.append((c, max(c // 2, 1)))
                c = max(c // 2, 1)
        elif kind == "tiny":
            start = 2
            n_blocks = (out_res // 2).bit_length() - 1
            div = [1, 2, 4] + [8] * (n_blocks - 2)
            chans = [(width // div[i], width // div[i + 1]) for i in range(n_blocks)]
        else:
            raise D3FastError(f"unknown decoder kind {kind!r}; expected paper or tiny")
        self.start, self.width = start, width
        self.project = nn.Linear(z_dim, width * start * start)
        self.blocks = nn.Sequential(*[_up_block(a, b) for a, b in chans])
        self.to_image = nn.Conv2d(chans[-1][1], channels, 3, padding=1)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def span_ranks(self, on: bool) -> None:
        """Batch statistics over every rank's samples (distributed distillation) or this
        process's alone."""
        for m in self.modules():
            if isinstance(m, RanksBatchNorm2d):
                m.spans_ranks = on

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.project(z).view(-1, self.width, self.start, self.start)
        t = torch.tanh(self.to_image(self.blocks(h)))  # [B, C, R, R] in [-1, 1]
        if self.res == 28:
            t = t[:, :, 2:30, 2:30]
        return ((t + 1) * 0.5 - self.mean) / self.std
