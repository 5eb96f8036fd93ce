"""FFCV `.beton` files for the RGB datasets, and a loader that streams them.

`d3fast prepare --format ffcv` writes `<home>/data/<dataset>-ffcv/{train,test}.beton` from the
prepared uint8 cache (the same readers, decoder and crop), so both loaders see the same
images: `raw` mode stores the 128x128 pixels as they are (exactly the cache's), `jpg` mode
re-encodes them (quality 90 by default: 5-10x smaller, lossy). A manifest records the
betons' sha256 and the cache hashes they came from; a stale or damaged file is refused with
the command that rebuilds it.

A loader is one declaration per field (ffcv's `pipelines`):
    train  image: RandomResizedCrop(res) -> flip -> tensor -> device     label: int -> device
    test   image: CenterCrop(res, ratio 1) -> tensor -> device           label: int -> device
and normalisation (and ZCA) then runs on the device as for the uint8 cache.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from d3fast.data.cache import data_dir, load_split
from d3fast.data.normalize import normalize_uint8
from d3fast.errors import D3FastError
from d3fast.io import (
    atomic_write_json,
    read_json,
    remove_stale_temps,
    replace_dir,
    seal,
    sha256_file,
    temp_dir,
    unseal,
    verify_sha256,
)

FFCV_DATASETS = ("imagenette", "imagewoof", "tinyimagenet", "cifar10")
BETON_FORMAT = "d3fast-beton-1"
INSTALL_HINT = (
    "install it with `apt-get install pkg-config libturbojpeg0-dev libopencv-dev` and "
    "`pip install -e .[ffcv]` (scripts/bootstrap.sh does both)"
)
_noted: set[str] = set()
# Every ffcv Loader made in this process, kept until exit: when one is collected, numba
# 0.68's dispatcher finalizer for its compiled pipeline raises KeyError (iterating a dict
# that changed); at interpreter exit numba skips that finalizer
_KEEP_ALIVE: list[Any] = []


def ffcv_status() -> tuple[bool, str]:
    if importlib.util.find_spec("ffcv") is None:
        return False, "ffcv is not installed"
    threads = torch.get_num_threads()
    try:
        import ffcv.loader  # noqa: F401
    except Exception as e:  # a broken build (missing libturbojpeg, numba/numpy mismatch)
        return False, f"ffcv does not import: {e}"
    finally:
        # importing ffcv calls torch.set_num_threads(1) (ffcv/pipeline/compiler.py): every
        # later CPU op of the process would run on one core (the digits demo: 0.98 -> 1.7 s
        # per distillation step on 2 cores)
        torch.set_num_threads(threads)
    return True, "available"


def beton_dir(dataset: str) -> Path:
    return data_dir(dataset).with_name(f"{dataset}-ffcv")


class _Indexed:
    """The cache as ffcv's writer wants it: (HWC uint8 image, int label) per index."""

    def __init__(self, x: np.ndarray, y: np.ndarray):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return np.ascontiguousarray(self.x[i].transpose(1, 2, 0)), int(self.y[i])


def require_ffcv(dataset: str) -> None:
    """Raise D3FastError unless betons can be written for `dataset` here."""
    if dataset not in FFCV_DATASETS:
        raise D3FastError(f"--format ffcv is for the RGB datasets ({', '.join(FFCV_DATASETS)}), not {dataset}")
    ok, why = ffcv_status()
    if not ok:
        raise D3FastError(f"--format ffcv needs FFCV: {why}; {INSTALL_HINT}")


