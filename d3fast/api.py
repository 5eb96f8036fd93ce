"""The Python API: `d3fast.distill`, `d3fast.evaluate`, `d3fast.load` and
`Distilled.sample` / `Merged.sample` (README "Python API").

Each call does what the command of the same name does (the same config resolution, data
preparation, expert training, locks and files), raising `d3fast.D3FastError` where the
command would print an error; no progress bars unless asked.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from d3fast.errors import D3FastError


def _sets(values: Mapping[str, Any] | Sequence[str] | None) -> list[str]:
    if values is None:
        return []
    if isinstance(values, Mapping):
        return [f"{k}={_value(k, v)}" for k, v in values.items()]
    return [str(v) for v in values]


def _value(key: str, v: Any) -> str:
    """A `set` value as the text `--set` takes: strings as they are, a torch dtype by its name
    (torch.float64 -> float64, for distill.dtype), anything else as JSON.

    Raises:
        D3FastError: a value that is no config value (not a string, number, bool or list)."""
    import json

    if isinstance(v, str):
        return v
    if type(v).__module__ == "torch" and type(v).__name__ == "dtype":
        return str(v).removeprefix("torch.")
    try:
        return json.dumps(v)
    except TypeError:
        raise D3FastError(f"set[{key!r}]: {type(v).__name__} {v!r} is not a config value (a string, number, "
                          "true/false or a list of them)") from None


@contextmanager
def _api(progress: bool) -> Iterator[None]:
    """Commands raise instead of exiting, and stay quiet unless `progress`."""
    old = {k: os.environ.get(k) for k in ("D3FAST_API", "D3FAST_QUIET")}
    os.environ["D3FAST_API"] = "1"
    if not progress:
        os.environ["D3FAST_QUIET"] = "1"
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _invoke(args: list[str], progress: bool) -> None:
    import click

    from d3fast.cli import cli

    with _api(progress):
        try:
            cli.main(args=args, prog_name="d3fast", standalone_mode=False)
        except click.ClickException as e:  # a bad argument: the message the command line would print
            raise D3FastError(e.format_message()) from None
        except SystemExit as e:
            if e.code not in (0, None):
                raise D3FastError(f"d3fast {args[0]} stopped (exit status {e.code})") from None


def distill(
    dataset: str | None = None,
    *,
    preset: str | None = None,
    steps: int | None = None,
    ppc: int | None = None,
    set: Mapping[str, Any] | Sequence[str] | None = None,  # noqa: A002 - the CLI's --set
    name: str | None = None,
    runs_dir: str | os.PathLike | None = None,
    device: str | None = None,
    evaluate: bool = False,
    progress: bool = False,
) -> Path:
    """`d3fast distill`: learn a distilled object; returns its run directory (for a
    `data.subtasks` split, the merged object's). Prepares the data and trains the expert
    trajectories first when they are missing. `set` takes {"distill.lr_latent": 1e-3} or
    ["distill.lr_latent=1e-3"].

    Raises:
        D3FastError: what the command reports (bad settings, missing data, divergence, ...).
    """
    from d3fast.config import resolve_config
    from d3fast.paths import runs_root

    sets = _sets(set)
    args = ["distill", *(["--dataset", dataset] if dataset else []), *(["--preset", preset] if preset else []),
            *(["--steps", str(steps)] if steps is not None else []), *(["--ppc", str(ppc)] if ppc is not None else []),
            *sum((["--set", s] for s in sets), []), *(["--device", device] if device else []),
            *(["--evaluate"] if evaluate else [])]
    cfg = resolve_config(dataset, preset, sets)
    root = Path(runs_dir) if runs_dir is not None else runs_root()
    base = name or cfg.preset or "run"
    args += ["--runs-dir", str(root), "--name", base]
    _invoke(args, progress)
    if cfg.data.subtasks > 1 and cfg.data.subtask < 0:
        return root / cfg.data.dataset / f"{base}-merged"
    from d3fast.cli import _run_name
    from d3fast.run import Run

    run = Run.named(root, cfg.data.dataset, _run_name(cfg, base))
    if run is None:
        raise D3FastError(f"the run of {base} was not found under {root}")
    return run.path


def evaluate(
    target: str | os.PathLike,
    *,
    dataset: str | None = None,
    preset: str | None = None,
    set: Mapping[str, Any] | Sequence[str] | None = None,  # noqa: A002
    archs: Sequence[str] | None = None,
    students: int | None = None,
    epochs: int | None = None,
    device: str | None = None,
    runs_dir: str | os.PathLike | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """`d3fast evaluate`: students on the target (a run or merged directory, `latest`, a
    .safetensors export, a .pt image set or an ImageFolder) and the random-real baselines;
    returns the report (also kept in the target's evals/).

    Raises:
        D3FastError: what the command reports.
    """
    from d3fast.evaluate import _with, open_target
    from d3fast.evaluate import evaluate as run_evaluation
    from d3fast.paths import runs_root
    from d3fast.runtime import resolve_device

    dev = resolve_device(device or "auto")
    with _api(progress):
        t = open_target(str(target), str(runs_dir or runs_root()), dataset, preset, tuple(_sets(set)), dev)
        if isinstance(archs, str):  # "convnet,resnet18" as on the command line
            archs = [a.strip() for a in archs.split(",") if a.strip()]
        over: dict[str, Any] = {k: v for k, v in (("archs", list(archs) if archs else None), ("students", students),
                                                  ("epochs", epochs)) if v is not None}
        _with(t.cfg, {"eval": over} if over else None)
        return run_evaluation(t, dev, progress=progress)


def load(where: str | os.PathLike, device: str = "cpu", runs_dir: str | os.PathLike | None = None) -> Any:
    """The distilled object of a run or merged directory (latest checkpoint), `latest`, or a
    .safetensors export: a `Distilled` or `Merged`, with the dataset's ZCA attached when the
    run used it (so `sample(pixels=True)` de-whitens).

    Raises:
        D3FastError: nothing loadable there (missing, corrupt, non-finite).
    """
    from d3fast.evaluate import open_target
    from d3fast.exports import zca_of
    from d3fast.paths import runs_root

    t = open_target(str(where), str(runs_dir or runs_root()), device=device, config_optional=True)
    if t.d is None:
        raise D3FastError(f"{where} is a fixed image set, not a distilled object: read it with torch.load")
    if t.cfg.data.zca:
        t.d.zca = zca_of(t.cfg)
    return t.d
