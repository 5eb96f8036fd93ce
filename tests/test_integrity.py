"""Nothing lost, nothing silently wrong: parallel jobs, full disks, bit rot, killed writers,
images in every Pillow mode, values out of range, and errors that name the fix."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from d3fast.cli import cli
from d3fast.data.decode import decode_image
from d3fast.errors import D3FastError
from d3fast.recipes.distill import distill
from d3fast.recipes.experts import run_experts
from d3fast.run import Run
from d3fast.state import load_checkpoint
from d3fast.trajectories import expert_path, experts_dir, read_expert_meta, write_expert
from tests._utils import OVERRIDES, cfg_of

ROOT = Path(__file__).resolve().parent.parent


def _python(code: str, env_home: Path, **kw) -> subprocess.Popen:
    env = {**os.environ, "D3FAST_HOME": str(env_home), "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def _cli(command, *args):
    """`command` with the tiny digits overrides first, so that `args` win over them."""
    tiny = sum((["--set", o] for o in OVERRIDES if not o.startswith(("device", "distill.steps"))), [])
    return CliRunner().invoke(cli, [command, *tiny, *args, "--device", "cpu"])


# ---- lost or mixed work

@pytest.mark.slow
def test_runs_created_by_parallel_processes_are_distinct(tmp_path):
    """Case 1: three jobs starting in the same second each get their own run directory."""
    code = f"""
        from d3fast.run import Run
        from tests._utils import cfg_of
        cfg = cfg_of()
        print("\\n".join(str(Run.create({str(tmp_path)!r}, cfg, "same").path) for _ in range(20)))
    """
    procs = [_python(code, tmp_path / "home") for _ in range(3)]
    paths = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        paths += out.split()
    assert len(paths) == 60 and len(set(paths)) == 60


@pytest.mark.slow
def test_parallel_expert_jobs_share_the_experts(tmp_path, monkeypatch):
    """Case 3: two jobs training the same missing experts split them (no expert trained
    twice) and neither deletes the other's temporaries."""
    code = """
        from d3fast.recipes.experts import run_experts
        from tests._utils import cfg_of
        res = run_experts(cfg_of("experts.num_experts=4", "experts.epochs=2"), progress=False)
        print(res.trained_epochs)
    """
    home = tmp_path / "home"
    prep = _python("from d3fast.data.prepare import prepare\nfrom tests._utils import cfg_of\n"
                   "prepare(cfg_of(), progress=False)", home)
    assert prep.wait(timeout=300) == 0, prep.stderr.read()
    procs = [_python(code, home) for _ in range(2)]
    trained = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
        trained.append(int(out.split()[-1]))
    assert sum(trained) == 4 * 2  # every expert's 2 epochs trained exactly once between them
    monkeypatch.setenv("D3FAST_HOME", str(home))
    folder = experts_dir(cfg_of())
    assert all(read_expert_meta(expert_path(folder, i))["complete"] for i in range(4))


def test_lower_epochs_never_cut_an_interrupted_expert(capsys):
    """Case 4: an interrupted expert with 9 epochs, re-run with --epochs 4, keeps its 9."""
    from d3fast.data.prepare import prepare

    prepare(cfg_of(), progress=False)
    path = expert_path(experts_dir(cfg_of()), 0)
    write_expert(path, torch.randn(10, 5), index=0, seed=1, complete=False, test_acc=None,
                 history=[{"epoch": e + 1, "loss": 1.0, "acc": 0.5, "seconds": 1.0} for e in range(9)], param_layout=[])
    before = path.read_bytes()
    res = run_experts(cfg_of("experts.num_experts=1", "experts.epochs=4"), progress=False)
    assert path.read_bytes() == before and read_expert_meta(path)["epochs_done"] == 9 and res.trained_epochs == 0
    assert "holds 9 epochs of an interrupted run; left as it is" in capsys.readouterr().out


