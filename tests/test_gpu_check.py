"""scripts/gpu_check.sh --cpu: the GPU check's driver, run here on the CPU at tiny sizes, so
that the one command a GPU session gets is known to work before a GPU is at hand."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_check_runs_every_section_on_the_cpu(tmp_path):
    out = tmp_path / "check"
    res = subprocess.run(["bash", "scripts/gpu_check.sh", "--cpu", "--out", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    doc = json.loads((out / "gpu_check.json").read_text())
    sections = doc["sections"]
    assert {k: v["status"] for k, v in sections.items()} == {k: "ok" for k in ("setup", "tests", "kernels", "memory", "profile")}
    # the CUDA tests were selected: the Triton kernel tests ran (interpreter), the CUDA-only ones skipped
    counts = sections["tests"]["counts"]
    assert counts["passed"] > 0 and counts["skipped"] > 0 and "failed" not in counts
    assert sections["kernels"]["fused"] == "cpp" and sections["kernels"]["mmd"] and sections["kernels"]["param_dist"]
    assert all(p.get("peak_mib") is not None for p in sections["memory"]["unroll"]["points"])
    assert sections["profile"]["digits"]["step_ms"] > 0 and "skipped" in sections["profile"]["digits-amp"]
    eager = sections["profile"]["digits-eager"]
    assert eager["step_ms"] > 0 and eager["kernels_per_step"]["total"] > 0 and not eager["kernels_per_step"]["compiled"]
    summary = (out / "summary.md").read_text()
    assert "| target | measured | goal | verdict |" in summary and "n/a on the CPU" in summary
    assert summary.strip() in res.stdout  # printed last
    assert {p.name for p in out.iterdir()} == {"gpu_check.json", "summary.md", "tests.log", "profile-digits.md",
                                            "profile-digits-eager.md"}
    assert all(p.stat().st_size < 4 << 20 for p in out.iterdir())
