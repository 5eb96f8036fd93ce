"""Subtask decomposition (docs/algorithm.md section 9): class blocks, subtask views and
experts, merging the subtask runs into one object, and evaluating, sampling and exporting it."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from d3fast.cli import cli
from d3fast.config import resolve_config
from d3fast.data.datasets import class_blocks
from d3fast.data.loader import load_dataset, load_view
from d3fast.distilled import Merged, Sampler
from d3fast.errors import D3FastError
from d3fast.exports import load
from d3fast.io import locked
from d3fast.recipes.distill import distill
from d3fast.recipes.evaluate import distilled_batches
from d3fast.recipes.experts import run_experts
from d3fast.recipes.subtasks import merge_runs
from d3fast.run import Run
from d3fast.state import load_checkpoint
from d3fast.trajectories import experts_dir
from tests._utils import cfg_of, evaluate_run


def test_class_blocks_are_the_reference_split_and_cover_every_class_once():
    assert class_blocks(1000, 5) == [(0, 200), (200, 400), (400, 600), (600, 800), (800, 1000)]
    assert class_blocks(1000, 2) == [(0, 500), (500, 1000)]
    uneven = class_blocks(10, 3)  # 10 = 4 + 3 + 3: the first C mod S blocks hold one more
    assert uneven == [(0, 4), (4, 7), (7, 10)]
    assert class_blocks(7, 1) == [(0, 7)]
    with pytest.raises(D3FastError, match="cannot split 10 classes"):
        class_blocks(10, 11)
    # issue 32: every subtask holds >= 2 classes (one class: the experts' cross-entropy is 0,
    # they never move, and the MTT loss is 0 / 0 at step 1); 3 classes in 2 blocks leaves one
    assert class_blocks(10, 5) == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10)]
    for classes, subtasks in ((10, 10), (10, 6), (3, 2), (1000, 501)):
        with pytest.raises(D3FastError, match="each subtask needs at least 2 classes"):
            class_blocks(classes, subtasks)


def test_config_refuses_a_subtask_out_of_range():
    with pytest.raises(D3FastError, match="data.subtask: 2 is out of range"):
        resolve_config("digits", overrides=["data.subtasks=2", "data.subtask=2"])
    for s in (11, 10, 6):
        with pytest.raises(D3FastError, match=f"{s} subtasks cannot split 10 classes: each subtask needs at least 2"):
            resolve_config("digits", overrides=[f"data.subtasks={s}"])


def test_a_subtask_view_holds_its_block_relabelled(home):
    full = load_dataset("digits", "train")
    cfg = cfg_of("data.subtasks=3", "data.subtask=1")  # classes 4, 5, 6
    view = load_view(cfg, "train")
    assert view.classes == full.classes[4:7]
    assert sorted(set(view.labels.tolist())) == [0, 1, 2]
    keep = (full.labels >= 4) & (full.labels < 7)
    assert torch.equal(view.images, full.images[keep])  # the same images, in the cache's order
    assert torch.equal(view.labels, full.labels[keep] - 4)
    assert torch.equal(view.mean, full.mean)  # normalised as the whole dataset


def test_each_subtask_has_its_own_experts(home):
    a, b = cfg_of("data.subtasks=2", "data.subtask=0"), cfg_of("data.subtasks=2", "data.subtask=1")
    assert experts_dir(a) != experts_dir(b) != experts_dir(cfg_of())
    assert experts_dir(a).name.endswith("-sub0of2")
    with pytest.raises(D3FastError, match="experts are trained per subtask"):
        experts_dir(cfg_of("data.subtasks=2"))
    with pytest.raises(D3FastError, match="a run distills one subtask"):
        distill(cfg_of("data.subtasks=2"), Run.at(home / "r"), progress=False)


@pytest.fixture(scope="module")
def parts(shared_home, tmp_path_factory):
    """digits in 2 subtasks: each with 2 tiny experts and a 3-step run (PPC 2)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("D3FAST_HOME", str(shared_home))
    root = tmp_path_factory.mktemp("subtask-runs")
    runs = []
    for i in range(2):
        cfg = cfg_of("data.subtasks=2", f"data.subtask={i}", "distill.ppc=2")
        run_experts(cfg, progress=False)
        run = Run.at(root / f"sub{i}")
        distill(cfg, run, progress=False)
        runs.append(run.path)
    mp.undo()
    return runs


