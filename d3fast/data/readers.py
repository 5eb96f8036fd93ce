"""Dataset readers: find a dataset's files in its standard layout and say what to decode.

A reader returns a `Source`: per split, the labels plus either decoded uint8 arrays
(IDX, CIFAR batches, scikit-learn digits), image files to decode (JPEG trees), parts that
load one batch file each (Imagenet64, too large to hold whole) or encoded parts that hand out
one batch of an Arrow/Parquet shard's image bytes at a time (Hugging Face datasets). Readers
check the layout and raise `D3FastError` with the path and a fix when it is wrong; they never
decode JPEGs themselves (prepare does that on all cores).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import math
import os
import pickle
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from d3fast.data.datasets import (
    CIFAR10_CLASSES,
    FASHION_MNIST_CLASSES,
    DatasetSpec,
    imagefolder_classes,
    is_hf,
)
from d3fast.data.hf import find_layout, iter_images, read_labels
from d3fast.errors import D3FastError


@dataclass
class Part:
    """The next `count` rows of a split, loaded only when prepare writes them."""

    count: int
    load: Callable[[], np.ndarray]  # -> uint8 [count, C, H, W]; raises D3FastError
    path: str  # the file it comes from, for error messages


@dataclass
class EncodedPart:
    """The next `count` rows of a split as encoded images (PNG, JPEG, ... bytes, or the path
    of a file) inside one shard, read a batch at a time while prepare's workers decode them."""

    count: int
    # rows per batch -> the rows' encoded images in order (None: a row without one); raises D3FastError
    batches: Callable[[int], Iterator[list[bytes | str | None]]]
    path: str  # the shard, for error messages ("<path> row <i>")


@dataclass
class SplitSource:
    labels: np.ndarray  # int64 [N]
    files: list[str] | None = None  # image files to decode, aligned with labels
    images: np.ndarray | None = None  # uint8 [N, C, H, W] when already decoded
    # Consecutive row blocks (counts summing to N) for splits too large for memory: prepare
    # loads and writes one at a time.
    parts: list[Part] | None = None
    # Consecutive row blocks of encoded images (counts summing to N): prepare decodes them
    # a batch at a time, never holding a whole split's bytes.
    encoded: list[EncodedPart] | None = None


@dataclass
class Source:
    classes: list[str]  # display names, label order
    class_ids: list[str]  # wnids or names, label order
    splits: dict[str, SplitSource]  # "train", "test"
    layout: str
    path: str
    # Changes whenever the source files change (names, sizes, mtimes).
    fingerprint: str
    notes: list[str] = field(default_factory=list)


def read_source(spec: DatasetSpec, data_path: str | None) -> Source:
    readers = {
        "digits": lambda: read_digits(),
        "fashion-mnist": lambda: read_fashion_mnist(_locate(spec, data_path)),
        "cifar10": lambda: read_cifar10(_locate(spec, data_path)),
        "cifar100": lambda: read_cifar100(_locate(spec, data_path)),
        "tinyimagenet": lambda: read_tinyimagenet(_locate(spec, data_path)),
        "imagenette": lambda: read_imagenet_subset(_locate(spec, data_path), spec),
        "imagewoof": lambda: read_imagenet_subset(_locate(spec, data_path), spec),
        "imagenet64": lambda: read_imagenet64(_locate(spec, data_path)),
    }
    if spec.name not in readers:  # an imagefolder or hf dataset (d3fast/data/datasets.py)
        root = _locate(spec, data_path)
        return read_hf(root, spec) if is_hf(spec.name) else read_imagefolder(root, spec)
    return readers[spec.name]()


def _locate(spec: DatasetSpec, data_path: str | None) -> Path:
    if data_path is not None:
        path = Path(data_path).expanduser()
        if not path.exists():
            raise D3FastError(f"--data-path {path} does not exist")
        if not path.is_dir():
            raise D3FastError(f"--data-path {path} is not a directory")
        return path
    for cand in spec.default_paths:
        if Path(cand).is_dir():
            return Path(cand)
    hint = {
        "fashion-mnist": " (on Debian: apt-get install dataset-fashion-mnist)",
    }.get(spec.name, "")
    searched = f"; searched {', '.join(spec.default_paths)}" if spec.default_paths else ""
    raise D3FastError(f"no data found for {spec.name}: pass --data-path{hint}{searched}")


