"""One MTT update (unroll + parameter distance + backward to latents, decoder and lr).

Shapes: "imagewoof", ConvNet-5 (width 128, instance norm) on 3x128x128 images from the paper
decoder, 10 classes x 1 prior, unroll lengths 10, 20, 40, 80 (a GPU shape: minutes per point
on 2 CPU cores); "cifar10", ConvNet-3 (width 128) on 3x32x32 images, unroll lengths 10 and 20,
small enough for a CPU.

Modes: naive (graph through every step), flat (per-step recomputation), auto (naive for the
steps that fit half the free memory, flat for the rest), auto with a zero budget (every step
recomputed: its overhead over flat), and "mtt": the MTT paper's inner loop written plainly
here as a peer (Cazenavette et al. 2022, Alg. 1: student parameters as one flat vector, each
step's cross-entropy gradient taken with create_graph, theta <- theta - lr grad, then the
normalised parameter distance), sharing nothing with d3fast/unroll.py but the decoder, the
DSA augmentation and the network.

Each point runs in a fresh process; the peak is that process's memory high-water mark above
what it held before the update (CPU: VmHWM - VmRSS; CUDA: max_memory_allocated), and the
time is the median of 3 updates after a 2-step warm-up. Points the machine cannot hold are
skipped with the projection from the measured ones: naive memory grows by one step's graph
per step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

_RUN = r"""
import json, statistics, sys, time, torch
from torch.func import functional_call
import torch.nn.functional as F
from d3fast.config import AugConfig
from d3fast.data.augment import DSA
from d3fast.distilled import init_distilled
from d3fast.models import build_network
from d3fast.unroll import Student, UnrollSpec, mtt_loss, unroll

mode, steps, batch, device, shape = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), torch.device(sys.argv[4]), sys.argv[5]
compiled = mode.endswith("+compiled")
mode = mode.removesuffix("+compiled")
res, depth = {"imagewoof": (128, 5), "cifar10": (32, 3)}[shape]
meta = {"resolution": res, "channels": 3, "mean": [0.45] * 3, "std": [0.25] * 3, "z_dim": 64,
        "decoder": "paper", "decoder_width": 256}
d = init_distilled(10, 1, [str(i) for i in range(10)], meta, 0.01, device, seed=0)
net = build_network("convnet", 3, 10, res, width=128, depth=depth).to(device)
student = Student(net, compiled=compiled)
if compiled:
    d.compile_decoder()
P = sum(student.sizes)
theta0 = torch.randn(1, P, device=device) * 0.02
target = theta0 + torch.randn(1, P, device=device) * 0.001
dsa = DSA(AugConfig(), compiled=compiled)

def mtt_update(n):
    # the MTT inner loop as the paper describes it, independent of d3fast.unroll
    g = torch.Generator(device=device).manual_seed(0)
    names = [k for k, _ in net.named_parameters()]
    shapes = [p.shape for _, p in net.named_parameters()]
    params = [theta0[0].clone().requires_grad_(True)]
    lr = d.lr()
    for _ in range(n):
        idx = torch.randperm(len(d.latents), generator=g, device=device)[:batch]
        x = dsa(d.decode(idx, g), g)
        views = dict(zip(names, (t.view(sh) for t, sh in zip(params[-1].split([s.numel() for s in shapes]), shapes))))
        ce = F.cross_entropy(functional_call(net, views, (x,)), d.labels[idx])
        grad = torch.autograd.grad(ce, params[-1], create_graph=True)[0]
        params.append(params[-1] - lr * grad)
    loss = ((params[-1] - target[0]) ** 2).sum() / ((theta0[0] - target[0]) ** 2).sum()
    loss.backward()
    return loss.item()

# one spec for the process, as a distillation holds one for its run: auto measures a step's
# graph once per spec (a probe step), not once per update
spec = UnrollSpec(student, steps, batch, dsa, budget=0.0 if mode == "auto-none" else 0.5)

def update(n):
    if mode == "mtt":
        return mtt_update(n)
    spec.steps = n
    g = torch.Generator(device=device).manual_seed(0)
    loss = mtt_loss(unroll(spec, d, theta0, g, mode.removesuffix("-none")), target, theta0)
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
times = []
for _ in range(3):
    t0 = time.perf_counter()
    update(steps)
    if device.type == "cuda":
        torch.cuda.synchronize()
    times.append(time.perf_counter() - t0)
if device.type == "cuda":
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
else:
    peak = status("VmHWM") - base
