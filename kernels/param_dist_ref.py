"""Trajectory-parameter distance in plain PyTorch: the reference for kernels/param_dist_triton.py
(Triton) and csrc/param_dist.cpp, and the fallback. Imports no Triton.

    L = ||a - t||^2 / ||s - t||^2           (a: the student after N steps, t: the expert at
                                             T+M, s: the expert at T, where the student started)
    dL/da = 2 (a - t) / den,  dL/ds = -2 L (s - t) / den,  dL/dt = -(dL/da + dL/ds)

Over flat vectors [P], batches of students [S, P] (-> [S]), or lists of segments (a
model's parameters) whose sums add up.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def param_dist_ref(
    a: torch.Tensor | Sequence[torch.Tensor],
    target: torch.Tensor | Sequence[torch.Tensor],
    start: torch.Tensor | Sequence[torch.Tensor],
) -> torch.Tensor:
    """Reference distance; arguments as `d3fast.kernels.param_dist` (checked there).
    Sums in float64 for float64 inputs, else float32; returns [S] or a scalar."""
    if isinstance(a, torch.Tensor):
        a, target, start = [a], [target], [start]  # type: ignore[list-item]
    dtype = torch.float64 if a[0].dtype == torch.float64 else torch.float32
    num = sum(((ak.to(dtype) - tk.to(dtype)) ** 2).sum(-1) for ak, tk in zip(a, target, strict=True))
    den = sum(((sk.to(dtype) - tk.to(dtype)) ** 2).sum(-1) for sk, tk in zip(start, target, strict=True))
    return num / den  # type: ignore[operator]


def input_grads(
    sides: Sequence[Sequence[torch.Tensor] | None], dtypes: Sequence[torch.dtype], n_seg: int
) -> tuple[torch.Tensor | None, ...]:
    """Autograd's return value for inputs (n_seg, a_1..a_n, t_1..t_n, s_1..s_n): None for
    n_seg, then each side's segment gradients in their input dtypes (None for a side that
    needs none). Shared by the Triton and C++ wrappers."""
    out: list[torch.Tensor | None] = [None]
    for k, side in enumerate(sides):
        dts = dtypes[k * n_seg : (k + 1) * n_seg]
        out.extend([None] * n_seg if side is None else [g.to(dt) for g, dt in zip(side, dts, strict=True)])
    return tuple(out)
