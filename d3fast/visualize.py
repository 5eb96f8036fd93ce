"""Image grids of a distilled distribution (the paper's figures 3-6)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from d3fast.distilled import Distilled
from d3fast.io import atomic_path


def to_uint8(x: torch.Tensor, mean: list[float], std: list[float]) -> np.ndarray:
    """Normalised [B, C, H, W] -> uint8 [B, H, W, C] (ZCA-whitened images are shown as is)."""
    m = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    px = ((x * s + m).clamp(0, 1) * 255).round().to(torch.uint8)
    return px.permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def sample_grid(d: Distilled, out: Path, samples: int = 9, seed: int = 0, scale: int = 0) -> Path:
    """One row per prior: its mean image f(mu), then `samples` fresh samples."""
    decoder = copy.deepcopy(d.decoder).train()
    g = torch.Generator(device=d.latents.device).manual_seed(seed)
    n = len(d.latents)
    idx = torch.arange(n, device=d.latents.device).repeat_interleave(samples)
    means = decoder(d.latents[..., 0])  # [n, C, H, W]
    draws = decoder(d.sample_latents(idx, g)).view(n, samples, *means.shape[1:])
    imgs = to_uint8(torch.cat([means[:, None], draws], 1).flatten(0, 1), d.meta["mean"], d.meta["std"])
    h, w, c = imgs.shape[1:]
    pad = 2
    grid = np.full((n * (h + pad) + pad, (samples + 1) * (w + pad) + pad, c), 255, np.uint8)
    for i, img in enumerate(imgs):
        r, k = divmod(i, samples + 1)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + k * (w + pad): pad + k * (w + pad) + w] = img
    im = Image.fromarray(grid[..., 0] if c == 1 else grid)
    scale = scale or max(1, 96 // h)  # small images are enlarged to be visible
    if scale > 1:
        im = im.resize((im.width * scale, im.height * scale), Image.Resampling.NEAREST)
    with atomic_path(out) as tmp:
        im.save(tmp, format="PNG")
    return out
