"""A distillation run's directory: the one owner of its files.

    runs/<dataset>/<time>-<name>/
        config.json     the run's config now (rewritten when a resume changes a key)
        manifest.json   what the run started with: versions, device, seeds, experts
        history.jsonl   one line per segment (start or resume): step, time, command, and
                        the keys it changed as [old, new]; the start line also holds the
                        whole config and manifest, so either file can be rebuilt from it
        .lock           held (flock) by the process distilling in the run
        metrics.jsonl   one line per step (d3fast/recipes/distill.py)
        checkpoint.pt   the TrainState (d3fast/state.py)
        eval.json, eval.md
        soft_labels.safetensors   the checkpoint's soft labels, when labelled (d3fast/soft_labels.py)

A merged object's directory (`d3fast merge`) holds config.json (the dataset's, every
subtask), manifest.json (the runs merged) and merged.safetensors; `load_distilled` reads it
like a run's checkpoint, so evaluate, sample and export take either.

`distill`, `profile`, `evaluate`, `sample` and `export` reach these files only through
`Run`; reading a run's distilled object (`load_distilled`) needs nothing of the training loop.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch
from tqdm import tqdm

from d3fast.config import Config, apply_updates, resume_changes, to_dict, with_recorded_defaults
from d3fast.distilled import Distilled, Merged
from d3fast.errors import D3FastError
from d3fast.exports import export
from d3fast.io import (
    atomic_write_json,
    atomic_write_text,
    file_stamp,
    load_tensors,
    lock_holder,
    locked,
    read_json,
    remove_stale_temps,
    replace_dir,
    save_tensors,
    seal,
    sha256_file,
    temp_dir,
    timestamp,
    unseal,
    write_failure,
)
from d3fast.report import summary_line
from d3fast.runtime import device_name, versions
from d3fast.state import TrainState, distilled_problems, load_checkpoint, save_checkpoint


class Run:
    """A run directory; `create` a new one, `open` an existing one, or `at` a given path."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    @property
    def history_path(self) -> Path:
        return self.path / "history.jsonl"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def lock_path(self) -> Path:
        return self.path / ".lock"

    @property
    def checkpoint_path(self) -> Path:
        return self.path / "checkpoint.pt"

    # ---- finding runs

    @classmethod
    def create(cls, runs_dir: str | os.PathLike, cfg: Config, name: str | None = None) -> Run:
        """A new, empty directory runs_dir/<dataset>/<time>-<name>. The directory is claimed
        with an exclusive mkdir, so runs started in the same second get distinct ones."""
        parent = runs_folder(runs_dir, cfg.data.dataset)
        stem = f"{file_stamp()}-{name or cfg.preset or 'run'}"
        for suffix in range(10_000):
            path = parent / (stem if suffix == 0 else f"{stem}-{suffix}")
            try:
                path.mkdir()
            except FileExistsError:
                continue
            return cls(path)
        raise D3FastError(f"could not create a run directory under {parent}")

    @classmethod
    def at(cls, path: str | os.PathLike) -> Run:
        """The run at `path`, created when missing (tests, `d3fast profile`'s scratch run)."""
        run = cls(path)
        run.path.mkdir(parents=True, exist_ok=True)
        return run

    @classmethod
    def open(cls, where: str | os.PathLike, runs_dir: str | os.PathLike = "runs", dataset: str | None = None) -> Run:
        """An existing run: a directory holding config.json, or `latest` (the run under
        `runs_dir` whose checkpoint was written last).

        Raises:
            D3FastError: not a run directory, or no run with a checkpoint under runs_dir.
        """
        if str(where) == "latest":
            return cls.latest(runs_dir, dataset)
        if not str(where).strip():
            raise D3FastError("no run given: name a run directory or `latest`")
        run = cls(where)
        if not run.recorded():
            raise D3FastError(f"{run.path} is not a run directory (no config.json)")
        return run

    @classmethod
    def named(cls, runs_dir: str | os.PathLike, dataset: str, name: str) -> Run | None:
        """The newest started run of `dataset` created with `--name name`, or None (what
        `--resume auto` continues: a job restarted by torchrun or a scheduler finds its run)."""
        pattern = re.compile(rf"^\d{{8}}-\d{{6}}-{re.escape(name)}(-\d+)?$")
        found = sorted(p for p in (Path(runs_dir) / dataset).glob("*") if pattern.match(p.name) and cls(p).recorded())
        return cls(found[-1]) if found else None

    @classmethod
    def latest(cls, runs_dir: str | os.PathLike = "runs", dataset: str | None = None) -> Run:
        """The run (or merged object) under `runs_dir` (of `dataset`, when given) whose
        checkpoint (or export) was written last."""
        ds = dataset or "*"
        found = sorted([*Path(runs_dir).glob(f"{ds}/*/checkpoint.pt"), *Path(runs_dir).glob(f"{ds}/*/merged.safetensors")],
                       key=lambda p: p.stat().st_mtime)
        if not found:
            raise D3FastError(f"no runs with a checkpoint under {runs_dir}/{dataset + '/' if dataset else ''}")
        return cls(found[-1].parent)

    # ---- config, manifest, history

    def recorded(self) -> bool:
        """Whether the run has been started: its config is on disk or can be rebuilt."""
        return self.config_path.exists() or self.history_path.exists()

    def read_config(self) -> Config:
        """The run's config as recorded (unknown keys and wrong types are errors). A missing
        or corrupt config.json is rebuilt from history.jsonl (the start config plus every
        recorded change), with a note.

        Raises:
            D3FastError: config.json unusable and history.jsonl holds no config.
        """
        cfg = Config()
        recorded = self._recorded("config", self.config_path, self._config_from_history)
        apply_updates(cfg, with_recorded_defaults(recorded), "", from_string=False)
        return cfg

    def read_manifest(self) -> dict[str, Any]:
        """manifest.json, rebuilt from history.jsonl's start line when missing or corrupt."""
        return self._recorded("manifest", self.manifest_path, lambda: self._start_record().get("manifest"),
                              sealed=True)

    def _recorded(self, what: str, path: Path, rebuild: Callable[[], Any], sealed: bool = False) -> Any:
        if not path.is_file():
            problem = "is missing" if not path.exists() else "is not a file"
        else:
            try:
                value = json.loads(path.read_bytes())
                if sealed:
                    value = unseal(value, f"run {what}", path)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                problem = f"is corrupt ({e})"
            except D3FastError:
                problem = "was changed after d3fast wrote it"
            else:
                if isinstance(value, dict):
                    return value
                problem = f"holds a JSON {type(value).__name__}, not a mapping"
        value = rebuild() if self.history_path.exists() else None
        if not isinstance(value, dict):
            raise D3FastError(f"{path} {problem}, and history.jsonl does not record the run's {what} to rebuild it: "
                              "this run cannot be resumed (its checkpoint still exports with `d3fast export`)")
        atomic_write_json(path, seal(value) if sealed else value)
        tqdm.write(f"note: {path} {problem}; rebuilt it from {self.history_path}")
        return value

    def _start_record(self) -> dict[str, Any]:
        return next((r for r in self.history() if r.get("event") == "start"), {})

    def _config_from_history(self) -> dict[str, Any] | None:
        records = self.history()
        starts = [i for i, r in enumerate(records) if r.get("event") == "start" and "config" in r]
        if not starts:
            return None
        config = copy.deepcopy(records[starts[-1]]["config"])
        for record in records[starts[-1] + 1 :]:
            for key, (_, new) in record.get("changes", {}).items():
                *section, name = key.split(".")
                (config[section[0]] if section else config)[name] = new
        return config

    def start(self, cfg: Config, manifest: dict[str, Any]) -> None:
        """Record a new run: config, manifest, and the first history line (which holds both)."""
        atomic_write_json(self.config_path, to_dict(cfg))
        atomic_write_json(self.manifest_path, seal(manifest))
        self._history({"event": "start", "step": 0, "changes": {}, "config": to_dict(cfg), "manifest": manifest},
                      fresh=True)

    def resume(self, cfg: Config, step: int, changes: dict[str, list[Any]], world_size: int = 1) -> None:
        """Record a resume at `step` with the `changes` that `check_resume(cfg)` returned:
        config.json when a key changed, and a history line (with the processes it runs on)."""
        if changes:
            atomic_write_json(self.config_path, to_dict(cfg))
        self._history({"event": "resume", "step": step, "changes": changes, "world_size": world_size})

    def check_resume(self, cfg: Config) -> dict[str, list[Any]]:
        """The keys `cfg` changes against the run's config as its history records it (the
        start config plus every recorded change; config.json for runs without one), so an
        edit of config.json is a change like a --set: applied and recorded, or refused.

        Raises:
            D3FastError: a key that a resumed run cannot change.
        """
        from_history = self._config_from_history()
        if from_history is None:
            recorded = self.read_config()
        else:
            recorded = Config()
            apply_updates(recorded, with_recorded_defaults(from_history), "", from_string=False)
        return resume_changes(recorded, cfg)

    def history(self) -> list[dict[str, Any]]:
        """The history's records, each checked against its seal.

        Raises:
            D3FastError: a line that is not JSON or was changed after it was written.
        """
        return [unseal(r, f"line {i + 1} of", self.history_path) for i, r in enumerate(_read_jsonl(self.history_path))]

    def _history(self, record: dict[str, Any], fresh: bool = False) -> None:
        record = {"time": timestamp(), **record, "command": _command()}
        lines = [] if fresh else self.history()
        if not fresh and not any(r.get("event") == "start" and "config" in r for r in lines):
            # a lost or emptied history: start it again from the files it backs up
            lines.insert(0, {"event": "start", "rebuilt": True, "step": 0, "changes": {},
                             "config": to_dict(self.read_config()), "manifest": self.read_manifest()})
        text = "".join(json.dumps(seal(r)) + "\n" for r in [*lines, record])
        atomic_write_text(self.history_path, text)

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the run exclusively while distilling in it: an flock on `.lock`, which the
        OS releases when the process ends, however it ends.

        Raises:
            D3FastError: another process holds it (its pid is named).
        """
        with locked(self.lock_path) as held:
            if not held:
                raise D3FastError(f"{self.path} is in use by another d3fast process (pid "
                                  f"{lock_holder(self.lock_path)}); wait for it to finish or stop it first")
            # holding the run: a temporary of a writer that is gone (a checkpoint or metrics file
            # half-written when its process died) is nobody's
            remove_stale_temps(self.path)
            yield

    # ---- state

    def has_checkpoint(self) -> bool:
        return self.checkpoint_path.exists()

    def save_state(self, state: TrainState) -> None:
        """Checkpoint `state`, atomically; unusable state is refused (DivergedError) and the
        last good checkpoint stays as it was. When the run's first checkpoint fails (a full
        disk, a size limit), the history says so: a --resume then knows that no progress was
        kept to lose and starts from step 0 (`FIRST_CHECKPOINT_FAILED`)."""
        had = self.has_checkpoint()
        try:
            save_checkpoint(self.checkpoint_path, state)
        except BaseException:
            if not had and not self.has_checkpoint():
                with contextlib.suppress(Exception):  # the write failure is the error to report
                    self._history({"event": FIRST_CHECKPOINT_FAILED, "step": int(state.step)})
            raise

    def load_state(self, device: torch.device | str = "cpu") -> dict[str, Any]:
        return load_checkpoint(self.checkpoint_path, device)

    @property
    def merged_path(self) -> Path:
        return self.path / "merged.safetensors"

    @property
    def soft_labels_path(self) -> Path:
        return self.path / "soft_labels.safetensors"

    @property
    def eval_json_path(self) -> Path:
        return self.path / "eval.json"

    @property
    def eval_md_path(self) -> Path:
        return self.path / "eval.md"

    def relabelled(self, merged: Merged, cfg: Config, info: dict[str, Any]) -> None:
        """The merged object of this directory, labelled (`info`: the labels' provenance),
        written back in place: the export, config.json and the manifest, each atomically."""
        old = read_merged_manifest(self)
        export(merged, self.merged_path)
        cfg.distill.soft_labels = True
        atomic_write_json(self.config_path, to_dict(cfg))
        keep: dict[str, Any] = {k: old[k] for k in ("device", "versions", "created") if k in old}
        atomic_write_json(self.manifest_path, merged_manifest(merged, cfg, info, self.merged_path, {
            **keep, "labelled": timestamp()}))

    def load_distilled(self, device: torch.device | str = "cpu",
                       dtype: torch.dtype | None = torch.float32) -> tuple[Distilled | Merged, int]:
        """(distilled object, step) of the latest checkpoint (the config is not needed), with
        its soft labels when the run has them for that step; for a merged directory, the
        merged object and the lowest step of its parts. In `dtype`: float32 (what evaluation,
        sampling, exports and merges use, and the storage counts) by default, whatever the
        run computed in; None keeps the checkpoint's (float64 after distill.dtype=float64).
        An object of distill.storage float16/int8/int4 comes as stored (`Distilled.stored`).

        Raises:
            D3FastError: no or a corrupt checkpoint, a distilled object holding NaN or inf,
                soft labels of another step.
        """
        if self.merged_path.exists():
            from d3fast.exports import load
            from d3fast.io import verify_sha256
            digest = read_merged_manifest(self).get("merged_sha256")
            if digest is not None:  # a flipped byte anywhere in the file is refused, not decoded
                verify_sha256(self.merged_path, digest, "merged object", "merge the subtask runs again "
                              "(d3fast merge ... --out DIR --force)")
            merged = load(self.merged_path, device)
            for part in merged.parts:
                problem = distilled_problems(part)
                if problem is not None:
                    raise D3FastError(f"{self.merged_path} cannot be used: {problem[0]} ({problem[1]})")
            return merged, min((int(s.get("step", 0)) for s in getattr(merged, "sources", [])), default=0)
        state = self.load_state(device)
        d = Distilled.from_state_dict(state, device, dtype)
        problem = distilled_problems(d)
        if problem is not None:
            what, detail = problem
            raise D3FastError(
                f"the checkpoint of {self.path} (step {state['step']}) cannot be used: {what} ({detail}). "
                "Start a new run with lower learning rates"
            )
        labels = self.load_labels(int(state["step"]), d.num_priors)
        d.soft_labels = None if labels is None else labels.to(device)
        # the object as stored (distill.storage): the checkpoint holds the float32 masters
        return (d.stored() if d.storage != "float32" else d), int(state["step"])

    # ---- soft labels (d3fast/soft_labels.py makes them)

    def save_labels(self, labels: torch.Tensor, step: int, info: dict[str, Any]) -> Path:
        """The soft labels of a run's checkpoint at `step`, beside it (safetensors, atomic)."""
        path = self.soft_labels_path
        save_tensors(path, {"soft_labels": labels.detach().cpu().contiguous()}, {"step": step, **info})
        return path


    def load_labels(self, step: int, priors: int) -> torch.Tensor | None:
        """The run's soft labels when they are of checkpoint `step` (None when there are none).

        Raises:
            D3FastError: a damaged file, labels of another step (relabel with `d3fast label`),
                or of another shape.
        """
        path = self.soft_labels_path
        if not path.exists():
            return None
        tensors, meta = load_tensors(path, "soft labels")
        labels = tensors.get("soft_labels")
        if meta.get("step") != step:
            raise D3FastError(f"{path} labels the checkpoint of step {meta.get('step')}, the run is at step {step}: "
                              f"label it again with `d3fast label {self.path}`")
        if labels is None or labels.dim() != 2 or labels.shape[0] != priors or not torch.isfinite(labels).all():
            raise D3FastError(f"{path} does not fit the run's object: label it again with `d3fast label {self.path}`")
        return labels

    # ---- metrics

    @contextmanager
    def metrics(self, step: int) -> Iterator[MetricsWriter]:
        """Append per-step metrics after `step`: lines of later steps (written after the
        checkpoint being resumed) and a torn last line (a crash mid-write) are dropped."""
        keep = [r for r in _read_jsonl(self.metrics_path, torn_ok=True, note=True) if r.get("step", 0) <= step]
        atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in keep))
        with open(self.metrics_path, "a") as f:
            yield MetricsWriter(f, self.metrics_path)

    def read_metrics(self) -> list[dict[str, Any]]:
        return _read_jsonl(self.metrics_path, torn_ok=True)

    def hours_at(self, step: int) -> float:
        """Device-hours the run's metrics record up to `step` (0 before the first)."""
        return next((float(r.get("device_hours", 0.0)) for r in reversed(self.read_metrics())
                     if r.get("step") == step), 0.0)