def test_merge_holds_every_class_through_its_subtasks_decoder(home, parts, tmp_path):
    merged, out = merge_runs(parts, tmp_path / "merged")
    assert merged.num_classes == 10 and merged.ppc == 2 and merged.num_priors == 20
    assert merged.classes == load_dataset("digits", "train").classes
    one = [Run(p).load_distilled()[0] for p in parts]
    assert merged.storage_bytes() == sum(d.storage_bytes() for d in one)
    # prior 12 (class 6, subtask 1's class 1) decodes through subtask 1's decoder
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    x = Sampler(merged)(torch.tensor([12, 13]), g1)
    ref = Sampler(one[1])(torch.tensor([2, 3]), g2)
    assert torch.equal(x, ref)
    # a batch mixing both subtasks: each row as its own part decodes it alone
    mixed = Sampler(merged, "running")(torch.tensor([0, 19, 5]), torch.Generator().manual_seed(0))
    assert mixed.shape == (3, 1, 32, 32) and torch.isfinite(mixed).all()
    d, step = Run(out).load_distilled()
    assert isinstance(d, Merged) and step == 3
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["subtask"] for s in manifest["sources"]] == [0, 1]


def test_merged_export_round_trips(home, parts, tmp_path):
    merged, out = merge_runs(parts, tmp_path / "m")
    result = CliRunner().invoke(cli, ["export", str(out), "--out", str(tmp_path / "m.safetensors")])
    assert result.exit_code == 0, result.output
    back = load(tmp_path / "m.safetensors")
    assert isinstance(back, Merged) and back.classes == merged.classes
    assert back.storage_bytes() == merged.storage_bytes()
    for a, b in zip(back.parts, merged.parts, strict=True):
        assert torch.equal(a.latents, b.latents) and a.student_lr == b.student_lr
        for (ka, va), (kb, vb) in zip(a.decoder.state_dict().items(), b.decoder.state_dict().items(), strict=True):
            assert ka == kb and torch.equal(va, vb)
    idx = torch.arange(20)
    same = Sampler(back)(idx, torch.Generator().manual_seed(1))
    assert torch.equal(same, Sampler(merged)(idx, torch.Generator().manual_seed(1)))


