"""Differentiable Siamese Augmentation (DSA; Zhao & Bilen 2021) on batches of tensors.

Every op is differentiable with respect to the images, so it applies to decoded synthetic
images as well as to real ones. Random parameters are drawn first (`sample`) and applied
second (`apply`): the distillation unroll replays the exact same augmentation when it
recomputes a step. Images are normalised float tensors [B, C, H, W] on any device.

Ops and their parameter ranges (defaults from the DSA/MTT code, see AugConfig):
    color   brightness x + (u - 0.5) * 1.0; saturation (x - mean_c) * 2u + mean_c;
            contrast (x - mean) * (u + 0.5) + mean            (u ~ U[0, 1) per image)
    crop    integer translation of up to 12.5% of the side, zero fill
    cutout  a zeroed square of half the side, centred uniformly in the image
    flip    horizontal flip with probability 0.5
    scale   independent x/y zoom in [1/1.2, 1.2]
    rotate  rotation in [-15, 15] degrees
Mode "single" draws one op per batch (the reference's default), "all" chains them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from d3fast.compiling import Compiled
from d3fast.config import AUG_OPS, AugConfig
from d3fast.errors import D3FastError

OPS = AUG_OPS  # the op names, in the order one call applies them (d3fast/config.py AugOp)


@dataclass
class AugParams:
    """The random draws of one augmentation call, by op name; replaying them with
    `DSA.apply` reproduces the call exactly."""

    ops: list[str]
    values: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)


class DSA:
    """`compiled`: each op's `apply` runs as a torch.compile graph (distill.compile; one per op
    and grad mode, static shapes): 3-8 fused kernels in place of ~10-30 eager ops. Draws stay
    eager (Dynamo does not trace explicit generators), so the random streams are the same."""

    def __init__(self, cfg: AugConfig, compiled: bool = False):
        self.cfg = cfg
        self.compiled = compiled
        self._compiled_ops: dict[str, Compiled] = {}
        names = [] if cfg.strategy.lower() in ("", "none") else cfg.strategy.split("_")
        unknown = [n for n in names if n not in OPS]
        if unknown:
            raise D3FastError(f"unknown augmentation op(s) {unknown}; known: {', '.join(OPS)}")
        self.ops = names

    def __call__(
        self, x: torch.Tensor, generator: torch.Generator | None = None, op: int | None = None,
        rows: slice | None = None, batch: int | None = None,
    ) -> torch.Tensor:
        """Augment x; with `rows` and `batch`, x holds rows `rows` of a batch of `batch`: the
        draws are made for the whole batch (the generator moves as in one process) and x gets
        its rows' (a rank of a distributed run)."""
        if rows is None:
            return self.apply(x, self.sample(x, generator, op))
        params = self.sample(x, generator, op, batch=batch)
        params.values = {k: {n: t[rows] for n, t in v.items()} for k, v in params.values.items()}
        return self.apply(x, params)

    def draw_ops(self, count: int, host: torch.Generator) -> list[int | None]:
        """The op of each of `count` calls in mode "single", drawn from a CPU generator, so
        that picking them never waits for a GPU (a device draw read back with .item() is a
        sync); None each in mode "all"."""
        if self.cfg.mode != "single" or not self.ops:
            return [None] * count
        return torch.randint(len(self.ops), (count,), generator=host).tolist()

    def sample(
        self, x: torch.Tensor, generator: torch.Generator | None = None, op: int | None = None, batch: int | None = None
    ) -> AugParams:
        """Draw parameters for a batch shaped like `x` ([B, C, H, W]). In mode "single",
        `op` (an index into the strategy's ops, from `draw_ops`) picks the op; without it
        the op is drawn from `generator`, which on a GPU waits for the device. `batch`
        overrides x's batch size."""
        if not self.ops:
            return AugParams([])
        b, _, h, w = x.shape
        b = batch or b
        dev = x.device

        def u(*shape: int) -> torch.Tensor:
            return torch.rand(*shape, generator=generator, device=dev)

        if self.cfg.mode == "single":
            if op is None:
                op = int(torch.randint(len(self.ops), (1,), generator=generator, device=dev).item())
            ops = [self.ops[op]]
        else:
            ops = list(self.ops)
        c = self.cfg
        values: dict[str, dict[str, torch.Tensor]] = {}
        for name in ops:
            if name == "color":
                values[name] = {"brightness": u(b), "saturation": u(b), "contrast": u(b)}
            elif name == "crop":
                sh, sw = int(h * c.ratio_crop_pad + 0.5), int(w * c.ratio_crop_pad + 0.5)
                values[name] = {
                    "dy": torch.randint(-sh, sh + 1, (b,), generator=generator, device=dev),
                    "dx": torch.randint(-sw, sw + 1, (b,), generator=generator, device=dev),
                }
            elif name == "cutout":
                values[name] = {
                    "cy": torch.randint(0, h, (b,), generator=generator, device=dev),
                    "cx": torch.randint(0, w, (b,), generator=generator, device=dev),
                }
            elif name == "flip":
                values[name] = {"flip": u(b) < c.prob_flip}
            elif name == "scale":
                lo = 1.0 / c.ratio_scale
                values[name] = {"sx": u(b) * (c.ratio_scale - lo) + lo, "sy": u(b) * (c.ratio_scale - lo) + lo}
            elif name == "rotate":
                values[name] = {"angle": (u(b) - 0.5) * 2 * c.ratio_rotate / 180 * math.pi}
        return AugParams(ops, values)

    def apply(self, x: torch.Tensor, params: AugParams) -> torch.Tensor:
        for op in params.ops:
            v = params.values[op]
            x = self._op(op)(x, v)
        return x

    def _op(self, name: str) -> Any:
        fn = getattr(self, f"_{name}")
        if not self.compiled:
            return fn
        if name not in self._compiled_ops:
            self._compiled_ops[name] = Compiled(fn, f"DSA's {name}")
        return self._compiled_ops[name]

    def _color(self, x: torch.Tensor, v: dict[str, torch.Tensor]) -> torch.Tensor:
        c = self.cfg
        view = (-1, 1, 1, 1)
        x = x + (v["brightness"].to(x.dtype).view(view) - 0.5) * c.brightness
        m = x.mean(dim=1, keepdim=True)
        x = (x - m) * (v["saturation"].to(x.dtype).view(view) * c.saturation) + m
        m = x.mean(dim=(1, 2, 3), keepdim=True)
        return (x - m) * (v["contrast"].to(x.dtype).view(view) + c.contrast) + m

    def _crop(self, x: torch.Tensor, v: dict[str, torch.Tensor]) -> torch.Tensor:
        b, _, h, w = x.shape
        sh, sw = int(h * self.cfg.ratio_crop_pad + 0.5), int(w * self.cfg.ratio_crop_pad + 0.5)
        xp = F.pad(x, (sw, sw, sh, sh))
        # integer gather keeps pixels exact (no interpolation)
        iy = torch.arange(h, device=x.device)[None] + sh - v["dy"][:, None]  # [B, H]
        ix = torch.arange(w, device=x.device)[None] + sw - v["dx"][:, None]  # [B, W]
        bi = torch.arange(b, device=x.device)[:, None, None]
        out = xp[bi, :, iy[:, :, None], ix[:, None, :]]  # [B, H, W, C]
        return out.permute(0, 3, 1, 2)

    def _cutout(self, x: torch.Tensor, v: dict[str, torch.Tensor]) -> torch.Tensor:
        _, _, h, w = x.shape
        ch, cw = int(h * self.cfg.ratio_cutout + 0.5), int(w * self.cfg.ratio_cutout + 0.5)
        ys = torch.arange(h, device=x.device)[None]  # [1, H]
        xs = torch.arange(w, device=x.device)[None]
        y0 = (v["cy"] - ch // 2)[:, None]
        x0 = (v["cx"] - cw // 2)[:, None]
        in_y = (ys >= y0) & (ys < y0 + ch)  # [B, H]
        in_x = (xs >= x0) & (xs < x0 + cw)  # [B, W]
        keep = ~(in_y[:, :, None] & in_x[:, None, :])  # [B, H, W]
        return x * keep[:, None].to(x.dtype)

    def _flip(self, x: torch.Tensor, v: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.where(v["flip"].view(-1, 1, 1, 1), x.flip(3), x)

    def _affine(self, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=True)
        return F.grid_sample(x, grid, align_corners=True)

    def _scale(self, x: torch.Tensor, v: dict[str, torch.Tensor]) -> torch.Tensor:
        zero = torch.zeros_like(v["sx"])
        theta = torch.stack([torch.stack([v["sx"], zero, zero], 1), torch.stack([zero, v["sy"], zero], 1)], 1)
        return self._affine(x, theta)

    def _rotate(self, x: torch.Tensor, v: dict[str, torch.Tensor]) -> torch.Tensor:
        a = v["angle"]
        cos, sin, zero = torch.cos(a), torch.sin(a), torch.zeros_like(a)
        theta = torch.stack([torch.stack([cos, sin, zero], 1), torch.stack([-sin, cos, zero], 1)], 1)
        return self._affine(x, theta)
