"""The flat (recomputation) MTT unroll against the naive one, which keeps the graph of
every step: gradients w.r.t. latents, decoder parameters and the learned lr must agree,
with augmentation on, for several unroll lengths and several students."""

import pytest
import torch

from d3fast.config import AugConfig
from d3fast.data.augment import DSA
from d3fast.distilled import init_distilled
from d3fast.errors import D3FastError
from d3fast.models import build_network
from d3fast.unroll import Student, UnrollSpec, mtt_loss, unroll
from tests._utils import F64_GRAD_TOL, assert_grads_match, assert_within_floor, rel_err

N_CLS, PPC, RES = 3, 2, 8


def setup(dtype, students=1, augment=True, batch=4, steps=2, norm="instancenorm", device="cpu"):
    meta = {"resolution": RES, "channels": 1, "mean": [0.5], "std": [0.25], "z_dim": 6,
            "decoder": "tiny", "decoder_width": 8}
    d = init_distilled(N_CLS, PPC, ["a", "b", "c"], meta, 0.05, torch.device(device), seed=3, dtype=dtype)
    torch.manual_seed(0)
    net = build_network("convnet", 1, N_CLS, RES, width=8, depth=1, norm=norm).to(device, dtype)
    student = Student(net)
    P = sum(student.sizes)
    g = torch.Generator().manual_seed(11)
    # float32 draws cast to `dtype`: float32 and float64 setups hold the same values
    theta0 = (torch.randn(students, P, generator=g) * 0.3).to(dtype)
    target = theta0 + (torch.randn(students, P, generator=g) * 0.05).to(dtype)
    spec = UnrollSpec(student, steps, batch, DSA(AugConfig()) if augment else None)
    return d, spec, theta0.to(device), target.to(device)


def gradients(mode, d, spec, theta0, target):
    """MTT loss and its gradients w.r.t. every distilled tensor, from fixed generators (on
    theta0's device, and a CPU one for the DSA ops)."""
    g = torch.Generator(device=theta0.device).manual_seed(5)
    phi = [d.latents, d.alpha, *d.decoder.parameters()]
    for p in phi:
        p.grad = None
    loss = mtt_loss(unroll(spec, d, theta0, g, mode, host=torch.Generator().manual_seed(6)), target, theta0)
    grads = torch.autograd.grad(loss, phi)
    return loss.detach(), grads, g.get_state()


# float32: another unroll's worst error against the float64 naive gradient, over the float32
# naive unroll's worst; measured 0.29-2.9 (1 to 7 steps, 1 to 3 students; ATen kernels
# default/avx2/avx512, oneDNN and MKL down to SSE4), while a wrong term leaves an error of order
# 1, 10^5 times the floor (~1e-5)
F32_FACTOR = 8.0


def assert_as_exact_as_naive(dtype, names, got, naive, setup_kw):
    """`got` = (loss, gradients) of another unroll against the naive unroll's `naive`, both in
    `dtype`. float64: within F64_GRAD_TOL (measured: at most 3.5e-14). float32: a floor measured
    here instead of a constant: the naive unroll's own float32 error against the same
    computation in float64 (the same values: the setup draws in float32), and `got`'s error
    against it at most F32_FACTOR times that."""
    if dtype == torch.float64:
        assert rel_err(got[0], naive[0]) < F64_GRAD_TOL
        assert_grads_match(names, got[1], naive[1], F64_GRAD_TOL)
        return
    d, spec, theta0, target = setup(torch.float64, **setup_kw)
    loss64, grads64, _ = gradients("naive", d, spec, theta0, target)
    assert_within_floor(["loss"], [got[0]], [naive[0]], [loss64], F32_FACTOR)
    assert_within_floor(names, got[1], naive[1], grads64, F32_FACTOR)


@pytest.mark.parametrize("steps", [1, 2, 7])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_flat_equals_naive(steps, dtype):
    d, spec, theta0, target = setup(dtype, steps=steps)
    loss_n, grads_n, state_n = gradients("naive", d, spec, theta0, target)
    buffers = [b.clone() for b in d.decoder.buffers()]
    d2, spec2, _, _ = setup(dtype, steps=steps)
    loss_f, grads_f, state_f = gradients("flat", d2, spec2, theta0, target)
    assert torch.equal(state_n, state_f), "both unrolls must consume the generator identically"
    names = ["latents", "alpha"] + [n for n, _ in d.decoder.named_parameters()]
    # the gradients are there at all, or the comparison would prove nothing
    assert grads_n[0].norm() > 0 and grads_n[1].abs() > 0
    assert_as_exact_as_naive(dtype, names, (loss_f, grads_f), (loss_n, grads_n), {"steps": steps})
    # recomputation leaves the decoder's BatchNorm statistics where the naive unroll leaves
    # them: the same operations on the same batch (measured: equal to the bit)
    for b, b2 in zip(buffers, d2.decoder.buffers(), strict=True):
        assert torch.allclose(b.double(), b2.double(), rtol=1e-12, atol=0)


