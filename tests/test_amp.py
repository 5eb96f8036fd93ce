"""Under --amp (bf16 autocast) the precision-sensitive parts stay float32: the student's
group norms (also inside torch.func.vmap, where autocast leaves them in bf16), the median
heuristic's distances and the diversity term. CPU autocast runs the same dispatch logic
as CUDA's for these ops, so this is tested here; the GPU check reruns the unroll on CUDA."""

from __future__ import annotations

import copy

import torch
from torch.func import grad, vmap
from torch.utils._python_dispatch import TorchDispatchMode

from d3fast.config import resolve_config
from d3fast.data.loader import DeviceDataset
from d3fast.distilled import init_distilled
from d3fast.mmd_update import mmd_terms
from d3fast.models import build_network
from d3fast.models._layers import GroupNorm32
from d3fast.unroll import Student


class DtypesOf(TorchDispatchMode):
    """The input dtypes every op named in `names` ran with."""

    def __init__(self, *names: str) -> None:
        super().__init__()
        self.names, self.seen = names, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name in self.names:
            self.seen.setdefault(name, set()).update(a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point())
        return func(*args, **(kwargs or {}))


def bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def test_group_norm_is_float32_under_autocast_with_and_without_vmap():
    net = build_network("convnet", 3, 10, 32, width=16, depth=3)
    student = Student(net)
    theta = torch.randn(2, sum(student.sizes), generator=torch.Generator().manual_seed(0)) * 0.05
    x, y = torch.randn(2, 4, 3, 32, 32), torch.randint(0, 10, (4,))
    with DtypesOf("native_group_norm", "native_group_norm_backward") as rec, bf16():
        vmap(grad(student.loss), in_dims=(0, 0, None))(theta, x, y)  # K students
        t = theta[0].clone().requires_grad_(True)
        torch.autograd.grad(student.loss(t, x[0], y), t)  # one student: plain autograd
    assert rec.seen and all(dt == {torch.float32} for dt in rec.seen.values()), rec.seen


def test_group_norm32_is_nn_group_norm_outside_autocast():
    ref = torch.nn.GroupNorm(4, 8)
    mine = GroupNorm32(4, 8)
    mine.load_state_dict(ref.state_dict())
    x = torch.randn(3, 8, 5, 5)
    assert torch.equal(mine(x), ref(x))
    with bf16():
        assert mine(x.bfloat16()).dtype == torch.float32


def test_median_heuristic_and_diversity_are_float32_under_autocast():
    meta = {"resolution": 16, "channels": 3, "mean": [0.4, 0.5, 0.6], "std": [0.2, 0.25, 0.3], "z_dim": 8,
            "decoder": "paper", "decoder_width": 16}
    d = init_distilled(3, 2, ["a", "b", "c"], meta, 0.01, torch.device("cpu"), seed=3)
    net = build_network("convnet", 3, 3, 16, width=8, depth=2).requires_grad_(False)
    images = torch.randint(0, 256, (30, 3, 16, 16), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    train = DeviceDataset(images, torch.arange(3).repeat_interleave(10), torch.tensor(meta["mean"]),
                          torch.tensor(meta["std"]), ["a", "b", "c"])
    dcfg = copy.deepcopy(resolve_config("digits", overrides=["distill.mmd_samples=6", "distill.mmd_scale=median",
                                                             "distill.ppc=2", "distill.div_weight=1"]).distill)
    # batched matmuls are the distances (the decoder's Linear is addmm, its convolutions
    # are convolutions: those run in bf16, as autocast means them to)
    with DtypesOf("bmm") as rec, bf16():
        mmd, div = mmd_terms(net, d, train, dcfg, torch.Generator().manual_seed(0))
    assert rec.seen["bmm"] == {torch.float32}, rec.seen
    assert mmd.dtype == div.dtype == torch.float32 and torch.isfinite(mmd) and div < 0
