"""The Python API: `d3fast.distill`, `d3fast.evaluate`, `d3fast.load` and
`Distilled.sample` / `Merged.sample` (docs/python-api.md).

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


def _sets(values: Mapping[str, Any] | Sequence[str] | None, prefix: str = "") -> list[str]:
    """`set` as --set strings: {"distill.steps": 5}, nested sections ({"distill": {"steps": 5}})
    or ["distill.steps=5"].

    Raises:
        D3FastError: a key that is not a string, or `set` neither a mapping nor a list of strings."""
    if values is None:
        return []
    if isinstance(values, Mapping):
        out = []
        for k, v in values.items():
            if not isinstance(k, str) or not k:
                raise D3FastError(f"set: keys are config keys such as 'distill.steps', not {k!r}")
            out += _sets(v, f"{prefix}{k}.") if isinstance(v, Mapping) else [f"{prefix}{k}={_value(prefix + k, v)}"]
        return out
    if not isinstance(values, list | tuple) or not all(isinstance(v, str) for v in values):
        # an iterator would be used up by the check: lists and tuples only
        raise D3FastError(f"set: a mapping {{'distill.steps': 5}} or a list of 'key=value' strings, not {values!r}"[:300])
    return list(values)


def _names(**values: Any) -> None:
    """The arguments that name things (datasets, presets, runs, devices) are strings.

    Raises:
        D3FastError: one that is not."""
    for key, v in values.items():
        if v is not None and not isinstance(v, str | os.PathLike):
            raise D3FastError(f"{key} must be a string such as 'digits', not {type(v).__name__} {v!r}")


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
    except (TypeError, ValueError):  # ValueError: an int past Python's 4,300-digit conversion limit
        try:
            shown = repr(v)[:80]
        except ValueError:  # the same limit applies to repr
            shown = "(too many digits to print)"
        raise D3FastError(f"set[{key!r}]: {type(v).__name__} {shown} is not a config value (a string, number, "
                          "true/false or a list of them)") from None


@contextmanager
def _failures_as_errors() -> Iterator[None]:
    """A file that cannot be written (a full disk, a path through a file, no permission; as
    an OSError or as another library's error naming it) as the one-line D3FastError the
    command prints (d3fast/io.py `write_failure`, as d3fast/cli.py applies it); anything else
    as it is raised."""
    from d3fast.io import write_failure

    try:
        yield
    except Exception as e:
        failure = write_failure(getattr(e, "filename", None), e)
        if failure is None:
            raise
        raise failure from None


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
    from d3fast.paths import runs_root
    from d3fast.progress import silenced
    from d3fast.recipes.distill import DistillJob, command

    _names(dataset=dataset, preset=preset, name=name, runs_dir=runs_dir, device=device)
    # steps and ppc parsed as the command line parses --steps 2 (an int, a numpy int or "2"),
    # before `set` (which wins, as --set does); an empty string is "not given", as a missing flag
    flags = tuple(f"{key}={v}" for key, v in (("distill.steps", steps), ("distill.ppc", ppc)) if v is not None)
    job = DistillJob(str(runs_dir) if runs_dir is not None else str(runs_root()), dataset or None, preset or None,
                     (*flags, *_sets(set)), {"device": device or None}, name=name or None, evaluate=evaluate)
    with silenced(not progress), _failures_as_errors():
        return command(job)


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
    from d3fast.paths import runs_root
    from d3fast.progress import silenced
    from d3fast.recipes.evaluate import _with, open_target
    from d3fast.recipes.evaluate import evaluate as run_evaluation
    from d3fast.runtime import resolve_device

    _names(target=target, dataset=dataset, preset=preset, runs_dir=runs_dir, device=device)
    dev = resolve_device(device or "auto")
    with silenced(not progress), _failures_as_errors():
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
    from d3fast.exports import zca_of
    from d3fast.paths import runs_root
    from d3fast.recipes.evaluate import open_target
    from d3fast.runtime import resolve_device

    _names(where=where, device=device, runs_dir=runs_dir)
    if not str(where).strip():
        raise D3FastError("load: name a run directory, `latest` or a .safetensors export")
    dev = resolve_device(device or "cpu")  # an unknown or absent device said as such, before any file
    t = open_target(str(where), str(runs_dir or runs_root()), device=dev, config_optional=True)
    if t.d is None:
        raise D3FastError(f"{where} is a fixed image set, not a distilled object: read it with torch.load")
    if t.cfg.data.zca:
        t.d.zca = zca_of(t.cfg)
    return t.d
