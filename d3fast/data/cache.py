"""The uint8 dataset cache written by `d3fast prepare`.

    <home>/data/<dataset>/
        manifest.json          classes, counts, mean/std, sha256 of every array, source
        train_x.npy  uint8 [N, C, H, W]     train_y.npy  int64 [N]
        test_x.npy   uint8 [M, C, H, W]     test_y.npy   int64 [M]

The directory is built under a temporary name and swapped in whole, so a cache either
exists complete with its manifest or not at all. Arrays are plain .npy files, so they
can be memory-mapped (`np.load(..., mmap_mode="r")`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from d3fast.errors import D3FastError
from d3fast.io import read_json, sha256_file, verify_sha256
from d3fast.paths import data_dir

CACHE_FORMAT = 1
SPLITS = ("train", "test")


def array_files(split: str) -> tuple[str, str]:
    return f"{split}_x.npy", f"{split}_y.npy"


def read_manifest(cache: Path) -> dict[str, Any] | None:
    path = cache / "manifest.json"
    if not path.exists():
        return None
    return read_json(path, "cache manifest")


def verify_hashes(cache: Path, manifest: dict[str, Any]) -> list[str]:
    """Files whose sha256 differs from the manifest (or that are missing)."""
    bad = []
    for name, digest in manifest["sha256"].items():
        path = cache / name
        if not path.exists() or sha256_file(path) != digest:
            bad.append(name)
    return bad


def freshness(cache: Path, fingerprint: str, resolution: int) -> tuple[bool, str]:
    """Whether the cache at `cache` can be reused for a source with `fingerprint`."""
    manifest = read_manifest(cache)
    if manifest is None:
        return False, "no cache yet"
    if manifest.get("format") != CACHE_FORMAT:
        return False, f"cache format {manifest.get('format')} != {CACHE_FORMAT}"
    if manifest["source"]["fingerprint"] != fingerprint:
        return False, "the source files changed"
    if manifest["resolution"] != resolution:
        return False, "the resolution changed"
    bad = verify_hashes(cache, manifest)
    if bad:
        return False, f"cache files damaged ({', '.join(bad)})"
    return True, "up to date"


def load_split(dataset: str, split: str, mmap: bool = False) -> tuple[np.ndarray, np.ndarray, dict]:
    """(images uint8 [N, C, H, W], labels int64 [N], manifest) of a prepared dataset.

    A full load (not `mmap`) first checks both files against the sha256 the manifest
    recorded (once per process per unchanged file): a corrupt cache is refused, not
    trained on. A memory map (manifest and shape lookups) checks the shapes only.

    Raises D3FastError when the dataset is not prepared or its files are damaged.
    """
    cache = data_dir(dataset)
    manifest = read_manifest(cache)
    if manifest is None:
        raise D3FastError(f"dataset {dataset!r} is not prepared: run `d3fast prepare --dataset {dataset}`")
    if split not in SPLITS:
        raise D3FastError(f"unknown split {split!r}; expected one of {SPLITS}")
    xs, ys = array_files(split)
    info = manifest["splits"][split]
    fix = f"run `d3fast prepare --dataset {dataset} --force`"
    try:
        if not mmap:
            for name in (xs, ys):
                verify_sha256(cache / name, manifest["sha256"][name], f"cache file of {dataset!r}", fix)
        x = np.load(cache / xs, mmap_mode="r" if mmap else None, allow_pickle=False)
        y = np.load(cache / ys, allow_pickle=False)
    except (OSError, ValueError, EOFError, KeyError) as e:
        raise D3FastError(f"cache of {dataset!r} is damaged ({type(e).__name__}: {e}); {fix}") from None
    c, r = manifest["channels"], manifest["resolution"]
    if x.shape != (info["count"], c, r, r) or x.dtype != np.uint8 or y.shape != (info["count"],):
        raise D3FastError(
            f"cache of {dataset!r} does not match its manifest ({x.shape} vs "
            f"{(info['count'], c, r, r)}); run `d3fast prepare --dataset {dataset} --force`"
        )
    return x, y, manifest