class MetricsWriter:
    """Appends one JSON line per step, flushed; a full disk is one D3FastError (the line may
    be torn: the next resume drops it)."""

    def __init__(self, f: IO[str], path: Path) -> None:
        self._f, self._path = f, path

    def write(self, record: dict[str, Any]) -> None:
        try:
            self._f.write(json.dumps(record) + "\n")
            self._f.flush()
        except OSError as e:
            raise write_failure(self._path, e) or e from None


def _read_jsonl(path: Path, torn_ok: bool = False, note: bool = False) -> list[dict[str, Any]]:
    """The records of a JSON-lines file ([] when missing). With torn_ok, a last line cut
    short by a crash is dropped; any other bad line is an error naming the file."""
    if not path.exists():
        return []
    try:
        lines = path.read_bytes().splitlines()
    except OSError as e:
        raise D3FastError(f"cannot read {path}: {e.strerror}") from None
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))  # strict: a damaged byte is a damaged line
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
            out.append(record)
        except ValueError:  # JSONDecodeError and UnicodeDecodeError alike
            if torn_ok and i == len(lines) - 1:
                if note:
                    tqdm.write(f"note: dropped the torn last line of {path} (a crash or a full disk mid-write)")
                break
            raise D3FastError(f"{path} line {i + 1} is corrupt; delete or repair that line") from None
    return out


