"""`d3fast experts`: train expert trajectories for MTT (docs/algorithm.md section 4).

Each expert is a ConvNet trained from its own random init with plain SGD; its parameter
vector is kept at init and after every epoch (or `experts.snapshots_per_epoch` times per
epoch), atomically, in the files `d3fast/trajectories.py` defines. Each expert's init seed
is derived from (seed, index), and each epoch's shuffling and augmentation from (seed,
index, epoch). Since SGD without momentum has no state beyond the parameters, an
interrupted expert resumes from its last saved epoch and continues the very same
trajectory; finished experts are never redone.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch
from tqdm import tqdm

from d3fast import ledger
from d3fast.config import Config, resolve_config
from d3fast.data.augment import DSA
from d3fast.data.cache import load_split
from d3fast.data.loader import DeviceDataset, open_split
from d3fast.dist import World
from d3fast.errors import D3FastError
from d3fast.io import (
    atomic_write_json,
    locked,
    remove_stale_temps,
)
from d3fast.models import build_network
from d3fast.preflight import each_subtask, ensure_prepared, resolve_data_loader, silent
from d3fast.progress import bar as progress_bar
from d3fast.runtime import derive_seed, resolve_device
from d3fast.training import (
    evaluate_accuracy,
    flat_params,
    load_flat_params,
    param_layout,
    train_epoch,
)
from d3fast.trajectories import (
    ExpertBank,
    _check_spacing,
    expert_path,
    experts_dir,
    need_epochs,
    read_expert,
    read_expert_meta,
    ready_experts,
    trajectory_config,
    write_expert,
    write_manifest,
)


@dataclass
class ExpertsResult:
    out_dir: Path
    manifest: dict[str, Any]
    trained_epochs: int  # epochs trained by this call
    seconds: float
    images_per_s: float  # training images per second over this call (0 when nothing ran)


def ensure_experts(cfg: Config, auto: bool = True, echo: Callable[[str], None] = print) -> ExpertBank:
    """The `experts.num_experts` experts of `cfg`, training the missing ones first (unless
    `auto` is off: then an error with the command that trains them)."""
    bank = ready_experts(cfg, 0)
    if len(bank) >= cfg.experts.num_experts:
        return bank
    if not auto:
        return ready_experts(cfg, cfg.experts.num_experts)  # raises, with the command that trains them
    need = need_epochs(cfg)
    if cfg.experts.epochs < need:
        raise D3FastError(
            f"experts.epochs={cfg.experts.epochs} is less than the {need} epochs distillation reads "
            f"(distill.max_start_epoch + distill.expert_epochs); add --set experts.epochs={need}"
        )
    echo(f"{len(bank)}/{cfg.experts.num_experts} expert trajectories ready: training the rest first")
    run_experts(cfg)
    return ready_experts(cfg, cfg.experts.num_experts)


def _build(cfg: Config, data: DeviceDataset, seed: int) -> torch.nn.Module:
    # init on the CPU under a fixed seed: the same seed gives the same init on any device
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = build_network(cfg.net, data.channels, data.num_classes, data.resolution)
    return net.to(data.device)


def _buffers(net: torch.nn.Module) -> torch.Tensor:
    bufs = [b.detach().reshape(-1).float().cpu() for b in net.buffers()]
    return torch.cat(bufs) if bufs else torch.zeros(0)


def _load_buffers(net: torch.nn.Module, flat: torch.Tensor) -> None:
    offset = 0
    for b in net.buffers():
        n = b.numel()
        b.copy_(flat[offset : offset + n].view_as(b).to(b.dtype))
        offset += n


def open_folder(cfg: Config) -> Path:
    """`experts_dir(cfg)`, created, with its config.json written and the temporary files of
    a crashed writer removed: where training and imports write expert files."""
    out = experts_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)
    tcfg = trajectory_config(cfg, load_split(cfg.data.dataset, "train", mmap=True)[2]["sha256"]["train_x.npy"])
    atomic_write_json(out / "config.json", tcfg)
    return out


def run_experts(cfg: Config, progress: bool = True, shard: tuple[int, int] = (0, 1)) -> ExpertsResult:
    """Train (or finish) experts 0 .. num_experts - 1 of `cfg` into `experts_dir(cfg)`.

    `shard` = (rank, world size) of a torchrun job: rank r trains experts r, r + W, ... first,
    then waits for the others' (or trains those no live process holds), so every rank ends
    with all experts done and no collective is needed (an expert's trajectory depends only
    on (seed, index): sharded or not, the files are the same)."""
    device = resolve_device(cfg.device)
    resolve_data_loader(cfg)
    ds = cfg.data.dataset
    train = open_split(cfg, "train", device)
    test = open_split(cfg, "test", device)
    within = _snapshot_steps(len(train), cfg.experts.batch_size, cfg.experts.snapshots_per_epoch)  # before any folder
    out = open_folder(cfg)
    augment = DSA(cfg.augment) if cfg.experts.augment else None
    e_cfg = cfg.experts

    spacing = e_cfg.snapshots_per_epoch
    todo = [(i, done) for i in range(e_cfg.num_experts) if (done := _epochs_to_resume(out, i, e_cfg.epochs, spacing)) is not None]
    rank, size = shard
    mine = [t for t in todo if t[0] % size == rank]  # this rank's share first, the rest after
    todo = mine + [t for t in todo if t[0] % size != rank]
    total = sum(e_cfg.epochs - done for _, done in mine)
    bar = progress_bar(total=total, desc="experts", unit="ep", disable=not progress, dynamic_ncols=True)
    t_start, images_seen, epochs_run = time.perf_counter(), 0, 0
    try:
        with ledger.track("experts", ds, cfg.preset, device, steps_target=total, run=str(out.resolve())) as meter:
            # each expert under its own lock: concurrent jobs split the experts between them;
            # the ones another job holds are waited for last, and trained if it died
            deferred: list[tuple[int, int]] = [t for t in todo if t not in mine]
            for wait, batch in ((False, mine), (True, deferred)):
                for i, _ in batch:
                    with locked(out / f"expert_{i:04d}.lock", wait=wait) as held:
                        if not held:
                            deferred.append((i, 0))
                            continue
                        if _epochs_to_resume(out, i, e_cfg.epochs, spacing) is None:  # another job finished it
                            continue
                        label = f"{i + 1}/{e_cfg.num_experts}"
                        epochs, imgs = _train_one(cfg, i, train, test, augment, out, bar, label, meter, within)
                    epochs_run += epochs
                    images_seen += imgs
                    write_manifest(cfg, out, device)
    finally:
        bar.close()
    seconds = time.perf_counter() - t_start
    manifest = write_manifest(cfg, out, device)
    return ExpertsResult(out, manifest, epochs_run, seconds, images_seen / seconds if epochs_run else 0.0)


def _epochs_to_resume(out: Path, index: int, epochs: int, per_epoch: int) -> int | None:
    """Epochs expert `index` already holds when it needs (more) training to reach `epochs`;
    None when it needs none. An interrupted expert holding more epochs than asked is left
    as it is, with a note: lowering --epochs never deletes epochs.

    Raises:
        D3FastError: the file keeps other than `per_epoch` snapshots per epoch.
    """
    path = expert_path(out, index)
    if not path.exists():
        return 0
    meta = read_expert_meta(path)
    _check_spacing(path, meta, per_epoch)
    done = meta["epochs_done"]
    if meta.get("imported"):  # another code base's trajectory: extending it here would splice two trainings
        if done < epochs:
            tqdm.write(f"note: {path.name} was imported with {done} epochs; left as it is (experts.epochs={epochs})")
        return None
    if done > epochs and not meta["complete"]:
        tqdm.write(f"note: {path.name} holds {done} epochs of an interrupted run; left as it is "
                   f"(`--epochs {done}` or more finishes it)")
        return None
    return None if meta["complete"] and done >= epochs else done


def _train_one(
    cfg: Config,
    index: int,
    train: DeviceDataset,
    test: DeviceDataset,
    augment: DSA | None,
    out: Path,
    bar: tqdm,
    label: str,
    meter: ledger.Meter,
    within: frozenset[int],
) -> tuple[int, int]:
    """Train (or finish) expert `index`, snapshotting after the steps `within` each epoch
    (`_snapshot_steps`); returns (epochs trained, images seen)."""
    e_cfg = cfg.experts
    seed = derive_seed(e_cfg.seed, index)
    net = _build(cfg, train, seed)
    path = expert_path(out, index)
    history: list[dict[str, float]] = []
    if path.exists():
        tensors, meta = read_expert(path)
        snapshots = list(tensors["trajectory"])
        history = meta["history"][: len(snapshots) - 1]
        load_flat_params(net, snapshots[-1])
        if "buffers" in tensors:
            _load_buffers(net, tensors["buffers"])
    else:
        snapshots = [flat_params(net)]
    opt = torch.optim.SGD(net.parameters(), lr=e_cfg.lr, momentum=0.0, weight_decay=0.0)
    layout = param_layout(net)
    epochs_run = 0
    per_epoch = e_cfg.snapshots_per_epoch

    def save(complete: bool, test_acc: float | None) -> None:
        write_expert(path, torch.stack(snapshots), index=index, seed=seed, complete=complete, test_acc=test_acc,
                     history=history, param_layout=layout, buffers=_buffers(net), snapshots_per_epoch=per_epoch)

    def snap(step: int) -> None:
        if step in within:
            snapshots.append(flat_params(net))

    for epoch in range((len(snapshots) - 1) // per_epoch, e_cfg.epochs):
        t0 = time.perf_counter()
        g = torch.Generator(device=train.device)
        g.manual_seed(derive_seed(e_cfg.seed, index, epoch))
        loss, acc = train_epoch(net, opt, train, e_cfg.batch_size, g, augment, on_step=snap if within else None)
        if not np.isfinite(loss):
            raise D3FastError(
                f"expert {index} diverged at epoch {epoch + 1} (loss {loss}); lower experts.lr"
            )
        snapshots.append(flat_params(net))
        history.append({"epoch": epoch + 1, "loss": loss, "acc": acc, "seconds": time.perf_counter() - t0})
        save(complete=False, test_acc=None)
        epochs_run += 1
        bar.set_postfix_str(f"expert {label} ep {epoch + 1}/{e_cfg.epochs} loss {loss:.3f} acc {acc:.1%}", refresh=False)
        bar.update(1)
        meter.tick()
    test_acc = evaluate_accuracy(net, test)
    save(complete=True, test_acc=test_acc)
    return epochs_run, epochs_run * len(train)


def _snapshot_steps(images: int, batch_size: int, per_epoch: int) -> frozenset[int]:
    """The SGD steps of an epoch after which an expert keeping `per_epoch` snapshots per
    epoch saves one (the epoch's end, its last, is saved apart): steps round(j n / S),
    j = 1..S-1, of its n = ceil(images / batch_size) steps.

    Raises:
        D3FastError: an epoch has fewer steps than snapshots.
    """
    n = math.ceil(images / batch_size)
    if per_epoch > n:
        raise D3FastError(f"experts.snapshots_per_epoch={per_epoch} is more than the {n} SGD steps of an epoch "
                          f"({images} images, batch {batch_size}); use at most {n}")
    return frozenset(round(j * n / per_epoch) for j in range(1, per_epoch))


def command(dataset: str | None, preset: str | None, overrides: tuple[str, ...] | list[str],
            typed: dict[str, Any], no_auto: bool = False) -> None:
    """`d3fast experts`: the experts of the resolved config (`typed`: flags by dotted key;
    every subtask's, one after another, unless data.subtask picks one), preparing the dataset
    first unless `no_auto`. Under torchrun each rank trains its share (experts rank, rank + W,
    ...) on its own GPU; the per-expert locks make the ranks finish together: no process
    group, no collective.

    Raises:
        D3FastError: a bad setting, the dataset not prepared (with `no_auto`), bad data,
            divergence."""
    world = World.from_env(typed.get("device") or "auto", join=False)
    if world.distributed:
        typed = typed | {"device": world.device(typed.get("device") or "auto")}
    cfg = resolve_config(dataset, preset, overrides, typed_overrides=typed)
    echo = click.echo if world.main else silent
    if cfg.distill.dtype != "float32":
        echo(f"note: expert trajectories train and are stored in float32; distill.dtype={cfg.distill.dtype} "
             "applies to `d3fast distill`, which reads them cast up")
    ensure_prepared(cfg, no_auto)
    for one in each_subtask(cfg, echo):
        if one.data.subtasks > 1:
            echo(f"subtask {one.data.subtask} of {one.data.subtasks}:")
        res = run_experts(one, progress=world.main, shard=(world.rank, world.size))
        m = res.manifest
        acc = ""
        if m["test_acc_mean"] is not None:
            acc = f"; test accuracy {m['test_acc_mean']:.1%} ± {m['test_acc_std']:.1%} (n={m['num_complete']})"
        asked = one.experts.num_experts
        done = sum(r["complete"] for r in m["experts"] if r["index"] < asked)
        extra = f" (+{m['num_complete'] - done} more from earlier runs)" if m["num_complete"] > done else ""
        echo(f"{done}/{asked} experts complete in {res.out_dir}{extra}{acc}")
        if res.trained_epochs:
            echo(f"this run: {res.trained_epochs} epochs in {res.seconds:.1f} s, "
                 f"{res.images_per_s:.0f} train img/s on {m['device']}")
