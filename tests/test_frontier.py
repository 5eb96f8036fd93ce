"""`d3fast frontier`: a run per (storage, budget), evaluated beside equal-storage baselines,
the table, verdicts and plot written, and a second invocation that reuses everything."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from d3fast.cli import cli
from d3fast.recipes.frontier import parse_budgets, parse_storages, verdict
from tests._utils import OVERRIDES

# the tiny digits settings, less the decoder width the budget chooses
TINY = [o for o in OVERRIDES if not o.startswith("distill.decoder_width")] + ["distill.steps=2"]


def _frontier(tmp_path, *args):
    sets = [x for o in TINY for x in ("--set", o)]
    return CliRunner().invoke(cli, ["frontier", "--dataset", "digits", "--runs-dir", str(tmp_path / "runs"), "-q",
                                    "--students", "1", "--epochs", "1", *sets, *args])


@pytest.mark.slow  # whole tiny runs: pass 1 only (scripts/test.sh)
def test_a_tiny_frontier_writes_its_table_and_plot_and_reuses_its_runs(home, tmp_path):
    res = _frontier(tmp_path, "--budgets", "3,12", "--storage", "int8")
    assert res.exit_code == 0, res.output
    out = tmp_path / "runs" / "digits" / "frontier"
    table = json.loads((out / "frontier.json").read_text())
    small, point = table["points"]
    assert not small["fits"] and "needs at least" in small["why"]  # 3 uint8 images hold no int8 object at 32 px
    assert point["fits"] and point["storage"] == "int8" and point["step"] == 2
    assert set(point["rows"]) == {"d3", "random_same_storage", "herding_same_storage", "kcenter_same_storage"}
    # the baselines hold the object's bytes in whole uint8 images, never more
    k = point["rows"]["random_same_storage"]["images_per_class"]
    assert k == int(point["object_images_per_class"]) and k <= 12
    assert point["storage_bytes"] <= 12 * 10 * 32 * 32 * 1.01
    best = max(("random_same_storage", "herding_same_storage", "kcenter_same_storage"),
               key=lambda r: point["rows"][r]["mean"])
    assert point["best_baseline"] == best
    assert point["margin"] == pytest.approx(point["rows"]["d3"]["mean"] - point["rows"][best]["mean"])
    md = (out / "frontier.md").read_text()
    assert "| int8 | 12 |" in md and verdict(point) in md and "no D3 object fits" in md
    assert (out / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    run = tmp_path / "runs" / "digits" / next(p.name for p in (tmp_path / "runs" / "digits").iterdir()
                                              if p.name.endswith("frontier-12ipc-int8"))
    evals = json.loads((run / "evals" / "index.json").read_text())
    # again: the run is finished and its evaluation is of the same step and protocol
    res = _frontier(tmp_path, "--budgets", "12", "--storage", "int8")
    assert res.exit_code == 0, res.output
    assert "reusing the evaluation" in res.output
    assert json.loads((run / "evals" / "index.json").read_text()) == evals
    # another protocol evaluates again
    res = _frontier(tmp_path, "--budgets", "12", "--storage", "int8", "--epochs", "2")
    assert res.exit_code == 0 and "reusing" not in res.output, res.output
    assert len(json.loads((run / "evals" / "index.json").read_text())) == len(evals) + 1


@pytest.mark.parametrize(("args", "says"), [
    (["--budgets", "8,x"], "comma-separated numbers"),
    (["--budgets", "0"], "in (0, 1e6]"),
    (["--budgets", "nan"], "in (0, 1e6]"),
    (["--budgets", ""], "in (0, 1e6]"),
    (["--budgets", "8", "--storage", "int2"], "--storage takes formats"),
    (["--budgets", "8", "--set", "distill.ppc=3"], "the frontier chooses distill.ppc"),
    (["--budgets", "8", "--set", "distill.storage=int4"], "the frontier chooses distill.storage"),
    (["--budgets", "8", "--students", "0"], "--students must be at least 1"),
])
def test_bad_frontier_input_is_one_line(home, tmp_path, args, says):
    res = CliRunner().invoke(cli, ["frontier", "--dataset", "digits", "--runs-dir", str(tmp_path), *args])
    assert res.exit_code == 2 and says in res.output and "Traceback" not in res.output, res.output
    assert not (tmp_path / "digits").exists()  # nothing started


def test_budget_and_storage_lists_parse():
    assert parse_budgets(" 16, 8,8,32.5") == [8.0, 16.0, 32.5]
    assert parse_storages("int8, float32,int8") == ["int8", "float32"]


def test_budgets_that_name_one_run_or_buy_too_many_priors_are_refused_before_any_work(home, tmp_path):
    # breaker, issue 33: 3.9999999 and 4 both made frontier-4ipc-int4 and failed at the second
    res = CliRunner().invoke(cli, ["frontier", "--dataset", "digits", "--runs-dir", str(tmp_path),
                                   "--budgets", "3.9999999,4", "--storage", "int4"])
    assert res.exit_code == 2 and "name the same run (frontier-4ipc-int4)" in res.output, res.output
    res = CliRunner().invoke(cli, ["frontier", "--dataset", "digits", "--runs-dir", str(tmp_path),
                                   "--budgets", "8,20000", "--storage", "int8"])
    assert res.exit_code == 2 and "more than distill.ppc's limit" in res.output, res.output
    (tmp_path / "digits").mkdir(exist_ok=True)
    (tmp_path / "digits" / "frontier").write_text("in the way")
    res = CliRunner().invoke(cli, ["frontier", "--dataset", "digits", "--runs-dir", str(tmp_path), "--budgets", "8"])
    assert res.exit_code == 2 and "frontier is a file" in res.output, res.output
    assert sorted(p.name for p in (tmp_path / "digits").iterdir()) == ["frontier"]  # no run was started


@pytest.mark.slow  # whole tiny runs: pass 1 only (scripts/test.sh)
def test_an_evaluation_without_coreset_rows_is_reused_while_no_expert_can_make_them(home, tmp_path):
    # breaker, issue 33: with no whole-dataset expert at distill.soft_label_epoch there are no
    # coreset rows, and the frontier evaluated again on every call
    args = ("--budgets", "12", "--storage", "int8", "--set", "distill.soft_label_epoch=9")
    assert _frontier(tmp_path, *args).exit_code == 0
    res = _frontier(tmp_path, *args)
    assert res.exit_code == 0 and "reusing the evaluation" in res.output, res.output
    point = json.loads((tmp_path / "runs" / "digits" / "frontier" / "frontier.json").read_text())["points"][0]
    assert set(point["rows"]) == {"d3", "random_same_storage"}
