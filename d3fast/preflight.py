"""What a command checks and decides once, before any work: the dataset prepared
(`ensure_prepared`), the data loader (`resolve_data_loader`: `data.loader=auto` settled where
the command starts, so the run's config.json records what was used), the subtasks a command
walks (`each_subtask`), the ranks of a torchrun job agree (`check_split`), a run's name (`run_name`), the settings a storage budget buys
(`budget_overrides`), the trackers installed (`check_trackers`).

Each decision is made here once; the recipes (d3fast/recipes/) call these before their work.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Callable
from typing import Any

import click

from d3fast.config import Config, flatten, parse_overrides, resolve_config
from d3fast.data.beton import resolve_loader
from d3fast.data.cache import read_manifest
from d3fast.data.datasets import class_blocks, get_spec, subtask_block
from d3fast.data.prepare import PrepareResult, prepare, prepare_command
from d3fast.dist import World
from d3fast.errors import D3FastError
from d3fast.paths import data_dir
from d3fast.storage import choose_budget, ipc_equivalent
from d3fast.trackers import check_available
from d3fast.trajectories import experts_dir

Echo = Callable[..., None]


def silent(*args: Any, **kwargs: Any) -> None:
    """An `Echo` that prints nothing (the other ranks of a torchrun job)."""


def resolve_data_loader(cfg: Config) -> str:
    """Settle `data.loader=auto` in place, once, where a command starts; the result is what
    a run's config.json records. Work already done wins: auto keeps the loader whose expert
    trajectories exist (so `prepare --format ffcv` after training experts from the cache
    does not start a second set), and otherwise takes FFCV when it is installed and the
    dataset's .beton files exist (d3fast.data.beton.resolve_loader), else the cache."""
    if cfg.data.loader != "auto":
        return cfg.data.loader
    if cfg.data.subtasks > 1:  # subtasks read their classes from the cache (FFCV streams whole datasets)
        cfg.data.loader = "cache"
        return "cache"
    prepared = read_manifest(data_dir(cfg.data.dataset)) is not None
    for loader in ("cache", "ffcv") if prepared else ():
        trial = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, loader=loader))
        if any(experts_dir(trial).glob("expert_*.safetensors")):
            cfg.data.loader = loader
            return loader
    cfg.data.loader = "ffcv" if resolve_loader(cfg.data.dataset, "auto") == "ffcv" else "cache"
    return cfg.data.loader


def ensure_prepared(cfg: Config, no_auto: bool) -> None:
    """Prepare the dataset when it has no cache yet (unless `no_auto`), or again when a
    `data.data_path` is given now (prepare reuses the cache when the files are the same).

    Raises:
        D3FastError: not prepared and `no_auto`: the message holds the prepare command."""
    ds = cfg.data.dataset
    if cfg.data.data_path is not None and read_manifest(data_dir(ds)) is not None:
        click.echo(describe_prepare(prepare(cfg)))
        return
    if read_manifest(data_dir(ds)) is None:
        if no_auto:
            raise D3FastError(f"dataset {ds!r} is not prepared; run:\n  {prepare_command(cfg)}")
        click.echo(f"{ds} is not prepared yet: preparing it first")
        click.echo(describe_prepare(prepare(cfg)))


def describe_prepare(res: PrepareResult) -> str:
    """What `prepare` did, in one to three lines."""
    m = res.manifest
    tr, te = m["splits"]["train"]["count"], m["splits"]["test"]["count"]
    r, c = m["resolution"], m["channels"]
    verb = "reused cache of" if res.status == "reused" else "prepared"
    lines = [f"{verb} {m['dataset']}: {tr} train / {te} test images, {m['num_classes']} classes, "
             f"{c}x{r}x{r} uint8 -> {res.cache}"]
    if res.decoded:
        lines.append(f"decoded {res.decoded} images in {res.seconds:.1f} s ({res.decoded / res.seconds:.0f} img/s)")
    if m["skipped"]:
        lines.append(f"skipped {len(m['skipped'])} unreadable image(s) (files or shard rows), left out of the "
                     f"counts above; listed in {res.cache / 'manifest.json'}")
    return "\n".join(lines)


