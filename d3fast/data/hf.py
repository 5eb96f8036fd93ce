"""Local Hugging Face datasets: where a folder's shards are, their features and their rows.

Read with pyarrow (no `datasets` import), in the two layouts the `datasets` library and the Hub
write:

- Parquet shards: DIR/data/<split>-00000-of-0000N.parquet (the Hub's), DIR/<split>-*.parquet,
  DIR/<split>/*.parquet, or DIR/<config>/ holding one of those (refs/convert/parquet:
  DIR/<config>/<split>/0000.parquet).
- `save_to_disk` folders: DIR/dataset_dict.json ({"splits": [...]}) and per split
  DIR/<split>/ with state.json (`_data_files`), dataset_info.json (`features`) and
  data-0000K-of-0000N.arrow (Arrow IPC streams); or DIR/<split>/ folders of single splits.

Images are an `image` (or `img`) column of structs {bytes, path} holding encoded files (PNG,
JPEG, ...): this module hands them out a batch at a time and never decodes them (prepare's
workers do, d3fast/data/decode.py). Labels are a `label` (or `labels`) integer column, its
class names the ClassLabel feature's. Every problem is a D3FastError of one line naming the
file and what was expected.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from d3fast.errors import D3FastError

TRAIN = "train"
# the split tested on: the first of these present (the names the Hub gives held-out splits)
TEST_SPLITS = ("test", "validation", "valid", "val")
IMAGE_COLUMNS = ("image", "img")
LABEL_COLUMNS = ("label", "labels")
EXPECTED = "an image column (image or img, encoded bytes) and a label column (label or labels, integers)"
# ClassLabel names d3fast accepts; the config's data.subtasks stops at 65,536 classes too
MAX_CLASSES = 65536
LAYOUTS = ("Parquet shards (DIR/data/train-00000-of-0000N.parquet, DIR/train-*.parquet, DIR/train/*.parquet or "
           "DIR/<config>/train/*.parquet) or a save_to_disk folder (DIR/dataset_dict.json, DIR/train/*.arrow)")

# <split>.parquet, <split>-00000-of-00003.parquet, <split>-00000-of-00003-<hash>.parquet, ...
_SPLIT_FILE = re.compile(r"^(?P<split>[A-Za-z]+)(?:[-_.].*)?\.parquet$")
_SHARD_OF = re.compile(r"-(\d+)-of-(\d+)(?=[-.])")


@dataclass(frozen=True)
class Shard:
    path: Path
    rows: int


@dataclass
class Layout:
    """What `find_layout` found in a folder: shards per split, the columns read, class names."""

    root: Path
    kind: str  # "parquet" | "save_to_disk"
    splits: dict[str, list[Shard]]  # "train", "test": shards in row order
    test_split: str  # the folder's split read as "test" (test, validation, valid or val)
    image_column: str
    label_column: str
    classes: list[str]  # label order
    classes_from: str  # where the names were read
    meta_files: list[Path]  # json and README files read: part of the cache's fingerprint
    notes: list[str] = field(default_factory=list)


def find_layout(root: Path) -> Layout:
    """The shards, columns and class names of the local Hugging Face dataset in `root`.

    Reads file footers, stream headers and json only (no image bytes, no labels).

    Raises:
        D3FastError: no such folder; neither layout; no train or no test split; a shard that
            is not Parquet / an Arrow stream, lacks the image or label column, or has another
            schema than the split's first; an empty split; no class names in the features.
    """
    if not root.exists():
        raise D3FastError(f"--data-path {root} does not exist")
    if not root.is_dir():
        raise D3FastError(f"--data-path {root} is not a directory")
    if any((d / n).is_file() for d in (root, *(root / s for s in (TRAIN, *TEST_SPLITS)))
           for n in ("dataset_dict.json", "state.json")):
        kind, files, test, meta, notes, config = "save_to_disk", *_save_to_disk_files(root), None
    else:
        kind = "parquet"
        files, test, meta, notes, config = _parquet_files(root)
    splits: dict[str, list[Shard]] = {}
    schemas: dict[str, Any] = {}
    every: list[tuple[Path, Any]] = []  # (shard, schema) of both splits: their class names are compared below
    for split, paths in (("train", files[TRAIN]), ("test", files[test])):
        shards = []
        for path in paths:
            schema, rows = _schema(path, kind)
            every.append((path, schema))
            first = schemas.setdefault(split, schema)
            if not schema.remove_metadata().equals(first.remove_metadata()):
                raise D3FastError(f"{path} has columns [{_columns(schema)}] but {paths[0]} has [{_columns(first)}]: "
                                  "the shards of one split must share one schema")
            shards.append(Shard(path, rows))
        if sum(s.rows for s in shards) == 0:
            raise D3FastError(f"the {split if split == TRAIN else test} split of {root} holds no rows "
                              f"({', '.join(str(p) for p in paths[:3])}{' ...' if len(paths) > 3 else ''})")
        splits[split] = shards
    first_train, first_test = files[TRAIN][0], files[test][0]
    train_features = _schema_features(schemas["train"])
    image, label = _pick_columns(first_train, schemas["train"], train_features)
    # the test split is read with the train split's columns
    _pick_columns(first_test, schemas["test"], _schema_features(schemas["test"]), (image, label))
    classes, where = _class_names(root, kind, label, first_train, train_features, meta, config)
    for path, schema in every:  # each shard's own ClassLabel, where it has one (the schemas may differ only there)
        names = _names_of((_schema_features(schema) or {}).get(label))
        if names is not None and names != classes:
            raise D3FastError(f"{path} names the classes of {label!r} {_short(names)}, but {where} names them "
                              f"{_short(classes)}: every shard of both splits must share one ClassLabel feature")
    return Layout(root, kind, splits, test, image, label, classes, where, meta, notes)


def read_labels(layout: Layout, shard: Shard) -> np.ndarray:
    """int64 [shard.rows] labels of one shard, each in 0..C-1 (C = len(layout.classes)).

    Raises:
        D3FastError: an unreadable shard, null labels, a label outside the class names (the
            file and row named), or another row count than `find_layout` saw.
    """
    import pyarrow as pa

    try:
        nulls, y = _label_values(shard.path, layout.kind, layout.label_column)
    except (pa.ArrowException, OSError) as e:
        raise D3FastError(f"{shard.path} cannot be read ({type(e).__name__}: {str(e)[:160]})") from None
    if nulls:
        raise D3FastError(f"{shard.path}: {nulls} row(s) have no {layout.label_column!r} (null); every image "
                          "needs a label")
    if len(y) != shard.rows:
        raise D3FastError(f"{shard.path} now holds {len(y)} rows, not {shard.rows}: did it change? run prepare again")
    n = len(layout.classes)
    bad = np.flatnonzero((y < 0) | (y >= n))
    if bad.size:
        r = int(bad[0])
        hint = " (-1 marks an unlabelled row: this split has no labels)" if y[r] == -1 else ""
        raise D3FastError(f"{shard.path} row {r}: label {y[r]} is outside 0..{n - 1}, the {n} class names of "
                          f"{layout.classes_from} ({bad.size} such rows){hint}")
    return y


def iter_images(layout: Layout, shard: Shard, rows: int) -> Iterator[list[bytes | str | None]]:
    """The encoded images of one shard in row order, at most `rows` a batch: a row's bytes, or
    the path of the file it refers to when it holds none (absolute, or relative to the root;
    `datasets` keeps local files that way), or None when it holds neither. Peak memory is one
    Parquet row group or one Arrow record batch of the image column, not the shard.

    Raises:
        D3FastError: the shard cannot be read (truncated, changed since `find_layout`).
    """
    import pyarrow as pa

    try:
        if layout.kind == "parquet":
            import pyarrow.parquet as pq

            with pq.ParquetFile(shard.path) as f:
                for batch in f.iter_batches(batch_size=rows, columns=[layout.image_column]):
                    yield _encoded(batch.column(0), layout.root)
            return
        with pa.memory_map(str(shard.path)) as source:
            for batch in _ipc_batches(_ipc_open(source)):
                column = batch.column(batch.schema.get_field_index(layout.image_column))
                for start in range(0, len(column), rows):
                    yield _encoded(column.slice(start, rows), layout.root)
    except (pa.ArrowException, OSError, KeyError) as e:
        raise D3FastError(f"{shard.path} cannot be read ({type(e).__name__}: {str(e)[:160]})") from None


def _encoded(column: Any, root: Path) -> list[bytes | str | None]:
    import pyarrow as pa

    if not pa.types.is_struct(column.type):
        return column.to_pylist()
    # flatten() applies the struct's offset and nulls to its fields (.field() would not)
    fields = dict(zip([column.type.field(i).name for i in range(column.type.num_fields)], column.flatten(),
                      strict=True))
    data = fields["bytes"].to_pylist()
    paths = fields["path"].to_pylist() if "path" in fields else [None] * len(data)
    return [b if b is not None else str(root / p) if p else None for b, p in zip(data, paths, strict=True)]


# ---------------------------------------------------------------- where the shards are


def _parquet_files(root: Path) -> tuple[dict[str, list[Path]], str, list[Path], list[str], str | None]:
    """({split: shards}, test split, [meta files], notes, config folder or None) of a Parquet
    layout: root itself, root/data, or the one config folder under root that has a train split."""
    notes: list[str] = []
    config = None
    base, found = root, _parquet_splits(root)
    if TRAIN not in found and (root / "data").is_dir():
        base, found = root / "data", _parquet_splits(root / "data")
    if TRAIN not in found:
        configs = {d.name: s for d in sorted(root.iterdir())
                   if d.is_dir() and not d.name.startswith(".") and TRAIN in (s := _parquet_splits(d))}
        if len(configs) > 1:
            raise D3FastError(f"{root} holds several configs with a train split ({', '.join(configs)}): "
                              f"pass --data-path {root}/<config>")
        if not configs:
            raise D3FastError(f"{root} holds no train split: expected {LAYOUTS}")
        config, found = next(iter(configs.items()))
        base = root / config
        notes.append(f"reading config {config!r} ({base})")
    test = _test_split(base, found)
    for split in (TRAIN, test):
        _check_complete(split, found[split])
    ignored = sorted(set(found) - {TRAIN, *TEST_SPLITS})
    if ignored:
        notes.append(f"splits not read: {', '.join(ignored)} (train is {TRAIN!r}, test the first of {TEST_SPLITS})")
    meta = [p for p in (root / "dataset_info.json", root / "dataset_infos.json", root / "README.md") if p.is_file()]
    return found, test, meta, notes, config


def _parquet_splits(base: Path) -> dict[str, list[Path]]:
    """{split: sorted shards} of one folder: its <split>[-_.]*.parquet files, else the
    *.parquet files of its <split>/ subfolder."""
    found: dict[str, list[Path]] = {}
    for p in sorted(base.glob("*.parquet")):
        m = _SPLIT_FILE.match(p.name)
        if m and p.is_file():
            found.setdefault(m["split"].lower(), []).append(p)
    for split in (TRAIN, *TEST_SPLITS):
        if split not in found and (base / split).is_dir():
            files = sorted(p for p in (base / split).glob("*.parquet") if p.is_file() and not p.name.startswith("."))
            if files:
                found[split] = files
    return found


def _test_split(base: Path, found: dict[str, Any]) -> str:
    """The first of TEST_SPLITS among the splits `found` in `base`."""
    test = next((s for s in TEST_SPLITS if s in found), None)
    if test is None:
        raise D3FastError(f"{base} has a train split but no test split (splits: {', '.join(sorted(found))}; looked for "
                          f"{', '.join(TEST_SPLITS)}): d3fast evaluates on held-out images; add one")
    return test


def _check_complete(split: str, paths: list[Path]) -> None:
    """Shards named <split>-0000K-of-0000N: all N present, none counted twice."""
    marks = [(p, _SHARD_OF.search(p.name)) for p in paths]
    numbered = [(p, int(m[1]), int(m[2])) for p, m in marks if m]
    if not numbered:
        return
    totals = {n for _, _, n in numbered}
    have = sorted(k for _, k, _ in numbered)
    if len(totals) > 1 or len(numbered) != len(paths) or have != list(range(max(totals))):
        missing = sorted(set(range(max(totals))) - set(have))
        raise D3FastError(f"{paths[0].parent}: the {split} shards are not one complete set of {max(totals)} "
                          f"({len(paths)} files{', missing ' + ', '.join(str(k) for k in missing[:5]) if missing else ''}"
                          f"): download the split again")


def _save_to_disk_files(root: Path) -> tuple[dict[str, list[Path]], str, list[Path], list[str]]:
    """({split: shards}, test split, [meta files], notes) of a save_to_disk folder."""
    meta: list[Path] = []
    listing = root / "dataset_dict.json"
    if listing.is_file():
        names = _json(listing).get("splits")
        if not isinstance(names, list) or not all(isinstance(s, str) for s in names):
            raise D3FastError(f"{listing}: expected {{\"splits\": [split names]}}, got {str(_json(listing))[:120]}")
        meta.append(listing)
        missing = [s for s in names if not (root / s).is_dir()]
        if missing:
            raise D3FastError(f"{listing} lists split(s) {', '.join(missing)} but {root} has no such folder")
    elif (root / "state.json").is_file():
        split = _json(root / "state.json").get("_split")
        raise D3FastError(f"{root} is a single-split save_to_disk folder ({split or 'unnamed'} split, no "
                          "dataset_dict.json): d3fast needs a train and a test split; save the DatasetDict, or put "
                          "the splits' folders side by side as DIR/train/ and DIR/test/")
    else:
        names = [s for s in (TRAIN, *TEST_SPLITS) if (root / s / "state.json").is_file()]
    if TRAIN not in names:
        raise D3FastError(f"{root} holds no train split (save_to_disk splits: {', '.join(names) or 'none'}); "
                          f"expected {LAYOUTS}")
    test = _test_split(root, dict.fromkeys(names))
    notes = [f"splits not read: {', '.join(s for s in names if s not in (TRAIN, *TEST_SPLITS))}"] \
        if set(names) - {TRAIN, *TEST_SPLITS} else []
    files = {}
    for split in (TRAIN, test):
        folder = root / split
        state = folder / "state.json"
        if state.is_file():
            entries = _json(state).get("_data_files")
            if not isinstance(entries, list) or not entries or not all(
                    isinstance(e, dict) and isinstance(e.get("filename"), str) for e in entries):
                raise D3FastError(f"{state}: expected \"_data_files\": [{{\"filename\": \"data-00000-of-0000N.arrow\"}}, "
                                  "...] (one entry a shard)")
            paths = [folder / e["filename"] for e in entries]
            gone = [p for p in paths if not p.is_file()]
            if gone:
                raise D3FastError(f"{state} lists {gone[0].name}, which {folder} does not hold")
            meta.append(state)
        else:
            paths = sorted(folder.glob("data-*.arrow"))
            if not paths:
                raise D3FastError(f"{folder} holds neither state.json nor data-*.arrow shards: not a save_to_disk split")
        _check_complete(split, paths)  # data-0000K-of-0000N.arrow: every K, as for Parquet
        meta += [p for p in (folder / "dataset_info.json",) if p.is_file()]
        files[split] = paths
    return files, test, meta, notes


# ---------------------------------------------------------------- schemas and features


def _schema(path: Path, kind: str) -> tuple[Any, int]:
    """(Arrow schema, rows) of a shard from its footer (Parquet) or its message headers
    (an Arrow stream, memory-mapped: no record batch body is read)."""
    import pyarrow as pa

    try:
        if kind == "parquet":
            import pyarrow.parquet as pq

            with pq.ParquetFile(path) as f:
                return f.schema_arrow, f.metadata.num_rows
        with pa.memory_map(str(path)) as source:
            reader = _ipc_open(source)
            return reader.schema, sum(b.num_rows for b in _ipc_batches(reader))
    except (pa.ArrowException, OSError) as e:
        what = "a Parquet file" if kind == "parquet" else "an Arrow stream (save_to_disk's format)"
        raise D3FastError(f"{path} is not {what} ({type(e).__name__}: {str(e)[:160]})") from None


def _ipc_open(source: Any) -> Any:
    """A stream reader of `source` (save_to_disk writes streams), else a file reader."""
    import pyarrow as pa

    try:
        return pa.ipc.open_stream(source)
    except pa.ArrowInvalid:
        source.seek(0)
        return pa.ipc.open_file(source)


def _ipc_batches(reader: Any) -> Iterator[Any]:
    import pyarrow as pa

    if isinstance(reader, pa.ipc.RecordBatchFileReader):
        for i in range(reader.num_record_batches):
            yield reader.get_batch(i)
        return
    yield from reader


def _label_values(path: Path, kind: str, name: str) -> tuple[int, np.ndarray]:
    """(null count, int64 values) of a shard's label column, copied out of the file."""
    import pyarrow as pa

    if kind == "parquet":
        import pyarrow.parquet as pq

        column = pq.read_table(path, columns=[name]).column(0)
        if column.null_count:  # to_numpy would make the labels floats with NaNs
            return column.null_count, np.zeros(0, np.int64)
        return 0, np.asarray(column.to_numpy(), dtype=np.int64)
    with pa.memory_map(str(path)) as source:
        reader = _ipc_open(source)
        index = reader.schema.get_field_index(name)
        chunks = [b.column(index) for b in _ipc_batches(reader)]
        nulls = sum(c.null_count for c in chunks)
        if nulls or not chunks:
            return nulls, np.zeros(0, np.int64)
        return 0, np.concatenate([np.asarray(c.to_numpy(zero_copy_only=False), dtype=np.int64) for c in chunks])