print(json.dumps({"seconds": statistics.median(times), "peak_mib": peak, "params": P,
                  "threads": torch.get_num_threads()}))
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
# (shape, batch, steps, mode) -> result, to pair the modes measured at the same point
_SEEN: dict[tuple[str, int, int, str], dict] = {}
# ratio label -> (numerator mode, denominator mode, quantity), each "higher is better" for the
# first mode named; targets from issue 20: flat <= 1.15x naive's time, auto <= 1.05x naive's
# time when the budget holds every step, auto with no budget <= 1.2x flat's peak memory; from
# issue 31: each mode compiled within 1.1x of its eager peak
_PAIRS = {
    **{f"{m}/{m} compiled peak memory": (m, f"{m}+compiled", "peak_mib") for m in ("flat", "naive", "auto")},
    **{f"{m}/{m} compiled time": (m, f"{m}+compiled", "seconds") for m in ("flat", "naive", "auto")},
    "naive/flat time": ("naive", "flat", "seconds"),
    "naive/flat peak memory": ("naive", "flat", "peak_mib"),
    "naive/auto time": ("naive", "auto", "seconds"),
    "flat/auto-none peak memory": ("flat", "auto-none", "peak_mib"),
    "flat/auto-none time": ("flat", "auto-none", "seconds"),
    "mtt loop/naive time": ("mtt", "naive", "seconds"),
    "mtt loop/naive peak memory": ("mtt", "naive", "peak_mib"),
    "mtt loop/auto time": ("mtt", "auto", "seconds"),
}
_TARGETS = {"naive/flat time": round(1 / 1.15, 2), "naive/auto time": round(1 / 1.05, 2),
            "flat/auto-none peak memory": round(1 / 1.2, 2),
            **{f"{m}/{m} compiled peak memory": round(1 / 1.1, 2) for m in ("flat", "naive", "auto")}}


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _run(mode: str, steps: int, batch: int, device: torch.device, shape: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _RUN, mode, str(steps), str(batch), str(device), shape],
        capture_output=True, text=True, check=True,
        env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("steps", [10, 20, 40, 80])
@pytest.mark.parametrize("mode", ["flat", "naive", "auto", "auto-none", "mtt", "flat+compiled", "naive+compiled",
                                  "auto+compiled"])
@pytest.mark.parametrize("batch", [10, 100])
@pytest.mark.parametrize("shape", ["cifar10", "imagewoof"])
def test_unroll_memory(benchmark, provenance, shape, batch, mode, steps):
    device = _device()
    if device.type == "cpu":
        if batch == 100:
            pytest.skip("batch_syn 100 is a GPU shape (~90 s per unrolled step at 128 px on 2 cores)")
        if shape == "cifar10" and steps > 20:
            pytest.skip("the CPU runs the small shape at 10 and 20 steps")
        if shape == "imagewoof" and mode in ("auto-none", "mtt") or "compiled" in mode and shape != "cifar10":
            pytest.skip("the peers and compiled modes run at the small shape on a CPU (minutes per ImageWoof point)")
    if shape == "imagewoof" and mode.removesuffix("+compiled") in ("naive", "mtt") and naive_mib(steps, batch) > _budget_mib(device):
        pytest.skip(f"{mode} x {steps} steps at batch {batch} needs ~{naive_mib(steps, batch) / 1024:.0f} GiB, "
                    f"more than {_budget_mib(device) / 1024:.0f} GiB here")
    result: dict = {}

    def once():
        result.update(_run(mode, steps, batch, device, shape))

    benchmark.pedantic(once, rounds=1, iterations=1)
    _SEEN[(shape, batch, steps, mode)] = result
    ratios: dict[str, float] = {}
    for label, (num, den, key) in _PAIRS.items():
        if mode in (num, den) and (shape, batch, steps, num) in _SEEN and (shape, batch, steps, den) in _SEEN:
            ratios[label] = round(_SEEN[(shape, batch, steps, num)][key] / _SEEN[(shape, batch, steps, den)][key], 2)
    if shape == "imagewoof" and mode == "flat" and device.type == "cpu" and (shape, batch, steps, "naive") not in _SEEN:
        ratios["naive/flat peak memory (naive projected)"] = round(naive_mib(steps, batch) / result["peak_mib"], 2)
    benchmark.extra_info["ratios"] = ratios
    benchmark.extra_info["targets"] = {k: v for k, v in _TARGETS.items() if k in ratios}
    benchmark.extra_info.update(
        shape=shape, mode=mode, steps=steps, batch_syn=batch, seconds_per_update=round(result["seconds"], 2),
        peak_mib=round(result["peak_mib"], 1), student_params=result["params"], threads=result["threads"],
        load_average=[round(v, 2) for v in os.getloadavg()],
    )
