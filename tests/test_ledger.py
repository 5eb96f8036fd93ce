"""The device-hours ledger: rows survive killed runs and parallel writers, projections are
right under a fake clock, and `d3fast budget` reports them against the paper."""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from click.testing import CliRunner

from d3fast import ledger
from d3fast.cli import cli
from d3fast.errors import D3FastError
from d3fast.run import Run
from tests._utils import FakeClock, cfg_of

CPU = torch.device("cpu")


def _child(code: str, home) -> subprocess.CompletedProcess:
    env = {**os.environ, "D3FAST_HOME": str(home)}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=120)


def test_killed_run_keeps_its_last_flush(d3fast_home):
    # SIGKILL: no exception handler, no final write; the row holds the last periodic flush
    res = _child("""
        import os, signal, torch
        from d3fast import ledger
        ledger.FLUSH_S = 0.0  # flush at every tick
        with ledger.track("distill", "digits", "digits", torch.device("cpu"), steps_target=10, run="r") as m:
            for _ in range(3):
                m.tick()
            os.kill(os.getpid(), signal.SIGKILL)
    """, d3fast_home)
    assert res.returncode == -signal.SIGKILL, res.stderr
    (row,) = ledger.Ledger().records()
    assert row["status"] == "killed"  # stored as running; its process is gone
    assert row["steps"] == 3 and row["steps_target"] == 10
    assert row["device_kind"] == "cpu" and row["wall_s"] > 0
    assert row["device_hours"] == pytest.approx(row["wall_s"] / 3600)


def test_status_of_interrupted_failed_and_done_phases(d3fast_home):
    clock = FakeClock()
    with pytest.raises(KeyboardInterrupt), ledger.track("experts", "digits", "", CPU, clock=clock) as m:
        clock.t += 7.2
        m.tick(2)
        raise KeyboardInterrupt
    with pytest.raises(ValueError), ledger.track("evaluate", "digits", "", CPU, clock=clock):
        raise ValueError("boom")
    with ledger.track("prepare", "digits", "", CPU, clock=clock) as m:
        clock.t += 3.6
        m.tick(5)
    rows = ledger.Ledger().records()
    assert [(r["phase"], r["status"]) for r in rows] == [
        ("experts", "interrupted"), ("evaluate", "failed"), ("prepare", "done")]
    assert rows[0]["wall_s"] == pytest.approx(7.2) and rows[0]["steps"] == 2
    assert rows[2]["device_hours"] == pytest.approx(0.001) and rows[2]["steps"] == 5


def test_parallel_writers_lose_nothing(d3fast_home):
    code = """
        import sys, torch
        from d3fast import ledger
        ledger.FLUSH_S = 0.0
        w = int(sys.argv[1])
        for i in range(15):
            with ledger.track("distill", f"ds{w}", "", torch.device("cpu"), run=f"{w}-{i}") as m:
                for _ in range(i % 4 + 1):
                    m.tick()
        print("ok")
    """
    env = {**os.environ, "D3FAST_HOME": str(d3fast_home)}
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), str(w)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for w in range(4)]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0 and out.strip() == "ok", err
        assert "not recorded" not in err  # no write gave up on the lock
    rows = ledger.Ledger().records()
    assert len(rows) == 60 and len({r["id"] for r in rows}) == 60
    assert all(r["status"] == "done" for r in rows)
    for w in range(4):
        mine = [r for r in rows if r["dataset"] == f"ds{w}"]
        assert sorted(r["run"] for r in mine) == sorted(f"{w}-{i}" for i in range(15))
        assert sum(r["steps"] for r in mine) == sum(i % 4 + 1 for i in range(15))


def test_projection_with_a_fake_clock(d3fast_home):
    clock = FakeClock()
    with ledger.track("distill", "imagewoof", "imagewoof", CPU, steps_target=3000, clock=clock) as m:
        assert m.projected_hours(3000, 0) is None
        clock.t += 100.0  # first step: warm-up, left out of the rate
        m.tick()
        assert m.projected_hours(3000, 1) == pytest.approx((100 + 2999 * 100) / 3600)
        for _ in range(4):
            clock.t += 36.0
            m.tick()
        spent = 100 + 4 * 36
        assert m.hours == pytest.approx(spent / 3600)
        assert m.projected_hours(3000, 5) == pytest.approx((spent + 2995 * 36) / 3600)
        # CPU time is shown as CPU-h; the paper's budget is GPU-h at its own step count
        assert m.budget_text("imagewoof", 3000, 5) == "0.068 CPU-h, proj 30.0 CPU-h / paper 20 GPU-h"
        assert m.budget_text("digits", 150, 5).endswith("CPU-h")
        assert m.budget_text("cifar10", 500, 5).endswith("/ paper 10 GPU-h@10000")


