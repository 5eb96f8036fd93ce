"""Exports other tools read (`d3fast export --format pt | imagefolder`), evaluating them and
other code's image sets, and kept evaluations."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from d3fast.cli import cli
from d3fast.distilled import draw_set
from d3fast.errors import D3FastError
from d3fast.exports import class_folders, read_image_set
from d3fast.io import load_metadata
from d3fast.recipes.distill import distill
from d3fast.run import Run
from tests._utils import cfg_of

pytestmark = pytest.mark.slow  # end-to-end: distill, export, evaluate (once; no kernel differs under PUREPYTHON)

PROTOCOL = ["--set", "eval.students=1", "--set", "eval.epochs=20", "--set", "eval.samples_per_class=3",
            "--device", "cpu", "-q"]


@pytest.fixture(scope="module")
def run(shared_home, tmp_path_factory):
    path = tmp_path_factory.mktemp("exports") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("D3FAST_HOME", str(shared_home))
        distill(cfg_of("distill.ppc=2", "distill.steps=2"), Run.at(path), progress=False)
    return path


def _invoke(*args: str) -> str:
    r = CliRunner().invoke(cli, list(args))
    assert r.exit_code == 0, r.output
    return r.output


def test_pt_export_is_the_mtt_layout_and_reevaluates_to_the_runs_accuracy(home, run, tmp_path):
    out = tmp_path / "pt"
    _invoke("export", str(run), "--format", "pt", "--out", str(out), "--per-class", "3")
    images = torch.load(out / "images.pt", weights_only=True)
    labels = torch.load(out / "labels.pt", weights_only=True)
    lr = torch.load(out / "lr.pt", weights_only=True)
    d, _ = Run(run).load_distilled()
    assert images.shape == (30, 1, 32, 32) and images.dtype == torch.float32
    assert labels.tolist() == [c for c in range(10) for _ in range(3)]  # class-major
    assert lr.dim() == 0 and float(lr) == pytest.approx(d.student_lr)
    x, y, _ = draw_set(d, 3, seed=0)  # eval.seed 0, the run's eval.decoder_bn and batch size
    torch.testing.assert_close(images, x) and torch.testing.assert_close(labels, y)

    fixed = _invoke("evaluate", str(run), "--set", "eval.fresh_samples=false", "--set", "eval.baselines=false",
                    *PROTOCOL)
    again = _invoke("evaluate", str(out), "--set", "eval.baselines=false", *PROTOCOL)
    run_acc = json.loads((run / "eval.json").read_text())["results"]["convnet"]["d3"]["accs"]
    kept = json.loads((tmp_path / "pt.evals" / "index.json").read_text())
    pt_report = json.loads((tmp_path / "pt.evals" / kept[-1]["file"]).read_text())
    assert pt_report["results"]["convnet"]["set"]["accs"] == run_acc  # the same draw, seed and lr
    # students that learned something (measured 17.2%; chance and a one-class student: ~10%), so the
    # equality above is not two chance-level students agreeing
    assert run_acc[0] > 0.12, run_acc
    assert "one fixed draw" in fixed and "the set" in again and "pt.evals" in again


def test_two_evaluations_are_both_kept(home, run):
    before = len(json.loads((run / "evals" / "index.json").read_text())) if (run / "evals" / "index.json").exists() else 0
    for _ in range(2):
        _invoke("evaluate", str(run), "--set", "eval.baselines=false", "--set", "eval.students=1",
                "--set", "eval.epochs=1", "--device", "cpu", "-q")
    index = json.loads((run / "evals" / "index.json").read_text())
    assert len(index) == before + 2 and len({e["file"] for e in index}) == len(index)
    for e in index:
        assert json.loads((run / "evals" / e["file"]).read_text())["results"]["convnet"]["d3"]["accs"]


def test_class_folders_fit_a_file_name():
    """A class name longer than a file name may be (a Hugging Face ClassLabel can be a sentence)
    is cut at a character's end; the index keeps cut names apart and in order."""
    long = ["é" * 3000, "é" * 3000 + "x", "a/b\x00c", ".."]
    folders = class_folders(long)
    assert all(len(f.encode()) <= 255 for f in folders) and len(set(folders)) == 4
    assert folders[0] == "0_" + "é" * 100 and folders[2:] == ["2_a_b_c", "3_class"]