def _command() -> str:
    return " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else ""


def is_locked(path: Path) -> bool:
    """Whether another process holds the flock on `path` (a run's `.lock`), without taking it
    for longer than the test or writing to the file."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


# the files d3fast keeps in a run (or merged) directory
RUN_FILES = frozenset({"config.json", "manifest.json", "history.jsonl", "metrics.jsonl", "checkpoint.pt", ".lock",
                       "merged.safetensors", "soft_labels.safetensors", "eval.json", "eval.md"})


def refuse_run_file(out: str) -> None:
    """--out must not write into a run directory (its files, evals/, tensorboard/, ...).

    Raises:
        D3FastError: naming the run."""
    if not str(out).strip():
        raise D3FastError("--out is empty: name the file or directory to write")
    path = Path(out).absolute()
    if path.name in RUN_FILES and (path.parent / "config.json").is_file():
        raise D3FastError(f"--out {out} is a file of the run {path.parent}: write elsewhere")
    for parent in path.parents:
        if (parent / "config.json").is_file() and ((parent / "checkpoint.pt").exists() or
                                                  (parent / "history.jsonl").exists() or
                                                  (parent / "merged.safetensors").exists()):
            raise D3FastError(f"--out {out} is inside the run {parent}: write elsewhere")


def refuse_overwrite(out: str, force: bool, ours: bool, what: str) -> None:
    """An existing --out file is replaced only with --force, and only when it is d3fast's
    own kind of file (`ours`: an export, a sample grid).

    Raises:
        D3FastError: a directory, or a file that is not d3fast's, or one without --force."""
    path = Path(out)
    if path.is_dir():
        raise D3FastError(f"cannot write {out}: it is a directory ({what} is one file)")
    if path.parent.exists() and not path.parent.is_dir():
        raise D3FastError(f"cannot write {out}: {path.parent} is a file, not a directory")
    if path.exists() or path.is_symlink():
        if not ours:
            raise D3FastError(f"--out {out} exists and is not a d3fast {what}: choose another name "
                              "(d3fast never replaces a file it did not write)")
        if not force:
            raise D3FastError(f"--out {out} holds an earlier {what}: pass --force to replace it")


