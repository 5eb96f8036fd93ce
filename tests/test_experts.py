"""Expert trajectories on the embedded digits data (a small ConvNet, a few epochs)."""

import os
import shutil
from pathlib import Path

import pytest
import torch

import d3fast.recipes.experts as experts_mod
from d3fast.config import resolve_config
from d3fast.data.prepare import prepare
from d3fast.errors import D3FastError
from d3fast.preflight import resolve_data_loader
from d3fast.recipes.experts import run_experts
from d3fast.trajectories import expert_path, read_expert


def small_cfg(seed=0, **extra):
    overrides = [
        "net.width=16",
        "experts.num_experts=2",
        "experts.epochs=3",
        "experts.batch_size=256",
        f"experts.seed={seed}",
        "device=cpu",
    ] + [f"{k}={v}" for k, v in extra.items()]
    cfg = resolve_config("digits", overrides=overrides)
    resolve_data_loader(cfg)
    return cfg


@pytest.fixture
def digits():
    prepare(resolve_config("digits"), progress=False)


def trajectories(out):
    return [read_expert(expert_path(out, i))[0]["trajectory"] for i in range(2)]


def test_experts_train_and_manifest(digits):
    res = run_experts(small_cfg(), progress=False)
    m = res.manifest
    assert m["num_complete"] == 2 and res.trained_epochs == 6
    assert m["num_params"] == sum(p.numel() for p in experts_mod._build(small_cfg(), _ds(), 0).parameters())
    for rec in m["experts"]:
        # far above chance (10%) after 3 epochs
        assert rec["test_acc"] > 0.5 and rec["epochs"] == 3 and rec["complete"]
    traj = trajectories(res.out_dir)[0]
    assert traj.shape == (4, m["num_params"])  # init + 3 epochs
    assert not torch.equal(traj[0], traj[-1])
    assert m["hyperparameters"] == {"optimizer": "SGD", "lr": 0.01, "momentum": 0.0, "weight_decay": 0.0, "batch_size": 256}
    assert m["versions"]["torch"] == torch.__version__
    # a second call finds everything done and trains nothing
    again = run_experts(small_cfg(), progress=False)
    assert again.trained_epochs == 0


def _ds():
    from d3fast.data.loader import load_dataset

    return load_dataset("digits", "train")


def test_same_seed_same_trajectory_other_seed_other(digits):
    out = run_experts(small_cfg(), progress=False).out_dir
    first = trajectories(out)
    shutil.rmtree(out)
    again = trajectories(run_experts(small_cfg(), progress=False).out_dir)
    for a, b in zip(first, again, strict=False):
        assert torch.equal(a, b)
    assert not torch.equal(first[0], first[1])  # experts differ from each other
    other = run_experts(small_cfg(seed=1), progress=False)
    assert other.out_dir != out
    assert not torch.equal(trajectories(other.out_dir)[0][0], first[0][0])


