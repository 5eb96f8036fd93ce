"""The datasets d3fast knows: sizes, classes and where their files live by default."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    num_classes: int
    resolution: int
    channels: int
    # Directories searched when --data-path is not given.
    default_paths: tuple[str, ...] = ()
    # Fixed classes (ImageNet subsets): (wnid, ImageNet-1k index, name), in label order.
    imagenet_classes: tuple[tuple[str, int, str], ...] = ()


# Label i is the i-th index of docs/algorithm.md section 7 (the MTT/D3 configs' order); the wnid is
# that index in torchvision's (sorted-wnid) order.
IMAGENETTE = (
    ("n01440764", 0, "tench"),
    ("n02102040", 217, "English springer"),
    ("n02979186", 482, "cassette player"),
    ("n03000684", 491, "chain saw"),
    ("n03028079", 497, "church"),
    ("n03394916", 566, "French horn"),
    ("n03417042", 569, "garbage truck"),
    ("n03425413", 571, "gas pump"),
    ("n03445777", 574, "golf ball"),
    ("n03888605", 701, "parachute"),
)
IMAGEWOOF = (
    ("n02096294", 193, "Australian terrier"),
    ("n02093754", 182, "Border terrier"),
    ("n02111889", 258, "Samoyed"),
    ("n02088364", 162, "beagle"),
    ("n02086240", 155, "Shih-Tzu"),
    ("n02089973", 167, "English foxhound"),
    ("n02087394", 159, "Rhodesian ridgeback"),
    ("n02115641", 273, "dingo"),
    ("n02099601", 207, "golden retriever"),
    ("n02105641", 229, "Old English sheepdog"),
)

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)

DATASETS: dict[str, DatasetSpec] = {
    "digits": DatasetSpec("digits", 10, 32, 1),
    "fashion-mnist": DatasetSpec(
        "fashion-mnist", 10, 28, 1, default_paths=("/usr/share/datasets/fashion-mnist",)
    ),
    "cifar10": DatasetSpec("cifar10", 10, 32, 3),
    "cifar100": DatasetSpec("cifar100", 100, 32, 3),
    "tinyimagenet": DatasetSpec("tinyimagenet", 200, 64, 3),
    "imagenette": DatasetSpec("imagenette", 10, 128, 3, imagenet_classes=IMAGENETTE),
    "imagewoof": DatasetSpec("imagewoof", 10, 128, 3, imagenet_classes=IMAGEWOOF),
    # Downsampled ImageNet-1k (Chrabaszcz et al. 2017): 1.28M train / 50k val images
    "imagenet64": DatasetSpec("imagenet64", 1000, 64, 3),
}


# Any train/<class>/ + val/<class>/ (or test/<class>/) tree at a chosen data.resolution:
# `imagefolder`, or `imagefolder-<label>` to keep several trees apart (each its own cache,
# experts and runs). Classes are the train folders in sorted order (torchvision's).
IMAGEFOLDER_RE = re.compile(r"^imagefolder(-[a-z0-9][a-z0-9_.-]{0,63})?$")
# A local Hugging Face dataset (Parquet shards or a save_to_disk folder, d3fast/data/hf.py) at
# a chosen data.resolution: `hf` or `hf-<label>`, the label rules of imagefolder. Classes are
# the label column's ClassLabel names, in label order.
HF_RE = re.compile(r"^hf(-[a-z0-9][a-z0-9_.-]{0,63})?$")
# What each kind of user dataset is read from, for the messages that send users to prepare it.
CUSTOM_SOURCES = {
    "imagefolder": "TREE holds train/<class>/ and val/<class>/ folders of images",
    "hf": "TREE holds a local Hugging Face dataset: Parquet shards or a save_to_disk folder",
}
CUSTOM_NAMES = "imagefolder[-<label>], hf[-<label>] (label: lower-case letters, digits, '_', '.', '-')"


def is_imagefolder(name: str) -> bool:
    return bool(IMAGEFOLDER_RE.match(name))


def is_hf(name: str) -> bool:
    return bool(HF_RE.match(name))


def custom_kind(name: str) -> str | None:
    """The kind of a dataset of the user's own files, prepared at a chosen data.resolution:
    "imagefolder" or "hf" (also its preset's name); None for the catalogue's fixed datasets."""
    return "imagefolder" if is_imagefolder(name) else "hf" if is_hf(name) else None


def known(name: str) -> bool:
    return name in DATASETS or custom_kind(name) is not None


def unknown_dataset(name: str) -> str:
    """The one-line message for a dataset name d3fast does not know."""
    return f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}, {CUSTOM_NAMES}"


def get_spec(name: str, data_path: str | None = None, resolution: int = 0) -> DatasetSpec:
    """The spec of dataset `name`. An imagefolder or hf dataset's comes from its prepared
    cache, else from the files at `data_path` at `resolution` (how many class folders train/
    holds; how many class names the hf features give).

    Raises:
        D3FastError: an unknown name; an imagefolder or hf dataset neither prepared nor given
            its files; an hf folder whose layout or class names cannot be read.
    """
    from d3fast.errors import D3FastError

    if name in DATASETS:
        return DATASETS[name]
    kind = custom_kind(name)
    if kind is None:
        raise D3FastError(unknown_dataset(name))
    from d3fast.data.cache import data_dir, read_manifest

    manifest = read_manifest(data_dir(name)) if data_dir(name).is_dir() else None
    if manifest is not None and resolution in (0, manifest["resolution"]) and (
            data_path is None or Path(data_path).expanduser().resolve() == Path(manifest["source"]["path"]).resolve()):
        # the tree it was prepared from is where `prepare` looks again (a re-run finds it up to date)
        return DatasetSpec(name, int(manifest["num_classes"]), int(manifest["resolution"]), int(manifest["channels"]),
                           default_paths=(str(manifest["source"]["path"]),))
    if data_path is None and manifest is not None:  # another resolution of the tree it was prepared from
        data_path = manifest["source"]["path"]
    if data_path is None:
        raise D3FastError(f"dataset {name} is not prepared: run `d3fast prepare --dataset {name} --data-path TREE "
                          f"--resolution R` ({CUSTOM_SOURCES[kind]})")
    if resolution <= 0:
        raise D3FastError(f"dataset {name}: choose the image size with --resolution (config data.resolution), "
                          "e.g. 32, 64 or 128")
    root = Path(data_path).expanduser()
    if kind == "hf":
        from d3fast.data.hf import find_layout

        return DatasetSpec(name, len(find_layout(root).classes), resolution, 3)
    return DatasetSpec(name, len(imagefolder_classes(root)), resolution, 3)


def imagefolder_classes(root: Path) -> list[str]:
    """The class folders of root/train/, sorted (torchvision's ImageFolder order).

    Raises:
        D3FastError: no train/ folder, or one without class folders.
    """
    from d3fast.errors import D3FastError

    if not (root / "train").is_dir():
        raise D3FastError(f"{root} has no train/ folder: an imagefolder dataset is root/train/<class>/*.png|jpg "
                          "and root/val/<class>/ (or root/test/<class>/)")
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise D3FastError(f"{root / 'train'} holds no class folders")
    return classes


def class_blocks(num_classes: int, subtasks: int) -> list[tuple[int, int]]:
    """The S contiguous class blocks [start, stop) of a subtask split (docs/algorithm.md
    section 9): the reference's split (imagebatch_i = classes 200 i .. 200 i + 199 of 1,000)
    when S divides the classes; otherwise the first C mod S blocks hold one class more.

    Raises:
        D3FastError: S < 1, or S > 1 with a block of fewer than 2 classes (S > C // 2).
    """
    from d3fast.errors import D3FastError

    # a subtask of one class cannot be distilled: its experts' cross-entropy is 0 from the
    # start (they never move) and its MTT loss 0 / 0
    most = max(num_classes // 2, 1)
    if not 1 <= subtasks <= most:
        raise D3FastError(f"config key data.subtasks: {subtasks} subtasks cannot split {num_classes} classes: each "
                          f"subtask needs at least 2 classes (1..{most} subtasks)")
    base, extra = divmod(num_classes, subtasks)
    starts = [i * base + min(i, extra) for i in range(subtasks + 1)]
    return list(zip(starts[:-1], starts[1:], strict=True))


def subtask_block(dataset: str, subtasks: int, subtask: int) -> tuple[int, int]:
    """The classes [start, stop) of `subtask` (-1: every class)."""
    n = get_spec(dataset).num_classes
    return (0, n) if subtask < 0 else class_blocks(n, subtasks)[subtask]
