"""Algorithm 1 on the embedded digits data with a tiny ConvNet and decoder."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
import torch.nn.functional as F

from d3fast import losses
from d3fast.data.loader import load_dataset
from d3fast.distilled import init_distilled
from d3fast.errors import D3FastError
from d3fast.exports import export, load
from d3fast.models import build_network
from d3fast.recipes.distill import distill
from d3fast.run import Run
from d3fast.state import load_checkpoint
from d3fast.trajectories import ExpertBank, experts_dir
from d3fast.unroll import Student, UnrollSpec, unroll
from tests._utils import F64_GRAD_TOL, assert_grads_match, assert_same_state, cfg_of


def hand_convnet(x, p):
    """ConvNet-3 forward written with torch.nn.functional, independent of the module."""
    for i in range(3):
        w, b, gw, gb = p[4 * i : 4 * i + 4]
        pad = 3 if x.shape[-1] == 28 else 1
        x = F.conv2d(x, w, b, padding=pad if i == 0 else 1)
        x = F.group_norm(x, w.shape[0], gw, gb)
        x = F.avg_pool2d(F.relu(x), 2)
    return F.linear(x.flatten(1), p[12], p[13])


@pytest.mark.parametrize("lr_param", ["log", "leaky_relu"])
@pytest.mark.parametrize("mode", ["flat", "naive"])
def test_mtt_matches_hand_unrolled_two_steps(home, mode, lr_param):
    """In float64, against the same two steps written out with torch.nn.functional, under
    both parametrisations of the student lr."""
    cfg = cfg_of("distill.syn_steps=2", "distill.augment_unroll=false", "distill.ppc=2", "distill.batch_syn=7")
    train = load_dataset("digits", "train")
    meta = {"resolution": 32, "channels": 1, "mean": train.mean.tolist(), "std": train.std.tolist(),
            "z_dim": 64, "decoder": "paper", "decoder_width": 32, "lr_param": lr_param}
    f64 = torch.float64
    d = init_distilled(10, 2, train.classes, meta, 0.01, torch.device("cpu"), seed=3, dtype=f64)
    student = Student(build_network("convnet", 1, 10, 32, width=8).to(f64))
    shapes, sizes = student.shapes, student.sizes
    bank = ExpertBank(experts_dir(cfg), 3)
    theta0, target = (t.to(f64) for t in bank.rows(0, [0, 1]))

    spec = UnrollSpec(student, cfg.distill.syn_steps, cfg.distill.batch_syn, None)
    theta_n = unroll(spec, d, theta0[None], torch.Generator().manual_seed(5), mode)[0]
    loss = losses.param_dist(theta_n, target, theta0)
    ours = torch.autograd.grad(loss, [d.latents, d.alpha, *d.decoder.parameters()])

    # by hand: same draws in the same order (permutation, then per step the noise)
    g = torch.Generator().manual_seed(5)
    order = torch.randperm(20, generator=g)
    chunks = [order[:7], order[7:14]]
    params = [t.view(s).clone().requires_grad_(True) for t, s in zip(theta0.split(sizes), shapes, strict=True)]
    lr = d.alpha.exp() if lr_param == "log" else F.leaky_relu(d.alpha) + 1e-4
    torch.testing.assert_close(lr, torch.tensor(0.01 + (1e-4 if lr_param == "leaky_relu" else 0), dtype=f64))
    labels = torch.arange(10).repeat_interleave(2)
    for idx in chunks:
        lat = d.latents[idx]
        eps = torch.randn(lat.shape[:-1], generator=g).to(f64)  # float32 draws, as every run makes them
        x = d.decoder(lat[..., 0] + eps * torch.exp(0.5 * lat[..., 1]))
        ce = F.cross_entropy(hand_convnet(x, params), labels[idx])
        grads = torch.autograd.grad(ce, params, create_graph=True)
        params = [p - lr * gp for p, gp in zip(params, grads, strict=True)]
    flat = torch.cat([p.reshape(-1) for p in params])
    ref_loss = ((flat - target) ** 2).sum() / ((theta0 - target) ** 2).sum()
    ref = torch.autograd.grad(ref_loss, [d.latents, d.alpha, *d.decoder.parameters()])

    # measured: the loss 0 apart, the gradients at most 4.7e-14 (flat sums the steps' terms in
    # another order); F64_GRAD_TOL is what float64 promises for a gradient (tests/_utils.py)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=0)
    assert all(a.abs().sum() > 0 for a in ours)  # gradients reach latents, lr and every decoder tensor
    names = ["latents", "alpha"] + [n for n, _ in d.decoder.named_parameters()]
    print(f"{mode}: worst gradient error {assert_grads_match(names, ours, ref, F64_GRAD_TOL):.3g}")


# metrics that measure time or memory, not the computation
TIMING_KEYS = ("step_s", "images_per_s", "peak_mem_gib", "device_hours", "projected_device_hours")


def test_resume_equals_uninterrupted(home, tmp_path):
    """2 steps, a resume, 1 more step: the checkpoint equals 3 uninterrupted steps' bit for bit
    (the same operations in the same order, float64), and so do the metrics but for timing."""
    f64 = "distill.dtype=float64"
    straight = distill(cfg_of("distill.ppc=2", f64), Run.at(tmp_path / "a"), progress=False)
    assert straight.step == 3
    part = distill(cfg_of("distill.ppc=2", "distill.steps=2", f64), Run.at(tmp_path / "b"), progress=False)
    assert part.step == 2
    cfg = Run(tmp_path / "b").read_config()
    cfg.distill.steps = 3
    resumed = distill(cfg, Run.at(tmp_path / "b"), resume=True, progress=False)
    assert resumed.step == 3
    assert_same_state(Run(tmp_path / "b").load_state(), Run(tmp_path / "a").load_state(), "resumed vs uninterrupted",
                      tol=0, tol_cancelled=0)
    lines_a = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    lines_b = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    strip = lambda ln: {k: v for k, v in json.loads(ln).items() if k not in TIMING_KEYS}  # noqa: E731
    assert [strip(x) for x in lines_a] == [strip(x) for x in lines_b]
    first = json.loads(lines_a[0])
    for key in ("mtt", "kl", "mmd", "div", "student_lr", "step_s", "images_per_s", "peak_mem_gib"):
        assert key in first
    assert first["div"] < 0  # PPC 2: the diversity term is active


def test_every_way_of_running_a_step_gives_the_same_state(home, tmp_path):
    """3 steps of 2 students, float64: the flat, naive and auto unrolls (auto: all steps kept
    here, and with a zero budget all recomputed) and the chunked (4 samples per graph) and
    one-graph MMD update all end in the same checkpoint, every tensor within F64_TOL."""
    base = ("distill.ppc=2", "distill.students_per_step=2", "distill.dtype=float64", "distill.mmd_samples=6")
    ways = {"naive": ("distill.unroll=naive",), "flat": ("distill.unroll=flat",), "auto": ("distill.unroll=auto",),
            "auto, budget 0": ("distill.unroll=auto", "distill.unroll_budget=0"),
            "chunked MMD": ("distill.unroll=naive", "distill.mmd_chunk=4"),
            "one-graph MMD": ("distill.unroll=naive", "distill.mmd_exact_graph=true")}
    states = {}
    for i, (name, over) in enumerate(ways.items()):
        distill(cfg_of(*base, *over), Run.at(tmp_path / str(i)), progress=False)
        states[name] = Run(tmp_path / str(i)).load_state()
    for name in ways:
        if name != "naive":
            assert_same_state(states[name], states["naive"], f"{name} vs naive")
    assert_same_state(states["chunked MMD"], states["one-graph MMD"], "chunked vs one-graph MMD")


def test_nan_loss_stops_and_keeps_last_checkpoint(home, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = losses.param_dist

    def poisoned(*args):
        calls["n"] += 1
        out = real(*args)
        return out * float("nan") if calls["n"] == 2 else out

    monkeypatch.setattr(losses, "param_dist", poisoned)
    with pytest.raises(D3FastError, match=r"non-finite loss at step 2: \{'mtt': nan\}.*last good checkpoint"):
        distill(cfg_of(), Run.at(tmp_path / "r"), progress=False)
    assert load_checkpoint(tmp_path / "r" / "checkpoint.pt")["step"] == 1


def test_stop_request_saves_and_resumes(home, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = losses.kl_standard_normal

    def interrupting(*args):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in the middle of step 2
        return real(*args)

    monkeypatch.setattr(losses, "kl_standard_normal", interrupting)
    cfg = cfg_of("distill.checkpoint_every=100")
    res = distill(cfg, Run.at(tmp_path / "r"), progress=False)
    assert res.interrupted and res.step == 2  # step 2 finished, then saved
    assert load_checkpoint(tmp_path / "r" / "checkpoint.pt")["step"] == 2
    monkeypatch.setattr(losses, "kl_standard_normal", real)
    res = distill(Run(tmp_path / "r").read_config(), Run.at(tmp_path / "r"), resume=True, progress=False)
    assert res.step == 3 and not res.interrupted


def test_corrupt_checkpoint_is_a_clear_error(home, tmp_path):
    distill(cfg_of("distill.steps=1"), Run.at(tmp_path / "r"), progress=False)
    ckpt = tmp_path / "r" / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:300])
    with pytest.raises(D3FastError, match="checkpoint .* is corrupt or truncated"):
        distill(Run(tmp_path / "r").read_config(), Run.at(tmp_path / "r"), resume=True, progress=False)
    ckpt.write_bytes(b"")
    with pytest.raises(D3FastError, match="corrupt or truncated"):
        Run(tmp_path / "r").load_distilled()


def test_missing_experts_epochs_is_explained(home, tmp_path):
    with pytest.raises(D3FastError, match="no expert .* has the 9 epochs"):
        distill(cfg_of("distill.max_start_epoch=8"), Run.at(tmp_path / "r"), progress=False)


def test_export_round_trip(home, tmp_path):
    distill(cfg_of("distill.ppc=2", "distill.steps=1"), Run.at(tmp_path / "r"), progress=False)
    d, _ = Run(tmp_path / "r").load_distilled()
    export(d, tmp_path / "d.safetensors")
    e = load(tmp_path / "d.safetensors")
    assert torch.equal(d.latents, e.latents) and e.ppc == 2 and e.classes == d.classes
    assert e.student_lr == pytest.approx(d.student_lr)
    d.decoder.eval()
    e.decoder.eval()
    z = torch.randn(4, 64)
    assert torch.equal(d.decoder(z), e.decoder(z))
    # storage: float32 latents + decoder state (its normalisation buffers excluded) + lr
    n_dec = sum(t.numel() for t in d.decoder.state_dict().values() if t.is_floating_point()) - 2
    assert d.storage_bytes() == 4 * (20 * 64 * 2 + n_dec + 1)
    assert d.images_per_class_equivalent() == pytest.approx(d.storage_bytes() / (10 * 32 * 32))
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(D3FastError, match="corrupt or truncated"):
        load(tmp_path / "bad.safetensors")


def test_expert_bank_reports_a_torn_file(home, tmp_path):
    src = next(experts_dir(cfg_of()).glob("expert_*.safetensors"))
    (tmp_path / src.name).write_bytes(src.read_bytes()[:100])
    with pytest.raises(D3FastError, match="expert trajectory .* is corrupt or truncated"):
        ExpertBank(tmp_path, 1)


def test_a_step_waits_for_the_device_once(home):
    """Every check and metric of a step is read back in one transfer: on a GPU the host
    waits for the device once per step. Host-side work (drawing experts, start epochs and
    DSA ops from the CPU generator, reading expert rows from disk), the C++ kernels'
    wrappers (CPU tensors only), mmd2's check of a bandwidth scale (made only when the scale
    is a CPU tensor) and torch.optim's step counters (kept on the CPU beside CUDA parameters,
    for this reason) read no device and are left out."""
    from tests._utils import HostSyncs

    def device_side(where: str) -> bool:
        file, _, func = where.split(":")
        return (func not in ("draw_students", "draw_ops", "rows", "_bandwidth_scale") and not file.endswith("_cpp.py")
                and file != "torch.optim")

    cfg = cfg_of("distill.steps=3", "distill.checkpoint_every=100", "distill.ppc=2", "distill.mmd_scale=median")
    marks: list[int] = []
    with HostSyncs() as syncs:
        distill(cfg, Run.at(home / "runs" / "syncs"), progress=False, on_step=lambda m: marks.append(len(syncs.records)))
    # step 2 runs from the first mark to the second (step 1 builds caches, step 3 saves)
    step2 = [r for r in syncs.records[marks[0] : marks[1]] if device_side(r[1])]
    assert [(op, where.rsplit(":", 1)[1]) for op, where in step2] == [("tolist", "_read_all")], step2


def test_a_float64_run_computes_in_float64_throughout(home, tmp_path):
    """distill.dtype=float64: no operation of a step (forward, backward, optimisers, the
    checks) turns a float64 tensor into a lower precision one. Only the fresh random draws
    of the augmentation are made in float32 and cast up (the same draws as a float32 run's)."""
    from collections import Counter

    from torch.utils import _pytree as pytree
    from torch.utils._python_dispatch import TorchDispatchMode

    class Downcasts(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.found: Counter[str] = Counter()
            self.float64_ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            floats = lambda tree: [t.dtype for t in pytree.tree_leaves(tree)  # noqa: E731
                                   if isinstance(t, torch.Tensor) and t.is_floating_point()]
            ins = floats((args, kwargs))
            if torch.float64 in ins:
                self.float64_ops += 1
                # more low-precision outputs than inputs: something was rounded down (a list op
                # over parameters and Adam's float32 step counts keeps their dtypes)
                low = lambda dts: sum(dt != torch.float64 for dt in dts)  # noqa: E731
                if low(floats(out)) > low(ins):
                    self.found[func.__name__] += 1
            return out

    cfg = cfg_of("distill.dtype=float64", "distill.ppc=2", "distill.students_per_step=2", "distill.mmd_scale=median",
                 "distill.steps=2")
    with Downcasts() as mode:
        distill(cfg, Run.at(tmp_path / "r"), progress=False)
    assert not mode.found, dict(mode.found)
    assert mode.float64_ops > 1000  # the mode saw the run
    d, _ = Run(tmp_path / "r").load_distilled(dtype=None)
    assert d.dtype == torch.float64 and all(t.dtype == torch.float64 for _, t in d.named_tensors()
                                            if t.is_floating_point())


@pytest.mark.parametrize("per_epoch", [1, 2, 3])
def test_students_start_at_snapshots_and_match_expert_epochs_ahead(tmp_path, per_epoch):
    """Row i of a bank holding S snapshots per epoch is epoch i / S: starts are drawn from
    the snapshots before epoch T, the target is M epochs (M S rows) later, the feature
    network's row is epoch T + M; with S = 1 this is MTT's draw, unchanged."""
    from d3fast.config import DistillConfig
    from d3fast.recipes.distill import draw_students
    from d3fast.trajectories import expert_path, write_expert

    epochs = 5
    for i in range(2):  # row r of expert i holds the value 100 i + r everywhere
        rows = torch.arange(epochs * per_epoch + 1, dtype=torch.float32)[:, None] + 100 * i + torch.zeros(1, 4)
        write_expert(expert_path(tmp_path, i), rows, index=i, seed=i, complete=True, test_acc=None, history=[],
                     param_layout=[["w", [4]]], snapshots_per_epoch=per_epoch)
    bank = ExpertBank(tmp_path, 4)
    assert bank.snapshots_per_epoch == per_epoch
    dcfg = DistillConfig(expert_epochs=1 / per_epoch if per_epoch > 1 else 1, max_start_epoch=3, students_per_step=200,
                         mmd_param="expert", dtype="float32")
    s = draw_students(bank, dcfg, torch.Generator().manual_seed(0), torch.device("cpu"))
    starts = sorted({start for _, start in s.picks})
    assert starts == list(range(3 * per_epoch))
    for k, (e, start) in enumerate(s.picks):
        assert torch.equal(s.theta0[k], torch.full((4,), 100.0 * e + start))
        assert torch.equal(s.target[k], torch.full((4,), 100.0 * e + start + 1))
    assert torch.equal(s.feat_params, torch.full((4,), 100.0 * s.picks[0][0] + 3 * per_epoch + 1))
    assert s.snapshots_per_epoch == per_epoch
    with pytest.raises(D3FastError, match="none is taken at epoch 0.3"):
        bank.snapshot(0.3)


def test_a_fraction_of_an_epoch_needs_snapshots_within_epochs():
    cfg_of("experts.snapshots_per_epoch=4", "distill.expert_epochs=0.75")  # 3 snapshots: fine
    cfg_of("experts.snapshots_per_epoch=3", "distill.expert_epochs=0.333333")  # a printed third: 1 snapshot
    with pytest.raises(D3FastError, match=r"expert_epochs: 0.5 is not a whole number \(at least 1\) of expert snapshots "
                                          r"\(experts.snapshots_per_epoch=1: multiples of 1/1\); the nearest is 1.0, "
                                          r"or keep 2 snapshots per epoch: --set experts.snapshots_per_epoch=2"):
        cfg_of("distill.expert_epochs=0.5")
    with pytest.raises(D3FastError, match="multiples of 1/4.*the nearest is 0.25"):
        cfg_of("experts.snapshots_per_epoch=4", "distill.expert_epochs=0.3")
    with pytest.raises(D3FastError, match="the nearest is 0.25"):  # 0 snapshots: the target would be the start
        cfg_of("experts.snapshots_per_epoch=4", "distill.expert_epochs=1e-7")
