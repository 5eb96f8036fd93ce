"""`d3fast label` and the soft labels of `d3fast distill`: the whole-dataset expert they need
(trained when missing), the labels of a run's checkpoint written beside it. The labels
themselves: d3fast/soft_labels.py.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import torch

from d3fast.config import Config, validate
from d3fast.distilled import Distilled, Merged
from d3fast.errors import D3FastError
from d3fast.models import build_network
from d3fast.preflight import resolve_data_loader
from d3fast.recipes.experts import run_experts
from d3fast.run import Run
from d3fast.runtime import resolve_device
from d3fast.soft_labels import soft_labels
from d3fast.training import load_flat_params
from d3fast.trajectories import ExpertBank, experts_command, experts_dir


def ensure_labelling_expert(cfg: Config, echo: Callable[[str], None] = print) -> None:
    """Train the whole-dataset expert that soft labels need, when there is none yet."""
    full, bank = _labelling_bank(cfg)
    if len(bank):
        return
    echo(f"soft labels need an expert trained on all classes of {cfg.data.dataset}: training one first")
    run_experts(full)


def full_class_config(cfg: Config) -> Config:
    """`cfg` for the one expert that labels: the whole dataset (no subtask split), trained
    for distill.soft_label_epoch epochs (at least 1)."""
    full = copy.deepcopy(cfg)
    full.data.subtasks, full.data.subtask = 1, -1
    full.data.loader = "auto"
    full.experts.num_experts = 1
    full.experts.epochs = max(cfg.distill.soft_label_epoch, 1)
    # what `need_epochs` reads: the labels need that epoch, no distillation window
    full.distill.max_start_epoch, full.distill.expert_epochs = full.experts.epochs, 0
    return full


def _labelling_bank(cfg: Config) -> tuple[Config, ExpertBank]:
    """The labelling expert's config and the whole-dataset experts that reach its epoch."""
    full = full_class_config(cfg)
    resolve_data_loader(full)
    folder = experts_dir(full)
    return full, ExpertBank(folder, cfg.distill.soft_label_epoch, files=None if folder.is_dir() else [],
                            snapshots_per_epoch=full.experts.snapshots_per_epoch)


def has_labelling_expert(cfg: Config) -> bool:
    """Whether the whole-dataset expert `labelling_network` reads exists (nothing is trained)."""
    return len(_labelling_bank(cfg)[1]) > 0


def labelling_network(cfg: Config, device: torch.device, need: str = "soft labels need") -> tuple[torch.nn.Module, dict[str, Any]]:
    """Expert 0 of the whole-dataset experts of `cfg` at epoch distill.soft_label_epoch, in
    eval mode, and where it came from; `need` begins the error's sentence (what needs it).

    Raises:
        D3FastError: no such expert, with the exact `d3fast experts` command that trains one.
    """
    from d3fast.data.cache import load_split

    full, bank = _labelling_bank(cfg)
    epoch, folder = cfg.distill.soft_label_epoch, bank.folder
    if not len(bank):
        raise D3FastError(f"{need} a ConvNet expert trained on all classes of {cfg.data.dataset} for "
                          f"{epoch} epochs (distill.soft_label_epoch), and {folder} has none; train one with:\n  "
                          f"{experts_command(full)}")
    manifest = load_split(cfg.data.dataset, "train", mmap=True)[2]
    net = build_network(cfg.net, manifest["channels"], manifest["num_classes"], manifest["resolution"])
    (row,) = bank.rows(0, [bank.snapshot(epoch)])
    load_flat_params(net, row)
    return net.to(device).eval(), {"expert": str(bank.files[0]), "epoch": epoch, "classes": manifest["num_classes"]}


def label(d: Distilled | Merged, cfg: Config, device: torch.device) -> dict[str, Any]:
    """Label `d` in place (d.soft_labels); returns the labels' provenance.

    Raises:
        D3FastError: a subtask's object (label the merged one), or no labelling expert.
    """
    if isinstance(d, Distilled) and cfg.data.subtasks > 1:
        raise D3FastError("an object of one subtask is labelled once merged (its students see every class only then): "
                          "run `d3fast merge ... --soft-labels`, or `d3fast label` on the merged directory")
    net, info = labelling_network(cfg, device)
    labels = soft_labels(d, net, cfg.eval.decoder_bn)
    if labels.shape[1] != d.num_classes:
        raise D3FastError(f"the labelling expert has {labels.shape[1]} classes, the object {d.num_classes}")
    d.soft_labels = labels
    return info


def relabel(run: Run, cfg: Config, device: torch.device) -> Merged:
    """Soft labels for the merged object in `run` (its directory), written back in place
    (the export and the manifest are each replaced atomically).

    Raises:
        D3FastError: not a merged directory, or no labelling expert (d3fast/soft_labels.py).
    """
    merged, _ = run.load_distilled(device)  # the export checked against the manifest's sha256
    if not isinstance(merged, Merged):
        raise D3FastError(f"{run.path} holds no merged object")
    run.relabelled(merged, cfg, label(merged, cfg, device))
    return merged


def label_run(run: Run, cfg: Config, device: str | None) -> Path:
    """Soft labels for the run's latest checkpoint, written beside it; returns their file."""
    dev = resolve_device(device or cfg.device)
    d, step = run.load_distilled(dev)
    info = label(d, cfg, dev)
    assert d.soft_labels is not None
    path = run.save_labels(d.soft_labels, step, info)
    click.echo(f"soft labels of step {step} from {info['expert']} (epoch {info['epoch']}): {path}")
    return path


def command(run_dir: str, epoch: int | None, device: str | None, runs_dir: str) -> None:
    """`d3fast label`: soft labels for a run's latest checkpoint or a merged object, the
    whole-dataset expert trained first when missing.

    Raises:
        D3FastError: no run there, a bad epoch, a subtask's own run (label the merge)."""
    run = Run.open(run_dir, runs_dir)
    cfg = run.read_config()
    if epoch is not None:
        cfg.distill.soft_label_epoch = epoch
        validate(cfg)
    if cfg.data.subtasks == 1 or run.merged_path.exists():
        ensure_labelling_expert(cfg, click.echo)
    if run.merged_path.exists():
        merged = relabel(run, cfg, resolve_device(device or "auto"))
        click.echo(f"labelled {merged.num_priors} priors of {run.path} ({merged.storage_bytes() / 2**20:.2f} MiB "
                   "with the labels)")
        return
    label_run(run, cfg, device)
