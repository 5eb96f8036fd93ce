"""Optional metric trackers beside metrics.jsonl (which stays the source of truth): the
metrics stream of every distillation step, a sample grid every log.sample_every steps and
the evaluation table, sent to TensorBoard, Weights & Biases or MLflow (`--log
tensorboard,wandb,mlflow`, config log.trackers). Each is its own optional dependency, and
each works offline:

    tensorboard  event files in <run>/tensorboard/ (torch.utils.tensorboard; pip install tensorboard)
    wandb        offline mode unless $WANDB_MODE says otherwise, files in <run>/wandb/
                 (`wandb sync` uploads them later); the run id is the run directory's name,
                 so a resumed run continues the same W&B run
    mlflow       a file store in <run>/mlruns/ unless $MLFLOW_TRACKING_URI names another
                 (MLflow 3 refuses file stores unless MLFLOW_ALLOW_FILE_STORE=true: d3fast sets it)

A tracker that fails while logging is closed with one warning: the run goes on. So is one
whose background thread fails (TensorBoard's event writer): a thread of a tracker's package
reaches `threading.excepthook` as that same one warning, never as a traceback.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from d3fast.config import TRACKERS as TRACKER_NAMES
from d3fast.errors import D3FastError

TRACKERS = {name: name for name in TRACKER_NAMES}  # tracker -> the package it needs


def check_available(names: Sequence[str]) -> None:
    """Raises D3FastError naming the pip command for each requested tracker not installed."""
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise D3FastError(f"unknown tracker(s) {', '.join(unknown)}; known: {', '.join(TRACKERS)}")
    missing = [TRACKERS[n] for n in names if importlib.util.find_spec(TRACKERS[n]) is None]
    if missing:
        raise D3FastError(f"--log {','.join(names)} needs {' '.join(missing)}: pip install {' '.join(missing)} "
                          "(into d3fast's environment, e.g. .venv/bin/pip)")


class _TensorBoard:
    def __init__(self, run_path: Any, name: str, config: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.w = SummaryWriter(log_dir=str(run_path / "tensorboard"))

    def metrics(self, step: int, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.w.add_scalar(k, v, step)

    def image(self, tag: str, hwc: np.ndarray, step: int) -> None:
        self.w.add_image(tag, hwc, step, dataformats="HWC")

    def text(self, tag: str, markdown: str, step: int) -> None:
        self.w.add_text(tag, markdown, step)

    def close(self) -> None:
        self.w.close()


class _WandB:
    def __init__(self, run_path: Any, name: str, config: dict[str, Any]) -> None:
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "d3fast"), name=name, dir=str(run_path),
                              id=re.sub(r"[^A-Za-z0-9_-]", "-", name)[-64:], resume="allow", config=config,
                              mode=os.environ.get("WANDB_MODE", "offline"))

    def metrics(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def image(self, tag: str, hwc: np.ndarray, step: int) -> None:
        self.run.log({tag: self.wandb.Image(hwc)}, step=step)

    def text(self, tag: str, markdown: str, step: int) -> None:
        self.run.log({tag: self.wandb.Html(f"<pre>{markdown}</pre>")}, step=step)

    def close(self) -> None:
        self.run.finish()


class _MLflow:
    def __init__(self, run_path: Any, name: str, config: dict[str, Any]) -> None:
        import mlflow

        self.mlflow = mlflow
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            # MLflow 3 keeps its file store but refuses it unless asked: it is the one that needs no server
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI") or (run_path / "mlruns").resolve().as_uri())
        mlflow.set_experiment("d3fast")
        found = mlflow.search_runs(filter_string=f"tags.mlflow.runName = '{name}'", output_format="list")
        self.run = mlflow.start_run(run_id=found[0].info.run_id) if found else mlflow.start_run(run_name=name)
        if not found:
            mlflow.log_params({k: str(v)[:500] for k, v in _flat(config).items()})

    def metrics(self, step: int, values: dict[str, float]) -> None:
        self.mlflow.log_metrics(values, step=step)

    def image(self, tag: str, hwc: np.ndarray, step: int) -> None:
        self.mlflow.log_image(hwc, key=tag, step=step)

    def text(self, tag: str, markdown: str, step: int) -> None:
        self.mlflow.log_text(markdown, f"{tag}-{step}.md")

    def close(self) -> None:
        self.mlflow.end_run()


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _flat(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


_KINDS = {"tensorboard": _TensorBoard, "wandb": _WandB, "mlflow": _MLflow}


# a thread whose class comes from a tracker's package is that tracker's: its failure is the
# tracker's one warning (TensorBoard's event writer thread dies on an unwritable folder, often
# before the call that started it returns, so the threads are known by their class)
_PACKAGES = {"tensorboard": "tensorboard", "torch.utils.tensorboard": "tensorboard", "tensorboardX": "tensorboard",
             "wandb": "wandb", "mlflow": "mlflow"}
_WARNED: set[str] = set()  # trackers warned about (a thread may fail after its Trackers closed)
# held while deciding and printing: whichever of the caller and the tracker's thread comes
# first prints, and the other waits for the line to be out (a daemon thread that only marked
# it could be killed at exit before printing)
_WARN_LOCK = threading.Lock()
_PREVIOUS_HOOK = threading.excepthook


def _warn(name: str, e: BaseException) -> None:
    """The one warning of a stopped tracker, once per tracker."""
    from tqdm import tqdm

    with _WARN_LOCK:
        if name in _WARNED:
            return
        _WARNED.add(name)
        tqdm.write(f"warning: tracker {name} stopped ({type(e).__name__}: {e}); metrics.jsonl has every value",
                   file=sys.stderr)


def _owner(thread: threading.Thread | None) -> str | None:
    module = type(thread).__module__ if thread is not None else ""
    return next((name for pkg, name in _PACKAGES.items() if module == pkg or module.startswith(pkg + ".")), None)


def _thread_failed(args: threading.ExceptHookArgs) -> None:
    """threading.excepthook: a tracker's thread failing is one warning (once per tracker)."""
    name = _owner(args.thread)
    if name is None:
        _PREVIOUS_HOOK(args)
        return
    _warn(name, args.exc_value if args.exc_value is not None else args.exc_type())


