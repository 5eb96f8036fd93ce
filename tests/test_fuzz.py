"""Property tests over everything d3fast parses from disk or the command line: whatever the
bytes or values, the result is either correct or a D3FastError, never another exception
(which the CLI would show as a crash)."""

from __future__ import annotations

import gzip
import io
import json
import pickle
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from d3fast.config import Config, apply_updates, parse_overrides, resolve_config
from d3fast.data import readers
from d3fast.data.cache import load_split
from d3fast.errors import D3FastError
from d3fast.io import save_tensors
from d3fast.paths import data_dir
from d3fast.state import load_checkpoint
from d3fast.trajectories import ExpertBank, read_expert, read_expert_meta, write_expert

# parsers only: nothing here depends on the C++ extension, so the D3FAST_PUREPYTHON pass skips it
pytestmark = pytest.mark.slow

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# JSON-like values, what a hand-edited or damaged file may hold
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def _ok_or_d3fast_error(fn, *args):
    try:
        return fn(*args)
    except D3FastError:
        return None


@pytest.fixture
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


# ---- IDX (Fashion-MNIST)

@SETTINGS
@given(data=st.binary(max_size=200), gz=st.booleans())
def test_idx_arbitrary_bytes(scratch, data, gz):
    path = scratch / ("f.idx.gz" if gz else "f.idx")
    path.write_bytes(gzip.compress(data) if gz else data)
    _ok_or_d3fast_error(readers.read_idx, path)