def _resume_with_file_limit(run: Run, limit: int, home: Path) -> subprocess.CompletedProcess:
    """`d3fast distill --resume RUN --steps 3` with files limited to `limit` bytes: writing
    a bigger file fails as on a full disk (EFBIG instead of ENOSPC)."""
    code = f"""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
        from d3fast.cli import main
        sys.argv = ["d3fast", "distill", "--resume", {str(run.path)!r}, "--steps", "3"]
        main()
    """
    p = _python(code, home)
    out, err = p.communicate(timeout=300)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def test_a_checkpoint_write_that_fails_keeps_the_last_one(home, tmp_path):
    """Case 5: the disk fills while the checkpoint is written: one message naming the path,
    the previous checkpoint intact, and the run resumes once there is room."""
    run = Run.at(tmp_path / "r")
    distill(cfg_of("distill.steps=2"), run, progress=False)
    before = run.checkpoint_path.read_bytes()
    res = _resume_with_file_limit(run, len(before) // 2, home)
    assert res.returncode == 2, res.stderr
    assert f"could not write {run.checkpoint_path}" in res.stderr and "MiB free there" in res.stderr
    assert "Traceback" not in res.stderr
    assert run.checkpoint_path.read_bytes() == before
    assert not [p for p in run.path.iterdir() if p.name.endswith(".tmp")]
    res = CliRunner().invoke(cli, ["distill", "--resume", str(run.path), "--steps", "3"])
    assert res.exit_code == 0 and "reached step 3/3" in res.output, res.output


def test_a_first_checkpoint_that_fails_leaves_a_run_that_resumes_from_step_0(home, tmp_path):
    """Issue 32: the run's very first checkpoint fails (a file-size limit): --resume said
    "restore the checkpoint from a copy" of one that never existed, and only deleting
    metrics.jsonl let the run go on. Now it starts from step 0 with one line saying why."""
    from d3fast.data.prepare import prepare

    prepare(cfg_of(), progress=False)
    run_experts(cfg_of(), progress=False)  # the experts exist before the limit applies
    tiny = [x for o in OVERRIDES if not o.startswith(("device", "distill.steps", "distill.checkpoint_every"))
            for x in ("--set", o)]
    args = ["distill", "--dataset", "digits", *tiny, "--set", "distill.checkpoint_every=2", "--steps", "3",
            "--device", "cpu", "--runs-dir", str(tmp_path / "runs"), "--name", "first"]
    code = f"""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))
        from d3fast.cli import main
        sys.argv = ["d3fast", *{args!r}]
        main()
    """
    p = _python(code, home)
    out, err = p.communicate(timeout=300)
    (path,) = (tmp_path / "runs").glob("*/*-first")
    run = Run(path)
    assert p.returncode == 2 and "could not write" in err and "Traceback" not in err, err
    assert not run.has_checkpoint() and [m["step"] for m in run.read_metrics()] == [1, 2], err
    res = CliRunner().invoke(cli, ["distill", "--resume", str(run.path)])
    assert res.exit_code == 0, res.output
    assert "reached step 2, but its first checkpoint could not be written: starting it from step 0" in res.output
    assert "reached step 3/3" in res.output and [m["step"] for m in run.read_metrics()] == [1, 2, 3]


def test_an_export_that_fails_to_write_names_its_folder(home, tmp_path):
    """Issue 32: torch.save's zip writer names no file ("unexpected pos 704 vs 598"), and the
    message said `could not write .` with "The previous  is intact". Now it names --out."""
    run = Run.at(tmp_path / "r")
    distill(cfg_of("distill.steps=1"), run, progress=False)
    out = tmp_path / "export"
    code = f"""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (600, 600))
        from d3fast.cli import main
        sys.argv = ["d3fast", "export", {str(run.path)!r}, "--format", "pt", "--out", {str(out)!r}]
        main()
    """
    p = _python(code, home)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 2 and f"could not write {out}: " in err and "MiB free there" in err, err
    assert "The previous export is intact" in err and "write ." not in err and "Traceback" not in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if "tmp" in p.name]


