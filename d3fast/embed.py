"""Feature embedding in chunks with an exact gradient: the memory-flat half of the MMD update.

At PPC=1 the MMD update dominates memory (docs/algorithm.md section 5): with one graph, every decoded
sample keeps its ConvNet activations for backward: 35 MiB of layer outputs per image for
ConvNet-5 (width 128) at 128x128, 10 GiB for 10 classes x 30 samples.
`embed` computes the same features and the same gradient with two passes:

  forward   features of chunk after chunk under no_grad; only x and the features are kept
  backward  given dL/dfeatures, re-embed one chunk at a time with a graph and pull the
            gradient back to that chunk's images: dL/dx = J_chunk^T dL/dfeatures_chunk

so the feature network holds one chunk's graph at a time. It costs one more forward of
the feature network (the backward's recomputation).

The decoder is not chunked: the decoded batch x = f(z) keeps its own graph, which is 11x
smaller per sample than the ConvNet's (3.1 MiB at 128 px for the paper decoder) and keeps
the decoder's train-mode BatchNorm exactly as in the one-pass update: statistics over the
whole sample set, with their gradient. Chunking the decoder would need either frozen
statistics (a different gradient) or one sweep over all chunks per BatchNorm layer.

Exactness needs a feature network whose output for a sample does not depend on the rest
of the batch (instance/group/layer norm, or none); with batch norm in training mode the
features change with the chunking, so `embed` then takes the one-pass path.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import nn

from d3fast.runtime import free_memory

# Share of the free memory the automatic chunk may fill with one chunk's graph, and a cap
# on the CPU: there, beyond ~1 GiB per chunk larger chunks stop paying (conv kernels are
# saturated at ~32 images of 128 px on 2 cores) while the peak keeps growing with them. A
# GPU has no such cap: every launch covers more samples, and at the ImageWoof shape (300
# samples x 35 MiB) the whole set fits in a quarter of an H200 (one pass, no recomputation).
AUTO_FRACTION = 0.25
AUTO_CAP_BYTES = {"cpu": 1 << 30}
# activation_bytes per (network, sample shape): measured once, it costs a forward pass
_PER_SAMPLE: weakref.WeakKeyDictionary[nn.Module, dict[tuple[Any, ...], int]] = weakref.WeakKeyDictionary()


def batch_dependent(net: nn.Module) -> bool:
    """Whether a sample's output depends on the other samples of its batch."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in net.modules())


def activation_bytes(features: Callable[[torch.Tensor], torch.Tensor], net: nn.Module, sample: torch.Tensor) -> int:
    """Bytes of the outputs of every leaf module for one sample: about what autograd saves
    per sample (each op keeps its input or output) for a graph through `features`."""
    total = 0

    def hook(_m: nn.Module, _i: object, out: object) -> None:
        nonlocal total
        if isinstance(out, torch.Tensor):
            total += out.numel() * out.element_size()

    leaves = [m for m in net.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        with torch.no_grad():
            features(sample[:1])
    finally:
        for h in handles:
            h.remove()
    return total


def auto_chunk(features: Callable[[torch.Tensor], torch.Tensor], net: nn.Module, x: torch.Tensor) -> int:
    """Samples per chunk so that one chunk's graph fills at most 25% of free memory (and
    1 GiB on the CPU); at least 1. The per-sample size is measured once per network and
    sample shape."""
    key = (tuple(x.shape[1:]), x.dtype, x.device, torch.is_autocast_enabled(x.device.type))
    known = _PER_SAMPLE.setdefault(net, {})
    if key not in known:
        known[key] = max(activation_bytes(features, net, x), 1)
    budget = min(AUTO_FRACTION * free_memory(x.device), AUTO_CAP_BYTES.get(x.device.type, math.inf))
    return max(1, int(budget // known[key]))


class _ChunkedEmbed(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, features: Callable[[torch.Tensor], torch.Tensor], chunk: int) -> torch.Tensor:  # type: ignore[override]
        # autocast is on in forward under --amp; backward runs outside it, so remember it
        dev = x.device.type
        ctx.autocast = (dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
        ctx.features, ctx.chunk = features, chunk
        ctx.save_for_backward(x)
        with torch.no_grad():
            return torch.cat([features(x[s : s + chunk]) for s in range(0, len(x), chunk)])

    @staticmethod
    def backward(ctx, grad_f: torch.Tensor):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        dev, on, dtype = ctx.autocast
        grad_x = torch.empty_like(x)
        for s in range(0, len(x), ctx.chunk):
            xc = x[s : s + ctx.chunk].detach().requires_grad_(True)
            with torch.enable_grad(), torch.autocast(dev, enabled=on, dtype=dtype):
                fc = ctx.features(xc)
            (gc,) = torch.autograd.grad(fc, xc, grad_f[s : s + ctx.chunk].to(fc.dtype))
            grad_x[s : s + ctx.chunk] = gc
        return grad_x, None, None


def embed(
    net: nn.Module, x: torch.Tensor, chunk: int = 0, exact_graph: bool = False,
    features: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """features(x) [N, ...] with the gradient to x of the one-pass graph, holding the feature
    network's graph for at most `chunk` samples at a time (0: `auto_chunk`).

    One pass (a single graph) when `exact_graph`, when x needs no gradient (then chunks run
    under no_grad), when the chunk covers every sample, or when the network's output
    depends on the batch (train-mode batch norm)."""
    if features is None:
        features = cast(Callable[[torch.Tensor], torch.Tensor], net.features)
    if chunk < 0:
        raise ValueError(f"chunk must be >= 0, got {chunk}")
    if exact_graph or batch_dependent(net):
        return features(x)
    chunk = chunk or auto_chunk(features, net, x)
    if not (x.requires_grad and torch.is_grad_enabled()):
        if chunk >= len(x):
            return features(x)
        with torch.no_grad():
            return torch.cat([features(x[s : s + chunk]) for s in range(0, len(x), chunk)])
    if chunk >= len(x):
        return features(x)
    return _ChunkedEmbed.apply(x, features, chunk)
