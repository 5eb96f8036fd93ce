"""Dataset readers on generated trees in the real layouts, the cache, and bad inputs."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from d3fast.config import resolve_config
from d3fast.data.cache import load_split
from d3fast.data.datasets import IMAGENETTE, IMAGEWOOF
from d3fast.data.prepare import prepare
from d3fast.errors import D3FastError
from tests._utils import (
    make_cifar10,
    make_cifar100,
    make_fashion_mnist,
    make_imagenet_tree,
    make_tinyimagenet,
    reference_decode,
    write_idx,
    write_jpeg,
)


def cfg_for(dataset, path=None, **data):
    overrides = [f"data.{k}={v}" for k, v in data.items()]
    if path is not None:
        overrides.append(f"data.data_path={path}")
    return resolve_config(dataset, overrides=overrides)


# ------------------------------------------------------------------ ImageNet subsets


@pytest.mark.parametrize("layout", ["fastai", "imagenet-1k"])
def test_imagenette_layouts(tmp_path, layout):
    extra = ("n01530575", "n09999999") if layout == "imagenet-1k" else ()
    root = make_imagenet_tree(tmp_path / "imagenette2", extra_wnids=extra)
    res = prepare(cfg_for("imagenette", tmp_path), progress=False)  # parent folder is found too
    m = res.manifest
    assert res.status == "prepared" and m["source"]["layout"] == layout
    assert m["splits"]["train"]["per_class"] == [3] * 10
    assert m["splits"]["test"]["per_class"] == [2] * 10
    assert m["class_ids"] == [c[0] for c in IMAGENETTE]
    x, y, _ = load_split("imagenette", "train")
    assert x.shape == (30, 3, 128, 128) and x.dtype == np.uint8
    # label i <-> the i-th wnid; images in sorted file order within a class
    files = sorted((root / "train" / IMAGENETTE[4][0]).iterdir())
    i = int(np.flatnonzero(y == 4)[1])
    ref = reference_decode(files[1]).astype(int)
    # draft-mode JPEG decoding differs from a full decode by a few grey levels only;
    # a wrong crop or a channel swap would be off by tens
    assert np.abs(x[i].astype(int) - ref).mean() < 3.0
    assert x[i, 0, :, :20].mean() > 200  # the red band is on the left


def test_imagewoof_label_order(tmp_path):
    make_imagenet_tree(tmp_path, classes=IMAGEWOOF, n_train=1, n_val=1)
    m = prepare(cfg_for("imagewoof", tmp_path), progress=False).manifest
    assert m["class_ids"][0] == "n02096294" and m["classes"][0] == "Australian terrier"
    assert m["class_ids"] == [c[0] for c in IMAGEWOOF]


def test_parallel_decode_matches_serial(tmp_path, d3fast_home):
    make_imagenet_tree(tmp_path / "tree", n_train=4, n_val=1)
    cfg = cfg_for("imagenette", tmp_path / "tree", workers=2)
    prepare(cfg, progress=False, parallel_min_files=10**9)
    serial = load_split("imagenette", "train")[0].copy()
    res = prepare(cfg, force=True, progress=False, parallel_min_files=1)
    assert res.decoded == 50
    np.testing.assert_array_equal(load_split("imagenette", "train")[0], serial)


def test_missing_and_empty_class_folders(tmp_path):
    root = make_imagenet_tree(tmp_path, n_train=1, n_val=1)
    os.rename(root / "train" / IMAGENETTE[3][0], tmp_path / "moved")
    for f in (root / "val" / IMAGENETTE[5][0]).iterdir():
        f.unlink()
    with pytest.raises(D3FastError) as e:
        prepare(cfg_for("imagenette", root), progress=False)
    msg = str(e.value)
    assert f"missing class folder {root / 'train' / IMAGENETTE[3][0]}" in msg
    assert f"{root / 'val' / IMAGENETTE[5][0]} (French horn) is empty" in msg


def test_wrong_path_and_layout(tmp_path):
    with pytest.raises(D3FastError, match="does not exist"):
        prepare(cfg_for("imagenette", tmp_path / "nope"), progress=False)
    (tmp_path / "random").mkdir()
    with pytest.raises(D3FastError, match="no train/ folder"):
        prepare(cfg_for("imagenette", tmp_path / "random"), progress=False)
    with pytest.raises(D3FastError, match="not a CIFAR-10 folder"):
        prepare(cfg_for("cifar10", tmp_path / "random"), progress=False)


def test_flat_imagenet_val_is_explained(tmp_path):
    root = make_imagenet_tree(tmp_path, n_train=1, n_val=0)
    (root / "val").mkdir()
    write_jpeg(root / "val" / "ILSVRC2012_val_00000001.JPEG", 50, 40, 1)
    with pytest.raises(D3FastError, match="valprep"):
        prepare(cfg_for("imagenette", root), progress=False)


def test_corrupt_truncated_and_non_image_files(tmp_path, d3fast_home):
    root = make_imagenet_tree(tmp_path, n_train=2, n_val=1)
    cls = root / "train" / IMAGENETTE[0][0]
    good = sorted(cls.iterdir())[0].read_bytes()
    (cls / "garbage.JPEG").write_bytes(os.urandom(2000))
    (cls / "truncated.JPEG").write_bytes(good[: len(good) // 2])
    (cls / "notes.txt").write_text("not an image")
    (cls / ".DS_Store").write_bytes(b"\0\0")  # hidden files are ignored
    with pytest.raises(D3FastError) as e:
        prepare(cfg_for("imagenette", root), progress=False)
    msg = str(e.value)
    assert msg.startswith("3 file(s) could not be decoded")
    for name in ("garbage.JPEG", "truncated.JPEG", "notes.txt"):
        assert str(cls / name) in msg
    assert "--skip-corrupt" in msg
    assert not (d3fast_home / "data" / "imagenette").exists()  # nothing half-written
    listing = (d3fast_home / "data" / "imagenette.corrupt.txt").read_text()
    assert len(listing.splitlines()) == 3

    res = prepare(cfg_for("imagenette", root, skip_corrupt="true"), progress=False)
    m = res.manifest
    assert m["splits"]["train"]["per_class"] == [2] * 10
    assert sorted(os.path.basename(s["path"]) for s in m["skipped"]) == ["garbage.JPEG", "notes.txt", "truncated.JPEG"]
    x, y, _ = load_split("imagenette", "train")
    assert len(x) == len(y) == 20
    # the surviving rows are the good images, in order
    ref = reference_decode(sorted(cls.glob("n*.JPEG"))[0]).astype(int)
    assert np.abs(x[0].astype(int) - ref).mean() < 3.0


def test_class_with_only_corrupt_images_fails_even_when_skipping(tmp_path):
    root = make_imagenet_tree(tmp_path, n_train=1, n_val=1)
    cls = root / "train" / IMAGENETTE[2][0]
    for f in cls.iterdir():
        f.write_bytes(b"broken")
    with pytest.raises(D3FastError, match="no readable images for class.*cassette player"):
        prepare(cfg_for("imagenette", root, skip_corrupt="true"), progress=False)


# ------------------------------------------------------------------ the cache


def test_cache_reuse_and_invalidation(tmp_path, d3fast_home):
    root = make_imagenet_tree(tmp_path, n_train=1, n_val=1)
    cfg = cfg_for("imagenette", root)
    assert prepare(cfg, progress=False).status == "prepared"
    assert prepare(cfg, progress=False).status == "reused"
    write_jpeg(root / "train" / IMAGENETTE[0][0] / "new.JPEG", 90, 90, 77)
    res = prepare(cfg, progress=False)
    assert res.status == "prepared" and res.manifest["splits"]["train"]["count"] == 11
    # a damaged cache file is noticed by its hash and rebuilt
    path = d3fast_home / "data" / "imagenette" / "train_x.npy"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    assert prepare(cfg, progress=False).status == "prepared"
    assert prepare(cfg, progress=False).status == "reused"


def test_truncated_cache_gives_clear_error(tmp_path, d3fast_home):
    prepare(cfg_for("digits"), progress=False)
    path = d3fast_home / "data" / "digits" / "train_x.npy"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(D3FastError, match="prepare --dataset digits --force"):
        load_split("digits", "train")


def test_unprepared_dataset_error():
    with pytest.raises(D3FastError, match="not prepared: run `d3fast prepare --dataset cifar10`"):
        load_split("cifar10", "train")


# ------------------------------------------------------------------ TinyImageNet


def test_tinyimagenet(tmp_path):
    base = make_tinyimagenet(tmp_path)
    m = prepare(cfg_for("tinyimagenet", tmp_path), progress=False).manifest
    assert m["class_ids"] == sorted(["n01443537", "n01629819", "n01641577"])
    assert m["classes"][0] == "thing 0"
    assert m["splits"]["train"]["per_class"] == [4, 4, 4]
    assert m["splits"]["test"]["per_class"] == [3, 3, 3]
    x, y, _ = load_split("tinyimagenet", "test")
    # val labels come from val_annotations.txt: val_k has class k % 3 (wnids sorted = given)
    assert y.tolist() == [k % 3 for k in range(9)]
    # 64x64 sources decode without resizing: bit-exact against PIL
    ref = np.asarray(Image.open(base / "val" / "images" / "val_4.JPEG").convert("RGB")).transpose(2, 0, 1)
    np.testing.assert_array_equal(x[4], ref)


def test_tinyimagenet_bad_annotations(tmp_path):
    base = make_tinyimagenet(tmp_path)
    ann = base / "val" / "val_annotations.txt"
    ann.write_text(ann.read_text() + "val_99.JPEG\tn01443537\t0\t0\t1\t1\n")
    with pytest.raises(D3FastError, match="val_99.JPEG, which does not exist"):
        prepare(cfg_for("tinyimagenet", base), progress=False)
    ann.unlink()
    with pytest.raises(D3FastError, match="val_annotations.txt is missing"):
        prepare(cfg_for("tinyimagenet", base), progress=False)


# ------------------------------------------------------------------ Fashion-MNIST


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_idx(tmp_path, gz):
    data = make_fashion_mnist(tmp_path / "fm", gz=gz)
    m = prepare(cfg_for("fashion-mnist", tmp_path / "fm"), progress=False).manifest
    assert m["resolution"] == 28 and m["channels"] == 1
    x, y, _ = load_split("fashion-mnist", "train")
    np.testing.assert_array_equal(x[:, 0], data["train"][0])
    np.testing.assert_array_equal(y, data["train"][1])
    ref = data["train"][0] / 255.0
    # float64 statistics both ways over 23,520 pixels: rounding ~1e-12 in any order (measured: 4e-7 of 1e-9)
    assert m["mean"][0] == pytest.approx(ref.mean(), rel=1e-9)
    assert m["std"][0] == pytest.approx(ref.std(), rel=1e-9)


def test_fashion_mnist_bad_files(tmp_path):
    make_fashion_mnist(tmp_path, gz=False)
    images = tmp_path / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-50])
    with pytest.raises(D3FastError, match="truncated"):
        prepare(cfg_for("fashion-mnist", tmp_path), progress=False)
    write_idx(images, np.zeros((29, 28, 28), np.uint8), gz=False)
    with pytest.raises(D3FastError, match="29 images but .* 30 labels"):
        prepare(cfg_for("fashion-mnist", tmp_path), progress=False)
    write_idx(images, np.zeros((30, 28, 28), np.uint8), gz=False)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(D3FastError, match="no t10k-labels-idx1-ubyte"):
        prepare(cfg_for("fashion-mnist", tmp_path), progress=False)
    (tmp_path / "bad.gz").write_bytes(b"not gzip at all")
    from d3fast.data.readers import read_idx

    with pytest.raises(D3FastError, match="corrupt or truncated"):
        read_idx(tmp_path / "bad.gz")


@pytest.mark.realdata
def test_real_fashion_mnist():
    path = "/usr/share/datasets/fashion-mnist"
    if not os.path.isdir(path):
        pytest.skip("dataset-fashion-mnist is not installed")
    m = prepare(cfg_for("fashion-mnist"), progress=False).manifest  # found without --data-path
    assert m["splits"]["train"]["per_class"] == [6000] * 10
    assert m["splits"]["test"]["per_class"] == [1000] * 10
    assert 0.28 < m["mean"][0] < 0.29 and 0.35 < m["std"][0] < 0.36  # the known statistics


# ------------------------------------------------------------------ CIFAR-10


@pytest.mark.parametrize("binary", [False, True])
def test_cifar10(tmp_path, binary):
    folder, batches = make_cifar10(tmp_path, binary=binary)
    m = prepare(cfg_for("cifar10", tmp_path), progress=False).manifest
    assert m["source"]["layout"] == ("cifar10-binary" if binary else "cifar10-python")
    x, y, _ = load_split("cifar10", "train")
    assert x.shape == (50, 3, 32, 32)
    np.testing.assert_array_equal(x[10:20].reshape(10, -1), batches["data_batch_2"][0])
    assert y[10:20].tolist() == batches["data_batch_2"][1]
    xt, yt, _ = load_split("cifar10", "test")
    np.testing.assert_array_equal(xt.reshape(10, -1), batches["test_batch"][0])
    assert yt.tolist() == batches["test_batch"][1]


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_cifar10_pickle_cannot_run_code(tmp_path, monkeypatch):
    folder, _ = make_cifar10(tmp_path)
    monkeypatch.chdir(tmp_path)
    with open(folder / "data_batch_3", "wb") as f:
        pickle.dump({b"data": _Evil(), b"labels": []}, f, protocol=2)
    with pytest.raises(D3FastError, match="refusing to load global"):
        prepare(cfg_for("cifar10", folder), progress=False)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("shape", ["deep", "wide"])
def test_a_pickle_that_expands_past_its_budget_is_refused_before_any_array(tmp_path, shape):
    # issue 32: a few hundred bytes of lists sharing references (the pickle memo) expand into
    # tens of GiB when np.asarray turns them into an array
    from d3fast.data.readers import MAX_PICKLED_ELEMENTS

    folder, _ = make_cifar10(tmp_path)
    if shape == "deep":  # 10^9 labels in three levels of 1,000 references
        a = [0] * 1000
        labels: list = [[a] * 1000] * 1000
    else:  # 25 million in two levels
        labels = [[0] * 5000] * 5000
    with open(folder / "data_batch_3", "wb") as f:
        pickle.dump({b"data": np.zeros((10, 3072), np.uint8), b"labels": labels}, f, protocol=2)
    assert (folder / "data_batch_3").stat().st_size < 64_000  # 30 KB of it the pixels
    why = "containers nested deeper than 3" if shape == "deep" else f"more than {MAX_PICKLED_ELEMENTS:,} elements"
    with pytest.raises(D3FastError, match=f"data_batch_3 is not a CIFAR-10 python batch \\(containers .*{why}|{why}"):
        prepare(cfg_for("cifar10", folder), progress=False)


class _Huge:
    """numpy's array builder asked for 300,000 x 3,072 bytes, none of them in the file."""

    def __reduce__(self):
        core = np._core if hasattr(np, "_core") else np.core
        return (core.multiarray._reconstruct, (np.ndarray, (300_000, 3072), np.dtype("u1")))