def test_merge_refuses_what_is_not_one_object(home, parts, tmp_path):
    with pytest.raises(D3FastError, match="subtask\\(s\\) 1 of 2 are missing"):
        merge_runs(parts[:1], tmp_path / "a")
    with pytest.raises(D3FastError, match="given twice"):
        merge_runs([parts[0], parts[0], parts[1]], tmp_path / "a")
    with locked(parts[1] / ".lock"):  # a run still distilling holds its lock
        with pytest.raises(D3FastError, match="is still distilling"):
            merge_runs(parts, tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x").write_text("keep me")
    with pytest.raises(D3FastError, match="exists and holds other files"):
        merge_runs(parts, tmp_path / "b")
    assert (tmp_path / "b" / "x").read_text() == "keep me"
    assert not (tmp_path / "a").exists()  # nothing half-written


def test_merge_refuses_other_settings_and_unfinished_runs(home, parts, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    for f in ("config.json", "checkpoint.pt", "manifest.json", "history.jsonl"):
        (other / f).write_bytes((parts[1] / f).read_bytes())
    cfg = json.loads((other / "config.json").read_text())
    cfg["distill"]["decoder_width"] = 16
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(D3FastError, match=r"not parts of one distillation \(distill.decoder_width: 32 vs 16"):
        merge_runs([parts[0], other], tmp_path / "a")
    cfg["distill"]["decoder_width"] = 32
    cfg["distill"]["dtype"] = "float64"  # a float64 part beside a float32 one
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(D3FastError, match=r"distill.dtype: 'float32' vs 'float64'"):
        merge_runs([parts[0], other], tmp_path / "a")
    cfg["distill"]["dtype"] = "float32"
    cfg["distill"]["steps"] = 10  # the run stopped at step 3 of 10
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(D3FastError, match="stopped at step 3 of 10.*--partial"):
        merge_runs([parts[0], other], tmp_path / "a")
    merged, _ = merge_runs([parts[0], other], tmp_path / "a", partial=True)
    assert merged.num_classes == 10
    cfg["data"]["dataset"] = "fashion-mnist"
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(D3FastError, match="data.dataset: 'digits' vs 'fashion-mnist'"):
        merge_runs([parts[0], other], tmp_path / "c")


def test_merge_refuses_a_part_holding_nan(home, parts, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in ("config.json", "manifest.json", "history.jsonl"):
        (bad / f).write_bytes((parts[1] / f).read_bytes())
    state = load_checkpoint(parts[1] / "checkpoint.pt")
    state["latents"].view(-1)[0] = float("nan")  # as an older d3fast could leave behind (no digest)
    state.pop("sha256", None)
    state["format"] = 1  # the format of an older d3fast, which may lack the digest
    torch.save(state, bad / "checkpoint.pt")
    with pytest.raises(D3FastError, match="cannot be used"):
        merge_runs([parts[0], bad], tmp_path / "a")


def test_merged_object_evaluates_on_every_class(home, parts, tmp_path):
    _, out = merge_runs(parts, tmp_path / "m")
    r = evaluate_run(Run(out), {"eval": {"students": 1, "epochs": 1, "samples_per_class": 2}}, progress=False,
                     device="cpu")
    assert r["subtasks"] == 2 and set(r["results"]["convnet"]) == {"d3", "random_same_count", "random_same_storage", "herding_same_storage", "kcenter_same_storage"}
    md = (out / "eval.md").read_text()
    assert "merged from 2 subtasks" in md
    # every class is drawn, each with its global label
    merged, _ = Run(out).load_distilled()
    labels = torch.cat([y for _, y in distilled_batches(merged, 3, 7, "batch")(torch.Generator().manual_seed(0))])
    assert np.bincount(labels.numpy(), minlength=10).tolist() == [3] * 10


def test_the_cli_distills_every_subtask_then_merges(home, tmp_path):
    args = ["distill", "--dataset", "digits", "--subtasks", "2", "--runs-dir", str(tmp_path / "runs"),
            "--set", "distill.ppc=1", *[x for o in _tiny() for x in ("--set", o)]]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "merged 2 subtasks" in result.output
    merged_dir = tmp_path / "runs" / "digits" / "digits-merged"
    d, _ = Run(merged_dir).load_distilled()
    assert isinstance(d, Merged) and d.num_classes == 10
    first = sorted((tmp_path / "runs" / "digits").glob("*-digits-sub0of2"))
    (merged_dir / "eval.md").write_text("an evaluation of this object")
    # the same command again reuses the finished subtask runs and the up-to-date merged object
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 0, again.output
    assert sorted((tmp_path / "runs" / "digits").glob("*-digits-sub0of2")) == first
    assert "continuing" in again.output and "is up to date" in again.output
    assert (merged_dir / "eval.md").read_text() == "an evaluation of this object"
    # a second job of that name while one runs: refused before any work
    from d3fast.io import locked

    with locked(tmp_path / "runs" / "digits" / ".digits-subtasks.lock"):
        busy = CliRunner().invoke(cli, args)
    assert busy.exit_code == 2 and "is running" in busy.output


def _tiny() -> list[str]:
    from tests._utils import OVERRIDES

    return [o for o in OVERRIDES if not o.startswith("device")]


def test_merged_storage_is_the_formula_of_its_settings(home, parts, tmp_path):
    from d3fast.storage import object_bytes

    merged, _ = merge_runs(parts, tmp_path / "m")
    kw = {"num_classes": 10, "ppc": 2, "z_dim": 64, "decoder": "paper", "decoder_width": 32, "res": 32, "channels": 1,
          "subtasks": 2}
    assert merged.storage_bytes() == object_bytes(**kw)
    m2 = copy.copy(merged)
    m2.soft_labels = torch.full((20, 10), 0.1)
    assert m2.storage_bytes() == object_bytes(**kw, soft_labels=True) == merged.storage_bytes() + 4 * 20 * 10


@pytest.mark.slow
def test_digits_in_two_subtasks_merged_beats_random_real_images(home, tmp_path):
    """The whole path on real data: digits split into 2 subtasks of 5 classes, each with its
    own experts and 150 steps, merged; students on the merged object (every class, each
    through its own subtask's decoder) beat students on 1 random real image per class.
    Measured: 78.6 % vs 63.9 % (3 students x 30 epochs; ~90 s on 2 cores)."""
    sets = ["net.width=16", "experts.num_experts=2", "experts.epochs=4", "distill.steps=150", "distill.syn_steps=5",
            "distill.expert_epochs=1", "distill.max_start_epoch=3", "distill.mmd_samples=10", "distill.checkpoint_every=50",
            "distill.decoder_width=32", "distill.lr_latent=0.01", "distill.lr_decode=1e-3", "distill.lr_lr=1e-6"]
    runs = []
    for i in range(2):
        cfg = resolve_config("digits", overrides=[*sets, "device=cpu", "data.subtasks=2", f"data.subtask={i}"])
        cfg.data.loader = "cache"
        run_experts(cfg, progress=False)
        runs.append(Run.at(tmp_path / f"sub{i}"))
        distill(cfg, runs[-1], progress=False)
    _, out = merge_runs([r.path for r in runs], tmp_path / "merged")
    r = evaluate_run(Run(out), {"eval": {"students": 3, "epochs": 30}}, progress=False, device="cpu")
    res = r["results"]["convnet"]
    assert r["subtasks"] == 2 and res["random_same_count"]["images_per_class"] == 1
    assert res["d3"]["mean"] > res["random_same_count"]["mean"] + 0.05, res


def test_merge_out_never_replaces_what_is_not_a_merged_object(home, parts, tmp_path):
    with pytest.raises(D3FastError, match="is the run"):
        merge_runs(parts, parts[0])
    with pytest.raises(D3FastError, match="holds the run"):
        merge_runs(parts, parts[0].parent, force=True)  # the folder of the parts
    with pytest.raises(D3FastError, match="is inside the run"):
        merge_runs(parts, parts[0] / "merged", force=True)
    other = tmp_path / "other-run"
    other.mkdir()
    (other / "config.json").write_text("{}")
    with pytest.raises(D3FastError, match="is the run"):
        merge_runs(parts, other, force=True)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("keep")
    with pytest.raises(D3FastError, match="holds other files"):
        merge_runs(parts, mine, force=True)
    with pytest.raises(D3FastError, match="--out is empty"):
        merge_runs(parts, "")
    # an older merged object is replaced with --force; a sibling named <out>.old is not touched
    (tmp_path / "m.old").mkdir()
    (tmp_path / "m.old" / "paper.txt").write_text("keep")
    merge_runs(parts, tmp_path / "m")
    with pytest.raises(D3FastError, match="pass --force"):
        merge_runs(parts, tmp_path / "m")
    merge_runs(parts, tmp_path / "m", force=True)
    assert (mine / "thesis.tex").read_text() == "keep" and (tmp_path / "m.old" / "paper.txt").read_text() == "keep"
    assert all(Run(p).has_checkpoint() for p in parts)


def test_a_damaged_merged_object_is_refused(home, parts, tmp_path):
    _, out = merge_runs(parts, tmp_path / "m")
    data = bytearray((out / "merged.safetensors").read_bytes())
    data[-100] ^= 0x40  # one bit in the last tensor's bytes: safetensors itself cannot see it
    (out / "merged.safetensors").write_bytes(bytes(data))
    with pytest.raises(D3FastError, match="does not match the sha256 recorded"):
        Run(out).load_distilled()
    res = CliRunner().invoke(cli, ["sample", str(out), "--out", str(tmp_path / "g.png")])
    assert res.exit_code == 2 and "corrupt" in res.output


def test_outputs_do_not_overwrite_a_runs_files(home, parts, tmp_path):
    _, out = merge_runs(parts, tmp_path / "m")
    before = (out / "manifest.json").read_bytes()
    res = CliRunner().invoke(cli, ["sample", str(out), "--out", str(out / "manifest.json")])
    assert res.exit_code == 2 and "is a file of the run" in res.output
    res = CliRunner().invoke(cli, ["export", str(parts[0]), "--out", str(parts[0] / "checkpoint.pt")])
    assert res.exit_code == 2 and "is a file of the run" in res.output
    assert (out / "manifest.json").read_bytes() == before
    res = CliRunner().invoke(cli, ["distill", "--resume", str(out)])
    assert res.exit_code == 2 and "is a merged object, not a run" in res.output


def test_one_subtask_runs_are_named_for_the_merge(home, tmp_path):
    res = CliRunner().invoke(cli, ["distill", "--dataset", "digits", "--subtasks", "2", "--subtask", "1", "--runs-dir",
                                   str(tmp_path), "--name", "job", *[x for o in _tiny() for x in ("--set", o)]])
    assert res.exit_code == 0, res.output
    (made,) = (tmp_path / "digits").iterdir()
    assert made.name.endswith("-job-sub1of2")


def test_budget_refusals_are_one_line(home):
    for ipc, says in (("1e9", "more than distill.ppc's limit"), ("inf", "finite positive"), ("0", "finite positive")):
        res = CliRunner().invoke(cli, ["config", "--dataset", "digits", "--budget-ipc", ipc])
        assert res.exit_code == 2 and says in res.output and "Traceback" not in res.output, res.output


def test_a_budget_says_which_preset_settings_it_replaced(home):
    res = CliRunner().invoke(cli, ["config", "--dataset", "fashion-mnist", "--preset", "fashion-mnist-cpu",
                                   "--budget-ipc", "50", "--budget-images", "float32"])
    assert res.exit_code == 0, res.output
    said = res.stderr.splitlines()[1]
    chosen = json.loads(res.stdout)["distill"]  # stdout is the config alone: it can be written to a file
    # the preset's 64-wide paper decoder and 1 prior per class give way; z_dim (64) stays
    assert said.startswith("it replaces preset fashion-mnist-cpu: decoder paper -> small, decoder_width 64 -> ")
    assert f"ppc 1 -> {chosen['ppc']}" in said and "z_dim 64 kept" in said
    # uint8 images are the default unit: 50 of them buy less (29 priors of the 64-wide decoder)
    res = CliRunner().invoke(cli, ["config", "--dataset", "fashion-mnist", "--preset", "fashion-mnist-cpu",
                                   "--budget-ipc", "50"])
    assert res.stderr.startswith("storage budget 50 uint8 images per class") and "(12.524 float32 images)" in res.stderr
    assert json.loads(res.stdout)["distill"]["ppc"] == 29
