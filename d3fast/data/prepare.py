"""`d3fast prepare`: decode a dataset once into the uint8 cache (see cache.py)."""

from __future__ import annotations

import multiprocessing as mp
import os
import shlex
import shutil
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

import d3fast
from d3fast.config import Config
from d3fast.data.cache import CACHE_FORMAT, SPLITS, array_files, freshness, read_manifest
from d3fast.data.datasets import DatasetSpec, custom_kind, get_spec
from d3fast.data.decode import decode_chunk
from d3fast.data.readers import EncodedPart, SplitSource, read_source
from d3fast.errors import D3FastError
from d3fast.io import (
    atomic_write_json,
    atomic_write_text,
    locked,
    remove_stale_temps,
    replace_dir,
    seal,
    sha256_file,
    temp_dir,
    timestamp,
    write_failure,
)
from d3fast.paths import data_dir
from d3fast.progress import bar as progress_bar

# Files (or encoded rows) per worker task: large enough to amortise inter-process transfer
# (64 x 48 KiB at 128 px), small enough to keep the progress bar moving.
CHUNK = 64
# Below this many files, decoding in-process beats starting workers.
PARALLEL_MIN_FILES = 256
# Tasks in flight per worker: enough that none waits while the parent writes results, few
# enough that an encoded dataset's bytes are never all in memory (64 images a task: 2 x 16
# workers x 64 x ~110 KB per ImageNet JPEG is ~230 MB).
TASKS_PER_WORKER = 2


@dataclass
class PrepareResult:
    status: str  # "reused" | "prepared"
    cache: Path
    manifest: dict[str, Any]
    seconds: float
    decoded: int  # images decoded from files (0 for array sources and reuse)


def prepare(
    cfg: Config, force: bool = False, progress: bool = True, parallel_min_files: int = PARALLEL_MIN_FILES
) -> PrepareResult:
    """Decode `cfg.data.dataset` into its cache, or reuse the cache when it is up to date.
    Concurrent calls for one dataset take turns (an flock beside the cache): the second
    finds the first one's cache instead of decoding again."""
    spec = get_spec(cfg.data.dataset, cfg.data.data_path, cfg.data.resolution)
    cache = data_dir(spec.name)
    with locked(cache.parent / f".{spec.name}.lock", wait=True):
        return _prepare(cfg, spec, cache, force, progress, parallel_min_files)


def _prepare(
    cfg: Config, spec: DatasetSpec, cache: Path, force: bool, progress: bool, parallel_min_files: int
) -> PrepareResult:
    t0 = time.perf_counter()
    source = read_source(spec, cfg.data.data_path)
    for note in source.notes:
        tqdm.write(f"note: {note}")
    if custom_kind(spec.name):
        _check_custom(spec, source, read_manifest(cache) if cache.is_dir() else None, force)
    fresh, reason = freshness(cache, source.fingerprint, spec.resolution)
    manifest = read_manifest(cache) if fresh and not force else None
    if manifest is not None:
        return PrepareResult("reused", cache, manifest, time.perf_counter() - t0, 0)
    if progress and reason != "no cache yet":
        tqdm.write(f"re-preparing {spec.name}: {reason}")

    remove_stale_temps(cache.parent)
    tmp = temp_dir(cache)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    import torch

    from d3fast import ledger  # imported here: decode workers import this module, not torch

    try:
        # decoding runs on CPU cores: the ledger books it as CPU time
        with ledger.track("prepare", spec.name, cfg.preset, torch.device("cpu"), run=str(cache.resolve())) as meter:
            workers = cfg.data.workers or os.cpu_count() or 1
            decoded, skipped, counts = 0, [], {}
            for split in SPLITS:
                src = source.splits[split]
                n_dec, bad = _write_split(
                    tmp, split, src, spec.resolution, spec.channels, workers, progress, parallel_min_files
                )
                decoded += n_dec
                if bad and not cfg.data.skip_corrupt:
                    _fail_corrupt(spec.name, bad, rows=src.encoded is not None)
                if bad:
                    _drop_rows(tmp, split, [i for i, _, _ in bad])
                    skipped += [{"path": p, "error": e} for _, p, e in bad]
                labels = np.load(tmp / array_files(split)[1])
                counts[split] = np.bincount(labels, minlength=len(source.classes)).tolist()
                empty = [source.classes[c] for c, n in enumerate(counts[split]) if n == 0]
                if empty:
                    raise D3FastError(f"{spec.name} {split}: no readable images for class(es) {', '.join(empty)}")
            mean, std = _channel_stats(tmp / array_files("train")[0])
            manifest = {
                "format": CACHE_FORMAT,
                "dataset": spec.name,
                "classes": source.classes,
                "class_ids": source.class_ids,
                "num_classes": len(source.classes),
                "resolution": spec.resolution,
                "channels": spec.channels,
                "mean": mean,
                "std": std,
                "splits": {s: {"count": int(sum(counts[s])), "per_class": counts[s]} for s in SPLITS},
                "sha256": {
                    name: sha256_file(tmp / name) for s in SPLITS for name in array_files(s)
                },
                "source": {"layout": source.layout, "path": source.path, "fingerprint": source.fingerprint},
                "skipped": skipped,
                "d3fast_version": d3fast.__version__,
                "created": timestamp(),
                "prepare_seconds": round(time.perf_counter() - t0, 3),
            }
            atomic_write_json(tmp / "manifest.json", seal(manifest))
            replace_dir(tmp, cache)
            meter.tick(sum(sum(counts[s]) for s in SPLITS))  # images written to the cache
    except OSError as e:
        raise write_failure(Path(getattr(e, "filename", None) or tmp / "x"), e) or e from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return PrepareResult("prepared", cache, manifest, time.perf_counter() - t0, decoded)