def test_distill_records_hours_and_projects_with_a_fake_clock(home, tmp_path, monkeypatch):
    distill_mod = importlib.import_module("d3fast.recipes.distill")
    from d3fast import mmd_update

    clock = FakeClock()
    real_terms = mmd_update.mmd_terms
    calls = []

    def timed_terms(*args, **kwargs):
        # each step calls mmd_terms once: 100 s for the first step of a segment, then 36 s
        clock.t += 100.0 if not calls else 36.0
        calls.append(1)
        return real_terms(*args, **kwargs)

    monkeypatch.setattr(mmd_update, "mmd_terms", timed_terms)
    cfg = cfg_of("distill.steps=3")
    run = tmp_path / "run"
    distill_mod.distill(cfg, Run.at(run), progress=False, clock=clock)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    # the metrics round hours to 6 decimals: abs 1e-6 is that rounding, no arithmetic (measured: 0.67 of it at most)
    assert [x["device_hours"] for x in lines] == pytest.approx([100 / 3600, 136 / 3600, 172 / 3600], abs=1e-6)
    assert lines[0]["projected_device_hours"] == pytest.approx(300 / 3600, abs=1e-6)
    assert lines[2]["projected_device_hours"] == pytest.approx(172 / 3600, abs=1e-6)
    assert {x["hours_unit"] for x in lines} == {"CPU-h"}
    (row,) = ledger.Ledger().records(run=str(run.resolve()))
    assert (row["phase"], row["status"], row["steps"], row["steps_target"]) == ("distill", "done", 3, 3)
    assert row["wall_s"] == pytest.approx(172.0)
    # the fixture's prepare and experts booked their CPU time too
    booked = {(r["phase"], r["device_kind"], r["status"]) for r in ledger.Ledger().records(dataset="digits")}
    assert {("prepare", "cpu", "done"), ("experts", "cpu", "done")} <= booked

    # resume to 5 steps: the earlier segment's hours count, the rate is this segment's
    calls.clear()
    cfg2 = Run(run).read_config()
    cfg2.distill.steps = 5
    distill_mod.distill(cfg2, Run.at(run), resume=True, progress=False, clock=clock)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert lines[3]["device_hours"] == pytest.approx((172 + 100) / 3600, abs=1e-6)  # 6-decimal rounding, as above
    assert lines[3]["projected_device_hours"] == pytest.approx((172 + 100 + 100) / 3600, abs=1e-6)
    assert lines[4]["device_hours"] == pytest.approx((172 + 136) / 3600, abs=1e-6)
    rows = ledger.Ledger().records(run=str(run.resolve()))
    assert [r["steps"] for r in rows] == [3, 2]


def _insert(book: ledger.Ledger, **kw) -> None:
    row = {"started": 0.0, "updated": 0.0, "host": "elsewhere", "pid": 1, "phase": "distill", "dataset": "imagewoof",
           "preset": "imagewoof", "run": None, "device_kind": "cuda", "device_name": "NVIDIA H100 80GB HBM3",
           "device_count": 1, "wall_s": 0.0, "device_hours": 0.0, "steps": 0, "steps_target": None,
           "energy_j": None, "status": "done"}
    row.update(kw)
    book.insert(**row)


