"""Distillation checkpoints: the whole training state in one file, written atomically and
loaded with `torch.load(weights_only=True)` (tensors, numbers, strings, lists and dicts
only: no pickled code)."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from d3fast.errors import D3FastError
from d3fast.io import atomic_path

CKPT_FORMAT = 1


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save({"format": CKPT_FORMAT, **state}, tmp)


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    if not path.exists():
        raise D3FastError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, ValueError, OSError) as e:
        first_line = (str(e).splitlines() or [""])[0][:200]
        raise D3FastError(f"checkpoint {path} is corrupt or truncated ({type(e).__name__}: {first_line})") from None
    if not isinstance(state, dict) or state.get("format") != CKPT_FORMAT:
        raise D3FastError(f"{path} is not a d3fast checkpoint")
    return state