def _fingerprint(root: Path, files: Sequence[Path | str], extra: str = "") -> str:
    h = hashlib.sha256(extra.encode())
    for f in files:
        st = os.stat(f)
        rel = os.path.relpath(f, root)
        h.update(f"{rel}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _list_images(folder: Path) -> list[Path]:
    """Non-hidden regular files of a class folder, sorted. Everything listed is decoded, so a
    stray non-image file is reported like a corrupt image rather than silently skipped."""
    with os.scandir(folder) as it:
        return sorted(
            Path(e.path) for e in it if e.is_file() and not e.name.startswith(".")
        )


# ---------------------------------------------------------------- scikit-learn digits


def read_digits() -> Source:
    """scikit-learn's 1,797 8x8 digits, upsampled to 32x32; a fixed stratified 80/20 split
    (seed 0), since the data set has no test split of its own."""
    import sklearn
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    d = load_digits()
    # values are 0..16 -> [0, 1], then bilinear upsampling 8 -> 32
    x = torch.from_numpy(d.images).float()[:, None] / 16.0
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    images = (x.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    labels = d.target.astype(np.int64)
    rng = np.random.default_rng(0)
    test_mask = np.zeros(len(labels), dtype=bool)
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        test_mask[rng.permutation(idx)[: len(idx) // 5]] = True
    names = [str(c) for c in range(10)]
    fp = hashlib.sha256(images.tobytes() + sklearn.__version__.encode()).hexdigest()
    return Source(
        classes=names,
        class_ids=names,
        splits={
            "train": SplitSource(labels=labels[~test_mask], images=images[~test_mask]),
            "test": SplitSource(labels=labels[test_mask], images=images[test_mask]),
        },
        layout="sklearn-digits",
        path="sklearn.datasets.load_digits",
        fingerprint=fp,
    )


# ---------------------------------------------------------------- Fashion-MNIST (IDX)

IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (optionally gzipped) holding unsigned bytes."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            data = path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise D3FastError(f"{path} is corrupt or truncated ({e}); download it again") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise D3FastError(f"{path} is not an IDX file (bad magic number)")
    if data[2] != 0x08:
        raise D3FastError(f"{path}: IDX element type 0x{data[2]:02x}, expected 0x08 (uint8)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise D3FastError(f"{path} is truncated inside its header")
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    need = math.prod(dims)  # Python ints: numpy's int64 product overflows on a damaged header
    if len(data) - header < need:
        raise D3FastError(
            f"{path} is truncated: header says {dims} ({need} bytes), "
            f"file holds {len(data) - header}; download it again"
        )
    try:
        return np.frombuffer(data, dtype=np.uint8, count=need, offset=header).reshape(dims)
    except ValueError as e:  # dims numpy cannot hold, e.g. 0 x 2^31 x 2^31 x 2^31
        raise D3FastError(f"{path} has an impossible IDX shape {dims} ({e})") from None


def read_fashion_mnist(root: Path) -> Source:
    splits, used = {}, []
    for split, (img_stem, lab_stem) in IDX_FILES.items():
        paths = []
        for stem in (img_stem, lab_stem):
            found = [root / n for n in (stem, stem + ".gz") if (root / n).is_file()]
            if not found:
                raise D3FastError(
                    f"{root} has no {stem}[.gz]: expected the four Fashion-MNIST IDX files "
                    f"({', '.join(s for pair in IDX_FILES.values() for s in pair)})"
                )
            paths.append(found[0])
        used += paths
        images, labels = read_idx(paths[0]), read_idx(paths[1])
        if images.ndim != 3 or labels.ndim != 1:
            raise D3FastError(f"{paths[0]}: expected [N, 28, 28] images and [N] labels")
        if len(images) != len(labels):
            raise D3FastError(
                f"{paths[0]} holds {len(images)} images but {paths[1]} {len(labels)} labels"
            )
        if labels.max(initial=0) >= 10:
            raise D3FastError(f"{paths[1]}: label {labels.max()} out of range 0..9")
        splits[split] = SplitSource(labels=labels.astype(np.int64), images=images[:, None].copy())
    return Source(
        classes=list(FASHION_MNIST_CLASSES),
        class_ids=list(FASHION_MNIST_CLASSES),
        splits=splits,
        layout="idx",
        path=str(root),
        fingerprint=_fingerprint(root, used),
    )


# ---------------------------------------------------------------- CIFAR-10


class _ForbiddenGlobal(pickle.UnpicklingError):
    pass


class _NumpyUnpickler(pickle.Unpickler):
    """Unpickler for python batches (CIFAR-10, Imagenet64) that can build numpy arrays and
    nothing else: a tampered file cannot run code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        # protocol 5 (Python 3.14's default) rebuilds an array from its in-band buffer
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        # protocol-2 pickles written by Python 3 encode bytes as _codecs.encode(str, "latin1")
        ("_codecs", "encode"),
    }

    def __init__(self, f: Any, max_bytes: int, **kw: Any) -> None:
        super().__init__(f, **kw)
        self.max_bytes = max_bytes

    def find_class(self, module: str, name: str):  # noqa: ANN201
        if (module, name) not in self.ALLOWED:
            raise _ForbiddenGlobal(f"refusing to load global {module}.{name}")
        if module.startswith("numpy.core.") and hasattr(np, "_core"):
            module = "numpy._core." + module.removeprefix("numpy.core.")
        found = super().find_class(module, name)
        if name == "_reconstruct":
            return functools.partial(_bounded_reconstruct, found, self.max_bytes)
        return found


def _bounded_reconstruct(real: Any, max_bytes: int, subtype: Any, shape: Any, dtype: Any) -> Any:
    """numpy's `_reconstruct`, refusing an array larger than the file: a pickle's pixels are in
    the file, and a hand-written one that asks for a (300000, 3072) array without them would
    allocate it from a few bytes."""
    try:
        size = int(np.prod(shape, dtype=np.float64)) * np.dtype(dtype).itemsize
    except (TypeError, ValueError) as e:
        raise _ForbiddenGlobal(f"an array of shape {shape!r} and dtype {dtype!r} ({e})") from None
    if size > max_bytes:
        raise _ForbiddenGlobal(f"an array of {size:,} bytes in a file of {max_bytes:,}")
    return real(subtype, shape, dtype)


def _load_pickled_dict(path: Path, what: str, fix: str = "") -> dict[str, Any]:
    """The dict pickled in `path`, loaded by `_NumpyUnpickler`, bytes keys (Python 2 files)
    decoded to str.

    Raises:
        D3FastError: a global other than numpy's array builders ("not <what>"), a damaged
            file ("corrupt or truncated" + `fix`), or no dict inside.
    """
    try:
        with open(path, "rb") as f:
            batch = _NumpyUnpickler(f, max_bytes=os.fstat(f.fileno()).st_size, encoding="bytes").load()
    except _ForbiddenGlobal as e:
        raise D3FastError(f"{path} is not {what} ({e})") from None
    except Exception as e:  # a damaged pickle raises anything from EOFError to MemoryError
        raise D3FastError(f"{path} is corrupt or truncated ({type(e).__name__}: {str(e)[:120]}){fix}") from None
    if not isinstance(batch, dict):
        raise D3FastError(f"{path} is not {what} (no dict inside)")
    problem = _expansion(batch)
    if problem:
        raise D3FastError(f"{path} is not {what} ({problem})")
    return {k.decode(errors="replace") if isinstance(k, bytes) else k: v for k, v in batch.items()}


# What a batch's containers may hold, counted as np.asarray would expand them. A pickle's memo
# lets a few hundred bytes of lists that share references stand for 10^10 elements (tens of GiB
# as an array); a real batch is a dict of arrays and flat lists (CIFAR: 10,000 labels a batch,
# ImageNet-64: ~128,000).
MAX_PICKLED_ELEMENTS = 1 << 24
MAX_PICKLED_DEPTH = 3


def _expansion(obj: Any) -> str | None:
    """Why `obj` would expand past MAX_PICKLED_ELEMENTS or MAX_PICKLED_DEPTH, or None. Arrays
    count as one element: their bytes were in the file."""
    stack: list[tuple[Any, int]] = [(obj, 0)]
    seen = 0
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, list | tuple):
            children = node
        else:
            continue
        if depth >= MAX_PICKLED_DEPTH:
            return f"containers nested deeper than {MAX_PICKLED_DEPTH}"
        seen += len(children)
        if seen > MAX_PICKLED_ELEMENTS:
            return f"containers holding more than {MAX_PICKLED_ELEMENTS:,} elements in all"
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list | tuple))
    return None


def _load_cifar_pickle(path: Path, labels_key: str = "labels", what: str = "CIFAR-10") -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 3, 32, 32], labels int64 [N]) of a CIFAR python batch; CIFAR-100's
    batches keep their labels under `fine_labels` (and `coarse_labels`, not read)."""
    batch = _load_pickled_dict(path, f"a {what} python batch")
    if "data" not in batch or labels_key not in batch:
        raise D3FastError(f"{path} has no 'data'/{labels_key!r} entries: not a {what} batch")
    try:
        data = np.asarray(batch["data"])
        labels = np.asarray(batch[labels_key])
        if data.dtype != np.uint8 or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"data {data.dtype} / labels {labels.dtype}, expected uint8 / integers")
        labels = labels.astype(np.int64)
    except (ValueError, TypeError, OverflowError) as e:
        raise D3FastError(f"{path} is not a {what} batch ({e})") from None
    if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
        raise D3FastError(f"{path}: data {data.shape} / labels {labels.shape}, expected [N, 3072] / [N]")
    return data.reshape(-1, 3, 32, 32), labels


def _load_cifar_bin(path: Path, label_bytes: int = 1, what: str = "CIFAR-10") -> tuple[np.ndarray, np.ndarray]:
    """A CIFAR binary batch: records of `label_bytes` label bytes then 3072 pixels (CIFAR-10:
    1 label; CIFAR-100: coarse then fine, and the fine label, the last, is read)."""
    size = label_bytes + 3072
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % size:
        what_labels = "1 label" if label_bytes == 1 else f"{label_bytes} labels"
        raise D3FastError(
            f"{path} holds {raw.size} bytes, not a multiple of {size} ({what_labels} + 3072 pixels): "
            f"truncated or not a {what} binary batch"
        )
    rec = raw.reshape(-1, size)
    return rec[:, label_bytes:].reshape(-1, 3, 32, 32).copy(), rec[:, label_bytes - 1].astype(np.int64)


def read_cifar10(root: Path) -> Source:
    """The python version (`cifar-10-batches-py/`, data_batch_1..5 + test_batch) or the
    binary version (`cifar-10-batches-bin/`, *.bin); `root` may be that folder or its parent."""
    layouts: list[tuple[str, list[str], str, Callable[[Path], tuple[np.ndarray, np.ndarray]]]] = [
        ("python", [f"data_batch_{i}" for i in range(1, 6)], "test_batch", _load_cifar_pickle),
        ("binary", [f"data_batch_{i}.bin" for i in range(1, 6)], "test_batch.bin", _load_cifar_bin),
    ]
    for folder in (root, root / "cifar-10-batches-py", root / "cifar-10-batches-bin"):
        for layout, train_names, test_name, loader in layouts:
            if not (folder / train_names[0]).is_file():
                continue
            missing = [n for n in [*train_names, test_name] if not (folder / n).is_file()]
            if missing:
                raise D3FastError(f"{folder} is missing CIFAR-10 files: {', '.join(missing)}")
            parts = [loader(folder / n) for n in train_names]
            test_x, test_y = loader(folder / test_name)
            train_x = np.concatenate([p[0] for p in parts])
            train_y = np.concatenate([p[1] for p in parts])
            for y, name in ((train_y, "train"), (test_y, "test")):
                if y.min() < 0 or y.max() >= 10:
                    raise D3FastError(f"{folder}: {name} labels outside 0..9")
            used = [folder / n for n in [*train_names, test_name]]
            return Source(
                classes=list(CIFAR10_CLASSES),
                class_ids=list(CIFAR10_CLASSES),
                splits={
                    "train": SplitSource(labels=train_y, images=train_x),
                    "test": SplitSource(labels=test_y, images=test_x),
                },
                layout=f"cifar10-{layout}",
                path=str(folder),
                fingerprint=_fingerprint(folder, used),
            )
    raise D3FastError(
        f"{root} is not a CIFAR-10 folder: expected cifar-10-batches-py/ (data_batch_1..5, "
        "test_batch) or cifar-10-batches-bin/ (*.bin), or the folder that contains one"
    )


def read_cifar100(root: Path) -> Source:
    """The python version (`cifar-100-python/`: train, test, meta) or the binary version
    (`cifar-100-binary/`: train.bin, test.bin, fine_label_names.txt); `root` may be that
    folder or its parent. The 100 fine labels are the classes; names come from meta or
    fine_label_names.txt."""
    def python(p: Path) -> tuple[np.ndarray, np.ndarray]:
        return _load_cifar_pickle(p, "fine_labels", "CIFAR-100")

    def binary(p: Path) -> tuple[np.ndarray, np.ndarray]:
        return _load_cifar_bin(p, 2, "CIFAR-100")

    layouts = [("python", "train", "test", python, "meta"), ("binary", "train.bin", "test.bin", binary,
                                                              "fine_label_names.txt")]
    for folder in (root, root / "cifar-100-python", root / "cifar-100-binary"):
        for layout, train_name, test_name, loader, names_file in layouts:
            if not (folder / train_name).is_file():
                continue
            if not (folder / test_name).is_file():
                raise D3FastError(f"{folder} is missing the CIFAR-100 file {test_name}")
            train_x, train_y = loader(folder / train_name)
            test_x, test_y = loader(folder / test_name)
            for y, name in ((train_y, "train"), (test_y, "test")):
                if y.min() < 0 or y.max() >= 100:
                    raise D3FastError(f"{folder}: {name} fine labels outside 0..99")
            used = [folder / train_name, folder / test_name]
            names, notes = _cifar100_names(folder / names_file)
            if (folder / names_file).is_file():
                used.append(folder / names_file)
            return Source(
                classes=names, class_ids=names,
                splits={"train": SplitSource(labels=train_y, images=train_x),
                        "test": SplitSource(labels=test_y, images=test_x)},
                layout=f"cifar100-{layout}", path=str(folder), fingerprint=_fingerprint(folder, used), notes=notes,
            )
    raise D3FastError(
        f"{root} is not a CIFAR-100 folder: expected cifar-100-python/ (train, test, meta) or cifar-100-binary/ "
        "(train.bin, test.bin), or the folder that contains one"
    )


def _cifar100_names(path: Path) -> tuple[list[str], list[str]]:
    """The 100 fine class names from `meta` (python) or `fine_label_names.txt` (binary), or
    "0".."99" with a note when the file is missing."""
    if not path.is_file():
        return [str(i) for i in range(100)], [f"{path.name} not found: classes are named 0..99"]
    if path.suffix == ".txt":
        names = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    else:
        raw = _load_pickled_dict(path, "the CIFAR-100 meta file").get("fine_label_names")
        names = [n.decode(errors="replace") if isinstance(n, bytes) else str(n) for n in (raw or [])]
    if len(names) != 100:
        raise D3FastError(f"{path} names {len(names)} fine classes, CIFAR-100 has 100")
    return names, []


# ---------------------------------------------------------------- TinyImageNet


def read_tinyimagenet(root: Path) -> Source:
    """`tiny-imagenet-200/`: wnids.txt, words.txt, train/<wnid>/images/*.JPEG and a flat
    val/images/ labelled by val/val_annotations.txt (the test/ split has no labels)."""
    if not (root / "wnids.txt").is_file() and (root / "tiny-imagenet-200").is_dir():
        root = root / "tiny-imagenet-200"
    if not (root / "train").is_dir() or not (root / "val").is_dir():
        raise D3FastError(
            f"{root} is not a TinyImageNet folder: expected tiny-imagenet-200/ with train/ and val/"
        )
    if (root / "wnids.txt").is_file():
        wnids = [w.strip() for w in (root / "wnids.txt").read_text().split() if w.strip()]
    else:
        wnids = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    # torchvision-style label order: sorted wnids
    wnids = sorted(wnids)
    names = dict.fromkeys(wnids, "")
    if (root / "words.txt").is_file():
        for line in (root / "words.txt").read_text().splitlines():
            wnid, _, words = line.partition("\t")
            if wnid in names:
                names[wnid] = words.split(",")[0].strip()
    label_of = {w: i for i, w in enumerate(wnids)}

    train_files, train_labels, problems = [], [], []
    for w in wnids:
        folder = root / "train" / w / "images"
        if not folder.is_dir():
            problems.append(f"missing class folder {folder}")
            continue
        files = _list_images(folder)
        if not files:
            problems.append(f"class folder {folder} is empty")
        train_files += files
        train_labels += [label_of[w]] * len(files)
    ann = root / "val" / "val_annotations.txt"
    if not ann.is_file():
        raise D3FastError(
            f"{ann} is missing: TinyImageNet's val/ is flat and its labels come from that file"
        )
    val_files, val_labels = [], []
    for n, line in enumerate(ann.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) < 2:
            raise D3FastError(f"{ann}:{n}: expected '<file>\\t<wnid>\\t...', got {line!r}")
        fname, wnid = parts[0], parts[1]
        if wnid not in label_of:
            raise D3FastError(f"{ann}:{n}: wnid {wnid} is not one of the train classes")
        path = root / "val" / "images" / fname
        if not path.is_file():
            problems.append(f"{ann}:{n} names {path}, which does not exist")
            continue
        val_files.append(path)
        val_labels.append(label_of[wnid])
    if problems:
        raise D3FastError("TinyImageNet layout problems:\n  " + "\n  ".join(problems[:20]))
    if not val_files:
        raise D3FastError(f"{ann} lists no images")
    notes = []
    if len(wnids) != 200:
        notes.append(f"found {len(wnids)} classes (TinyImageNet has 200)")
    return Source(
        classes=[names[w] or w for w in wnids],
        class_ids=wnids,
        splits={
            "train": SplitSource(labels=np.array(train_labels, np.int64), files=[str(f) for f in train_files]),
            "test": SplitSource(labels=np.array(val_labels, np.int64), files=[str(f) for f in val_files]),
        },
        layout="tinyimagenet",
        path=str(root),
        fingerprint=_fingerprint(root, train_files + val_files + [ann]),
        notes=notes,
    )


# ---------------------------------------------------------------- ImageNette / ImageWoof


def _find_imagenet_root(root: Path) -> Path:
    if (root / "train").is_dir():
        return root
    # the folder that holds the extracted archive (imagenette2/, imagewoof2-320/, ...)
    kids = [p for p in sorted(root.iterdir()) if p.is_dir() and (p / "train").is_dir()]
    if len(kids) == 1:
        return kids[0]
    raise D3FastError(
        f"{root} has no train/ folder: expected <path>/train/<wnid>/*.JPEG and "
        "<path>/val/<wnid>/*.JPEG (an ImageNet-1k tree or fast.ai's imagenette2/imagewoof2)"
        + (f"; candidates found: {', '.join(str(k) for k in kids)}" if kids else "")
    )


def read_imagenet_subset(root: Path, spec: DatasetSpec) -> Source:
    """The 10 classes of `spec` from an ImageNet-1k tree (train split for training, the
    ImageNet val split, sorted into val/<wnid>/, for testing) or from fast.ai's
    imagenette2/imagewoof2 archives, which use the same wnid folders."""
    root = _find_imagenet_root(root)
    splits, problems, all_files = {}, [], []
    for split, dirname in (("train", "train"), ("test", "val")):
        base = root / dirname
        if not base.is_dir():
            problems.append(f"missing split folder {base}")
            continue
        files, labels = [], []
        for label, (wnid, _, name) in enumerate(spec.imagenet_classes):
            folder = base / wnid
            if not folder.is_dir():
                problems.append(f"missing class folder {folder} ({name})")
                continue
            found = _list_images(folder)
            if not found:
                problems.append(f"class folder {folder} ({name}) is empty")
            files += found
            labels += [label] * len(found)
        if split == "test" and problems and any(
            p.suffix.lower() in (".jpeg", ".jpg") for p in base.iterdir() if p.is_file()
        ):
            problems.append(
                f"{base} holds images directly: sort ImageNet's flat val/ into val/<wnid>/ "
                "folders first (the standard valprep.sh does this)"
            )
        splits[split] = SplitSource(labels=np.array(labels, np.int64), files=[str(f) for f in files])
        all_files += files
    if problems:
        raise D3FastError(f"{spec.name} layout problems under {root}:\n  " + "\n  ".join(problems))
    n_wnid_dirs = sum(1 for p in (root / "train").iterdir() if p.is_dir() and p.name.startswith("n"))
    layout = "imagenet-1k" if n_wnid_dirs > len(spec.imagenet_classes) else "fastai"
    return Source(
        classes=[c[2] for c in spec.imagenet_classes],
        class_ids=[c[0] for c in spec.imagenet_classes],
        splits=splits,
        layout=layout,
        path=str(root),
        fingerprint=_fingerprint(root, all_files, extra=str(spec.resolution)),
    )


# ---------------------------------------------------------------- any ImageFolder tree


def read_imagefolder(root: Path, spec: DatasetSpec) -> Source:
    """train/<class>/ for training and val/<class>/ (or test/<class>/) for testing, classes in
    sorted folder order (recorded in the manifest), every image decoded at spec.resolution
    (short side resized, center crop) in RGB."""
    classes = imagefolder_classes(root)
    test_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    if test_dir is None:
        raise D3FastError(f"{root} has no val/ or test/ folder with the same class folders as train/")
    extra = sorted(p.name for p in test_dir.iterdir() if p.is_dir() and p.name not in classes
                   and not p.name.startswith("."))
    if extra:
        raise D3FastError(f"{test_dir} has class folders train/ lacks: {', '.join(extra[:5])}")
    splits, problems, all_files = {}, [], []
    for split, base in (("train", root / "train"), ("test", test_dir)):
        files, labels = [], []
        for label, name in enumerate(classes):
            found = _list_images(base / name) if (base / name).is_dir() else []
            if not found:
                problems.append(f"no images in {base / name}")
            files += found
            labels += [label] * len(found)
        splits[split] = SplitSource(labels=np.array(labels, np.int64), files=[str(f) for f in files])
        all_files += files
    if problems:
        raise D3FastError(f"{spec.name} layout problems under {root}:\n  " + "\n  ".join(problems[:10])
                          + (f"\n  ... {len(problems) - 10} more" if len(problems) > 10 else ""))
    return Source(classes=classes, class_ids=classes, splits=splits, layout=f"imagefolder ({test_dir.name}/ as test)",
                  path=str(root), fingerprint=_fingerprint(root, all_files, extra=f"{spec.resolution} rgb"))


# ---------------------------------------------------------------- local Hugging Face datasets


def read_hf(root: Path, spec: DatasetSpec) -> Source:
    """A local Hugging Face dataset (Parquet shards or a save_to_disk folder, d3fast/data/hf.py):
    its train split for training, the first of test / validation / valid / val for testing,
    classes the label column's ClassLabel names. Labels are read here; the image bytes stay
    in their shards, one `EncodedPart` per shard, until prepare decodes them at
    spec.resolution (short side resized, center crop) in RGB.

    Raises:
        D3FastError: the layout, a shard, its columns, class names or labels are wrong; each
            names the file (and row) and what was expected.
    """
    layout = find_layout(root)
    splits = {}
    for split, shards in layout.splits.items():
        labels = [read_labels(layout, s) for s in shards]
        parts = [EncodedPart(s.rows, functools.partial(iter_images, layout, s), str(s.path)) for s in shards]
        splits[split] = SplitSource(labels=np.concatenate(labels), encoded=parts)
    files = [s.path for shards in layout.splits.values() for s in shards] + layout.meta_files
    return Source(
        classes=layout.classes,
        class_ids=layout.classes,
        splits=splits,
        layout=f"hf {layout.kind} ({layout.test_split} as test)",
        path=str(root),
        fingerprint=_fingerprint(root, files, extra=f"{spec.resolution} rgb {layout.image_column} {layout.label_column}"),
        notes=layout.notes,
    )


# ---------------------------------------------------------------- Downsampled ImageNet 64x64

IMAGENET64_TRAIN = tuple(f"train_data_batch_{i}" for i in range(1, 11))
IMAGENET64_VAL = "val_data"
# npz first: its labels load without its pixels (see _imagenet64_labels_npz)
IMAGENET64_SUFFIXES = (".npz", "", ".pkl", ".pickle")
_IM64_ROW = 3 * 64 * 64  # bytes per image: the R, G, then B plane, each row-major 64x64
_IM64_FIX = "; download it again"
_IM64_EXPECTED = (
    "train_data_batch_1 .. train_data_batch_10 and val_data (.npz, or pickled with no suffix, "
    ".pkl or .pickle), in it or in a subfolder such as Imagenet64_train_npz/ and Imagenet64_val_npz/"
)


def read_imagenet64(root: Path) -> Source:
    """Downsampled ImageNet 64x64 (Chrabaszcz et al. 2017, image-net.org's Imagenet64_train
    and Imagenet64_val downloads): train_data_batch_1..10 and val_data in `root` or its
    immediate subfolders, each a .npz or a pickled dict holding `data` (uint8 [N, 12288],
    channel-major) and `labels` (1..1000). Labels become 0..999 in the files' order; class
    names come from `root`/map_clsloc.txt when present, else "class 1".."class 1000".

    Only the labels are read here: each file becomes one `Part` of its split (1.28M train
    images are 15.7 GB), loaded when prepare writes it.

    Raises:
        D3FastError: files missing, damaged, of the wrong shape or dtype, labels outside
            1..1000, or a data/labels length mismatch; each names the file.
    """
    files, notes = _find_imagenet64_files(root)
    splits = {}
    for split, names in (("train", IMAGENET64_TRAIN), ("test", (IMAGENET64_VAL,))):
        labels, parts = [], []
        for name in names:
            path = files[name]
            y = _imagenet64_labels_npz(path) if path.suffix == ".npz" else _imagenet64_labels_pickle(path)
            labels.append(y)
            parts.append(Part(len(y), functools.partial(_imagenet64_images, path, len(y)), str(path)))
        splits[split] = SplitSource(labels=np.concatenate(labels), parts=parts)
    classes, class_ids, map_files = _imagenet64_classes(root)
    kinds = {"npz" if p.suffix == ".npz" else "pickle" for p in files.values()}
    return Source(
        classes=classes,
        class_ids=class_ids,
        splits=splits,
        layout=f"imagenet64-{kinds.pop() if len(kinds) == 1 else 'mixed'}",
        path=str(root),
        fingerprint=_fingerprint(root, [*files.values(), *map_files]),
        notes=notes,
    )


def _find_imagenet64_files(root: Path) -> tuple[dict[str, Path], list[str]]:
    """{file stem: path} of the 11 Imagenet64 files and notes about duplicates. One found in
    several places is taken as .npz before pickled, then `root` before subfolders (sorted)."""
    folders = [root, *sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))]
    found: dict[str, Path] = {}
    notes: list[str] = []
    for name in (*IMAGENET64_TRAIN, IMAGENET64_VAL):
        cands = [f / (name + s) for s in IMAGENET64_SUFFIXES for f in folders if (f / (name + s)).is_file()]
        if cands:
            found[name] = cands[0]
        if len(cands) > 1 and not notes:
            notes.append(f"several copies of the Imagenet64 files: using {cands[0]} (not "
                         f"{', '.join(str(c) for c in cands[1:])}) and the like")
    if not found:
        raise D3FastError(f"{root} holds no Imagenet64 files: expected {_IM64_EXPECTED}")
    missing = [n for n in (*IMAGENET64_TRAIN, IMAGENET64_VAL) if n not in found]
    if missing:
        where = {str(p.parent) for p in found.values()}
        raise D3FastError(
            f"Imagenet64 files missing: {', '.join(missing)} (found the others in "
            f"{', '.join(sorted(where))}); download them again into {root} or a subfolder"
        )
    return found, notes


def _imagenet64_labels(path: Path, raw: Any) -> np.ndarray:
    """int64 [N] labels 0..999 from a file's 1-based `labels` entry."""
    try:
        y = np.asarray(raw)
    except (ValueError, TypeError, OverflowError) as e:  # ragged or odd lists
        raise D3FastError(f"{path}: 'labels' is not a list of integers ({e}){_IM64_FIX}") from None
    if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer) or y.size == 0):
        raise D3FastError(
            f"{path}: 'labels' is {y.dtype} {list(y.shape)}, expected a list of integers 1..1000{_IM64_FIX}"
        )
    y = y.astype(np.int64)
    bad = y[(y < 1) | (y > 1000)]
    if bad.size:
        raise D3FastError(
            f"{path}: label {bad[0]} outside 1..1000 ({bad.size} such); Imagenet64 labels are "
            f"1-based: not an Imagenet64 file or a damaged one{_IM64_FIX}"
        )
    return y - 1


