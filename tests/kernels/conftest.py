import contextlib
import importlib.util
import math
from collections.abc import Iterator

import pytest
import torch

from d3fast._ext import HAS_EXT


def impls() -> list:
    """Every implementation this machine can run; Triton on CPU goes through the interpreter
    (tests/conftest.py sets TRITON_INTERPRET=1 when there is no GPU)."""
    out = [pytest.param("reference", id="ref")]
    out.append(pytest.param("cpp", id="cpp", marks=pytest.mark.skipif(not HAS_EXT, reason="d3fast._C not loaded")))
    # `-m cuda` selects them: on a GPU they run the compiled kernels on CUDA tensors
    out.append(pytest.param(
        "triton", id="triton",
        marks=[pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed"),
               pytest.mark.cuda],
    ))
    return out


def cpu_levels() -> list:
    """The C++ kernels' instruction-set levels this CPU runs (csrc/simd.h builds each float32
    entry point once per level; `_C.cpu_isas()`), as parameters for `at_cpu_level`."""
    if not HAS_EXT:
        return [pytest.param("none", marks=pytest.mark.skip(reason="d3fast._C not loaded"))]
    from d3fast._ext import _C

    return [pytest.param(level, id=level) for level in _C.cpu_isas()]


@contextlib.contextmanager
def at_cpu_level(level: str) -> Iterator[None]:
    """Runs the C++ kernels at `level` inside the block, the process's level again after."""
    from d3fast._ext import _C

    before = _C.cpu_isa()
    _C.set_cpu_isa(level)
    try:
        assert _C.cpu_isa() == level
        yield
    finally:
        _C.set_cpu_isa(before)


def device_for(impl: str) -> torch.device:
    return torch.device("cuda") if impl == "triton" and torch.cuda.is_available() else torch.device("cpu")


@pytest.fixture(autouse=True)
def nan_empty(monkeypatch):
    """torch.empty / empty_like hand out NaNs, so a kernel that reads memory it never
    wrote fails its comparison."""
    real_empty, real_like = torch.empty, torch.empty_like

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(math.nan) if t.is_floating_point() else t

    def empty_like(*args, **kwargs):
        t = real_like(*args, **kwargs)
        return t.fill_(math.nan) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch, "empty_like", empty_like)
