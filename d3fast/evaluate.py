"""`d3fast evaluate`: train students from scratch on the distilled distribution and on
real-image baselines, then test them on the real test set (docs/algorithm.md section 6).

Students: SGD (momentum 0.9, weight decay 5e-4), lr = the learned lr for the distilled
set (eval.lr_real for real images), lr x 0.1 at half the epochs, batch 256, DSA. Each
epoch of a distilled-set student draws fresh samples (decode mu + eps * sigma),
eval.samples_per_class per class. Baselines, trained the same way:
    random_same_count    PPC random real images per class
    random_same_storage  random real images whose uint8 bytes equal the distilled
                         object's float32 bytes (capped at the train set)
A merged object (d3fast merge) decodes each class through its own subtask's decoder and
trains at the mean of the parts' learned lrs. An object with soft labels trains one set of
students on them (soft cross-entropy at eval.soft_temperature, d3fast/losses.py) and one on
the hard labels, reported side by side.
Accuracy is the test accuracy after the last epoch: there is no checkpoint selection,
so nothing is chosen on the test set. Mean and std over students per architecture.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from d3fast import ledger
from d3fast.config import Config
from d3fast.data.augment import DSA
from d3fast.data.loader import DeviceDataset, load_view, open_split
from d3fast.distilled import Distilled, Merged, Sampler
from d3fast.io import atomic_write_json, atomic_write_text
from d3fast.losses import soft_cross_entropy
from d3fast.models import build_network
from d3fast.run import Run
from d3fast.runtime import derive_seed, device_name, resolve_device, versions
from d3fast.training import evaluate_accuracy

Batches = Callable[[torch.Generator], Iterator[tuple[torch.Tensor, torch.Tensor]]]


def train_student(
    net: torch.nn.Module,
    batches: Batches,
    epochs: int,
    lr: float,
    cfg: Config,
    augment: DSA | None,
    g: torch.Generator,
) -> None:
    e = cfg.eval
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=e.momentum, weight_decay=e.weight_decay)
    net.train()
    for epoch in range(epochs):
        if epoch == epochs // 2:
            for group in opt.param_groups:
                group["lr"] = lr * 0.1
        for x, y in batches(g):
            if augment is not None:
                x = augment(x, g)
            # float targets are soft labels ([B, classes] probabilities)
            out = net(x)
            loss = soft_cross_entropy(out, y, e.soft_temperature) if y.is_floating_point() else F.cross_entropy(out, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


def distilled_batches(
    d: Distilled | Merged, samples_per_class: int, batch_size: int, bn: str, soft: bool = False
) -> Batches:
    """Per epoch: C x samples_per_class fresh samples, each from a random prior of its class,
    with its class (or, with `soft`, its prior's soft label) as the target."""
    sample = Sampler(d, bn)
    dev = d.parts[0].latents.device

    def batches(g: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        labels = torch.arange(d.num_classes, device=dev).repeat_interleave(samples_per_class)
        labels = labels[torch.randperm(len(labels), generator=g, device=dev)]
        for y in labels.split(batch_size):
            prior = y * d.ppc + torch.randint(d.ppc, y.shape, generator=g, device=dev)
            x = sample(prior, g)
            yield x, (d.soft_labels[prior] if soft and d.soft_labels is not None else y)

    return batches


def real_subset(train: DeviceDataset, per_class: int, g: torch.Generator) -> DeviceDataset:
    picks = []
    for idx in train.class_indices():
        picks.append(idx[torch.randperm(len(idx), generator=g, device=idx.device)[:per_class]])
    return train.subset(torch.cat(picks))


def evaluate_run(
    run: Run,
    cfg_override: dict[str, Any] | None = None,
    progress: bool = True,
    device: str | None = None,
) -> dict[str, Any]:
    """Evaluate the latest checkpoint of `run` (protocol: the run's eval.* keys, updated by
    `cfg_override`); writes eval.json and eval.md into the run and returns the report.

    Raises:
        D3FastError: no usable checkpoint (missing, corrupt, non-finite), missing data.
    """
    from d3fast.config import apply_updates, validate
    from d3fast.experts import resolve_data_loader

    dev = resolve_device(device or "auto")
    d, step = run.load_distilled(dev)
    cfg = run.read_config()
    if cfg_override:
        apply_updates(cfg, cfg_override, "", from_string=False)
        validate(cfg)
    resolve_data_loader(cfg)
    run_dir = run.path
    e = cfg.eval
    t0 = time.perf_counter()
    train = load_view(cfg, "train", dev)
    # the test split streams from the loader the experts used (FFCV center crops or the cache)
    test = open_split(cfg, "test", dev)
    augment = DSA(cfg.augment)
    min_class = min(len(i) for i in train.class_indices())
    storage_per_class = min(int(d.images_per_class_equivalent()), min_class)

    setups: list[tuple[str, int | None]] = [("d3", None)]
    if d.soft_labels is not None:  # soft labels first, the hard-label students beside them
        setups.insert(0, ("d3_soft", None))
    if e.baselines:
        setups.append(("random_same_count", d.ppc))
        # an object smaller than one image per class has no equal-storage real set to compare with
        if storage_per_class >= 1:
            setups.append(("random_same_storage", storage_per_class))
    total = len(e.archs) * len(setups) * e.students
    bar = tqdm(total=total, desc="evaluate", unit="student", disable=not progress, dynamic_ncols=True)
    run_key = str(run_dir.resolve())
    with ledger.track("evaluate", cfg.data.dataset, cfg.preset, dev, steps_target=total, run=run_key) as meter:
        results: dict[str, Any] = {}
        for a, arch in enumerate(e.archs):
            results[arch] = {}
            for kind, per_class in setups:
                accs = []
                for s in range(e.students):
                    seed = derive_seed(e.seed, a, s)
                    g = torch.Generator(device=dev).manual_seed(seed)
                    with torch.random.fork_rng(devices=[]):
                        torch.manual_seed(seed)
                        kw: dict[str, Any] = {"width": cfg.net.width, "depth": cfg.net.depth, "norm": cfg.net.norm,
                              "pooling": cfg.net.pooling} if arch == "convnet" else {}
                        net = build_network(arch, train.images.shape[1], train.num_classes, train.images.shape[-1], **kw)
                    net = net.to(dev)
                    if kind in ("d3", "d3_soft"):
                        batches = distilled_batches(d, e.samples_per_class, e.batch_size, e.decoder_bn,
                                                    soft=kind == "d3_soft")
                        lr = d.student_lr
                    else:
                        assert per_class is not None  # the baselines have a count
                        subset = real_subset(train, per_class, g)

                        def batches(gen: torch.Generator, subset: DeviceDataset = subset):
                            return subset.batches(e.batch_size, shuffle=True, generator=gen)

                        lr = e.lr_real
                    train_student(net, batches, e.epochs, lr, cfg, augment, g)
                    accs.append(evaluate_accuracy(net, test))
                    bar.set_postfix_str(f"{arch} {kind} {accs[-1]:.1%}", refresh=False)
                    bar.update(1)
                    meter.tick()
                results[arch][kind] = {
                    "images_per_class": per_class if per_class is not None else None,
                    "accs": accs, "mean": float(np.mean(accs)), "std": float(np.std(accs)),
                }
    bar.close()
    report = {
        "run_dir": str(run_dir), "dataset": cfg.data.dataset, "distill_step": step,
        "ppc": d.ppc, "student_lr": d.student_lr, "soft_labels": d.soft_labels is not None,
        "subtasks": len(d.parts),
        "storage_bytes": d.storage_bytes(),
        "images_per_class_equivalent": round(d.images_per_class_equivalent(), 2),
        "protocol": {k: getattr(e, k) for k in ("students", "epochs", "batch_size", "samples_per_class",
                                                 "momentum", "weight_decay", "lr_real", "decoder_bn", "seed",
                                                 "soft_temperature")},
        "results": results, "device": device_name(dev), "versions": versions(),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    atomic_write_json(run_dir / "eval.json", report)
    atomic_write_text(run_dir / "eval.md", markdown(report))
    return report


def markdown(r: dict[str, Any]) -> str:
    lines = [
        f"# Evaluation of {r['run_dir']} (step {r['distill_step']})",
        "",
        f"{r['dataset']}, PPC {r['ppc']}, "
        + (f"merged from {r['subtasks']} subtasks (mean of their learned lrs: " if r.get("subtasks", 1) > 1
           else "learned student lr ")
        + f"{r['student_lr']:.4g}{')' if r.get('subtasks', 1) > 1 else ''}; "
        + ("soft labels (temperature " f"{r['protocol'].get('soft_temperature', 1.0):g}); " if r.get("soft_labels") else "")
        + "storage "
        f"{r['storage_bytes'] / 2**20:.2f} MiB = {r['images_per_class_equivalent']} uint8 images per class. "
        f"{r['protocol']['students']} students x {r['protocol']['epochs']} epochs each; "
        "test accuracy after the last epoch (no selection).",
        "",
        "| arch | training set | images/class | test accuracy |",
        "|---|---|---|---|",
    ]
    names = {"d3_soft": "D3 (fresh samples), soft labels", "d3": "D3 (fresh samples)" + (
        ", hard labels" if r.get("soft_labels") else ""), "random_same_count": "random real, same count",
             "random_same_storage": "random real, same storage"}
    for arch, kinds in r["results"].items():
        for kind, v in kinds.items():
            n = v["images_per_class"]
            n = f"{r['protocol']['samples_per_class']} per epoch" if n is None else str(n)
            lines.append(f"| {arch} | {names[kind]} | {n} | {100 * v['mean']:.2f} ± {100 * v['std']:.2f} % (n={len(v['accs'])}) |")
        if "random_same_count" in kinds and "random_same_storage" not in kinds:
            lines.append(f"| {arch} | {names['random_same_storage']} | - | not applicable: the object stores less than "
                         "one uint8 image per class |")
    return "\n".join(lines) + "\n"


def summary_line(r: dict[str, Any]) -> str:
    out = []
    for arch, kinds in r["results"].items():
        parts = [f"{k} {100 * v['mean']:.1f}±{100 * v['std']:.1f}%" for k, v in kinds.items()]
        out.append(f"{arch}: " + ", ".join(parts))
    return "; ".join(out)