def _check_custom(spec: DatasetSpec, source: Any, manifest: dict | None, force: bool) -> None:
    """An imagefolder or hf dataset needs 2 classes, and its cache is not silently swapped for
    another tree or size: the runs and experts made from it decode and match that size.

    Raises:
        D3FastError: one class; another resolution or tree than the prepared one without --force."""
    if len(source.classes) < 2:
        what = "class folder" if custom_kind(spec.name) == "imagefolder" else "class name"
        raise D3FastError(f"{spec.name}: {source.path}{'/train' if what == 'class folder' else ''} holds "
                          f"{len(source.classes)} {what}; distillation needs at least 2 classes")
    if manifest is None or force:
        return
    old_res, old_path = manifest.get("resolution"), manifest.get("source", {}).get("path")
    if old_res != spec.resolution or Path(old_path or "").resolve() != Path(source.path).resolve():
        raise D3FastError(f"{spec.name} is prepared at {old_res} px from {old_path}; its experts and runs use that. "
                          f"For {spec.resolution} px of {source.path} use another label (e.g. "
                          f"--dataset {spec.name}-{spec.resolution}), or --force to replace it")


def _write_split(
    out: Path,
    split: str,
    src: SplitSource,
    size: int,
    channels: int,
    workers: int,
    progress: bool,
    parallel_min_files: int,
) -> tuple[int, list[tuple[int, str, str]]]:
    """Write <split>_x.npy / <split>_y.npy; returns (files decoded, [(row, path, error)])."""
    x_name, y_name = array_files(split)
    np.save(out / y_name, src.labels.astype(np.int64))
    if src.images is not None:
        np.save(out / x_name, np.ascontiguousarray(src.images, dtype=np.uint8))
        return 0, []
    if src.parts is not None:
        _write_parts(out / x_name, split, src, size, channels, progress)
        return 0, []
    files = src.files or []
    n = len(src.labels) if src.encoded is not None else len(files)
    x = np.lib.format.open_memmap(out / x_name, mode="w+", dtype=np.uint8, shape=(n, channels, size, size))
    tasks: Iterable[tuple[int, list[Any], int, int]]
    if src.encoded is not None:
        tasks = _encoded_tasks(src.encoded, n, size, channels)
        name_of = _row_names(src.encoded)
    else:
        tasks = ((s, files[s : s + CHUNK], size, channels) for s in range(0, len(files), CHUNK))
        name_of = files.__getitem__
    bad: list[tuple[int, str, str]] = []
    bar = progress_bar(total=n, desc=f"decode {split}", unit="img", disable=not progress, dynamic_ncols=True)

    def consume(result: tuple[int, np.ndarray, list[tuple[int, str]]]) -> None:
        start, images, errors = result
        x[start : start + len(images)] = images
        bad.extend((start + i, name_of(start + i), e) for i, e in errors)
        bar.update(len(images))

    if workers > 1 and n >= parallel_min_files:
        # spawn, not fork: the parent may hold torch/OpenMP threads that fork would copy
        # in a locked state.
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            for result in _in_order(pool, tasks, TASKS_PER_WORKER * workers):
                consume(result)
    else:
        for task in tasks:
            consume(decode_chunk(task))
    bar.close()
    x.flush()
    return n, bad


def _in_order(
    pool: ProcessPoolExecutor, tasks: Iterable[tuple[int, list[Any], int, int]], window: int
) -> Iterator[tuple[int, np.ndarray, list[tuple[int, str]]]]:
    """`pool.map(decode_chunk, tasks)` with at most `window` tasks submitted ahead: map would
    draw every task first, reading a whole encoded dataset's bytes into memory."""
    pending: deque[Future] = deque()
    for task in tasks:
        pending.append(pool.submit(decode_chunk, task))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _encoded_tasks(
    parts: list[EncodedPart], n: int, size: int, channels: int
) -> Iterator[tuple[int, list[bytes | str | None], int, int]]:
    """Decode tasks of at most CHUNK rows over the parts' batches, read as they are drawn.

    Raises D3FastError when a part does not hold the rows its reader announced."""
    if sum(p.count for p in parts) != n:
        raise D3FastError(f"the shards announce {sum(p.count for p in parts)} images for {n} labels")
    start = 0
    for part in parts:
        got = 0
        for items in part.batches(CHUNK):
            if got + len(items) > part.count:
                break
            yield start + got, items, size, channels
            got += len(items)
        if got != part.count:
            raise D3FastError(f"{part.path} no longer holds the {part.count} images its reader announced: did it "
                              "change during prepare? run prepare again")
        start += got


