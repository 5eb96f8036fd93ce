"""Local Hugging Face datasets (`--dataset hf[-<label>]`): Parquet shards and save_to_disk
folders written here with pyarrow in the layouts the `datasets` library and the Hub write,
decoded against the imagefolder reader on the same images written as files, and every bad
layout refused with one line naming the file."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from d3fast.cli import cli
from d3fast.config import resolve_config
from d3fast.data.cache import load_split
from d3fast.data.prepare import prepare
from d3fast.errors import D3FastError
from tests._utils import OVERRIDES, photo, reference_decode

# label order of the features: not sorted, so a reader that sorted the names would be caught
CLASSES = ["zebra", "ant", "moth"]
IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def _features(image="image", label="label", names=CLASSES):
    return {image: {"_type": "Image"}, label: {"names": list(names), "_type": "ClassLabel"}}


def _rows(split, per_class):
    """[(encoded bytes, label)] of one split: odd sizes, PNG and JPEG, one greyscale image."""
    rows = []
    for c in range(len(CLASSES)):
        for i in range(per_class):
            seed = 1000 * (split == "test") + 10 * c + i
            im = photo(37 + 3 * i, 23 + 5 * c, seed)  # 37x23 and the like: odd, landscape and portrait
            if (c, i) == (1, 0):
                im = im.convert("L")
            buf = io.BytesIO()
            im.save(buf, "PNG" if i % 2 == 0 else "JPEG", quality=90)
            rows.append((buf.getvalue(), c))
    # interleave the classes, as a shuffled Hub split is
    return [rows[k] for k in np.random.default_rng(len(rows)).permutation(len(rows))]


TRAIN = _rows("train", 4)
TEST = _rows("test", 2)


def _table(rows, image="image", label="label", names=CLASSES, metadata=True, paths=None):
    images = pa.array([{"bytes": b, "path": None if paths is None else paths[i]} for i, (b, _) in enumerate(rows)],
                      IMAGE_TYPE)
    table = pa.table({image: images, label: pa.array([y for _, y in rows], pa.int64())})
    if metadata:
        info = {"info": {"features": _features(image, label, names)}}
        table = table.replace_schema_metadata({"huggingface": json.dumps(info)})
    return table


def _parquet(path, rows, row_group_size=3, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(_table(rows, **kw), path, row_group_size=row_group_size)


def write_parquet(root, layout, test_name="validation", **kw):
    """TRAIN in 2 shards and TEST in 1, in one of the Parquet layouts the Hub uses."""
    halves = [TRAIN[:7], TRAIN[7:]]
    for split, parts in (("train", halves), (test_name, [TEST])):
        for k, rows in enumerate(parts):
            name = {"hub": f"data/{split}-{k:05d}-of-{len(parts):05d}.parquet",
                    "flat": f"{split}-{k:05d}-of-{len(parts):05d}.parquet",
                    "split-dirs": f"{split}/{k:04d}.parquet",
                    "config": f"plain_text/{split}/{k:04d}.parquet"}[layout]
            _parquet(root / name, rows, **kw)
    return root


def _stream(path, tables):
    """An Arrow IPC stream of the tables' record batches, as save_to_disk writes shards."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, tables[0].schema) as writer:
        for t in tables:
            for batch in t.to_batches(max_chunksize=2):
                writer.write_batch(batch)


def write_save_to_disk(root, splits=(("train", TRAIN), ("test", TEST)), metadata=True, info=True):
    """DatasetDict.save_to_disk's layout: dataset_dict.json, per split 2 Arrow stream shards,
    state.json and dataset_info.json."""
    (root).mkdir(parents=True, exist_ok=True)
    (root / "dataset_dict.json").write_text(json.dumps({"splits": [s for s, _ in splits]}))
    for split, rows in splits:
        half = (len(rows) + 1) // 2
        names = []
        for k, part in enumerate((rows[:half], rows[half:])):
            name = f"data-{k:05d}-of-00002.arrow"
            _stream(root / split / name, [_table(part, metadata=metadata)])
            names.append({"filename": name})
        (root / split / "state.json").write_text(json.dumps({"_data_files": names, "_split": split,
                                                             "_fingerprint": "0" * 16}))
        if info:
            (root / split / "dataset_info.json").write_text(json.dumps({"features": _features(), "splits": {}}))
    return root