@SETTINGS
@given(dims=st.lists(st.integers(0, 2**32 - 1), max_size=5), body=st.binary(max_size=64), kind=st.sampled_from([8, 9, 13]))
def test_idx_headers(scratch, dims, body, kind):
    path = scratch / "h.idx"
    path.write_bytes(bytes([0, 0, kind, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims) + body)
    out = _ok_or_d3fast_error(readers.read_idx, path)
    if out is not None:
        assert list(out.shape) == dims and out.dtype == np.uint8


def test_idx_not_gzip_but_named_gz(scratch):
    path = scratch / "x.gz"
    path.write_bytes(b"\x1f\x8b" + b"\x00" * 30)  # a gzip magic with a broken stream
    with pytest.raises(D3FastError):
        readers.read_idx(path)


# ---- CIFAR-10 batches

@SETTINGS
@given(data=st.binary(max_size=400))
def test_cifar_pickle_arbitrary_bytes(scratch, data):
    path = scratch / "data_batch_1"
    path.write_bytes(data)
    _ok_or_d3fast_error(readers._load_cifar_pickle, path)


@SETTINGS
@given(batch=st.dictionaries(st.sampled_from([b"data", b"labels", "data", "labels", b"x"]), json_values, max_size=3))
def test_cifar_pickle_arbitrary_structures(scratch, batch):
    path = scratch / "data_batch_1"
    path.write_bytes(pickle.dumps(batch, protocol=2))
    out = _ok_or_d3fast_error(readers._load_cifar_pickle, path)
    if out is not None:
        x, y = out
        assert x.shape[1:] == (3, 32, 32) and x.dtype == np.uint8 and len(x) == len(y)


@SETTINGS
@given(n=st.integers(0, 3), extra=st.integers(0, 3072))
def test_cifar_binary_sizes(scratch, n, extra):
    path = scratch / "data_batch_1.bin"
    path.write_bytes(bytes(3073 * n + extra))
    out = _ok_or_d3fast_error(readers._load_cifar_bin, path)
    if out is not None:
        assert out[0].shape == (n, 3, 32, 32)


# ---- expert trajectories

@SETTINGS
@given(data=st.binary(max_size=300))
def test_expert_arbitrary_bytes(scratch, data):
    path = scratch / "expert_0000.safetensors"
    path.write_bytes(data)
    _ok_or_d3fast_error(read_expert_meta, path)
    _ok_or_d3fast_error(read_expert, path)


expert_keys = ["epochs_done", "complete", "history", "row_crc32", "index", "seed", "param_layout", "test_acc",
               "snapshots_per_epoch"]


@SETTINGS
@given(meta=st.dictionaries(st.sampled_from(expert_keys), json_values | st.integers(0, 5), max_size=8),
       fmt=st.sampled_from([1, 1, 1, 2, "1"]))
def test_expert_arbitrary_headers(scratch, meta, fmt):
    path = scratch / "expert_0000.safetensors"
    save_tensors(path, {"trajectory": torch.zeros(3, 4)}, {"format": fmt, **meta})
    if _ok_or_d3fast_error(read_expert_meta, path) is not None:
        bank = _ok_or_d3fast_error(ExpertBank, scratch, 1)
        if bank is not None and len(bank):
            _ok_or_d3fast_error(bank.rows, 0, [0, -1])
            _ok_or_d3fast_error(bank.rows, 0, [_ok_or_d3fast_error(bank.snapshot, 0.5) or 0])


def test_expert_row_flip_is_caught(scratch):
    path = scratch / "expert_0000.safetensors"
    traj = torch.arange(12.0).view(3, 4)
    write_expert(path, traj, index=0, seed=0, complete=True, test_acc=None, history=[], param_layout=[])
    raw = bytearray(path.read_bytes())
    raw[-4:] = b"\x00\x00\x80\x7f"  # the last value of the last row becomes inf
    path.write_bytes(bytes(raw))
    with pytest.raises(D3FastError, match="fail their CRC check"):
        ExpertBank(scratch, 1).rows(0, [0, 2])
    assert torch.equal(ExpertBank(scratch, 1).rows(0, [0])[0], traj[0])  # intact rows still read


# ---- checkpoints

@SETTINGS
@given(data=st.binary(max_size=400))
def test_checkpoint_arbitrary_bytes(scratch, data):
    path = scratch / "checkpoint.pt"
    path.write_bytes(data)
    _ok_or_d3fast_error(load_checkpoint, path)


@SETTINGS
@given(obj=json_values)
def test_checkpoint_arbitrary_contents(scratch, obj):
    path = scratch / "checkpoint.pt"
    torch.save(obj, path)
    _ok_or_d3fast_error(load_checkpoint, path)
    torch.save({"format": 1, **obj} if isinstance(obj, dict) else {"format": 1, "step": obj}, path)
    _ok_or_d3fast_error(load_checkpoint, path)


def test_checkpoint_with_code_is_refused_without_unsafe_advice(scratch):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = scratch / "checkpoint.pt"
    torch.save({"format": 1, "x": Evil()}, path)
    with pytest.raises(D3FastError) as e:
        load_checkpoint(path)
    assert "do not load this file" in str(e.value) and "weights_only=False" not in str(e.value)


def test_checkpoint_in_place_overwrite_fails_its_crc(scratch):
    path = scratch / "checkpoint.pt"
    torch.save({"format": 1, "opt": torch.ones(4096)}, path)
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(io.BytesIO(bytes(raw))) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("/data/0"))
    start = info.header_offset + 30 + len(info.filename) + len(info.extra) + 64
    raw[start : start + 16] = b"\x55" * 16  # same size, 16 bytes of the tensor changed
    path.write_bytes(bytes(raw))
    with pytest.raises(D3FastError, match="fails its CRC check"):
        load_checkpoint(path)


# ---- config overrides and run configs

override_text = st.text(alphabet=st.sampled_from(list("abcdefghijklmnopqrstuvwxyz_.=-+0123456789eE[],\" nain")), max_size=40)


@SETTINGS
@given(items=st.lists(override_text, max_size=4))
def test_overrides_arbitrary_text(items):
    cfg = _ok_or_d3fast_error(resolve_config, "digits", None, items)
    if cfg is not None:
        assert isinstance(cfg, Config)


@SETTINGS
@given(key=st.sampled_from(["distill.steps", "distill.lr_latent", "distill.mmd_bandwidths", "data.zca_eps",
                            "eval.archs", "net.width", "augment.prob_flip", "experts.seed", "distill.amp"]),
       value=json_values)
def test_overrides_arbitrary_typed_values(key, value):
    section, name = key.split(".")
    _ok_or_d3fast_error(resolve_config, "digits", None, (), {section: {name: value}})