def test_a_pickled_array_larger_than_its_file_is_refused_before_allocating(tmp_path):
    # issue 32's breaker: a 32 KB hand-written batch made numpy allocate 0.9 GB per batch
    folder, _ = make_cifar10(tmp_path)
    with open(folder / "data_batch_2", "wb") as f:
        pickle.dump({b"data": _Huge(), b"labels": [0] * 10}, f, protocol=2)
    assert (folder / "data_batch_2").stat().st_size < 1000
    with pytest.raises(D3FastError, match=r"data_batch_2 is not a CIFAR-10 python batch \(an array of 921,600,000 "
                                          r"bytes in a file of \d+\)"):
        prepare(cfg_for("cifar10", folder), progress=False)


def test_cifar10_truncated_and_missing(tmp_path):
    folder, _ = make_cifar10(tmp_path, binary=True)
    p = folder / "data_batch_4.bin"
    p.write_bytes(p.read_bytes()[:-7])
    with pytest.raises(D3FastError, match="not a multiple of 3073"):
        prepare(cfg_for("cifar10", folder), progress=False)
    (folder / "test_batch.bin").unlink()
    with pytest.raises(D3FastError, match="missing CIFAR-10 files: test_batch.bin"):
        prepare(cfg_for("cifar10", folder), progress=False)
    folder2, _ = make_cifar10(tmp_path / "py")
    p = folder2 / "data_batch_1"
    p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(D3FastError, match="corrupt or truncated"):
        prepare(cfg_for("cifar10", folder2), progress=False)


