"""`d3fast evaluate`: train students from scratch on the distilled distribution and on
real-image baselines, then test them on the real test set (docs/algorithm.md section 6).

Students: SGD (momentum 0.9, weight decay 5e-4), lr = the learned lr for the distilled
set (eval.lr_real for real images), lr x 0.1 at half the epochs, batch 256, DSA. Each
epoch of a distilled-set student draws fresh samples (decode mu + eps * sigma),
eval.samples_per_class per class. Baselines, trained the same way:
    random_same_count    PPC random real images per class
    random_same_storage  random real images whose uint8 bytes equal the distilled
                         object's float32 bytes (capped at the train set)
    herding_same_storage, kcenter_same_storage
                         as many real images per class, picked by herding and by k-center
                         greedy on an expert's features (eval.coresets, d3fast/coresets.py)
A merged object (d3fast merge) decodes each class through its own subtask's decoder and
trains at the mean of the parts' learned lrs. An object with soft labels trains one set of
students on them (soft cross-entropy at eval.soft_temperature, d3fast/losses.py) and one on
the hard labels, reported side by side.
With eval.fresh_samples = false the distilled students train on one fixed draw instead
(d3fast/distilled.py `draw_set`, seed eval.seed): the set `d3fast export --format pt` writes.
A fixed image set (a `.pt` set or an ImageFolder, d3fast's exports or other code's) trains
its students on its images at its lr (lr.pt; else eval.lr_real); its same-storage baseline
counts float32 `.pt` values at 4 bytes and PNG pixels at 1.
Accuracy is the test accuracy after the last epoch: there is no checkpoint selection,
so nothing is chosen on the test set. Mean and std over students per architecture.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import click
import numpy as np
import torch
import torch.nn.functional as F

from d3fast import ledger
from d3fast.config import Config
from d3fast.data.augment import DSA
from d3fast.data.loader import DeviceDataset, load_view, open_split
from d3fast.data.normalize import from_pixels
from d3fast.distilled import Distilled, Merged, Sampler, draw_set
from d3fast.errors import D3FastError
from d3fast.exports import ImageSet
from d3fast.io import (
    atomic_write_json,
    atomic_write_text,
    locked,
    read_json,
    utc_file_stamp,
    utc_timestamp,
)
from d3fast.losses import soft_cross_entropy
from d3fast.models import build_network
from d3fast.preflight import resolve_data_loader
from d3fast.progress import bar as progress_bar
from d3fast.report import markdown, rendered, summary_line
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


def train_and_test(arch: str, cfg: Config, train: DeviceDataset, seed: int, lr: float,
                   batches_of: Callable[[torch.Generator], Batches], augment: DSA | None, on: Any) -> float:
    """One student of `arch` (cfg.net's width, depth, norm and pooling for the ConvNet), its
    initialisation and every draw from `seed`, trained on batches_of(its generator) at `lr`;
    returns its accuracy on `on` (the test split, or the lr search's held-out images)."""
    dev = train.device
    g = torch.Generator(device=dev).manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # the ConvNet as the config has it; the other architectures with their own defaults
        net = build_network(dataclasses.replace(cfg.net, name="convnet") if arch == "convnet" else arch,
                            train.images.shape[1], train.num_classes, train.images.shape[-1])
    net = net.to(dev)
    train_student(net, batches_of(g), cfg.eval.epochs, lr, cfg, augment, g)
    return evaluate_accuracy(net, on)


def distilled_batches(
    d: Distilled | Merged, samples_per_class: int, batch_size: int, bn: str, soft: bool = False
) -> Batches:
    """Per epoch: C x samples_per_class fresh samples, with its class (or, with `soft`, its
    prior's soft label) as each one's target. A class's samples go to its priors in fresh
    random permutations of them, so every prior gives samples_per_class // PPC samples or one
    more each epoch (with samples_per_class >= PPC, every prior is seen every epoch)."""
    sample = Sampler(d, bn)
    dev = d.parts[0].latents.device
    c, p, k = d.num_classes, d.ppc, samples_per_class

    def batches(g: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        reps = -(-k // p)
        picks = torch.rand(c, reps, p, generator=g, device=dev).argsort(-1).reshape(c, reps * p)[:, :k]
        priors = (torch.arange(c, device=dev)[:, None] * p + picks).reshape(-1)
        priors = priors[torch.randperm(len(priors), generator=g, device=dev)]
        for prior in priors.split(batch_size):
            y = torch.div(prior, p, rounding_mode="floor")
            yield sample(prior, g), (d.soft_labels[prior] if soft and d.soft_labels is not None else y)

    return batches


def epoch_order(n: int, per_epoch: int | None, g: torch.Generator, device: torch.device) -> torch.Tensor:
    """One epoch's example order for a set of n: a permutation (per_epoch None), or fresh
    permutations concatenated and cut at per_epoch examples (the equal_steps protocol: a
    smaller set is cycled through, each example seen per_epoch // n times or once more)."""
    reps = 1 if per_epoch is None else -(-per_epoch // n)
    order = torch.cat([torch.randperm(n, generator=g, device=device) for _ in range(reps)])
    return order if per_epoch is None else order[:per_epoch]


def holdout(train: DeviceDataset, per_class: int, g: torch.Generator) -> tuple[DeviceDataset, DeviceDataset]:
    """(the rest, per_class random images of each class): the lr search's validation images,
    kept out of every baseline's set.

    Raises:
        D3FastError: a class with no more than per_class images."""
    keep, held = [], []
    for c, idx in enumerate(train.class_indices()):
        if len(idx) <= per_class:
            raise D3FastError(f"eval.val_per_class={per_class} holds out every image of class {train.classes[c]!r} "
                              f"({len(idx)}): lower it")
        order = idx[torch.randperm(len(idx), generator=g, device=idx.device)]
        held.append(order[:per_class])
        keep.append(order[per_class:])
    return train.subset(torch.cat(keep)), train.subset(torch.cat(held))


def real_subset(train: DeviceDataset, per_class: int, g: torch.Generator) -> DeviceDataset:
    picks = []
    for idx in train.class_indices():
        picks.append(idx[torch.randperm(len(idx), generator=g, device=idx.device)[:per_class]])
    return train.subset(torch.cat(picks))


@dataclass
class Target:
    """What `evaluate` trains students on: a distilled object (a run, a merged object, a
    safetensors export) or a fixed image set (`d3fast.exports.ImageSet`), the config whose
    eval.* keys are the protocol and data.* the dataset, and where evaluations are kept."""

    name: str
    evals_dir: Path
    cfg: Config
    d: Distilled | Merged | None = None
    images: ImageSet | None = None
    step: int | None = None
    run: Run | None = None


def run_target(run: Run, device: torch.device | str, cfg: Config | None = None,
               evals_dir: Path | None = None) -> Target:
    """A run or merged directory as a target: its latest distilled object, its recorded
    config (or `cfg`), evaluations kept in its evals/ (or `evals_dir`)."""
    d, step = run.load_distilled(device)
    return Target(str(run.path), evals_dir or run.path / "evals", cfg if cfg is not None else run.read_config(),
                  d=d, step=step, run=run)


def _with(cfg: Config, updates: dict[str, Any] | None) -> Config:
    from d3fast.config import apply_updates, validate

    if updates:
        apply_updates(cfg, updates, "", from_string=False)
        validate(cfg)
    return cfg


def tensor_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, per_epoch: int | None = None,
                   prepare: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Batches:
    """A fixed set ([N, ...] inputs, [N] or [N, classes] targets), reshuffled every epoch;
    with `per_epoch`, epochs of that many examples (`epoch_order`); `prepare` maps each batch's
    inputs (real uint8 images: their normalisation, done per batch)."""
    def batches(g: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for rows in epoch_order(len(x), per_epoch, g, x.device).split(batch_size):
            yield (x[rows] if prepare is None else prepare(x[rows])), y[rows]

    return batches


def _image_set_on(s: ImageSet, train: DeviceDataset, dev: torch.device, cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """The set as the students see it (normalised, ZCA as the dataset), checked against the dataset."""
    n_cls, shape = train.num_classes, tuple(train.images.shape[1:])
    note = s.label_by_name(train.classes)
    if note:
        from tqdm import tqdm

        tqdm.write(f"note: {note}")
    if tuple(s.images.shape[1:]) != shape:
        raise D3FastError(f"{s.where} holds images of shape {list(s.images.shape[1:])}, but {cfg.data.dataset} "
                          f"images are {list(shape)} (C, H, W)")
    if int(s.labels.max()) >= n_cls:
        raise D3FastError(f"{s.where} has labels up to {int(s.labels.max())}, but {cfg.data.dataset} has {n_cls} classes")
    if s.soft_labels is not None and s.soft_labels.shape[1] != n_cls:
        raise D3FastError(f"{s.where}: soft labels over {s.soft_labels.shape[1]} classes for a {n_cls}-class dataset")
    x = s.images.to(dev)
    if s.pixels:
        meta = {"mean": train.mean.tolist(), "std": train.std.tolist()}
        x = from_pixels(x, meta, train.zca)
    return x, s.labels.to(dev)


def evaluate(target: Target, dev: torch.device, progress: bool = True) -> dict[str, Any]:
    """Train eval.students students per architecture on the target and on random-real
    baselines (module docstring), test them on the real test set, keep the report
    (`keep_report`) and return it.

    Raises:
        D3FastError: missing data; an image set that does not fit the dataset.
    """
    cfg, d, s = target.cfg, target.d, target.images
    resolve_data_loader(cfg)
    e = cfg.eval
    e.archs = list(dict.fromkeys(e.archs))  # convnet,convnet is one architecture
    _check_writable(target)  # before the students train, not after
    if d is not None and cfg.distill.dtype != "float32":
        from tqdm import tqdm

        # the students and the object (as stored, `Run.load_distilled`) are float32 here
        tqdm.write(f"note: {target.name} was distilled in {cfg.distill.dtype}; its students train in float32, "
                   "the dtype the object is stored in")
    t0 = time.perf_counter()
    train = load_view(cfg, "train", dev)
    if d is not None:
        have = (train.num_classes, *train.images.shape[1:])
        want = (d.num_classes, d.meta["channels"], d.meta["resolution"], d.meta["resolution"])
        if have != want:
            raise D3FastError(f"{target.name} was distilled for {want[0]} classes of {want[1]}x{want[2]}x{want[3]} "
                              f"images, but {cfg.data.dataset} as prepared now holds {have[0]} classes of "
                              f"{have[1]}x{have[2]}x{have[3]}: prepare it again as it was")
    # the test split streams from the loader the experts used (FFCV center crops or the cache)
    test = open_split(cfg, "test", dev)
    # the lr search's held-out images (eval.lr_grid): never in a baseline's set, never the test set
    val = None
    if e.lr_grid:
        train, val = holdout(train, e.val_per_class, torch.Generator(device=dev).manual_seed(derive_seed(e.seed, 99, 0)))
    augment = DSA(cfg.augment)
    min_class = min(len(i) for i in train.class_indices())
    n_cls = train.num_classes
    values_per_image = int(np.prod(train.images.shape[1:]))

    # the target's own size, then the rows' common epoch (the protocol), then their batches
    if d is not None:
        storage, same_count, lr = d.storage_bytes(), d.ppc, d.student_lr
    else:
        assert s is not None
        x, y = _image_set_on(s, train, dev, cfg)
        storage = len(x) * values_per_image * s.bytes_per_value
        same_count = max(1, round(len(x) / n_cls))
        lr = s.lr if s.lr is not None else e.lr_real
    storage_per_class = min(storage // (values_per_image * n_cls), min_class)
    if same_count > min_class:  # the smallest class holds fewer real images than the count
        from tqdm import tqdm

        tqdm.write(f"note: the smallest class has {min_class} training image(s): the same-count baseline has "
                   f"{min_class} per class, not {same_count}")
        same_count = min_class
    if val is not None and storage_per_class < storage // (values_per_image * n_cls):
        from tqdm import tqdm

        tqdm.write(f"note: after eval.val_per_class={e.val_per_class} held-out images, the smallest class keeps "
                   f"{min_class}: the equal-storage baseline has {storage_per_class} images per class, not "
                   f"{storage // (values_per_image * n_cls)}")
    setups: list[tuple[str, int | None]] = []
    picks: dict[str, DeviceDataset] = {}  # the coreset rows' fixed sets
    coreset_net: dict[str, Any] | None = None
    if e.baselines:
        setups.append(("random_same_count", same_count))
        # an object smaller than one image per class has no equal-storage real set to compare with
        if storage_per_class >= 1:
            setups.append(("random_same_storage", storage_per_class))
            if e.coresets:
                coreset_net = coreset_rows(cfg, train, storage_per_class, dev, picks)
                setups += [(kind, storage_per_class) for kind in picks]
    per_class = e.samples_per_class  # distilled samples per class per epoch
    per_epoch = None  # examples per epoch of every row (None: one pass over its own set)
    if e.protocol == "equal_steps":
        per_class = max([e.samples_per_class, d.ppc if d is not None else 0, *(n for _, n in setups if n)])
        per_epoch = n_cls * per_class
    own: list[tuple[str, Batches]] = []  # what the students of the target itself train on
    if d is not None:
        if e.fresh_samples:
            for soft in ([True] if d.soft_labels is not None else []) + [False]:
                own.append(("d3_soft" if soft else "d3", distilled_batches(d, per_class, e.batch_size,
                                                                           e.decoder_bn, soft=soft)))
        else:  # one fixed draw (seed eval.seed), what `d3fast export --format pt` writes
            x, y, soft_y = draw_set(d, e.samples_per_class, e.seed, e.decoder_bn, e.batch_size)
            if soft_y is not None:
                own.append(("d3_soft", tensor_batches(x, soft_y, e.batch_size, per_epoch)))
            own.append(("d3", tensor_batches(x, y, e.batch_size, per_epoch)))
    else:
        assert s is not None
        if s.soft_labels is not None:
            own.append(("set_soft", tensor_batches(x, s.soft_labels.to(dev), e.batch_size, per_epoch)))
        own.append(("set", tensor_batches(x, y, e.batch_size, per_epoch)))
    setups = [(name, None) for name, _ in own] + setups

    def own_lr(count: int | None) -> float:  # the target's rows: its lr; random real: eval.lr_real
        return lr if count is None else e.lr_real

    def candidates(count: int | None) -> list[float]:  # a row's lrs: its own, and eval.lr_grid's
        return sorted({*e.lr_grid, own_lr(count)}) if e.lr_grid else [own_lr(count)]

    total = len(e.archs) * sum(e.students + (len(candidates(n)) if e.lr_grid else 0) for _, n in setups)
    bar = progress_bar(total=total, desc="evaluate", unit="student", disable=not progress, dynamic_ncols=True)
    run_key = str(Path(target.name).resolve())
    with ledger.track("evaluate", cfg.data.dataset, cfg.preset, dev, steps_target=total, run=run_key) as meter:
        results: dict[str, Any] = {}
        for a, arch in enumerate(e.archs):
            results[arch] = {}
            for r, (kind, count) in enumerate(setups):
                def batches_of(g: torch.Generator, count: int | None = count, kind: str = kind) -> Batches:
                    if count is None:
                        return dict(own)[kind]
                    real = picks[kind] if kind in picks else real_subset(train, count, g)
                    return tensor_batches(real.images, real.labels, e.batch_size, per_epoch, real.normalize)

                def student(seed: int, student_lr: float, on: Any, arch: str = arch, kind: str = kind,
                            batches_of: Callable[[torch.Generator], Batches] = batches_of) -> float:
                    acc = train_and_test(arch, cfg, train, seed, student_lr, batches_of, augment, on)
                    bar.set_postfix_str(f"{arch} {kind} {acc:.1%}", refresh=False)
                    bar.update(1)
                    meter.tick()
                    return acc

                row_lr = own_lr(count)
                searched = {}
                if e.lr_grid:  # one student per candidate, scored on the held-out images
                    for j, cand in enumerate(candidates(count)):
                        searched[cand] = student(derive_seed(e.seed, a, 1_000 + 100 * r + j), cand, val)
                    row_lr = max(searched, key=lambda v: (searched[v], v == row_lr))
                accs = [student(derive_seed(e.seed, a, i), row_lr, test) for i in range(e.students)]
                results[arch][kind] = {
                    "images_per_class": count, "lr": row_lr, "accs": accs,
                    "mean": float(np.mean(accs)), "std": float(np.std(accs)),
                }
                if searched:
                    results[arch][kind]["lr_search"] = {f"{k:g}": v for k, v in searched.items()}
    bar.close()
    report: dict[str, Any] = {
        "run_dir": target.name, "dataset": cfg.data.dataset, "distill_step": target.step,
        "target": "distilled" if d is not None else s.source if s is not None else "?",
        "student_lr": lr, "storage_bytes": storage,
        "images_per_class_equivalent": round(d.images_per_class_equivalent() if d is not None
                                             else storage / (values_per_image * n_cls), 2),
    }
    if coreset_net is not None:
        report["coreset_features"] = coreset_net
    if d is not None:
        report |= {"ppc": d.ppc, "soft_labels": d.soft_labels is not None, "subtasks": len(d.parts)}
    elif s is not None:
        counts = s.per_class(n_cls)
        report |= {"images": len(s.images), "images_per_class": same_count, "per_class_min": min(counts),
                   "per_class_max": max(counts), "soft_labels": s.soft_labels is not None,
                   "lr_from": "the set" if s.lr is not None else "eval.lr_real", "pixels": s.pixels}
    report |= {
        "protocol": {k: getattr(e, k) for k in ("protocol", "students", "epochs", "batch_size", "samples_per_class",
                                                 "fresh_samples", "momentum", "weight_decay", "lr_real", "lr_grid",
                                                 "val_per_class", "decoder_bn", "seed", "soft_temperature")}
                    | {"examples_per_epoch": per_epoch, "steps_per_epoch": None if per_epoch is None
                       else -(-per_epoch // e.batch_size), "samples_per_class_used": per_class},
        "results": results, "device": device_name(dev), "versions": versions(),
        "seconds": round(time.perf_counter() - t0, 1),
        "finished": utc_timestamp(),
    }
    keep_report(target, report)
    return report


# the coreset picks of this process, per (expert file, epoch, dataset, train rows, method): a
# larger k extends an ordering (both methods pick in order, so k rows are the first k of more),
# so `d3fast frontier`'s budgets embed the train set once
_PICKS: dict[tuple[str, ...], list[torch.Tensor]] = {}


def coreset_rows(cfg: Config, train: DeviceDataset, per_class: int, dev: torch.device,
                 into: dict[str, DeviceDataset]) -> dict[str, Any] | None:
    """The coreset baselines of eval.coresets at `per_class` images per class: fills `into`
    with a fixed real subset per method ("herding_same_storage", "kcenter_same_storage"),
    picked per class on the features (the conv stack's output) of the whole-dataset expert at
    distill.soft_label_epoch (d3fast/coresets.py), and returns that network's description;
    None, with a note, when there is no such expert (`d3fast experts` trains it)."""
    from tqdm import tqdm

    from d3fast.coresets import select
    from d3fast.recipes.label import labelling_network

    try:
        net, info = labelling_network(cfg, dev, need="coreset baselines embed the train images with")
    except D3FastError as err:
        tqdm.write(f"note: no coreset rows: {str(err).replace(chr(10), ' ')}; or set eval.coresets=[]")
        return None
    per = train.class_indices()
    # which train rows (the held-out ones left out) the picks index
    fingerprint = hashlib.sha256(torch.cat(per).cpu().numpy().tobytes()).hexdigest()
    features: list[torch.Tensor] | None = None
    for method in cfg.eval.coresets:
        key = (info["expert"], str(info["epoch"]), cfg.data.dataset, fingerprint, method)
        have = _PICKS.get(key)
        if have is None or len(have[0]) < min(per_class, len(per[0])):
            if features is None:
                with torch.no_grad():
                    embed = cast(Callable[[torch.Tensor], torch.Tensor], net.features)
                    features = [torch.cat([embed(train.normalize(train.images[rows]))
                                           for rows in idx.split(512)]) for idx in per]
            have = _PICKS[key] = [idx[select(method, f, min(per_class, len(f))).to(idx.device)]
                                  for idx, f in zip(per, features, strict=True)]
        into[f"{method}_same_storage"] = train.subset(torch.cat([h[:per_class] for h in have]))
    return {"expert": info["expert"], "epoch": info["epoch"], "methods": list(cfg.eval.coresets)}


def _check_writable(target: Target) -> None:
    """The evaluation's folder (and a run's eval.json) can be written: tried before training.

    Raises:
        D3FastError: a file in the way, a read-only or full file system, no permission."""
    from d3fast.io import write_failure

    folder = target.evals_dir
    if folder.exists() and not folder.is_dir():
        raise D3FastError(f"cannot keep the evaluation in {folder}: it is a file (--evals-dir names a folder)")
    for place in [folder] + ([target.run.path] if target.run is not None else []):
        try:
            place.mkdir(parents=True, exist_ok=True)
            probe = place / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise (write_failure(place / "x", e) or D3FastError(f"cannot write in {place}: {e}")) from None


def keep_report(target: Target, report: dict[str, Any]) -> Path:
    """Keep the report as evals/<UTC time>-<archs>.json (never replacing an earlier one: a
    name taken gets -2, -3, ...) and add it to evals/index.json under a lock, so two
    evaluations of one target are both kept. A run also gets eval.json and eval.md (the
    latest, what `d3fast runs` shows)."""
    folder = target.evals_dir
    folder.mkdir(parents=True, exist_ok=True)
    stamp = utc_file_stamp()
    archs = "+".join(report["results"])
    text = json.dumps(report, indent=2)
    for k in range(1, 10_000):
        path = folder / f"{stamp}-{archs}{'' if k == 1 else f'-{k}'}.json"
        try:
            with open(path, "x") as f:  # exclusive: two evaluations never share a name
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            break
        except FileExistsError:
            continue
    with locked(folder / ".index.lock", wait=True):
        index = read_json(folder / "index.json", "evaluation index") if (folder / "index.json").is_file() else []
        if not isinstance(index, list):
            raise D3FastError(f"{folder / 'index.json'} is not an evaluation index; move it away")
        index.append({"file": path.name, "finished": report["finished"], "archs": list(report["results"]),
                      "summary": summary_line(report), "distill_step": report["distill_step"]})
        atomic_write_json(folder / "index.json", index)
    if target.run is not None:
        atomic_write_json(target.run.eval_json_path, report)
        atomic_write_text(target.run.eval_md_path, markdown(report))
        _to_trackers(target, report)
    return path


def _to_trackers(target: Target, report: dict[str, Any]) -> None:
    """The table and the mean accuracies to the run's trackers (log.trackers), at its step."""
    if not target.cfg.log.trackers or target.run is None:
        return
    from d3fast.trackers import for_run

    try:
        trackers = for_run(target.cfg, target.run)
    except D3FastError as e:
        from tqdm import tqdm

        tqdm.write(f"warning: the evaluation is not sent to the trackers: {e}")
        return
    step = int(report["distill_step"] or 0)
    with trackers:
        trackers.text("eval", markdown(report), step)
        trackers.metrics(step, {f"eval/{arch}/{kind}": v["mean"] for arch, kinds in report["results"].items()
                                for kind, v in kinds.items()})
















# keys `evaluate`, `sample` and `export` may change on a recorded configuration (a run's, an
# export's): the protocol and where the real data streams from, never what was distilled
PROTOCOL_SECTIONS = ("eval.",)
PROTOCOL_KEYS = ("data.loader", "data.workers", "device")


def protocol_config(base: Config | None, dataset: str | None, preset: str | None,
                    overrides: tuple[str, ...] | list[str], where: str) -> Config:
    """The config an evaluation of `where` uses. With a recorded config (`base`): its own,
    the eval.* keys of `preset` over it, then `overrides`, which may only touch eval.*,
    data.loader, data.workers and device. Without one (a set from other code): the
    dataset's (or `preset`'s) config with `overrides`, like a new run's.

    Raises:
        D3FastError: no dataset for a foreign set, a key outside the protocol for a recorded
            config, another dataset than the recorded one, unknown keys or bad values.
    """
    from d3fast.config import apply_updates, load_preset, parse_overrides, resolve_config, validate

    if base is None:
        if not dataset and not preset:
            raise D3FastError(f"{where} does not say which dataset it distils: pass --dataset (or --preset)")
        return resolve_config(dataset, preset, overrides)
    if dataset and dataset != base.data.dataset:
        raise D3FastError(f"{where} was distilled from {base.data.dataset}, not {dataset}")
    cfg = base
    if preset:
        apply_updates(cfg, {"eval": load_preset(preset).get("eval", {})}, "", from_string=False)
    updates = parse_overrides(overrides)
    for section, values in updates.items():
        for key in values if isinstance(values, dict) else [None]:
            dotted = section if key is None else f"{section}.{key}"
            if not (dotted.startswith(PROTOCOL_SECTIONS) or dotted in PROTOCOL_KEYS):
                raise D3FastError(f"--set {dotted}: {where} keeps its recorded configuration; only eval.* keys, "
                                  f"{', '.join(PROTOCOL_KEYS)} can change here")
    apply_updates(cfg, updates, "", from_string=True)
    validate(cfg)
    return cfg


def open_target(where: str, runs_dir: str, dataset: str | None = None, preset: str | None = None,
                overrides: tuple[str, ...] | list[str] = (), device: torch.device | str = "cpu",
                evals_dir: str | None = None, config_optional: bool = False) -> Target:
    """What `d3fast evaluate WHERE` evaluates: a run or merged directory (or `latest`), a
    d3fast safetensors export, a `.pt` image set (a file or a folder holding images.pt) or an
    ImageFolder of images. Evaluations are kept in the run's evals/, else in
    `<where>.evals/` beside it (never inside an ImageFolder, where it would be a class).

    With `config_optional` (export, sample), a run whose config is lost still opens, on the
    default protocol of its dataset, with a note.

    Raises:
        D3FastError: nothing usable at `where`, or a config that cannot be resolved.
    """
    from d3fast.config import Config, apply_updates, resolve_config
    from d3fast.exports import is_image_set, load, read_image_set

    path = Path(where)
    if where == "latest" or (path.is_dir() and Run(path).recorded()):
        run = Run.open(where, runs_dir, dataset)  # `latest --dataset X`: the latest run of X
        try:
            recorded_cfg = run.read_config()
        except D3FastError as e:
            if not config_optional:
                raise
            from tqdm import tqdm

            tqdm.write(f"note: {e}; using the default protocol instead")
            recorded_cfg = resolve_config(dataset or run.read_manifest().get("dataset"))
        cfg = protocol_config(recorded_cfg, dataset, preset, overrides, str(run.path))
        return run_target(run, device, cfg, Path(evals_dir) if evals_dir else None)
    if not path.exists():
        raise D3FastError(f"{where} not found: name a run directory, `latest`, a d3fast export (.safetensors), "
                          "a .pt image set or an ImageFolder")
    kept = Path(evals_dir) if evals_dir else path.with_name((path.stem if path.is_file() else path.name) + ".evals")

    def recorded(info: dict[str, Any]) -> Config | None:
        if not isinstance(info.get("config"), dict):
            return None
        cfg = Config()
        apply_updates(cfg, info["config"], "", from_string=False)
        return cfg

    if path.is_file() and path.suffix == ".safetensors":
        from d3fast.io import load_metadata

        info = load_metadata(path, "distilled export")
        d = load(path, device)
        cfg = protocol_config(recorded(info), dataset or info.get("dataset"), preset, overrides, where)
        return Target(where, kept, cfg, d=d, step=info.get("step"))
    if is_image_set(path):
        s = read_image_set(path)
        cfg = protocol_config(recorded(s.info), dataset or s.info.get("dataset"), preset, overrides, where)
        return Target(where, kept, cfg, images=s, step=s.info.get("step"))
    raise D3FastError(f"{where} is neither a run directory, a d3fast export, a .pt image set nor an ImageFolder")


def command(target: Target, archs: str | Sequence[str] | None = None, students: int | None = None,
            epochs: int | None = None, device: str | None = None, loader: str | None = None,
            progress: bool = True) -> dict[str, Any]:
    """`d3fast evaluate` on an opened target: its protocol with these flags over it, the
    table printed, the report returned (and kept: `keep_report`). `archs`: a list, or
    comma-separated as on the command line.

    Raises:
        D3FastError: what `evaluate` raises; a flag out of range."""
    over: dict[str, Any] = {}
    if isinstance(archs, str):  # "convnet,resnet18" as on the command line
        archs = [a.strip() for a in archs.split(",") if a.strip()]
    if archs:
        over["archs"] = list(archs)
    if students is not None:
        over["students"] = students
    if epochs is not None:
        over["epochs"] = epochs
    updates: dict[str, Any] = {"eval": over} if over else {}
    if loader is not None:
        updates["data"] = {"loader": loader}
    _with(target.cfg, updates or None)
    report = evaluate(target, resolve_device(device or "auto"), progress=progress)
    click.echo(rendered(report))
    kept = target.evals_dir
    click.echo(f"kept in {kept}/ (index.json lists every evaluation)"
               + (f"; latest in {target.run.eval_md_path}" if target.run is not None else "")
               + f" ({report['seconds']:.0f} s)")
    return report


def distilled_target(where: str, runs_dir: str, dataset: str | None, preset: str | None,
                     overrides: tuple[str, ...] | list[str], what: str) -> Target:
    """The distilled object `sample` or `export` (`what`) reads: a run, merged directory or
    .safetensors export, with its recorded config (if any) under these keys.

    Raises:
        D3FastError: nothing there, or a fixed image set (no distribution to draw from)."""
    t = open_target(where, runs_dir, dataset, preset, overrides, config_optional=True)
    if t.d is None:
        raise D3FastError(f"{what} needs a distilled object (a run, merged directory or .safetensors export); "
                          f"{where} is a fixed image set")
    return t