@SETTINGS
@given(doc=json_values)
def test_run_config_arbitrary_json(doc):
    _ok_or_d3fast_error(apply_updates, Config(), doc, "", False)


def _config_keys() -> list[str]:
    import dataclasses

    cfg = Config()
    keys = []
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        keys += [f"{f.name}.{g.name}" for g in dataclasses.fields(v)] if dataclasses.is_dataclass(v) else [f.name]
    return keys


CONFIG_KEYS = _config_keys()


@SETTINGS
@given(sets=st.lists(st.tuples(st.sampled_from(CONFIG_KEYS + ["distill", "net", "x"]),
                                st.sampled_from(["", ".x", ".steps", ".", ".0"]), override_text), max_size=3),
       timeout=st.text(alphabet=st.sampled_from(list("0123456789.-+eEnaif x")), max_size=8))
def test_the_command_line_and_the_api_take_any_setting(sets, timeout):
    """Issue 32: what the CLI (`d3fast config`, which resolves as every command does) and the
    Python API's `set` do with real keys, sections, value keys given sections and random
    values, and the collective timeout's variable: a result or one `error:` line, never
    "unexpected" (a crash)."""
    import os
    from unittest import mock

    from click.testing import CliRunner

    from d3fast.api import _sets
    from d3fast.cli import cli

    args = ["config", "--dataset", "digits"]
    for key, suffix, value in sets:
        args += ["--set", f"{key}{suffix}={value}"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code in (0, 2) and "unexpected" not in r.output, (args, r.output)
    from d3fast.dist import timeout_s

    with mock.patch.dict(os.environ, {"D3FAST_DIST_TIMEOUT": timeout}):
        value = _ok_or_d3fast_error(timeout_s)
    assert value is None or 0 < value <= 1e9
    nested: dict = {}
    for key, suffix, value in sets:
        node = nested
        *path, leaf = f"{key}{suffix}".split(".")
        for part in path:
            node = node.setdefault(part, {}) if isinstance(node.get(part, {}), dict) else {}
        node[leaf] = value
    _ok_or_d3fast_error(lambda: resolve_config("digits", None, _sets(nested)))


def test_parse_overrides_shapes():
    assert parse_overrides(["a.b=1", "a.c= x "]) == {"a": {"b": "1", "c": "x"}}
    with pytest.raises(D3FastError):
        parse_overrides(["novalue"])


# ---- dataset cache manifests

@SETTINGS
@given(doc=json_values)
def test_cache_manifest_arbitrary_json(d3fast_home, doc):
    cache = data_dir("digits")
    cache.mkdir(parents=True, exist_ok=True)
    (cache / "manifest.json").write_text(json.dumps(doc))
    for mmap in (True, False):
        _ok_or_d3fast_error(load_split, "digits", "train", mmap)


@SETTINGS
@given(data=st.binary(max_size=200))
def test_cache_manifest_arbitrary_bytes(d3fast_home, data):
    cache = data_dir("digits")
    cache.mkdir(parents=True, exist_ok=True)
    Path(cache / "manifest.json").write_bytes(data)
    _ok_or_d3fast_error(load_split, "digits", "train", True)


def _valid_state() -> dict:
    from d3fast.config import DistillConfig
    from d3fast.distilled import init_distilled
    from d3fast.state import TrainState

    meta = {"resolution": 8, "channels": 1, "mean": [0.5], "std": [0.25], "z_dim": 4, "decoder": "paper",
            "decoder_width": 4}
    d = init_distilled(2, 1, ["a", "b"], meta, 0.01, torch.device("cpu"), 0)
    return TrainState.create(d, DistillConfig(), torch.device("cpu")).state_dict()


STATE_KEYS = sorted(_valid_state())


@SETTINGS
@given(key=st.sampled_from(STATE_KEYS), value=json_values | st.just("drop"),
       meta_key=st.sampled_from(["resolution", "channels", "mean", "z_dim", "decoder", "decoder_width",
                                "decoder_linear", None]))
def test_checkpoint_with_one_field_damaged(scratch, key, value, meta_key):
    from d3fast.run import Run

    state = _valid_state()
    if meta_key is not None and key == "meta":
        meta = json.loads(state["meta"])
        meta[meta_key] = value
        state["meta"] = json.dumps(meta)
    elif value == "drop":
        del state[key]
    else:
        state[key] = value
    run = Run.at(scratch / "run")
    torch.save(state, run.checkpoint_path)
    out = _ok_or_d3fast_error(run.load_distilled)
    if out is not None:
        d, step = out
        assert len(d.latents) == 2 and step >= 0


# ---- local Hugging Face datasets (d3fast/data/hf.py)

HF_JSON = ["dataset_dict.json", "train/state.json", "train/dataset_info.json", "test/state.json"]


def _hf_read(root):
    """find_layout, the labels and every image batch of a folder (what prepare reads)."""
    from d3fast.data import hf

    layout = hf.find_layout(root)
    for shards in layout.splits.values():
        for shard in shards:
            y = hf.read_labels(layout, shard)
            assert y.dtype == np.int64 and len(y) == shard.rows and ((0 <= y) & (y < len(layout.classes))).all()
            assert sum(len(b) for b in hf.iter_images(layout, shard, 4)) == shard.rows
    return layout


@SETTINGS
@given(which=st.sampled_from(HF_JSON), doc=json_values)
def test_hf_side_files_arbitrary_json(scratch, which, doc):
    from tests.test_hf_datasets import TEST, TRAIN, write_save_to_disk

    root = write_save_to_disk(scratch / "dd", splits=(("train", TRAIN[:3]), ("test", TEST[:3])), metadata=False)
    (root / which).write_text(json.dumps(doc))
    layout = _ok_or_d3fast_error(_hf_read, root)
    if layout is not None:
        assert all(isinstance(c, str) for c in layout.classes) and len(set(layout.classes)) == len(layout.classes)


@SETTINGS
@given(doc=json_values, label=st.sampled_from(["label", "labels"]))
def test_hf_schema_metadata_arbitrary_json(scratch, doc, label):
    import pyarrow.parquet as pq

    from tests.test_hf_datasets import TEST, TRAIN, _table

    root = scratch / "pq"
    for split, rows in (("train", TRAIN[:3]), ("test", TEST[:3])):
        (root / "data").mkdir(parents=True, exist_ok=True)
        table = _table(rows, label=label, metadata=False).replace_schema_metadata(
            {"huggingface": json.dumps({"info": {"features": {label: doc}}})})
        pq.write_table(table, root / "data" / f"{split}-00000-of-00001.parquet")
    layout = _ok_or_d3fast_error(_hf_read, root)
    if layout is not None:
        # a ClassLabel's names, or "0".."C-1" from its num_classes alone
        assert layout.classes in (doc.get("names"), [str(i) for i in range(len(layout.classes))])
        assert layout.classes == doc.get("names") or doc.get("num_classes") == len(layout.classes)


@SETTINGS
@given(data=st.binary(max_size=300), kind=st.sampled_from(["data/train-00000-of-00001.parquet",
                                                           "train/data-00000-of-00002.arrow"]))
def test_hf_shards_arbitrary_bytes(scratch, data, kind):
    from tests.test_hf_datasets import TEST, TRAIN, write_parquet, write_save_to_disk

    root = scratch / kind.split("/")[0]
    shutil.rmtree(root, ignore_errors=True)
    if kind.endswith(".parquet"):
        write_parquet(root, "hub", test_name="test")
        for p in (root / "data").glob("train-*"):
            p.unlink()
    else:
        write_save_to_disk(root, splits=(("train", TRAIN[:3]), ("test", TEST[:3])))
    (root / kind).write_bytes(data)
    _ok_or_d3fast_error(_hf_read, root)


@SETTINGS
@given(text=st.text(alphabet=st.sampled_from(list("-: '\"\n0123456789abnmes_")), max_size=300))
def test_hf_dataset_card_arbitrary_text(scratch, text):
    from d3fast.data.hf import _readme_names

    path = scratch / "README.md"
    path.write_text("---\ndataset_info:\n  features:\n  - name: label\n" + text)
    names = _readme_names(path, None)
    assert all(isinstance(v, list) and all(isinstance(n, str) for n in v) for v in names.values())
