"""d3fast.kernels: fused ops and their dispatch.

Each op has a Triton implementation (`<op>.py`, CUDA tensors), a pure-PyTorch reference
(`<op>_ref.py`, also the fallback) and, for CPU tensors, the C++ extension d3fast._C.
`backend(tensor)` picks one per call:

    CUDA tensor, Triton importable, D3FAST_DISABLE_TRITON unset  -> "triton"
    CPU tensor, d3fast._C built, D3FAST_PUREPYTHON unset         -> "cpp"
    otherwise                                                   -> "reference"
"""

from __future__ import annotations

import importlib.util
import os

import torch


def triton_status() -> tuple[bool, str]:
    if os.environ.get("D3FAST_DISABLE_TRITON", "0") == "1":
        return False, "disabled by D3FAST_DISABLE_TRITON=1"
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed"
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return True, "interpreter (TRITON_INTERPRET=1): runs on CPU tensors, slowly"
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    return True, "CUDA"


def backend(t: torch.Tensor) -> str:
    """The implementation an op uses for tensor `t`."""
    triton_ok, _ = triton_status()
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if triton_ok and (t.is_cuda or interpret):
        return "triton"
    if t.device.type == "cpu":
        from d3fast._ext import HAS_EXT

        if HAS_EXT:
            return "cpp"
    return "reference"


def describe() -> dict[str, str]:
    """Backend per device kind, with the reason, for `d3fast doctor`."""
    from d3fast._ext import HAS_EXT, REASON

    ok, why = triton_status()
    return {
        "cuda tensors": f"triton ({why})" if ok else f"reference (triton: {why})",
        "cpu tensors": "cpp (d3fast._C)" if HAS_EXT else f"reference (d3fast._C: {REASON})",
    }
