"""`d3fast profile` on the CPU: every report file, phases that add up to the measured step."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from d3fast import ledger
from d3fast.cli import cli
from d3fast.phases import PHASES
from d3fast.recipes.profile import profile, summary_line
from tests._utils import OVERRIDES, OpClock, cfg_of

pytestmark = pytest.mark.slow


def _run(out, *extra):
    args = ["profile", "--dataset", "digits", "--out", str(out), "--steps", "3", "--trace-steps", "1", *extra]
    for o in OVERRIDES:
        args += ["--set", o]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    return res.output, json.loads((out / "report.json").read_text())


def test_profile_report_on_real_inputs(home, tmp_path):
    out = tmp_path / "prof"
    cfg = cfg_of()
    # time counted in tensor ops: the same report on every machine, no timing noise
    with OpClock() as clock:
        res = profile(cfg, out, steps=3, trace_steps=1, warmup=1, progress=False, clock=clock, free_steps=2)
    r = res.report
    assert "phases cover" in summary_line(r)
    for name in ("report.md", "report.json", "trace.json", "phases.png", "memory.png", "metrics.jsonl"):
        assert (out / name).stat().st_size > 0, name
        assert name in r["files"]
    for png in ("phases.png", "memory.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert r["inputs"]["data"].startswith("real") and r["inputs"]["experts"].startswith("real (2")
    assert json.loads((out / "report.json").read_text())["phases_s"] == r["phases_s"]
    assert r["config"]["dtype"] == "float32" and "dtype=float32" in (out / "report.md").read_text()

    # the phase timer and the loop's own step clock are separate readings of one clock: the
    # named phases must hold 99% of a step's tensor ops (measured: 99.4%; the rest are the
    # record_function ops the timer opens at each phase edge), and exclusive booking can
    # never exceed the step
    steps = r["step_s"]["per_step"]
    assert len(steps) == 3 and r["steps"] == {"warmup": 1, "free": 2, "timed": 3, "counted": 1, "flops": 1, "traced": 1}
    # free-running steps run without markers: fewer ops (no record_function at phase
    # edges), and they set the rate the projection uses
    free = r["free_step_s"]
    assert len(free["per_step"]) == 2 and free["max"] < r["step_s"]["min"] and r["marker_overhead"] > 1
    assert r["rate_step_s"] == free["median"] and r["steps_per_s"] == 1 / free["median"]
    assert r["projection"]["device_hours"] == pytest.approx(free["median"] * cfg.distill.steps / 3600)
    named = sum(v for k, v in r["phases_s"].items() if k != "other")
    assert 0.99 * r["step_s"]["mean"] <= named <= r["step_s"]["mean"]
    assert r["phases_s"]["other"] == pytest.approx(r["step_s"]["mean"] - named)
    for p in ("data", "decode", "unroll forward", "unroll backward", "param distance", "mmd", "optimizers", "losses"):
        assert r["phases_s"][p] > 0, p
    assert set(r["phases_s"]) == {*PHASES, "other"}

    trace = json.loads((out / "trace.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert {"unroll forward", "unroll backward", "decode", "mmd", "param distance"} <= names
    assert r["top_kernels"] and all(k["name"] not in PHASES for k in r["top_kernels"])
    fused = {f["op"]: f for f in r["fused_kernels"]}
    assert fused["mmd2"]["calls_per_step"] == 1 and fused["mmd2"]["tflops"] > 0
    assert fused["mmd2"]["peak_fraction"] is None  # no reference peak for a CPU
    md = (out / "report.md").read_text()
    assert "## Time per phase" in md and "unroll backward" in md and "## Fused kernels" in md
    rows = [x for x in ledger.Ledger().records(dataset="digits") if x["phase"] == "profile"]
    assert rows and rows[-1]["status"] == "done" and rows[-1]["steps"] == 9

    # kernels per step: the counted step's kernel-running ops, booked by phase; under the op
    # clock that step lasted as many ticks as it dispatched ops of any kind, views included:
    # the kernel-running ones are most of them
    ops = r["kernels_per_step"]
    assert sum(ops["by_phase"].values()) == ops["total"]
    assert 0.5 * ops["counted_step_s"] <= ops["total"] <= ops["counted_step_s"]
    for p in ("data", "decode", "unroll forward", "unroll backward", "param distance", "mmd", "optimizers"):
        assert ops["by_phase"][p] > 0, p
    assert not ops["compiled"] and r["compile_s_in_timed_steps"] == 0
    assert "## Kernels per step (eager" in md and f"{ops['total']:,} kernels" in md

    # the GPU projection: the counted kernels and the flops step's FLOPs, each GPU's floor the
    # larger of its launch floor (eager, as profiled) and its compute floor
    g = r["gpu_projection"]
    assert g["flops_per_step"] > 0 and g["measured"] is None
    for p in g["per_gpu"]:
        assert p["kernels"] == ops["total"] and p["mode"] == "eager" and p["precision"] == "tf32"
        assert p["floor_ms"] == max(p["launch_floor_ms"]["eager"], p["compute_floor_ms"])
    assert "## GPU projection" in md and "H200 SXM" in md


def test_profile_stand_ins_for_a_dataset_without_files(tmp_path):
    # CIFAR-10 is neither prepared nor has experts here: random inputs of its shapes
    out = tmp_path / "prof"
    _, r = _run(out, "--dataset", "cifar10", "--trace-steps", "0", "--set", "net.depth=3")
    assert r["dataset"] == "cifar10" and r["inputs"]["data"].startswith("stand-in")
    assert r["inputs"]["experts"].startswith("stand-in")
    assert r["shapes"]["classes"] == 10 and r["projection"]["paper_gpu_hours"] == 10.0
    assert not (out / "trace.json").exists() and "trace.json" not in r["files"]
    res = CliRunner().invoke(cli, ["profile", "--dataset", "cifar10", "--stand-in", "never", "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "not prepared" in res.output


def test_the_op_count_is_the_step_s_whatever_follows_it(home, tmp_path):
    """With nothing after it, the counted step would have counted the run's checkpoint (distill
    writes it after the last step, before on_step): a tail step follows it now, and the counts
    equal those of a run with a traced step after the counted one."""
    cfg = cfg_of()
    counts = []
    for trace in (0, 1):
        with OpClock() as clock:
            r = profile(cfg, tmp_path / f"p{trace}", steps=1, trace_steps=trace, warmup=0, progress=False,
                        clock=clock, free_steps=0).report
        counts.append(r["kernels_per_step"]["by_phase"])
        assert len(r["step_s"]["per_step"]) == 1
    assert counts[0] == counts[1]


def test_a_stop_before_the_traced_steps_is_an_interrupt(home, tmp_path, monkeypatch):
    """A Ctrl-C before the traced steps began stopped the profiler it never started: an
    AssertionError from torch.profiler instead of the interrupt (exit 130)."""
    from types import SimpleNamespace

    import d3fast.recipes.profile as recipe

    monkeypatch.setattr(recipe, "distill", lambda *a, **k: SimpleNamespace(interrupted=True))
    with pytest.raises(KeyboardInterrupt):
        profile(cfg_of(), tmp_path / "p", steps=1, trace_steps=2, warmup=0, progress=False)