def test_imagefolder_export_round_trips(home, run, tmp_path):
    out = tmp_path / "folder"
    _invoke("export", str(run), "--format", "imagefolder", "--out", str(out), "--per-class", "2")
    d, _ = Run(run).load_distilled()
    folders = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert folders == class_folders(d.classes) and len(list((out / folders[3]).glob("*.png"))) == 2
    s = read_image_set(out)
    x, y, _ = draw_set(d, 2, seed=0)
    m = torch.tensor(d.meta["mean"]).view(1, -1, 1, 1)
    sd = torch.tensor(d.meta["std"]).view(1, -1, 1, 1)
    assert s.pixels and s.classes == d.classes and s.labels.tolist() == y.tolist()
    torch.testing.assert_close(s.images, (x * sd + m).clamp(0, 1), atol=0.5 / 255 + 1e-6, rtol=0)  # uint8 rounding
    assert s.lr == pytest.approx(d.student_lr)
    text = _invoke("evaluate", str(out), "--set", "eval.baselines=true", *PROTOCOL)
    assert "ImageFolder" in text and "random real, same count" in text
    # pixels of the pt format: the same images before rounding
    _invoke("export", str(run), "--format", "pt", "--pixels", "--out", str(tmp_path / "px"), "--per-class", "2")
    px = torch.load(tmp_path / "px" / "images.pt", weights_only=True)
    torch.testing.assert_close(px, (x * sd + m).clamp(0, 1))
    assert read_image_set(tmp_path / "px").pixels


def test_safetensors_export_describes_itself(home, run, tmp_path):
    _invoke("export", str(run), "--out", str(tmp_path / "d.safetensors"))
    meta = load_metadata(tmp_path / "d.safetensors")
    assert meta["dataset"] == "digits" and meta["step"] == 2 and meta["decoder_bn"] == "batch"
    assert meta["config"]["distill"]["ppc"] == 2 and meta["d3fast_version"] and "git_commit" in meta
    assert meta["zca"] is None and meta["classes"] == [str(c) for c in range(10)]
    text = _invoke("evaluate", str(tmp_path / "d.safetensors"), "--set", "eval.baselines=false", *PROTOCOL)
    assert "D3 (fresh samples)" in text and (tmp_path / "d.evals" / "index.json").is_file()


def test_foreign_pt_sets_and_bad_input(home, tmp_path):
    """MTT's file names, soft labels as probabilities, and the errors a user meets."""
    g = torch.Generator().manual_seed(0)
    (tmp_path / "mtt").mkdir()
    torch.save(torch.randn(20, 1, 32, 32, generator=g), tmp_path / "mtt" / "images_best.pt")
    torch.save(torch.arange(10).repeat(2), tmp_path / "mtt" / "labels_best.pt")
    torch.save(torch.tensor(0.01), tmp_path / "mtt" / "synthetic_lr_best.pt")
    s = read_image_set(tmp_path / "mtt")
    # approx: 0.01 read back as float32, one rounding (<= 6e-8 relative, under approx's 1e-6)
    assert s.lr == pytest.approx(0.01) and not s.pixels and s.labels.tolist() == list(range(10)) * 2
    r = CliRunner().invoke(cli, ["evaluate", str(tmp_path / "mtt"), *PROTOCOL])
    assert r.exit_code == 2 and "pass --dataset" in r.output
    text = _invoke("evaluate", str(tmp_path / "mtt" / "images_best.pt"), "--dataset", "digits",
                   "--set", "eval.baselines=false", *PROTOCOL)
    assert "lr 0.01 from the set" in text
    r = CliRunner().invoke(cli, ["evaluate", str(tmp_path / "mtt"), "--dataset", "cifar10", *PROTOCOL])
    assert r.exit_code == 2 and "not prepared" in r.output or "shape" in r.output, r.output
    torch.save(torch.randn(20, 3, 32, 32), tmp_path / "mtt" / "images_best.pt")
    r = CliRunner().invoke(cli, ["evaluate", str(tmp_path / "mtt"), "--dataset", "digits", *PROTOCOL])
    assert r.exit_code == 2 and "images of shape [3, 32, 32]" in r.output, r.output
    torch.save(torch.full((20, 1, 32, 32), float("nan")), tmp_path / "mtt" / "images_best.pt")
    r = CliRunner().invoke(cli, ["evaluate", str(tmp_path / "mtt"), "--dataset", "digits", *PROTOCOL])
    assert r.exit_code == 2 and "NaN" in r.output
    (tmp_path / "mtt" / "labels_best.pt").unlink()
    r = CliRunner().invoke(cli, ["evaluate", str(tmp_path / "mtt"), "--dataset", "digits", *PROTOCOL])
    assert r.exit_code == 2 and "no labels beside" in r.output
    (tmp_path / "bad" / "a").mkdir(parents=True)
    (tmp_path / "bad" / "a" / "x.png").write_bytes(b"not a png")
    r = CliRunner().invoke(cli, ["evaluate", str(tmp_path / "bad"), "--dataset", "digits", *PROTOCOL])
    assert r.exit_code == 2 and "unreadable image" in r.output
    Image.new("L", (8, 8)).save(tmp_path / "bad" / "a" / "x.png")
    Image.new("L", (9, 8)).save(tmp_path / "bad" / "a" / "y.png")
    r = CliRunner().invoke(cli, ["evaluate", str(tmp_path / "bad"), "--dataset", "digits", *PROTOCOL])
    assert r.exit_code == 2 and "one size" in r.output


