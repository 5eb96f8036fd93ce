"""Helpers that write small but real datasets (JPEG/PNG/IDX/pickle files) in the
standard layouts, for the readers to find."""

from __future__ import annotations

import codecs
import gzip
import json
import pickle
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

from d3fast.config import resolve_config
from d3fast.data.datasets import IMAGENETTE


def photo(w: int, h: int, seed: int) -> Image.Image:
    """A smooth random RGB picture with a sharp vertical edge (orientation is testable)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    im = np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)).copy()
    im[:, : w // 4, 0] = 250  # a red band on the left
    return Image.fromarray(im)


def reference_decode(src, size=128):
    """Independent decode of an image file (a path or a file object): full-resolution decode to
    RGB, short side to `size` (bilinear), center crop; uint8 [3, size, size]."""
    im = Image.open(src).convert("RGB")
    w, h = im.size
    s = size / min(w, h)
    nw, nh = max(size, round(w * s)), max(size, round(h * s))
    im = im.resize((nw, nh), Image.Resampling.BILINEAR)
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.asarray(im.crop((left, top, left + size, top + size))).transpose(2, 0, 1)


def write_jpeg(path: Path, w: int, h: int, seed: int, quality: int = 90) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    photo(w, h, seed).save(path, "JPEG", quality=quality)
    return path


def make_imagenet_tree(
    root: Path,
    classes=IMAGENETTE,
    n_train: int = 3,
    n_val: int = 2,
    size: tuple[int, int] = (200, 150),
    extra_wnids: tuple[str, ...] = (),
) -> Path:
    """train/<wnid>/*.JPEG and val/<wnid>/*.JPEG; `extra_wnids` adds the other ImageNet
    classes a full ImageNet-1k tree has."""
    seed = 0
    for split, n in (("train", n_train), ("val", n_val)):
        for wnid in [c[0] for c in classes] + list(extra_wnids):
            for i in range(n):
                seed += 1
                write_jpeg(root / split / wnid / f"{wnid}_{i}.JPEG", *size, seed=seed)
    return root


def make_tinyimagenet(root: Path, wnids=("n01443537", "n01629819", "n01641577"), n_train=4, n_val=3) -> Path:
    base = root / "tiny-imagenet-200"
    (base / "val" / "images").mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (base / "words.txt").write_text("".join(f"{w}\tthing {i}, other name\n" for i, w in enumerate(wnids)))
    seed, lines = 100, []
    for w in wnids:
        for i in range(n_train):
            seed += 1
            write_jpeg(base / "train" / w / "images" / f"{w}_{i}.JPEG", 64, 64, seed)
        (base / "train" / w / f"{w}_boxes.txt").write_text("")
    k = 0
    for _j in range(n_val):
        for w in wnids:
            seed += 1
            write_jpeg(base / "val" / "images" / f"val_{k}.JPEG", 64, 64, seed)
            lines.append(f"val_{k}.JPEG\t{w}\t0\t0\t63\t63")
            k += 1
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return base


def write_idx(path: Path, arr: np.ndarray, gz: bool = True) -> Path:
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def make_fashion_mnist(root: Path, n_train: int = 30, n_test: int = 10, gz: bool = True):
    rng = np.random.default_rng(1)
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, stem, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = (np.arange(n) % 10).astype(np.uint8)
        write_idx(root / f"{stem}-images-idx3-ubyte", x, gz)
        write_idx(root / f"{stem}-labels-idx1-ubyte", y, gz)
        out[split] = (x, y)
    return out


def make_cifar10(root: Path, per_batch: int = 10, binary: bool = False):
    """cifar-10-batches-py/ (pickled dicts with bytes keys, like the original Python 2
    files) or cifar-10-batches-bin/ (1 label byte + 3072 pixel bytes per record)."""
    rng = np.random.default_rng(2)
    folder = root / ("cifar-10-batches-bin" if binary else "cifar-10-batches-py")
    folder.mkdir(parents=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    batches = {}
    for name in names:
        x = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        y = (rng.permutation(per_batch) % 10).tolist()  # every class in every batch
        batches[name] = (x, y)
        if binary:
            rec = np.concatenate([np.array(y, np.uint8)[:, None], x], axis=1)
            (folder / f"{name}.bin").write_bytes(rec.tobytes())
        else:
            d = {b"batch_label": name.encode(), b"labels": y, b"data": x, b"filenames": [b"f.png"] * per_batch}
            with open(folder / name, "wb") as f:
                pickle.dump(d, f, protocol=2)
    if not binary:
        with open(folder / "batches.meta", "wb") as f:
            pickle.dump({b"label_names": [b"airplane"] * 10}, f, protocol=2)
    return folder, batches


class _Py2Pickler(pickle._Pickler):
    """Pickles as Python 2's cPickle did: str and bytes become Python 2 `str` opcodes (read
    back as bytes under encoding="bytes") and numpy is named `numpy.core`."""

    def save_bytes(self, obj: bytes) -> None:
        if self.proto == 0:
            self.write(b"S'" + codecs.escape_encode(obj)[0] + b"'\n")
        elif len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    def save_str(self, obj: str) -> None:
        self.save_bytes(obj.encode("latin1"))

    def save_global(self, obj, name=None) -> None:
        name = name or obj.__qualname__
        module = pickle.whichmodule(obj, name).replace("numpy._core", "numpy.core")
        self.write(pickle.GLOBAL + f"{module}\n{name}\n".encode())
        self.memoize(obj)

    dispatch = dict(pickle._Pickler.dispatch)
    dispatch[bytes] = save_bytes
    dispatch[str] = save_str


def imagenet64_rows(images: np.ndarray) -> np.ndarray:
    """uint8 [N, 64, 64, 3] pictures -> the files' uint8 [N, 12288] rows: all of R, then G,
    then B, each plane row-major (what the Imagenet64 scripts wrote)."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2)).reshape(len(images), -1)


def write_imagenet64_tree(
    root: Path,
    per_class_train: int = 1,
    per_class_val: int = 1,
    fmt: str = "npz",
    protocol: int | None = None,
    flat: bool = False,
    seed: int = 0,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A tiny Downsampled ImageNet 64x64 in the official download's format: all 1000 classes
    (prepare refuses an empty one) with `per_class_train` images each, shuffled over
    train_data_batch_1..10 (9 of n // 10 images, the rest in the 10th) and `per_class_val`
    in val_data. Each file is a dict of `data` (uint8 [n, 12288], rows as `imagenet64_rows`)
    and `labels` (1..1000); train files also hold `mean` (float64 [12288], over all train
    images).

    Args:
        root: where the tree goes (created).
        fmt: "npz" (`np.savez` into Imagenet64_train_npz/ and Imagenet64_val_npz/, labels an
            int64 array), "pickle" (`pickle.dump` from Python 3, str keys, labels a list) or
            "pickle-py2" (as Python 2's cPickle wrote it), both pickles into Imagenet64_train/
            and Imagenet64_val/ with no suffix. Default: "npz".
        protocol: the pickle protocol. Default: the writer's own default (`pickle.
            DEFAULT_PROTOCOL`; 0 for Python 2).
        flat: put all 11 files directly in `root` instead of the two subfolders.
        seed: pixels and shuffling.

    Returns:
        {file stem ("train_data_batch_1", ..., "val_data"): (pictures uint8 [n, 64, 64, 3],
        labels int64 [n], 1-based)}. About 0.6 MB per 50 images: 1 + 1 per class is 25 MB.

    Example:
        files = write_imagenet64_tree(tmp_path)   # then --data-path tmp_path
    """
    if fmt not in ("npz", "pickle", "pickle-py2"):
        raise ValueError(f"fmt must be npz, pickle or pickle-py2, not {fmt!r}")
    rng = np.random.default_rng(seed)
    train_dir, val_dir = ("Imagenet64_train_npz", "Imagenet64_val_npz") if fmt == "npz" else (
        "Imagenet64_train", "Imagenet64_val")
    if flat:
        train_dir = val_dir = "."
    train_y = rng.permutation(np.repeat(np.arange(1, 1001), per_class_train))
    val_y = rng.permutation(np.repeat(np.arange(1, 1001), per_class_val))
    train_x = rng.integers(0, 256, (len(train_y), 64, 64, 3), dtype=np.uint8)
    val_x = rng.integers(0, 256, (len(val_y), 64, 64, 3), dtype=np.uint8)
    mean = imagenet64_rows(train_x).mean(axis=0)
    size = len(train_y) // 10
    cuts = [i * size for i in range(10)] + [len(train_y)]
    files = {f"train_data_batch_{i + 1}": (train_x[cuts[i] : cuts[i + 1]], train_y[cuts[i] : cuts[i + 1]])
             for i in range(10)}
    files["val_data"] = (val_x, val_y)
    for name, (x, y) in files.items():
        folder = root / (val_dir if name == "val_data" else train_dir)
        folder.mkdir(parents=True, exist_ok=True)
        entries: dict = {"data": imagenet64_rows(x), "labels": y.tolist()}
        if name != "val_data":
            entries["mean"] = mean
        if fmt == "npz":
            np.savez(folder / f"{name}.npz", **{**entries, "labels": np.asarray(y, np.int64)})
        elif fmt == "pickle":
            with open(folder / name, "wb") as f:
                pickle.dump(entries, f, protocol=protocol)
        else:
            with open(folder / name, "wb") as f:
                _Py2Pickler(f, protocol=0 if protocol is None else protocol).dump(entries)
    return files


def make_cifar100(root: Path, n_train: int = 200, n_test: int = 100, binary: bool = False, names: bool = True):
    """cifar-100-python/ (train, test and meta: pickled dicts with bytes keys, like the
    original Python 2 files; fine and coarse labels) or cifar-100-binary/ (records of coarse
    label, fine label, 3072 pixels; fine_label_names.txt). Returns (folder, {split: (x, fine)})."""
    rng = np.random.default_rng(3)
    folder = root / ("cifar-100-binary" if binary else "cifar-100-python")
    folder.mkdir(parents=True)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine = (rng.permutation(n) % 100).astype(np.uint8)  # every class in every split
        coarse = (fine // 5).astype(np.uint8)
        out[split] = (x, fine.astype(np.int64))
        if binary:
            rec = np.concatenate([coarse[:, None], fine[:, None], x], axis=1)
            (folder / f"{split}.bin").write_bytes(rec.tobytes())
        else:
            d = {b"filenames": [b"f.png"] * n, b"batch_label": split.encode(), b"fine_labels": fine.tolist(),
                 b"coarse_labels": coarse.tolist(), b"data": x}
            with open(folder / split, "wb") as f:
                pickle.dump(d, f, protocol=2)
    fine_names = [f"fine{i}" for i in range(100)]
    if names and binary:
        (folder / "fine_label_names.txt").write_text("\n".join(fine_names) + "\n")
    elif names:
        with open(folder / "meta", "wb") as f:
            pickle.dump({b"fine_label_names": [n.encode() for n in fine_names],
                         b"coarse_label_names": [f"c{i}".encode() for i in range(20)]}, f, protocol=2)
    return folder, out


def assert_close(name: str, ref: torch.Tensor, out: torch.Tensor, atol: float, rtol: float) -> None:
    """|out - ref| <= atol + rtol |ref| elementwise, or fail with the max error, its ratio to
    the allowance and the first 5 offending indices."""
    assert out.shape == ref.shape, f"{name}: shape {list(out.shape)} != reference {list(ref.shape)}"
    ref64, out64 = ref.detach().double().cpu(), out.detach().double().cpu()
    err = (out64 - ref64).abs()
    allowed = atol + rtol * ref64.abs()
    bad = (err > allowed) | ~torch.isfinite(out64)
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        worst = float((err / allowed).nan_to_num(float("inf")).max())
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{err.numel()} values off; max abs err {float(err.max()):.3e}, "
            f"{worst:.2f}x the allowance (atol {atol:g}, rtol {rtol:g}); first at {idx}: "
            f"out {[float(out64[tuple(i)]) for i in idx]} ref {[float(ref64[tuple(i)]) for i in idx]}"
        )


def state_differences(a: Any, b: Any, path: str = "") -> dict[str, tuple[float, float]]:
    """Two state dicts (a checkpoint's, nested dicts and lists) walked together: for every
    floating tensor and float, (||a - b||, ||b||) by path. Everything else (integer tensors
    such as the random generators' states, counts, strings) must be equal; JSON strings are
    compared as what they hold.

    Raises:
        AssertionError: a key, a shape, a dtype or a non-float value that differs, naming its path.
    """
    out: dict[str, tuple[float, float]] = {}
    if isinstance(a, str) and isinstance(b, str) and a != b:
        try:
            a, b = json.loads(a), json.loads(b)
        except ValueError:
            raise AssertionError(f"{path}: {a[:80]!r} != {b[:80]!r}") from None
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path}: keys {sorted(a, key=str)} != {sorted(b, key=str)}"
        for k in a:
            out |= state_differences(a[k], b[k], f"{path}.{k}" if path else str(k))
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b), f"{path}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            out |= state_differences(x, y, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor) and a.is_floating_point():
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype, \
            f"{path}: {a.dtype} {list(a.shape)} vs {getattr(b, 'dtype', type(b))} {list(getattr(b, 'shape', []))}"
        out[path] = float((a.double() - b.double()).norm()), float(b.double().norm())
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), f"{path}: integer tensors differ"
    elif isinstance(a, float) and not isinstance(b, bool):
        out[path] = abs(a - b), abs(b)
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"
    return out


def relative_differences(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float]:
    """||a - b|| / ||b|| for every floating tensor and float of two checkpoints, where for an
    optimiser's moments ||b|| is that of the moment over all the optimiser's parameters.

    Why the moments are measured so: rounding error is relative to the size of the sums that
    make a gradient, and for the conv biases right before a BatchNorm (which cancels them)
    those are 10^7 times the gradient's own size, which is the weight decay alone (Adam's
    first moment there: 6e-7 against 3.6 for the conv weights; d3fast/state.py). Measured
    against its own norm, such a moment differs by 3e-9 between 1 and 2 ranks in float64;
    against the whole optimiser's moment, by 7e-17. Every other tensor (latents, alpha, every
    decoder parameter and BatchNorm statistic, the momenta) is measured against itself."""
    raw = state_differences(a, b)
    family: dict[str, float] = {}
    for path, (_, norm) in raw.items():
        fam = _family(path)
        family[fam] = family.get(fam, 0.0) + norm * norm
    out = {}
    for path, (diff, norm) in raw.items():
        scale = max(norm, family[_family(path)] ** 0.5)
        out[path] = diff / scale if scale > 0 else diff
    return out


def _family(path: str) -> str:
    """opt_decoder.state.7.exp_avg -> opt_decoder.state.*.exp_avg; other paths are their own."""
    parts = path.split(".")
    if len(parts) == 4 and parts[0].startswith("opt_") and parts[1] == "state":
        return ".".join([parts[0], "state", "*", parts[3]])
    return path


# What float64 can promise when two runs of 3 distillation steps compute the same thing in
# another order (1 or 2 ranks, a restarted job, flat or naive unroll, chunked or one-graph MMD),
# measured as `relative_differences` on AMD EPYC under ATen's default, avx2 and avx512 kernels,
# and under ATen default with oneDNN's SSE4.1 and MKL's SSE4.2 kernels (an old CPU's orders):
# - every tensor but those below: at most 1.5e-11 (2 ranks vs 1 process, the old CPU's orders:
#   a BatchNorm's own bias, whose per-channel gradients Adam normalises one by one), 3.3e-13
#   under ATen's kernel sets alone. 1e-9 leaves 66x, and is 10^4 below what one float32
#   rounding on the way leaves (1e-5 and more after Adam);
# - the conv biases that a BatchNorm cancels, and the running means they shift: at most
#   4.4e-10. Their gradient is zero in exact arithmetic, so what Adam sees is the weight decay
#   plus float64 rounding noise of sums 10^7 times larger, and its normalisation m / sqrt(v)
#   turns that noise into steps: 1e-8 leaves 23x.
# A split that draws another sample, scales a loss wrongly or drops a term differs by 1e-4 to 1.
F64_TOL = 1e-9
F64_TOL_CANCELLED = 1e-8
# One gradient two ways in float64, no optimiser step between (flat, naive and auto unrolls,
# chunked and one-graph embedding, the hand-written unroll, CPU and CUDA): measured at most
# 4.7e-14 (`grad_errors`), over the same kernel sets; 1e-10 leaves 2,000x.
F64_GRAD_TOL = 1e-10


def cancelled_by_batchnorm(paths: Any) -> set[str]:
    """The paths of the conv biases that a BatchNorm right after them cancels (`<p>.0.bias`
    beside `<p>.1.running_mean`: the decoder's [conv, BatchNorm, LeakyReLU] blocks) and of
    those BatchNorms' running means."""
    means = [p for p in paths if p.endswith(".1.running_mean")]
    return set(means) | {p.removesuffix(".1.running_mean") + ".0.bias" for p in means}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


def grad_errors(got: Any, ref: Any) -> list[float]:
    """Each gradient's relative error against its reference; one whose reference is ~0 (a conv
    bias right before a BatchNorm: exactly 0 in exact arithmetic, rounding noise here) is
    measured against 1e-3 of the whole gradient's norm instead of its own."""
    total = float(torch.cat([g.reshape(-1) for g in ref]).double().norm())
    return [float((a.double() - b.double()).norm()) / max(float(b.double().norm()), 1e-3 * total, 1e-300)
            for a, b in zip(got, ref, strict=True)]


def assert_grads_match(names: Any, got: Any, ref: Any, tol: float) -> float:
    """Every gradient within `tol` (`grad_errors`) of its reference; returns the worst error."""
    errs = grad_errors(got, ref)
    for name, err in zip(names, errs, strict=True):
        assert err < tol, f"{name}: relative error {err:.2e} (tolerance {tol:g})"
    return max(errs)


# one float32 rounding (2^-23): the slack of a floor comparison, for a floor that happens to be 0
F32_ULP = 2.0**-23


def assert_within_floor(names: Any, got: Any, same: Any, truth: Any, factor: float) -> float:
    """float32 results `got` against float64 `truth`: every tensor's error (`grad_errors`) at
    most `factor` x the worst error of `same`, the same computation done the reference way in
    float32 (a floor measured in the test, on this machine's rounding, instead of a constant),
    + F32_ULP. The floor is the worst over the tensors: one tensor's own float32 error can be
    small by chance (per tensor, the ratios measured up to 20). Returns the worst ratio."""
    errs, floor = grad_errors(got, truth), max(grad_errors(same, truth))
    for name, e in zip(names, errs, strict=True):
        assert e <= factor * floor + F32_ULP, f"{name}: float32 error {e:.3g}, the reference way's worst {floor:.3g} " \
            f"(x{factor:g} allowed)"
    return max(errs) / max(floor, 1e-300)


def assert_same_state(a: dict[str, Any], b: dict[str, Any], what: str = "", tol: float = F64_TOL,
                      tol_cancelled: float = F64_TOL_CANCELLED) -> float:
    """Every floating tensor and float of two checkpoints within `tol` relative
    (`relative_differences`; `tol_cancelled` for `cancelled_by_batchnorm`'s tensors), every
    other value equal. Returns the worst relative difference, which it prints (pytest -s)."""
    diffs = relative_differences(a, b)
    loose = cancelled_by_batchnorm(diffs)
    bad = {k: v for k, v in diffs.items() if v > (tol_cancelled if k in loose else tol)}
    worst = sorted(diffs.items(), key=lambda kv: -kv[1])
    assert not bad, f"{what}: {len(bad)} of {len(diffs)} values above {tol:g} ({tol_cancelled:g} for " \
        "BatchNorm-cancelled biases): " + ", ".join(f"{k} {v:.3g}" for k, v in sorted(bad.items(), key=lambda kv: -kv[1])[:6])
    tight = max(((v, k) for k, v in diffs.items() if k not in loose), default=(0.0, "-"))
    print(f"{what}: {len(diffs)} values; worst relative difference {tight[0]:.3g} ({tight[1]}), "
          f"{worst[0][1]:.3g} with the BatchNorm-cancelled biases ({worst[0][0]})")
    return worst[0][1]


# digits with a tiny ConvNet, decoder and expert bank: Algorithm 1 end to end in seconds
OVERRIDES = [
    "net.width=8", "experts.num_experts=2", "experts.epochs=3", "device=cpu",
    "distill.steps=3", "distill.syn_steps=3", "distill.expert_epochs=1", "distill.max_start_epoch=2",
    "distill.mmd_samples=4", "distill.decoder_width=32", "distill.checkpoint_every=1",
    "distill.lr_latent=0.01", "distill.lr_decode=1e-3", "distill.lr_lr=1e-4",
    # eager unless a test says otherwise (tests/test_compile_step.py): compiling costs tens of
    # seconds per new graph, and distill.compile=auto compiles on CUDA
    "distill.compile=off",
]


def cfg_of(*extra):
    """The tiny digits config, its data.loader settled as a command would (digits: cache)."""
    from d3fast.preflight import resolve_data_loader

    cfg = resolve_config("digits", overrides=OVERRIDES + list(extra))
    resolve_data_loader(cfg)
    return cfg


class FakeClock:
    """A clock that stands still until the test moves it (`clock.t += seconds`)."""

    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


class OpClock(TorchDispatchMode):
    """A deterministic clock for whole training steps: it reads the number of tensor ops
    dispatched so far (forward and backward) while active. Phase accounting under it says
    which share of a step's ops ran inside named phases, the same on every machine."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __call__(self) -> float:
        return float(self.ops)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


class HostSyncs(TorchDispatchMode):
    """Records the ops that make the host wait for a GPU, run on any device: reading a
    value (`item`, `float(t)`, `if t`: aten._local_scalar_dense), data-dependent shapes
    (nonzero, masked_select, unique) and tensors made from host data (`torch.tensor(list)`:
    aten.lift_fresh, a blocking copy when it lands on a GPU). `tolist()` bypasses the
    dispatcher, so it is counted by a patch. Each record is (op, the innermost d3fast frame as
    file:line:function, or "torch.optim:0:step" inside an optimiser)."""

    OPS = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "lift_fresh")

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[str, str]] = []
        self._tolist = torch.Tensor.tolist

    def _where(self) -> str:
        import traceback

        stack = traceback.extract_stack()[:-2]
        if any("/torch/optim/" in f.filename for f in stack):
            return "torch.optim:0:step"
        frames = [f for f in stack if ("/d3fast/" in f.filename or "/kernels/" in f.filename) and not f.name.startswith("<")]
        return f"{Path(frames[-1].filename).name}:{frames[-1].lineno}:{frames[-1].name}" if frames else "?"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name in self.OPS:
            self.records.append((name, self._where()))
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        mode = self

        def tolist(t):
            mode.records.append(("tolist", mode._where()))
            return mode._tolist(t)

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)


def evaluate_run(run: Any, over: dict[str, Any] | None = None, progress: bool = False,
                 device: str | None = None) -> dict[str, Any]:
    """`evaluate` on a run's latest checkpoint, its protocol updated by `over` (what
    `d3fast evaluate RUN --set ...` does, without the printing)."""
    from d3fast.recipes.evaluate import _with, evaluate, run_target
    from d3fast.runtime import resolve_device

    dev = resolve_device(device or "auto")
    target = run_target(run, dev)
    _with(target.cfg, over)
    return evaluate(target, dev, progress)