def _check_imagenet64_data(path: Path, shape: tuple[int, ...], dtype: np.dtype, count: int) -> None:
    if dtype != np.uint8 or len(shape) != 2 or shape[1] != _IM64_ROW:
        hint = " (3072 columns: this is Imagenet32)" if len(shape) == 2 and shape[1] == 3 * 32 * 32 else ""
        raise D3FastError(
            f"{path}: 'data' is {dtype} {list(shape)}, expected uint8 [N, {_IM64_ROW}] "
            f"(64x64 RGB, channel-major){hint}; download the Imagenet64 files again"
        )
    if shape[0] != count:
        raise D3FastError(f"{path} holds {shape[0]} images but {count} labels{_IM64_FIX}")


def _open_npz(path: Path) -> Any:
    """np.load of an .npz (lazy per key, no pickles); D3FastError unless it is a zip of arrays."""
    try:
        z = np.load(path, allow_pickle=False)
    except Exception as e:  # a truncated zip raises BadZipFile, garbage ValueError or OSError
        raise D3FastError(f"{path} is corrupt or truncated ({type(e).__name__}: {str(e)[:120]}){_IM64_FIX}") from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise D3FastError(f"{path} is a single .npy array, not an .npz with 'data' and 'labels'{_IM64_FIX}")
    if not {"data", "labels"} <= set(z.files):
        z.close()
        raise D3FastError(f"{path} has no 'data'/'labels' arrays (holds {z.files}): not an Imagenet64 batch")
    return z


