"""`pytest benchmarks/ --benchmark` as users run it: the flag exists, results land as JSON with
provenance, and the summary table shows each benchmark's ratios."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def _pytest(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def test_without_the_flag_everything_is_skipped():
    res = _pytest("benchmarks/bench_param_dist.py", "-q")
    assert res.returncode == 0, res.stdout + res.stderr
    assert " passed" not in res.stdout and "skipped" in res.stdout


def test_benchmark_flag_writes_results_and_a_summary(tmp_path):
    res = _pytest("benchmarks/bench_param_dist.py", "--benchmark", "-k", "cpp-1M-fwd and not bwd",
                  "--results-dir", str(tmp_path))
    assert res.returncode == 0, res.stdout + res.stderr
    (folder,) = tmp_path.iterdir()
    assert folder.name.startswith("cpu-")
    latest = json.loads((folder / "latest.json").read_text())
    stamped = [p for p in folder.iterdir() if p.name != "latest.json"]
    assert len(stamped) == 1 and json.loads(stamped[0].read_text()) == latest
    assert latest["command"].startswith("pytest ") and "benchmarks/bench_param_dist.py --benchmark" in latest["command"]
    assert latest["versions"]["torch"] and latest["machine"]["cores"] >= 1 and "git_commit" in latest["versions"]
    (rec,) = latest["results"]
    assert rec["id"] == "cpp-1M-fwd" and rec["params"]["impl"] == "cpp"
    assert rec["seconds"]["rounds"] == 7 and 0 < rec["seconds"]["min"] <= rec["seconds"]["median"]
    speedup = rec["extra_info"]["ratios"]["speedup vs reference"]
    # the stored ratio (from the unrounded medians) is rounded to 2 decimals, and the medians to
    # 1e-6 s: at most 0.005 off plus the medians' rounding, whatever the ratio (a relative bound
    # failed on a loaded machine at 0.073 stored as 0.07; at 266.2 from medians of ~4e-5 s the
    # medians' rounding is worth 0.05)
    ref_s, own_s = rec["extra_info"]["reference_median_s"], rec["extra_info"]["median_s"]
    allowed = 0.005 + (ref_s / own_s) * (0.5e-6 / own_s + 0.5e-6 / ref_s) * 1.01
    assert speedup == pytest.approx(ref_s / own_s, rel=0, abs=allowed)
    assert "d3fast benchmark summary" in res.stdout
    assert "param_dist[cpp-1M-fwd]" in res.stdout and "speedup vs reference" in res.stdout
    assert str(stamped[0]) in res.stdout
