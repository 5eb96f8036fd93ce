"""A distillation step's floor on a GPU, projected from two counts any machine can make.

`d3fast profile` (d3fast/recipes/profile.py) counts one step of the real loop twice over:

  kernels  launched per step (phases.KernelCounter), eager or compiled as the step ran: on a
           CPU, Inductor's kernels plus every innermost kernel-running aten op, about one GPU
           launch each;
  FLOPs    of its convolutions and matrix products, forward, backward and double backward
           (phases.FlopCounter, torch's flop_counter formulas, on an eager step: the same
           arithmetic a compiled step does). Elementwise ops and the fused MMD op are not counted: at
           D3's shapes the MMD is 4 C (n + m)^2 D = 0.3 GFLOP against the ConvNet's TFLOPs.

From them, per GPU:

  launch floor   kernels x the time one kernel holds the stream when issued back to back;
  compute floor  FLOPs / the GPU's dense tensor-core peak at the step's precision (TF32,
                 cuDNN's default for float32 convolutions; BF16 under --amp).

A step takes at least the larger floor (the other overlaps it at best), so the projection is
a lower bound: a step whose launch floor passes the target cannot meet it whatever the GPU
computes. The per-kernel times are assumptions, not measurements (LAUNCH_US); on a GPU the
profile reports the measured step and the microseconds per kernel it implies instead.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

# The step time the project targets on one H100/H200 at ImageWoof's shape (issue 31).
TARGET_STEP_S = 0.120

# Dense tensor-core peaks, TFLOP/s (NVIDIA H100 and H200 datasheets, SXM: the sparse figures
# halved). The H200 has the H100's compute and more, faster memory.
GPUS: dict[str, dict[str, float]] = {
    "H100 SXM": {"tf32": 494.7, "bf16": 989.4},
    "H200 SXM": {"tf32": 494.7, "bf16": 989.4},
}

# Microseconds a kernel holds the stream when launched back to back, by how the step launches
# them. Assumed, from typical figures: eager PyTorch is bound by its host side (Python, the
# dispatcher and cudaLaunchKernel: 3-10 us an op); Inductor's generated wrapper launches
# Triton kernels with less of it; a CUDA graph replays its kernels with ~1 us between them.
LAUNCH_US: dict[str, float] = {"eager": 5.0, "compiled": 3.0, "cuda graphs": 1.0}


@dataclass
class Projection:
    gpu: str
    precision: str  # "tf32" | "bf16"
    kernels: int
    flops: float
    launch_floor_ms: dict[str, float]  # by LAUNCH_US mode
    compute_floor_ms: float
    mode: str  # the launch mode the profiled step used ("eager" or "compiled")
    floor_ms: float  # max(launch floor in `mode`, compute floor)
    bound: str  # "launches" | "compute"
    target_ms: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def project(kernels: int, flops: float, compiled: bool, amp: bool) -> list[Projection]:
    """The floors of a step of `kernels` launches and `flops` FLOPs on each GPU in GPUS.

    Args:
        kernels: kernels per step (>= 0), as counted.
        flops: convolution and matrix-product FLOPs per step (>= 0).
        compiled: whether the counted step ran compiled (distill.compile): its launches take
            LAUNCH_US["compiled"], else LAUNCH_US["eager"].
        amp: bfloat16 autocast (the BF16 peak) rather than float32 (TF32).

    Returns:
        one Projection per GPU, times in milliseconds.

    Raises:
        ValueError: a kernel count that is not an int >= 0, FLOPs that are not finite and >= 0."""
    if not (isinstance(kernels, int) and not isinstance(kernels, bool) and kernels >= 0
            and isinstance(flops, int | float) and math.isfinite(flops) and flops >= 0):
        raise ValueError(f"kernels must be an int >= 0 and flops a finite number >= 0, not {kernels!r} and {flops!r}")
    precision = "bf16" if amp else "tf32"
    mode = "compiled" if compiled else "eager"
    out = []
    for gpu, peaks in GPUS.items():
        launch = {m: kernels * us / 1e3 for m, us in LAUNCH_US.items()}
        compute = flops / (peaks[precision] * 1e12) * 1e3
        floor = max(launch[mode], compute)
        out.append(Projection(gpu, precision, kernels, flops, launch, compute, mode, floor,
                              "launches" if launch[mode] >= compute else "compute", TARGET_STEP_S * 1e3))
    return out


def measured(step_s: float, kernels: int, flops: float, gpu: str, amp: bool) -> dict[str, Any]:
    """A step measured on a GPU against the target and the compute floor: the microseconds per
    kernel the rest of the step implies (what replaces LAUNCH_US), where `gpu` (a device name)
    is in GPUS (an SXM part: "H100 PCIe" and "H100 NVL" have other peaks and get none).

    Raises:
        ValueError: a step that is not a finite time > 0, a kernel count that is not an int
            >= 0, FLOPs that are not finite and >= 0, a device name that is not a string."""
    if not (isinstance(step_s, int | float) and math.isfinite(step_s) and step_s > 0 and isinstance(gpu, str)
            and isinstance(kernels, int) and not isinstance(kernels, bool) and kernels >= 0
            and isinstance(flops, int | float) and math.isfinite(flops) and flops >= 0):
        raise ValueError(f"measured: need step_s > 0, kernels >= 0, flops >= 0 and a device name; got {step_s!r}, "
                         f"{kernels!r}, {flops!r}, {gpu!r}")
    name = gpu.upper()
    peaks = next((p for key, p in GPUS.items() if key.split()[0] in name and "PCIE" not in name and "NVL" not in name),
                 None)
    compute_s = flops / (peaks["bf16" if amp else "tf32"] * 1e12) if peaks else None
    # a step shorter than its own compute floor: the FLOPs were not this step's (no us per kernel)
    rest = step_s - (compute_s or 0.0)
    if rest < 0:
        return {"step_ms": step_s * 1e3, "target_ms": TARGET_STEP_S * 1e3, "meets_target": step_s <= TARGET_STEP_S,
                "compute_floor_ms": compute_s * 1e3 if compute_s is not None else None, "us_per_kernel": None}
    return {"step_ms": step_s * 1e3, "target_ms": TARGET_STEP_S * 1e3, "meets_target": step_s <= TARGET_STEP_S,
            "compute_floor_ms": compute_s * 1e3 if compute_s is not None else None,
            "us_per_kernel": rest / kernels * 1e6 if kernels else None}
