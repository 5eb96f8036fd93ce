"""`d3fast experts`: expert trajectories for MTT (docs/algorithm.md section 4), and the
store distillation reads them from (`ExpertBank`, `ready_experts`).

Each expert is a ConvNet trained from its own random init with plain SGD; its parameter
vector is saved at init and after every epoch. Files, under <home>/experts/<dataset>/<tag>/:

    expert_0007.safetensors   trajectory float32 [epochs + 1, P] (+ buffers [B] when the
                              network has any); metadata: seed, epochs done, per-epoch
                              loss/accuracy, test accuracy once complete
    manifest.json             dataset, network, hyperparameters, parameter layout, and one
                              record per expert (rebuilt from the files after each expert)
    config.json               the settings that define the trajectories

The tag is a hash of everything that shapes a trajectory (network, augmentation, lr,
batch, seed, the prepared data's hash, and the loader when it is FFCV), so changed settings
never mix with old files. `data.loader=auto` is resolved once, at the boundary
(`resolve_data_loader`), so naming the directory never looks at what is installed.
Each expert's init seed is derived from (seed, index), and each epoch's shuffling and
augmentation from (seed, index, epoch). Since SGD without momentum has no state beyond
the parameters, an interrupted expert resumes from its last saved epoch and continues
the very same trajectory; finished experts are never redone.
"""

from __future__ import annotations

import hashlib
import json
import math
import shlex
import zlib
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from d3fast.config import Config, flatten, resolve_config, snapshots_in
from d3fast.data.cache import load_split
from d3fast.errors import D3FastError
from d3fast.io import (
    atomic_write_json,
    load_metadata,
    load_tensors,
    read_json,
    save_tensors,
    timestamp,
)
from d3fast.models import default_depth
from d3fast.paths import experts_root
from d3fast.runtime import device_name, versions

TRAJ_FORMAT = 1




def trajectory_config(cfg: Config, data_sha: str) -> dict[str, Any]:
    """Everything that shapes a trajectory; its hash names the experts directory."""
    net = asdict(cfg.net)
    tcfg: dict[str, Any] = {
        "dataset": cfg.data.dataset,
        "data_sha256": data_sha,
        "zca_eps": cfg.data.zca_eps if cfg.data.zca else None,
        "net": net,
        "augment": asdict(cfg.augment) if cfg.experts.augment else None,
        "lr": cfg.experts.lr,
        "batch_size": cfg.experts.batch_size,
        "seed": cfg.experts.seed,
    }
    if cfg.experts.snapshots_per_epoch > 1:  # other files (more rows); one per epoch keeps the old names
        tcfg["snapshots_per_epoch"] = cfg.experts.snapshots_per_epoch
    if cfg.data.subtasks > 1:  # a subtask's experts see its classes only (whole-dataset tags unchanged)
        tcfg["subtask"] = [cfg.data.subtask, cfg.data.subtasks]
    # FFCV's crops and flips make other trajectories; cache-fed experts keep their old names
    if _loader(cfg) == "ffcv":
        tcfg["loader"] = "ffcv"
    return tcfg


def _loader(cfg: Config) -> str:
    if cfg.data.loader == "auto":
        raise RuntimeError("data.loader=auto must be resolved first (d3fast.preflight.resolve_data_loader)")
    return cfg.data.loader


def experts_dir(cfg: Config) -> Path:
    """<home>/experts/<dataset>/<network>-<tag>: the trajectories of this config. Needs a
    prepared dataset and a resolved `data.loader`; reads the cache's manifest only."""
    _, _, manifest = load_split(cfg.data.dataset, "train", mmap=True)
    tcfg = trajectory_config(cfg, manifest["sha256"]["train_x.npy"])
    digest = hashlib.sha256(json.dumps(tcfg, sort_keys=True).encode()).hexdigest()[:10]
    depth = cfg.net.depth or (default_depth(manifest["resolution"]) if cfg.net.name == "convnet" else 0)
    name = f"{cfg.net.name}{depth or ''}-w{cfg.net.width}-{digest}" if cfg.net.name == "convnet" else f"{cfg.net.name}-{digest}"
    if cfg.data.subtasks > 1:
        if cfg.data.subtask < 0:
            raise D3FastError(f"data.subtasks={cfg.data.subtasks}: experts are trained per subtask; set data.subtask "
                              f"(--subtask 0..{cfg.data.subtasks - 1})")
        name = f"{name}-sub{cfg.data.subtask}of{cfg.data.subtasks}"
    return experts_root(cfg.data.dataset) / name




