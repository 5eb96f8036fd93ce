"""Typed run configuration: defaults < preset < command-line overrides.

A preset is an override-only TOML file in `d3fast/presets/`; `--dataset NAME` picks the
preset named NAME unless `--preset` names another. Overrides are dotted `key=value`
strings (`experts.lr=0.02`). Unknown keys and values of the wrong type are errors.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Literal

import tomllib

from d3fast.errors import D3FastError

# Allowed values, one home each: the fields below are annotated with these, `CHOICES` is read
# from the annotations, and the modules that act on a value (models, decoder, augment,
# trackers, the command line's choices) import them from here.
NetName = Literal["convnet", "resnet18", "vgg11", "alexnet"]
NetNorm = Literal["instancenorm", "batchnorm", "layernorm", "groupnorm", "none"]
NetPooling = Literal["avgpooling", "maxpooling", "none"]
AugMode = Literal["single", "all"]
AugOp = Literal["color", "crop", "cutout", "flip", "scale", "rotate"]
Loader = Literal["auto", "cache", "ffcv"]
DecoderKind = Literal["paper", "tiny", "small", "medium", "large"]
MMDReduction = Literal["sum", "mean"]
MMDScale = Literal["raw", "median"]
MMDParam = Literal["expert", "final"]
Unroll = Literal["auto", "flat", "naive"]
Compile = Literal["auto", "on", "off"]
DType = Literal["float32", "float64"]
# how the distilled object stores its values (d3fast/quantize.py)
StorageFormat = Literal["float32", "float16", "int8", "int4"]
LRParam = Literal["log", "leaky_relu"]
DecoderBN = Literal["batch", "running"]
Protocol = Literal["equal_steps", "per_set"]
Tracker = Literal["tensorboard", "wandb", "mlflow"]
# coreset baselines of `d3fast evaluate` (d3fast/coresets.py)
Coreset = Literal["herding", "kcenter"]
AUG_OPS: tuple[str, ...] = typing.get_args(AugOp)
TRACKERS: tuple[str, ...] = typing.get_args(Tracker)
CORESETS: tuple[str, ...] = typing.get_args(Coreset)
STORAGES: tuple[str, ...] = typing.get_args(StorageFormat)
NETWORKS: tuple[str, ...] = typing.get_args(NetName)
DECODERS: tuple[str, ...] = typing.get_args(DecoderKind)
# the top width of the medium and large decoders (d3fast/models/decoder.py): without the linear
# input layer z is reshaped to [top, 2, 2]
VAE_TOP = {"medium": 512, "large": 1024}


def vae_z_dim(kind: str) -> int:
    """The latent size a medium or large decoder without its linear layer needs: z is
    reshaped to [top, 2, 2], so 4 * top (2048 medium, 4096 large)."""
    return 4 * VAE_TOP[kind]


def ranged(default: Any, lo: float | None = None, hi: float | None = None, *, above: bool = False) -> Any:
    """A config field with its valid range: lo <= value (lo < value with `above`) and
    value <= hi. `validate` checks every field's range, for every command and on resume;
    floats must also be finite."""
    return field(default=default, metadata={"lo": lo, "hi": hi, "above": above})


@dataclass(kw_only=True)
class DataConfig:
    dataset: str = "digits"
    # Source tree or file directory; None searches the dataset's default locations.
    data_path: str | None = None
    # Drop unreadable images (listed in the manifest) instead of failing.
    skip_corrupt: bool = False
    # Decode processes for prepare, FFCV loader threads; 0 = one per core.
    workers: int = ranged(0, 0)
    # Streaming loader for experts and evaluation: auto (FFCV when installed and its files
    # exist, else the cache) | cache (device-resident uint8) | ffcv (d3fast/data/beton.py)
    loader: Loader = "auto"
    # ZCA whitening on normalised images (CIFAR-10 in MTT/D3), fitted on the train split.
    zca: bool = False
    # Regulariser of the ZCA covariance; 0.1 is MTT's value (kornia's default is 1e-6,
    # which amplifies the near-zero-variance directions of 32x32 images into noise).
    zca_eps: float = ranged(0.1, 0, above=True)
    # S: the classes split into S contiguous blocks distilled independently and merged
    # (docs/algorithm.md section 9; the reference's 5 x 200 and 2 x 500 ImageNet-1K splits)
    subtasks: int = ranged(1, 1, 65536)
    # the block this command works on, 0..S-1; -1: every block (distill runs them all and
    # merges; evaluation of a merged object reads every class)
    subtask: int = ranged(-1, -1, 65535)
    # image size of an imagefolder or hf dataset (d3fast/data/datasets.py); 0 for the others, whose
    # size is fixed (ConvNet depth then follows it: net.depth = 0)
    resolution: int = ranged(0, 0, 1024)


@dataclass(kw_only=True)
class NetConfig:
    # convnet | resnet18 | vgg11 | alexnet
    name: NetName = "convnet"
    width: int = ranged(128, 1, 65536)
    # 0 picks by resolution: 3 at 28/32 px, 4 at 64 px, 5 at 128 px.
    depth: int = ranged(0, 0)
    # instancenorm | batchnorm | layernorm | groupnorm | none
    norm: NetNorm = "instancenorm"
    # avgpooling | maxpooling | none
    pooling: NetPooling = "avgpooling"


@dataclass(kw_only=True)
class AugConfig:
    """Differentiable siamese augmentation (DSA), parameters as in the DSA/MTT code."""

    # Ops joined by '_': color, crop, cutout, flip, scale, rotate; "none" disables.
    strategy: str = "color_crop_cutout_flip_scale_rotate"
    # single: one op drawn per batch (the reference's default 'S'); all: apply every op.
    mode: AugMode = "single"
    prob_flip: float = ranged(0.5, 0, 1)
    # scales are drawn from [1 / ratio_scale, ratio_scale]
    ratio_scale: float = ranged(1.2, 1, 100)
    # degrees
    ratio_rotate: float = ranged(15.0, 0, 180)
    ratio_crop_pad: float = ranged(0.125, 0, 1)
    ratio_cutout: float = ranged(0.5, 0, 1)
    brightness: float = ranged(1.0, 0, 100)
    saturation: float = ranged(2.0, 0, 100)
    contrast: float = ranged(0.5, 0, 100)


@dataclass(kw_only=True)
class ExpertConfig:
    num_experts: int = ranged(100, 1)
    # Snapshots are saved after each epoch; distillation uses epochs up to
    # max_start_epoch + expert_epochs, so this must reach that.
    epochs: int = ranged(50, 1)
    # parameter snapshots per epoch, evenly spaced in its SGD steps (1 = after each epoch, as
    # in MTT). More let distill.expert_epochs be a fraction: on a large train set one epoch
    # is hundreds of expert steps, more than a few student steps on IPC images can match
    # (docs/algorithm.md section 4)
    snapshots_per_epoch: int = ranged(1, 1, 64)
    # docs/algorithm.md section 4: plain SGD, no momentum or weight decay, on purpose.
    lr: float = ranged(0.01, 0, above=True)
    batch_size: int = ranged(256, 1)
    augment: bool = True
    seed: int = ranged(0, 0)


@dataclass(kw_only=True)
class DistillConfig:
    """Algorithm 1 (docs/algorithm.md section 5). Names follow the reference code."""

    # latent priors per class (PPC); the paper uses up to 10
    ppc: int = ranged(1, 1, 10000)
    steps: int = ranged(3000, 1)
    # N: student steps unrolled per MTT update
    syn_steps: int = ranged(20, 1)
    # M: the target is the expert M epochs after the start; a fraction (a multiple of
    # 1 / experts.snapshots_per_epoch) when the experts keep snapshots within epochs
    expert_epochs: float = ranged(3.0, 0, above=True)
    # T: start epochs are drawn from 0..T-1 (with experts.snapshots_per_epoch = S, from the
    # snapshots 0, 1/S, .., T - 1/S)
    max_start_epoch: int = ranged(25, 1)
    # B: latents per unrolled student step; 0 = all of them
    batch_syn: int = ranged(0, 0)
    # auto: the graphs of as many steps as unroll_budget allows, the rest recomputed (no
    # recomputation when memory is plentiful) | flat: exact gradient by recomputation, memory
    # flat in syn_steps | naive: graph through every step (the reference's way). All three
    # give the same exact gradient (d3fast/unroll.py)
    unroll: Unroll = "auto"
    # auto: the fraction of free memory (GPU: the device's; CPU: MemAvailable) the kept step
    # graphs may take; 0 = flat throughout
    unroll_budget: float = ranged(0.5, 0, 1)
    # the unrolled student's per-step functions (its gradient, the flat unroll's HVP, the
    # naive steps' double backward), the decoder, DSA's ops and the MMD features through
    # torch.compile (d3fast/compiling.py): on | off | auto = on on CUDA (a fifth of the
    # kernels per step), off on the CPU, where
    # compiling costs 1-5 min per process (ImageWoof: 1.67x per step, docs/performance.md).
    # The values are the same to float rounding; without a compiler the step runs eagerly
    compile: Compile = "auto"
    # K students (each its own expert and start epoch) unrolled together; their MTT losses
    # are averaged
    students_per_step: int = ranged(1, 1, 1024)
    # the learned student lr's initial value
    lr_teacher: float = ranged(0.01, 0, above=True)
    # how the learned scalar alpha gives the student lr (docs/algorithm.md section 5, "The
    # learned student lr"). log: lr = exp(alpha), alpha stepped by Adam at lr_lr, so a step
    # moves the lr by about lr_lr relative (1e-2: 1 %) whatever the gradient's scale, and it
    # never reaches zero. leaky_relu: the reference's lr = leaky_relu(alpha) + 1e-4 with SGD
    # (momentum 0.5) at lr_lr (1e-5 .. 1e-6 there): its first steps, on a random decoder's
    # samples, send alpha below zero, where the lr sits at 1e-4 and the MTT loss at 1.0
    lr_param: LRParam = "log"
    # steps of the MTT health watch (d3fast/health.py): warn when the student lr sits at its
    # floor, or the MTT loss averages within 0.05 of 1.0, for this many steps; 0 = no watch
    health_steps: int = ranged(20, 0)
    # optimiser learning rates; 0 freezes that part
    lr_latent: float = ranged(3e-4, 0)
    lr_lr: float = ranged(1e-2, 0)
    lr_decode: float = ranged(3e-4, 0)
    # paper | tiny | small | medium | large (docs/algorithm.md section 2; the reference
    # code's ImageNet-1K budgets: small w256 at 1 IPC, medium at 2, large at 10)
    decoder: DecoderKind = "paper"
    # start channels of paper (256) and tiny/small (128 or 256); medium and large ignore
    # it (their ladders start at 512 and 1024 channels)
    decoder_width: int = ranged(256, 1, 65536)
    # medium | large: a Linear(z_dim -> top x 2 x 2) input layer; false reshapes z itself,
    # so z_dim must be 4 x top (2048 medium, 4096 large: the reference's large decoder).
    # paper, tiny and small always have it
    decoder_linear: bool = True
    z_dim: int = ranged(64, 1, 65536)
    # DSA on decoded images inside the unroll (as MTT does; the D3 code has none)
    augment_unroll: bool = True
    # S: real images per class for MMD; each latent decodes S // ppc samples
    mmd_samples: int = ranged(30, 1)
    # 0 disables the MMD update
    mmd_weight: float = ranged(1.0, 0)
    # sum over classes (reference: grows with C) | mean
    mmd_reduction: MMDReduction = "sum"
    mmd_bandwidths: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0, 8.0, 16.0])
    # raw: bandwidths on raw features (reference); median: bandwidths x the median real
    # pairwise distance of the step (the median heuristic)
    mmd_scale: MMDScale = "raw"
    # feature network weights: expert at epoch T + M ("expert") or its last epoch ("final")
    mmd_param: MMDParam = "expert"
    # samples whose feature-network graph is held at once in the MMD update (d3fast/embed.py:
    # chunked two-pass gradient, exact); 0 = automatic, at most min(25% of free memory, 1 GiB)
    mmd_chunk: int = ranged(0, 0)
    # one graph through every sample's features (the reference's way; for checks)
    mmd_exact_graph: bool = False
    # 0 disables the MTT update
    mtt_weight: float = ranged(1.0, 0)
    # KL(N(mu, exp(logvar)) || N(0, I)) per prior, averaged over priors
    kl_weight: float = ranged(1e-4, 0)
    # PPC >= 2: minus the mean squared distance between a class's decoded mean images
    div_weight: float = ranged(1e-2, 0)
    seed: int = ranged(0, 0)
    checkpoint_every: int = ranged(50, 1)
    # label each prior by the softmax of a ConvNet expert trained on all classes (its mean image
    # f(mu) through the expert at epoch soft_label_epoch), stored with the object and counted
    # in its storage; evaluation then trains students on these soft targets
    soft_labels: bool = False
    soft_label_epoch: int = ranged(2, 1)
    # bf16 autocast on CUDA for decoding, the unrolled student and MMD features; parameters,
    # adjoints and losses stay fp32
    amp: bool = False
    # float32 | float64: the dtype of the whole distillation (latents, decoder, the unrolled
    # students, expert parameters as read, real images, features, MMD, the unroll's adjoints,
    # optimiser state). float64 is the oracle for gradient checks and equality tests: two ways
    # of running one step (1 or N ranks, flat or naive unroll, resumed or not) agree to ~1e-12
    # there, while in float32 Adam turns rounding noise in near-zero gradients into lr-sized
    # steps (docs/algorithm.md section 5, Precision). Exports, evaluation and storage stay float32
    dtype: DType = "float32"
    # the object's stored values (d3fast/quantize.py): float32; float16; int8 or int4 with a
    # float32 scale per output channel. Storage, --budget-ipc, exports and evaluation count and
    # use the stored values; checkpoints keep the float32 masters
    storage: StorageFormat = "float32"
    # the finishing phase: the last quant_steps steps decode through the stored values
    # (straight-through gradient to the masters), so that the stored object learns to decode
    # well; with storage float32 nothing changes
    quant_steps: int = ranged(50, 0)


@dataclass(kw_only=True)
class EvalConfig:
    """Student evaluation (docs/algorithm.md section 6)."""

    archs: list[NetName] = field(default_factory=lambda: ["convnet"])
    students: int = ranged(5, 1)
    epochs: int = ranged(300, 1)
    batch_size: int = ranged(256, 1)
    # equal_steps: every row (distilled and real) trains on the same examples per epoch, C x the
    # largest of samples_per_class, the object's PPC and the baselines' images per class, in
    # batches of batch_size: the same SGD steps for all (a smaller set is cycled through).
    # per_set: one pass over each row's own set per epoch (distilled: samples_per_class per
    # class), as the reference; an equal-storage baseline then takes more steps per epoch
    protocol: Protocol = "equal_steps"
    # fresh distilled samples per class per epoch (equal_steps: at least this many)
    samples_per_class: int = ranged(10, 1)
    # false: one fixed draw of samples_per_class per class (seed eval.seed) for every epoch,
    # the set `d3fast export --format pt` writes (so an export re-evaluates to the same numbers)
    fresh_samples: bool = True
    momentum: float = ranged(0.9, 0, 1)
    weight_decay: float = ranged(5e-4, 0)
    # lr of the real-image baselines (the distilled set uses its learned lr)
    lr_real: float = ranged(0.01, 0, above=True)
    # the same lr search for every row: each row trains one student per lr of this list and its
    # own (learned, or lr_real), scores it on val_per_class held-out train images per class (never
    # the test set), and trains its students at the best; [] = no search
    lr_grid: list[float] = field(default_factory=list)
    val_per_class: int = ranged(20, 1)
    # batch: decoder BatchNorm uses the sampled batch's statistics, as while distilling;
    # running: the running statistics gathered while distilling
    decoder_bn: DecoderBN = "batch"
    baselines: bool = True
    # coreset baselines at equal storage beside random real (with baselines on): herding and
    # k-center greedy on the features of the whole-dataset expert at distill.soft_label_epoch
    # (d3fast/coresets.py); skipped, with a note, where no such expert exists
    coresets: list[Coreset] = field(default_factory=lambda: ["herding", "kcenter"])
    # soft-label students: T^2 x cross-entropy of softmax(logits / T) against the stored
    # probabilities sharpened to p^(1/T) (Hinton et al. 2015); T = 1 is the reference's plain
    # soft cross-entropy
    soft_temperature: float = ranged(1.0, 0, 100, above=True)
    # the equal-storage baseline is capped by the train set size
    seed: int = ranged(0, 0)


@dataclass(kw_only=True)
class LogConfig:
    """Metric trackers beside metrics.jsonl (d3fast/trackers.py)."""

    # tensorboard | wandb | mlflow (each its own optional dependency)
    trackers: list[Tracker] = field(default_factory=list)
    # a sample grid to the trackers every N distillation steps and at the last; 0 = never
    sample_every: int = ranged(500, 0)


@dataclass(kw_only=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    net: NetConfig = field(default_factory=NetConfig)
    augment: AugConfig = field(default_factory=AugConfig)
    experts: ExpertConfig = field(default_factory=ExpertConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    # auto | cpu | cuda | cuda:N
    device: str = "auto"
    # Name of the preset the config was resolved from (informational).
    preset: str = ""


def _choices() -> dict[str, tuple[str, ...]]:
    """dotted key -> allowed values, for every field annotated with a Literal."""
    out: dict[str, tuple[str, ...]] = {}
    for section, cls in typing.get_type_hints(Config).items():
        if dataclasses.is_dataclass(cls):
            for key, tp in typing.get_type_hints(cls).items():
                if typing.get_origin(tp) is Literal:
                    out[f"{section}.{key}"] = typing.get_args(tp)
    return out


CHOICES = _choices()


# a dataset whose presets are named otherwise: --dataset NAME alone picks this one
DATASET_PRESETS = {"imagenet64": "imagenet64-ipc1"}


def available_presets() -> list[str]:
    files = resources.files("d3fast.presets").iterdir()
    return sorted(f.name[: -len(".toml")] for f in files if f.name.endswith(".toml"))


def _is_file(name: str) -> bool:
    """A preset name that is a user's TOML file (`--config FILE.toml`), not a packaged preset."""
    return name.endswith(".toml") or os.sep in name


