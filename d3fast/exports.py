"""Every file format of a distilled object: the distribution as one safetensors file
(`export`, `load`: `d3fast export`, merged directories, the Python API's `d3fast.load`), and
image sets other tools read, and image sets from elsewhere (`d3fast export --format pt |
imagefolder`, `d3fast evaluate` of a `.pt` set or an ImageFolder).

A D3 object is a distribution; MTT-family code, DD-Ranking and torchvision take a fixed set
of images. `draw_set` (d3fast/distilled.py) turns one into the other: K samples per class, class-major, decoded in
shuffled batches so that BatchNorm in train mode (eval.decoder_bn = "batch") sees the mixed
batches it saw while distilling. `d3fast evaluate` with eval.fresh_samples = false trains on
the same draw (seed eval.seed), so a `pt` export re-evaluates to the run's accuracy.

Layouts written:
    pt           images.pt float32 [N, C, H, W] (normalised as the students see them: the
                 dataset's mean/std, then ZCA when the dataset uses it; with --pixels, [0, 1]),
                 labels.pt int64 [N] class-major, soft_labels.pt float32 [N, classes] when the
                 object has them, lr.pt float32 [] (the learned student lr), d3fast_export.json.
                 MTT saves images_best.pt / labels_best.pt / synthetic_lr_best.pt of this form.
    imagefolder  <index>_<class>/<k>.png pixels (uint8, ZCA undone), one folder per class,
                 zero-padded so that torchvision's sorted ImageFolder order is the class order;
                 d3fast_export.json beside them (classes, lr, config).
"""

from __future__ import annotations

import copy
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch

from d3fast.config import STORAGES
from d3fast.distilled import (
    LR_PARAMS,
    Distilled,
    Merged,
    check_soft_labels,
    decoder_holding,
    student_lr_of,
)
from d3fast.errors import D3FastError
from d3fast.io import (
    atomic_write_json,
    load_metadata,
    load_tensors,
    read_json,
    remove_stale_temps,
    replace_dir,
    save_tensors,
    temp_dir,
    tensors_sha256,
    write_failure,
)
from d3fast.quantize import dequantize, quantize
from d3fast.state import MAX_LOGVAR

INFO = "d3fast_export.json"
EXPORT_FORMAT = 1  # the safetensors export's header "format"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm")
# the largest side of an image in an image set: data.resolution's top (config.py), checked from
# the file's header before its pixels are decoded
MAX_SET_SIDE = 512


# bytes of a class name kept in its folder's name: file systems allow 255 bytes a name, and the
# index before it keeps truncated names apart
NAME_BYTES = 200


def _safe(name: str) -> str:
    """A folder name for a class name: path separators, control characters and leading dots
    replaced; letters of any script kept ("ünï cörn" stays readable); cut to NAME_BYTES
    bytes of UTF-8 at a character's end (a dataset's class name may be a sentence)."""
    safe = re.sub(r"[/\\\x00-\x1f\x7f]+", "_", name).strip().lstrip(".")
    return safe.encode()[:NAME_BYTES].decode(errors="ignore").strip() or "class"


def class_folders(classes: list[str]) -> list[str]:
    """`<index>_<name>` per class, zero-padded so that sorting them gives the class order."""
    width = len(str(max(len(classes) - 1, 0)))
    return [f"{i:0{width}d}_{_safe(c)}" for i, c in enumerate(classes)]


def _prepare_out(out: Path, force: bool) -> Path:
    """A temporary directory beside `out` to write into. An existing `out` is replaced only
    with `force` and only when it is an earlier export (it holds d3fast_export.json)."""
    if out.is_symlink():
        raise D3FastError(f"--out {out} is a symbolic link: give the directory it points to, or a new one")
    if out.parent.exists() and not out.parent.is_dir():
        raise D3FastError(f"cannot write {out}: {out.parent} is a file, not a directory")
    if out.exists():
        if not out.is_dir():
            raise D3FastError(f"--out {out} exists and is not a directory")
        if any(out.iterdir()):
            if not (out / INFO).is_file():
                raise D3FastError(f"--out {out} is a non-empty directory that is not a d3fast export: "
                                  "choose a new directory")
            if not force:
                raise D3FastError(f"--out {out} holds an earlier export: pass --force to replace it")
            info = read_json(out / INFO, "export description")
            ours = {INFO, "images.pt", "labels.pt", "soft_labels.pt", "lr.pt",
                    *(info.get("folders", []) if isinstance(info, dict) else [])}
            extra = sorted(p.name for p in out.iterdir() if p.name not in ours)
            if extra:
                raise D3FastError(f"--out {out} also holds files the export did not write ({', '.join(extra[:5])}"
                                  f"{', ...' if len(extra) > 5 else ''}): move them out first; --force replaces "
                                  "only what an export wrote")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(out.parent)
        tmp = temp_dir(out)
        tmp.mkdir()
    except OSError as e:
        raise D3FastError(f"cannot write {out}: {e.strerror or e} (in {out.parent})") from None
    return tmp