def write_betons(
    dataset: str, mode: str = "raw", jpeg_quality: int = 90, workers: int = 0, force: bool = False,
    progress: bool = True,
) -> tuple[str, dict[str, Any]]:
    """Write train and test betons from the prepared cache. Returns ("written" | "reused",
    manifest). Raises D3FastError for a non-RGB dataset, a missing cache or a missing ffcv."""
    require_ffcv(dataset)
    if mode not in ("raw", "jpg"):
        raise D3FastError(f"ffcv mode must be raw or jpg, got {mode!r}")
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    out = beton_dir(dataset)
    sources = {s: load_split(dataset, s, mmap=True) for s in ("train", "test")}
    cache_sha = {s: sources[s][2]["sha256"][f"{s}_x.npy"] for s in sources}
    if not force and (out / "manifest.json").exists():
        try:
            man = check_betons(dataset)
            if man["mode"] == mode and (mode == "raw" or man["jpeg_quality"] == jpeg_quality):
                return "reused", man
        except D3FastError:
            pass  # stale or damaged: rewrite below
    remove_stale_temps(out.parent)
    tmp = temp_dir(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    manifest: dict[str, Any] = {
        "format": BETON_FORMAT, "dataset": dataset, "mode": mode, "jpeg_quality": jpeg_quality,
        "resolution": int(sources["train"][0].shape[-1]), "classes": sources["train"][2]["classes"],
        "mean": sources["train"][2]["mean"], "std": sources["train"][2]["std"],
        "source_sha256": cache_sha, "counts": {}, "sha256": {}, "bytes": {},
    }
    try:
        for split, (x, y, _) in sources.items():
            path = tmp / f"{split}.beton"
            fields = {
                "image": RGBImageField(write_mode=mode, max_resolution=x.shape[-1], jpeg_quality=jpeg_quality),
                "label": IntField(),
            }
            if progress:
                tqdm.write(f"writing {dataset} {split}: {len(y)} images, {mode} -> {path.name}")
            DatasetWriter(str(path), fields, num_workers=workers or os.cpu_count() or 1).from_indexed_dataset(
                _Indexed(x, y)
            )
            manifest["counts"][split] = len(y)
            manifest["sha256"][split] = sha256_file(path)
            manifest["bytes"][split] = path.stat().st_size
        atomic_write_json(tmp / "manifest.json", seal(manifest))
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return "written", manifest


def check_betons(dataset: str, verify_hash: bool = True) -> dict[str, Any]:
    """The betons' manifest after checking they exist, match the cache they came from, and
    (verify_hash) hash to what was written. Raises D3FastError with the fix otherwise."""
    out = beton_dir(dataset)
    fix = f"rebuild with `d3fast prepare --dataset {dataset} --format ffcv --force`"
    if not (out / "manifest.json").exists():
        raise D3FastError(f"no FFCV files for {dataset} in {out}; write them with `d3fast prepare --dataset {dataset} --format ffcv`")
    try:
        man = unseal(read_json(out / "manifest.json", "FFCV manifest"), "FFCV manifest", out / "manifest.json")
    except D3FastError as e:
        raise D3FastError(f"{e}; {fix}") from None
    if not isinstance(man, dict):
        raise D3FastError(f"{out / 'manifest.json'} is not a d3fast FFCV manifest; {fix}")
    if man.get("format") != BETON_FORMAT:
        raise D3FastError(f"{out / 'manifest.json'} is not a d3fast FFCV manifest; {fix}")
    for split in ("train", "test"):
        path = out / f"{split}.beton"
        if not path.exists():
            raise D3FastError(f"{path} is missing; {fix}")
        if path.stat().st_size != man["bytes"][split]:
            raise D3FastError(
                f"{path} is truncated or damaged ({path.stat().st_size} bytes, {man['bytes'][split]} written); {fix}"
            )
        if verify_hash and sha256_file(path) != man["sha256"][split]:
            raise D3FastError(f"{path} does not match its recorded sha256 (corrupt); {fix}")
        cache = load_split(dataset, split, mmap=True)[2]
        if cache["sha256"][f"{split}_x.npy"] != man["source_sha256"][split]:
            raise D3FastError(f"{path} was written from an older cache of {dataset}; {fix}")
    return man


def resolve_loader(dataset: str, loader: str) -> str:
    """"cache" or "ffcv" for `--loader auto|cache|ffcv`. ffcv without FFCV or its files is an
    error; auto falls back to the cache and says why once per process."""
    if loader == "cache":
        return "cache"
    if loader not in ("auto", "ffcv"):
        raise D3FastError(f"--loader must be auto, cache or ffcv, got {loader!r}")
    if dataset not in FFCV_DATASETS:
        if loader == "ffcv":
            raise D3FastError(f"--loader ffcv is for the RGB datasets ({', '.join(FFCV_DATASETS)}), not {dataset}")
        return "cache"
    ok, why = ffcv_status()
    if not ok:
        if loader == "ffcv":
            raise D3FastError(f"--loader ffcv: {why}; {INSTALL_HINT}")
        _note(dataset, f"note: FFCV unavailable ({why}); {dataset} streams from the uint8 cache")
        return "cache"
    if not (beton_dir(dataset) / "manifest.json").exists():
        if loader == "ffcv":
            check_betons(dataset)  # raises with the command that writes them
        _note(dataset, f"note: no FFCV files for {dataset}; using the uint8 cache "
                       f"(`d3fast prepare --dataset {dataset} --format ffcv` writes them)")
        return "cache"
    return "ffcv"


def _note(key: str, text: str) -> None:
    if key not in _noted:
        _noted.add(key)
        tqdm.write(text)


@dataclass
class BetonDataset:
    """A split streamed from its beton; duck-types DeviceDataset for training and testing
    (`batches`, `normalize`, `len`, `num_classes`, `device`, `channels`, `resolution`)."""

    path: Path
    train: bool  # the random-resized-crop + flip pipeline; else center crop
    device: torch.device
    mean: torch.Tensor
    std: torch.Tensor
    classes: list[str]
    count: int
    resolution: int
    workers: int = 0
    seed: int = 0
    zca: tuple[torch.Tensor, torch.Tensor] | None = None
    _loaders: dict[tuple[int, bool, bool], Any] = field(default_factory=dict, repr=False)

    channels = 3

    def __len__(self) -> int:
        return self.count

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return normalize_uint8(x, self.mean, self.std, self.zca)

    def pipelines(self) -> dict[str, list[Any]]:
        from ffcv.fields.decoders import (
            CenterCropRGBImageDecoder,
            IntDecoder,
            RandomResizedCropRGBImageDecoder,
        )
        from ffcv.transforms import RandomHorizontalFlip, Squeeze, ToDevice, ToTensor, ToTorchImage

        res = (self.resolution, self.resolution)
        decode = [RandomResizedCropRGBImageDecoder(res), RandomHorizontalFlip()] if self.train else [
            CenterCropRGBImageDecoder(res, ratio=1.0)]
        dev = [ToDevice(self.device, non_blocking=True)] if self.device.type == "cuda" else []
        return {
            # channels_last: a view of ffcv's NHWC buffer, no copy (1,718 -> 2,084 img/s in
            # benchmarks/bench_loaders.py)
            "image": [*decode, ToTensor(), *dev, ToTorchImage()],
            "label": [IntDecoder(), ToTensor(), Squeeze(), *dev],
        }

    def batches(
        self, batch_size: int, *, shuffle: bool, generator: torch.Generator | None = None, drop_last: bool = False
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        from ffcv.loader import Loader, OrderOption

        # ffcv sets torch's thread count to its worker count when a loader is made and when
        # an epoch starts; training keeps the process's own setting
        threads = torch.get_num_threads()
        key = (batch_size, shuffle, drop_last)
        if key not in self._loaders:
            # ffcv reshuffles per epoch from (seed, epoch); the generator picks the seed once
            seed = int(torch.randint(2**31 - 1, (1,), generator=generator)) if generator is not None and \
                generator.device.type == "cpu" else self.seed
            try:
                loader = Loader(
                    str(self.path), batch_size=batch_size, num_workers=self.workers or os.cpu_count() or 1,
                    order=OrderOption.RANDOM if shuffle else OrderOption.SEQUENTIAL, drop_last=drop_last,
                    pipelines=self.pipelines(), seed=seed, distributed=False,
                )
            except Exception as e:
                raise D3FastError(
                    f"cannot read {self.path} ({type(e).__name__}: {e}); rebuild with "
                    "`d3fast prepare --format ffcv --force`"
                ) from e
            _KEEP_ALIVE.append(loader)
            self._loaders[key] = loader
        batches = iter(self._loaders[key])
        torch.set_num_threads(threads)
        for x, y in batches:
            yield self.normalize(x.to(self.device)), y.to(self.device).long()


def open_beton_split(dataset: str, split: str, device: torch.device, workers: int = 0, seed: int = 0) -> BetonDataset:
    """A split's beton for streaming, after checking it against the sha256 written with it
    (once per process per unchanged file: 0.5 s for ImageNette's 465 MB train split)."""
    man = check_betons(dataset, verify_hash=False)
    verify_sha256(beton_dir(dataset) / f"{split}.beton", man["sha256"][split], "FFCV file",
                  f"rebuild with `d3fast prepare --dataset {dataset} --format ffcv --force`")
    mean, std = (torch.tensor(man[k], dtype=torch.float32, device=device) for k in ("mean", "std"))
    return BetonDataset(
        path=beton_dir(dataset) / f"{split}.beton", train=split == "train", device=device, mean=mean, std=std,
        classes=list(man["classes"]), count=int(man["counts"][split]), resolution=int(man["resolution"]),
        workers=workers, seed=seed,
    )
