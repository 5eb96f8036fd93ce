"""The Triton kernels compiled ahead of time for the GPUs d3fast targets, on this CPU-only
machine, through the compile audit (benchmarks/kernel_audit.py): every configuration the
dispatch picks at D3's shapes (captured by calling the public ops on fake CUDA tensors),
compiled for sm_90 (H100; all of them) and sm_80 (A100; ImageWoof's and the real P's), read
back from the cubin. Held to issue 30's targets: no spills, shared memory within the SM, the
fp32 MMD's products on tensor cores inside its loops, 128-bit loads in the parameter distance
at an unaligned P, at most 2 launches per call (forward and backward), and a static bound of
<= 10 us for the MMD's forward and gradient at ImageWoof's shape on an H100.

The audit runs in child processes without TRITON_INTERPRET (tests/conftest.py sets it on a
CPU, and the interpreter patches triton.language while it is set), under Triton 3.10's
default of no FP fusion: only the launchers' options (TRITON_OPTIONS) can turn it on."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed"),
              pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from benchmarks.kernel_audit import ARCH, IMAGEWOOF_BOUND_US, MAX_LAUNCHES, cases  # noqa: E402

SM80_CASES = ["imagewoof", "615,690"]


def audit(tmp_path_factory, *args: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "0"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    out = tmp_path_factory.mktemp("audit") / "audit.json"
    res = subprocess.run([sys.executable, "-m", "benchmarks.kernel_audit", "--json", str(out), *args],
                         capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(out.read_text())["rows"]


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> dict[int, list[dict]]:
    sm80 = [a for c in SM80_CASES for a in ("--only", c)]
    return {90: audit(tmp_path_factory, "--arch", "90"), 80: audit(tmp_path_factory, "--arch", "80", *sm80)}


def kernels_of(rows: list[dict]) -> list[tuple[dict, dict]]:
    return [(r, k) for r in rows for k in r["kernels"] if "regs" in k]


@pytest.mark.parametrize("arch", [90, 80])
def test_every_configuration_compiles_without_spills_within_shared_memory(rows, arch):
    got = kernels_of(rows[arch])
    want = [f"{op} {name}" for op, name, _ in cases() if arch == 90 or any(c in name for c in SM80_CASES)]
    assert [f"{r['op']} {r['case']}" for r in rows[arch]] == want and got
    for r, k in got:
        assert k["spills"] == 0, (arch, r["case"], k["kernel"], k["spills"])
        assert k["ctas_per_sm"] >= 1 and k["smem"] + 1024 <= ARCH[arch]["smem_kib"] * 1024, (arch, r["case"], k)


@pytest.mark.parametrize("arch", [90, 80])
def test_launches_per_call_and_tensor_cores(rows, arch):
    for r in rows[arch]:
        assert r["launches"] <= MAX_LAUNCHES[r["op"]], (r["case"], [k["kernel"] for k in r["kernels"]])
        for k in r["kernels"]:
            if r["op"] == "mmd2" and "regs" in k:
                # both MMD kernels' products sit on tensor cores, inside their loops, for every dtype
                assert k["tc_in_loops"] > 0, (arch, r["case"], k["kernel"])
            if r["op"] == "param_dist" and "regs" in k:
                # P = 615,690 is no multiple of 16: the blocks still load 64/128 bits at a time
                assert k["wide_loads"] > 0, (arch, r["case"], k["kernel"])


def test_the_imagewoof_mmd_is_bound_under_10_us_on_an_h100(rows):
    (r,) = [r for r in rows[90] if r["op"] == "mmd2" and r["case"] == "imagewoof fp32 fwd+bwd"]
    assert r["launches"] == 2 and 0 < r["bound_us"] <= IMAGEWOOF_BOUND_US, r
    # every SM busy once: 130 of the H100's 132 in the forward, at least one program per SM backward
    fwd, bwd = (k for k in r["kernels"] if "regs" in k)
    assert ARCH[90]["sms"] * 0.9 <= fwd["ctas"] <= ARCH[90]["sms"] <= bwd["ctas"], (fwd["grid"], bwd["grid"])


def test_the_launch_options_keep_fp_fusion_on(rows, tmp_path_factory):
    """Under a default of no fusion (Triton 3.10's, set in the child), the launchers' options
    still give more fused multiply-adds than fusion off: the kernels compile as tested
    whichever default the installed Triton has."""
    only = ["--only", "imagewoof fp32 fwd+bwd", "--only", "615,690 (ConvNet-5 @128) fp32 fwd+bwd"]
    unfused = kernels_of(audit(tmp_path_factory, "--no-fp-fusion", *only))
    fused = {(r["case"], k["kernel"]): k["ffma"] for r, k in kernels_of(rows[90])}
    assert unfused
    for r, k in unfused:
        assert fused[(r["case"], k["kernel"])] >= k["ffma"], (r["case"], k["kernel"])
    assert sum(fused[(r["case"], k["kernel"])] for r, k in unfused) > sum(k["ffma"] for _, k in unfused)