def _dataset_preset(dataset: str | None) -> str | None:
    """The packaged preset a dataset starts from, if any (imagefolder-<label>: imagefolder's,
    hf-<label>: hf's)."""
    from d3fast.data.datasets import custom_kind

    if not dataset:
        return None
    return DATASET_PRESETS.get(dataset) or (dataset if dataset in available_presets() else None) \
        or custom_kind(dataset)


def load_preset(name: str) -> dict[str, Any]:
    """A packaged preset by name, or a user's TOML file of the same form (a name ending in
    .toml or holding a path separator: `--config FILE.toml`), validated like any preset.

    Raises:
        D3FastError: unknown name, missing or unreadable file, invalid TOML."""
    from pathlib import Path

    if _is_file(name):
        user = Path(name).expanduser()
        if not user.exists():
            raise D3FastError(f"config file {name} does not exist")
        if not user.is_file():
            raise D3FastError(f"config file {name} is not a regular file")
        try:
            text = user.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise D3FastError(f"cannot read config file {name}: {e}") from None
    else:
        path = resources.files("d3fast.presets") / f"{name}.toml"
        if not path.is_file():
            raise D3FastError(
                f"unknown preset {name!r}; available: {', '.join(available_presets())} (or a .toml file)"
            )
        text = path.read_text()
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise D3FastError(f"preset {name!r} is not valid TOML: {e}") from None
    except (ValueError, RecursionError) as e:  # an int of > 4,300 digits; arrays nested thousands deep
        raise D3FastError(f"preset {name!r} is not a usable config ({type(e).__name__}: {str(e)[:120]})") from None