class Trackers:
    """The trackers of one run (none when `names` is empty): every call goes to each; one
    that raises, or whose thread raises, is dropped with a warning."""

    def __init__(self, names: list[str], run_path: Any, name: str, config: dict[str, Any]) -> None:
        names = list(dict.fromkeys(names))  # tensorboard,tensorboard is one tracker
        check_available(names)
        self.open: dict[str, Any] = {}
        if names and threading.excepthook is not _thread_failed:
            threading.excepthook = _thread_failed
        for n in names:
            with _WARN_LOCK:
                _WARNED.discard(n)
            try:
                self.open[n] = _KINDS[n](run_path, name, config)
            except Exception as e:  # a tracker's own failure (a bad URI, a locked file) must not stop the run
                _warn(n, e)

    def _each(self, method: str, *args: Any) -> None:
        for n, t in list(self.open.items()):
            if n in _WARNED:  # its thread failed
                self.open.pop(n)
                continue
            try:
                getattr(t, method)(*args)
            except Exception as e:
                self.open.pop(n)
                _warn(n, e)

    def metrics(self, step: int, record: dict[str, Any]) -> None:
        """The numbers of a metrics.jsonl record."""
        values = {k: float(v) for k, v in record.items() if isinstance(v, int | float) and not isinstance(v, bool)
                  and k != "step"}
        if values:
            self._each("metrics", step, values)

    def image(self, tag: str, hwc: np.ndarray, step: int) -> None:
        self._each("image", tag, hwc, step)

    def text(self, tag: str, markdown: str, step: int) -> None:
        self._each("text", tag, markdown, step)

    def close(self) -> None:
        self._each("close")
        self.open.clear()

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def for_run(cfg: Any, run: Any) -> Trackers:
    """The trackers cfg.log.trackers names, for `run` (named by its directory)."""
    from d3fast.config import to_dict

    return Trackers(list(cfg.log.trackers), run.path, run.path.name, to_dict(cfg))
