"""FFCV betons: written from a generated JPEG tree in the ImageNet layout, read back through
the test and train pipelines, compared with the uint8 cache; the fallback and bad files."""

from __future__ import annotations

import pytest
import torch

from d3fast.config import resolve_config
from d3fast.data import beton
from d3fast.data.cache import load_split
from d3fast.data.loader import DeviceDataset, load_dataset, open_split
from d3fast.data.prepare import prepare
from d3fast.errors import D3FastError
from tests._utils import make_imagenet_tree

needs_ffcv = pytest.mark.skipif(not beton.ffcv_status()[0], reason=f"FFCV: {beton.ffcv_status()[1]}")


def cfg(tmp_path, *extra):
    return resolve_config("imagenette", overrides=[f"data.data_path={tmp_path / 'tree'}", "data.workers=1", *extra])


@pytest.fixture
def tree(tmp_path):
    # 10 classes x (5 train, 3 val), 200x150 JPEGs: odd counts, so batches do not divide them
    make_imagenet_tree(tmp_path / "tree", n_train=5, n_val=3)
    prepare(cfg(tmp_path), progress=False)
    return tmp_path


@needs_ffcv
def test_raw_beton_test_pipeline_equals_the_cache(tree):
    status, man = beton.write_betons("imagenette", "raw", workers=1, progress=False)
    assert status == "written" and man["counts"] == {"train": 50, "test": 30}
    ds = open_split(cfg(tree, "data.loader=ffcv"), "test", torch.device("cpu"))
    assert isinstance(ds, beton.BetonDataset) and len(ds) == 30
    cache = load_dataset("imagenette", "test")
    xs, ys = zip(*ds.batches(7, shuffle=False), strict=True)
    x, y = torch.cat(xs), torch.cat(ys)
    # the same normalised pixels and labels, in the same order: the center crop at ratio 1
    # of a 128x128 image is the image
    assert torch.equal(y, cache.labels)
    assert torch.equal(x, cache.normalize(cache.images))
    assert beton.write_betons("imagenette", "raw", workers=1, progress=False)[0] == "reused"