def is_merged_dir(path: Path) -> bool:
    """Whether `path` holds a merged object (what `--force` may replace)."""
    return (path / "merged.safetensors").is_file() and not (path / "checkpoint.pt").exists()


def read_merged_manifest(run: Run) -> dict[str, Any]:
    """The merged directory's manifest, its seal checked.

    Raises:
        D3FastError: missing, damaged or changed by hand; the fix is the merge command again."""
    fix = "merge the subtask runs again (d3fast merge ... --out DIR --force)"
    try:
        manifest = unseal(read_json(run.manifest_path, "merged manifest"), "merged manifest", run.manifest_path)
    except D3FastError as e:
        raise D3FastError(f"{e}; {fix}") from None
    if not isinstance(manifest, dict) or manifest.get("kind") != "merged":
        raise D3FastError(f"{run.manifest_path} is not a merged object's manifest; {fix}")
    return manifest


def list_runs(runs_dir: str | os.PathLike, dataset: str | None = None) -> list[dict[str, Any]]:
    """Every run and merged object under runs_dir/<dataset>/, oldest first: dataset, preset,
    step and steps, status (running: its lock is held; finished; stopped: before its steps;
    merged; new: no step yet), the MTT term's health at the last step (d3fast/health.py), best
    and last loss, last evaluation (eval.json's summary) and
    device-hours, read from config.json, metrics.jsonl and eval.json (no checkpoint is
    loaded). A damaged file makes that field `?`, never the listing fail."""
    rows = []
    root = Path(runs_dir)
    folders = [p for p in root.glob("*/*") if p.is_dir() and ".tmp-" not in p.name and ".old-" not in p.name
               and (dataset is None or p.parent.name == dataset)]
    for path in sorted(folders, key=lambda p: p.stat().st_mtime):
        run = Run(path)
        merged = run.merged_path.exists()
        if not (run.recorded() or merged):
            continue
        row: dict[str, Any] = {"run": str(path), "name": path.name, "dataset": path.parent.name, "preset": "?",
                               "step": 0, "steps": "?", "status": "?", "best_loss": None, "last_loss": None,
                               "device_hours": None, "hours_unit": "", "last_eval": "", "mtt_health": ""}
        try:
            cfg = json.loads(run.config_path.read_text())
            row["preset"], row["steps"] = cfg.get("preset") or "-", cfg["distill"]["steps"]
            row["dataset"] = cfg["data"]["dataset"]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass
        metrics = []
        try:  # line by line: a damaged line costs itself, not the run's row
            for line in run.metrics_path.read_text().splitlines():
                try:
                    m = json.loads(line)
                except ValueError:
                    continue
                if isinstance(m, dict) and isinstance(m.get("step"), int):
                    metrics.append(m)
        except (OSError, UnicodeDecodeError):
            pass
        losses = [m["loss"] for m in metrics if isinstance(m.get("loss"), int | float)]
        if metrics:
            hours = metrics[-1].get("device_hours")
            row |= {"step": int(metrics[-1]["step"]), "device_hours": hours if isinstance(hours, int | float) else None,
                    "hours_unit": str(metrics[-1].get("hours_unit", "")),
                    "mtt_health": h if isinstance(h := metrics[-1].get("mtt_health"), str) else ""}
        if losses:
            row |= {"best_loss": min(losses), "last_loss": losses[-1]}
        if merged:
            row["status"] = "merged"
        elif is_locked(path / ".lock"):
            row["status"] = "running"
        elif not metrics:
            row["status"] = "new"
        elif (problem := _checkpoint_problem(run.checkpoint_path)) is not None:
            row["status"] = problem  # steps were logged, but no usable state holds them
        else:
            row["status"] = "finished" if row["step"] == row["steps"] else "stopped"
        try:
            row["last_eval"] = summary_line(json.loads((path / "eval.json").read_text()))
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            row["last_eval"] = "?"
        rows.append(row)
    return rows


