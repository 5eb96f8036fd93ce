"""Devices, seeds and version stamps shared by every command."""

from __future__ import annotations

import os
import platform
import resource
import subprocess
from pathlib import Path

import numpy as np
import torch

import d3fast
from d3fast.errors import D3FastError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise D3FastError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise D3FastError(f"device {name!r} requested but CUDA is not available (see `d3fast doctor`)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise D3FastError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "cpu" and dev.index not in (None, 0):
        raise D3FastError(f"device {name!r}: the CPU is one device; use cpu")
    if dev.type not in ("cpu", "cuda"):
        raise D3FastError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N")
    return dev


DTYPES = {"float32": torch.float32, "float64": torch.float64}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a distill.dtype name ("float32" or "float64")."""
    try:
        return DTYPES[name]
    except KeyError:
        raise D3FastError(f"unknown dtype {name!r}; use {' or '.join(DTYPES)}") from None


def full_precision(t: torch.Tensor) -> torch.Tensor:
    """`t` in float32 when it is of lower precision (bf16 or fp16 under --amp); float32 and
    float64 tensors unchanged (a float64 run must not be rounded to float32 on the way)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (numpy SeedSequence: nearby inputs give unrelated seeds)."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


def device_name(device: torch.device) -> str:
    """'NVIDIA H100 80GB HBM3', or the CPU model with its core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    return f"{model or platform.processor() or platform.machine()} x{os.cpu_count()} cores (CPU)"


def git_commit() -> str | None:
    repo = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def versions() -> dict[str, str | None]:
    return {
        "d3fast": d3fast.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "git_commit": git_commit(),
    }


# Dense peaks per GPU model (vendor datasheets), matched by substring of
# torch.cuda.get_device_name, most specific first: fp32 on CUDA cores (the MMD kernel uses
# IEEE fp32 dots: TF32 would corrupt |a|^2 + |b|^2 - 2<a, b>) and memory bandwidth (the
# parameter distance is a streaming op).
DEVICE_PEAKS: tuple[tuple[str, float, float], ...] = (
    # (name contains, fp32 TFLOP/s, HBM TB/s)
    ("H200", 67.0, 4.8),
    ("H100 NVL", 60.0, 3.9),
    ("H100 PCIe", 51.0, 2.0),
    ("H100", 67.0, 3.35),  # SXM5, HBM3
    ("A100-SXM4-80GB", 19.5, 2.039),
    ("A100 80GB PCIe", 19.5, 1.935),
    ("A100", 19.5, 1.555),  # 40 GB, SXM4 and PCIe
    ("L40S", 91.6, 0.864),
)


def device_peaks(device: torch.device) -> tuple[float, float] | None:
    """(fp32 TFLOP/s, memory TB/s) of a known GPU; None for CPUs and unlisted GPUs."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next(((f, b) for key, f, b in DEVICE_PEAKS if key in name), None)


def free_memory(device: torch.device) -> int:
    """Bytes free for new tensors on `device`: on a GPU the driver's free memory plus the
    caching allocator's reserved-but-unused blocks (free to this process too); elsewhere the
    host's MemAvailable (/proc/meminfo), else the free pages sysconf reports, else 4 GiB.
    The one reader of free memory (the MMD chunking and the MTT unroll's auto mode)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    try:
        with open("/proc/meminfo") as f:
            info = {ln.split(":")[0]: int(ln.split()[1]) * 1024 for ln in f}
        return info["MemAvailable"]
    except (OSError, KeyError, ValueError):
        return (os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")) if hasattr(os, "sysconf") else 1 << 32


def reset_peak_memory(device: torch.device) -> None:
    """Start a new window for `peak_memory_gib` (a GPU's; a process's peak RSS cannot be reset)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float:
    """GiB: on a GPU the most allocated since `reset_peak_memory`; elsewhere the process's
    peak resident set (getrusage; Linux reports KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
