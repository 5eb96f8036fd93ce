"""Progress bars that suit where the output goes.

On a terminal: tqdm's live bar. Anywhere else (Slurm, nohup, CI, a pipe) `\\r` frames pile
up into one unreadable line, so the same bar is written as one plain line every
$D3FAST_PROGRESS_EVERY seconds (default 60). `d3fast --quiet` (or a command's --quiet, or
$D3FAST_QUIET=1, or the Python API unless asked: `silenced()`) turns bars off; notes,
warnings and results are still printed.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

from tqdm import tqdm

_silenced = 0  # open `silenced()` blocks of this process


def quiet() -> bool:
    return _silenced > 0 or os.environ.get("D3FAST_QUIET", "") not in ("", "0")


@contextmanager
def silenced(on: bool = True) -> Iterator[None]:
    """No bars in this process while the block runs (when `on`): the Python API's default."""
    global _silenced
    _silenced += on
    try:
        yield
    finally:
        _silenced -= on


def every_s() -> float:
    try:
        return max(0.0, float(os.environ.get("D3FAST_PROGRESS_EVERY", "60")))
    except ValueError:
        return 60.0


class _Lines:
    """A stream for tqdm that turns each `\\r` frame into a line of its own."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out

    def write(self, s: str) -> None:
        text = s.replace("\r", "").strip()
        if text:
            self.out.write(text + "\n")

    def flush(self) -> None:
        self.out.flush()


def bar(**kw: Any) -> tqdm:
    """A tqdm bar (same arguments) for the current output: live on a terminal, plain lines
    every `every_s()` seconds elsewhere, none when quiet."""
    out = kw.pop("file", None) or sys.stderr
    if quiet():
        kw["disable"] = True
    if not getattr(out, "isatty", lambda: False)():
        t = every_s()
        kw |= {"file": _Lines(out), "mininterval": t, "maxinterval": max(t, 10.0), "ascii": True,
               "dynamic_ncols": False, "ncols": 100}
    else:
        kw |= {"file": out, "dynamic_ncols": kw.get("dynamic_ncols", True)}
    return tqdm(**kw)