def test_vmapped_students_equal_a_loop():
    d, spec, theta0, target = setup(torch.float64, students=3, steps=3)
    loss_n, grads_n, _ = gradients("naive", d, spec, theta0, target)
    d2, spec2, _, _ = setup(torch.float64, students=3, steps=3)
    loss_f, grads_f, _ = gradients("flat", d2, spec2, theta0, target)
    assert rel_err(loss_f, loss_n) < F64_GRAD_TOL
    assert_grads_match(range(len(grads_n)), grads_f, grads_n, F64_GRAD_TOL)
    # and the K students really differ: the loss is a mean of distinct per-student terms
    d3, spec3, _, _ = setup(torch.float64, students=3, steps=3)
    per = unroll(spec3, d3, theta0, torch.Generator().manual_seed(5), "flat")
    assert not torch.allclose(per[0], per[1])


def test_without_augmentation_and_all_latents_per_step():
    d, spec, theta0, target = setup(torch.float64, augment=False, batch=0, steps=3)
    _, grads_n, _ = gradients("naive", d, spec, theta0, target)
    d2, spec2, _, _ = setup(torch.float64, augment=False, batch=0, steps=3)
    _, grads_f, _ = gradients("flat", d2, spec2, theta0, target)
    assert_grads_match(range(len(grads_n)), grads_f, grads_n, F64_GRAD_TOL)


def test_flat_refuses_students_with_running_statistics():
    d, spec, theta0, _ = setup(torch.float32, norm="batchnorm")
    with pytest.raises(D3FastError, match="naive"):
        unroll(spec, d, theta0, torch.Generator().manual_seed(0), "flat")
    with pytest.raises(D3FastError, match="unroll mode"):
        unroll(spec, d, theta0, torch.Generator().manual_seed(0), "checkpointed")


@pytest.mark.parametrize("budget_steps", [0, 3, 7], ids=["all-recomputed", "some-kept", "all-kept"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_auto_equals_naive_whatever_the_budget_keeps(budget_steps, dtype, monkeypatch):
    """--unroll auto: a flat head and a naive tail, split where the budget says; a budget
    holding 0, 3 and all 7 step graphs gives naive's gradient and generator stream."""
    import d3fast.unroll as u

    steps = 7
    d, spec, theta0, target = setup(dtype, steps=steps, students=2)
    loss_n, grads_n, state_n = gradients("naive", d, spec, theta0, target)
    d2, spec2, _, _ = setup(dtype, steps=steps, students=2)
    gradients("auto", d2, spec2, theta0, target)  # measures one step's graph
    assert spec2.step_bytes > 0
    # free memory that holds exactly `budget_steps` graphs at the default budget (0.5)
    monkeypatch.setattr(u, "free_memory", lambda device: int(2 * spec2.step_bytes * (budget_steps + 0.5)))
    d3, spec3, _, _ = setup(dtype, steps=steps, students=2)
    spec3.step_bytes = spec2.step_bytes
    loss_a, grads_a, state_a = gradients("auto", d3, spec3, theta0, target)
    assert spec3.kept == budget_steps
    assert torch.equal(state_n, state_a), "auto must consume the generator as naive does"
    names = ["latents", "alpha"] + [n for n, _ in d.decoder.named_parameters()]
    assert grads_n[0].norm() > 0 and grads_n[1].abs() > 0
    assert_as_exact_as_naive(dtype, names, (loss_a, grads_a), (loss_n, grads_n), {"steps": steps, "students": 2})


def test_auto_measures_a_step_without_touching_the_streams_or_statistics():
    d, spec, theta0, target = setup(torch.float64, steps=3, batch=0)
    buffers = [b.clone() for b in d.decoder.buffers()]
    import d3fast.unroll as u

    g = torch.Generator().manual_seed(5)
    before = g.get_state()
    nbytes = u._step_bytes(spec, d, theta0, d.lr(), g, None)
    assert torch.equal(g.get_state(), before)
    assert all(torch.equal(a, b) for a, b in zip(buffers, d.decoder.buffers(), strict=True))
    # at least the student's activations and the decoded batch: more than theta itself
    assert nbytes > theta0.numel() * theta0.element_size()
    bn, bspec, btheta, _ = setup(torch.float64, steps=2, norm="batchnorm")
    unroll(bspec, bn, btheta, torch.Generator().manual_seed(0), "auto")  # running statistics: all naive
    assert bspec.kept == 2 and bspec.step_bytes is None
