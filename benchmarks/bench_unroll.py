"""One MTT update (unroll + parameter distance + backward to latents, decoder and lr) at the
ImageWoof shape: ConvNet-5 (width 128, instance norm) on 3x128x128 images from the paper
decoder, 10 classes x 1 prior. Naive unroll (graph through every step) against the flat one
(per-step recomputation) and auto (naive for the steps that fit half the free memory, flat
for the rest), for unroll lengths 10, 20, 40, 80.

Each point runs in a fresh process; the peak is that process's memory high-water mark above
what it held before the update (CPU: VmHWM - VmRSS; CUDA: max_memory_allocated), and the
time is one update after a 2-step warm-up. Points the machine cannot hold are skipped with
the projection from the measured ones: naive memory grows by one step's graph per step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

_RUN = r"""
import json, sys, time, torch
from d3fast.config import AugConfig
from d3fast.data.augment import DSA
from d3fast.distilled import init_distilled
from d3fast.models import build_network
from d3fast.unroll import Student, UnrollSpec, mtt_loss, unroll

mode, steps, batch, device = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), torch.device(sys.argv[4])
meta = {"resolution": 128, "channels": 3, "mean": [0.45] * 3, "std": [0.25] * 3, "z_dim": 64,
        "decoder": "paper", "decoder_width": 256}
d = init_distilled(10, 1, [str(i) for i in range(10)], meta, 0.01, device, seed=0)
student = Student(build_network("convnet", 3, 10, 128, width=128, depth=5).to(device))
P = sum(student.sizes)
theta0 = torch.randn(1, P, device=device) * 0.02
target = theta0 + torch.randn(1, P, device=device) * 0.001

def update(n):
    spec = UnrollSpec(student, n, batch, DSA(AugConfig()))
    g = torch.Generator(device=device).manual_seed(0)
    loss = mtt_loss(unroll(spec, d, theta0, g, mode), target, theta0)
    loss.backward()
    return loss.item()

def status(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(key)) / 2**10

update(2)
if device.type == "cuda":
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
else:
    open("/proc/self/clear_refs", "w").write("5"); base = status("VmRSS")
t0 = time.perf_counter()
update(steps)
if device.type == "cuda":
    torch.cuda.synchronize(); peak = (torch.cuda.max_memory_allocated() - base) / 2**20
else:
    peak = status("VmHWM") - base
print(json.dumps({"seconds": time.perf_counter() - t0, "peak_mib": peak, "params": P}))
"""

# MiB one naive step's graph holds at batch 10 (CPU, measured: 1,229 MiB at 2 steps, 615 per step;
# it grows with the batch). A naive point whose projection exceeds the budget is skipped: on
# this 24 GiB CPU beyond ~14 GiB, on a GPU beyond 80% of its memory (batch 100 x 80 steps
# would need ~480 GiB)
_NAIVE_MIB_PER_STEP_CPU = 615


def naive_mib(steps: int, batch: int) -> float:
    return steps * _NAIVE_MIB_PER_STEP_CPU * batch / 10


def _budget_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return 0.8 * torch.cuda.get_device_properties(device).total_memory / 2**20
    return 14 * 1024
# (batch, steps, mode) -> result, to pair flat and naive runs of the same point
_SEEN: dict[tuple[int, int, str], dict] = {}


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _run(mode: str, steps: int, batch: int, device: torch.device) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _RUN, mode, str(steps), str(batch), str(device)],
        capture_output=True, text=True, check=True,
        env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("steps", [10, 20, 40, 80])
@pytest.mark.parametrize("mode", ["flat", "naive", "auto"])
@pytest.mark.parametrize("batch", [10, 100])
def test_unroll_memory(benchmark, provenance, batch, mode, steps):
    device = _device()
    if device.type == "cpu" and batch == 100:
        pytest.skip("batch_syn 100 at 128x128 is a GPU shape (~90 s per unrolled step on 2 cores)")
    if mode == "naive" and naive_mib(steps, batch) > _budget_mib(device):
        pytest.skip(f"naive x {steps} steps at batch {batch} needs ~{naive_mib(steps, batch) / 1024:.0f} GiB, "
                    f"more than {_budget_mib(device) / 1024:.0f} GiB here")
    result: dict = {}

    def once():
        result.update(_run(mode, steps, batch, device))

    benchmark.pedantic(once, rounds=1, iterations=1)
    _SEEN[(batch, steps, mode)] = result
    other = _SEEN.get((batch, steps, "naive" if mode == "flat" else "flat"))
    if mode == "auto":  # against the two it chooses between (issue 20: <= 1.05x naive's time when all
        # steps fit, <= 1.2x flat's memory when none do)
        ratios = {}
        if (batch, steps, "naive") in _SEEN:
            ratios["auto/naive time"] = round(result["seconds"] / _SEEN[(batch, steps, "naive")]["seconds"], 2)
        if (batch, steps, "flat") in _SEEN:
            ratios["auto/flat peak memory"] = round(result["peak_mib"] / _SEEN[(batch, steps, "flat")]["peak_mib"], 2)
            ratios["auto/flat time"] = round(result["seconds"] / _SEEN[(batch, steps, "flat")]["seconds"], 2)
        benchmark.extra_info["ratios"] = ratios
    elif other is not None:  # both modes measured at this point: the summary's ratios
        flat, naive = (result, other) if mode == "flat" else (other, result)
        benchmark.extra_info["ratios"] = {
            "naive/flat peak memory": round(naive["peak_mib"] / flat["peak_mib"], 2),
            "naive/flat time": round(naive["seconds"] / flat["seconds"], 2),
        }
    elif mode == "flat" and device.type == "cpu":
        benchmark.extra_info["ratios"] = {
            "naive/flat peak memory (naive projected)": round(naive_mib(steps, batch) / result["peak_mib"], 2)}
    benchmark.extra_info.update(
        mode=mode, steps=steps, batch_syn=batch, seconds_per_update=round(result["seconds"], 2),
        peak_mib=round(result["peak_mib"], 1), student_params=result["params"],
    )