def _imagenet64_labels_npz(path: Path) -> np.ndarray:
    """The labels of an .npz, its `data` checked from the .npy header alone (a 12 KiB read,
    not 1.57 GB)."""
    with _open_npz(path) as z:
        try:
            raw = z["labels"]
            member = "data.npy" if "data.npy" in z.zip.namelist() else "data"
            with z.zip.open(member) as f:
                version = np.lib.format.read_magic(f)
                read = {(1, 0): np.lib.format.read_array_header_1_0,
                        (2, 0): np.lib.format.read_array_header_2_0}.get(version)
                # other versions (utf-8 field names) never hold uint8 pixels: the load says so
                header = read(f) if read is not None else None
        except Exception as e:
            raise D3FastError(f"{path} is corrupt or truncated ({type(e).__name__}: {str(e)[:120]}){_IM64_FIX}") from None
    y = _imagenet64_labels(path, raw)
    if header is not None:
        shape, _, dtype = header
        _check_imagenet64_data(path, shape, dtype, len(y))
    return y


def _imagenet64_pickle(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(data uint8 [N, 12288], labels 0..999) of a pickled batch."""
    batch = _load_pickled_dict(path, "an Imagenet64 python batch", _IM64_FIX)
    if "data" not in batch or "labels" not in batch:
        raise D3FastError(f"{path} has no 'data'/'labels' entries: not an Imagenet64 batch")
    y = _imagenet64_labels(path, batch["labels"])
    data = batch["data"]
    if not isinstance(data, np.ndarray):
        raise D3FastError(f"{path}: 'data' is a {type(data).__name__}, not a numpy array{_IM64_FIX}")
    _check_imagenet64_data(path, data.shape, data.dtype, len(y))
    return data, y


def _imagenet64_labels_pickle(path: Path) -> np.ndarray:
    # The labels of a pickle come only with its pixels, so the pickled variant is read twice:
    # here (then dropped) and again when prepare writes it: 31 GB of reads instead of 15.7,
    # about 30 s more at 500 MB/s. Keeping the pixels instead would take 15.7 GB of RAM, or a
    # scratch copy as large as the cache itself.
    return _imagenet64_pickle(path)[1]


def _imagenet64_images(path: Path, count: int) -> np.ndarray:
    """uint8 [count, 3, 64, 64] of one file, loaded in full (1.57 GB for a train batch).

    Raises D3FastError: damaged, or no longer the `count` images its labels announced."""
    if path.suffix == ".npz":
        with _open_npz(path) as z:
            try:
                data = z["data"]
            except Exception as e:  # a bad CRC or a short member shows only now
                raise D3FastError(f"{path} is corrupt or truncated ({type(e).__name__}: {str(e)[:120]}){_IM64_FIX}") from None
    else:
        data, _ = _imagenet64_pickle(path)
    _check_imagenet64_data(path, data.shape, data.dtype, count)
    return data.reshape(count, 3, 64, 64)


def _imagenet64_classes(root: Path) -> tuple[list[str], list[str], list[Path]]:
    """(names, ids, [map file if used]): map_clsloc.txt's wnids and names in id order, else
    the ids "1".."1000" (the files do not say which wnid a label is)."""
    path = root / "map_clsloc.txt"
    if not path.is_file():
        ids = [str(i) for i in range(1, 1001)]
        return [f"class {i}" for i in ids], ids, []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise D3FastError(f"{path} cannot be read ({e}); fix or remove it") from None
    entries: dict[int, tuple[str, str]] = {}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        parts = line.split(maxsplit=2)
        if len(parts) != 3 or not parts[1].isdecimal() or not 1 <= int(parts[1]) <= 1000:
            raise D3FastError(f"{path}:{n}: expected '<wnid> <id 1..1000> <name>', got {line!r}")
        if int(parts[1]) in entries:
            raise D3FastError(f"{path}:{n}: id {parts[1]} appears twice")
        entries[int(parts[1])] = (parts[0], parts[2].strip().replace("_", " "))
    missing = [str(i) for i in range(1, 1001) if i not in entries]
    if missing:
        raise D3FastError(
            f"{path} has no line for id(s) {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}: "
            "expected one '<wnid> <id> <name>' line per class 1..1000; fix or remove it"
        )
    return [entries[i][1] for i in range(1, 1001)], [entries[i][0] for i in range(1, 1001)], [path]