def each_subtask(cfg: Config, echo: Echo = click.echo) -> list[Config]:
    """`cfg` itself, or with data.subtasks > 1 and no data.subtask, one copy per subtask.
    Blocks of unequal size are stated (S does not divide the classes)."""
    if cfg.data.subtasks > 1:
        blocks = class_blocks(get_spec(cfg.data.dataset).num_classes, cfg.data.subtasks)
        sizes = [b - a for a, b in blocks]
        if len(set(sizes)) > 1:
            echo(f"note: {sum(sizes)} classes do not split evenly into {len(sizes)} subtasks: blocks of "
                 f"{', '.join(map(str, sizes))} classes")
    if cfg.data.subtasks == 1 or cfg.data.subtask >= 0:
        return [cfg]
    out = []
    for i in range(cfg.data.subtasks):
        one = copy.deepcopy(cfg)
        one.data.subtask = i
        out.append(one)
    return out


def plan(cfg: Config, device_kind: str) -> str:
    """One line saying what a new distillation of `cfg` (data.loader resolved) will do before
    it starts: the experts still to train (count x epochs) and the steps, each with its time where earlier work on
    this dataset and kind of device measured a rate (the ledger), so a 14-hour job does not
    start by surprise."""
    from d3fast import ledger
    from d3fast.trajectories import ready_experts

    def took(n: int, phase: str, unit: str) -> tuple[str, float | None]:
        rate = ledger.measured_rate(phase, cfg.data.dataset, device_kind)
        return (f" (~{_duration(n * rate)} at the {rate:.3g} s/{unit} measured here)", n * rate) if rate else ("", None)

    try:
        have = len(ready_experts(cfg, 0))
    except D3FastError:  # data not prepared yet: no experts of it either
        have = 0
    missing = max(cfg.experts.num_experts - have, 0)
    parts: list[str] = []
    seconds: dict[str, float | None] = {}  # what each part takes, by what it is
    if missing:
        text, seconds["expert training"] = took(missing * cfg.experts.epochs, "experts", "epoch")
        parts.append(f"train {missing} of {cfg.experts.num_experts} experts x {cfg.experts.epochs} epochs{text}")
    text, seconds["distillation"] = took(cfg.distill.steps, "distill", "step")
    parts.append(f"distill {cfg.distill.steps} steps{text}")
    unknown = [what for what, s in seconds.items() if s is None]
    if unknown:
        end = f"; no rate measured here yet for {' and '.join(unknown)} (`d3fast profile` measures a step)"
    else:
        end = f"; about {_duration(sum(s for s in seconds.values() if s is not None))} in all"
    return "plan: " + "; ".join(parts) + end


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def run_name(cfg: Config, name: str | None) -> str:
    """A run's name: --name, else the preset; a subtask's run adds -sub<i>of<S>, the name
    `distill --subtasks S --name NAME` looks for (and `d3fast merge runs/*-sub?of5` matches).

    Raises:
        D3FastError: a name that is not one folder name."""
    if name is not None and not re.fullmatch(r"[^/\\\x00]{1,100}", name) or name in (".", ".."):
        raise D3FastError(f"--name {name!r}: a run name is one folder name (no '/', at most 100 characters)")
    base = name or cfg.preset or "run"
    return f"{base}-sub{cfg.data.subtask}of{cfg.data.subtasks}" if cfg.data.subtasks > 1 else base


def check_trackers(cfg: Config) -> None:
    """A missing tracker package fails now, not after the experts (d3fast/trackers.py)."""
    check_available(cfg.log.trackers)


