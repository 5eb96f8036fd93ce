"""Images/s of the streaming loaders at 128x128 on an ImageNet-like JPEG tree (10 classes,
300 train images each, 500x375, quality 90): FFCV (raw and JPEG betons, train pipeline:
random resized crop + flip), the device-resident uint8 cache, and a plain PIL + DataLoader
baseline doing the same crop and flip from the JPEG files. Every loader hands out normalised
float32 batches, as training consumes them. Workers = cores, batch 256, one full pass after a
warm-up pass (FFCV compiles its pipeline in the first)."""

from __future__ import annotations

import math
import os
import random

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks._data import make_tree
from d3fast.config import resolve_config
from d3fast.data import beton
from d3fast.data.loader import load_dataset, open_split
from d3fast.data.prepare import prepare

WORKERS = os.cpu_count() or 1
BATCH = 256
_RATES: dict[str, float] = {}  # loader -> images/s of this session


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = make_tree(tmp_path_factory.mktemp("loaders") / "imagenette2", n_train=300, n_val=50)
    home = tmp_path_factory.mktemp("home")
    mp = pytest.MonkeyPatch()
    mp.setenv("D3FAST_HOME", str(home))
    cfg = resolve_config("imagenette", overrides=[f"data.data_path={root}"])
    prepare(cfg, progress=False)
    yield root, cfg
    mp.undo()


class PILFolder(torch.utils.data.Dataset):
    """JPEG -> random resized crop (scale 0.08-1, ratio 3/4-4/3) -> 128x128 -> flip -> CHW uint8."""

    def __init__(self, root):
        self.items = sorted(
            (os.path.join(root, "train", c, f), i)
            for i, c in enumerate(sorted(os.listdir(os.path.join(root, "train"))))
            for f in os.listdir(os.path.join(root, "train", c))
        )

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        path, label = self.items[i]
        img = Image.open(path).convert("RGB")
        w, h = img.size
        for _ in range(10):
            area = w * h * random.uniform(0.08, 1.0)
            ratio = math.exp(random.uniform(math.log(3 / 4), math.log(4 / 3)))
            cw, ch = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
            if 0 < cw <= w and 0 < ch <= h:
                x0, y0 = random.randint(0, w - cw), random.randint(0, h - ch)
                break
        else:
            cw, ch, x0, y0 = w, h, 0, 0
        img = img.resize((128, 128), Image.Resampling.BILINEAR, box=(x0, y0, x0 + cw, y0 + ch))
        if random.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return torch.from_numpy(np.asarray(img).transpose(2, 0, 1).copy()), label


def _pass(batches) -> int:
    n = 0
    for x, _ in batches:
        n += len(x)
    return n


# the PIL + DataLoader baseline runs first: the others report their speed relative to it
@pytest.mark.parametrize("loader", ["pil-dataloader", "ffcv-raw", "ffcv-jpg", "cache"])
def test_loader_throughput(benchmark, provenance, tree, loader):
    root, cfg = tree
    device = torch.device("cpu")
    if loader.startswith("ffcv"):
        if not beton.ffcv_status()[0]:
            pytest.skip(f"FFCV: {beton.ffcv_status()[1]}")
        mode = loader.split("-")[1]
        beton.write_betons("imagenette", mode, workers=WORKERS, force=True, progress=False)
        cfg.data.loader = "ffcv"
        ds = open_split(cfg, "train", device)
        g = torch.Generator().manual_seed(0)

        def epoch():
            return _pass(ds.batches(BATCH, shuffle=True, generator=g))
    elif loader == "cache":
        ds = load_dataset("imagenette", "train", device)
        g = torch.Generator().manual_seed(0)

        def epoch():
            return _pass(ds.batches(BATCH, shuffle=True, generator=g))
    else:
        dl = torch.utils.data.DataLoader(PILFolder(root), batch_size=BATCH, shuffle=True, num_workers=WORKERS,
                                         persistent_workers=True)
        norm = load_dataset("imagenette", "train", device).normalize

        def epoch():
            # normalised float batches, like the other loaders hand to training
            return _pass((norm(x), y) for x, y in dl)

    epoch()  # warm-up: FFCV compiles its pipeline, DataLoader starts its workers
    counts: list[int] = []
    benchmark.pedantic(lambda: counts.append(epoch()), rounds=2, iterations=1)
    rate = counts[-1] / benchmark.stats["median"]
    _RATES[loader] = rate
    if loader != "pil-dataloader" and "pil-dataloader" in _RATES:
        benchmark.extra_info["ratios"] = {"images/s vs PIL + DataLoader": round(rate / _RATES["pil-dataloader"], 2)}
    benchmark.extra_info.update(
        loader=loader, images=counts[-1], workers=WORKERS, batch=BATCH,
        images_per_s=round(rate, 1),
        beton_mib=round(beton.check_betons("imagenette", verify_hash=False)["bytes"]["train"] / 2**20, 1)
        if loader.startswith("ffcv") else None,
    )