def test_export_refuses_what_it_would_destroy(home, run, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    r = CliRunner().invoke(cli, ["export", str(run), "--format", "pt", "--out", str(tmp_path / "mine")])
    assert r.exit_code == 2 and "not a d3fast export" in r.output
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    _invoke("export", str(run), "--format", "pt", "--out", str(tmp_path / "e"), "--per-class", "1")
    r = CliRunner().invoke(cli, ["export", str(run), "--format", "pt", "--out", str(tmp_path / "e")])
    assert r.exit_code == 2 and "--force" in r.output
    _invoke("export", str(run), "--format", "pt", "--out", str(tmp_path / "e"), "--per-class", "2", "--force")
    assert len(torch.load(tmp_path / "e" / "labels.pt", weights_only=True)) == 20
    r = CliRunner().invoke(cli, ["export", str(run), "--out", str(tmp_path / "x.st"), "--pixels"])
    assert r.exit_code == 2 and "--format pt" in r.output
    r = CliRunner().invoke(cli, ["evaluate", str(run), "--set", "distill.ppc=3"])
    assert r.exit_code == 2 and "only eval.* keys" in r.output


def test_nothing_of_the_users_is_replaced_or_removed(home, run, tmp_path):
    """Findings of a breaker pass: user folders beside --out that look like temporaries, plain
    files at --out, files added to an export, symlinks."""
    user = tmp_path / "user"
    for name in ("thesis.old-2023", "photos.tmp-99999"):
        (user / name).mkdir(parents=True)
        (user / name / "keep.txt").write_text("precious")
    (user / ".notes.55555.bak.tmp").write_text("x")
    _invoke("export", str(run), "--format", "pt", "--out", str(user / "e"), "--per-class", "1")
    assert {p.name for p in user.iterdir()} == {"thesis.old-2023", "photos.tmp-99999", ".notes.55555.bak.tmp", "e"}
    (user / "notes.txt").write_text("mine")
    (user / "notes.png").write_text("x")
    for args in (["export", str(run), "--out", str(user / "notes.txt")],
                 ["export", str(run), "--out", str(user / "notes.txt"), "--force"],
                 ["sample", str(run), "--out", str(user / "notes.png")]):
        r = CliRunner().invoke(cli, args)
        assert r.exit_code == 2 and "not a d3fast" in r.output, r.output
    assert (user / "notes.txt").read_text() == "mine" and (user / "notes.png").read_text() == "x"
    r = CliRunner().invoke(cli, ["export", str(run), "--out", str(run / "evals" / "index.json")])
    assert r.exit_code == 2 and "inside the run" in r.output
    _invoke("export", str(run), "--out", str(user / "d.safetensors"))
    r = CliRunner().invoke(cli, ["export", str(run), "--out", str(user / "d.safetensors")])
    assert r.exit_code == 2 and "--force" in r.output
    _invoke("export", str(run), "--out", str(user / "d.safetensors"), "--force")
    _invoke("sample", str(run), "--out", str(user / "g.png"))
    _invoke("sample", str(run), "--out", str(user / "g.png"))  # an earlier grid is replaced freely
    (user / "e" / "MY_NOTES.txt").write_text("n")
    r = CliRunner().invoke(cli, ["export", str(run), "--format", "pt", "--out", str(user / "e"), "--force"])
    assert r.exit_code == 2 and "MY_NOTES.txt" in r.output and (user / "e" / "MY_NOTES.txt").exists()
    (user / "link").symlink_to(user / "e")
    r = CliRunner().invoke(cli, ["export", str(run), "--format", "pt", "--out", str(user / "link"), "--force"])
    assert r.exit_code == 2 and "symbolic link" in r.output and (user / "link").is_symlink()
    for args, msg in ((["sample", str(run), "--out", str(user / "s.png"), "--samples", "-5"], "-5"),
                      (["export", str(run), "--format", "pt", "--out", str(user / "z"), "--seed", "9" * 25], "9" * 25)):
        r = CliRunner().invoke(cli, args)
        assert r.exit_code == 2 and msg in r.output and "unexpected" not in r.output, r.output


def test_imagefolder_sets_are_labelled_by_folder_name(home, run, tmp_path):
    import numpy as np

    for c in ("3", "5", "7"):
        (tmp_path / "f" / c).mkdir(parents=True)
        Image.new("L", (32, 32), 40 * int(c)).save(tmp_path / "f" / c / "a.png")
    Image.fromarray(np.full((32, 32), 6000, np.uint16)).save(tmp_path / "f" / "7" / "b.png")  # 16-bit
    s = read_image_set(tmp_path / "f")
    assert s.label_by_name([str(c) for c in range(10)]) is None
    assert s.labels.tolist() == [3, 5, 7, 7]
    # scaled, not clipped; approx: one float32 rounding of k / 255
    assert s.images[3].max().item() == pytest.approx(round(6000 / 65535 * 255) / 255)
    (tmp_path / "f" / "x").mkdir()
    Image.new("L", (32, 32)).save(tmp_path / "f" / "x" / "a.png")
    r = CliRunner().invoke(cli, ["evaluate", str(tmp_path / "f"), "--dataset", "digits", *PROTOCOL])
    assert r.exit_code == 2 and "(x) are not classes of the dataset" in r.output, r.output
    (tmp_path / "e").mkdir()
    torch.save(torch.zeros(0, 1, 32, 32), tmp_path / "e" / "images.pt")
    torch.save(torch.zeros(0, dtype=torch.long), tmp_path / "e" / "labels.pt")
    r = CliRunner().invoke(cli, ["evaluate", str(tmp_path / "e"), "--dataset", "digits", *PROTOCOL])
    assert r.exit_code == 2 and "N >= 1" in r.output
    r = CliRunner().invoke(cli, ["evaluate", str(run), "--evals-dir", str(tmp_path / "e" / "images.pt"), *PROTOCOL])
    assert r.exit_code == 2 and "it is a file" in r.output


def test_a_damaged_export_is_refused_by_every_reader(home, run, tmp_path):
    """Issue 32: a flipped bit in an export's latents, or one NaN latent, evaluated to chance
    with exit 0 (and `sample`, `export --format pt` wrote NaN images); a negative stored lr
    crashed `evaluate`, an infinite one was used. Each is now one line naming the file."""
    import math
    import struct

    from d3fast.exports import export, load

    good = tmp_path / "good.safetensors"
    _invoke("export", str(run), "--out", str(good))
    d = load(good)
    assert "content_sha256" in load_metadata(good)

    # one bit of the latents' data: safetensors checks its header, the checksum the data
    raw = bytearray(good.read_bytes())
    (n,) = struct.unpack("<Q", bytes(raw[:8]))
    start = json.loads(bytes(raw[8 : 8 + n]))["latents"]["data_offsets"][0]
    raw[8 + n + start + 5] ^= 0x04
    flipped = tmp_path / "flipped.safetensors"
    flipped.write_bytes(bytes(raw))
    out = tmp_path / "o"
    for args in (["evaluate", str(flipped), *PROTOCOL], ["sample", str(flipped), "--out", str(tmp_path / "g.png")],
                 ["export", str(flipped), "--format", "pt", "--out", str(out)]):
        r = CliRunner().invoke(cli, args)
        assert r.exit_code == 2 and "do not match the checksum written with them" in r.output, (args, r.output)
        assert str(flipped) in r.output and len(r.output.strip().splitlines()[-1]) < 300
    assert not out.exists() and not (tmp_path / "g.png").exists()

    def written(change, name):  # an export written from a changed object: its checksum agrees
        e = load(good)
        change(e)
        path = tmp_path / name
        export(e, path)
        return path

    nan = written(lambda e: e.latents.data.view(-1)[3].fill_(math.nan), "nan.safetensors")
    with pytest.raises(D3FastError, match=r"damaged distilled export .*latents holds 1 non-finite value"):
        load(nan)
    dec = written(lambda e: next(e.decoder.parameters()).data.view(-1)[0].fill_(math.inf), "dec.safetensors")
    with pytest.raises(D3FastError, match=r"decoder\.\S+ holds 1 non-finite value"):
        load(dec)
    huge = written(lambda e: e.latents.data[0, 0, 1].fill_(1e30), "huge.safetensors")  # finite; samples overflow
    with pytest.raises(D3FastError, match="latents hold log-variances up to 1e\\+30, above 88"):
        load(huge)
    wide = written(lambda e: e.decoder.project.weight.data.fill_(3e38), "wide.safetensors")  # finite weights
    with pytest.raises(D3FastError, match="latents decode to non-finite images"):
        load(wide)
    big = written(lambda e: e.alpha.data.fill_(1e4 if e.lr_param == "log" else -1.0), "lr.safetensors")
    with pytest.raises(D3FastError, match=r"alpha gives student lr .* a usable lr is in \(0, 10\]"):
        load(big)
    r = CliRunner().invoke(cli, ["evaluate", str(big), *PROTOCOL])
    assert r.exit_code == 2 and "unexpected" not in r.output and "usable lr" in r.output, r.output
    assert d.student_lr > 0  # the untouched export loads as before

    # the metadata is under the checksum too (a NaN mean would turn every pixel NaN)
    from d3fast.io import load_tensors, save_tensors

    tensors, meta = load_tensors(good)
    save_tensors(tmp_path / "meta.safetensors", tensors, meta | {"mean": [float("nan")] * len(meta["mean"])})
    with pytest.raises(D3FastError, match="tensors or metadata do not match the checksum"):
        load(tmp_path / "meta.safetensors")
    save_tensors(tmp_path / "meta2.safetensors", tensors, {k: v for k, v in meta.items() if k != "content_sha256"}
                 | {"mean": [float("nan")] * len(meta["mean"])})  # an export of before the checksum
    with pytest.raises(D3FastError, match=r"mean is \[nan"):
        load(tmp_path / "meta2.safetensors")
    save_tensors(tmp_path / "f64.safetensors", {k: v.double() if k == "latents" else v for k, v in tensors.items()},
                 {k: v for k, v in meta.items() if k != "content_sha256"})
    with pytest.raises(D3FastError, match="latents is torch.float64, not float32"):
        load(tmp_path / "f64.safetensors")


def test_an_image_set_is_sized_from_its_headers_before_any_pixel_is_decoded(tmp_path, monkeypatch):
    # issue 32: ten 8000x8000 PNGs (724 KB on disk) were decoded, 6 GB, before being refused
    from d3fast.exports import MAX_SET_SIDE

    folder = tmp_path / "set"
    (folder / "a").mkdir(parents=True)
    (folder / "b").mkdir()
    Image.new("RGB", (8, 8)).save(folder / "a" / "0.png")
    Image.new("RGB", (8000, 8000)).save(folder / "b" / "0.png")  # a few KB on disk
    decoded: list[tuple[int, int]] = []
    real_load = Image.Image.load

    def load(self):  # every decode, recorded
        decoded.append(self.size)
        return real_load(self)

    monkeypatch.setattr(Image.Image, "load", load)
    with pytest.raises(D3FastError, match=f"0.png is 8000x8000: an image set holds single images of at most "
                                          f"{MAX_SET_SIDE}x{MAX_SET_SIDE}"):
        read_image_set(folder)
    assert (8000, 8000) not in decoded
    (folder / "b" / "0.png").unlink()
    frames = [Image.new("RGB", (8, 8), c) for c in ("red", "blue")]
    frames[0].save(folder / "b" / "0.tif", save_all=True, append_images=frames[1:])
    with pytest.raises(D3FastError, match="0.tif is 8x8 with 2 frames"):
        read_image_set(folder)
    (folder / "b" / "0.tif").unlink()
    Image.new("RGB", (16, 16)).save(folder / "b" / "0.png")
    with pytest.raises(D3FastError, match="0.png is 16x16, the others 8x8: an image set has one size"):
        read_image_set(folder)
