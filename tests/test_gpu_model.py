"""The GPU projection's arithmetic (d3fast/gpu_model.py), against numbers worked by hand."""

from __future__ import annotations

import pytest

from d3fast import gpu_model


def test_each_floor_is_its_count_over_its_rate_and_the_step_takes_the_larger():
    tf32 = gpu_model.GPUS["H200 SXM"]["tf32"] * 1e12
    # 1,000 kernels: 5 ms eager, 3 ms compiled, 1 ms in CUDA graphs; FLOPs for 4 ms of TF32
    rows = {p.gpu: p for p in gpu_model.project(1000, 0.004 * tf32, compiled=False, amp=False)}
    p = rows["H200 SXM"]
    assert p.launch_floor_ms == pytest.approx({"eager": 5.0, "compiled": 3.0, "cuda graphs": 1.0})
    assert p.compute_floor_ms == pytest.approx(4.0)
    assert p.floor_ms == pytest.approx(5.0) and p.bound == "launches" and p.target_ms == 120
    # compiled, the same step is compute-bound; bf16 halves the compute floor
    p = next(q for q in gpu_model.project(1000, 0.004 * tf32, compiled=True, amp=False) if q.gpu == "H200 SXM")
    assert p.floor_ms == pytest.approx(4.0) and p.bound == "compute" and p.mode == "compiled"
    p = next(q for q in gpu_model.project(1000, 0.004 * tf32, compiled=True, amp=True) if q.gpu == "H200 SXM")
    assert p.compute_floor_ms == pytest.approx(2.0) and p.precision == "bf16" and p.floor_ms == pytest.approx(3.0)
    for kernels, flops in ((-1, 0.0), (1.5, 0.0), (True, 0.0), (0, float("nan")), (0, -1.0), (0, float("inf"))):
        with pytest.raises(ValueError, match="kernels must be an int >= 0"):
            gpu_model.project(kernels, flops, compiled=False, amp=False)


def test_a_measured_step_gives_the_time_per_kernel_beyond_the_compute_floor():
    tf32 = gpu_model.GPUS["H100 SXM"]["tf32"] * 1e12
    m = gpu_model.measured(0.150, 10_000, 0.010 * tf32, "NVIDIA H100 80GB HBM3", amp=False)
    assert m["compute_floor_ms"] == pytest.approx(10.0) and not m["meets_target"]
    assert m["us_per_kernel"] == pytest.approx((0.150 - 0.010) / 10_000 * 1e6)
    m = gpu_model.measured(0.100, 0, 0.0, "Some Other GPU", amp=True)
    assert m["meets_target"] and m["compute_floor_ms"] is None and m["us_per_kernel"] is None
    for name in ("NVIDIA H100 PCIe", "NVIDIA H100 NVL"):  # other peaks than the SXM part's
        assert gpu_model.measured(0.1, 10, 1e12, name, amp=False)["compute_floor_ms"] is None
    assert gpu_model.measured(0.1, 10, 1e12, "nvidia h200", amp=False)["compute_floor_ms"] is not None
    # FLOPs the step could not have done in its time: no us per kernel from them
    assert gpu_model.measured(0.1, 10, 1e18, "NVIDIA H100 80GB HBM3", amp=False)["us_per_kernel"] is None
    for bad in ((0.0, 10, 0.0, "H100"), (-1.0, 10, 0.0, "H100"), (0.1, -5, 0.0, "H100"), (0.1, 5, 0.0, None)):
        with pytest.raises(ValueError, match="measured: need step_s > 0"):
            gpu_model.measured(*bad, amp=False)