def runs_folder(runs_dir: str | os.PathLike, dataset: str) -> Path:
    """runs_dir/<dataset>, created when missing.

    Raises:
        D3FastError: a file is in the way (a path through a file is write_failure's)."""
    parent = Path(runs_dir) / dataset
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise D3FastError(f"cannot create runs under {parent}: a file is in the way; move it aside or choose "
                          "another --runs-dir") from None
    return parent


# the history event of a run whose first checkpoint could not be written
FIRST_CHECKPOINT_FAILED = "first checkpoint failed"


def _checkpoint_problem(path: Path) -> str | None:
    """Why `runs` cannot call a run with logged steps finished or stopped: "no checkpoint", or
    "damaged checkpoint" when the file's zip container or a record's CRC-32 fails (torch.save
    writes one per record; a truncated file loses its directory), or torch cannot read it
    back (a flipped byte in the zip directory passes the CRCs). None when it checks out
    (`load_checkpoint` verifies the content digest on use)."""
    import zipfile

    if not path.is_file():
        return "no checkpoint"
    try:
        with zipfile.ZipFile(path) as z:
            if z.testzip() is not None:
                return "damaged checkpoint"
        # torch's own reader over the directory and the pickle (weights only: a pickle that
        # would run code is refused), the tensors memory-mapped, not read
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # zipfile, torch and pickle raise a dozen types for a damaged file
        return "damaged checkpoint"
    return None


