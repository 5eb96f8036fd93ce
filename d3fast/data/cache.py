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
from d3fast.io import read_json, sha256_file, unseal, verify_sha256
from d3fast.paths import data_dir

CACHE_FORMAT = 1
SPLITS = ("train", "test")


def array_files(split: str) -> tuple[str, str]:
    return f"{split}_x.npy", f"{split}_y.npy"


def read_manifest(cache: Path) -> dict[str, Any] | None:
    """The cache's manifest (None when there is no cache), its fields checked.

    Raises:
        D3FastError: unreadable, or a field missing or of the wrong type.
    """
    path = cache / "manifest.json"
    if not path.exists():
        return None
    fix = f"run `d3fast prepare --dataset {cache.name} --force`"
    try:
        m = unseal(read_json(path, "cache manifest"), "cache manifest", path)
    except D3FastError as e:
        raise D3FastError(f"{e}; {fix}") from None
    problem = _manifest_problem(m)
    if problem:
        raise D3FastError(f"cache manifest {path} is damaged ({problem}); {fix}")
    return m


def _manifest_problem(m: Any) -> str | None:
    if not isinstance(m, dict):
        return f"a JSON {type(m).__name__}, not a mapping"
    fields = {"format": int, "classes": list, "num_classes": int, "resolution": int, "channels": int,
              "mean": list, "std": list, "splits": dict, "sha256": dict, "source": dict}
    for key, kind in fields.items():
        if not isinstance(m.get(key), kind) or isinstance(m.get(key), bool):
            return f"{key!r} missing or not a {kind.__name__}"
    for split in SPLITS:
        info = m["splits"].get(split)
        if not isinstance(info, dict) or not isinstance(info.get("count"), int) or info["count"] < 0:
            return f"splits.{split}.count missing or not a count"
        for name in array_files(split):
            if not isinstance(m["sha256"].get(name), str):
                return f"sha256 of {name} missing"
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in m["mean"] + m["std"]):
        return "mean/std are not numbers"
    if min(m["resolution"], m["channels"], m["num_classes"]) < 1:
        return "resolution, channels and num_classes must be >= 1"
    return None


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
    try:
        manifest = read_manifest(cache)
    except D3FastError as e:
        return False, str(e)
    if manifest is None:
        return False, "no cache yet"
    if manifest.get("format") != CACHE_FORMAT:
        return False, f"cache format {manifest.get('format')} != {CACHE_FORMAT}"
    if manifest["source"].get("fingerprint") != fingerprint:
        return False, "the source files changed"
    if manifest["resolution"] != resolution:
        return False, "the resolution changed"
    bad = verify_hashes(cache, manifest)
    if bad:
        return False, f"cache files damaged ({', '.join(bad)})"
    return True, "up to date"


def load_split(
    dataset: str, split: str, mmap: bool = False, verify: bool | None = None
) -> tuple[np.ndarray, np.ndarray, dict]:
    """(images uint8 [N, C, H, W], labels int64 [N], manifest) of a prepared dataset.

    A full load (not `mmap`) first checks both files against the sha256 the manifest
    recorded (once per process per unchanged file): a corrupt cache is refused, not
    trained on. A memory map (manifest and shape lookups) checks the shapes only, unless
    `verify` (a subtask reads a verified map and copies its classes' rows only).

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
        if verify if verify is not None else not mmap:
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
