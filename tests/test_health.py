"""The MTT health watch (d3fast/health.py) and the learned student lr's parametrisations."""

from __future__ import annotations

import json

import pytest
import torch

from d3fast.distilled import init_distilled
from d3fast.health import LEAKY_FLOOR, STALL_BAND, MTTHealth
from d3fast.models import build_network
from d3fast.recipes.distill import distill
from d3fast.run import Run, list_runs
from d3fast.trajectories import ExpertBank, experts_dir, need_epochs
from d3fast.unroll import Student, UnrollSpec, mtt_loss, unroll
from tests._utils import cfg_of


def _feed(h: MTTHealth, steps: list[tuple[float, float]], first: int = 1) -> list[tuple[str, str | None]]:
    return [h.update(first + i, mtt, lr) for i, (mtt, lr) in enumerate(steps)]


def test_an_lr_at_its_floor_warns_once_after_the_window_and_again_after_a_recovery():
    h = MTTHealth(3, "leaky_relu", 0.01)
    floor = LEAKY_FLOOR
    # MTT losses kept off 1.0, so that the stall rule stays quiet
    out = _feed(h, [(0.5, 0.01), (0.8, floor), (0.8, floor), (0.8, floor), (0.8, floor), (0.6, 0.005),
                    (0.8, floor), (0.8, floor), (0.8, floor)])
    health = [s for s, _ in out]
    warned = [i + 1 for i, (_, w) in enumerate(out) if w]
    assert health[:3] == ["ok", "ok", "ok"]  # 2 steps at the floor: under the window
    assert health[3] == "lr at floor since step 2" and health[4] == "lr at floor since step 2"
    assert health[5] == "ok"  # recovered
    assert health[8] == "lr at floor since step 7"
    assert warned == [4, 9]  # once per episode
    assert "distill.lr_param=log" in out[3][1] and "floor (0.0001)" in out[3][1]


def test_log_lr_counts_1_percent_of_lr_teacher_as_its_floor_and_says_to_lower_lr_lr():
    h = MTTHealth(2, "log", 0.01)
    out = _feed(h, [(0.5, 1.01e-4), (0.5, 0.99e-4), (0.5, 0.5e-4)])
    assert [s for s, _ in out] == ["ok", "ok", "lr at floor since step 2"]
    assert "lower distill.lr_lr" in out[2][1]


def test_a_stalled_mtt_loss_is_the_window_median_near_one():
    h = MTTHealth(5, "log", 0.01)
    near = [1 + STALL_BAND * 0.9 * s for s in (1, -1, 1, -1)]  # each inside the band
    out = _feed(h, [(m, 0.01) for m in [0.5, 0.5, *near]])
    # windows [0.5 0.5 1.045 0.955 1.045] (median 0.955: inside), [0.5 1.045 0.955 1.045 0.955]
    assert [s for s, _ in out] == ["ok"] * 4 + ["MTT stalled since step 1"] * 2
    assert "median over the last 5 steps is 0.955" in out[4][1] and out[5][1] is None  # warned once
    # one wild step does not end a stall (a mean would have moved by 0.14); three healthy ones do
    assert h.update(7, 0.3, 0.01)[0] == "MTT stalled since step 1"
    assert [h.update(8 + i, 0.3, 0.01)[0] for i in range(2)] == ["MTT stalled since step 1", "ok"]


def test_early_swings_above_one_do_not_read_as_a_stall():
    """The digits preset's steps 3-22 (a random decoder's first samples push the student away,
    then the loss falls): their mean is 0.966, within the band; their median 0.79 is not."""
    losses = [0.98, 2.21, 1.95, 1.33, 0.75, 1.42, 0.75, 0.93, 1.59, 1.03, 0.59, 0.69, 0.8, 0.56, 0.65, 0.54, 0.6,
              0.53, 0.55, 0.88]
    assert abs(sum(losses) / 20 - 1) < STALL_BAND
    assert {s for s, _ in _feed(MTTHealth(20, "log", 0.01), [(m, 0.009) for m in losses])} == {"ok"}


def test_the_watch_is_off_without_an_mtt_term_or_a_window():
    assert MTTHealth(3, "log", 0.01, mtt_on=False).update(1, 1.0, 1e-9) == ("off", None)
    assert MTTHealth(0, "log", 0.01).update(1, 1.0, 1e-9) == ("off", None)


def test_the_watch_resumes_from_its_state_dict_as_uninterrupted():
    seq = [(0.99, 1e-4)] * 3 + [(0.4, 0.01)] + [(1.0, 1e-4)] * 5
    straight = _feed(MTTHealth(3, "leaky_relu", 0.01), seq)
    first = MTTHealth(3, "leaky_relu", 0.01)
    head = _feed(first, seq[:5])
    again = MTTHealth(3, "leaky_relu", 0.01)
    again.load_state_dict(json.loads(json.dumps(first.state_dict())))  # as the checkpoint holds it
    assert head + _feed(again, seq[5:], first=6) == straight


def test_a_run_at_the_floor_warns_and_shows_it_in_metrics_and_runs(home, tmp_path, capsys):
    """The reference's parametrisation with alpha at 1e-8: lr = 1e-4 + 1e-8, the floor."""
    cfg = cfg_of("distill.lr_param=leaky_relu", "distill.lr_teacher=1e-8", "distill.lr_lr=0", "distill.health_steps=2")
    run = Run.at(tmp_path / "digits" / "r")
    distill(cfg, run, progress=False)
    out = capsys.readouterr()
    said = out.out + out.err
    # at lr 1e-4 the students barely move: the MTT loss is ~1.0 as well, and both are said once
    assert said.count("has sat at its floor") == 1 and "distill.lr_param=log" in said
    assert said.count("the gains come from the MMD term alone") == 1
    health = [m["mtt_health"] for m in run.read_metrics()]
    assert health[0] == "ok" and health[1].startswith("lr at floor since step 1")
    assert [r["mtt_health"] for r in list_runs(tmp_path)] == [health[-1]]


