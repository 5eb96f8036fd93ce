"""Where d3fast keeps its files. Everything lives under the d3fast home:
`$D3FAST_HOME`, default `~/.d3fast`.

    <home>/data/<dataset>/            uint8 cache + manifest.json (d3fast prepare)
    <home>/experts/<dataset>/<tag>/   expert trajectories + manifest.json (d3fast experts)
    <home>/runs/<dataset>/<run>/      distillation runs (d3fast distill; `--runs-dir` or
                                      $D3FAST_RUNS put them elsewhere)
"""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    return Path(os.environ.get("D3FAST_HOME", Path.home() / ".d3fast")).expanduser()


def data_dir(dataset: str) -> Path:
    return home() / "data" / dataset


def experts_root(dataset: str) -> Path:
    return home() / "experts" / dataset


def runs_root() -> Path:
    """Where runs live unless a command's --runs-dir says otherwise: $D3FAST_RUNS, else
    <home>/runs."""
    env = os.environ.get("D3FAST_RUNS")
    return Path(env).expanduser() if env else home() / "runs"