def to_toml(cfg: Config) -> str:
    """The whole config as TOML that `--config FILE` reads back to the same config (keys
    whose value is None, which TOML cannot write, are left out: they are the defaults)."""
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v)  # a JSON string is a TOML basic string
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return repr(v)

    top, sections = [], []
    for key, v in to_dict(cfg).items():
        if isinstance(v, dict):
            body = [f"{k} = {value(x)}" for k, x in v.items() if x is not None]
            sections.append(f"[{key}]\n" + "\n".join(body) + "\n")
        elif v is not None and key != "preset":
            top.append(f"{key} = {value(v)}")
    return "\n".join(top) + "\n\n" + "\n".join(sections)


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, key: str, from_string: bool) -> Any:
    """Check `value` against annotation `tp`; parse it first when it came from the CLI."""
    origin = typing.get_origin(tp)
    if origin is Literal:  # a str; `validate` checks it is one of the choices
        tp, origin = str, None
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if type(None) in args and (value is None or (from_string and value.lower() in ("none", "null"))):
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, key, from_string)
    if from_string:
        if tp is bool:
            low = value.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise D3FastError(f"config key {key}: expected true/false, got {value!r}")
        if tp in (int, float):
            try:
                return tp(value)
            except ValueError:
                raise D3FastError(f"config key {key}: expected {tp.__name__}, got {value!r}") from None
        if tp is str:
            return value
        if origin is list:
            # JSON ("[1, 2]", '["a"]'), or bare items: "a,b" and "[a,b]"
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                inner_text = value.strip()
                if inner_text.startswith("[") and inner_text.endswith("]"):
                    inner_text = inner_text[1:-1]
                items = [x.strip() for x in inner_text.split(",") if x.strip()]
                (inner,) = typing.get_args(tp)
                return [_coerce(x, inner, key, from_string=True) for x in items]
            if not isinstance(value, list):
                value = [value]
            return _coerce(value, tp, key, from_string=False)
    # typed value (TOML or JSON): bool is an int subclass, so check it first
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif tp is str:
        ok = isinstance(value, str)
    elif origin is list:
        (inner,) = typing.get_args(tp)
        ok = isinstance(value, list)
        if ok:
            value = [_coerce(v, inner, key, from_string=False) for v in value]
    else:
        raise TypeError(f"unsupported config type {tp} for {key}")
    if not ok:
        raise D3FastError(f"config key {key}: expected {getattr(tp, '__name__', tp)}, got {value!r}")
    return value