def test_budget_against_the_paper(d3fast_home):
    book = ledger.Ledger()
    _insert(book, steps=1000, wall_s=18000.0, device_hours=5.0, energy_j=3.6e6 * 2)
    _insert(book, steps=500, wall_s=9000.0, device_hours=2.5, status="interrupted")
    _insert(book, device_kind="cpu", device_name="AMD EPYC x2 cores (CPU)", steps=10, wall_s=3600.0, device_hours=1.0)
    _insert(book, phase="experts", steps=50, wall_s=7200.0, device_hours=2.0)
    _insert(book, dataset="digits", preset="digits", device_kind="cpu", steps=150, wall_s=360.0, device_hours=0.1)

    res = CliRunner().invoke(cli, ["budget", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["records"] == 5
    gpu = next(t for t in out["totals"] if t["dataset"] == "imagewoof" and t["phase"] == "distill" and t["device_kind"] == "cuda")
    assert gpu["steps"] == 1500 and gpu["device_hours"] == pytest.approx(7.5) and gpu["energy_kwh"] == pytest.approx(2.0)
    assert gpu["status"] == {"done": 1, "interrupted": 1} and gpu["unit"] == "GPU-h"
    paper = {(p["dataset"], p["device_kind"]): p for p in out["paper"]}
    # 7.5 GPU-h / 1500 steps -> 15 GPU-h at the paper's 3000 steps: 0.75x its 20 GPU-h
    assert paper[("imagewoof", "cuda")]["projected_paper_steps"] == pytest.approx(15.0)
    assert paper[("imagewoof", "cuda")]["ratio_to_paper"] == pytest.approx(0.75)
    assert paper[("imagewoof", "cpu")]["ratio_to_paper"] is None  # CPU hours are not GPU hours
    assert ("digits", "cpu") not in paper  # no paper budget for digits

    res = CliRunner().invoke(cli, ["budget", "--dataset", "imagewoof"])
    assert res.exit_code == 0, res.output
    assert "15.00 GPU-h for 3000 steps; paper 20 GPU-h (0.75x the paper)" in res.output
    assert "CPU time: not comparable" in res.output and "digits" not in res.output


def test_corrupt_ledger_is_reported_and_never_stops_a_run(d3fast_home, capsys):
    path = ledger.ledger_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"this is not a database" * 100)
    res = CliRunner().invoke(cli, ["budget"])
    assert res.exit_code == 2 and "corrupt" in res.output and "move it aside" in res.output
    with ledger.track("distill", "digits", "", CPU) as m:
        m.tick()
        m.flush()
    assert m.steps == 1
    # one plain line, once, however many writes fail
    warned = [ln for ln in capsys.readouterr().err.splitlines() if "not recorded" in ln]
    assert len(warned) == 1 and warned[0].startswith("warning: d3fast ledger: not recorded")
    with pytest.raises(D3FastError, match="corrupt"):
        ledger.Ledger().records()


def test_a_damaged_page_past_the_header_is_the_same_one_line_error(d3fast_home):
    # issue 32: the header read fine, the query hit the damaged page, and `budget` printed
    # "unexpected DatabaseError"
    import sqlite3

    lg = ledger.Ledger()
    for i in range(400):  # rows over several pages
        lg.insert(started=float(i), updated=float(i), host="h", pid=1, phase="distill", dataset="digits", preset="",
                  run="r" * 40, device_kind="cpu", device_name="cpu", device_count=1, steps=i, status="done")
    with sqlite3.connect(lg.path) as con:  # the rows into the main file, out of the WAL
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    page, size = 4096, lg.path.stat().st_size
    assert size >= 6 * page
    with open(lg.path, "r+b") as f:  # one page of rows: the header and schema intact
        f.seek(4 * page)
        f.write(b"\xde\xad" * (page // 2))
    res = CliRunner().invoke(cli, ["budget"])
    assert res.exit_code == 2 and "corrupt" in res.output and "move it aside" in res.output, res.output
    with pytest.raises(D3FastError, match="is corrupt"):
        ledger.Ledger().records()


def test_ledger_off_switch(d3fast_home, monkeypatch):
    monkeypatch.setenv("D3FAST_LEDGER", "0")
    with ledger.track("distill", "digits", "", CPU) as m:
        m.tick()
    assert not ledger.ledger_path().exists()


def test_a_new_run_states_its_plan_with_the_rates_measured_here(d3fast_home):
    # issue 32: a partial config once started 100 experts x 50 epochs (~14 h) with no word;
    # a new run now says what it will do and, where earlier work measured a rate, how long
    from d3fast.config import resolve_config
    from d3fast.preflight import plan

    cfg = resolve_config("digits")  # 4 experts x 10 epochs, 150 steps; none trained in this home
    assert plan(cfg, "cpu") == ("plan: train 4 of 4 experts x 10 epochs; distill 150 steps; no rate measured here yet "
                                "for expert training and distillation (`d3fast profile` measures a step)")
    lg = ledger.Ledger()
    for phase, wall, steps in (("experts", 100.0, 10), ("experts", 140.0, 10), ("experts", 80.0, 10),
                               ("distill", 30.0, 10), ("distill", 1.0, 0)):  # a record of no steps: no rate
        lg.insert(started=0.0, updated=0.0, host="h", pid=1, phase=phase, dataset="digits", preset="", run="r",
                  device_kind="cpu", device_name="cpu", device_count=1, wall_s=wall, steps=steps, status="done")
    # medians: 10 s an epoch (of 8, 10, 14), 3 s a step: 40 x 10 = 400 s, 150 x 3 = 450 s
    assert plan(cfg, "cpu") == ("plan: train 4 of 4 experts x 10 epochs (~7 min at the 10 s/epoch measured here); "
                                "distill 150 steps (~8 min at the 3 s/step measured here); about 14 min in all")
    assert plan(cfg, "cuda").endswith("no rate measured here yet for expert training and distillation "
                                      "(`d3fast profile` measures a step)")


@pytest.mark.parametrize("column, value", [("wall_s", "soon"), ("dataset", b"\x00\x01"), ("pid", 99999999999999),
                                           ("steps", 2**70), ("device_hours", float("inf"))])
def test_a_row_with_values_of_the_wrong_kind_is_the_same_one_line_error(d3fast_home, column, value):
    # issue 32's second round: hostile values in one row (text in wall_s, a blob dataset, a
    # pid past what os.kill takes) crashed `budget` with OverflowError / TypeError
    import sqlite3

    lg = ledger.Ledger()
    row = lg.insert(started=0.0, updated=0.0, host=__import__("socket").gethostname(), pid=1, phase="distill",
                    dataset="digits", preset="", run="r", device_kind="cpu", device_name="cpu", device_count=1,
                    steps=1, status="running")
    with sqlite3.connect(lg.path) as con:
        con.execute(f"UPDATE records SET {column} = ? WHERE id = ?", (str(value) if column == "steps" else value, row))
    res = CliRunner().invoke(cli, ["budget"])
    if column == "pid":  # a pid no process can have: the row's process is gone, not a crash
        assert res.exit_code == 0 and "killed" in res.output, res.output
    else:
        assert res.exit_code == 2 and f"is corrupt (record {row}: {column} = " in res.output, res.output