def test_a_resumed_run_keeps_its_parametrisation_and_refuses_another(home, tmp_path):
    from d3fast.errors import D3FastError

    run = Run.at(tmp_path / "r")
    distill(cfg_of("distill.steps=1", "distill.lr_param=leaky_relu"), run, progress=False)
    cfg = run.read_config()
    assert cfg.distill.lr_param == "leaky_relu"
    cfg.distill.lr_param = "log"
    with pytest.raises(D3FastError, match=r"cannot change distill.lr_param.*\(--set distill.lr_param=leaky_relu\)"):
        distill(cfg, run, resume=True, progress=False)


def test_a_run_recorded_before_lr_param_existed_resumes_as_leaky_relu(home, tmp_path):
    """Runs of older d3fast hold a leaky_relu alpha and a config without the key."""
    run = Run.at(tmp_path / "r")
    distill(cfg_of("distill.steps=1", "distill.lr_param=leaky_relu"), run, progress=False)
    config = json.loads(run.config_path.read_text())
    del config["distill"]["lr_param"]
    run.config_path.write_text(json.dumps(config))
    assert run.read_config().distill.lr_param == "leaky_relu"


def _mean_mtt(d, cfg, bank: ExpertBank) -> float:
    """The MTT loss of `d` over every (expert, start epoch) of the bank, same draws for any d."""
    dc = cfg.distill
    student = Student(build_network("convnet", 1, 10, 32, width=cfg.net.width))
    spec = UnrollSpec(student, dc.syn_steps, dc.batch_syn, None)
    total, n = 0.0, 0
    for e in range(len(bank)):
        for s in range(dc.max_start_epoch):
            theta0, target = bank.rows(e, [s, s + bank.snapshot(dc.expert_epochs)])
            theta_n = unroll(spec, d, theta0[None], torch.Generator().manual_seed(100 * e + s), "naive")
            total += float(mtt_loss(theta_n, target[None], theta0[None]).detach())
            n += 1
    return total / n


def test_mtt_alone_improves_on_its_own_starting_point(home, tmp_path):
    """MTT only (no MMD term), 12 steps: the MTT loss of the distilled object, measured on every
    (expert, start epoch) of the bank with the same draws, falls below the initial object's."""
    cfg = cfg_of("distill.mmd_weight=0", "distill.steps=12", "distill.augment_unroll=false", "distill.lr_lr=1e-2")
    run = Run.at(tmp_path / "r")
    distill(cfg, run, progress=False)
    after, _ = run.load_distilled()
    train_meta = after.meta
    before = init_distilled(10, cfg.distill.ppc, after.classes, train_meta, cfg.distill.lr_teacher,
                            torch.device("cpu"), cfg.distill.seed)
    bank = ExpertBank(experts_dir(cfg), need_epochs(cfg))
    start, end = _mean_mtt(before, cfg, bank), _mean_mtt(after, cfg, bank)
    print(f"MTT loss over the bank: {start:.4f} at step 0, {end:.4f} after 12 MTT-only steps")
    assert end < start - 0.05 * abs(start), (start, end)


def test_a_stretch_without_the_watch_leaves_nothing_behind():
    """health_steps 0 on a resume, then 2 again: the window holds only steps after the pause."""
    h = MTTHealth(2, "log", 0.01)
    _feed(h, [(0.2, 0.01), (0.2, 0.01)])
    off = MTTHealth(0, "log", 0.01)
    off.load_state_dict(h.state_dict())
    assert off.update(3, 0.99, 0.01) == ("off", None)
    on = MTTHealth(2, "log", 0.01)
    on.load_state_dict(off.state_dict())
    assert on.update(4, 0.99, 0.01)[0] == "ok"  # one step in the window, not a stale 0.2
    assert on.update(5, 0.97, 0.01)[0] == "MTT stalled since step 4"


@pytest.mark.parametrize("damage, says", [
    ({"lr_param": "junk"}, "lr_param is 'junk', not log or leaky_relu"),
    # contradicts the recorded student_lr (here the lr it gives is negative, refused first)
    ({"lr_param": "leaky_relu"}, "gives (student )?lr"),
    ({"lr_param": None}, None),  # missing: the parametrisation whose lr is the recorded one
])
def test_an_export_s_lr_parametrisation_is_checked_against_its_recorded_lr(home, tmp_path, damage, says):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from d3fast.errors import D3FastError
    from d3fast.exports import export, load

    run = Run.at(tmp_path / "r")
    distill(cfg_of("distill.steps=1"), run, progress=False)
    d, _ = run.load_distilled()
    path = tmp_path / "d.safetensors"
    export(d, path)
    with safe_open(str(path), "pt") as f:
        header = dict(f.metadata())
    tensors = load_file(path)
    header.pop("content_sha256")  # as an export of before the checksum: the values' own checks
    for k, v in damage.items():
        header.pop(k) if v is None else header.__setitem__(k, json.dumps(v))
    save_file(tensors, path, metadata=header)
    if says is None:
        back = load(path)
        assert back.lr_param == "log" and back.student_lr == pytest.approx(d.student_lr)
    else:
        with pytest.raises(D3FastError, match=says):
            load(path)