def _row_names(parts: list[EncodedPart]) -> Any:
    """row of the split -> "<shard> row <i>", for the corrupt-image listing."""
    starts = np.cumsum([0] + [p.count for p in parts])

    def name(row: int) -> str:
        k = int(np.searchsorted(starts, row, side="right")) - 1
        return f"{parts[k].path} row {row - int(starts[k])}"

    return name


def _write_parts(path: Path, split: str, src: SplitSource, size: int, channels: int, progress: bool) -> None:
    """Write a split given as parts into one uint8 [N, C, H, W] .npy, loading one part at a
    time: peak memory is the largest part (a 1.57 GB Imagenet64 batch), not the split.

    Raises D3FastError when a part does not hold the rows its reader announced."""
    n = len(src.labels)
    parts = src.parts or []
    if sum(p.count for p in parts) != n:
        raise D3FastError(f"{split}: the parts announce {sum(p.count for p in parts)} images for {n} labels")
    x = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, channels, size, size))
    bar = progress_bar(total=n, desc=f"copy {split}", unit="img", disable=not progress, dynamic_ncols=True)
    start = 0
    for part in parts:
        images = part.load()
        want = (part.count, channels, size, size)
        if images.shape != want or images.dtype != np.uint8:
            raise D3FastError(
                f"{part.path} gave {images.dtype} {list(images.shape)}, not the uint8 {list(want)} its "
                "reader announced: did it change during prepare? run prepare again"
            )
        x[start : start + part.count] = images
        start += part.count
        # the next part loads only after this one is freed; flushing keeps the written
        # pages from piling up as dirty memory (a cgroup counts them against its limit)
        del images
        x.flush()
        bar.update(part.count)
    bar.close()
    del x


def _fail_corrupt(dataset: str, bad: list[tuple[int, str, str]], rows: bool = False) -> None:
    """Raise the listing of what could not be decoded: files, or rows of shards (`rows`)."""
    listing = data_dir(dataset).with_name(f"{dataset}.corrupt.txt")
    atomic_write_text(listing, "".join(f"{p}\t{e}\n" for _, p, e in bad))
    shown = "\n  ".join(f"{p}: {e}" for _, p, e in bad[:10])
    more = f"\n  ... and {len(bad) - 10} more" if len(bad) > 10 else ""
    what = "row(s) hold images that cannot be decoded" if rows else "file(s) could not be decoded as images"
    raise D3FastError(
        f"{len(bad)} {what} (corrupt, truncated or not an image):\n"
        f"  {shown}{more}\nfull list: {listing}\n"
        f"fix or remove {'those rows' if rows else 'them'}, or re-run with --skip-corrupt to leave them out"
    )


def _drop_rows(out: Path, split: str, rows: list[int]) -> None:
    x_name, y_name = array_files(split)
    x = np.load(out / x_name, mmap_mode="r")
    y = np.load(out / y_name)
    keep = np.setdiff1d(np.arange(len(y)), np.array(rows))
    new = np.lib.format.open_memmap(out / f"{x_name}.new", mode="w+", dtype=np.uint8, shape=(len(keep), *x.shape[1:]))
    for s in range(0, len(keep), 4096):
        new[s : s + 4096] = x[keep[s : s + 4096]]
    new.flush()
    del new, x
    os.replace(out / f"{x_name}.new", out / x_name)
    np.save(out / y_name, y[keep])


def _channel_stats(x_path: Path) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the train images in [0, 1] units (float64 sums)."""
    x = np.load(x_path, mmap_mode="r")
    c = x.shape[1]
    s = np.zeros(c)
    ss = np.zeros(c)
    for i in range(0, len(x), 2048):
        block = np.asarray(x[i : i + 2048], dtype=np.float64) / 255.0
        s += block.sum(axis=(0, 2, 3))
        ss += (block * block).sum(axis=(0, 2, 3))
    n = len(x) * x.shape[2] * x.shape[3]
    mean = s / n
    std = np.sqrt(np.maximum(ss / n - mean * mean, 1e-12))
    return mean.tolist(), std.tolist()


def prepare_command(cfg: Config) -> str:
    """The `d3fast prepare` command line for `cfg`'s dataset, with its source path and
    --skip-corrupt when the config sets them (for error messages that send the user there)."""
    args = ["d3fast", "prepare", "--dataset", cfg.data.dataset]
    if cfg.data.data_path:
        args += ["--data-path", cfg.data.data_path]
    if cfg.data.skip_corrupt:
        args.append("--skip-corrupt")
    return shlex.join(args)