def write_pt(out: Path, images: torch.Tensor, labels: torch.Tensor, soft: torch.Tensor | None, lr: float,
             info: dict[str, Any], force: bool = False) -> Path:
    """The MTT-family layout (module docstring), written whole or not at all."""
    tmp = _prepare_out(out, force)
    try:
        torch.save(images.detach().float().contiguous().cpu(), tmp / "images.pt")
        torch.save(labels.detach().long().cpu(), tmp / "labels.pt")
        if soft is not None:
            torch.save(soft.detach().float().contiguous().cpu(), tmp / "soft_labels.pt")
        torch.save(torch.tensor(lr, dtype=torch.float32), tmp / "lr.pt")
        atomic_write_json(tmp / INFO, info | {"format": "pt"})
        replace_dir(tmp, out)
    except BaseException as e:
        _discard(tmp, out, e)
    return out


def write_imagefolder(out: Path, pixels: torch.Tensor, labels: torch.Tensor, classes: list[str],
                      soft: torch.Tensor | None, lr: float, info: dict[str, Any], force: bool = False) -> Path:
    """PNGs per class (`class_folders`), written whole or not at all; soft labels (when
    present) in soft_labels.pt, rows in the order of the sorted file paths."""
    from PIL import Image

    tmp = _prepare_out(out, force)
    try:
        folders = class_folders(classes)
        px = (pixels.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        lab = labels.cpu().tolist()
        count = [0] * len(classes)
        width = len(str(max(max(np.bincount(lab, minlength=len(classes))) - 1, 0)))
        files = []
        for img, y in zip(px, lab, strict=True):
            (tmp / folders[y]).mkdir(exist_ok=True)
            name = f"{folders[y]}/{count[y]:0{width}d}.png"
            count[y] += 1
            Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(tmp / name, format="PNG")
            files.append(name)
        if soft is not None:
            order = sorted(range(len(files)), key=files.__getitem__)
            torch.save(soft.detach().float().cpu()[order].contiguous(), tmp / "soft_labels.pt")
        atomic_write_json(tmp / INFO, info | {"format": "imagefolder", "folders": folders, "lr": lr})
        replace_dir(tmp, out)
    except BaseException as e:
        _discard(tmp, out, e)
    return out


def _discard(tmp: Path, out: Path, e: BaseException) -> NoReturn:
    """Remove an export's half-written folder and raise: a write failure (torch.save and PIL
    name no file: "unexpected pos 704 vs 598") as one line naming `out` and its free space."""
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    failure = write_failure(out, e)
    if failure is not None:
        raise failure from None
    raise e


@dataclass
class ImageSet:
    """A fixed set of distilled images from a file: d3fast's `pt`/`imagefolder` exports, MTT-
    family `.pt` files or any ImageFolder tree."""

    images: torch.Tensor  # float32 [N, C, H, W]: pixels in [0, 1] if `pixels`, else normalised
    labels: torch.Tensor  # int64 [N]
    pixels: bool
    source: str  # "pt" | "imagefolder"
    where: Path
    soft_labels: torch.Tensor | None = None  # float32 [N, classes]
    lr: float | None = None
    classes: list[str] | None = None
    info: dict[str, Any] = field(default_factory=dict)  # d3fast_export.json, when present
    # an ImageFolder's class folders, in sorted order (labels index them until `label_by_name`)
    folders: list[str] | None = None

    @property
    def bytes_per_value(self) -> int:
        """What one stored value costs: a uint8 pixel of a PNG, a float32 of a `.pt`."""
        return 1 if self.source == "imagefolder" else 4

    def per_class(self, num_classes: int) -> list[int]:
        return np.bincount(self.labels.cpu().numpy(), minlength=num_classes).tolist()

    def label_by_name(self, classes: list[str]) -> str | None:
        """An ImageFolder's labels from its folder names, matched to the dataset's `classes`
        (a class name, or d3fast's `<index>_<name>`); when no folder names a class and there
        are exactly as many folders as classes, torchvision's positional order, with a note
        (returned).

        Raises:
            D3FastError: folders that match some classes but not all, or neither by name nor count.
        """
        if self.folders is None:
            return None
        by_name = {c: i for i, c in enumerate(classes)} | {f: i for i, f in enumerate(class_folders(classes))}
        found = [by_name.get(f) for f in self.folders]
        if all(i is not None for i in found):
            self.labels = torch.tensor([found[y] for y in self.labels.tolist()], dtype=torch.long)
            self.classes = [classes[i] for i in found if i is not None]
            return None
        unknown = [f for f, i in zip(self.folders, found, strict=True) if i is None]
        if len(unknown) == len(self.folders) and len(self.folders) == len(classes):
            return (f"the folders of {self.where} name none of the dataset's classes: folder k (sorted) is class k, "
                    "as torchvision's ImageFolder reads it")
        raise D3FastError(f"the class folders of {self.where} ({', '.join(unknown[:5])}"
                          f"{', ...' if len(unknown) > 5 else ''}) are not classes of the dataset (e.g. "
                          f"{', '.join(classes[:3])}): name each folder by its class (or <index>_<class>)")


def is_image_set(path: Path) -> bool:
    """A `.pt` file, a folder with a `*images*.pt`, or a folder of class folders of images."""
    if path.is_file():
        return path.suffix == ".pt"
    if not path.is_dir():
        return False
    return bool(_pt_in(path)) or (path / INFO).is_file() or _class_dirs(path) != []


def _pt_in(folder: Path) -> Path | None:
    for name in ("images.pt", "images_best.pt"):
        if (folder / name).is_file():
            return folder / name
    found = sorted(p for p in folder.glob("*images*.pt") if p.is_file())
    return found[0] if len(found) == 1 else None


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def read_image_set(path: str | Path) -> ImageSet:
    """The image set at `path` (see `is_image_set`).

    `.pt` sets: images [N, C, H, W] floating point, labels [N] integers (or [N, classes]
    probabilities: soft labels, the hard label their argmax), an optional lr ([] or [1]) in
    the file named like the images file with "images" -> "lr" (or "synthetic_lr", MTT's name).
    Read with torch.load(weights_only=True). Images are normalised unless d3fast_export.json
    says they are pixels. ImageFolder sets are pixels; classes are the folders in sorted order.

    Raises:
        D3FastError: a missing labels file, wrong shapes or dtypes, non-finite values, an
            unreadable image, folders of no images.
    """
    path = Path(path)
    if not path.exists():
        raise D3FastError(f"{path} not found")
    folder = path if path.is_dir() else path.parent
    info = read_json(folder / INFO, "export description") if (folder / INFO).is_file() else {}
    if not isinstance(info, dict):
        raise D3FastError(f"{folder / INFO} is not a d3fast export description")
    images_file = path if path.is_file() else _pt_in(path)
    if images_file is not None:
        return _read_pt(images_file, info)
    return _read_imagefolder(path, info)


def _load_pt(path: Path, what: str) -> Any:
    """torch.load(weights_only=True): tensors and plain containers only, never code.
    PyTorch's advice to retry without weights_only is left out of the message on purpose."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise D3FastError(f"{what} {path} is not a tensor file d3fast can read safely (torch.load with "
                          f"weights_only=True: {type(e).__name__})") from None
    if isinstance(obj, torch.Tensor) and (obj.layout != torch.strided or obj.device.type != "cpu"):
        raise D3FastError(f"{what} {path} holds a {obj.layout} tensor on {obj.device}: save a dense tensor")
    return obj


def _read_pt(images_file: Path, info: dict[str, Any]) -> ImageSet:
    images = _load_pt(images_file, "images")
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point() \
            or len(images) == 0:
        raise D3FastError(f"{images_file} must hold a floating-point tensor [N, C, H, W] with N >= 1, got "
                          f"{type(images).__name__}{list(images.shape) if isinstance(images, torch.Tensor) else ''}")
    labels_file = images_file.with_name(images_file.name.replace("images", "labels"))
    if labels_file == images_file or not labels_file.is_file():
        raise D3FastError(f"no labels beside {images_file} (expected {labels_file.name})")
    labels = _load_pt(labels_file, "labels")
    soft = None
    if isinstance(labels, torch.Tensor) and labels.dim() == 2 and labels.is_floating_point():
        soft, labels = labels.float(), labels.argmax(1)
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.is_floating_point() \
            or labels.dtype == torch.bool or labels.is_complex() or len(labels) != len(images):
        raise D3FastError(f"{labels_file} must hold {len(images)} integer labels [N] (or probabilities [N, classes])")
    if (labels < 0).any():
        raise D3FastError(f"{labels_file} holds negative labels")
    soft_file = images_file.with_name("soft_labels.pt")
    if soft is None and soft_file.is_file():
        soft = _load_pt(soft_file, "soft labels")
        if not isinstance(soft, torch.Tensor) or soft.dim() != 2 or len(soft) != len(images):
            raise D3FastError(f"{soft_file} must hold [N, classes] probabilities for the {len(images)} images")
        soft = soft.float()
    lr = None
    for name in ("lr", "synthetic_lr"):
        f = images_file.with_name(images_file.name.replace("images", name))
        if f != images_file and f.is_file():
            t = _load_pt(f, "lr")
            if not isinstance(t, torch.Tensor | float) or (isinstance(t, torch.Tensor) and t.numel() != 1):
                raise D3FastError(f"{f} must hold one number (the student lr)")
            lr = float(t)
            # SGD on normalised images diverges far below 10; larger values are a wrong file, not an lr
            if not (np.isfinite(lr) and 0 < lr <= 10):
                raise D3FastError(f"{f} holds the lr {lr}: a student lr must be in (0, 10]")
            break
    images = images.float()
    if not torch.isfinite(images).all() or (soft is not None and not torch.isfinite(soft).all()):
        raise D3FastError(f"{images_file.parent} holds NaN or infinite values")
    _check_soft(soft, images_file.parent)
    pixels = info.get("pixels", False)
    if not isinstance(pixels, bool):
        raise D3FastError(f"{images_file.parent / INFO}: \"pixels\" must be true or false, got {pixels!r}")
    return ImageSet(images=images, labels=labels.long(), pixels=pixels, source="pt", where=images_file,
                    soft_labels=soft, lr=lr, classes=info.get("classes"), info=info)


def _check_soft(soft: torch.Tensor | None, where: Path) -> None:
    """Soft labels are probability rows: non-negative, each summing to 1."""
    if soft is not None and ((soft < 0).any() or not torch.allclose(soft.sum(1), torch.ones(len(soft)), atol=1e-3)):
        raise D3FastError(f"the soft labels of {where} are not probabilities (rows >= 0 summing to 1)")


def _read_imagefolder(folder: Path, info: dict[str, Any]) -> ImageSet:
    from PIL import Image

    from d3fast.data.decode import to_8bit

    dirs = _class_dirs(folder)
    if not dirs:
        raise D3FastError(f"{folder} holds no images.pt and no class folders: not an image set")
    arrays, labels, shape = [], [], None
    size: tuple[int, int] | None = None
    for y, d in enumerate(dirs):
        for f in sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            try:
                with Image.open(f) as im:  # 16-bit and float images scaled as `prepare` does, not clipped
                    # the header first, the pixels after: a folder of camera photos (or one
                    # crafted 8000x8000 PNG of a few KB) is refused before it is decoded
                    frames = int(getattr(im, "n_frames", 1))
                    if max(im.size) > MAX_SET_SIDE or frames > 1:
                        raise D3FastError(
                            f"{f} is {im.size[0]}x{im.size[1]}" + (f" with {frames} frames" if frames > 1 else "")
                            + f": an image set holds single images of at most {MAX_SET_SIDE}x{MAX_SET_SIDE} (the "
                            "dataset's resolution)")
                    if size is not None and im.size != size:
                        raise D3FastError(f"{f} is {im.size[0]}x{im.size[1]}, the others {size[0]}x{size[1]}: an "
                                          "image set has one size")
                    size = im.size
                    im8 = to_8bit(im)
                    a = np.asarray(im8.convert("L" if im8.mode in ("L", "1") else "RGB"))
            except D3FastError:
                raise
            except Exception as e:
                raise D3FastError(f"unreadable image {f} ({type(e).__name__}: {e})") from None
            a = a[..., None] if a.ndim == 2 else a
            if shape is not None and a.shape != shape:
                raise D3FastError(f"{f} is {a.shape[1]}x{a.shape[0]}x{a.shape[2]}, the others "
                                  f"{shape[1]}x{shape[0]}x{shape[2]}: an image set has one size")
            shape = a.shape
            arrays.append(a)
            labels.append(y)
    if not arrays:
        raise D3FastError(f"the class folders of {folder} hold no images ({', '.join(IMAGE_SUFFIXES)})")
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0
    soft = None
    if (folder / "soft_labels.pt").is_file():
        soft = _load_pt(folder / "soft_labels.pt", "soft labels")
        if not isinstance(soft, torch.Tensor) or soft.dim() != 2 or len(soft) != len(images):
            raise D3FastError(f"{folder / 'soft_labels.pt'} must hold [N, classes] probabilities for the {len(images)} images")
        soft = soft.float()
        _check_soft(soft, folder)
    lr = info.get("lr")
    if lr is not None and not (isinstance(lr, int | float) and np.isfinite(lr) and 0 < lr <= 10):
        raise D3FastError(f"{folder / INFO}: \"lr\" must be a number in (0, 10], got {lr!r}")
    return ImageSet(images=images, labels=torch.tensor(labels), pixels=True, source="imagefolder", where=folder,
                    soft_labels=soft, lr=None if lr is None else float(lr),
                    # d3fast's own export names its classes (folders <index>_<class>); others: the folders
                    classes=info["classes"] if info.get("folders") == [d.name for d in dirs]
                    and isinstance(info.get("classes"), list) else [d.name for d in dirs],
                    info=info, folders=[d.name for d in dirs])


def zca_of(cfg: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The dataset's ZCA (W, mu) when cfg.data.zca is on (fitted on, and cached beside, the
    prepared train split); None without ZCA.

    Raises:
        D3FastError: ZCA is on and the dataset is not prepared here.
    """
    if not cfg.data.zca:
        return None
    from d3fast.data.cache import load_split
    from d3fast.data.loader import fit_zca

    return fit_zca(cfg.data.dataset, cfg.data.zca_eps, load_split(cfg.data.dataset, "train", mmap=True)[2])


def describe(cfg: Any, d: Distilled | Merged, step: int | None, zca: tuple[torch.Tensor, torch.Tensor] | None) -> dict[str, Any]:
    """What an export carries besides its tensors: the dataset, d3fast version and git commit,
    the whole config, the step, the BatchNorm mode samples decode with, and the ZCA used (eps
    and the sha256 of its matrix, for a reader to compare with its own ZCA before de-whitening;
    d3fast itself refits it from the prepared dataset and does not compare yet)."""
    import hashlib

    from d3fast import __version__
    from d3fast.config import to_dict
    from d3fast.runtime import git_commit

    info: dict[str, Any] = {
        "dataset": cfg.data.dataset, "preset": cfg.preset, "step": step, "d3fast_version": __version__,
        "git_commit": git_commit(), "config": to_dict(cfg), "decoder_bn": cfg.eval.decoder_bn,
        "classes": list(d.classes), "mean": d.meta["mean"], "std": d.meta["std"],
        "zca": None if not cfg.data.zca else {"eps": cfg.data.zca_eps, "matrix_sha256": None if zca is None else
                                             hashlib.sha256(zca[0].cpu().numpy().tobytes()).hexdigest()},
    }
    return info


def export(d: Distilled | Merged, path: str | Path, info: dict[str, Any] | None = None) -> None:
    """The object as one safetensors file (no pickle), its floating tensors in its storage
    (distill.storage: float32 whatever the object computed in, or float16, int8, int4 with their
    <name>@scale tensors and meta "stored_shapes"; what `storage_bytes` counts): latents, alpha, decoder.<key> (a
    merged object: part<i>.latents, part<i>.alpha, part<i>.decoder.<key> per subtask),
    soft_labels when labelled, and the metadata decoding needs, with `info` (the dataset,
    version, config, step, BatchNorm mode, ZCA: d3fast/exports.py `describe`) beside it."""
    storage = d.parts[0].storage
    if storage != "float32":
        d = d.stored()  # the values as stored: what the student_lr and checks below see
    tensors: dict[str, torch.Tensor] = {}
    parts_meta = []
    for i, part in enumerate(d.parts):
        prefix = f"part{i}." if isinstance(d, Merged) else ""
        tensors[f"{prefix}latents"] = _f32(part.latents)
        tensors[f"{prefix}alpha"] = _f32(part.alpha).reshape(1)
        tensors.update({f"{prefix}decoder.{k}": _f32(v) for k, v in part.decoder.state_dict().items()})
        parts_meta.append({"meta": part.meta, "classes": part.classes, "student_lr": part.student_lr})
    if d.soft_labels is not None:
        tensors["soft_labels"] = _f32(d.soft_labels)
    meta = {
        "format": EXPORT_FORMAT,
        **d.parts[0].meta,
        "classes": d.classes,
        "num_classes": d.num_classes,
        "ppc": d.ppc,
        "student_lr": d.student_lr,
        "storage_bytes": d.storage_bytes(),
        "images_per_class_equivalent": round(d.images_per_class_equivalent(), 3),
        "soft_labels": d.soft_labels is not None,
    }
    if isinstance(d, Merged):
        meta |= {"kind": "merged", "parts": parts_meta, "sources": d.sources}
    if storage != "float32":
        tensors, meta["stored_shapes"] = _quantized(tensors, storage)
    # the object's own keys win: `info` describes, it does not redefine
    meta = {k: v for k, v in (info or {}).items() if k not in meta} | meta
    meta[DIGEST] = _digest(tensors, json.loads(json.dumps(meta)))  # checked by `load`
    save_tensors(path, tensors, meta)


# the export's sha256 of its tensors and its metadata (every key but itself), since issue 32
DIGEST = "content_sha256"


def _digest(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> str:
    import hashlib

    text = json.dumps({k: v for k, v in meta.items() if k != DIGEST}, sort_keys=True)
    return hashlib.sha256((tensors_sha256(tensors) + text).encode()).hexdigest()


# the name of a stored tensor's scales (d3fast/quantize.py), beside its values
SCALE = "@scale"
# a decoder's normalisation mean/std buffers: dataset metadata, stored as they are in every format
# (`storage.stored_tensors` leaves them out of the object's values)
_NORMALISATION = re.compile(r"(^|\.)decoder\.(mean|std)$")


def _quantized(tensors: dict[str, torch.Tensor], storage: str) -> tuple[dict[str, torch.Tensor], dict[str, list[int]]]:
    """The float32 tensors in `storage` (quantize.quantize: values, and scales as <name>@scale),
    and each stored tensor's shape (int4 values are packed flat)."""
    out: dict[str, torch.Tensor] = {}
    shapes: dict[str, list[int]] = {}
    for name, t in tensors.items():
        # integer tensors, and the normalisation buffers (dataset metadata, not the object's
        # values: `storage.stored_tensors`), stay as they are
        if not t.is_floating_point() or _NORMALISATION.search(name):
            out[name] = t
            continue
        stored = quantize(t, storage, latents=name.endswith("latents"))
        out[name] = stored["values"]
        if "scale" in stored:
            out[name + SCALE] = stored["scale"]
        shapes[name] = list(t.shape)
    return out, shapes


def _dequantized(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Inverse of `_quantized` for an export of meta["storage"] (float32 exports: unchanged).

    Raises:
        ValueError: an unknown storage, shapes missing or not matching the tensors, scales of no tensor.
    """
    storage = meta.get("storage", "float32")
    if storage == "float32":
        return tensors
    if storage not in STORAGES:
        raise ValueError(f"storage {storage!r} is not one of {', '.join(STORAGES)}")
    shapes = meta.get("stored_shapes")
    if not isinstance(shapes, dict):
        raise ValueError(f"a {storage} export without the shapes of its tensors")
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name.endswith(SCALE):
            if name[: -len(SCALE)] not in tensors:
                raise ValueError(f"scales {name} of no tensor")
            continue
        shape = shapes.get(name)
        if shape is None:
            # as written: BatchNorm's integer batch counts, and the normalisation buffers in float32
            as_is = (not t.is_floating_point() and name.endswith("num_batches_tracked")) or (
                t.dtype == torch.float32 and _NORMALISATION.search(name))
            if not as_is or name + SCALE in tensors:
                raise ValueError(f"{name} ({t.dtype}) has no stored shape in this {storage} export")
            out[name] = t
            continue
        if not (isinstance(shape, list) and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**31
                                                for v in shape)):
            raise ValueError(f"the stored shape of {name} is {shape!r}")
        stored = {"values": t} | ({"scale": tensors[name + SCALE]} if name + SCALE in tensors else {})
        try:
            out[name] = dequantize(stored, storage, shape)
        except D3FastError as e:
            raise ValueError(f"{name}: {e}") from None
    missing = [k for k in shapes if k not in tensors]
    if missing:
        raise ValueError(f"stored shapes of tensors the export lacks: {', '.join(missing[:3])}")
    return out


def _f32(t: torch.Tensor) -> torch.Tensor:
    """A floating tensor detached and in float32 (integer tensors unchanged)."""
    return t.detach().float() if t.is_floating_point() else t


def is_export(path: Path) -> bool:
    """Whether `path` is a file d3fast's safetensors export wrote (its header says so)."""
    try:
        return path.is_file() and load_metadata(path).get("format") == EXPORT_FORMAT
    except D3FastError:
        return False


_DECODER_META = ("resolution", "channels", "mean", "std", "z_dim", "decoder", "decoder_width", "decoder_linear",
                 "lr_param", "storage")


def load(path: str | Path, device: torch.device | str = "cpu") -> Distilled | Merged:
    """Load an exported distilled object, single or merged (safetensors; no pickle).

    Raises:
        D3FastError: not a d3fast export, or tensors that do not match their metadata.
    """
    tensors, meta = load_tensors(path, "distilled object")
    if meta.get("format") != EXPORT_FORMAT or not ("latents" in tensors or "part0.latents" in tensors):
        raise D3FastError(f"{path} is not a d3fast distilled export")
    # exports since issue 32 carry a checksum of their tensors and metadata; earlier ones get
    # the value checks only
    if DIGEST in meta and meta[DIGEST] != _digest(tensors, meta):
        raise D3FastError(f"{path} is a damaged distilled export: its tensors or metadata do not match the checksum "
                          "written with them (a changed byte: bit rot, a bad copy or an edit); export it again")
    try:
        tensors = _dequantized(tensors, meta)
    except ValueError as e:
        raise D3FastError(f"{path} is a damaged distilled export ({e})") from None
    soft = tensors.get("soft_labels")
    try:
        if meta.get("kind") == "merged":
            held = {int(m.group(1)) for k in tensors if (m := re.match(r"part(\d+)\.", k))}
            if held != set(range(len(meta["parts"]))):
                raise ValueError(f"the metadata describes {len(meta['parts'])} parts, the tensors hold "
                                 f"{len(held)}")
            storage = meta.get("storage", "float32")
            if any(p["meta"].get("storage", "float32") != storage for p in meta["parts"]):
                raise ValueError(f"its parts say another storage than its tensors' {storage}")
            parts = [_part_from(tensors, f"part{i}.", p["meta"], p["classes"], meta["ppc"], device, p.get("student_lr"))
                     for i, p in enumerate(meta["parts"])]
            if [c for p in parts for c in p.classes] != list(meta["classes"]):
                raise ValueError("the parts' classes are not the export's classes")
            return Merged.of(parts, soft_labels=None if soft is None else soft.to(device), sources=meta.get("sources", []))
        d = _part_from(tensors, "", {k: meta[k] for k in _DECODER_META if k in meta} | {
            "decoder_linear": meta.get("decoder_linear", True)}, meta["classes"], meta["ppc"], device,
            meta.get("student_lr"))
    except (KeyError, TypeError, ValueError) as e:
        raise D3FastError(f"{path} is a damaged distilled export ({type(e).__name__}: {e})") from None
    d.soft_labels = None if soft is None else soft.to(device)
    check_soft_labels(d, str(path))
    return d


def _part_from(
    tensors: dict[str, torch.Tensor], prefix: str, meta: dict[str, Any], classes: list[str], ppc: int,
    device: torch.device | str, student_lr: Any = None,
) -> Distilled:
    """One object of an export. Its lr parametrisation must be log or leaky_relu; where the
    metadata lacks it (exports of before the key, or a damaged file), it is the one whose lr
    of the stored alpha is the recorded `student_lr`.

    Raises:
        ValueError: tensors that do not fit the metadata, an unknown or contradicted lr_param."""
    alpha = tensors[f"{prefix}alpha"].reshape(()).double()
    lrs = {k: float(student_lr_of(alpha, k)) for k in LR_PARAMS}
    recorded = student_lr if isinstance(student_lr, int | float) and not isinstance(student_lr, bool) else None
    param = meta.get("lr_param")
    if param is None:
        param = "leaky_relu" if recorded is None else min(lrs, key=lambda k: abs(lrs[k] - recorded))
    if param not in lrs:
        raise ValueError(f"{prefix}lr_param is {param!r}, not log or leaky_relu")
    if not (math.isfinite(lrs[param]) and 0 < lrs[param] <= 10):
        raise ValueError(f"{prefix}alpha gives student lr {lrs[param]:.6g} under {param}: a usable lr is in (0, 10]")
    if recorded is not None and not abs(lrs[param] - recorded) <= 1e-4 * abs(recorded):
        raise ValueError(f"{prefix}alpha gives lr {lrs[param]:.6g} under {param}, but the export records {recorded:.6g}")
    meta = {**meta, "lr_param": param}
    state = {k[len(prefix) + len("decoder."):]: v for k, v in tensors.items() if k.startswith(f"{prefix}decoder.")}
    decoder = decoder_holding(meta, state)
    decoder.load_state_dict(state)
    latents = tensors[f"{prefix}latents"]
    if latents.dim() != 3 or latents.shape[0] != len(classes) * ppc or latents.shape[2] != 2 \
            or latents.shape[1] != meta.get("z_dim"):
        raise ValueError(f"{prefix}latents of shape {list(latents.shape)} for {len(classes)} classes x {ppc} priors "
                         f"of z {meta.get('z_dim')!r}")
    # every value usable before anything decodes from it: a NaN latent or decoder weight turns
    # every sample into NaN (a student trained on them scores chance, silently)
    named = [(f"{prefix}latents", latents), (f"{prefix}alpha", tensors[f"{prefix}alpha"]),
             *((f"{prefix}decoder.{k}", v) for k, v in state.items())]
    for name, t in named:
        if t.is_floating_point() and t.dtype != torch.float32:  # `export` writes float32
            raise ValueError(f"{name} is {t.dtype}, not float32")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} holds {int((~torch.isfinite(t)).sum())} non-finite value(s)")
    if not latents.is_floating_point():
        raise ValueError(f"{prefix}latents are {latents.dtype}, not float32")
    if bool((latents[..., 1] > MAX_LOGVAR).any()):  # exp(logvar / 2) of the sampling overflows
        raise ValueError(f"{prefix}latents hold log-variances up to {float(latents[..., 1].max()):.4g}, above "
                         f"{MAX_LOGVAR:g}")
    for key in ("mean", "std"):
        v = meta.get(key)
        if not (isinstance(v, list) and len(v) == int(meta.get("channels", -1))
                and all(isinstance(x, int | float) and math.isfinite(x) and (key == "mean" or x > 0) for x in v)):
            raise ValueError(f"{prefix}{key} is {v!r}: one finite number per channel" + (" > 0" if key == "std" else ""))
    d = Distilled(
        latents=latents.to(device), decoder=decoder.to(device), alpha=tensors[f"{prefix}alpha"].reshape(()).to(device),
        num_classes=len(classes), ppc=ppc, classes=classes, meta=meta,
    )
    # each prior's mean through a copy of the decoder: latents or weights that are finite but
    # too large (1e30) decode to inf or NaN, and every sample with them
    # in eval mode (running statistics) and in train mode (each batch's own, as `sample`
    # decodes by default: a 1e30 latent overflows the batch variance into NaN)
    probe = copy.deepcopy(d.decoder)
    with torch.no_grad():
        for train in (False, True):
            probe.train(train)
            for mu in d.latents[..., 0].split(256):  # ImageNet-1K's 10,000 priors at 64 px: 12 MB a chunk
                try:
                    finite = (len(mu) == 1 and train) or bool(torch.isfinite(probe(mu)).all())
                except RuntimeError as e:  # shapes the metadata's decoder cannot take
                    raise ValueError(f"{prefix}latents do not decode ({str(e).splitlines()[0]})") from None
                if not finite:
                    raise ValueError(f"{prefix}latents decode to non-finite images (values or weights out of range)")
    return d
