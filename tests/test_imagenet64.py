"""Imagenet64 (Downsampled ImageNet 64x64): the reader on tiny trees in the official
formats, streaming prepare, and bad files."""

from __future__ import annotations

import os
import pickle
import weakref

import numpy as np
import pytest
from click.testing import CliRunner

from d3fast.cli import cli
from d3fast.config import resolve_config
from d3fast.data import readers
from d3fast.data.cache import load_split
from d3fast.data.prepare import prepare
from d3fast.errors import D3FastError
from tests._utils import imagenet64_rows, write_imagenet64_tree

TRAIN = [f"train_data_batch_{i}" for i in range(1, 11)]


def cfg_for(path):
    return resolve_config("imagenet64", overrides=[f"data.data_path={path}"])


def expected(files, names):
    """(uint8 [N, 3, 64, 64], labels 0..999) of `names` in order, from the writer's pictures."""
    x = np.concatenate([files[n][0] for n in names]).transpose(0, 3, 1, 2)
    return x, np.concatenate([files[n][1] for n in names]) - 1


def rewrite_npz(path, **changes):
    """Replace entries of an .npz, keeping the others."""
    with np.load(path) as z:
        entries = {k: z[k] for k in z.files}
    np.savez(path, **{**entries, **changes})


def tree_with_planes(root):
    """The npz tree with train_data_batch_1's first picture made of three different planes:
    R a ramp along x, G a ramp along y, B constant 7."""
    files = write_imagenet64_tree(root)
    ramp = np.arange(64, dtype=np.uint8) * 4
    pic = np.stack([np.broadcast_to(ramp, (64, 64)), np.broadcast_to(ramp[:, None], (64, 64)),
                    np.full((64, 64), 7, np.uint8)], axis=-1)  # [H, W, 3]
    x, y = files["train_data_batch_1"]
    x[0] = pic
    rewrite_npz(root / "Imagenet64_train_npz" / "train_data_batch_1.npz", data=imagenet64_rows(x))
    return files


@pytest.fixture(scope="module")
def npz_manifest(tmp_path_factory):
    """The manifest of the default npz tree (seed 0), prepared once in a home of its own."""
    mp = pytest.MonkeyPatch()
    mp.setenv("D3FAST_HOME", str(tmp_path_factory.mktemp("home")))
    root = tmp_path_factory.mktemp("npz")
    write_imagenet64_tree(root)
    m = prepare(cfg_for(root), progress=False).manifest
    mp.undo()
    return m


def test_npz_tree_is_read_pixel_exact(tmp_path):
    files = tree_with_planes(tmp_path)
    m = prepare(cfg_for(tmp_path), progress=False).manifest
    assert m["source"]["layout"] == "imagenet64-npz" and m["source"]["path"] == str(tmp_path)
    assert m["num_classes"] == 1000 and (m["resolution"], m["channels"]) == (64, 3)
    assert m["classes"][:2] == ["class 1", "class 2"] and m["class_ids"][-1] == "1000"
    assert m["splits"]["train"]["per_class"] == [1] * 1000 == m["splits"]["test"]["per_class"]
    for split, names in (("train", TRAIN), ("test", ["val_data"])):
        x, y, _ = load_split("imagenet64", split)
        want_x, want_y = expected(files, names)
        np.testing.assert_array_equal(x, want_x)
        np.testing.assert_array_equal(y, want_y)
    x, _, _ = load_split("imagenet64", "train", mmap=True)
    ramp = np.arange(64) * 4
    assert (x[0, 0] == ramp[None, :]).all() and (x[0, 1] == ramp[:, None]).all() and (x[0, 2] == 7).all()
    assert files["train_data_batch_1"][1][0] - 1 == load_split("imagenet64", "train")[1][0]


@pytest.mark.parametrize("fmt,protocol", [("pickle", None), ("pickle", 2), ("pickle-py2", 0), ("pickle-py2", 2)])
def test_pickled_variants_give_the_same_cache(tmp_path, npz_manifest, fmt, protocol):
    write_imagenet64_tree(tmp_path, fmt=fmt, protocol=protocol)
    m = prepare(cfg_for(tmp_path), progress=False).manifest
    assert m["source"]["layout"] == "imagenet64-pickle"
    assert m["sha256"] == npz_manifest["sha256"]  # byte-identical arrays
    assert m["mean"] == npz_manifest["mean"] and m["classes"] == npz_manifest["classes"]


