"""MTT replay buffers: the expert-trajectory files of MTT's `buffer.py` (Cazenavette et al.
2022, "Dataset Distillation by Matching Training Trajectories"), which the MTT, DATM, FTD and
D3 reference codes read. `d3fast experts import` turns them into d3fast expert files
(d3fast/trajectories.py) and `d3fast experts export --format mtt` writes them back.

Layout, as `buffer.py` writes it and `distill.py` reads it:

    <buffer_path>/<dataset dir>/<model>/replay_buffer_<n>.pt     n = 0, 1, ... (the readers
                                                                 stop at the first missing n)

with <dataset dir> CIFAR10 (CIFAR10_NO_ZCA when trained without ZCA; the same for
CIFAR100), FashionMNIST, Tiny, ImageNet/<subset>/<res>, and <model> ConvNet, ConvNetD4,
ConvNetW64, ConvNetBN, ... Each file is `torch.save` of a list of trajectories (ten per file
by default: buffer.py's --save_interval); a trajectory is a list of epochs + 1 snapshots
(the init, then one after every epoch); a snapshot is the list of the network's parameter
tensors in `nn.Module.parameters()` order. For MTT's ConvNet (networks.py), per block d of
`depth`: conv weight [W, C_d, 3, 3] and bias [W], then (unless its norm is none) the norm's
weight and bias [W] (instancenorm = GroupNorm(W, W), batchnorm, groupnorm = GroupNorm(4, W);
MTT's layernorm is a LayerNorm over [W, h, w], whose [W, h, w] weights no d3fast network
has); then the classifier's weight [classes, W h w] and bias [classes]. `distill.py`
flattens a snapshot as torch.cat of each tensor reshaped to a vector, in that order: the
same flat vector as d3fast's (d3fast/training.py `flat_params`), since d3fast's ConvNet
registers the same parameters in the same order. Running statistics (batchnorm) are not
parameters: a buffer does not hold them.
"""

from __future__ import annotations

import math
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from d3fast.errors import D3FastError
from d3fast.io import atomic_path

# n as buffer.py writes it (no leading zeros: replay_buffer_00.pt is not a name MTT reads)
BUFFER_RE = re.compile(r"^replay_buffer_(0|[1-9]\d*)\.pt$")
# buffer.py's --save_interval: trajectories per file
PER_FILE = 10
# d3fast's dataset name -> the folder MTT's buffer.py names after its --dataset (and --subset)
_DATASET_DIRS = {"fashion-mnist": "FashionMNIST", "cifar10": "CIFAR10", "cifar100": "CIFAR100",
                 "tinyimagenet": "Tiny", "imagenette": "ImageNet/imagenette", "imagewoof": "ImageNet/imagewoof"}
# MTT's ConvNet defaults (utils.get_default_convnet_setting) and the model-name suffix of each
# other norm and pooling (utils.get_network)
_DEFAULT = {"width": 128, "depth": 3, "norm": "instancenorm", "pooling": "avgpooling"}
_NORM_SUFFIX = {"batchnorm": "BN", "layernorm": "LN", "instancenorm": "IN", "groupnorm": "GN", "none": "NN"}
_POOL_SUFFIX = {"maxpooling": "MP", "avgpooling": "AP", "none": "NP"}
# every ConvNet model of MTT's utils.get_network and the one setting each changes (AR, AL, AS:
# ReLU, leaky ReLU, sigmoid; d3fast's ConvNet has ReLU)
MTT_MODELS: dict[str, dict[str, Any]] = {
    "ConvNet": {}, **{f"ConvNetD{d}": {"depth": d} for d in range(1, 9)},
    **{f"ConvNetW{w}": {"width": w} for w in (32, 64, 128, 256, 512, 1024)},
    **{f"ConvNet{suffix}": {"norm": norm} for norm, suffix in _NORM_SUFFIX.items()},
    **{f"ConvNet{suffix}": {"pooling": pool} for pool, suffix in _POOL_SUFFIX.items()},
    "ConvNetAR": {"act": "relu"}, "ConvNetAL": {"act": "leakyrelu"}, "ConvNetAS": {"act": "sigmoid"},
}
# the <dataset dir> names of MTT's buffer.py (ImageNet: ImageNet/<subset>/<res>)
_MTT_DATASETS = {"MNIST", "FashionMNIST", "SVHN", "CIFAR10", "CIFAR100", "Tiny", "ImageNet"}
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

