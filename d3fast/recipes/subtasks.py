"""`d3fast merge`: the S subtask runs of one dataset as one distilled object (docs/algorithm.md
section 9; the reference's `eval_federated.py` re-assembles its subtasks the same way).

The merged directory is run-shaped, so `evaluate`, `sample` and `export` read it as they read
a run:

    <out>/
        config.json          the dataset's config with data.subtask = -1 (every class)
        manifest.json        the runs merged: path, subtask, step, checkpoint sha256
        merged.safetensors   every part's latents, decoder and lr, the soft labels (d3fast/distilled.py)

It is written under a temporary name and swapped in whole. While merging, every source
run's lock is held, so a run still distilling is refused and none starts mid-merge.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
import torch

from d3fast.config import Config
from d3fast.distilled import Distilled, Merged
from d3fast.errors import D3FastError
from d3fast.io import (
    lock_holder,
    locked,
    sha256_file,
)
from d3fast.run import Run, is_merged_dir, read_merged_manifest, write_merged
from d3fast.runtime import resolve_device

# what every part must share: the runs of one subtask split of one distillation setup
SAME_KEYS = ("data.dataset", "data.subtasks", "data.zca", "data.zca_eps", "distill.ppc", "distill.decoder",
             "distill.decoder_width", "distill.decoder_linear", "distill.z_dim", "distill.dtype", "net.name")


def _key(cfg: Config, dotted: str) -> Any:
    section, name = dotted.split(".")
    return getattr(getattr(cfg, section), name)


def check_parts(runs: list[Run], configs: list[Config]) -> None:
    """One run per subtask of one split, all of the same setup.

    Raises:
        D3FastError: naming the runs: other datasets or settings, a run that is not a
            subtask run, two runs of one subtask, or subtasks missing.
    """
    if not runs:
        raise D3FastError("name the subtask runs to merge")
    first = configs[0]
    for run, cfg in zip(runs, configs, strict=True):
        if run.merged_path.exists():
            raise D3FastError(f"{run.path} is a merged object, not a subtask run")
        if cfg.data.subtasks < 2 or cfg.data.subtask < 0:
            raise D3FastError(f"{run.path} distills all of {cfg.data.dataset} (data.subtasks={cfg.data.subtasks}): "
                              "only runs of one subtask each are merged")
        diff = [f"{k}: {_key(first, k)!r} vs {_key(cfg, k)!r}" for k in SAME_KEYS if _key(first, k) != _key(cfg, k)]
        if diff:
            raise D3FastError(f"{runs[0].path} and {run.path} are not parts of one distillation ({'; '.join(diff)})")
    by_block: dict[int, list[Path]] = {}
    for run, cfg in zip(runs, configs, strict=True):
        by_block.setdefault(cfg.data.subtask, []).append(run.path)
    twice = {i: paths for i, paths in by_block.items() if len(paths) > 1}
    if twice:
        i, paths = min(twice.items())
        raise D3FastError(f"subtask {i} is given twice ({', '.join(map(str, paths))}): name one run per subtask")
    missing = [i for i in range(first.data.subtasks) if i not in by_block]
    if missing:
        raise D3FastError(f"subtask(s) {', '.join(map(str, missing))} of {first.data.subtasks} are missing: distill "
                          f"them (d3fast distill --dataset {first.data.dataset} --subtasks {first.data.subtasks} "
                          f"--subtask {missing[0]} ...) and name every run")


def check_out(out: str | Path, parts: Sequence[Path], force: bool) -> Path:
    """`out` as a merge may write it: a new or empty directory, or (with `force`) an older
    merged object; never a run, a folder holding runs or one inside a run.

    Raises:
        D3FastError: naming what `out` is and what to do instead."""
    if not str(out).strip():
        raise D3FastError("--out is empty: name the directory of the merged object")
    out = Path(out)
    full = out.resolve()
    for part in parts:
        p = part.resolve()
        if full == p or full in p.parents:
            raise D3FastError(f"--out {out} {'is' if full == p else 'holds'} the run {part} being merged: choose "
                              "another directory")
    for above in [full, *full.parents]:
        if Run(above).config_path.is_file() and not is_merged_dir(above) and (above != full or out.exists()):
            raise D3FastError(f"--out {out} {'is' if above == full else 'is inside'} the run {above}: choose a "
                              "directory outside every run")
    if out.exists() and not out.is_dir():
        raise D3FastError(f"--out {out} is a file: name a directory")
    if out.exists() and any(out.iterdir()):
        if not is_merged_dir(out):
            raise D3FastError(f"{out} exists and holds other files (not a merged object): choose another --out")
        if not force:
            raise D3FastError(f"{out} holds a merged object already: pass --force to replace it")
    return out


def up_to_date(out: Path, run_dirs: Sequence[Path]) -> bool:
    """Whether `out` holds the merge of exactly these runs at their current checkpoints."""
    if not is_merged_dir(out):
        return False
    try:
        manifest = read_merged_manifest(Run(out))
    except D3FastError:
        return False
    have = [(s.get("run"), s.get("checkpoint_sha256")) for s in manifest.get("sources", [])]
    now = [(str(Path(r).resolve()), sha256_file(Run(r).checkpoint_path)) for r in run_dirs]
    return sorted(map(str, have)) == sorted(map(str, now))


def merge_runs(
    run_dirs: Sequence[str | Path], out: str | Path, *, partial: bool = False, soft_labels: bool | None = None,
    force: bool = False, device: torch.device | str = "cpu", runs_dir: str = "runs", train_labeller: bool = False,
) -> tuple[Merged, Path]:
    """Merge the subtask runs `run_dirs` into the directory `out`; returns the object and `out`.
    `soft_labels` (None: as the runs' distill.soft_labels) labels the merged object with a
    whole-dataset expert (d3fast/soft_labels.py), trained first when missing if
    `train_labeller` (once the parts are known to merge).

    Raises:
        D3FastError: the parts do not make one object (check_parts), a run still
            distilling, stopped before its distill.steps (unless `partial`), or holding NaN
            or inf; `out` is not a new or empty directory or (with `force`) an older merged
            object (check_out).
    """
    runs = [Run.open(str(p), runs_dir) for p in run_dirs]
    seen: dict[Path, Path] = {}
    for run in runs:
        if run.path.resolve() in seen:
            raise D3FastError(f"{run.path} is given twice: name each subtask's run once")
        seen[run.path.resolve()] = run.path
    out = check_out(out, [r.path for r in runs], force)
    with contextlib.ExitStack() as held:
        for run in runs:  # a run distilling now holds its lock: refused, and none starts until we are done
            if not held.enter_context(locked(run.lock_path)):
                raise D3FastError(f"{run.path} is still distilling (pid {lock_holder(run.lock_path)}): merge it "
                                  "when it has finished")
        configs = [r.read_config() for r in runs]
        check_parts(runs, configs)
        order = sorted(range(len(runs)), key=lambda k: configs[k].data.subtask)
        runs, configs = [runs[k] for k in order], [configs[k] for k in order]
        parts: list[Distilled] = []
        sources = []
        for run, cfg in zip(runs, configs, strict=True):
            d, step = run.load_distilled(device)
            assert isinstance(d, Distilled)  # check_parts refused merged directories
            if step < cfg.distill.steps and not partial:
                raise D3FastError(f"{run.path} stopped at step {step} of {cfg.distill.steps}: continue it with "
                                  f"`d3fast distill --resume {run.path}`, or merge what it has with --partial")
            d.soft_labels = None  # a part's labels are not the merged object's
            parts.append(d)
            sources.append({"run": str(run.path.resolve()), "subtask": cfg.data.subtask, "step": step,
                            "steps": cfg.distill.steps, "checkpoint_sha256": sha256_file(run.checkpoint_path)})
        merged = Merged.of(parts, sources=sources)
        cfg = copy.deepcopy(configs[0])
        cfg.data.subtask = -1
        if soft_labels is not None:
            cfg.distill.soft_labels = soft_labels
        label_info = None
        if cfg.distill.soft_labels:
            from d3fast.recipes.label import ensure_labelling_expert, label

            if train_labeller:
                ensure_labelling_expert(cfg)
            label_info = label(merged, cfg, torch.device(device))
        write_merged(out, merged, cfg, label_info, torch.device(device))
    return merged, out








def command(run_dirs: Sequence[str], out: str, partial: bool = False, soft_labels: bool | None = None,
            force: bool = False, device: str | None = None, runs_dir: str = "runs") -> Merged:
    """`d3fast merge`: `merge_runs`, the whole-dataset labelling expert trained when the
    labels need it, and one line saying what was merged.

    Raises:
        D3FastError: what `merge_runs` raises."""
    merged, path = merge_runs(list(run_dirs), out, partial=partial, soft_labels=soft_labels, force=force,
                              device=resolve_device(device or "auto"), runs_dir=runs_dir, train_labeller=True)
    steps = ", ".join(str(s["step"]) for s in merged.sources)
    click.echo(f"merged {len(merged.parts)} subtasks (steps {steps}) into {path}: {merged.num_classes} classes x "
               f"{merged.ppc} priors, {merged.storage_bytes() / 2**20:.2f} MiB (= "
               f"{merged.images_per_class_equivalent():.2f} uint8 images per class)"
               + ("; soft labels" if merged.soft_labels is not None else ""))
    return merged
