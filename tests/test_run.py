"""The run's state: non-finite values never reach a checkpoint, a resume applies and records
every change it is allowed to make and refuses the others, the experts directory does not
depend on what is installed, and a hint that names a command is one that works."""

from __future__ import annotations

import inspect
import json
import shlex
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from d3fast import losses, mmd_update
from d3fast.cli import cli
from d3fast.config import APPLIED_ON_RESUME, FIXED_ON_RESUME, Config, flatten
from d3fast.errors import D3FastError
from d3fast.recipes.distill import distill
from d3fast.run import Run
from d3fast.state import load_checkpoint
from tests._utils import OVERRIDES, cfg_of

STEPS = 4


@pytest.fixture(scope="module")
def straight(shared_home, tmp_path_factory):
    """An uninterrupted 4-step run, checkpointed every step."""
    mp = pytest.MonkeyPatch()
    mp.setenv("D3FAST_HOME", str(shared_home))
    run = Run.at(tmp_path_factory.mktemp("straight") / "run")
    distill(cfg_of(f"distill.steps={STEPS}", "distill.ppc=2"), run, progress=False)
    mp.undo()
    return Run(run.path).load_distilled()[0]


class _NaNGrad(torch.autograd.Function):
    """Identity whose backward returns NaN: a finite loss with a non-finite gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


def _poison_mtt_loss(monkeypatch, at_call):
    real, calls = losses.param_dist, []

    def poisoned(*args):
        calls.append(1)
        out = real(*args)
        return out * float("nan") if len(calls) == at_call else out

    monkeypatch.setattr(losses, "param_dist", poisoned)


def _poison_mmd_gradient(monkeypatch, at_call):
    real, calls = mmd_update.mmd_terms, []

    def poisoned(*args, **kwargs):
        calls.append(1)
        mmd, div = real(*args, **kwargs)
        return (_NaNGrad.apply(mmd), div) if len(calls) == at_call else (mmd, div)

    monkeypatch.setattr(mmd_update, "mmd_terms", poisoned)


def _poison_optimizer_step(monkeypatch, at_call):
    # the decoder's Adam steps twice per distill step (MTT, then MMD update); alpha's Adam
    # (lr_param log) is not counted
    real, calls = torch.optim.Adam.step, []

    def poisoned(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        if self.param_groups[0]["params"][0].numel() > 1:
            calls.append(1)
            if len(calls) == at_call:
                with torch.no_grad():
                    next(iter(self.param_groups[0]["params"])).view(-1)[0] = float("inf")
        return out

    monkeypatch.setattr(torch.optim.Adam, "step", poisoned)


@pytest.mark.parametrize("poison, at_call, where", [
    (_poison_mtt_loss, 3, "loss at step 3: {'mtt': nan} in the MTT update"),
    (_poison_mmd_gradient, 3, "state at step 3: latents, decoder."),
    (_poison_optimizer_step, 5, "state at step 3: decoder."),
], ids=["mtt-loss", "mmd-gradient", "optimizer-step"])
def test_nan_anywhere_keeps_the_last_checkpoint_and_the_run_resumable(
    home, tmp_path, monkeypatch, straight, poison, at_call, where
):
    run = Run.at(tmp_path / "r")
    cfg = cfg_of(f"distill.steps={STEPS}", "distill.ppc=2")
    saved: dict[int, bytes] = {}
    on_step = lambda m: saved.__setitem__(m["step"], run.checkpoint_path.read_bytes())  # noqa: E731
    with monkeypatch.context() as mp:
        poison(mp, at_call)
        with pytest.raises(D3FastError, match="non-finite") as err:
            distill(cfg, run, progress=False, on_step=on_step)
    msg = str(err.value)
    assert where in msg and "last good checkpoint" in msg and f"d3fast distill --resume {run.path}" in msg
    assert sorted(saved) == [1, 2]
    assert run.checkpoint_path.read_bytes() == saved[2]  # bit-identical to the step-2 checkpoint
    assert [m["step"] for m in run.read_metrics()] == [1, 2]
    # resumable, and since the bad step was never saved, equal to the uninterrupted run
    res = distill(run.read_config(), run, resume=True, progress=False)
    assert res.step == STEPS
    d, _ = run.load_distilled()
    assert torch.equal(d.latents, straight.latents) and torch.equal(d.alpha, straight.alpha)


def test_the_issue_example_a_huge_lr_stops_before_any_nan_is_saved(home, tmp_path):
    # lr_latent 1e8: step 1's MTT update throws the log-variances past exp's float32 range
    run = Run.at(tmp_path / "r")
    with pytest.raises(D3FastError, match="overflowing state at step 1: latent log-variance") as err:
        distill(cfg_of("distill.lr_latent=1e8", "distill.steps=6"), run, progress=False)
    assert "in the MTT update" in str(err.value) and "no checkpoint was written yet" in str(err.value)
    assert not run.has_checkpoint()


@pytest.mark.parametrize("bad, what", [
    ("distill.lr_latent=1e4", "overflowing state"),  # finite, but exp(logvar) overflows
    ("distill.lr_lr=1e9", "student lr"),  # finite, but exp(alpha) leaves float32 in one Adam step
])
def test_finite_but_unusable_state_is_never_saved_and_the_hint_resumes(home, tmp_path, bad, what):
    res = _cli("distill", "--dataset", "digits", "--runs-dir", str(tmp_path), "--steps", "3", "--no-auto",
               sets=["--set", bad])
    assert res.exit_code == 2 and what in res.output, res.output
    run = Run(next((tmp_path / "digits").iterdir()))
    if run.has_checkpoint():
        run.load_distilled()  # whatever was saved is usable
    hint = res.output[res.output.index("d3fast distill --resume"):].split()
    assert hint[3] == str(run.path)
    res = CliRunner().invoke(cli, hint[1:])
    assert res.exit_code == 0 and "reached step 3/3" in res.output, res.output
    assert len(run.load_distilled()) == 2


def _bad_run(tmp_path, key, value) -> Run:
    """A run whose checkpoint holds a bad value, as an older d3fast could leave behind."""
    run = Run.at(tmp_path / "bad")
    distill(cfg_of("distill.steps=1"), run, progress=False)
    state = load_checkpoint(run.checkpoint_path)
    state[key].view(-1)[0] = value
    state["format"] = 1  # an older d3fast's checkpoint: format 1, which may lack the digest
    torch.save(state, run.checkpoint_path)
    return run


@pytest.mark.parametrize("command", ["export", "sample", "evaluate"])
@pytest.mark.parametrize("key, value, says", [
    ("latents", float("nan"), "non-finite state (latents)"),
    ("alpha", -1e4, "non-positive student lr"),  # lr = exp(-1e4) = 0 (lr_param log, the default)
])
def test_commands_refuse_an_unusable_run(home, tmp_path, command, key, value, says):
    run = _bad_run(tmp_path, key, value)
    args = [command, str(run.path)] + (["--out", str(tmp_path / "x")] if command != "evaluate" else [])
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 2, res.output
    assert f"cannot be used: {says}" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "x").exists()
    res = _resume(run, "--steps", "2")
    assert res.exit_code == 2 and f"cannot be trained on: {says}" in res.output, res.output


def _cli(*args, sets=()):
    """A command with the tiny digits overrides, then `sets` (later --set values win)."""
    tiny = sum((["--set", o] for o in OVERRIDES if not o.startswith(("device", "distill.steps"))), [])
    return CliRunner().invoke(cli, [*args, *tiny, *sets, "--device", "cpu"])


def _resume(run, *args):
    return CliRunner().invoke(cli, ["distill", "--resume", str(run.path), *args])


def test_resume_applies_and_records_changed_learning_rates(home, tmp_path):
    res = _cli("distill", "--dataset", "digits", "--runs-dir", str(tmp_path), "--steps", "2", "--no-auto")
    assert res.exit_code == 0, res.output
    run = Run(next((tmp_path / "digits").iterdir()))
    before = load_checkpoint(run.checkpoint_path)

    res = _resume(run, "--steps", "3", "--set", "distill.lr_latent=0", "--set", "distill.lr_decode=0",
                  "--set", "distill.lr_lr=0")
    assert res.exit_code == 0 and "reached step 3/3" in res.output, res.output
    after = load_checkpoint(run.checkpoint_path)
    assert after["step"] == 3
    for opt in ("opt_latent", "opt_lr", "opt_decoder"):
        assert [g["lr"] for g in after[opt]["param_groups"]] == [0.0], opt
    # with every learning rate at 0, the step moved nothing (it did: the issue's bug)
    assert torch.equal(after["latents"], before["latents"]) and torch.equal(after["alpha"], before["alpha"])
    for k, v in before["decoder"].items():
        if v.is_floating_point() and "running" not in k:
            assert torch.equal(after["decoder"][k], v), k
    cfg = run.read_config()
    assert (cfg.distill.lr_latent, cfg.distill.lr_decode, cfg.distill.lr_lr, cfg.distill.steps) == (0, 0, 0, 3)
    last = run.history()[-1]
    assert last["event"] == "resume" and last["step"] == 2
    assert last["changes"]["distill.lr_latent"] == [0.01, 0.0] and last["changes"]["distill.steps"] == [2, 3]

    # the recorded step count is what a plain --resume (the Ctrl-C hint) continues to
    res = _resume(run)
    assert res.exit_code == 0 and "reached step 3/3" in res.output and run.history()[-1]["changes"] == {}
    res = _resume(run, "--steps", "4")
    assert res.exit_code == 0 and "reached step 4/4" in res.output


@pytest.mark.parametrize("flag, key", [
    (["--set", "distill.ppc=3"], "distill.ppc"),
    (["--ppc", "3"], "distill.ppc"),
    (["--set", "net.width=16"], "net.width"),
    (["--dataset", "fashion-mnist"], "data.dataset"),
    (["--set", "experts.lr=0.5"], "experts.lr"),
    (["--set", "distill.seed=5"], "distill.seed"),
    (["--dtype", "float64"], "distill.dtype"),
])
def test_resume_refuses_what_the_state_fixes(home, tmp_path, flag, key):
    run = Run.at(tmp_path / "r")
    distill(cfg_of("distill.steps=1"), run, progress=False)
    config_before = run.config_path.read_bytes()
    res = _resume(run, *flag)
    assert res.exit_code == 2, res.output
    assert f"cannot change {key} when resuming" in res.output and "Traceback" not in res.output
    assert run.config_path.read_bytes() == config_before and load_checkpoint(run.checkpoint_path)["step"] == 1
    res = _resume(run, "--preset", "digits")
    assert res.exit_code == 2 and "--preset" in res.output


def test_a_checkpoint_of_another_dtype_is_refused_and_reads_back_as_float32_for_use(home, tmp_path):
    """A float64 run's checkpoint resumes only in float64 (the run's config refuses the change;
    the state checks it again on load); evaluation, sampling and exports read it as float32."""
    run = Run.at(tmp_path / "r")
    distill(cfg_of("distill.steps=1", "distill.dtype=float64"), run, progress=False)
    cfg = run.read_config()
    assert cfg.distill.dtype == "float64"  # recorded
    cfg.distill.dtype = "float32"
    with pytest.raises(D3FastError, match="cannot change distill.dtype when resuming"):
        distill(cfg, run, resume=True, progress=False)
    from d3fast.distilled import Distilled
    from d3fast.state import TrainState

    as32 = TrainState.create(Distilled.from_state_dict(run.load_state(), dtype=torch.float32), cfg.distill,
                             torch.device("cpu"))
    with pytest.raises(D3FastError, match="the checkpoint holds float64 tensors and this run computes in float32"):
        as32.load_state_dict(run.load_state(), cfg.distill)
    d, step = run.load_distilled()
    assert step == 1 and d.dtype == torch.float32 and all(
        t.dtype == torch.float32 for _, t in d.named_tensors() if t.is_floating_point())
    d64, _ = run.load_distilled(dtype=None)
    assert d64.dtype == torch.float64 and torch.equal(d64.latents.float(), d.latents)


def test_every_config_key_is_classified_for_resuming():
    for key in flatten(Config()):
        section = key.split(".")[0]
        applied = key in APPLIED_ON_RESUME or section in APPLIED_ON_RESUME
        fixed = key in FIXED_ON_RESUME or section in FIXED_ON_RESUME
        assert applied != fixed, key


def test_the_not_ready_hint_run_as_printed_lets_the_distill_start(tmp_path):
    # a fresh home: the tiny experts of OVERRIDES have 3 epochs; this distill needs 6
    res = _cli("experts", "--dataset", "digits")
    assert res.exit_code == 0, res.output
    need = ["--set", "experts.epochs=7", "--set", "distill.max_start_epoch=5"]
    args = ["distill", "--dataset", "digits", "--runs-dir", str(tmp_path), "--steps", "1", "--no-auto"]
    res = _cli(*args, sets=need)
    assert res.exit_code == 2, res.output
    hint = res.output.strip().splitlines()[-1].strip()
    assert hint.startswith("d3fast experts ") and "--epochs 7" in hint
    res = CliRunner().invoke(cli, shlex.split(hint)[1:])
    assert res.exit_code == 0 and "2/2 experts complete" in res.output, res.output
    res = _cli(*args, sets=need)
    assert res.exit_code == 0 and "reached step 1/1" in res.output, res.output


def test_naming_the_experts_directory_imports_no_ffcv(home):
    code = (
        "import sys; from tests._utils import cfg_of; from d3fast.trajectories import experts_dir\n"
        "cfg = cfg_of('data.loader=cache'); experts_dir(cfg)\n"
        "assert not any(m == 'ffcv' or m.startswith('ffcv.') for m in sys.modules), 'ffcv imported'\n"
        "assert 'd3fast.recipes.distill' not in sys.modules\n"
        "import d3fast.recipes.evaluate, d3fast.run\n"
        "assert 'd3fast.recipes.distill' not in sys.modules, 'evaluate imports the training loop'\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_distill_loop_fits_one_screen():
    from d3fast.recipes.distill import distill as fn

    assert len(inspect.getsource(fn).splitlines()) <= 60


def test_run_directories_of_the_same_second_are_distinct(tmp_path):
    cfg = cfg_of()
    paths = {Run.create(tmp_path, cfg, "same").path for _ in range(5)}
    assert len(paths) == 5 and all(p.is_dir() for p in paths)


def test_torn_metrics_line_is_dropped_on_resume(home, tmp_path):
    run = Run.at(tmp_path / "r")
    distill(cfg_of("distill.steps=2"), run, progress=False)
    with open(run.metrics_path, "a") as f:
        f.write('{"step": 3, "mtt": 0.')  # a crash mid-write
    cfg = run.read_config()
    cfg.distill.steps = 3
    res = distill(cfg, run, resume=True, progress=False)
    assert res.step == 3 and [m["step"] for m in run.read_metrics()] == [1, 2, 3]
    json.loads(run.metrics_path.read_text().splitlines()[-1])


def test_an_empty_resume_argument_is_an_error_not_a_new_run(home, tmp_path):
    res = CliRunner().invoke(cli, ["distill", "--resume", "", "--runs-dir", str(tmp_path)])
    assert res.exit_code == 2 and "no run given" in res.output, res.output
    assert not any(tmp_path.iterdir())


def test_a_refused_dataset_change_prepares_nothing(home, tmp_path):
    from d3fast.paths import data_dir

    run = Run.at(tmp_path / "r")
    distill(cfg_of("distill.steps=1"), run, progress=False)
    res = _resume(run, "--dataset", "cifar10")
    assert res.exit_code == 2 and "cannot change data.dataset" in res.output, res.output
    assert not data_dir("cifar10").exists()


def test_steps_below_the_reached_step_are_refused_and_not_recorded(home, tmp_path):
    run = Run.at(tmp_path / "r")
    distill(cfg_of("distill.steps=2"), run, progress=False)
    res = _resume(run, "--steps", "1")
    assert res.exit_code == 2 and "below the step this run reached (2)" in res.output, res.output
    assert run.read_config().distill.steps == 2 and len(run.history()) == 1


@pytest.mark.parametrize("damage", ["corrupt", "list", "deleted"])
def test_config_and_manifest_are_rebuilt_from_the_history(home, tmp_path, damage):
    run = Run.at(tmp_path / "r")
    distill(cfg_of("distill.steps=1"), run, progress=False)
    assert _resume(run, "--steps", "2", "--set", "distill.kl_weight=0.5").exit_code == 0
    config, manifest = run.config_path.read_bytes(), run.manifest_path.read_bytes()
    for path in (run.config_path, run.manifest_path):
        if damage == "deleted":
            path.unlink()
        else:
            path.write_text('{"data": ' if damage == "corrupt" else "[]")
    res = _resume(run, "--steps", "3")
    assert res.exit_code == 0 and "rebuilt it from" in res.output and "reached step 3/3" in res.output, res.output
    assert json.loads(run.manifest_path.read_bytes()) == json.loads(manifest)
    rebuilt = json.loads(run.config_path.read_bytes())
    assert rebuilt["distill"]["kl_weight"] == 0.5 and rebuilt == {**json.loads(config), "distill": {
        **json.loads(config)["distill"], "steps": 3}}


def test_without_a_history_a_lost_config_is_a_clear_error(home, tmp_path):
    run = Run.at(tmp_path / "r")
    distill(cfg_of("distill.steps=1"), run, progress=False)
    run.history_path.unlink()
    run.config_path.write_text("[]")
    res = _resume(run, "--steps", "2")
    assert res.exit_code == 2 and "holds a JSON list" in res.output and "cannot be resumed" in res.output
    res = CliRunner().invoke(cli, ["export", str(run.path), "--out", str(tmp_path / "d.safetensors")])
    assert res.exit_code == 0, res.output  # as the message says: the checkpoint still exports


def test_a_run_in_progress_is_locked_against_a_second_process(home, tmp_path):
    run = Run.at(tmp_path / "r")
    distill(cfg_of("distill.steps=1"), run, progress=False)
    code = ("import sys; from d3fast.run import Run\n"
            f"cm = Run({str(run.path)!r}).lock(); cm.__enter__(); print('locked', flush=True); sys.stdin.read()\n")
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        res = _resume(run, "--steps", "2")
        assert res.exit_code == 2 and f"in use by another d3fast process (pid {holder.pid})" in res.output, res.output
        assert load_checkpoint(run.checkpoint_path)["step"] == 1 and len(run.history()) == 1
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    # the holder is gone: the OS released its lock
    res = _resume(run, "--steps", "2")
    assert res.exit_code == 0 and "reached step 2/2" in res.output, res.output


def test_device_hours_carry_over_to_a_copied_run(home, tmp_path):
    import shutil

    run = Run.at(tmp_path / "a")
    distill(cfg_of("distill.steps=2"), run, progress=False)
    copy = Run(shutil.copytree(run.path, tmp_path / "b"))  # another path: the ledger knows nothing of it
    cfg = copy.read_config()
    cfg.distill.steps = 3
    distill(cfg, copy, resume=True, progress=False)
    hours = [m["device_hours"] for m in copy.read_metrics()]
    assert hours[2] > hours[1] > hours[0] > 0


def test_a_run_without_config_json_still_resumes_from_its_history(home, tmp_path):
    run = Run.at(tmp_path / "r")
    distill(cfg_of("distill.steps=2"), run, progress=False)
    run.config_path.unlink()
    res = distill(cfg_of("distill.steps=3"), run, resume=True, progress=False)
    assert res.step == 3 and [m["step"] for m in run.read_metrics()] == [1, 2, 3]
    assert [r["event"] for r in run.history()] == ["start", "resume"]


def test_runs_live_under_the_home_and_latest_finds_them_from_anywhere(home, tmp_path, monkeypatch):
    tiny = sum((["--set", o] for o in OVERRIDES if not o.startswith(("device", "distill.steps"))), [])
    monkeypatch.chdir(tmp_path)
    runs = home / "runs" / "digits"
    before = set(runs.iterdir()) if runs.exists() else set()
    res = CliRunner().invoke(cli, ["distill", "--dataset", "digits", "--steps", "1", "--no-auto", *tiny])
    assert res.exit_code == 0, res.output
    assert len(set(runs.iterdir()) - before) == 1  # under the home, not ./runs
    assert not (tmp_path / "runs").exists()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    res = CliRunner().invoke(cli, ["export", "latest", "--out", "x.safetensors"])
    assert res.exit_code == 0 and (elsewhere / "x.safetensors").exists(), res.output
    monkeypatch.setenv("D3FAST_RUNS", str(tmp_path / "shared"))
    res = CliRunner().invoke(cli, ["distill", "--dataset", "digits", "--steps", "1", "--no-auto", *tiny])
    assert res.exit_code == 0 and len(list((tmp_path / "shared" / "digits").iterdir())) == 1, res.output


def test_runs_lists_status_losses_and_evaluations(home, tmp_path):
    runs = tmp_path / "runs"
    a = Run.create(runs, cfg_of("distill.steps=2"), "a")
    distill(cfg_of("distill.steps=2"), a, progress=False)
    b = Run.create(runs, cfg_of("distill.steps=2"), "b")
    distill(cfg_of("distill.steps=2"), b, progress=False)
    cfg = json.loads(b.config_path.read_text())
    cfg["distill"]["steps"] = 5  # as a run stopped at step 2 of 5
    b.config_path.write_text(json.dumps(cfg))
    (a.path / "eval.json").write_text(json.dumps({"results": {"convnet": {"d3": {"mean": 0.5, "std": 0.0}}}}))
    with a.lock():  # held by a distilling process
        r = CliRunner().invoke(cli, ["runs", "--runs-dir", str(runs), "--json"])
    rows = {row["name"].split("-")[-1]: row for row in json.loads(r.output)}
    losses = [json.loads(line)["loss"] for line in a.metrics_path.read_text().splitlines()]
    assert rows["a"]["status"] == "running" and rows["b"]["status"] == "stopped" and rows["b"]["steps"] == 5
    assert rows["a"]["best_loss"] == min(losses) and rows["a"]["step"] == 2 and rows["a"]["device_hours"] > 0
    assert rows["a"]["last_eval"] == "convnet: d3 50.0±0.0%" and rows["b"]["last_eval"] == ""
    text = CliRunner().invoke(cli, ["runs", "--runs-dir", str(runs)]).output
    assert "finished" in text and "2/5" in text and "stopped" in text
    a.metrics_path.write_text("{torn")  # a damaged file costs its fields, not the listing
    assert CliRunner().invoke(cli, ["runs", "--runs-dir", str(runs)]).exit_code == 0

    # issue 32: the status comes from the checkpoint, not the metrics alone: a truncated one, a
    # flipped byte in one, and none at all are not "finished" or "stopped"
    def status() -> str:
        r = CliRunner().invoke(cli, ["runs", "--runs-dir", str(runs), "--json"])
        return {row["name"].split("-")[-1]: row for row in json.loads(r.output)}["b"]["status"]

    data = b.checkpoint_path.read_bytes()
    b.checkpoint_path.write_bytes(data[: len(data) // 2])
    assert status() == "damaged checkpoint"
    flipped = bytearray(data)
    flipped[len(data) // 3] ^= 0x10
    b.checkpoint_path.write_bytes(bytes(flipped))
    assert status() == "damaged checkpoint"
    in_directory = bytearray(data)  # the zip's central directory: its CRCs pass, torch's reader fails
    in_directory[len(data) - 60] ^= 0x01
    b.checkpoint_path.write_bytes(bytes(in_directory))
    assert status() == "damaged checkpoint"
    b.checkpoint_path.unlink()
    assert status() == "no checkpoint"
    b.checkpoint_path.write_bytes(data)
    assert status() == "stopped"


def test_runs_survives_wrong_typed_files_and_names_are_one_folder(home, tmp_path):
    runs = tmp_path / "runs"
    a = Run.create(runs, cfg_of("distill.steps=1"), "a")
    distill(cfg_of("distill.steps=1"), a, progress=False)
    a.config_path.write_text("[]")
    (a.path / "eval.json").write_text("[1, 2]")
    with open(a.metrics_path, "a") as f:
        f.write("garbage\n")
    rows = json.loads(CliRunner().invoke(cli, ["runs", "--runs-dir", str(runs), "--json"]).output)
    assert rows[0]["step"] == 1 and rows[0]["preset"] == "?" and rows[0]["last_eval"] == "?"
    r = CliRunner().invoke(cli, ["distill", "--dataset", "digits", "--name", "../../x", "--runs-dir", str(runs),
                                 "--no-auto"])
    assert r.exit_code == 2 and "one folder name" in r.output


def test_holding_a_run_removes_the_temporaries_of_writers_that_are_gone(tmp_path):
    # issue 32: a dead writer's .checkpoint.pt.<owner>.*.tmp in a run folder survived --resume

    from d3fast.io import owner_tag

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # its pid: a writer that has ended
    host = owner_tag().split("-")[0]
    run = Run.at(tmp_path / "run")
    run.path.mkdir(parents=True, exist_ok=True)
    dead = run.path / f".checkpoint.pt.{host}-{gone.pid}.x1y2z3.tmp"
    live = run.path / f".metrics.jsonl.{owner_tag()}.a1b2c3.tmp"  # this process: a live writer
    for f in (dead, live):
        f.write_bytes(b"half a checkpoint")
    with run.lock():
        assert not dead.exists() and live.exists()


def test_a_resume_auto_name_is_claimed_by_one_job_at_a_time(home, tmp_path):
    # issue 32: two `--name X --resume auto` jobs started at the same moment both looked for
    # run X, found none, and both created one (double the compute). The name is now held
    # (an flock) from the lookup to the job's end: the second job stops at once.
    import threading

    from d3fast.recipes.distill import claimed_name

    runs = tmp_path / "runs"
    args = ["distill", "--dataset", "digits", *[x for o in OVERRIDES for x in ("--set", o)], "--runs-dir", str(runs),
            "--name", "job", "--resume", "auto"]
    started, stop = threading.Event(), threading.Event()

    def other_job() -> None:  # holds the name from another open file, as another process would
        with claimed_name(str(runs), "digits", "job"):
            started.set()
            stop.wait(60)

    t = threading.Thread(target=other_job)
    t.start()
    try:
        assert started.wait(60)
        r = CliRunner().invoke(cli, args)
        assert r.exit_code == 2 and "is running the run named 'job': this one stops" in r.output, r.output
        assert not [p for p in (runs / "digits").iterdir() if p.is_dir()]  # no run was created
    finally:
        stop.set()
        t.join()
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0 and "reached step 3/3" in r.output, r.output
    r = CliRunner().invoke(cli, args)  # the same job again: it continues its run, not a new one
    assert r.exit_code == 0 and len([p for p in (runs / "digits").iterdir() if p.is_dir()]) == 1, r.output
    # a scheduler restarts the whole command line, its --preset included: the run's own preset
    # continues it (it was "--preset picks the configuration of a new run", so a restarted
    # `d3fast frontier` could not continue an interrupted point); another preset is refused
    r = CliRunner().invoke(cli, [*args, "--preset", "digits"])
    assert r.exit_code == 0 and "reached step 3/3" in r.output, r.output
    toml = tmp_path / "mine.toml"
    toml.write_text(CliRunner().invoke(cli, ["config", "--dataset", "digits", "--format", "toml"]).output)
    r = CliRunner().invoke(cli, [*args, "--preset", str(toml)])
    assert r.exit_code == 2 and f"a run of preset digits, not {toml}" in r.output, r.output
    assert len([p for p in (runs / "digits").iterdir() if p.is_dir()]) == 1


def test_runs_under_a_file_are_one_clear_error(home, tmp_path):
    # issue 32's second round: RUNS/digits a regular file was "unexpected FileExistsError"
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "digits").write_text("not a folder")
    base = ["distill", "--dataset", "digits", *[x for o in OVERRIDES for x in ("--set", o)], "--runs-dir", str(runs)]
    for extra in ([], ["--name", "z", "--resume", "auto"]):
        r = CliRunner().invoke(cli, [*base, *extra])
        assert r.exit_code == 2 and "a file is in the way" in r.output, r.output