def expert_path(out_dir: Path, index: int) -> Path:
    return out_dir / f"expert_{index:04d}.safetensors"


def read_expert_meta(path: Path) -> dict[str, Any]:
    """An expert's metadata from the file header alone (no trajectory is loaded)."""
    meta = load_metadata(path, "expert trajectory", tensor_shapes=True)
    if meta.get("format") != TRAJ_FORMAT:
        raise D3FastError(f"{path} is not a d3fast expert trajectory (format {meta.get('format')})")
    problem = _meta_problem(meta)
    if problem:
        raise D3FastError(f"expert trajectory {path} has a damaged header ({problem}); delete it and re-run "
                          "`d3fast experts` to train it again")
    return meta


def _meta_problem(meta: dict[str, Any]) -> str | None:
    def integer(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if not integer(meta.get("epochs_done")) or meta["epochs_done"] < 0:
        return "epochs_done is not a count"
    per_epoch = meta.get("snapshots_per_epoch", 1)  # files from before the key hold one per epoch
    if not integer(per_epoch) or not 1 <= per_epoch <= 64:
        return "snapshots_per_epoch is not a count in 1..64"
    rows = meta["epochs_done"] * per_epoch + 1
    shape = meta.get("__shapes__", {}).get("trajectory")
    if shape is None or len(shape) != 2 or shape[0] != rows:
        return (f"epochs_done={meta['epochs_done']} x snapshots_per_epoch={per_epoch} but the trajectory holds "
                f"{shape[0] if shape else 'no'} rows")
    if not isinstance(meta.get("complete"), bool):
        return "complete is not true/false"
    if not isinstance(meta.get("history"), list) or not all(
        isinstance(h, dict) and isinstance(h.get("seconds", 0), int | float) for h in meta["history"]
    ):
        return "history is not a list of epochs"
    crcs = meta.get("row_crc32")
    if crcs is not None and (not isinstance(crcs, list) or not all(integer(c) for c in crcs)
                             or len(crcs) != rows):
        return "row_crc32 is not one integer per stored snapshot"
    if not isinstance(meta.get("param_layout", []), list):
        return "param_layout is not a list"
    acc = meta.get("test_acc")
    if acc is not None and not (isinstance(acc, int | float) and not isinstance(acc, bool)):
        return "test_acc is not a number"
    return None


def read_expert(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An expert's tensors and metadata, every snapshot's row checked against its CRC-32."""
    tensors, meta = load_tensors(path, "expert trajectory")
    if meta.get("format") != TRAJ_FORMAT or "trajectory" not in tensors:
        raise D3FastError(f"{path} is not a d3fast expert trajectory (format {meta.get('format')})")
    traj = tensors["trajectory"]
    _check_rows(path, meta, range(len(traj)), list(traj))
    return tensors, meta


def row_crc(row: torch.Tensor) -> int:
    """The CRC-32 of one snapshot row's float32 bytes, as expert headers record it."""
    return zlib.crc32(row.detach().contiguous().numpy().data)


def _check_rows(path: Path, meta: dict[str, Any], snapshots: Iterable[int], rows: list[torch.Tensor]) -> None:
    """Refuse rows whose CRC-32 differs from the one written with them (files written before
    d3fast recorded CRCs carry none and are read as they are)."""
    crcs = meta.get("row_crc32")
    if crcs is None:
        return
    bad = [e for e, row in zip(snapshots, rows, strict=True) if e >= len(crcs) or row_crc(row) != crcs[e]]
    if bad:
        per_epoch = meta.get("snapshots_per_epoch", 1)
        what = "epoch(s)" if per_epoch == 1 else f"snapshot(s) ({per_epoch} per epoch)"
        raise D3FastError(f"expert trajectory {path} is corrupt: {what} {bad} fail their CRC check (bit rot or "
                          "an overwrite); delete it and re-run `d3fast experts` to train it again")


def write_expert(
    path: Path, snapshots: torch.Tensor, *, index: int, seed: int, complete: bool, test_acc: float | None,
    history: list[dict[str, float]], param_layout: list, buffers: torch.Tensor | None = None,
    snapshots_per_epoch: int = 1, **extra: Any,
) -> None:
    """One expert's file, atomically: `snapshots` [epochs * snapshots_per_epoch + 1, P]
    float32 (parameters at init and then `snapshots_per_epoch` times per epoch, the last
    at its end), optional `buffers` [B], and the metadata `read_expert_meta` reads."""
    snapshots = snapshots.float().contiguous()
    epochs, partial = divmod(len(snapshots) - 1, snapshots_per_epoch)
    if partial:
        raise ValueError(f"{len(snapshots)} snapshots are not whole epochs of {snapshots_per_epoch} plus the init")
    tensors = {"trajectory": snapshots}
    if buffers is not None and buffers.numel():
        tensors["buffers"] = buffers
    if snapshots_per_epoch > 1:  # absent: one per epoch (files from before the key read the same)
        extra["snapshots_per_epoch"] = snapshots_per_epoch
    meta = {
        "format": TRAJ_FORMAT, "index": index, "seed": seed, "epochs_done": epochs,
        "complete": complete, "test_acc": test_acc, "history": history, "param_layout": param_layout,
        # verified whenever a row is read back (ExpertBank.rows, read_expert)
        "row_crc32": [row_crc(row) for row in snapshots], **extra,
    }
    save_tensors(path, tensors, meta)


class ExpertBank:
    """The expert trajectories distillation can use: every file in `folder` with at least
    `need_epochs` epochs. Rows are read lazily from the safetensors files (one expert of
    ConvNet-5 x 51 epochs is 125 MB); start-up reads the headers only. A row is a snapshot:
    row i holds the parameters after i / snapshots_per_epoch epochs. Given
    `snapshots_per_epoch` (the config's), a file keeping another number is refused."""

    def __init__(self, folder: Path, need_epochs: int, files: list[Path] | None = None,
                 snapshots_per_epoch: int | None = None):
        from safetensors import safe_open

        self._open = safe_open
        self.folder, self.need_epochs = folder, need_epochs
        given = files is not None
        if files is None:
            files = sorted(folder.glob("expert_*.safetensors"))
        metas = {p: read_expert_meta(p) for p in files}
        if snapshots_per_epoch is not None:
            for p in files:
                _check_spacing(p, metas[p], snapshots_per_epoch)
        short = [p.name for p in files if metas[p]["epochs_done"] < need_epochs]
        if short and given:  # a given list (a resumed run's) must hold every file, each long enough
            raise D3FastError(f"expert trajectories {', '.join(short)} in {folder} have fewer than the "
                              f"{need_epochs} epochs distillation needs")
        self.files = [p for p in files if metas[p]["epochs_done"] >= need_epochs]
        self._metas = [metas[p] for p in self.files]
        spacing = sorted({m.get("snapshots_per_epoch", 1) for m in self._metas})
        if len(spacing) > 1:  # the folder's name holds the spacing: only a hand-made copy mixes them
            raise D3FastError(f"expert trajectories in {folder} mix {spacing} snapshots per epoch; keep one kind")
        self.snapshots_per_epoch: int = spacing[0] if spacing else snapshots_per_epoch or 1

    def __len__(self) -> int:
        return len(self.files)

    def snapshot(self, epoch: float) -> int:
        """The row that holds the parameters after `epoch` epochs.

        Raises:
            D3FastError: `epoch` falls between two snapshots.
        """
        row = snapshots_in(epoch, self.snapshots_per_epoch) if epoch else 0
        if row is None:
            raise D3FastError(f"the experts in {self.folder} keep {self.snapshots_per_epoch} snapshot(s) per epoch: "
                              f"none is taken at epoch {epoch!r}")
        return row

    def rows(self, index: int, snapshots: list[int]) -> list[torch.Tensor]:
        """Parameter vectors [P] of expert `index` at rows `snapshots` (-1: its last; one per
        epoch unless the experts keep more, see `snapshot`)."""
        with self._open(str(self.files[index]), framework="pt") as f:
            traj = f.get_slice("trajectory")
            last = traj.get_shape()[0] - 1
            picked = [min(e, last) if e >= 0 else last for e in snapshots]
            rows = [traj[e] for e in picked]
        _check_rows(self.files[index], self._metas[index], picked, rows)
        return rows


def need_epochs(cfg: Config) -> int:
    """Epochs of expert trajectory distillation reads: max_start_epoch + expert_epochs,
    rounded up (expert_epochs may be a fraction)."""
    per_epoch = cfg.experts.snapshots_per_epoch  # rounded to snapshots as ExpertBank.snapshot rounds them
    return math.ceil(round((cfg.distill.max_start_epoch + cfg.distill.expert_epochs) * per_epoch) / per_epoch)


def ready_experts(cfg: Config, minimum: int = 1) -> ExpertBank:
    """The experts of `cfg` that distillation can use now.

    Raises:
        D3FastError: fewer than `minimum` of them; the message holds the full `d3fast
            experts` command (with its --epochs and --set values) that trains them.
    """
    need = need_epochs(cfg)
    folder = experts_dir(cfg)
    bank = ExpertBank(folder, need, files=None if folder.is_dir() else [],
                      snapshots_per_epoch=cfg.experts.snapshots_per_epoch)
    if len(bank) < minimum:
        have = "no expert" if not len(bank) else f"only {len(bank)} of the {minimum} experts"
        raise D3FastError(
            f"{have} in {folder} has the {need} epochs distillation needs (distill.max_start_epoch + "
            f"distill.expert_epochs); train them with:\n  {experts_command(cfg)}"
        )
    return bank


def experts_command(cfg: Config) -> str:
    """The `d3fast experts` command line that trains the experts `cfg` distills from: the
    dataset and preset, --num-experts, --epochs (at least what distillation needs) and a
    --set for every trajectory-shaping key that differs from the preset."""
    base = flatten(resolve_config(cfg.data.dataset, cfg.preset or None))
    args = ["d3fast", "experts", "--dataset", cfg.data.dataset]
    if cfg.preset and cfg.preset != cfg.data.dataset:
        args += ["--preset", cfg.preset]
    args += ["--num-experts", str(cfg.experts.num_experts),
             "--epochs", str(max(cfg.experts.epochs, need_epochs(cfg)))]
    for key, value in flatten(cfg).items():
        section = key.split(".")[0]
        if section not in ("data", "net", "augment", "experts") or key in (
            "data.dataset", "experts.num_experts", "experts.epochs"
        ) or base.get(key) == value:
            continue
        args += ["--set", f"{key}={_cli_value(value)}"]
    if cfg.device != "auto":
        args += ["--device", cfg.device]
    return shlex.join(args)


def _cli_value(value: Any) -> str:
    """A value as `--set` parses it back (d3fast/config.py)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, list):
        return json.dumps(value)
    return str(value)












def _check_spacing(path: Path, meta: dict[str, Any], per_epoch: int) -> None:
    """Refuse an expert file keeping other than `per_epoch` snapshots per epoch (a file copied
    in from another folder: its rows would be read as other epochs)."""
    held = meta.get("snapshots_per_epoch", 1)
    if held != per_epoch:
        raise D3FastError(f"expert trajectory {path} keeps {held} snapshot(s) per epoch, and its folder's experts "
                          f"(experts.snapshots_per_epoch) {per_epoch}: it was copied from another folder; move it "
                          "out, and `d3fast experts` trains this one again")








def write_manifest(cfg: Config, out: Path, device: torch.device) -> dict[str, Any]:
    records = []
    layout: list | None = None
    for path in sorted(out.glob("expert_*.safetensors")):
        meta = read_expert_meta(path)
        layout = meta["param_layout"]
        seconds = sum(h["seconds"] for h in meta["history"])
        records.append(
            {
                "index": meta["index"],
                "file": path.name,
                "seed": meta["seed"],
                "epochs": meta["epochs_done"],
                "complete": meta["complete"],
                "test_acc": meta["test_acc"],
                "train_seconds": round(seconds, 3),
                "final_train_acc": meta["history"][-1]["acc"] if meta["history"] else None,
                # where an expert trained elsewhere came from (d3fast/recipes/expert_buffers.py)
                **({"imported": meta["imported"]} if meta.get("imported") else {}),
            }
        )
    accs = [r["test_acc"] for r in records if r["test_acc"] is not None]
    manifest = {
        "format": TRAJ_FORMAT,
        "dataset": cfg.data.dataset,
        "tag": out.name,
        "config": read_json(out / "config.json", "experts config"),
        "snapshots_per_epoch": cfg.experts.snapshots_per_epoch,
        "hyperparameters": {
            "optimizer": "SGD",
            "lr": cfg.experts.lr,
            "momentum": 0.0,
            "weight_decay": 0.0,
            "batch_size": cfg.experts.batch_size,
        },
        "param_layout": layout,
        "num_params": sum(int(np.prod(s)) for _, s in layout) if layout else None,
        "num_experts": len(records),
        "num_complete": sum(r["complete"] for r in records),
        "test_acc_mean": float(np.mean(accs)) if accs else None,
        "test_acc_std": float(np.std(accs)) if accs else None,
        "experts": records,
        "device": device_name(device),
        "versions": versions(),
        "updated": timestamp(),
    }
    atomic_write_json(out / "manifest.json", manifest)
    return manifest