def oracle(tmp_path, rows_by_split, size=16):
    """The same bytes written as files of an ImageFolder tree, prepared by the imagefolder
    reader: (train x, test x) in the hf rows' order."""
    tree = tmp_path / "oracle"
    order = {}
    for split, folder in (("train", "train"), ("test", "val")):
        files = []
        for r, (b, y) in enumerate(rows_by_split[split]):
            path = tree / folder / CLASSES[y] / f"{r:03d}"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b)
            files.append((CLASSES[y], path.name, r))
        # imagefolder's rows: classes in sorted folder order, files sorted within each
        order[split] = [r for _, _, r in sorted(files)]
    prepare(resolve_config("imagefolder-oracle", overrides=[f"data.data_path={tree}", f"data.resolution={size}"]),
            progress=False)
    out = []
    for split in ("train", "test"):
        x, _, _ = load_split("imagefolder-oracle", split)
        back = np.empty_like(x)
        back[order[split]] = x
        out.append(back)
    return out


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def hf_prepare(root, name="hf-x", size=16):
    r = invoke("prepare", "--dataset", name, "--data-path", root, "--resolution", size)
    assert r.exit_code == 0, r.output
    return r


# ------------------------------------------------------------------ layouts that prepare


@pytest.mark.parametrize("layout", ["hub", "flat", "split-dirs", "config"])
def test_parquet_layouts_decode_like_the_imagefolder_reader(tmp_path, d3fast_home, layout):
    root = write_parquet(tmp_path / "ds", layout)
    hf_prepare(root)
    x, y, m = load_split("hf-x", "train")
    xt, yt, _ = load_split("hf-x", "test")
    assert m["classes"] == CLASSES  # the ClassLabel's names in label order, not sorted
    assert m["source"]["layout"] == "hf parquet (validation as test)"
    assert m["channels"] == 3 and m["resolution"] == 16
    assert y.tolist() == [c for _, c in TRAIN] and yt.tolist() == [c for _, c in TEST]
    assert m["splits"]["train"]["per_class"] == [4, 4, 4] and m["splits"]["test"]["per_class"] == [2, 2, 2]
    want_x, want_xt = oracle(tmp_path, {"train": TRAIN, "test": TEST})
    assert np.array_equal(x, want_x) and np.array_equal(xt, want_xt)
    # a PNG against a decode that shares no code with d3fast's (no JPEG draft mode here)
    png = next(r for r, (b, _) in enumerate(TRAIN) if b.startswith(b"\x89PNG"))
    assert np.abs(x[png].astype(int) - reference_decode(io.BytesIO(TRAIN[png][0]), 16).astype(int)).max() <= 1
    grey = next(r for r, (b, _) in enumerate(TRAIN) if Image.open(io.BytesIO(b)).mode == "L")
    assert (x[grey][0] == x[grey][1]).all() and (x[grey][1] == x[grey][2]).all()  # greyscale -> RGB
    # once prepared it is found by name, with the hf preset; the same command reuses the cache
    cfg = resolve_config("hf-x")
    assert cfg.preset == "hf" and cfg.data.resolution == 0
    assert prepare(resolve_config("hf-x", overrides=[f"data.data_path={root}"]), progress=False).status == "reused"


def test_save_to_disk_folder_and_cifar_column_names(tmp_path, d3fast_home):
    root = write_save_to_disk(tmp_path / "dd")
    hf_prepare(root, "hf-dd")
    x, y, m = load_split("hf-dd", "train")
    xt, yt, _ = load_split("hf-dd", "test")
    assert m["classes"] == CLASSES and m["source"]["layout"] == "hf save_to_disk (test as test)"
    want_x, want_xt = oracle(tmp_path, {"train": TRAIN, "test": TEST})
    assert np.array_equal(x, want_x) and np.array_equal(xt, want_xt)
    assert y.tolist() == [c for _, c in TRAIN]
    # CIFAR-10 on the Hub: `img` and `label`; other datasets `labels`; names in dataset_info.json only
    cifar = write_parquet(tmp_path / "cifar", "hub", test_name="test", image="img", label="labels", metadata=False)
    (cifar / "dataset_info.json").write_text(json.dumps({"features": _features("img", "labels")}))
    hf_prepare(cifar, "hf-cifar")
    xc, yc, mc = load_split("hf-cifar", "train")
    assert mc["classes"] == CLASSES and mc["source"]["layout"] == "hf parquet (test as test)"
    assert np.array_equal(xc, x) and np.array_equal(yc, y)


