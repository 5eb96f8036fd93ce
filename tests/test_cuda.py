"""The CUDA path, on a GPU (skipped without one; `scripts/gpu_check.sh` runs `pytest -m cuda`):
the dispatch picks the compiled Triton kernels, the flat unroll equals the naive one on CUDA
(pinned host storage of theta, CUDA generators), the chunked MMD update equals one graph,
DSA on CUDA equals DSA on the CPU for the same draws, a distillation step waits for the
device once, and a short digits run under --amp resumes into the uninterrupted run."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from d3fast import kernels
from d3fast.config import AugConfig
from d3fast.data.augment import DSA
from d3fast.recipes.distill import distill
from d3fast.run import Run
from tests._utils import F64_GRAD_TOL, assert_grads_match, assert_same_state, cfg_of, rel_err
from tests.test_embed import assert_chunked_equals_one_graph
from tests.test_unroll import assert_as_exact_as_naive, gradients, setup

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_check.sh)"),
]
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def _no_tf32():
    """cuDNN and cuBLAS default to TF32 on Hopper (10-bit mantissas): comparisons between
    two paths would measure TF32's error, not ours."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def test_cuda_tensors_take_the_compiled_triton_kernels():
    ok, why = kernels.triton_status()
    assert ok and why == "CUDA", why
    assert kernels.backend(torch.zeros(1, device=CUDA)) == "triton"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("students", [1, 3])
def test_flat_equals_naive_on_cuda(dtype, students):
    """As on the CPU (tests/test_unroll.py): float64 within F64_GRAD_TOL, float32 against a floor
    measured here (the naive unroll's own float32 error against float64, x F32_FACTOR)."""
    kw = {"students": students, "steps": 5, "device": CUDA}
    d, spec, theta0, target = setup(dtype, **kw)
    loss_n, grads_n, state_n = gradients("naive", d, spec, theta0, target)
    d2, spec2, _, _ = setup(dtype, **kw)
    loss_f, grads_f, state_f = gradients("flat", d2, spec2, theta0, target)
    assert torch.equal(state_n, state_f)
    assert grads_n[0].norm() > 0
    names = ["latents", "alpha"] + [n for n, _ in d.decoder.named_parameters()]
    assert_as_exact_as_naive(dtype, names, (loss_f, grads_f), (loss_n, grads_n), kw)


def test_flat_unroll_on_cuda_equals_the_cpu_one():
    # same draws cannot be had from a CUDA and a CPU generator; without augmentation and
    # with every latent per step the unroll is deterministic up to the sampled noise, so
    # the noise is switched off through the log-variances (exp(-80) = 0 in float64)
    out = []
    for device in ("cpu", CUDA):
        d, spec, theta0, target = setup(torch.float64, augment=False, batch=0, steps=4, device=device)
        with torch.no_grad():
            d.latents[..., 1] = -80.0
        out.append(gradients("flat", d, spec, theta0, target)[:2])
    (loss_c, grads_c), (loss_g, grads_g) = out
    # float64 on both: other kernels' summation orders only (not yet run on a GPU; two CPU
    # orders of the same unroll differ by at most 3.5e-14)
    assert rel_err(loss_g.cpu(), loss_c) < F64_GRAD_TOL
    names = ["latents", "alpha"] + [f"decoder.{i}" for i in range(len(grads_c) - 2)]
    assert_grads_match(names, [g.cpu() for g in grads_g], grads_c, F64_GRAD_TOL)


def test_chunked_mmd_update_equals_one_graph_on_cuda():
    assert_chunked_equals_one_graph(CUDA, samples=6)


def test_a_float64_run_on_cuda_takes_the_references_and_resumes_to_the_bit(home, tmp_path):
    """distill.dtype=float64 on CUDA: the fused ops fall back to their PyTorch references (the
    Triton kernels accumulate in float32), the run works and a resume repeats it: every tensor
    within F64_TOL (atomics may reorder sums between runs on a GPU)."""
    over = ("device=cuda", "distill.dtype=float64", "distill.checkpoint_every=2", "distill.ppc=2")
    straight = Run.at(tmp_path / "straight")
    distill(cfg_of("distill.steps=4", *over), straight, progress=False)
    halves = Run.at(tmp_path / "halves")
    distill(cfg_of("distill.steps=2", *over), halves, progress=False)
    distill(cfg_of("distill.steps=4", *over), halves, resume=True, progress=False)
    assert straight.load_state()["latents"].dtype == torch.float64
    assert_same_state(halves.load_state(), straight.load_state(), "float64 on CUDA: resumed vs uninterrupted")