def write_merged(out: Path, merged: Merged, cfg: Config, label_info: dict[str, Any] | None, device: torch.device) -> None:
    """A merged directory at `out` (merged.safetensors, config.json, the sealed manifest),
    written beside it and renamed into place whole.

    Raises:
        D3FastError: a failed write (the old `out`, if any, is kept)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out.parent)
    tmp = temp_dir(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        export(merged, tmp / "merged.safetensors")
        atomic_write_json(tmp / "config.json", to_dict(cfg))
        atomic_write_json(tmp / "manifest.json", merged_manifest(merged, cfg, label_info, tmp / "merged.safetensors", {
            "device": device_name(device), "versions": versions(), "created": timestamp()}))
        replace_dir(tmp, out)
    except OSError as e:
        raise write_failure(Path(getattr(e, "filename", None) or tmp), e) or e from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def merged_manifest(merged: Merged, cfg: Config, label_info: dict[str, Any] | None, export_path: Path,
              extra: dict[str, Any]) -> dict[str, Any]:
    """The merged directory's manifest, sealed; `merged_sha256` is checked on every read."""
    return seal({
        "kind": "merged", "dataset": cfg.data.dataset, "subtasks": len(merged.parts), "sources": merged.sources,
        "classes": merged.num_classes, "ppc": merged.ppc, "storage_bytes": merged.storage_bytes(),
        "images_per_class_equivalent": merged.images_per_class_equivalent(), "soft_labels": label_info,
        "merged_sha256": sha256_file(export_path), **extra,
    })