Shape = tuple[int, ...]


def dataset_dir(dataset: str, zca: bool, res: int) -> str:
    """The <dataset dir> of MTT's layout for a d3fast dataset (its own name where MTT has
    none, e.g. digits)."""
    name = _DATASET_DIRS.get(dataset, dataset)
    if name.startswith("ImageNet/"):
        return f"{name}/{res}"
    if dataset in ("cifar10", "cifar100") and not zca:
        return f"{name}_NO_ZCA"
    return name


def model_name(width: int, depth: int, norm: str, pooling: str) -> str:
    """MTT's --model for a ConvNet: ConvNet at its defaults (width 128, depth 3,
    instancenorm, avgpooling), else ConvNet plus the suffix of each setting that differs
    (D<depth>, W<width>, BN/LN/GN/NN, MP/NP), the single-change names being MTT's own
    (ConvNetD4, ConvNetW64, ConvNetBN, ...). A name with two suffixes is d3fast's: MTT has no
    model that changes two settings at once."""
    parts = ["ConvNet"]
    if depth != _DEFAULT["depth"]:
        parts.append(f"D{depth}")
    if width != _DEFAULT["width"]:
        parts.append(f"W{width}")
    if norm != _DEFAULT["norm"]:
        parts.append(_NORM_SUFFIX[norm])
    if pooling != _DEFAULT["pooling"]:
        parts.append(_POOL_SUFFIX[pooling])
    return "".join(parts)


def dataset_note(dataset: str) -> str | None:
    """A note when MTT has no loader for `dataset` (its buffers go under d3fast's name)."""
    if dataset in _DATASET_DIRS:
        return None
    return (f"MTT's utils.get_dataset has no {dataset}: the buffers go under {dataset}/, and MTT needs a loader for it "
            "(the same images, normalisation and class order) to use them")


def model_note(name: str) -> str | None:
    """A note when `name` (from `model_name`) is not a model MTT's get_network builds."""
    if name in MTT_MODELS:
        return None
    return (f"MTT's utils.get_network has no model {name} (it knows {', '.join(sorted(MTT_MODELS)[:4])}, ... one "
            f"setting changed at a time): add one building this ConvNet there, or rename the folder to yours")


def folder_problem(model_dir: Path, dataset: str, zca: bool, res: int, norm: str, pooling: str) -> str | None:
    """What the names of a buffer's folders (<dataset dir>/<model>, MTT's layout) say against
    the config, where the tensor shapes cannot tell: another norm (batchnorm and instancenorm
    have the same shapes), pooling or activation, another dataset of the same shapes
    (MNIST for Fashion-MNIST), ZCA or not. None when the names agree or are not MTT's."""
    settings = MTT_MODELS.get(model_dir.name)
    if settings is not None:
        act = settings.get("act", "relu")
        if act != "relu":
            return f"its folder {model_dir.name} is MTT's ConvNet with {act} activations; d3fast's ConvNet has ReLU"
        for key, ours in (("norm", norm), ("pooling", pooling)):
            theirs = settings.get(key, _DEFAULT[key])
            if theirs != ours:
                return (f"its folder {model_dir.name} is MTT's ConvNet with {key} {theirs}, the config's net.{key} is "
                        f"{ours} (the shapes agree, the networks do not): --set net.{key}={theirs}, or rename the "
                        "folder if it was trained otherwise")
    want = dataset_dir(dataset, zca, res).split("/")
    parts = model_dir.parts[:-1]
    if parts and parts[-1].removesuffix("_NO_ZCA") in _MTT_DATASETS - {"ImageNet"}:
        got = [parts[-1]]
    elif len(parts) >= 3 and parts[-3] == "ImageNet":
        got = list(parts[-3:])
    else:
        return None
    if got == want:
        return None
    if got[0].removesuffix("_NO_ZCA") == want[0].removesuffix("_NO_ZCA"):
        fix = "--set data.zca=false" if got[0].endswith("_NO_ZCA") else "--set data.zca=true"
        return (f"its folder {got[0]} holds experts trained {'without' if fix.endswith('false') else 'with'} ZCA "
                f"whitening, the config's data.zca is {str(zca).lower()}: {fix}")
    return (f"its folder {'/'.join(got)} is MTT's name for another dataset than {dataset} (whose buffers MTT keeps "
            f"under {'/'.join(want)}): import it with the --dataset it was trained on")


