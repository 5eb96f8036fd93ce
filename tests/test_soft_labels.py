"""Soft labels (docs/algorithm.md section 9.2): the loss students train on, labelling a run or
a merged object with a whole-dataset expert, storing and counting them, and evaluation beside
the hard-label students."""

from __future__ import annotations

import math

import pytest
import torch
from click.testing import CliRunner

from d3fast.cli import cli
from d3fast.distilled import Merged, Sampler
from d3fast.errors import D3FastError
from d3fast.exports import load
from d3fast.losses import soft_cross_entropy
from d3fast.models import build_network
from d3fast.recipes.distill import distill
from d3fast.recipes.evaluate import train_student
from d3fast.recipes.experts import run_experts
from d3fast.recipes.subtasks import merge_runs
from d3fast.run import Run
from d3fast.training import load_flat_params
from d3fast.trajectories import ExpertBank, experts_dir
from tests._utils import cfg_of, evaluate_run


def _by_hand(logits: list[list[float]], probs: list[list[float]], t: float) -> float:
    """T^2 mean_b sum_c -q_T log p_T, with q_T = q^(1/T) / sum q^(1/T) and p_T = softmax(z / T),
    in plain Python floats."""
    total = 0.0
    for z, q in zip(logits, probs, strict=True):
        qt = [x ** (1 / t) for x in q]
        qt = [x / sum(qt) for x in qt]
        m = max(v / t for v in z)
        log_norm = m + math.log(sum(math.exp(v / t - m) for v in z))
        total += -sum(a * (v / t - log_norm) for a, v in zip(qt, z, strict=True))
    return t * t * total / len(logits)


@pytest.mark.parametrize("t", [1.0, 2.0, 0.5])
def test_soft_cross_entropy_matches_the_hand_computed_loss(t):
    logits = [[2.0, -1.0, 0.5], [0.1, 0.2, -3.0]]
    probs = [[0.7, 0.2, 0.1], [0.05, 0.9, 0.05]]
    got = soft_cross_entropy(torch.tensor(logits, dtype=torch.float64), torch.tensor(probs, dtype=torch.float64), t)
    # float64 against Python floats, a dozen operations: 1e-12 is 10^4 x their rounding
    # (measured: 2e-4 of it)
    assert float(got) == pytest.approx(_by_hand(logits, probs, t), rel=1e-12)
    if t == 1.0:  # the reference's loss: torch's cross-entropy with probability targets
        ref = torch.nn.functional.cross_entropy(torch.tensor(logits), torch.tensor(probs))
        # ref in float32: ~10 roundings of 6e-8 (measured: 0.01 of 1e-6)
        assert float(got) == pytest.approx(float(ref), rel=1e-6)


def test_students_train_on_soft_targets(home):
    """One SGD step of train_student on a soft batch equals a step on the hand-computed loss."""
    cfg = cfg_of("eval.soft_temperature=2.0", "eval.weight_decay=0.0", "eval.momentum=0.0")
    x = torch.randn(4, 3)
    q = torch.softmax(torch.randn(4, 5), 1)
    net = torch.nn.Linear(3, 5).double()
    start = [p.detach().clone() for p in net.parameters()]
    train_student(net, lambda g: iter([(x.double(), q.double())]), 1, 0.1, cfg, None, torch.Generator())
    w = start[0].clone().requires_grad_(True)
    b = start[1].clone().requires_grad_(True)
    z = x.double() @ w.T + b
    # the independent formula: T^2 (KL(q_T || p_T) + H(q_T))
    t = 2.0
    qt = q.double() ** (1 / t)
    qt = qt / qt.sum(1, keepdim=True)
    p = torch.softmax(z / t, 1)
    loss = t * t * ((qt * (qt.log() - p.log())).sum(1) + -(qt * qt.log()).sum(1)).mean()
    loss.backward()
    lr = 0.1 * 0.1  # 1 epoch: the x0.1 decay at half the epochs starts at epoch 0
    # one float64 SGD step both ways, values ~0.1: 1e-12 is 10^3 x their rounding (measured: 1.4e-11 of it)
    assert torch.allclose(net.weight, w - lr * w.grad, atol=1e-12)
    assert torch.allclose(net.bias, b - lr * b.grad, atol=1e-12)


