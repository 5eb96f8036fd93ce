"""Image grids of a distilled distribution (the paper's figures 3-6)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from d3fast.data.normalize import to_pixels
from d3fast.distilled import Distilled, Merged, Sampler
from d3fast.io import atomic_path


def to_uint8(x: torch.Tensor, mean: list[float], std: list[float],
             zca: tuple[torch.Tensor, torch.Tensor] | None = None) -> np.ndarray:
    """Normalised [B, C, H, W] -> uint8 [B, H, W, C]; ZCA-whitened images are de-whitened
    first when the dataset's `zca` = (W, mu) is given (else shown as they are)."""
    px = to_pixels(x.float(), {"mean": mean, "std": std}, zca)
    return (px * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def sample_grid(
    d: Distilled | Merged, out: Path, samples: int = 9, seed: int = 0, scale: int = 0, bn: str = "batch",
    zca: tuple[torch.Tensor, torch.Tensor] | None = None, title: str = "", max_classes: int = 0,
) -> Path:
    """`grid_image` written to `out` as a PNG (atomically)."""
    from PIL.PngImagePlugin import PngInfo

    im = grid_image(d, samples, seed, scale, bn, zca, title, max_classes)
    info = PngInfo()
    info.add_text("Software", GRID_MARK)  # `is_grid`: a later `d3fast sample` may replace it
    with atomic_path(out) as tmp:
        im.save(tmp, format="PNG", pnginfo=info)
    return out


GRID_MARK = "d3fast sample grid"


def is_grid(path: Path) -> bool:
    """Whether `path` is a PNG `sample_grid` wrote."""
    try:
        with Image.open(path) as im:
            return im.format == "PNG" and im.info.get("Software") == GRID_MARK
    except Exception:
        return False


@torch.no_grad()
def grid_image(
    d: Distilled | Merged, samples: int = 9, seed: int = 0, scale: int = 0, bn: str = "batch",
    zca: tuple[torch.Tensor, torch.Tensor] | None = None, title: str = "", max_classes: int = 0,
) -> Image.Image:
    """One row per prior: its mean image f(mu) (the column headed "mean"), then `samples`
    fresh samples (a merged object's classes each through their own subtask's decoder), each
    row named by its class (and prior, with PPC > 1), under `title`. `max_classes` > 0 keeps
    the first classes only (ImageNet's 1,000 rows would be 30,000 pixels tall). BatchNorm
    as `bn` ("batch" or "running": eval.decoder_bn)."""
    sample = Sampler(d, bn)
    dev = d.parts[0].latents.device
    g = torch.Generator(device=dev).manual_seed(seed)
    classes = d.num_classes if max_classes <= 0 else min(max_classes, d.num_classes)
    n = classes * d.ppc
    idx = torch.arange(n, device=dev).repeat_interleave(samples)
    means = sample.means()[:n]  # [n, C, H, W]
    draws = sample(idx, g).view(n, samples, *means.shape[1:])
    imgs = to_uint8(torch.cat([means[:, None], draws], 1).flatten(0, 1), d.meta["mean"], d.meta["std"], zca)
    h, w, c = imgs.shape[1:]
    pad = 2
    grid = np.full((n * (h + pad) + pad, (samples + 1) * (w + pad) + pad, c), 255, np.uint8)
    for i, img in enumerate(imgs):
        r, k = divmod(i, samples + 1)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + k * (w + pad): pad + k * (w + pad) + w] = img
    tiles = Image.fromarray(grid[..., 0] if c == 1 else grid).convert("RGB")
    scale = scale or max(1, 96 // h)  # small images are enlarged to be visible
    if scale > 1:
        tiles = tiles.resize((tiles.width * scale, tiles.height * scale), Image.Resampling.NEAREST)
    rows = [d.classes[r // d.ppc] + (f" #{r % d.ppc}" if d.ppc > 1 else "") for r in range(n)]
    return _labelled(tiles, rows, (h + pad) * scale, (w + pad) * scale, pad * scale, title,
                     more=d.num_classes - classes)


def _labelled(tiles: Image.Image, rows: list[str], row_h: int, col_w: int, pad: int, title: str,
              more: int = 0) -> Image.Image:
    """`tiles` with the row names on the left, "mean" / "samples" over the columns and the title on top."""
    font = ImageFont.load_default()
    draw = ImageDraw.Draw(tiles)
    text_w = max([int(draw.textlength(t, font=font)) for t in rows] + [0]) + 8
    line = 14
    top = 2 * line + 6 if title else line + 4
    bottom = line + 4 if more else 0
    im = Image.new("RGB", (tiles.width + text_w, tiles.height + top + bottom), "white")
    im.paste(tiles, (text_w, top))
    draw = ImageDraw.Draw(im)
    if title:
        draw.text((4, 2), title, fill="black", font=font)
    draw.text((text_w + pad, top - line), "mean", fill=(180, 0, 0), font=font)
    draw.text((text_w + pad + col_w, top - line), "samples ->", fill="black", font=font)
    # a red frame around the mean column tells it from the samples
    draw.rectangle([text_w + pad // 2, top + pad // 2, text_w + col_w, top + tiles.height - pad // 2],
                   outline=(200, 0, 0), width=max(1, pad // 2))
    for r, name in enumerate(rows):
        draw.text((4, top + r * row_h + max(0, (row_h - line) // 2)), name, fill="black", font=font)
    if more:
        draw.text((4, top + tiles.height + 2), f"... {more} more classes (--max-classes 0 shows every class)",
                  fill="black", font=font)
    return im