def _columns(schema: Any) -> str:
    shown = [f"{f.name}: {_type_name(f.type)}" for f in schema][:12]
    return ", ".join(shown) + (f", ... ({len(schema)} in all)" if len(schema) > 12 else "")


def _type_name(t: Any) -> str:
    return str(t).replace("\n", " ")[:60]


def _is_image_type(t: Any) -> bool:
    import pyarrow as pa

    def binary(u: Any) -> bool:
        return bool(pa.types.is_binary(u) or pa.types.is_large_binary(u) or pa.types.is_binary_view(u))

    if pa.types.is_struct(t):
        names = [t.field(i).name for i in range(t.num_fields)]
        return "bytes" in names and binary(t.field("bytes").type)
    return binary(t)


def _pick_columns(path: Path, schema: Any, features: dict[str, Any] | None,
                  chosen: tuple[str, str] | None = None) -> tuple[str, str]:
    """(image column, label column) of a shard: the named ones, else the one Image / ClassLabel
    feature; `chosen` checks that a test shard holds the train split's columns."""
    import pyarrow as pa

    names = schema.names

    def by_type(wanted: str) -> str | None:
        typed = [c for c, f in (features or {}).items() if isinstance(f, dict) and f.get("_type") == wanted]
        return typed[0] if len(typed) == 1 else None

    image, label = chosen or (next((c for c in IMAGE_COLUMNS if c in names), None) or by_type("Image"),
                              next((c for c in LABEL_COLUMNS if c in names), None) or by_type("ClassLabel"))
    if (image not in names or label not in names or not _is_image_type(schema.field(image).type)
            or not pa.types.is_integer(schema.field(label).type)):
        raise D3FastError(f"{path} has columns [{_columns(schema)}]: expected {EXPECTED}")
    return str(image), str(label)