def _expected_labels(d, cfg, epoch: int) -> torch.Tensor:
    """softmax of expert 0 of the whole-dataset experts at `epoch` on every prior's mean image."""
    bank = ExpertBank(experts_dir(cfg_of()), epoch)
    net = build_network("convnet", 1, 10, 32, width=cfg.net.width)
    load_flat_params(net, bank.rows(0, [epoch])[0])
    return torch.softmax(net.eval()(Sampler(d).means()), 1)


def test_a_run_labelled_stores_counts_and_evaluates_both_ways(home, tmp_path):
    cfg = cfg_of("distill.ppc=2", "distill.steps=2", "distill.soft_label_epoch=2")
    run = Run.at(tmp_path / "run")
    distill(cfg, run, progress=False)
    plain, _ = run.load_distilled()
    res = CliRunner().invoke(cli, ["label", str(run.path)])
    assert res.exit_code == 0, res.output
    d, step = run.load_distilled()
    assert d.soft_labels is not None and d.soft_labels.shape == (20, 10)
    # float32 probabilities (rounding 6e-8 each); the same expert and mean images both ways:
    # 1e-5 leaves 100x for other kernels' orders (measured: 0.012 of it)
    assert torch.allclose(d.soft_labels.sum(1), torch.ones(20), atol=1e-5)
    assert torch.allclose(d.soft_labels, _expected_labels(d, cfg, 2), atol=1e-5)
    assert d.storage_bytes() == plain.storage_bytes() + 4 * 20 * 10
    r = evaluate_run(run, {"eval": {"students": 1, "epochs": 1, "samples_per_class": 2, "baselines": False}},
                     progress=False, device="cpu")
    assert list(r["results"]["convnet"]) == ["d3_soft", "d3"] and r["soft_labels"]
    assert "soft labels" in (run.path / "eval.md").read_text()
    # an export carries them
    CliRunner().invoke(cli, ["export", str(run.path), "--out", str(tmp_path / "x.safetensors")])
    back = load(tmp_path / "x.safetensors")
    assert back.soft_labels is not None and torch.equal(back.soft_labels, d.soft_labels)
    # the run goes on: its labels are of an older checkpoint and refused until relabelled
    cfg.distill.steps = 3
    distill(cfg, run, resume=True, progress=False)
    with pytest.raises(D3FastError, match="labels the checkpoint of step 2, the run is at step 3"):
        run.load_distilled()


def test_a_merged_object_is_labelled_over_every_class(home, tmp_path):
    runs = []
    for i in range(2):
        cfg = cfg_of("data.subtasks=2", f"data.subtask={i}", "distill.steps=1")
        run_experts(cfg, progress=False)
        runs.append(Run.at(tmp_path / f"s{i}"))
        distill(cfg, runs[-1], progress=False)
    with pytest.raises(D3FastError, match="labelled once merged"):
        from d3fast.recipes.label import label

        label(runs[0].load_distilled()[0], runs[0].read_config(), torch.device("cpu"))
    merged, out = merge_runs([r.path for r in runs], tmp_path / "m", soft_labels=True)
    assert isinstance(merged, Merged) and merged.soft_labels is not None
    assert merged.soft_labels.shape == (10, 10)
    assert torch.allclose(merged.soft_labels, _expected_labels(merged, cfg_of(), 2), atol=1e-5)  # as above
    back, _ = Run(out).load_distilled()
    assert back.soft_labels is not None and torch.equal(back.soft_labels, merged.soft_labels)


def test_labels_without_a_whole_dataset_expert_name_the_command(home, tmp_path):
    cfg = cfg_of("distill.steps=1", "net.width=6", "distill.soft_label_epoch=3")
    run = Run.at(tmp_path / "run")
    with pytest.raises(D3FastError, match="no expert"):  # distill itself needs experts of width 6
        distill(cfg, run, progress=False)
    from d3fast.recipes.label import labelling_network

    with pytest.raises(D3FastError) as e:
        labelling_network(cfg, torch.device("cpu"))
    assert "d3fast experts --dataset digits --num-experts 1 --epochs 3" in str(e.value)
    assert "net.width=6" in str(e.value)