def test_class_names_from_the_dataset_card(tmp_path, d3fast_home):
    root = write_parquet(tmp_path / "card", "config", metadata=False)
    # the Hub's dataset card: one dataset_info entry per config; this folder is plain_text's
    (root / "README.md").write_text("""---
license: mit
dataset_info:
- config_name: other
  features:
  - name: label
    dtype:
      class_label:
        names:
          '0': wrong
          '1': names
- config_name: plain_text
  features:
  - name: image
    dtype: image
  - name: label
    dtype:
      class_label:
        names:
          '0': zebra
          '1': "ant"
          '2': 'moth'
  splits:
  - name: train
    num_examples: 12
configs:
- config_name: plain_text
  data_files:
  - split: train
    path: plain_text/train/*
---
# A card
""")
    hf_prepare(root, "hf-card")
    _, _, m = load_split("hf-card", "train")
    assert m["classes"] == CLASSES


def test_path_only_rows_and_parallel_workers(tmp_path, d3fast_home):
    # `datasets` keeps a local image as its path until it embeds the bytes: such a row is
    # decoded from the file (relative paths from the dataset's folder); the worker pool reads
    # the same bytes as the in-process decode
    root = tmp_path / "paths"
    (root / "files").mkdir(parents=True)
    for r, (b, _) in enumerate(TRAIN[:3]):
        (root / "files" / f"{r}.img").write_bytes(b)
    rows = [(None if r < 3 else b, y) for r, (b, y) in enumerate(TRAIN)]
    paths = [f"files/{r}.img" if r < 3 else None for r in range(len(TRAIN))]
    _parquet(root / "data" / "train-00000-of-00001.parquet", rows, paths=paths)
    _parquet(root / "data" / "test-00000-of-00001.parquet", TEST)
    res = prepare(resolve_config("hf-paths", overrides=[f"data.data_path={root}", "data.resolution=16",
                                                        "data.workers=2"]), progress=False, parallel_min_files=1)
    assert res.status == "prepared" and res.decoded == len(TRAIN) + len(TEST)
    x, _, _ = load_split("hf-paths", "train")
    want_x, _ = oracle(tmp_path, {"train": TRAIN, "test": TEST})
    assert np.array_equal(x, want_x)


def test_a_changed_shard_is_prepared_again(tmp_path, d3fast_home):
    root = write_parquet(tmp_path / "ds", "hub")
    cfg = resolve_config("hf-x", overrides=[f"data.data_path={root}", "data.resolution=16"])
    assert prepare(cfg, progress=False).status == "prepared"
    shard = root / "data" / "train-00001-of-00002.parquet"
    _parquet(shard, TRAIN[7:][::-1])
    res = prepare(cfg, progress=False)
    assert res.status == "prepared" and load_split("hf-x", "train")[1].tolist()[7:] == [c for _, c in TRAIN[7:][::-1]]


def test_encoded_bytes_are_drawn_a_window_at_a_time():
    # prepare submits at most `window` decode tasks ahead: a large dataset's encoded bytes are
    # never all drawn into memory (Executor.map would draw every task first)
    from concurrent.futures import ThreadPoolExecutor

    from d3fast.data.prepare import _in_order

    drawn = []

    def tasks():
        for k in range(20):
            drawn.append(k)
            yield (k, [None], 4, 3)

    with ThreadPoolExecutor(2) as pool:
        for n, (start, _, errors) in enumerate(_in_order(pool, tasks(), window=3)):
            assert start == n and errors and len(drawn) <= n + 3


# ------------------------------------------------------------------ bad layouts


def _one_line(root, name="hf-bad"):
    """The CLI's message for preparing `root`: exit 2, one line."""
    r = invoke("prepare", "--dataset", name, "--data-path", root, "--resolution", 16)
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1, r.output
    return lines[0]


def test_missing_columns(tmp_path, d3fast_home):
    root = write_parquet(tmp_path / "a", "hub")
    bad = root / "data" / "validation-00000-of-00001.parquet"
    pq.write_table(pa.table({"pixels": pa.array([b"x"] * 6), "label": pa.array([0] * 6)}), bad)
    msg = _one_line(root)
    assert str(bad) in msg and "has columns [pixels: binary, label: int64]" in msg
    assert "expected an image column (image or img, encoded bytes) and a label column (label or labels" in msg
    for k, rows in enumerate((TRAIN[:7], TRAIN[7:])):  # labels as strings in both train shards
        shard = root / "data" / f"train-{k:05d}-of-00002.parquet"
        pq.write_table(pa.table({"image": _table(rows).column("image"), "label": pa.array(["cat"] * len(rows))}), shard)
    msg = _one_line(root)
    first = root / "data" / "train-00000-of-00002.parquet"
    assert f"{first} has columns [image: struct<bytes: binary, path: string>, label: string]: expected" in msg