def _schema_features(schema: Any) -> dict[str, Any] | None:
    """The `datasets` features stored in a shard's `huggingface` schema metadata, if readable."""
    raw = (schema.metadata or {}).get(b"huggingface")
    try:
        features = json.loads(raw)["info"]["features"] if raw else None
    except (ValueError, TypeError, KeyError):
        return None
    return features if isinstance(features, dict) else None


def _names_of(feature: Any) -> list[str] | None:
    """A ClassLabel feature's names in label order (`num_classes` alone: "0".."C-1", as
    `datasets` names them), or None for any other feature."""
    if not isinstance(feature, dict) or feature.get("_type") != "ClassLabel":
        return None
    names = feature.get("names")
    if isinstance(names, list) and names and all(isinstance(n, str) for n in names):
        return names
    n = feature.get("num_classes")
    if isinstance(n, int) and not isinstance(n, bool) and 0 < n <= MAX_CLASSES:
        return [str(i) for i in range(n)]
    return None


def _class_names(root: Path, kind: str, label: str, first: Path, features: dict[str, Any] | None,
                 meta: list[Path], config: str | None) -> tuple[list[str], str]:
    """(class names, where they were read) of the label column: the shard's schema metadata,
    then dataset_info.json (the split folder's or the root's), dataset_infos.json and README.md.

    Raises:
        D3FastError: none of them names the classes; duplicate or too many names."""
    places = [f"{first}'s huggingface schema metadata"]
    places += [f"{root}/train/dataset_info.json"] if kind == "save_to_disk" else [
        f"{root}/{n}" for n in ("dataset_info.json", "dataset_infos.json", "README.md")]
    found = (_names_of((features or {}).get(label)), places[0])
    if found[0] is None:
        for path in meta:
            names = None
            if path.name == "dataset_info.json":
                info = _json(path).get("features")
                names = _names_of(info.get(label)) if isinstance(info, dict) else None
            elif path.name == "dataset_infos.json":
                info = _config_entry(_json(path), config)
                features = info.get("features") if isinstance(info, dict) else None
                names = _names_of(features.get(label)) if isinstance(features, dict) else None
            elif path.name == "README.md":
                names = _readme_names(path, config).get(label)
            if names is not None:
                found = (names, str(path))
                break
    names, where = found
    if names is None:
        raise D3FastError(f"no class names for column {label!r}: looked in {', '.join(places)}; expected a ClassLabel "
                          f"feature, e.g. a {root}/dataset_info.json holding "
                          f"{{\"features\": {{\"{label}\": {{\"_type\": \"ClassLabel\", \"names\": [...]}}}}}}")
    if len(names) > MAX_CLASSES:
        raise D3FastError(f"{where}: {len(names)} class names for {label!r}, more than d3fast's {MAX_CLASSES}")
    if len(set(names)) != len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise D3FastError(f"{where}: class name {twice!r} of {label!r} appears twice; ClassLabel names are unique")
    return names, where


