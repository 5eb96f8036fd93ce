"""Soft labels for a distilled object (docs/algorithm.md section 9.2; the reference's
`soft_label.py`): each prior's mean image f(mu) is labelled by the softmax of a network
trained on ALL classes of the dataset, an expert trajectory at epoch
`distill.soft_label_epoch` (the reference takes epochs 9, 12 and 13 for its three ImageNet-1K
budgets). The labels are [priors, classes] probabilities, stored with the object and
counted in its storage (4 bytes each: 4 MB for 1,000 classes at 1 prior per class, a third
of the 12.3 MB that one 64 px image per class takes).

Objects of one subtask are labelled after the merge (their students see every class only
then); `d3fast distill` labels whole-dataset runs at their end and merged objects when the
merge is made, `d3fast label` (re)labels either.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from d3fast.config import Config
from d3fast.distilled import Distilled, Merged, Sampler
from d3fast.errors import D3FastError
from d3fast.io import load_tensors, save_tensors
from d3fast.models import build_network
from d3fast.training import load_flat_params

if TYPE_CHECKING:
    from d3fast.experts import ExpertBank

# mean images through the labelling network per forward pass (the reference's batch of 50;
# the network is in eval mode, so the batch size does not change the labels)
LABEL_BATCH = 50
SOFT_FILE = "soft_labels.safetensors"


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
    from d3fast.experts import ExpertBank, experts_dir, resolve_data_loader

    full = full_class_config(cfg)
    resolve_data_loader(full)
    folder = experts_dir(full)
    return full, ExpertBank(folder, cfg.distill.soft_label_epoch, files=None if folder.is_dir() else [],
                            snapshots_per_epoch=full.experts.snapshots_per_epoch)


def ensure_labelling_expert(cfg: Config, echo: Callable[[str], None] = print) -> None:
    """Train the whole-dataset expert that soft labels need, when there is none yet."""
    from d3fast.experts import run_experts

    full, bank = _labelling_bank(cfg)
    if len(bank):
        return
    echo(f"soft labels need an expert trained on all classes of {cfg.data.dataset}: training one first")
    run_experts(full)


def labelling_network(cfg: Config, device: torch.device) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Expert 0 of the whole-dataset experts of `cfg` at epoch distill.soft_label_epoch, in
    eval mode, and where it came from.

    Raises:
        D3FastError: no such expert, with the exact `d3fast experts` command that trains one.
    """
    from d3fast.data.cache import load_split
    from d3fast.experts import experts_command

    full, bank = _labelling_bank(cfg)
    epoch, folder = cfg.distill.soft_label_epoch, bank.folder
    if not len(bank):
        raise D3FastError(f"soft labels need a ConvNet expert trained on all classes of {cfg.data.dataset} for "
                          f"{epoch} epochs (distill.soft_label_epoch), and {folder} has none; train one with:\n  "
                          f"{experts_command(full)}")
    manifest = load_split(cfg.data.dataset, "train", mmap=True)[2]
    net = build_network(cfg.net.name, manifest["channels"], manifest["num_classes"], manifest["resolution"],
                        width=cfg.net.width, depth=cfg.net.depth, norm=cfg.net.norm, pooling=cfg.net.pooling)
    (row,) = bank.rows(0, [bank.snapshot(epoch)])
    load_flat_params(net, row)
    return net.to(device).eval(), {"expert": str(bank.files[0]), "epoch": epoch, "classes": manifest["num_classes"]}


@torch.no_grad()
def soft_labels(d: Distilled | Merged, net: torch.nn.Module, bn: str = "batch") -> torch.Tensor:
    """softmax(net(f(mu))) for every prior of `d`: [C * PPC, classes] float32 probabilities
    (mean images decoded as evaluation decodes samples: `bn` as eval.decoder_bn)."""
    means = Sampler(d, bn).means()
    out = [torch.softmax(net(x).float(), dim=1) for x in means.split(LABEL_BATCH)]
    return torch.cat(out)


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


def save_run_labels(run_dir: Path, labels: torch.Tensor, step: int, info: dict[str, Any]) -> Path:
    """The soft labels of a run's checkpoint at `step`, beside it (safetensors, atomic)."""
    path = run_dir / SOFT_FILE
    save_tensors(path, {"soft_labels": labels.detach().cpu().contiguous()}, {"step": step, **info})
    return path


def load_run_labels(run_dir: Path, step: int, priors: int) -> torch.Tensor | None:
    """The run's soft labels when they are of checkpoint `step` (None when there are none).

    Raises:
        D3FastError: a damaged file, labels of another step (relabel with `d3fast label`),
            or of another shape.
    """
    path = run_dir / SOFT_FILE
    if not path.exists():
        return None
    tensors, meta = load_tensors(path, "soft labels")
    labels = tensors.get("soft_labels")
    if meta.get("step") != step:
        raise D3FastError(f"{path} labels the checkpoint of step {meta.get('step')}, the run is at step {step}: "
                          f"label it again with `d3fast label {run_dir}`")
    if labels is None or labels.dim() != 2 or labels.shape[0] != priors or not torch.isfinite(labels).all():
        raise D3FastError(f"{path} does not fit the run's object: label it again with `d3fast label {run_dir}`")
    return labels