def test_labels_out_of_range_and_null(tmp_path, d3fast_home):
    rows = list(TRAIN)
    rows[5] = (rows[5][0], 3)
    root = tmp_path / "a"
    _parquet(root / "data" / "train-00000-of-00001.parquet", rows)
    _parquet(root / "data" / "test-00000-of-00001.parquet", TEST)
    msg = _one_line(root)
    assert f"{root}/data/train-00000-of-00001.parquet row 5: label 3 is outside 0..2" in msg
    unlabelled = [(b, -1) for b, _ in TEST]  # the Hub's marker of an unlabelled test split
    _parquet(root / "data" / "train-00000-of-00001.parquet", TRAIN)
    _parquet(root / "data" / "test-00000-of-00001.parquet", unlabelled)
    assert "row 0: label -1 is outside 0..2" in _one_line(root) and "unlabelled" in _one_line(root)
    table = _table(TEST).set_column(1, "label", pa.array([None] + [0] * (len(TEST) - 1), pa.int64()))
    pq.write_table(table, root / "data" / "test-00000-of-00001.parquet")
    assert "test-00000-of-00001.parquet: 1 row(s) have no 'label' (null)" in _one_line(root)


def test_corrupt_image_bytes_name_the_shard_and_row(tmp_path, d3fast_home):
    rows = list(TRAIN)
    rows[4] = (rows[4][0][:40], rows[4][1])  # a truncated PNG or JPEG
    rows[9] = (b"not an image", rows[9][1])
    root = tmp_path / "a"
    _parquet(root / "data" / "train-00000-of-00001.parquet", rows)
    _parquet(root / "data" / "test-00000-of-00001.parquet", TEST)
    r = invoke("prepare", "--dataset", "hf-bad", "--data-path", root, "--resolution", 16)
    assert r.exit_code == 2
    shard = root / "data" / "train-00000-of-00001.parquet"
    # the listing the other readers give corrupt files (up to 10, then the full list's file)
    assert "error: 2 row(s) hold images that cannot be decoded (corrupt, truncated or not an image)" in r.output
    assert f"{shard} row 4: " in r.output and f"{shard} row 9: UnidentifiedImageError" in r.output
    # --skip-corrupt leaves the two rows out, like the other readers' corrupt files
    r = invoke("prepare", "--dataset", "hf-bad", "--data-path", root, "--resolution", 16, "--skip-corrupt")
    assert r.exit_code == 0, r.output
    _, y, m = load_split("hf-bad", "train")
    assert len(y) == len(TRAIN) - 2 and [s["path"] for s in m["skipped"]] == [f"{shard} row 4", f"{shard} row 9"]


def test_no_test_split(tmp_path, d3fast_home):
    root = tmp_path / "a"
    _parquet(root / "data" / "train-00000-of-00001.parquet", TRAIN)
    _parquet(root / "data" / "extra-00000-of-00001.parquet", TEST)
    assert _one_line(root) == (f"error: {root}/data has a train split but no test split (splits: extra, train; "
                               "looked for test, validation, valid, val): d3fast evaluates on held-out images; add one")
    # save_to_disk: a DatasetDict without one, and a single Dataset's folder
    dd = write_save_to_disk(tmp_path / "dd", splits=(("train", TRAIN),))
    assert f"{dd} has a train split but no test split" in _one_line(dd)
    single = tmp_path / "single"
    shutil.copytree(dd / "train", single)
    msg = _one_line(single)
    assert f"{single} is a single-split save_to_disk folder (train split, no dataset_dict.json)" in msg


def test_no_class_names(tmp_path, d3fast_home):
    root = write_parquet(tmp_path / "a", "hub", metadata=False)
    msg = _one_line(root)
    first = root / "data" / "train-00000-of-00002.parquet"
    assert msg.startswith(f"error: no class names for column 'label': looked in {first}'s huggingface schema "
                          f"metadata, {root}/dataset_info.json, {root}/dataset_infos.json, {root}/README.md")
    # a label column that is not a ClassLabel names nothing either
    (root / "dataset_info.json").write_text(json.dumps({"features": {"label": {"dtype": "int64", "_type": "Value"}}}))
    assert "no class names for column 'label'" in _one_line(root)
    dd = write_save_to_disk(tmp_path / "dd", metadata=False, info=False)
    assert f"looked in {dd}/train/data-00000-of-00002.arrow's huggingface schema metadata, " \
           f"{dd}/train/dataset_info.json" in _one_line(dd)