@needs_ffcv
def test_train_pipeline_crops_flips_and_shuffles(tree):
    beton.write_betons("imagenette", "jpg", jpeg_quality=90, workers=1, progress=False)
    threads = torch.get_num_threads()
    ds = open_split(cfg(tree, "data.loader=ffcv"), "train", torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    xs, ys = zip(*ds.batches(16, shuffle=True, generator=g), strict=True)
    x, y = torch.cat(xs), torch.cat(ys)
    assert x.shape == (50, 3, 128, 128) and x.dtype == torch.float32
    cache = load_dataset("imagenette", "train")
    # every label once: a permutation of the split
    assert torch.equal(torch.sort(y).values, torch.sort(cache.labels).values)
    assert not torch.equal(y, cache.labels)
    # ffcv sets torch's thread count on import and per epoch; the process keeps its own
    assert torch.get_num_threads() == threads
    # random resized crops: not the stored images, but the same value range
    assert not torch.allclose(x, cache.normalize(cache.images)[: len(x)])
    lo, hi = cache.normalize(cache.images).min(), cache.normalize(cache.images).max()
    # resized crops interpolate between stored pixels (uint8, then normalised elementwise): within
    # the stored range up to the interpolation's float32 rounding, ~1e-6
    assert lo - 1e-4 <= x.min() and x.max() <= hi + 1e-4


@needs_ffcv
def test_damaged_or_stale_betons_are_refused(tree):
    beton.write_betons("imagenette", "raw", workers=1, progress=False)
    path = beton.beton_dir("imagenette") / "train.beton"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(D3FastError, match="truncated or damaged"):
        open_split(cfg(tree, "data.loader=ffcv"), "train", torch.device("cpu"))
    path.write_bytes(data[:-64] + bytes(64))
    with pytest.raises(D3FastError, match="sha256"):
        beton.check_betons("imagenette")
    # a rewrite with --force repairs it
    assert beton.write_betons("imagenette", "raw", workers=1, force=True, progress=False)[0] == "written"
    assert beton.check_betons("imagenette")["counts"]["train"] == 50


def test_auto_falls_back_to_the_cache_and_ffcv_explains(tree, monkeypatch, capsys):
    monkeypatch.setattr(beton, "ffcv_status", lambda: (False, "ffcv is not installed"))
    monkeypatch.setattr(beton, "_noted", set())
    ds = open_split(cfg(tree), "train", torch.device("cpu"))
    assert isinstance(ds, DeviceDataset)
    open_split(cfg(tree), "test", torch.device("cpu"))
    assert capsys.readouterr().out.count("uint8 cache") == 1  # said once
    with pytest.raises(D3FastError, match="pip install -e .\\[ffcv\\]"):
        open_split(cfg(tree, "data.loader=ffcv"), "train", torch.device("cpu"))
    with pytest.raises(D3FastError, match="needs FFCV"):
        beton.write_betons("imagenette")


def test_ffcv_is_for_rgb_datasets_and_needs_its_files(tree):
    with pytest.raises(D3FastError, match="RGB datasets"):
        beton.write_betons("digits")
    if beton.ffcv_status()[0]:
        with pytest.raises(D3FastError, match="prepare --dataset imagenette --format ffcv"):
            open_split(cfg(tree, "data.loader=ffcv"), "train", torch.device("cpu"))
    assert load_split("imagenette", "train")[0].shape == (50, 3, 128, 128)


@needs_ffcv
def test_experts_stream_from_ffcv_into_their_own_directory(tree):
    from d3fast.preflight import resolve_data_loader
    from d3fast.recipes.experts import run_experts
    from d3fast.trajectories import experts_dir, read_expert_meta

    beton.write_betons("imagenette", "raw", workers=1, progress=False)
    small = ["net.width=8", "experts.num_experts=1", "experts.epochs=2", "experts.batch_size=16"]
    c_ffcv, c_cache = cfg(tree, "data.loader=ffcv", *small), cfg(tree, "data.loader=cache", *small)
    assert experts_dir(c_ffcv) != experts_dir(c_cache)
    c_auto = cfg(tree, *small)
    assert resolve_data_loader(c_auto) == "ffcv" and c_auto.data.loader == "ffcv"  # auto picks the betons
    assert experts_dir(c_auto) == experts_dir(c_ffcv)
    res = run_experts(c_ffcv, progress=False)
    meta = read_expert_meta(res.out_dir / "expert_0000.safetensors")
    assert meta["complete"] and meta["epochs_done"] == 2 and 0.0 <= meta["test_acc"] <= 1.0
    assert [h["epoch"] for h in meta["history"]] == [1, 2]


@needs_ffcv
def test_writing_betons_keeps_the_experts_of_an_existing_config(tree):
    """The issue's case: experts trained from the cache, then `prepare --format ffcv`; the same
    command must find the same experts directory, not start a second set."""
    from click.testing import CliRunner

    from d3fast.cli import cli
    from d3fast.preflight import resolve_data_loader
    from d3fast.recipes.experts import run_experts
    from d3fast.trajectories import experts_dir

    small = ["net.width=8", "experts.num_experts=1", "experts.epochs=1", "experts.batch_size=16"]
    before = cfg(tree, *small)
    assert resolve_data_loader(before) == "cache"  # no betons yet
    run_experts(before, progress=False)
    res = CliRunner().invoke(cli, ["prepare", "--dataset", "imagenette", "--data-path", str(tree / "tree"),
                                   "--format", "ffcv", "--workers", "1"])
    assert res.exit_code == 0 and "FFCV" in res.output, res.output
    after = cfg(tree, *small)
    assert resolve_data_loader(after) == "cache"  # the trained experts win over the new betons
    assert experts_dir(after) == experts_dir(before)
    # with no experts of this config yet, auto takes the betons
    other = cfg(tree, *small, "experts.seed=7")
    assert resolve_data_loader(other) == "ffcv"