# the keys --budget-ipc sets (d3fast/storage.py choose_budget)
BUDGET_KEYS = ("distill.decoder", "distill.decoder_width", "distill.decoder_linear", "distill.z_dim", "distill.ppc")


def budget_overrides(dataset: str | None, preset: str | None, overrides: tuple[str, ...] | list[str],
                     typed: dict[str, Any], ipc: float, images: str) -> dict[str, Any]:
    """The settings (dotted keys) that fit `ipc` images per class of storage, printed with
    their bytes on stderr (stdout holds what `d3fast config --budget-ipc N --format toml`
    writes).

    Raises:
        D3FastError: a budget key also set by hand, or a budget nothing fits (naming the
            smallest that does)."""
    by_hand = parse_overrides(list(overrides)).get("distill", {})
    given = [k for k in BUDGET_KEYS if typed.get(k) is not None or k.split(".")[1] in by_hand]
    if given:
        raise D3FastError(f"--budget-ipc chooses {', '.join(BUDGET_KEYS)}; drop {', '.join(given)} or the budget")
    cfg = resolve_config(dataset, preset, overrides, typed_overrides=typed)
    spec = get_spec(cfg.data.dataset)
    res = spec.resolution
    choice = choose_budget(ipc, num_classes=spec.num_classes, channels=spec.channels, res=res,
                           subtasks=cfg.data.subtasks, soft_labels=cfg.distill.soft_labels,
                           storage=cfg.distill.storage, pixel_bytes=4 if images == "float32" else 1)
    limit = 10000  # distill.ppc's range (d3fast/config.py)
    if choice.ppc > limit:
        raise D3FastError(f"a storage budget of {ipc:g} images per class buys {choice.ppc:,} priors per class, more "
                          f"than distill.ppc's limit of {limit:,}: give a smaller budget")
    other = ipc_equivalent(choice.bytes, spec.num_classes, spec.channels, res, pixel_bytes=1 if images == "float32" else 4)
    click.echo(f"storage budget {ipc:g} {images} images per class ({spec.num_classes} classes, {cfg.data.subtasks} "
               f"subtask(s), {'with' if cfg.distill.soft_labels else 'without'} soft labels, {cfg.distill.storage} storage): "
               f"{choice.describe()} ({other:.3f} {'uint8' if images == 'float32' else 'float32'} images)", err=True)
    chosen = {"distill.decoder": choice.decoder, "distill.decoder_width": choice.decoder_width,
              "distill.decoder_linear": choice.decoder_linear, "distill.z_dim": choice.z_dim, "distill.ppc": choice.ppc}
    was = {k: getattr(cfg.distill, k.split(".")[1]) for k in chosen}
    replaced = [f"{k.split('.')[1]} {was[k]} -> {v}" for k, v in chosen.items() if was[k] != v]
    kept = [f"{k.split('.')[1]} {v}" for k, v in chosen.items() if was[k] == v]
    click.echo(f"it replaces {f'preset {cfg.preset}' if cfg.preset else 'the defaults'}: "
               + (", ".join(replaced) or "nothing") + (f" ({', '.join(kept)} kept)" if kept else ""), err=True)
    return chosen


def check_split(world: World, cfg: Config) -> None:
    """Before any work: the same config on every rank of `world`, K students a multiple of
    the ranks, and no more ranks than classes when the MMD update runs.

    Raises:
        D3FastError: on every rank alike."""
    if not world.distributed:
        return
    world.check_config({k: v for k, v in flatten(cfg).items() if k != "device"})
    world.students(cfg.distill.students_per_step)
    d = cfg.distill
    start, stop = subtask_block(cfg.data.dataset, cfg.data.subtasks, max(cfg.data.subtask, 0))
    classes = stop - start
    if (d.mmd_weight > 0 or (d.div_weight > 0 and d.ppc > 1)) and classes < world.size:
        raise D3FastError(f"{classes} classes cannot be split over {world.size} ranks for the MMD update: "
                          f"use at most {classes} processes")