def test_a_compiled_run_on_cuda_equals_an_eager_one(home, tmp_path):
    """distill.compile=on on CUDA (Triton kernels from Inductor), float64: 3 compiled steps
    end within F64_TOL of 3 eager ones, and nothing fell back to eager."""
    import d3fast.compiling

    over = ("device=cuda", "distill.dtype=float64", "distill.ppc=2", "distill.students_per_step=2")
    eager, fast = Run.at(tmp_path / "eager"), Run.at(tmp_path / "compiled")
    distill(cfg_of(*over), eager, progress=False)
    distill(cfg_of(*over, "distill.compile=on"), fast, progress=False)
    assert not d3fast.compiling.FAILED
    assert_same_state(fast.load_state(), eager.load_state(), "compiled vs eager on CUDA")


@pytest.mark.parametrize("op", ["color", "crop", "cutout", "flip", "scale", "rotate"])
def test_dsa_on_cuda_equals_the_cpu_for_the_same_draws(op):
    dsa = DSA(AugConfig(strategy=op))
    x = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    params = dsa.sample(x, torch.Generator().manual_seed(1), op=0)
    on_gpu = copy.deepcopy(params)
    on_gpu.values = {k: {n: t.to(CUDA) for n, t in v.items()} for k, v in params.values.items()}
    # float32 elementwise ops and bilinear sampling of unit-scale images: a few ulps (1e-7)
    # apart between CUDA's and the CPU's kernels; 1e-5 leaves 100x (not yet run on a GPU)
    torch.testing.assert_close(dsa.apply(x.to(CUDA), on_gpu).cpu(), dsa.apply(x, params), rtol=1e-5, atol=1e-5)


def _syncs_per_step(cfg, run: Run, resume: bool = False) -> tuple[list[int], list[str]]:
    """Device waits per step (torch.cuda.set_sync_debug_mode), and the first messages."""
    per_step: list[int] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            distill(cfg, run, resume=resume, progress=False,
                    on_step=lambda m: per_step.append(sum("synchroniz" in str(w.message) for w in caught)))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    msgs = [str(w.message)[:160] for w in caught if "synchroniz" in str(w.message)]
    return [b - a for a, b in zip(per_step, per_step[1:], strict=False)], msgs[:10]


def test_a_distill_step_waits_for_the_device_once(home, tmp_path):
    over = ("distill.checkpoint_every=100", "device=cuda", "distill.ppc=2")
    run = Run.at(tmp_path / "r")
    syncs, msgs = _syncs_per_step(cfg_of("distill.steps=4", *over), run)
    # steps 2 and 3 (step 1 builds caches, step 4 saves the checkpoint)
    assert syncs[:2] == [1, 1], (syncs, msgs)
    # resumed: the optimisers' step counts come back on the CPU (on the GPU, foreach Adam
    # would read each one every step)
    syncs, msgs = _syncs_per_step(cfg_of("distill.steps=8", *over), run, resume=True)
    assert syncs[:2] == [1, 1], (syncs, msgs)


def test_digits_under_amp_resumes_into_the_uninterrupted_run(home, tmp_path):
    over = ("device=cuda", "distill.amp=true", "distill.checkpoint_every=2")
    straight = Run.at(tmp_path / "straight")
    distill(cfg_of("distill.steps=4", *over), straight, progress=False)
    halves = Run.at(tmp_path / "halves")
    distill(cfg_of("distill.steps=2", *over), halves, progress=False)
    res = distill(cfg_of("distill.steps=4", *over), halves, resume=True, progress=False)
    assert res.step == 4
    a, b = straight.read_metrics(), halves.read_metrics()
    assert [(m["expert"], m["start_epoch"]) for m in a] == [(m["expert"], m["start_epoch"]) for m in b]
    # the same draws; cuDNN's and the atomics' summation order may differ between runs, and
    # bf16 (8 bits, 4e-3 per rounding) carries it: 1e-3 is a bound from bf16's precision, not
    # a measurement (no GPU has run it yet); float64 holds resume to F64_TOL (test above)
    for ma, mb in zip(a, b, strict=True):
        assert mb["loss"] == pytest.approx(ma["loss"], rel=1e-3, abs=1e-6)
    da, db = straight.load_distilled()[0], halves.load_distilled()[0]
    assert rel_err(db.latents, da.latents) < 1e-3
    assert all(m["peak_mem_gib"] > 0 for m in a)