def test_flat_layout_map_clsloc_and_mixed_files(tmp_path, npz_manifest):
    write_imagenet64_tree(tmp_path, flat=True)
    lines = [f"n{10_000_000 + i:08d} {i} thing_number_{i}" for i in range(1000, 0, -1)]  # any order
    (tmp_path / "map_clsloc.txt").write_text("\n".join(lines) + "\n")
    res = prepare(cfg_for(tmp_path), progress=False)
    m = res.manifest
    assert m["classes"][0] == "thing number 1" and m["class_ids"][999] == "n10001000"
    assert m["sha256"] == npz_manifest["sha256"]
    # the map is part of the source: a changed name prepares again
    lines = [line.replace("thing_number_5", "five") if line.split()[1] == "5" else line for line in lines]
    (tmp_path / "map_clsloc.txt").write_text("\n".join(lines) + "\n")
    m = prepare(cfg_for(tmp_path), progress=False).manifest
    assert m["classes"][4] == "five"
    # one batch pickled, the others npz: fine
    batch4 = (tmp_path / "train_data_batch_4.npz").read_bytes()
    with np.load(tmp_path / "train_data_batch_4.npz") as z:
        d = {"data": z["data"], "labels": z["labels"].tolist(), "mean": z["mean"]}
    (tmp_path / "train_data_batch_4.npz").unlink()
    with open(tmp_path / "train_data_batch_4.pkl", "wb") as f:
        pickle.dump(d, f)
    m = prepare(cfg_for(tmp_path), progress=False).manifest
    assert m["source"]["layout"] == "imagenet64-mixed" and m["sha256"] == npz_manifest["sha256"]
    # a second copy elsewhere: npz before pickled, the root before subfolders, and a note
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "val_data.npz").write_bytes((tmp_path / "val_data.npz").read_bytes())
    (tmp_path / "train_data_batch_4.npz").write_bytes(batch4)
    (tmp_path / "old" / "train_data_batch_4.npz").write_bytes(b"not read")
    source = readers.read_imagenet64(tmp_path)
    assert source.notes == [f"several copies of the Imagenet64 files: using {tmp_path / 'train_data_batch_4.npz'} "
                            f"(not {tmp_path / 'old' / 'train_data_batch_4.npz'}, "
                            f"{tmp_path / 'train_data_batch_4.pkl'}) and the like"]


def test_bad_map_clsloc(tmp_path):
    write_imagenet64_tree(tmp_path)
    (tmp_path / "map_clsloc.txt").write_text("n01 1 a\nn02 x b\n")
    with pytest.raises(D3FastError, match=r"map_clsloc.txt:2: expected '<wnid> <id 1..1000> <name>'"):
        readers.read_imagenet64(tmp_path)
    (tmp_path / "map_clsloc.txt").write_text("n01 1 a\nn02 2 b\n")
    with pytest.raises(D3FastError, match="has no line for id.s. 3, 4, 5"):
        readers.read_imagenet64(tmp_path)


