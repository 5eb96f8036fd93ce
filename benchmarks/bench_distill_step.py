"""One distillation step end to end (Algorithm 1: MTT unroll + parameter distance + MMD +
optimisers), through `d3fast profile`, i.e. the real loop with its phase timer.

CPU: digits (real data, the embedded default) and CIFAR-10 (stand-in inputs of its shapes:
ConvNet-3 w128, 20 unrolled steps over 10 latents, MMD on 30 samples per class, ZCA).
GPU: CIFAR-10, ImageWoof (ConvNet-5 at 128 px) and TinyImageNet (200 classes at 64 px), with
and without bf16 autocast; the ratio reported is the paper's GPU-hours over the hours this
step rate projects for the preset's full run (>= 1: within the paper's budget).
"""

from __future__ import annotations

import pytest
import torch

from d3fast.config import resolve_config
from d3fast.data.prepare import prepare
from d3fast.recipes.profile import profile

CASES = {
    "cpu": [("digits", False), ("cifar10", False)],
    "cuda": [("cifar10", False), ("imagewoof", False), ("imagewoof", True), ("tinyimagenet", True)],
}
ALL = sorted({c for cases in CASES.values() for c in cases})


@pytest.mark.parametrize("dataset,amp", ALL, ids=[f"{d}{'-amp' if a else ''}" for d, a in ALL])
def test_distill_step(benchmark, provenance, home, tmp_path, dataset, amp):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if (dataset, amp) not in CASES[device]:
        pytest.skip(f"{dataset}{' with amp' if amp else ''} is profiled on {'a GPU' if device == 'cpu' else 'the CPU'}")
    cfg = resolve_config(dataset, overrides=[f"device={device}", f"distill.amp={str(amp).lower()}"])
    if dataset == "digits":
        prepare(cfg, progress=False)  # embedded: real images; the experts are stand-ins
    result = {}

    def run():
        result["r"] = profile(cfg, tmp_path / "profile", steps=3, trace_steps=0, warmup=1, progress=False).report

    benchmark.pedantic(run, rounds=1, iterations=1)
    r = result["r"]
    proj = r["projection"]
    benchmark.extra_info.update(
        step_s=round(r["step_s"]["mean"], 4), step_s_per_step=r["step_s"]["per_step"],
        images_per_s=round(r["images_per_s"], 1), peak_memory_gib=round(r["peak_memory"]["gib"], 3),
        phases_fraction={k: round(v, 4) for k, v in r["phases_fraction"].items()},
        phase_coverage=round(r["phase_coverage"], 4), inputs=r["inputs"], config=r["config"],
        projected_hours=round(proj["device_hours"], 3), hours_unit=proj["unit"], full_steps=proj["steps"],
        paper_gpu_hours=proj["paper_gpu_hours"],
    )
    if device == "cuda" and proj["paper_gpu_hours"]:
        benchmark.extra_info["ratios"] = {"paper GPU-h / projected": round(proj["paper_gpu_hours"] / proj["device_hours"], 2)}
        benchmark.extra_info["targets"] = {"paper GPU-h / projected": 1.0}
