"""Timing and peak-memory helpers shared by the kernel benchmarks."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synced(fn: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """fn followed by a device sync, inside the call: a timer around it (pytest-benchmark's
    included) then measures the kernels, not just their launches."""

    def run() -> object:
        out = fn()
        sync(device)
        return out

    return run


def median_time(fn: Callable[[], object], device: torch.device, rounds: int = 5) -> float:
    """Median time of fn() in seconds. CUDA: triton.testing.do_bench (warmed up, the L2
    cache flushed before each call, CUDA events around it, the median of as many calls as
    fill ~100 ms). CPU: wall time of `rounds` calls after one warm-up."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, return_mode="median")) / 1e3
    fn()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_cuda_mib(fn: Callable[[], object], device: torch.device) -> float:
    """Peak allocated CUDA memory during fn(), above what was allocated before."""
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


# Runs in a fresh interpreter: inputs are built first, the kernel runs once to warm up, the
# C++ kernels' buffer pool is emptied, the high-water mark is reset (clear_refs 5), and
# VmHWM - VmRSS around one call is what that call needed at its peak. (getrusage's
# ru_maxrss survives fork + exec, so a child would report pytest's own peak.)
_RSS_SNIPPET = """
import json, sys, torch
spec = json.loads(sys.argv[1])
exec(spec["setup"])
def status(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(key)) / 1024
fn()
try:  # the C++ kernels keep freed buffers for reuse: count them as the call's own memory
    from d3fast._ext import _C
    _C.pool_trim()
except (ImportError, AttributeError):
    pass
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = status("VmRSS")
fn()
print(json.dumps({"peak_mib": status("VmHWM") - base}))
"""


def peak_rss_mib(setup: str) -> float:
    """Peak resident memory of one `fn()` call, in MiB above the resident set just before it.
    `setup` is Python source that defines `fn`; the inputs it builds are not counted."""
    out = subprocess.run(
        [sys.executable, "-c", _RSS_SNIPPET, json.dumps({"setup": setup})],
        capture_output=True, text=True, check=True,
        # big blocks go to mmap and back to the OS when freed, so the resident set tracks
        # live memory instead of glibc's retained heap
        env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"},
    )
    return round(json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"], 1)
