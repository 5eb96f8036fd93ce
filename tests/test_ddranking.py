"""DD-Ranking as an external evaluator of a d3fast `pt` export (scripts/ddranking_score.py).

DD-Ranking 0.2.0 needs numpy < 2 and torchvision, so it lives in a venv of its own: the test
runs the recipe with $D3FAST_DDRANKING_PYTHON (that venv's python), or with this python when
ddranking imports here; it is skipped otherwise (CI)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from d3fast.cli import cli
from tests._utils import write_jpeg

ROOT = Path(__file__).resolve().parent.parent
PYTHON = os.environ.get("D3FAST_DDRANKING_PYTHON") or (sys.executable if importlib.util.find_spec("ddranking") else None)

pytestmark = [pytest.mark.slow, pytest.mark.skipif(PYTHON is None, reason="ddranking is not installed "
                                                   "(set D3FAST_DDRANKING_PYTHON to a venv that has it)")]


def test_a_pt_export_gets_a_ddranking_score(tmp_path, d3fast_home):
    # DD-Ranking's TinyImageNet is a torchvision ImageFolder of exactly 200 classes: the same tree
    # is d3fast's imagefolder dataset, so both read one class order (sorted folder names). At
    # 32 px (DD-Ranking reads any im_size as is) a ConvNet-3 epoch costs ~2 s on 2 cores, not ~9 s
    # for ConvNet-4 at 64 px
    tree = tmp_path / "tiny"
    for split, n in (("train", 2), ("val", 1)):
        for c in range(200):
            for i in range(n):
                write_jpeg(tree / split / f"n{c:08d}" / f"{i}.JPEG", 32, 32, seed=1000 * c + 7 * i + (split == "val"))
    sets = ["experts.num_experts=1", "experts.epochs=2", "distill.expert_epochs=1", "distill.max_start_epoch=1",
            "distill.syn_steps=2", "net.width=8", "distill.decoder_width=16", "distill.mmd_samples=200",
            "distill.batch_syn=200"]
    r = CliRunner().invoke(cli, ["distill", "--dataset", "imagefolder-tiny", "--data-path", str(tree), "--resolution",
                                 "32", "--steps", "1", "--device", "cpu", "-q", "--runs-dir", str(tmp_path / "runs"),
                                 "--name", "t", *sum((["--set", s] for s in sets), [])])
    assert r.exit_code == 0, r.output
    run = next((tmp_path / "runs" / "imagefolder-tiny").iterdir())
    r = CliRunner().invoke(cli, ["export", str(run), "--format", "pt", "--pixels", "--per-class", "1",
                                 "--out", str(tmp_path / "export")])
    assert r.exit_code == 0, r.output
    out = tmp_path / "score.json"
    res = subprocess.run([PYTHON, str(ROOT / "scripts" / "ddranking_score.py"), str(tmp_path / "export"),
                          "--data-path", str(tree), "--dataset", "TinyImageNet", "--epochs", "10", "--num-eval", "1",
                          "--full-data-acc", "40", "--device", "cpu", "--out", str(out)],
                         capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(out.read_text())
    s = report["ddranking"]
    assert report["ipc"] == 1 and report["model"] == "ConvNet-3" and report["dataset"] == "TinyImageNet"
    # DD-Ranking's own definitions: HLR = full - distilled, IOR = distilled - random (percent), and
    # LRS = (e^a - e^-1) / (e - e^-1), a = 0.5 IOR - 0.5 HLR
    distilled = 40 - s["hard_label_recovery_mean"]
    assert 0 <= distilled <= 100 and 0 <= distilled - s["improvement_over_random_mean"] <= 100
    a = 0.5 * s["improvement_over_random_mean"] - 0.5 * s["hard_label_recovery_mean"]
    assert s["label_robust_score_mean"] == pytest.approx((math.exp(a) - math.exp(-1)) / (math.exp(1) - math.exp(-1)))
    # bad input: a greyscale export and an export in normalised values are refused with a reason
    r = subprocess.run([PYTHON, str(ROOT / "scripts" / "ddranking_score.py"), str(tmp_path),
                        "--data-path", str(tree)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "not a d3fast pt export" in r.stderr