def test_missing_files(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(D3FastError, match="holds no Imagenet64 files: expected train_data_batch_1 .. "
                                          "train_data_batch_10 and val_data"):
        prepare(cfg_for(tmp_path / "empty"), progress=False)
    write_imagenet64_tree(tmp_path / "t")
    (tmp_path / "t" / "Imagenet64_train_npz" / "train_data_batch_7.npz").unlink()
    (tmp_path / "t" / "Imagenet64_val_npz" / "val_data.npz").unlink()
    with pytest.raises(D3FastError, match="Imagenet64 files missing: train_data_batch_7, val_data"):
        prepare(cfg_for(tmp_path / "t"), progress=False)


def test_damaged_files(tmp_path, d3fast_home):
    files = write_imagenet64_tree(tmp_path / "n")
    folder = tmp_path / "n" / "Imagenet64_train_npz"
    p = folder / "train_data_batch_3.npz"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    with pytest.raises(D3FastError, match=r"train_data_batch_3.npz is corrupt or truncated .*download it again"):
        prepare(cfg_for(tmp_path / "n"), progress=False)
    x, y = files["train_data_batch_3"]
    np.savez(p, data=imagenet64_rows(x), labels=y)
    # a flipped pixel byte: the zip's CRC catches it only when the pixels are read
    q = folder / "train_data_batch_5.npz"
    raw = bytearray(q.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    q.write_bytes(bytes(raw))
    with pytest.raises(D3FastError, match=r"train_data_batch_5.npz is corrupt or truncated \(BadZipFile"):
        prepare(cfg_for(tmp_path / "n"), progress=False)
    assert sorted(p.name for p in (d3fast_home / "data").iterdir()) == [".imagenet64.lock"]  # nothing half-written

    write_imagenet64_tree(tmp_path / "p", fmt="pickle")
    p = tmp_path / "p" / "Imagenet64_val" / "val_data"
    p.write_bytes(p.read_bytes()[:5000])
    with pytest.raises(D3FastError, match=r"val_data is corrupt or truncated .*download it again"):
        prepare(cfg_for(tmp_path / "p"), progress=False)


@pytest.mark.parametrize("bad", [0, 1001])
def test_labels_outside_1_to_1000(tmp_path, bad):
    files = write_imagenet64_tree(tmp_path)
    y = files["val_data"][1].copy()
    y[3] = bad
    rewrite_npz(tmp_path / "Imagenet64_val_npz" / "val_data.npz", labels=y)
    with pytest.raises(D3FastError, match=f"val_data.npz: label {bad} outside 1..1000"):
        prepare(cfg_for(tmp_path), progress=False)


@pytest.mark.parametrize("change,message", [
    ({"data": np.zeros((100, 3072), np.uint8)}, r"'data' is uint8 \[100, 3072\], expected uint8 \[N, 12288\].*Imagenet32"),
    ({"data": np.zeros((100, 12288), np.float32)}, r"'data' is float32 \[100, 12288\]"),
    ({"data": np.zeros((99, 12288), np.uint8)}, "holds 99 images but 100 labels"),
    ({"labels": np.ones((100, 2), np.int64)}, r"'labels' is int64 \[100, 2\], expected a list of integers"),
])
@pytest.mark.parametrize("fmt", ["npz", "pickle"])
def test_wrong_shapes_and_types(tmp_path, change, message, fmt):
    files = write_imagenet64_tree(tmp_path, fmt=fmt)
    x, y = files["train_data_batch_2"]
    entries = {"data": imagenet64_rows(x), "labels": y, **change}
    if fmt == "npz":
        np.savez(tmp_path / "Imagenet64_train_npz" / "train_data_batch_2.npz", **entries)
    else:
        with open(tmp_path / "Imagenet64_train" / "train_data_batch_2", "wb") as f:
            pickle.dump(entries, f)
    with pytest.raises(D3FastError, match=f"train_data_batch_2(\\.npz)?:? {message}"):
        readers.read_imagenet64(tmp_path)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_pickle_cannot_run_code(tmp_path, monkeypatch):
    write_imagenet64_tree(tmp_path, fmt="pickle")
    monkeypatch.chdir(tmp_path)
    with open(tmp_path / "Imagenet64_train" / "train_data_batch_2", "wb") as f:
        pickle.dump({"data": _Evil(), "labels": [1]}, f)
    with pytest.raises(D3FastError, match=r"train_data_batch_2 is not an Imagenet64 python batch "
                                          r"\(refusing to load global (posix|os|nt)\.system\)"):
        prepare(cfg_for(tmp_path), progress=False)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("fmt", ["npz", "pickle"])
def test_prepare_streams_one_file_at_a_time(tmp_path, monkeypatch, fmt):
    write_imagenet64_tree(tmp_path, fmt=fmt)
    load = readers._imagenet64_images
    live: list[int] = []  # pixel arrays handed out and not yet freed
    seen: list[tuple[str, int]] = []  # (file, arrays alive when it was loaded)

    def counting(path, count):
        seen.append((path.name, len(live)))
        images = load(path, count)
        live.append(1)
        weakref.finalize(images, live.pop)
        return images

    monkeypatch.setattr(readers, "_imagenet64_images", counting)
    source = readers.read_imagenet64(tmp_path)
    assert seen == []  # reading the source loads labels only
    assert [p.count for p in source.splits["train"].parts] == [100] * 10
    prepare(cfg_for(tmp_path), progress=False)
    names = [n.removesuffix(".npz") for n, _ in seen]
    assert names == [*TRAIN, "val_data"]
    assert [alive for _, alive in seen] == [0] * 11  # each part freed before the next loads
    assert live == []


def test_write_parts_checks_each_part(tmp_path):
    from d3fast.data.prepare import _write_parts
    from d3fast.data.readers import Part, SplitSource

    def part(n, shape=None, dtype=np.uint8):
        return Part(n, lambda: np.zeros(shape or (n, 3, 64, 64), dtype), f"file{n}")

    ok = SplitSource(labels=np.zeros(5, np.int64), parts=[part(2), part(3)])
    _write_parts(tmp_path / "x.npy", "train", ok, 64, 3, False)
    assert np.load(tmp_path / "x.npy").shape == (5, 3, 64, 64)
    with pytest.raises(D3FastError, match="the parts announce 5 images for 6 labels"):
        _write_parts(tmp_path / "x.npy", "train", SplitSource(np.zeros(6, np.int64), parts=ok.parts), 64, 3, False)
    for bad in (part(3, shape=(2, 3, 64, 64)), part(3, dtype=np.int16)):
        src = SplitSource(labels=np.zeros(5, np.int64), parts=[part(2), bad])
        with pytest.raises(D3FastError, match=r"file3 gave .* not the uint8 \[3, 3, 64, 64\] its reader announced"):
            _write_parts(tmp_path / "x.npy", "train", src, 64, 3, False)


def test_cli_prepare(tmp_path):
    write_imagenet64_tree(tmp_path)
    r = CliRunner().invoke(cli, ["prepare", "--dataset", "imagenet64", "--data-path", str(tmp_path)],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "prepared imagenet64: 1000 train / 1000 test images, 1000 classes, 3x64x64 uint8" in r.output


@pytest.mark.slow
def test_the_imagenet64_ipc1_preset_runs_end_to_end(tmp_path):
    """`d3fast distill --preset imagenet64-ipc1 --data-path <tree>` on a tree in the official
    format, shrunk to a few seconds a subtask: prepare, 5 subtasks (each its experts and run),
    the labelling expert on all 1,000 classes, the merge with soft labels."""
    from d3fast.distilled import Merged
    from d3fast.run import Run

    write_imagenet64_tree(tmp_path / "tree")
    tiny = ["experts.num_experts=1", "experts.epochs=2", "distill.max_start_epoch=1", "distill.expert_epochs=1",
            "distill.soft_label_epoch=1", "distill.mmd_samples=2", "net.width=8", "distill.syn_steps=1",
            "distill.batch_syn=20", "device=cpu"]
    res = CliRunner().invoke(cli, ["distill", "--preset", "imagenet64-ipc1", "--data-path", str(tmp_path / "tree"),
                                   "--runs-dir", str(tmp_path / "runs"), "--steps", "1",
                                   *[x for t in tiny for x in ("--set", t)]])
    assert res.exit_code == 0, res.output
    out = tmp_path / "runs" / "imagenet64" / "imagenet64-ipc1-merged"
    d, _ = Run(out).load_distilled()
    assert isinstance(d, Merged) and len(d.parts) == 5 and d.num_classes == 1000
    assert d.soft_labels is not None and d.soft_labels.shape == (1000, 1000)
    assert d.parts[0].meta["decoder"] == "small" and d.parts[0].meta["decoder_width"] == 256
    # evaluation of merged objects with soft labels: tests/test_subtasks.py, tests/test_soft_labels.py
