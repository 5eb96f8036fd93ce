"""Plain supervised training pieces shared by experts and student evaluation."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from d3fast.data.loader import DeviceDataset


def train_epoch(
    net: nn.Module,
    opt: torch.optim.Optimizer,
    data: DeviceDataset,
    batch_size: int,
    generator: torch.Generator,
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
    on_step: Callable[[int], None] | None = None,
) -> tuple[float, float]:
    """One shuffled pass; returns (mean loss, accuracy) over the epoch's training batches.
    `on_step(i)` runs after the i-th optimiser step (1-based), e.g. to snapshot the
    parameters within the epoch."""
    net.train()
    loss_sum = torch.zeros((), device=data.device)
    correct = torch.zeros((), device=data.device, dtype=torch.long)
    n = n_steps = 0
    for x, y in data.batches(batch_size, shuffle=True, generator=generator):
        if augment is not None:
            x = augment(x, generator)
        out = net(x)
        loss = F.cross_entropy(out, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        n_steps += 1
        if on_step is not None:
            on_step(n_steps)
        # accumulate on device: one host sync per epoch, not per batch
        loss_sum += loss.detach() * len(y)
        correct += (out.argmax(1) == y).sum()
        n += len(y)
    return loss_sum.item() / max(n, 1), correct.item() / max(n, 1)


@torch.no_grad()
def evaluate_accuracy(net: nn.Module, data: DeviceDataset, batch_size: int = 1024) -> float:
    was_training = net.training
    net.eval()
    correct = torch.zeros((), device=data.device, dtype=torch.long)
    for x, y in data.batches(batch_size, shuffle=False):
        correct += (net(x).argmax(1) == y).sum()
    net.train(was_training)
    return correct.item() / max(len(data), 1)


def flat_params(net: nn.Module) -> torch.Tensor:
    """All parameters as one float32 vector (named_parameters order) on the CPU."""
    return torch.cat([p.detach().reshape(-1).float().cpu() for p in net.parameters()])


def load_flat_params(net: nn.Module, flat: torch.Tensor) -> None:
    """Copy a flat vector into the parameters (never alias it: vector_to_parameters would
    make them views of `flat`, and training would then overwrite it in place)."""
    with torch.no_grad():
        offset = 0
        for p in net.parameters():
            p.copy_(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()


def param_layout(net: nn.Module) -> list[tuple[str, list[int]]]:
    return [(name, list(p.shape)) for name, p in net.named_parameters()]