@pytest.fixture
def tiny_disk(tmp_path):
    """A 1 MiB tmpfs (root only); skipped where mounting is not allowed."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


def test_a_full_disk_is_one_clear_error(tiny_disk):
    from d3fast.io import atomic_write_bytes

    atomic_write_bytes(tiny_disk / "keep.bin", b"x" * 1000)
    with pytest.raises(D3FastError, match=r"could not write .*big.bin: the disk is full; [0-9.]+ MiB free there"):
        atomic_write_bytes(tiny_disk / "big.bin", b"x" * (2 << 20))
    from d3fast.io import save_tensors

    with pytest.raises(D3FastError, match="could not write"):
        save_tensors(tiny_disk / "t.safetensors", {"x": torch.zeros(1 << 20)}, {})
    assert sorted(p.name for p in tiny_disk.iterdir()) == ["keep.bin"]


# ---- corrupt data is refused

def test_checkpoint_overwritten_in_place_is_refused_on_resume(home, tmp_path):
    """Case 6: 16 bytes of an optimiser moment overwritten, same size: refused."""
    run = Run.at(tmp_path / "r")
    distill(cfg_of("distill.steps=1"), run, progress=False)
    raw = bytearray(run.checkpoint_path.read_bytes())
    mid = len(raw) // 2
    raw[mid : mid + 16] = bytes(16)
    run.checkpoint_path.write_bytes(bytes(raw))
    res = CliRunner().invoke(cli, ["distill", "--resume", str(run.path), "--steps", "2"])
    assert res.exit_code == 2 and ("CRC" in res.output or "corrupt" in res.output), res.output


def test_cache_array_overwritten_in_place_is_refused(home):
    """Case 7 for the uint8 cache: one flipped byte in the train images is refused at load."""
    from d3fast.data.loader import load_dataset
    from d3fast.io import _VERIFIED
    from d3fast.paths import data_dir

    path = data_dir("digits") / "train_x.npy"
    raw = bytearray(path.read_bytes())
    raw[-8:] = bytes(255 - b for b in raw[-8:])
    original = path.read_bytes()
    try:
        path.write_bytes(bytes(raw))
        _VERIFIED.clear()
        with pytest.raises(D3FastError, match="does not match the sha256 recorded"):
            load_dataset("digits", "train")
    finally:
        path.write_bytes(original)
        _VERIFIED.clear()


def test_beton_overwritten_in_place_is_refused(tmp_path):
    """Case 7: a train.beton with 8 bytes overwritten (same size) is refused when opened."""
    from d3fast.config import resolve_config
    from d3fast.data import beton
    from d3fast.data.loader import open_split
    from d3fast.data.prepare import prepare
    from tests._utils import make_imagenet_tree

    if not beton.ffcv_status()[0]:
        pytest.skip(f"FFCV: {beton.ffcv_status()[1]}")
    make_imagenet_tree(tmp_path / "tree", n_train=2, n_val=1)
    cfg = resolve_config("imagenette", overrides=[f"data.data_path={tmp_path / 'tree'}", "data.workers=1",
                                                  "data.loader=ffcv"])
    prepare(cfg, progress=False)
    beton.write_betons("imagenette", "raw", workers=1, progress=False)
    path = beton.beton_dir("imagenette") / "train.beton"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2 : len(raw) // 2 + 8] = b"\xff" * 8
    path.write_bytes(bytes(raw))
    with pytest.raises(D3FastError, match="train.beton does not match the sha256 recorded"):
        open_split(cfg, "train", torch.device("cpu"))


# ---- images in every Pillow mode (case 8)

def _decode(img: Image.Image, tmp_path: Path, fmt: str = "PNG", channels: int = 1) -> np.ndarray:
    path = tmp_path / f"im.{fmt.lower()}"
    img.save(path, fmt)
    return decode_image(str(path), 16, channels)


def test_16_bit_greys_are_scaled_not_clipped(tmp_path):
    ramp = (np.arange(16 * 16).reshape(16, 16) * 257).astype(np.uint16)  # 0..65535
    out = _decode(Image.fromarray(ramp), tmp_path)
    expected = np.round(ramp / 257).astype(np.uint8)
    assert np.abs(out[0].astype(int) - expected).max() <= 1
    assert 120 < out.mean() < 135  # the case gave 251, 98.4% of pixels at 255


def test_32_bit_and_float_greys(tmp_path):
    big = (np.arange(256).reshape(16, 16) * 256).astype(np.int32)  # 16-bit range in mode I
    assert np.abs(_decode(Image.fromarray(big), tmp_path, "TIFF")[0].astype(int) - big / 257).max() <= 1
    small = np.arange(256).reshape(16, 16).astype(np.int32)  # 8-bit values in mode I stay
    assert np.array_equal(_decode(Image.fromarray(small), tmp_path, "TIFF")[0], small)
    unit = (np.arange(256).reshape(16, 16) / 255).astype(np.float32)  # floats in [0, 1]
    assert np.abs(_decode(Image.fromarray(unit), tmp_path, "TIFF")[0].astype(int) - np.arange(256).reshape(16, 16)).max() <= 1


def test_alpha_is_composited_over_white(tmp_path):
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 0] = 200  # red under full transparency on the left half
    rgba[:, 8:, 3] = 255  # the right half opaque
    out = _decode(Image.fromarray(rgba), tmp_path, channels=3)
    assert (out[:, :, :8] == 255).all()  # transparent: white, not the hidden red
    assert (out[0, :, 8:] == 200).all() and (out[1:, :, 8:] == 0).all()
    la = Image.fromarray(np.ascontiguousarray(rgba[..., [0, 3]]))
    assert (_decode(la, tmp_path)[0, :, :8] == 255).all()


def test_palette_with_transparency_and_other_modes(tmp_path):
    p = Image.new("P", (16, 16), 0)
    p.putpalette([10, 20, 30, 40, 50, 60] + [0] * 762)
    p.paste(1, (8, 0, 16, 16))
    p.info["transparency"] = 0
    out = _decode(p, tmp_path, channels=3)
    assert (out[:, :, :8] == 255).all() and (out[:, :, 8:].reshape(3, -1).T == [40, 50, 60]).all()
    for mode, fmt in (("1", "PNG"), ("L", "PNG"), ("RGB", "PNG"), ("CMYK", "JPEG"), ("P", "GIF")):
        img = Image.new(mode, (20, 12))
        out = _decode(img, tmp_path, fmt, channels=3)
        assert out.shape == (3, 16, 16) and out.dtype == np.uint8


# ---- values that should never be accepted (cases 9 to 12), errors that mislead (13)

@pytest.mark.parametrize("args, says", [
    (["--steps", "0"], "distill.steps must be >= 1"),
    (["--set", "distill.steps=-1"], "distill.steps must be >= 1"),
    (["--set", "distill.lr_latent=-1"], "distill.lr_latent must be >= 0"),
    (["--set", "distill.lr_teacher=-1"], "distill.lr_teacher must be > 0"),
    (["--set", "data.zca=true", "--set", "data.zca_eps=0"], "data.zca_eps must be > 0"),
    (["--set", "data.zca_eps=-0.5"], "data.zca_eps must be > 0"),
])
def test_bad_values_are_refused_before_any_work(tmp_path, args, says):
    res = _cli("distill", "--dataset", "digits", "--runs-dir", str(tmp_path), *args)
    assert res.exit_code == 2 and says in res.output and "Traceback" not in res.output, res.output
    assert not any(tmp_path.iterdir())


def test_a_student_lr_driven_negative_stops_the_run(home, tmp_path):
    """Case 11: lr_lr=0.05 drove the learned lr to -0.15 after one step, silently (the
    reference's parametrisation: lr_param log cannot go below zero)."""
    with pytest.raises(D3FastError, match=r"non-positive student lr at step \d: -"):
        distill(cfg_of("distill.lr_param=leaky_relu", "distill.lr_lr=0.05", "distill.lr_teacher=0.001"),
                Run.at(tmp_path / "r"), progress=False)


def test_export_onto_a_directory_is_a_clear_error(home, tmp_path):
    run = Run.at(tmp_path / "r")
    distill(cfg_of("distill.steps=1"), run, progress=False)
    (tmp_path / "out").mkdir()
    res = CliRunner().invoke(cli, ["export", str(run.path), "--out", str(tmp_path / "out")])
    assert res.exit_code == 2 and "it is a directory" in res.output and "Traceback" not in res.output


def test_a_truncated_experts_manifest_does_not_stop_distill(home, tmp_path):
    folder = experts_dir(cfg_of())
    manifest = folder / "manifest.json"
    saved = manifest.read_bytes()
    manifest.write_bytes(saved[: len(saved) // 2])
    try:
        res = _cli("distill", "--dataset", "digits", "--runs-dir", str(tmp_path), "--steps", "1")
        assert res.exit_code == 0 and "reached step 1/1" in res.output, res.output
    finally:
        manifest.write_bytes(saved)


def test_an_unexpected_error_is_one_line_and_a_crash_file(d3fast_home, monkeypatch):
    from d3fast import doctor

    monkeypatch.delenv("D3FAST_DEBUG")
    monkeypatch.setattr(doctor, "report", lambda: 1 / 0)
    res = CliRunner().invoke(cli, ["doctor"])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert "unexpected ZeroDivisionError" in res.output and "a bug in d3fast" in res.output
    (crash,) = (d3fast_home / "logs").glob("crash-*.txt")
    assert "ZeroDivisionError" in crash.read_text() and "Traceback" in crash.read_text()
    assert str(crash) in res.output


def test_a_killed_writer_leaves_no_file_behind_and_its_temp_is_cleaned(tmp_path):
    """A SIGKILL mid-write leaves the old file and a temporary that the next cleanup removes
    (its writer is gone), while a live writer's temporary stays."""
    from d3fast.io import remove_stale_temps

    target = tmp_path / "f.bin"
    target.write_bytes(b"old")
    code = f"""
        import sys
        from d3fast.io import atomic_path
        with atomic_path({str(target)!r}) as tmp:
            tmp.write_bytes(b"half")
            print("writing", flush=True)
            sys.stdin.read()
    """
    p = _python(code, tmp_path / "home", stdin=subprocess.PIPE)
    assert p.stdout.readline().strip() == "writing"
    remove_stale_temps(tmp_path)
    assert len([x for x in tmp_path.iterdir() if x.name.endswith(".tmp")]) == 1  # alive: kept
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=60)
    remove_stale_temps(tmp_path)
    assert target.read_bytes() == b"old" and not [x for x in tmp_path.iterdir() if x.name.endswith(".tmp")]


def test_resource_limits_are_restored():
    # the file-size limit test runs in a child: this process keeps its own limit
    assert resource.getrlimit(resource.RLIMIT_FSIZE)[0] == resource.RLIM_INFINITY


# ---- found by trying to break it: damage that still parses, and limits

def test_a_flipped_bit_in_the_checkpoint_zip_directory_is_caught(home, tmp_path):
    """The zip CRCs miss a directory-flag bit set on a record's central-directory entry,
    and torch then reads the wrong bytes; the digest written with the state catches it."""
    run = Run.at(tmp_path / "r")
    distill(cfg_of("distill.steps=1"), run, progress=False)
    raw = bytearray(run.checkpoint_path.read_bytes())
    i = raw.find(b"PK\x01\x02")
    while not raw[i + 46 : i + 46 + int.from_bytes(raw[i + 28 : i + 30], "little")].endswith(b"/data/1"):
        i = raw.find(b"PK\x01\x02", i + 1)
    raw[i + 38] |= 0x10
    run.checkpoint_path.write_bytes(bytes(raw))
    with pytest.raises(D3FastError, match="corrupt"):
        load_checkpoint(run.checkpoint_path)
    raw[i + 10] = 99  # an unknown compression method in the same entry: NotImplementedError inside zipfile
    run.checkpoint_path.write_bytes(bytes(raw))
    with pytest.raises(D3FastError, match="corrupt"):
        load_checkpoint(run.checkpoint_path)


def test_a_format_1_checkpoint_resumes_and_a_format_2_one_needs_its_digest(home, tmp_path):
    """Format 2 dropped format 1's unused "best" record: a format-1 file (with it) still
    resumes to the same state as an uninterrupted run; a format-2 file without its digest
    is refused, since every d3fast that writes format 2 writes one."""
    from d3fast.state import state_digest

    alone = Run.at(tmp_path / "alone")
    distill(cfg_of("distill.steps=2", "distill.dtype=float64"), alone, progress=False)
    run = Run.at(tmp_path / "r")
    distill(cfg_of("distill.steps=1", "distill.dtype=float64"), run, progress=False)
    state = torch.load(run.checkpoint_path, weights_only=True)
    assert state["format"] == 2 and "best" not in state
    old = {k: v for k, v in state.items() if k != "sha256"} | {"format": 1, "best": '{"step": 1, "loss": 1.0}'}
    torch.save(old | {"sha256": state_digest(old)}, run.checkpoint_path)
    distill(cfg_of("distill.steps=2", "distill.dtype=float64"), run, resume=True, progress=False)
    a, b = load_checkpoint(run.checkpoint_path), load_checkpoint(alone.checkpoint_path)
    assert torch.equal(a["latents"], b["latents"]) and torch.equal(a["alpha"], b["alpha"])
    torch.save({k: v for k, v in state.items() if k != "sha256"}, run.checkpoint_path)
    with pytest.raises(D3FastError, match="digest written with it is missing"):
        load_checkpoint(run.checkpoint_path)


def test_an_expert_header_claiming_more_epochs_than_it_stores_is_refused(home, tmp_path):
    from d3fast.io import load_tensors, save_tensors

    src = expert_path(experts_dir(cfg_of()), 0)
    tensors, meta = load_tensors(src)
    path = tmp_path / "expert_0000.safetensors"
    save_tensors(path, tensors, {**meta, "epochs_done": meta["epochs_done"] + 4})
    with pytest.raises(D3FastError, match="damaged header .*but the trajectory holds 4 rows"):
        read_expert_meta(path)


def test_edited_manifest_values_are_caught(home, tmp_path):
    """The cache manifest's mean, a run manifest's expert list: still valid JSON after an
    edit, caught by the seal written with them."""
    import json

    from d3fast.data.cache import read_manifest
    from d3fast.paths import data_dir

    path = data_dir("digits") / "manifest.json"
    original = path.read_bytes()
    try:
        doc = json.loads(original)
        doc["mean"] = [0.705]
        path.write_text(json.dumps(doc))
        with pytest.raises(D3FastError, match="was changed after d3fast wrote it.*prepare --dataset digits --force"):
            read_manifest(path.parent)
    finally:
        path.write_bytes(original)

    run = Run.at(tmp_path / "r")
    distill(cfg_of("distill.steps=1"), run, progress=False)
    doc = json.loads(run.manifest_path.read_text())
    doc["experts_files"] = [doc["experts_files"][0]] * 2
    run.manifest_path.write_text(json.dumps(doc))
    res = CliRunner().invoke(cli, ["distill", "--resume", str(run.path), "--steps", "2"])
    assert res.exit_code == 0 and "was changed after d3fast wrote it; rebuilt it" in res.output, res.output
    assert len(set(run.read_manifest()["experts_files"])) == 2


def test_a_hand_edited_run_config_is_recorded_or_refused(home, tmp_path):
    import json

    run = Run.at(tmp_path / "r")
    distill(cfg_of("distill.steps=1"), run, progress=False)
    doc = json.loads(run.config_path.read_text())
    doc["distill"]["syn_steps"] = 2
    run.config_path.write_text(json.dumps(doc))
    res = CliRunner().invoke(cli, ["distill", "--resume", str(run.path), "--steps", "2"])
    assert res.exit_code == 0, res.output
    assert run.history()[-1]["changes"] == {"distill.syn_steps": [3, 2], "distill.steps": [1, 2]}
    doc["distill"]["ppc"] = 3
    run.config_path.write_text(json.dumps(doc))
    res = CliRunner().invoke(cli, ["distill", "--resume", str(run.path), "--steps", "3"])
    assert res.exit_code == 2 and "cannot change distill.ppc when resuming" in res.output, res.output


def test_a_lost_checkpoint_never_restarts_a_run_silently(home, tmp_path):
    run = Run.at(tmp_path / "r")
    distill(cfg_of("distill.steps=2"), run, progress=False)
    run.checkpoint_path.unlink()
    res = CliRunner().invoke(cli, ["distill", "--resume", str(run.path), "--steps", "3"])
    assert res.exit_code == 2 and "is missing, but the run had reached step 2" in res.output, res.output
    assert [m["step"] for m in run.read_metrics()] == [1, 2]


@pytest.mark.parametrize("log", ["metrics.jsonl", "history.jsonl"])
def test_a_non_utf8_byte_in_a_log_is_a_clear_error(home, tmp_path, log):
    run = Run.at(tmp_path / "r")
    distill(cfg_of("distill.steps=2"), run, progress=False)
    path = run.path / log
    raw = bytearray(path.read_bytes())
    raw[5] = 0xFF  # inside the first line, which the next resume must read
    path.write_bytes(bytes(raw))
    res = CliRunner().invoke(cli, ["distill", "--resume", str(run.path), "--steps", "3"])
    assert res.exit_code == 2 and f"{log} line 1 is corrupt" in res.output and "Traceback" not in res.output


def test_32_bit_integer_images_are_scaled(tmp_path):
    full = np.linspace(0, 2**31 - 1, 256).reshape(16, 16).astype(np.int32)
    out = _decode(Image.fromarray(full), tmp_path, "TIFF")[0]
    assert np.abs(out.astype(int) - np.linspace(0, 255, 256).reshape(16, 16)).max() <= 1
    signed = (np.linspace(-1, 1, 256).reshape(16, 16)).astype(np.float32)
    assert 120 < _decode(Image.fromarray(signed), tmp_path, "TIFF").mean() < 135


def test_a_network_deeper_than_the_image_is_refused(tmp_path):
    res = _cli("experts", "--dataset", "digits", "--set", "net.depth=6")
    assert res.exit_code == 2 and "net.depth=6 halves 32 px below 1 px: at most 5" in res.output, res.output


def test_a_second_sigterm_aborts_a_step_that_never_ends():
    from d3fast.recipes.distill import _StopRequest

    stop = _StopRequest()
    with stop.installed(), pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested  # the first asks for a graceful stop
        os.kill(os.getpid(), signal.SIGTERM)  # the second does not wait for the step


@pytest.mark.parametrize("device, says", [("cpu:7", "the CPU is one device"), ("tpu", "unknown device")])
def test_impossible_devices_are_named(device, says):
    from d3fast.runtime import resolve_device

    with pytest.raises(D3FastError, match=says):
        resolve_device(device)


def test_a_full_disk_during_prepare_is_one_clear_error(tiny_disk, monkeypatch):
    monkeypatch.setenv("D3FAST_HOME", str(tiny_disk / "home"))
    res = CliRunner().invoke(cli, ["prepare", "--dataset", "digits"])
    assert res.exit_code == 2 and "could not write" in res.output and "MiB free there" in res.output, res.output
    assert "Traceback" not in res.output


@pytest.mark.parametrize("key, value", [("decoder_width", 50_000), ("resolution", 1 << 20), ("mean", [None])])
def test_damaged_decoder_settings_are_refused_before_anything_is_built(tmp_path, key, value):
    # decoder_width 50,000 describes an ~80 GB decoder: building it to find out would take
    # the machine down (the OOM killer), so the shapes are compared on the meta device first
    import json

    from d3fast.distilled import init_distilled
    from d3fast.exports import export, load
    from d3fast.state import TrainState

    meta = {"resolution": 8, "channels": 1, "mean": [0.5], "std": [0.25], "z_dim": 4, "decoder": "paper",
            "decoder_width": 4}
    d = init_distilled(2, 1, ["a", "b"], meta, 0.01, torch.device("cpu"), 0)
    state = TrainState.create(d, cfg_of().distill, torch.device("cpu")).state_dict()
    state["meta"] = json.dumps({**meta, key: value})
    run = Run.at(tmp_path / "run")
    torch.save(state, run.checkpoint_path)
    with pytest.raises(D3FastError, match="decoder"):
        run.load_distilled()
    # an export edited the same way
    from d3fast.io import load_tensors, save_tensors

    export(d, tmp_path / "d.safetensors")
    tensors, stored = load_tensors(tmp_path / "d.safetensors", "distilled object")
    save_tensors(tmp_path / "e.safetensors", tensors, {**stored, key: value})
    with pytest.raises(D3FastError, match="decoder"):
        load(tmp_path / "e.safetensors")


def test_a_write_failure_that_names_no_file_says_so():
    import errno

    from d3fast.io import write_failure

    e = write_failure(None, RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"))
    assert e is not None and str(e).startswith("could not write a file: a write failed (") and "write ." not in str(e)
    assert "permission denied" in str(write_failure(None, PermissionError(errno.EACCES, "denied")))
    assert write_failure(None, ValueError("a bug")) is None  # not a write failure: the crash report's