def padding_note(channels: int, res: int) -> str | None:
    """MTT pads the first conv by 3 for every 1-channel input (28 px lifted to 32); d3fast
    pads only 28 px inputs so. At 1 channel and another size the shapes agree and the
    networks differ: the one case a shape check cannot see."""
    if channels == 1 and res != 28:
        return (f"MTT's ConvNet pads its first conv by 3 for every 1-channel input, d3fast's only at 28 px: at "
                f"{res} px the parameter shapes agree but the two networks compute different functions")
    return None


def buffer_files(path: Path) -> list[Path]:
    """The replay buffers at `path`: the file itself, or a folder's replay_buffer_<n>.pt in
    order of n.

    Raises:
        D3FastError: a missing path; a folder holding none (naming the subfolders that do,
            e.g. <buffer_path>/CIFAR10/ConvNet, when `path` is a level or two above them).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise D3FastError(f"{path} does not exist: pass a replay_buffer_<n>.pt file or the folder holding them "
                          "(<buffer_path>/<dataset>/<model>/)")
    if path.is_file():
        return [path]
    found = dict(sorted((int(m.group(1)), p) for p in path.iterdir() if (m := BUFFER_RE.match(p.name))))
    if found:
        run = [found[n] for n in range(len(found)) if n in found]
        if len(run) < len(found):  # MTT's distill.py reads n = 0, 1, ... up to the first missing one
            after = sorted(n for n in found if n >= len(run))
            raise D3FastError(f"{path} holds replay_buffer_{after[0]}.pt after a gap (no replay_buffer_{len(run)}.pt): "
                              f"MTT reads replay_buffer_0..{len(run) - 1} there and stops; number them without gaps, "
                              "or import the files one by one")
        return run
    below = sorted({str(p.parent) for depth in ("*", "*/*", "*/*/*") for p in path.glob(f"{depth}/replay_buffer_*.pt")})
    hint = f"; found them in {', '.join(below[:6])}: pass one of those" if below else ""
    raise D3FastError(f"{path} holds no replay_buffer_<n>.pt files (MTT's layout: <buffer_path>/<dataset>/<model>/"
                      f"replay_buffer_0.pt, ...){hint}")


def read_buffer(path: Path) -> list[list[list[torch.Tensor]]]:
    """One replay buffer: trajectories x snapshots x parameter tensors (float, CPU), loaded
    with `weights_only=True` (nothing but tensors and lists is unpickled) and memory-mapped
    where the file's format allows (a file of 10 ConvNet-5 experts x 51 epochs is ~1 GB).

    Raises:
        D3FastError: unreadable or not a replay buffer; naming the file, and for a wrong
            structure the trajectory and epoch where it breaks.
    """
    if not path.is_file():
        raise D3FastError(f"{path} is not a file: a replay buffer is one torch.save file")

    def load(mmap: bool) -> Any:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)

    try:
        try:
            raw = load(mmap=True)
        except RuntimeError as e:  # the legacy (pre-zip) format cannot be mapped
            if "mmap" not in str(e):
                raise
            raw = load(mmap=False)
    except pickle.UnpicklingError as e:
        raise D3FastError(f"{path} is not a replay buffer torch.load reads with weights_only=True (it holds "
                          f"objects other than tensors and lists: {_first_line(e)})") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        raise D3FastError(f"{path} is corrupt or truncated ({type(e).__name__}: {_first_line(e)}); "
                          "copy it again") from None
    _check_structure(path, raw)
    return raw


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:160] if lines else "no message"


def _check_structure(path: Path, raw: Any) -> None:
    if not isinstance(raw, list | tuple) or not raw:
        raise D3FastError(f"{path} is not a replay buffer: MTT's hold a non-empty list of trajectories, this holds "
                          f"{_kind(raw)}")
    count = None
    for t, traj in enumerate(raw):
        if not isinstance(traj, list | tuple) or len(traj) < 2:
            raise D3FastError(f"{path}: trajectory {t} is {_kind(traj)}, not a list of the init and at least one "
                              "epoch's parameters")
        for e, snap in enumerate(traj):
            if not isinstance(snap, list | tuple) or not snap or not all(
                    isinstance(p, torch.Tensor) and p.dtype in _FLOATS and p.layout == torch.strided
                    and p.device.type == "cpu" for p in snap):
                odd = next((p for p in snap if isinstance(p, torch.Tensor)), None) if isinstance(snap, list | tuple) else None
                raise D3FastError(f"{path}: trajectory {t}, epoch {e} is {_kind(snap)}, not a list of dense float16, "
                                  "bfloat16, float32 or float64 parameter tensors"
                                  + (f" (one is {odd.dtype}, {odd.layout}, on {odd.device.type})" if odd is not None else ""))
            if count is None:
                count = len(snap)
            elif len(snap) != count:
                raise D3FastError(f"{path}: trajectory {t}, epoch {e} holds {len(snap)} tensors, trajectory 0's "
                                  f"init {count}")


def _kind(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"a tensor {list(x.shape)} {str(x.dtype).removeprefix('torch.')}"
    if isinstance(x, list | tuple):
        return f"a list of {len(x)}" + (f" ({type(x[0]).__name__} first)" if x else "")
    return f"a {type(x).__name__}"


def describe(shapes: list[Shape]) -> str:
    """What a ConvNet snapshot's tensor shapes say about the network that made them: depth,
    width, input channels, norm and classes (MTT's ConvNet layout above)."""
    convs = [i for i, s in enumerate(shapes) if len(s) == 4]
    if not convs or len(shapes) < 2 or len(shapes[-2]) != 2:
        return f"{len(shapes)} tensors, not MTT's ConvNet layout"
    between = (convs[1] - convs[0]) if len(convs) > 1 else len(shapes) - 2 - convs[0]
    norm = {2: "no norm", 4: "a norm with per-channel weight and bias"}.get(between, f"{between - 2} norm tensors")
    if between == 4 and len(shapes[convs[0] + 2]) > 1:
        norm = "LayerNorm over [W, h, w] (MTT's layernorm)"
    first = shapes[convs[0]]
    return (f"a ConvNet of depth {len(convs)}, width {first[0]}, {first[1]} input channel(s), {norm}, "
            f"{shapes[-2][0]} classes from {shapes[-2][1]} features")


def layout_problem(shapes: list[Shape], layout: list[tuple[str, list[int]]]) -> str | None:
    """The first difference between a snapshot's tensor shapes and d3fast's network
    (`layout`: (parameter name, shape) in parameters() order, d3fast/training.py
    `param_layout`), in one sentence; None when they agree."""
    for i, ((name, want), got) in enumerate(zip(layout, shapes, strict=False)):
        if list(got) != list(want):
            return f"tensor {i} is {list(got)} where d3fast's network has {name} {list(want)}"
    if len(shapes) != len(layout):
        more = "more" if len(shapes) > len(layout) else "fewer"
        return f"it holds {len(shapes)} tensors, {more} than the {len(layout)} parameters of d3fast's network"
    return None


def flatten(snapshot: list[torch.Tensor]) -> torch.Tensor:
    """A snapshot as one float32 vector [P], as MTT's distill.py flattens it."""
    return torch.cat([p.detach().reshape(-1).float() for p in snapshot])


def unflatten(flat: torch.Tensor, layout: list[tuple[str, list[int]]]) -> list[torch.Tensor]:
    """A flat vector [P] as the parameter tensors of `layout`, each its own storage (a view
    would make torch.save write the whole vector once per tensor)."""
    sizes = [math.prod(shape) for _, shape in layout]
    if sum(sizes) != flat.numel():
        raise ValueError(f"{flat.numel()} values for a layout of {sum(sizes)}")
    return [p.reshape(shape).clone() for p, (_, shape) in zip(flat.split(sizes), layout, strict=True)]


def write_buffer(path: Path, trajectories: list[list[list[torch.Tensor]]]) -> None:
    """One replay buffer, atomically (a crash leaves no torn replay_buffer_<n>.pt, which the
    readers would stop at)."""
    with atomic_path(path) as tmp:
        torch.save(trajectories, tmp)
