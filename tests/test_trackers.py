"""Trackers beside metrics.jsonl: TensorBoard's event files read back with TensorBoard's own
reader; W&B (offline) and MLflow (file store) when installed; a missing package is a clear
error before any work."""

from __future__ import annotations

import importlib.util
import json

import pytest
from click.testing import CliRunner

from d3fast.cli import cli
from d3fast.recipes.distill import distill
from d3fast.run import Run
from d3fast.trackers import Trackers
from tests._utils import cfg_of, evaluate_run


def _events(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard is not installed")
def test_tensorboard_receives_metrics_grids_and_the_eval_table(home, tmp_path):
    run = Run.at(tmp_path / "run")
    distill(cfg_of("distill.steps=3", "log.trackers=tensorboard", "log.sample_every=2"), run, progress=False)
    acc = _events(run.path / "tensorboard")
    metrics = [json.loads(line) for line in run.metrics_path.read_text().splitlines()]
    mtt = acc.Scalars("mtt")
    assert [e.step for e in mtt] == [1, 2, 3]
    assert [e.value for e in mtt] == pytest.approx([m["mtt"] for m in metrics])  # the same stream as metrics.jsonl
    assert [e.step for e in acc.Images("samples")] == [2, 3]  # every 2 steps and at the last
    evaluate_run(run, {"eval": {"students": 1, "epochs": 1, "baselines": False}}, progress=False, device="cpu")
    acc = _events(run.path / "tensorboard")
    assert acc.Scalars("eval/convnet/d3")[-1].step == 3
    table = acc.Tensors("eval/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert "D3 (fresh samples)" in table


def test_a_missing_tracker_is_named_before_any_work(home, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    r = CliRunner().invoke(cli, ["distill", "--dataset", "digits", "--log", "wandb", "--runs-dir", str(tmp_path / "r"),
                                 "--no-auto", "--device", "cpu"])
    assert r.exit_code == 2 and "pip install wandb" in r.output and not (tmp_path / "r").exists()
    r = CliRunner().invoke(cli, ["config", "--dataset", "digits", "--set", "log.trackers=neptune"])
    assert r.exit_code == 2 and "log.trackers: unknown" in r.output


def test_a_failing_tracker_is_dropped_with_a_warning(tmp_path, capsys):
    t = Trackers([], tmp_path, "r", {})

    class Broken:
        def metrics(self, step, values):
            raise OSError("disk gone")

    t.open["tensorboard"] = Broken()
    t.metrics(1, {"mtt": 1.0, "note": "text", "ok": True})
    assert not t.open and "tracker tensorboard stopped" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard is not installed")
def test_a_tracker_thread_that_fails_is_one_warning_not_a_traceback(tmp_path):
    # issue 32: an unwritable TensorBoard folder gave the warning and then a 40-line traceback
    # from TensorBoard's writer thread. A folder where nothing can be created, even by root
    # (chmod does not stop root): a link into /proc. Fresh processes: the thread's failure
    # races the process's exit, so five of them.
    import subprocess
    import sys

    run = tmp_path / "run"
    run.mkdir()
    (run / "tensorboard").symlink_to("/proc/self/fdinfo")
    code = ("from pathlib import Path\nfrom d3fast.trackers import Trackers\n"
            f"with Trackers(['tensorboard'], Path({str(run)!r}), 'x', {{}}) as t:\n"
            "    t.metrics(1, {'loss': 1.0})\n    t.metrics(2, {'loss': 0.5})\nprint('went on')\n")
    for _ in range(5):
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and r.stdout == "went on\n", r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("warning: tracker tensorboard stopped ("), r.stderr


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed")
def test_wandb_offline(home, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    run = Run.at(tmp_path / "run")
    distill(cfg_of("distill.steps=2", "log.trackers=wandb", "log.sample_every=0"), run, progress=False)
    assert list((run.path / "wandb").glob("offline-run-*/run-*.wandb"))


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is None, reason="mlflow is not installed")
def test_mlflow_file_store(home, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    import mlflow

    run = Run.at(tmp_path / "run")
    distill(cfg_of("distill.steps=2", "log.trackers=mlflow", "log.sample_every=0"), run, progress=False)
    mlflow.set_tracking_uri((run.path / "mlruns").resolve().as_uri())
    found = mlflow.search_runs(experiment_names=["d3fast"], output_format="list")
    history = mlflow.MlflowClient().get_metric_history(found[0].info.run_id, "mtt")
    assert [m.step for m in history] == [1, 2]