def _config_entry(infos: Mapping[Any, Any], config: str | None) -> Any:
    """The entry of a per-config mapping for `config`, else the only one, else "default"."""
    if config is not None and config in infos:
        return infos[config]
    if len(infos) == 1:
        return next(iter(infos.values()))
    return infos.get("default")


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise D3FastError(f"{path} is not readable JSON ({type(e).__name__}: {str(e)[:120]})") from None
    if not isinstance(data, dict):
        raise D3FastError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _readme_names(path: Path, config: str | None) -> dict[str, list[str]]:
    """{column: class names} from a dataset card's YAML front matter: the `class_label` names
    of `dataset_info.features` (per config when it is a list: `config`'s, else the only one,
    else "default"), in the form the Hub writes:

        dataset_info:
          features:
          - name: label
            dtype:
              class_label:
                names:
                  '0': cat

    Read with PyYAML's BaseLoader: every scalar stays a string (a class named `no` or `1e3`
    is not turned into False or 1000.0) and no tag builds an object. A card that is not YAML,
    or holds no such names, gives {}."""
    import yaml

    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return {}
    if not lines or lines[0].strip() != "---":
        return {}
    end = next((i for i in range(1, len(lines)) if lines[i].strip() == "---"), len(lines))
    try:
        card = yaml.load("\n".join(lines[1:end]), Loader=yaml.BaseLoader)
    except (yaml.YAMLError, RecursionError):
        return {}
    info = card.get("dataset_info") if isinstance(card, dict) else None
    per_config: dict[str | None, dict[str, list[str]]] = {}
    for entry in info if isinstance(info, list) else [info]:
        if not isinstance(entry, dict) or not isinstance(entry.get("features"), list):
            continue
        columns = per_config.setdefault(entry.get("config_name") if isinstance(entry.get("config_name"), str) else None, {})
        for feature in entry["features"]:
            dtype = feature.get("dtype") if isinstance(feature, dict) else None
            label = dtype.get("class_label") if isinstance(dtype, dict) else None
            names = label.get("names") if isinstance(label, dict) else None
            if isinstance(feature.get("name"), str) and isinstance(names, dict) and all(
                    isinstance(k, str) and k.isdecimal() and isinstance(v, str) for k, v in names.items()):
                by_index = {int(k): v for k, v in names.items()}
                if names and sorted(by_index) == list(range(len(by_index))):
                    columns[feature["name"]] = [by_index[i] for i in range(len(by_index))]
    entry = _config_entry(per_config, config) if per_config else None
    return entry if isinstance(entry, dict) else per_config.get(None, {})


def _short(names: list[str]) -> str:
    return "[" + ", ".join(names[:5]) + (", ..." if len(names) > 5 else "") + "]"