def apply_updates(obj: Any, updates: dict[str, Any], prefix: str, from_string: bool) -> None:
    if not isinstance(updates, dict):
        raise D3FastError(f"config {prefix.rstrip('.') or 'file'} must be a mapping of keys to values, "
                          f"got {type(updates).__name__}")
    types_ = _field_types(type(obj))
    for key, value in updates.items():
        full = f"{prefix}{key}"
        if key not in types_:
            valid = ", ".join(f"{prefix}{k}" for k in types_)
            raise D3FastError(f"unknown config key {full!r}; valid keys here: {valid}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise D3FastError(f"config key {full!r} is a section; set {full}.<key> instead")
            apply_updates(current, value, f"{full}.", from_string)
        elif isinstance(value, dict):
            inner = next(iter(value), "")
            raise D3FastError(f"config key {full!r} is a value, not a section: there is no {full}.{inner}")
        else:
            setattr(obj, key, _coerce(value, types_[key], full, from_string))


def parse_overrides(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """`["experts.lr=0.02", "net.width=64"]` -> nested dict of strings."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise D3FastError(f"override {item!r} must look like section.key=value")
        dotted, value = item.split("=", 1)
        node = out
        parts = dotted.strip().split(".")
        for k, p in enumerate(parts[:-1]):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):  # "a.b=1" then "a.b.c=2"
                raise D3FastError(f"override {item!r}: {'.'.join(parts[:k + 1])} is set as a value by another --set")
        if isinstance(node.get(parts[-1]), dict):  # "a.b.c=2" then "a.b=1"
            raise D3FastError(f"override {item!r}: {dotted.strip()} is set as a section by another --set")
        node[parts[-1]] = value.strip()
    return out


def nested(dotted: dict[str, Any]) -> dict[str, Any]:
    """Typed flags by dotted key, as `resolve_config`'s `typed_overrides`: {"distill.ppc": 2,
    "device": "cpu", "data.subtask": None} -> {"distill": {"ppc": 2}, "device": "cpu"} (None:
    the flag was not given)."""
    out: dict[str, Any] = {}
    for key, value in dotted.items():
        if value is None:
            continue
        *section, leaf = key.split(".")
        (out.setdefault(section[0], {}) if section else out)[leaf] = value
    return out


def resolve_config(
    dataset: str | None = None,
    preset: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    typed_overrides: dict[str, Any] | None = None,
    base: Config | None = None,
) -> Config:
    """Defaults < preset < overrides, or, for a resumed run, its recorded config (`base`)
    < overrides. `typed_overrides` holds values from typed CLI flags (already the right
    type; dotted keys or nested sections, None = not given); `overrides` holds `key=value` strings.

    Raises:
        D3FastError: an unknown key, a wrong type or a value out of range; with `base`, a
            preset (a resumed run keeps its configuration).
    """
    typed_overrides = nested(typed_overrides or {})  # dotted keys (the commands' flags) or sections
    if base is not None:
        if preset:
            raise D3FastError("--preset picks the configuration of a new run; a resumed run keeps its own "
                              "(change single keys with --set)")
        cfg = copy.deepcopy(base)
        if dataset:
            apply_updates(cfg, {"data": {"dataset": dataset}}, "", from_string=False)
        if typed_overrides:
            apply_updates(cfg, typed_overrides, "", from_string=False)
        apply_updates(cfg, parse_overrides(overrides), "", from_string=True)
        validate(cfg)
        return cfg
    cfg = Config()
    from d3fast.data.datasets import custom_kind

    kind = custom_kind(dataset or "")
    name = preset or _dataset_preset(dataset)
    if name:
        values = load_preset(name)
        if _is_file(name):
            # a file of one's own holds what differs from its dataset's preset, as a packaged
            # preset holds what differs from the defaults: the dataset's preset goes under it
            section = values.get("data")
            of_file = section.get("dataset") if isinstance(section, dict) else None
            under = _dataset_preset(dataset or (of_file if isinstance(of_file, str) else None))
            if under:
                apply_updates(cfg, load_preset(under), "", from_string=False)
        apply_updates(cfg, values, "", from_string=False)
        cfg.preset = name
        # the imagefolder preset serves every imagefolder-<label> dataset, the hf one every hf-<label>
        if dataset and cfg.data.dataset != dataset and not (kind and custom_kind(cfg.data.dataset) == kind):
            raise D3FastError(
                f"preset {name!r} is for dataset {cfg.data.dataset!r}, not {dataset!r}"
            )
    if dataset:
        cfg.data.dataset = dataset
    if typed_overrides:
        apply_updates(cfg, typed_overrides, "", from_string=False)
    apply_updates(cfg, parse_overrides(overrides), "", from_string=True)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Every value in its range (the fields' `ranged` metadata; floats finite), every choice
    known, and the combinations the loop cannot run refused, naming the key.

    Raises:
        D3FastError: the first bad value, with its key and the valid range.
    """
    from d3fast.data.datasets import DATASETS, custom_kind, get_spec, known, unknown_dataset

    if not known(cfg.data.dataset):
        raise D3FastError(unknown_dataset(cfg.data.dataset))
    if custom_kind(cfg.data.dataset):
        r = cfg.data.resolution
        if r and (not 8 <= r <= 512 or r & (r - 1)):
            raise D3FastError(f"config key data.resolution: {r} is not a power of two in 8..512 (ConvNet and "
                              "decoder halve it down to 4 px)")
    elif cfg.data.resolution not in (0, DATASETS[cfg.data.dataset].resolution):
        raise D3FastError(f"config key data.resolution: {cfg.data.dataset} images are "
                          f"{DATASETS[cfg.data.dataset].resolution} px; data.resolution chooses the size of "
                          "imagefolder and hf datasets only")
    for dotted, allowed in CHOICES.items():
        section, key = dotted.split(".")
        value = getattr(getattr(cfg, section), key)
        if value not in allowed:
            raise D3FastError(f"config key {dotted}: {value!r} is not one of {', '.join(allowed)}")
    for part in dataclasses.fields(cfg):
        obj = getattr(cfg, part.name)
        if dataclasses.is_dataclass(obj):
            for f in dataclasses.fields(obj):
                _check_range(f"{part.name}.{f.name}", getattr(obj, f.name), f.metadata)
    bad_coresets = [c for c in cfg.eval.coresets if c not in CORESETS]
    if bad_coresets:
        raise D3FastError(f"config key eval.coresets: unknown {bad_coresets}; known: {', '.join(CORESETS)}")
    cfg.eval.coresets = list(dict.fromkeys(cfg.eval.coresets))
    unknown = [t for t in cfg.log.trackers if t not in TRACKERS]
    if unknown:
        raise D3FastError(f"config key log.trackers: unknown {unknown}; known: {', '.join(TRACKERS)}")
    bad_archs = [a for a in cfg.eval.archs if a not in CHOICES["net.name"]]
    if bad_archs or not cfg.eval.archs:
        raise D3FastError(f"eval.archs: unknown {bad_archs or 'empty list'}; known: {', '.join(CHOICES['net.name'])}")
    ops = cfg.augment.strategy.split("_") if cfg.augment.strategy.lower() != "none" else []
    if not cfg.augment.strategy or any(op not in AUG_OPS for op in ops):
        raise D3FastError(f"config key augment.strategy: {cfg.augment.strategy!r} is not ops from "
                          f"{', '.join(AUG_OPS)} joined by '_', or none")
    d = cfg.distill
    bw = d.mmd_bandwidths
    # 1 / (2 s^2) must stay a normal float32, and a kernel wider than any feature distance is 0
    if not 1 <= len(bw) <= 16 or not all(math.isfinite(b) and 1e-6 <= b <= 1e6 for b in bw):
        raise D3FastError(f"config key distill.mmd_bandwidths: need 1 to 16 values in [1e-6, 1e6], got {bw}")
    per_epoch = cfg.experts.snapshots_per_epoch
    if snapshots_in(d.expert_epochs, per_epoch) is None:
        nearest = max(round(d.expert_epochs * per_epoch), 1) / per_epoch
        finer = next((s for s in range(2, 65) if snapshots_in(d.expert_epochs, s)), None)
        hint = f", or keep {finer} snapshots per epoch: --set experts.snapshots_per_epoch={finer}" if finer else ""
        raise D3FastError(f"config key distill.expert_epochs: {d.expert_epochs!r} is not a whole number (at least 1) "
                          f"of expert snapshots (experts.snapshots_per_epoch={per_epoch}: multiples of 1/{per_epoch}); "
                          f"the nearest is {nearest!r}{hint}")
    grid = cfg.eval.lr_grid
    if len(set(grid)) > 16 or not all(isinstance(v, int | float) and math.isfinite(v) and 0 < v <= 10 for v in grid):
        raise D3FastError(f"config key eval.lr_grid: need at most 16 distinct learning rates in (0, 10], got {grid}")
    if d.mmd_weight > 0 and max(d.mmd_samples // d.ppc, 1) * d.ppc < 2:
        raise D3FastError("config key distill.mmd_samples: the unbiased MMD needs at least 2 samples per class "
                          f"(mmd_samples={d.mmd_samples}, ppc={d.ppc})")
    from d3fast.data.datasets import class_blocks

    try:
        num_classes = get_spec(cfg.data.dataset, cfg.data.data_path, cfg.data.resolution).num_classes
    except D3FastError:  # an imagefolder or hf dataset not prepared yet: prepare says what is missing
        num_classes = 65536
    class_blocks(num_classes, cfg.data.subtasks)  # S <= classes
    if cfg.data.subtask >= cfg.data.subtasks:
        raise D3FastError(f"config key data.subtask: {cfg.data.subtask} is out of range for data.subtasks="
                          f"{cfg.data.subtasks} (0..{cfg.data.subtasks - 1}, or -1 for every subtask)")
    if cfg.data.subtasks > 1 and cfg.data.loader == "ffcv":
        raise D3FastError("data.loader=ffcv streams whole datasets; subtasks (data.subtasks > 1) read their classes "
                          "from the cache: use data.loader=cache")
    if not d.decoder_linear and d.decoder not in VAE_TOP:
        raise D3FastError(f"config key distill.decoder_linear: only the medium and large decoders can drop their "
                          f"linear input layer; {d.decoder!r} always has it")
    if d.decoder in VAE_TOP and not d.decoder_linear and d.z_dim != vae_z_dim(d.decoder):
        raise D3FastError(f"config key distill.z_dim: a {d.decoder} decoder without its linear layer "
                          f"(distill.decoder_linear=false) needs z_dim {vae_z_dim(d.decoder)}, got {d.z_dim}")
    if d.amp and d.dtype == "float64":
        raise D3FastError("distill.amp (bf16 autocast, --amp) and distill.dtype=float64 (everything in float64, "
                          "--dtype float64) exclude each other: leave one of them out")
    if d.unroll == "flat" and cfg.net.norm == "batchnorm":
        raise D3FastError("distill.unroll=flat needs a student without running statistics, and net.norm=batchnorm "
                          "keeps some: use net.norm=instancenorm or distill.unroll=naive")


def snapshots_in(epochs: float, per_epoch: int) -> int | None:
    """The expert snapshots `epochs` spans when an expert keeps `per_epoch` per epoch
    (experts.snapshots_per_epoch); None unless that is a whole number >= 1. A printed
    fraction passes: 0.333333 with 3 per epoch is 1 (within 1e-3 of a snapshot)."""
    count = epochs * per_epoch
    return round(count) if round(count) >= 1 and abs(count - round(count)) <= 1e-3 else None


# every int must fit the 32-bit and 64-bit fields it ends in (seeds, SQLite, tensor sizes),
# every float a float32 (optimiser hyperparameters become float32 tensors)
INT_MAX = 2**31 - 1
FLOAT_MAX = 3.0e38


def _check_range(key: str, value: Any, meta: Any) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise D3FastError(f"config key {key} must be finite, got {value}")
    if isinstance(value, int | float) and not isinstance(value, bool) and abs(value) > (
        INT_MAX if isinstance(value, int) else FLOAT_MAX
    ):
        raise D3FastError(f"config key {key} is out of range: {value}")
    lo, hi, above = meta.get("lo"), meta.get("hi"), meta.get("above", False)
    if lo is not None and (value <= lo if above else value < lo):
        raise D3FastError(f"config key {key} must be {'>' if above else '>='} {lo:g}, got {value}")
    if hi is not None and value > hi:
        raise D3FastError(f"config key {key} must be <= {hi:g}, got {value}")


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def flatten(cfg: Config) -> dict[str, Any]:
    """{"section.key": value} for every key, and {"key": value} for top-level ones."""
    out: dict[str, Any] = {}
    for k, v in to_dict(cfg).items():
        if isinstance(v, dict):
            out.update({f"{k}.{kk}": vv for kk, vv in v.items()})
        else:
            out[k] = v
    return out


# What a resumed run may change. Keys in APPLIED_ON_RESUME (or their sections) take effect
# from the next step (the learning rates reach the optimisers' param groups) and are
# recorded in the run; the others are fixed by what the checkpoint and the expert
# trajectories already hold, and changing them is an error that says why.
APPLIED_ON_RESUME = frozenset({
    "device", "data.workers", "eval", "log",
    "distill.steps", "distill.checkpoint_every", "distill.amp", "distill.unroll", "distill.unroll_budget",
    "distill.compile",
    "distill.students_per_step",
    "distill.lr_latent", "distill.lr_lr", "distill.lr_decode", "distill.health_steps",
    "distill.syn_steps", "distill.expert_epochs", "distill.max_start_epoch", "distill.batch_syn",
    "distill.augment_unroll", "distill.mtt_weight", "distill.kl_weight", "distill.div_weight",
    "distill.mmd_samples", "distill.mmd_weight", "distill.mmd_reduction", "distill.mmd_bandwidths",
    "distill.mmd_scale", "distill.mmd_param", "distill.mmd_chunk", "distill.mmd_exact_graph",
    "distill.soft_labels", "distill.soft_label_epoch", "distill.storage", "distill.quant_steps",
})
FIXED_ON_RESUME: dict[str, str] = {
    "preset": "it names the configuration the run started from",
    "data.dataset": "the distilled object holds this dataset's classes",
    "data.data_path": "it is read by `d3fast prepare` only; the run reads the prepared cache",
    "data.skip_corrupt": "it is read by `d3fast prepare` only; the run reads the prepared cache",
    "data.loader": "it names the expert trajectories the run matches (FFCV-fed experts are others)",
    "data.zca": "the latents were fitted to data with this whitening",
    "data.zca_eps": "the latents were fitted to data with this whitening",
    "data.subtasks": "the distilled object holds the classes of one block of this split",
    "data.subtask": "the distilled object holds this block's classes",
    "data.resolution": "the distilled object decodes images of this size",
    "net": "the student network's parameters are the expert trajectories' (another network has other experts)",
    "augment": "the expert trajectories were trained with this augmentation",
    "experts": "these keys define the expert trajectories the run matches",
    "distill.ppc": "the checkpoint holds latents of this many priors per class",
    "distill.z_dim": "the checkpoint holds latents of this size",
    "distill.decoder": "the checkpoint holds a decoder of this layout",
    "distill.decoder_width": "the checkpoint holds a decoder of this width",
    "distill.decoder_linear": "the checkpoint holds a decoder of this layout",
    "distill.lr_teacher": "it is the learned student lr's initial value; the checkpoint holds its current value",
    "distill.dtype": "the checkpoint holds the distilled tensors and optimiser state in this dtype",
    "distill.lr_param": "the checkpoint holds alpha and its optimiser's state in this parametrisation",
    "distill.seed": "the random streams continue from the checkpoint, not from the seed",
}


# Keys added after runs were recorded, with the value that repeats what such a run did: a
# config recorded without one takes this value, not today's default.
RECORDED_BEFORE: dict[str, Any] = {
    "distill.lr_param": "leaky_relu",
}


def with_recorded_defaults(config: dict[str, Any]) -> dict[str, Any]:
    """A recorded config (nested dict, as config.json holds it) with the keys of
    RECORDED_BEFORE it lacks set to the value its run used."""
    out = copy.deepcopy(config)
    for key, value in RECORDED_BEFORE.items():
        section, name = key.split(".")
        if isinstance(out.get(section), dict):
            out[section].setdefault(name, value)
    return out


def _as_set(value: Any) -> str:
    """A config value as `--set` takes it."""
    return value if isinstance(value, str) else json.dumps(value)


def resume_changes(old: Config, new: Config) -> dict[str, list[Any]]:
    """{"section.key": [old, new]} for every key a resumed run changes.

    Raises:
        D3FastError: a key that a resumed run cannot change, naming the key and why.
    """
    a, b = flatten(old), flatten(new)
    changes = {k: [a[k], b[k]] for k in a if a[k] != b[k]}
    for key in changes:
        if key == "data.loader" and changes[key][0] == "auto":
            continue  # runs from before the loader was recorded: settling it is no change
        section = key.split(".")[0]
        why = FIXED_ON_RESUME.get(key) or FIXED_ON_RESUME.get(section)
        if why is not None:
            raise D3FastError(
                f"cannot change {key} when resuming ({changes[key][0]!r} -> {changes[key][1]!r}): {why}. "
                f"Start a new run for that, or keep the run's value (--set {key}={_as_set(changes[key][0])})."
            )
        if key not in APPLIED_ON_RESUME and section not in APPLIED_ON_RESUME:
            raise D3FastError(f"config key {key} is not classified for resuming (d3fast/config.py)")
    return changes
