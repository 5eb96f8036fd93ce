"""Image grids of a distilled distribution (the paper's figures 3-6)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from d3fast.distilled import Distilled, Merged, Sampler
from d3fast.io import atomic_path


def to_uint8(x: torch.Tensor, mean: list[float], std: list[float]) -> np.ndarray:
    """Normalised [B, C, H, W] -> uint8 [B, H, W, C] (ZCA-whitened images are shown as is)."""
    m = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    px = ((x * s + m).clamp(0, 1) * 255).round().to(torch.uint8)
    return px.permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def sample_grid(d: Distilled | Merged, out: Path, samples: int = 9, seed: int = 0, scale: int = 0) -> Path:
    """One row per prior: its mean image f(mu), then `samples` fresh samples (a merged
    object's classes each through their own subtask's decoder)."""
    sample = Sampler(d, "batch")
    dev = d.parts[0].latents.device
    g = torch.Generator(device=dev).manual_seed(seed)
    n = d.num_priors
    idx = torch.arange(n, device=dev).repeat_interleave(samples)
    means = sample.means()  # [n, C, H, W]
    draws = sample(idx, g).view(n, samples, *means.shape[1:])
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