def test_mixed_shard_schemas_and_incomplete_sets(tmp_path, d3fast_home):
    root = write_parquet(tmp_path / "a", "hub")
    second = root / "data" / "train-00001-of-00002.parquet"
    pq.write_table(_table(TRAIN[7:]).append_column("extra", pa.array([1.0] * 5)), second)
    msg = _one_line(root)
    assert msg.startswith(f"error: {second} has columns [image: struct") and "extra: double" in msg
    assert f"but {root}/data/train-00000-of-00002.parquet has [image: struct" in msg
    assert "the shards of one split must share one schema" in msg
    second.unlink()
    assert "the train shards are not one complete set of 2 (1 files, missing 1)" in _one_line(root)
    # a test split naming other classes than train
    _parquet(second, TRAIN[7:])
    _parquet(root / "data" / "validation-00000-of-00001.parquet", TEST, names=["a", "b", "c"])
    assert "validation-00000-of-00001.parquet names the classes of 'label' [a, b, c]" in _one_line(root)
    # two train shards naming other classes (the second shard's are never read otherwise)
    _parquet(root / "data" / "validation-00000-of-00001.parquet", TEST)
    _parquet(second, TRAIN[7:], names=["a", "b", "c"])
    assert "train-00001-of-00002.parquet names the classes of 'label' [a, b, c]" in _one_line(root)
    # a save_to_disk split without state.json, one of its data-K-of-N shards gone
    std = write_save_to_disk(tmp_path / "s")
    (std / "train" / "state.json").unlink()
    (std / "train" / "data-00001-of-00002.arrow").unlink()
    assert "the train shards are not one complete set of 2 (1 files, missing 1)" in _one_line(std)


def test_files_that_are_not_shards(tmp_path, d3fast_home):
    root = write_parquet(tmp_path / "a", "hub")
    bad = root / "data" / "train-00000-of-00002.parquet"
    bad.write_bytes(b"PAR1 garbage")
    assert _one_line(root).startswith(f"error: {bad} is not a Parquet file")
    dd = write_save_to_disk(tmp_path / "dd")
    (dd / "test" / "data-00001-of-00002.arrow").write_bytes(b"\xff" * 20)
    assert _one_line(dd).startswith(f"error: {dd}/test/data-00001-of-00002.arrow is not an Arrow stream")
    (dd / "test" / "state.json").write_text(json.dumps({"_data_files": [{"filename": "gone.arrow"}]}))
    assert f"{dd}/test/state.json lists gone.arrow, which {dd}/test does not hold" in _one_line(dd)
    (dd / "dataset_dict.json").write_text("{not json")
    assert _one_line(dd).startswith(f"error: {dd}/dataset_dict.json is not readable JSON")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert f"{empty} holds no train split: expected Parquet shards" in _one_line(empty)
    assert "does not exist" in _one_line(tmp_path / "nowhere")


def test_names_and_listings(tmp_path, d3fast_home):
    r = invoke("prepare", "--dataset", "hf_x", "--resolution", 16)
    assert r.exit_code == 2 and "imagefolder[-<label>], hf[-<label>]" in r.output
    r = invoke("prepare", "--dataset", "hf-x", "--resolution", 16)
    assert r.exit_code == 2 and "run `d3fast prepare --dataset hf-x --data-path TREE" in r.output
    assert "local Hugging Face dataset" in r.output
    r = invoke("presets")
    assert any(line.split()[:2] == ["hf", "hf"] for line in r.output.splitlines())
    with pytest.raises(D3FastError, match="preset 'hf' is for dataset 'hf', not 'imagefolder-x'"):
        resolve_config("imagefolder-x", preset="hf")
    with pytest.raises(D3FastError, match="not a power of two"):
        resolve_config("hf-x", overrides=["data.resolution=24"])


# ------------------------------------------------------------------ end to end


def test_an_hf_dataset_distills(tmp_path, d3fast_home):
    root = write_save_to_disk(tmp_path / "dd")
    sets = [s for s in OVERRIDES if not s.startswith("distill.steps")] + ["distill.batch_syn=6"]
    r = invoke("distill", "--dataset", "hf-tiny", "--data-path", root, "--resolution", 16, "--steps", 1, "-q",
               "--runs-dir", tmp_path / "runs", "--name", "t", *sum((["--set", s] for s in sets), []))
    assert r.exit_code == 0, r.output
    run = next((tmp_path / "runs" / "hf-tiny").iterdir())
    config = json.loads((run / "config.json").read_text())
    assert config["data"]["dataset"] == "hf-tiny" and config["data"]["resolution"] == 16
    assert any(run.glob("checkpoint*")), sorted(p.name for p in run.iterdir())

