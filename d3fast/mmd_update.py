"""The MMD update of a distillation step (docs/algorithm.md section 5): match the feature
distribution of each class's decoded samples to its real images', plus the diversity term,
then step the latents and the decoder.

All classes are decoded in one batch (the decoder's train-mode BatchNorm sees the whole
sample set, as in the reference code) and go through one batched MMD op over [C, n, D] x
[C, m, D]. The ConvNet features are embedded in chunks with an exact two-pass gradient
(d3fast/embed.py), so the feature network holds one chunk's graph at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import torch

from d3fast import losses
from d3fast.config import DistillConfig
from d3fast.data.loader import DeviceDataset
from d3fast.dist import World
from d3fast.distilled import Distilled
from d3fast.embed import auto_chunk, embed
from d3fast.errors import D3FastError
from d3fast.phases import DATA, DECODE, LOSSES, MMD, OPTIMIZERS, phase
from d3fast.state import StepChecks, TrainState
from d3fast.training import load_flat_params


def mmd_update(
    state: TrainState, feature_net: torch.nn.Module, feat_params: torch.Tensor, train: DeviceDataset,
    dcfg: DistillConfig, amp: Callable[[], AbstractContextManager[None]], checks: StepChecks,
    world: World | None = None, features: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One MMD update of `state` (latents and decoder): returns the (MMD, diversity) terms,
    detached (in a distributed run, this rank's shares: they sum over the ranks to the
    terms); zeros when both are off. The terms and the state after the step are noted in
    `checks` (read once per step by the loop). `features`: feature_net.features or a
    compiled version of it (distill.compile)."""
    world = world or World()
    d = state.distilled
    zero = torch.zeros((), device=d.latents.device)
    if not (dcfg.mmd_weight > 0 or (dcfg.div_weight > 0 and dcfg.ppc > 1)):
        checks.loss("MMD update", mmd=zero, div=zero)
        return zero, zero
    with phase(MMD):
        load_flat_params(feature_net, feat_params)
        with amp():
            mmd, div = mmd_terms(feature_net, d, train, dcfg, state.g_device, world, features)
    with phase(LOSSES):
        checks.loss("MMD update", mmd=mmd, div=div)
    with phase(OPTIMIZERS):
        state.opt_latent.zero_grad(set_to_none=True)
        state.opt_decoder.zero_grad(set_to_none=True)
    with phase(MMD):
        # W x this rank's share: the mean over ranks of these losses is the whole term
        (world.size * (dcfg.mmd_weight * mmd + dcfg.div_weight * div)).backward()
    with phase(OPTIMIZERS):
        world.average_grads(d.params())
        state.opt_latent.step()
        state.opt_decoder.step()
        checks.state(list(state.named_tensors()), d, "MMD update")
    return mmd.detach(), div.detach()


def fp32(device: torch.device) -> AbstractContextManager[None]:
    """Autocast off: what runs inside computes in the dtype of its (float32 or float64) inputs."""
    return torch.autocast(device.type, enabled=False)


def mmd_terms(
    feature_net: torch.nn.Module, d: Distilled, train: DeviceDataset, dcfg: DistillConfig, g: torch.Generator,
    world: World | None = None, features: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(MMD term, diversity term), with their graphs. Real features come from S images per
    class; each prior decodes S // PPC samples, so both sides hold about S samples per
    class. Features are embedded in chunks of `mmd_chunk` samples unless `mmd_exact_graph`.

    Distributed (`world`), a rank takes a contiguous range of classes: it draws every
    class's real images and noise (the generator moves as in one process), keeps its own,
    and returns its shares of the two terms (summed over the ranks: the terms)."""
    world = world or World()
    n_cls, ppc = d.num_classes, d.ppc
    if n_cls < world.size:
        raise D3FastError(f"{n_cls} classes cannot be split over {world.size} ranks: at most {n_cls} ranks")
    mine = world.split(n_cls)  # this rank's classes
    n_mine = mine.stop - mine.start
    priors = slice(mine.start * ppc, mine.stop * ppc)
    per_prior = max(dcfg.mmd_samples // ppc, 1)
    chunk, one_graph = dcfg.mmd_chunk, dcfg.mmd_exact_graph
    # features and distances in the parameters' dtype: float32 (from bf16 under --amp), or float64
    mmd = torch.zeros((), device=d.latents.device)
    if dcfg.mmd_weight > 0:
        with torch.no_grad():
            with phase(DATA):
                real = train.sample_per_class(per_prior * ppc, g, mine, d.dtype)  # [C, S, ch, H, W]
            if not chunk and not one_graph:  # once for both sides: they have the same image shape
                chunk = auto_chunk(feature_net.features, feature_net, real[0])  # type: ignore[arg-type]
            f_real = embed(feature_net, real.flatten(0, 1), chunk, one_graph, features).to(d.dtype).view(n_mine, per_prior * ppc, -1)
        idx = torch.arange(len(d.latents), device=d.latents.device).repeat_interleave(per_prior)
        with phase(DECODE):
            # [C * PPC * per_prior, ch, H, W], class-major: this rank's classes' rows
            x = d.decode(idx, g, slice(priors.start * per_prior, priors.stop * per_prior))
        f_syn = embed(feature_net, x, chunk, one_graph, features).to(d.dtype).view(n_mine, ppc * per_prior, -1)
        with fp32(x.device):  # distances of features: full precision even under --amp
            scale = None
            if dcfg.mmd_scale == "median":
                # sqrt(median d^2) of the real features, kept on the device (no read-back);
                # floored so that identical images cannot make every bandwidth 0
                every = world.gather_cat(f_real)  # over all classes, as in one process
                scale = losses.pairwise_sq_dists(every, every).median().sqrt().clamp_min(1e-12)
            per_class = losses.mmd2(f_syn, f_real, dcfg.mmd_bandwidths, bandwidth_scale=scale)
        mmd = per_class.sum() if dcfg.mmd_reduction == "sum" else per_class.sum() / n_cls
    div = torch.zeros((), device=d.latents.device)
    if ppc > 1 and dcfg.div_weight > 0:
        with phase(DECODE):
            means = d.mean_images(priors)
        with fp32(means.device):
            # a mean over classes: this rank's classes' share of it
            div = losses.diversity(means.to(d.dtype).view(n_mine, ppc, *means.shape[1:])) * (n_mine / n_cls)
    return mmd, div
