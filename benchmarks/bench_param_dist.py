"""Trajectory-parameter distance: each implementation against the PyTorch reference, with
the memory bandwidth it reaches.

Bytes moved per parameter (fp32): forward reads a, target, start (12 B); backward to a
alone reads a and target and writes the gradient (12 B). On a GPU the figure is compared
with the device's HBM peak (target >= 80% at P >= 16M); on CPU with what torch's own
elementwise `a - t` (2 reads + 1 write) reaches on this machine.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks._measure import median_time, synced
from d3fast import kernels
from d3fast._ext import HAS_EXT
from d3fast.runtime import device_peaks


def _peak_gbs(device: torch.device) -> float | None:
    peaks = device_peaks(device)
    return peaks[1] * 1000 if peaks else None


def _elementwise_gbs(P: int, device: torch.device) -> float:
    a, t = torch.randn(P, device=device), torch.randn(P, device=device)
    out = torch.empty_like(a)
    sec = median_time(lambda: torch.sub(a, t, out=out), device)
    return 3 * 4 * P / sec / 1e9


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("P", [1 << 20, 1 << 24], ids=["1M", "16M"])
@pytest.mark.parametrize("impl", ["reference", "cpp", "triton"])
def test_param_dist(benchmark, provenance, impl, P, mode):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if impl == "cpp" and (device.type != "cpu" or not HAS_EXT):
        pytest.skip("the C++ kernel runs on CPU tensors with d3fast._C built")
    if impl == "triton" and device.type != "cuda":
        pytest.skip("Triton is benchmarked on a GPU (the interpreter is for tests)")
    grad = mode == "fwd+bwd"
    g = torch.Generator(device=device).manual_seed(0)
    t = torch.randn(P, generator=g, device=device)
    a = (t + 0.1 * torch.randn(P, generator=g, device=device)).requires_grad_(grad)
    s = t + torch.randn(P, generator=g, device=device)

    def step(which):
        def fn():
            out = kernels.param_dist(a, t, s, impl=which)
            if grad:
                a.grad = None
                out.backward()
            return out
        return fn

    ref = kernels.param_dist(a.double(), t.double(), s.double(), impl="reference")
    torch.testing.assert_close(step(impl)().double(), ref, rtol=1e-5, atol=0)
    # the sync is inside the timed call: a GPU kernel's time, not its launch
    benchmark.pedantic(synced(step(impl), device), rounds=7, warmup_rounds=1, iterations=1)
    median = benchmark.stats["median"]
    moved = (24 if grad else 12) * P
    gbs = moved / median / 1e9
    peak = _peak_gbs(device)
    ref_median = median if impl == "reference" else median_time(step("reference"), device)
    benchmark.extra_info.update(
        P=P, impl=impl, mode=mode, median_s=round(median, 6), reference_median_s=round(ref_median, 6),
        speedup_vs_reference=round(ref_median / median, 2), achieved_gbs=round(gbs, 1),
        hbm_peak_gbs=peak, fraction_of_hbm_peak=round(gbs / peak, 3) if peak else None,
        torch_elementwise_gbs=round(_elementwise_gbs(P, device), 1),
    )
    if impl != "reference":
        ratios = {"speedup vs reference": round(ref_median / median, 2)}
        targets = {}
        if peak:
            ratios["fraction of HBM peak"] = round(gbs / peak, 3)
            if P >= 1 << 24:
                targets["fraction of HBM peak"] = 0.8
        else:
            ratios["vs torch elementwise GB/s"] = round(gbs / benchmark.extra_info["torch_elementwise_gbs"], 2)
        benchmark.extra_info.update(ratios=ratios, targets=targets)