# ------------------------------------------------------------------ CIFAR-100


@pytest.mark.parametrize("binary", [False, True])
def test_cifar100_fine_labels_and_names(tmp_path, binary):
    folder, data = make_cifar100(tmp_path, binary=binary)
    m = prepare(cfg_for("cifar100", tmp_path), progress=False).manifest
    assert m["source"]["layout"] == ("cifar100-binary" if binary else "cifar100-python")
    assert m["num_classes"] == 100 and m["classes"][:2] == ["fine0", "fine1"]
    for split in ("train", "test"):
        x, y, _ = load_split("cifar100", split)
        np.testing.assert_array_equal(x.reshape(len(x), -1), data[split][0])  # channel-major, as stored
        assert y.tolist() == data[split][1].tolist()  # the fine labels, not the coarse ones


def test_cifar100_bad_files(tmp_path, monkeypatch):
    folder, _ = make_cifar100(tmp_path / "bin", binary=True, names=False)
    m = prepare(cfg_for("cifar100", folder), progress=False).manifest
    assert m["classes"][:3] == ["0", "1", "2"]  # no fine_label_names.txt: numbered, with a note
    p = folder / "train.bin"
    p.write_bytes(p.read_bytes()[:-5])
    with pytest.raises(D3FastError, match="not a multiple of 3074 \\(2 labels \\+ 3072 pixels\\)"):
        prepare(cfg_for("cifar100", folder), progress=False)
    (folder / "test.bin").unlink()
    with pytest.raises(D3FastError, match="missing the CIFAR-100 file test.bin"):
        prepare(cfg_for("cifar100", folder), progress=False)
    py, _ = make_cifar100(tmp_path / "py")
    monkeypatch.chdir(tmp_path)
    with open(py / "train", "wb") as f:
        pickle.dump({b"data": _Evil(), b"fine_labels": []}, f, protocol=2)
    with pytest.raises(D3FastError, match="refusing to load global"):
        prepare(cfg_for("cifar100", py), progress=False)
    assert not (tmp_path / "pwned").exists()
    with open(py / "train", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [0, 100]}, f, protocol=2)
    with pytest.raises(D3FastError, match="fine labels outside 0..99"):
        prepare(cfg_for("cifar100", py), progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(D3FastError, match="is not a CIFAR-100 folder"):
        prepare(cfg_for("cifar100", tmp_path / "empty"), progress=False)


# ------------------------------------------------------------------ digits


def test_digits_embedded():
    m = prepare(cfg_for("digits"), progress=False).manifest
    tr, te = m["splits"]["train"], m["splits"]["test"]
    assert tr["count"] + te["count"] == 1797
    # stratified 80/20 per class
    for a, b in zip(tr["per_class"], te["per_class"], strict=False):
        assert b == (a + b) // 5
    x, _, _ = load_split("digits", "train")
    assert x.shape[1:] == (1, 32, 32) and x.max() > 200


# ------------------------------------------------------------------ any ImageFolder tree


def _tree(root, classes=("zebra", "ant", "moth"), test="val"):
    for split, n in (("train", 3), (test, 2)):
        for c, name in enumerate(classes):
            for i in range(n):
                write_jpeg(root / split / name / f"{i}.jpg", 40 + 7 * i, 30 + 5 * c, seed=100 * c + i)
    Image.new("LA", (20, 20), (50, 0)).save(root / "train" / classes[0] / "alpha.png")  # greyscale + alpha -> RGB
    return root


def test_imagefolder_any_tree_at_a_chosen_resolution(tmp_path, d3fast_home):
    from click.testing import CliRunner

    from d3fast.cli import cli

    root = _tree(tmp_path / "tree")
    png = Image.open(root / "train" / "zebra" / "0.jpg")
    png.save(root / "zebra0.png")
    png.save(root / "train" / "zebra" / "0.jpg", "PNG")  # Pillow reads by content, not by suffix
    r = CliRunner().invoke(cli, ["prepare", "--dataset", "imagefolder-bugs", "--data-path", str(root),
                                 "--resolution", "16"])
    assert r.exit_code == 0, r.output
    x, y, manifest = load_split("imagefolder-bugs", "train")
    assert manifest["classes"] == ["ant", "moth", "zebra"]  # sorted folder order, as torchvision's ImageFolder
    assert x.shape == (10, 3, 16, 16) and np.bincount(y).tolist() == [3, 3, 4]
    row = int(np.flatnonzero(y == 2)[0])  # zebra/0.jpg, whose PNG twin is decoded without JPEG's draft mode
    assert np.abs(x[row].astype(int) - reference_decode(root / "zebra0.png", 16).astype(int)).max() <= 1
    xt, yt, _ = load_split("imagefolder-bugs", "test")
    assert xt.shape == (6, 3, 16, 16) and np.bincount(yt).tolist() == [2, 2, 2]
    # once prepared, commands find it by name; ConvNet depth follows the resolution (16 px: 2 blocks)
    cfg = resolve_config("imagefolder-bugs")
    assert cfg.preset == "imagefolder" and cfg.data.dataset == "imagefolder-bugs"
    from d3fast.models import build_network

    assert len([m for m in build_network("convnet", 3, 3, 16).modules() if isinstance(m, torch.nn.Conv2d)]) == 2
    # another resolution of the same tree re-prepares when asked to (--force)
    res = prepare(cfg_for("imagefolder-bugs", root, resolution=32), force=True, progress=False)
    assert res.status == "prepared" and res.manifest["resolution"] == 32
    assert prepare(cfg_for("imagefolder-bugs"), progress=False).status == "reused"


def test_imagefolder_bad_trees(tmp_path, d3fast_home):
    with pytest.raises(D3FastError, match="choose the image size with --resolution"):
        prepare(cfg_for("imagefolder", _tree(tmp_path / "a")), progress=False)
    with pytest.raises(D3FastError, match="not a power of two"):
        cfg_for("imagefolder", tmp_path / "a", resolution=24)
    with pytest.raises(D3FastError, match="data.resolution chooses the size of imagefolder and hf datasets only"):
        cfg_for("cifar10", resolution=64)
    with pytest.raises(D3FastError, match="no train/ folder"):
        prepare(cfg_for("imagefolder", tmp_path, resolution=16), progress=False)
    (tmp_path / "b" / "train" / "cat").mkdir(parents=True)
    with pytest.raises(D3FastError, match="no val/ or test/ folder"):
        prepare(cfg_for("imagefolder", tmp_path / "b", resolution=16), progress=False)
    root = _tree(tmp_path / "c", test="test")
    (root / "test" / "dog").mkdir()
    with pytest.raises(D3FastError, match="class folders train/ lacks: dog"):
        prepare(cfg_for("imagefolder", root, resolution=16), progress=False)
    (root / "test" / "dog").rmdir()
    for f in (root / "test" / "moth").iterdir():
        f.unlink()
    with pytest.raises(D3FastError, match="no images in .*moth"):
        prepare(cfg_for("imagefolder", root, resolution=16), progress=False)
    with pytest.raises(D3FastError, match="not prepared: run `d3fast prepare --dataset imagefolder-x"):
        prepare(cfg_for("imagefolder-x"), progress=False)
    with pytest.raises(D3FastError, match="unknown dataset 'imagefolder_x'"):
        cfg_for("imagefolder_x")


def test_imagefolder_cache_is_not_swapped_silently(tmp_path, d3fast_home):
    root = _tree(tmp_path / "a")
    prepare(cfg_for("imagefolder-a", root, resolution=16), progress=False)
    with pytest.raises(D3FastError, match="prepared at 16 px.*--dataset imagefolder-a-32"):
        prepare(cfg_for("imagefolder-a", root, resolution=32), progress=False)
    assert prepare(cfg_for("imagefolder-a", root, resolution=32), force=True, progress=False).manifest["resolution"] == 32
    one = tmp_path / "one"
    for split in ("train", "val"):
        write_jpeg(one / split / "only" / "0.jpg", 20, 20, seed=0)
    with pytest.raises(D3FastError, match="at least 2 classes"):
        prepare(cfg_for("imagefolder-one", one, resolution=16), progress=False)


def test_decoding_is_bounded_by_the_header_not_by_pillows_warning(tmp_path, recwarn):
    # issue 32: what an image may decode to is read from its header first; a large JPEG that
    # draft mode reduces decodes (Pillow alone warned about its full size), a large PNG is
    # refused before its pixels are decoded
    from d3fast.data.decode import MAX_DECODED_PIXELS, decode_image

    side = int((MAX_DECODED_PIXELS * 1.2) ** 0.5)  # 1.2x the limit
    Image.new("RGB", (side, side), "gray").save(tmp_path / "big.jpg", quality=50)
    out = decode_image(str(tmp_path / "big.jpg"), 32, 3)  # drafted to 1/8 a side before decoding
    assert out.shape == (3, 32, 32) and abs(int(out.mean()) - 128) <= 2
    Image.new("L", (side, side)).save(tmp_path / "big.png")
    with pytest.raises(ValueError, match=f"{side}x{side} pixels to decode, more than the 64 MP limit"):
        decode_image(str(tmp_path / "big.png"), 32, 1)
    assert not [w for w in recwarn if "DecompressionBomb" in type(w.message).__name__]
