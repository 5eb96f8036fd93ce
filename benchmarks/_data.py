"""ImageNet-like JPEG trees for loader and prepare benchmarks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from d3fast.data.datasets import IMAGENETTE


def imagenet_like(w: int, h: int, rng: np.random.Generator) -> Image.Image:
    """Texture at several scales plus pixel noise: compresses like a photo (about 100 KB at
    500x375, quality 90), unlike a smooth gradient that JPEG squeezes to a few KB."""
    acc = np.zeros((h, w, 3), np.float32)
    for cells, amp in ((4, 90), (16, 50), (64, 30)):
        field = rng.normal(0, 1, (cells * h // w + 1, cells, 3)).astype(np.float32)
        im = Image.fromarray(((field - field.min()) / (np.ptp(field) + 1e-6) * 255).astype(np.uint8))
        acc += (np.asarray(im.resize((w, h), Image.Resampling.BICUBIC), np.float32) - 128) * amp / 128
    acc += rng.normal(0, 12, acc.shape)
    return Image.fromarray(np.clip(acc + 128, 0, 255).astype(np.uint8))


def make_tree(root: Path, n_train: int, n_val: int, size=(500, 375), quality: int = 90) -> Path:
    """10 ImageNette wnid folders under train/ and val/ (fast.ai layout)."""
    marker = root / f".complete-{n_train}-{n_val}"
    if marker.exists():
        return root
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for wnid, _, _ in IMAGENETTE:
            folder = root / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                imagenet_like(*size, rng).save(folder / f"{wnid}_{i}.JPEG", "JPEG", quality=quality)
    marker.touch()
    return root