def test_interrupt_and_resume_equals_uninterrupted(digits, monkeypatch):
    reference = trajectories(run_experts(small_cfg(), progress=False).out_dir)
    shutil.rmtree(run_experts(small_cfg(), progress=False).out_dir)

    calls = {"n": 0}
    real = experts_mod.train_epoch

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # expert 0 done (3 epochs), expert 1 one epoch in
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(experts_mod, "train_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_experts(small_cfg(), progress=False)
    out = experts_mod.experts_dir(small_cfg())
    _, meta1 = read_expert(expert_path(out, 1))
    assert meta1["epochs_done"] == 1 and not meta1["complete"]

    calls["n"] = -100  # no more interrupts; count what the resume trains
    res = run_experts(small_cfg(), progress=False)
    assert calls["n"] == -100 + 2  # only expert 1's two missing epochs
    assert res.trained_epochs == 2
    for a, b in zip(reference, trajectories(out), strict=False):
        assert torch.equal(a, b)


def test_more_epochs_extend_existing_experts(digits):
    out = run_experts(small_cfg(), progress=False).out_dir
    res = run_experts(small_cfg(**{"experts.epochs": 4}), progress=False)
    assert res.out_dir == out and res.trained_epochs == 2
    assert trajectories(out)[0].shape[0] == 5


def test_corrupt_expert_file_is_reported(digits):
    out = run_experts(small_cfg(), progress=False).out_dir
    path = expert_path(out, 1)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(D3FastError, match="expert_0001.safetensors is corrupt or truncated"):
        run_experts(small_cfg(), progress=False)


def test_divergence_is_a_clear_error(digits):
    with pytest.raises(D3FastError, match="diverged"):
        run_experts(small_cfg(**{"experts.lr": 1e6, "experts.num_experts": 1, "experts.epochs": 2}), progress=False)


def test_experts_say_that_distill_dtype_is_not_theirs(digits):
    """`d3fast experts --set distill.dtype=float64`: trained and stored in float32 as always,
    with one line saying so (a float64 distillation reads them cast up)."""
    from click.testing import CliRunner

    from d3fast.cli import cli

    res = CliRunner().invoke(cli, ["experts", "--dataset", "digits", "--num-experts", "1", "--epochs", "1",
                                   "--set", "net.width=8", "--set", "distill.dtype=float64", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "expert trajectories train and are stored in float32; distill.dtype=float64" in res.output
    (path,) = Path(os.environ["D3FAST_HOME"]).glob("experts/digits/*/expert_*.safetensors")
    assert read_expert(path)[0]["trajectory"].dtype == torch.float32


def test_snapshots_within_an_epoch_leave_the_trajectory_as_it_was(digits, monkeypatch):
    """experts.snapshots_per_epoch=2: 2 rows per epoch, the epoch-end rows equal the experts
    kept once per epoch bit for bit (a snapshot does not disturb training), the mid-epoch row
    equals the parameters after that epoch's step round(n/2), and an interrupted expert
    resumes to the same file."""
    from d3fast.data.loader import load_view
    from d3fast.runtime import derive_seed
    from d3fast.training import flat_params, load_flat_params, train_epoch

    once = trajectories(run_experts(small_cfg(**{"experts.augment": "false"}), progress=False).out_dir)
    cfg = small_cfg(**{"experts.augment": "false", "experts.snapshots_per_epoch": 2})
    res = run_experts(cfg, progress=False)
    assert res.out_dir != experts_mod.experts_dir(small_cfg(**{"experts.augment": "false"}))
    assert res.manifest["snapshots_per_epoch"] == 2
    twice = trajectories(res.out_dir)
    for a, b in zip(once, twice, strict=True):
        assert b.shape[0] == 2 * 3 + 1
        assert torch.equal(a, b[::2])

    # the mid-epoch row, independently: epoch 1 replayed from its start, stopped after step n/2
    data = load_view(cfg, "train", torch.device("cpu"))
    n = -(-len(data) // cfg.experts.batch_size)
    net = experts_mod._build(cfg, data, derive_seed(0, 0))
    load_flat_params(net, twice[0][2])
    opt = torch.optim.SGD(net.parameters(), lr=cfg.experts.lr)

    class Stop(Exception):
        pass

    def stop(step):
        if step == round(n / 2):
            raise Stop

    with pytest.raises(Stop):
        train_epoch(net, opt, data, cfg.experts.batch_size, torch.Generator().manual_seed(derive_seed(0, 0, 1)), None, stop)
    assert torch.equal(flat_params(net), twice[0][3])

    shutil.rmtree(res.out_dir)
    calls = {"n": 0}
    real = experts_mod.train_epoch

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # expert 0 one epoch in
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(experts_mod, "train_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_experts(cfg, progress=False)
    assert read_expert(expert_path(res.out_dir, 0))[1]["epochs_done"] == 1
    run_experts(cfg, progress=False)
    for a, b in zip(twice, trajectories(res.out_dir), strict=True):
        assert torch.equal(a, b)


def test_more_snapshots_than_steps_is_a_clear_error(digits):
    cfg = small_cfg(**{"experts.snapshots_per_epoch": 64})
    with pytest.raises(D3FastError, match="snapshots_per_epoch=64 is more than the 6 SGD steps"):
        run_experts(cfg, progress=False)
    assert not experts_mod.experts_dir(cfg).exists()  # refused before any folder was made


@pytest.mark.parametrize("complete", [True, False])
def test_a_file_of_another_snapshot_spacing_is_refused(digits, complete):
    """An expert file copied from a folder of another experts.snapshots_per_epoch would have
    its rows read as other epochs (or be rewritten as another spacing): refused by name."""
    from d3fast.trajectories import ready_experts

    once, twice = small_cfg(), small_cfg(**{"experts.snapshots_per_epoch": 2})
    for src, dst in ((once, twice), (twice, once)):
        run_experts(src, progress=False)
        folder = experts_mod.experts_dir(dst)
        folder.mkdir(parents=True, exist_ok=True)
        tensors, meta = read_expert(expert_path(experts_mod.experts_dir(src), 1))
        meta.update(complete=complete)
        shutil.copy(expert_path(experts_mod.experts_dir(src), 1), expert_path(folder, 1))
        if not complete:  # as an interrupted expert of the other spacing would be
            experts_mod.write_expert(expert_path(folder, 1), tensors["trajectory"], index=1, seed=meta["seed"],
                                     complete=False, test_acc=None, history=meta["history"],
                                     param_layout=meta["param_layout"],
                                     snapshots_per_epoch=meta.get("snapshots_per_epoch", 1))
        held = 1 if src is once else 2
        with pytest.raises(D3FastError, match=f"expert_0001.safetensors keeps {held} snapshot.s. per epoch"):
            run_experts(dst, progress=False)
        with pytest.raises(D3FastError, match=f"keeps {held} snapshot.s. per epoch"):
            ready_experts(dst)
        shutil.rmtree(folder)
