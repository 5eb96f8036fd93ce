"""Device-resident uint8 datasets, normalised on the fly.

The whole split lives on the training device as uint8 (CIFAR-10 train: 150 MiB;
ImageNette at 128 px: 604 MiB), 4x smaller than float32; batches are gathered by index
and normalised on the device, so there is no host-to-device copy per step.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from d3fast.data.cache import data_dir, load_split
from d3fast.data.normalize import normalize_uint8
from d3fast.errors import D3FastError
from d3fast.io import load_tensors, save_tensors


@dataclass
class DeviceDataset:
    images: torch.Tensor  # uint8 [N, C, H, W] on device
    labels: torch.Tensor  # int64 [N] on device
    mean: torch.Tensor  # float32 [C]
    std: torch.Tensor  # float32 [C]
    classes: list[str]
    # ZCA whitening matrix [D, D] and mean [D] over normalised, flattened images.
    zca: tuple[torch.Tensor, torch.Tensor] | None = None
    # class_table()'s cache, built on first use (one host sync for the whole run)
    _table: tuple[torch.Tensor, list[int], torch.Tensor] | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def device(self) -> torch.device:
        return self.images.device

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def resolution(self) -> int:
        return self.images.shape[-1]

    def normalize(self, x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """uint8 [B, C, H, W] -> normalised (and ZCA-whitened when enabled), in `dtype`."""
        return normalize_uint8(x, self.mean, self.std, self.zca, dtype)

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self)
        order = (
            torch.randperm(n, generator=generator, device=self.device)
            if shuffle
            else torch.arange(n, device=self.device)
        )
        stop = n - n % batch_size if drop_last else n
        for s in range(0, stop, batch_size):
            idx = order[s : s + batch_size]
            yield self.normalize(self.images[idx]), self.labels[idx]

    def class_indices(self) -> list[torch.Tensor]:
        """Indices of each class's images, [count_c] each (one host sync per class)."""
        return [torch.nonzero(self.labels == c).flatten() for c in range(self.num_classes)]

    def class_table(self) -> tuple[torch.Tensor, list[int], torch.Tensor]:
        """Every class's image indices in one [num_classes, max count] table (rows padded
        with 0), and the counts as a list and as a [num_classes] tensor on the device; built
        once and kept, so that sampling from it needs no host sync."""
        if self._table is None:
            per = self.class_indices()
            counts = [len(i) for i in per]
            if min(counts, default=0) == 0:
                empty = [self.classes[c] for c, n in enumerate(counts) if n == 0]
                raise D3FastError(f"the split holds no image of class(es) {', '.join(empty[:5])}")
            table = torch.zeros(len(per), max(counts), dtype=torch.int64, device=self.device)
            for c, idx in enumerate(per):
                table[c, : len(idx)] = idx
            self._table = (table, counts, torch.tensor(counts, device=self.device))
        return self._table

    def sample_per_class(
        self, n: int, generator: torch.Generator | None = None, classes: slice | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """n images of every class, normalised in `dtype`: [num_classes, n, C, H, W]. Without
        replacement when a class has at least n images (the n smallest of uniform keys over
        its images: a uniform n-subset in random order), with replacement otherwise. All
        classes in one draw, with no host sync (the MMD update runs it every step). With
        `classes`, every class's draw is made and those classes' images are returned (a rank
        of a distributed run keeps its share of a single process's draw)."""
        table, counts, count = self.class_table()
        C, width = table.shape
        keys = torch.rand(C, width, generator=generator, device=self.device)
        keys = keys.masked_fill(torch.arange(width, device=self.device)[None] >= count[:, None], 2.0)
        if n <= width:
            cols = keys.topk(n, dim=1, largest=False, sorted=True).indices  # [C, n]
        else:
            cols = torch.zeros(C, n, dtype=torch.int64, device=self.device)
        if min(counts) < n:  # those classes draw with replacement
            repl = (torch.rand(C, n, generator=generator, device=self.device) * count[:, None]).long()
            repl = repl.minimum(count[:, None] - 1)
            cols = torch.where((count < n)[:, None], repl, cols)
        picked = table.gather(1, cols)
        x = self.images[picked if classes is None else picked[classes]]  # [C, n, ch, H, W]
        return self.normalize(x.flatten(0, 1), dtype).view(*x.shape[:2], *x.shape[2:])

    def subset(self, indices: torch.Tensor) -> DeviceDataset:
        return DeviceDataset(
            self.images[indices], self.labels[indices], self.mean, self.std, self.classes, self.zca
        )


def load_dataset(
    dataset: str,
    split: str,
    device: torch.device | str = "cpu",
    zca_eps: float | None = None,
    block: tuple[int, int] | None = None,
) -> DeviceDataset:
    """Load a prepared split onto `device`. `zca_eps` enables ZCA whitening fitted on the
    train split (cached beside the dataset). `block` = (start, stop) keeps the images of
    classes start..stop-1 only, relabelled 0..stop-start-1 (a subtask's view; the
    normalisation stays the whole dataset's): read from a verified memory map, so only the
    block's rows are copied (ImageNet-64 train: 3.1 of 15.7 GB for 1 of 5 subtasks)."""
    x, y, manifest = load_split(dataset, split, mmap=block is not None, verify=True)
    classes = list(manifest["classes"])
    if block is not None and block != (0, len(classes)):
        start, stop = block
        rows = np.flatnonzero((y >= start) & (y < stop))
        x, y, classes = x[rows], y[rows] - start, classes[start:stop]
    elif block is not None:  # the whole dataset after all: read the map into memory
        x = np.array(x)
    device = torch.device(device)
    ds = DeviceDataset(
        images=torch.from_numpy(x).to(device),
        labels=torch.from_numpy(y).to(device),
        mean=torch.tensor(manifest["mean"], dtype=torch.float32, device=device),
        std=torch.tensor(manifest["std"], dtype=torch.float32, device=device),
        classes=classes,
    )
    if zca_eps is not None:
        ds.zca = _zca_on(dataset, zca_eps, manifest, device)
    return ds


def load_view(cfg: Any, split: str, device: torch.device | str = "cpu") -> DeviceDataset:
    """The split as `cfg` sees it: the whole dataset, or with data.subtasks > 1 the classes
    of block data.subtask (d3fast.data.datasets.class_blocks), relabelled from 0."""
    from d3fast.data.datasets import subtask_block

    zca = cfg.data.zca_eps if cfg.data.zca else None
    block = subtask_block(cfg.data.dataset, cfg.data.subtasks, cfg.data.subtask) if cfg.data.subtasks > 1 else None
    return load_dataset(cfg.data.dataset, split, device, zca, block)


def _zca_on(dataset: str, eps: float, manifest: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    w, mu = fit_zca(dataset, eps, manifest)
    return w.to(device), mu.to(device)


def open_split(cfg: Any, split: str, device: torch.device) -> Any:
    """A split for streaming training or testing, from the loader `cfg.data.loader` picks
    (auto | cache | ffcv; d3fast.data.beton.resolve_loader): a DeviceDataset or a BetonDataset."""
    from d3fast.data.beton import open_beton_split, resolve_loader

    zca = cfg.data.zca_eps if cfg.data.zca else None
    if cfg.data.subtasks > 1 or resolve_loader(cfg.data.dataset, cfg.data.loader) == "cache":
        return load_view(cfg, split, device)
    ds = open_beton_split(cfg.data.dataset, split, torch.device(device), cfg.data.workers, cfg.experts.seed)
    if zca is not None:
        ds.zca = _zca_on(cfg.data.dataset, zca, load_split(cfg.data.dataset, "train", mmap=True)[2], torch.device(device))
    return ds


def fit_zca(dataset: str, eps: float, manifest: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """ZCA whitening of normalised train images with kornia, cached per (dataset, eps) and
    tied to the cache's train hash."""
    import kornia

    path = data_dir(dataset) / f"zca_eps{eps:g}.safetensors"
    train_hash = manifest["sha256"]["train_x.npy"]
    if path.exists():
        tensors, meta = load_tensors(path, "ZCA cache")
        if meta.get("train_sha256") == train_hash:
            return tensors["matrix"], tensors["mean"]
    x, _, _ = load_split(dataset, "train", mmap=True)
    mean = torch.tensor(manifest["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(manifest["std"]).view(1, -1, 1, 1)
    flat = ((torch.from_numpy(np.array(x)).float() / 255.0 - mean) / std).flatten(1)
    if flat.shape[0] < 2:
        raise D3FastError("ZCA needs at least 2 train images")
    zca = kornia.enhance.ZCAWhitening(eps=eps).fit(flat)
    w, mu = zca.transform_matrix.float().T.contiguous(), zca.mean_vector.float().flatten()
    if not (torch.isfinite(w).all() and torch.isfinite(mu).all()):
        raise D3FastError(f"the ZCA whitening of {dataset} with data.zca_eps={eps:g} is not finite; raise data.zca_eps "
                          "(0.1 is MTT's value)")
    save_tensors(path, {"matrix": w, "mean": mu}, {"train_sha256": train_hash, "eps": eps})
    return w, mu
