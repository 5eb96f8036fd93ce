"""`d3fast experts import` and `d3fast experts export --format mtt`: expert trajectories in
and out of MTT's replay buffers (the format: d3fast/mtt_buffers.py).

Import writes each trajectory of the buffers as a d3fast expert file (d3fast/trajectories.py)
in the experts folder of the resolved config, so `d3fast distill` with the same config reads
them as if trained here. Every file's every snapshot is checked against d3fast's network for
the dataset before anything is written; each imported expert's last epoch is evaluated on
the test split (a buffer trained on other data, normalisation or class order shows here as
near-chance accuracy, which the shapes cannot show), and the names of the buffer's folders
are read for what the shapes cannot see (another norm, ZCA or not, another dataset). A
trajectory the folder already holds (imported before, or exported from it) is recognised by
its rows' CRC-32s and not written again; each imported expert also records the buffer's
SHA-256 and its index there. Imported experts are never extended by `d3fast experts` (that
would splice two trainings into one trajectory).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from d3fast.config import Config
from d3fast.data.cache import load_split
from d3fast.data.loader import open_split
from d3fast.errors import D3FastError
from d3fast.io import locked, sha256_file
from d3fast.models import build_network, default_depth
from d3fast.mtt_buffers import (
    BUFFER_RE,
    PER_FILE,
    buffer_files,
    dataset_dir,
    dataset_note,
    describe,
    flatten,
    folder_problem,
    layout_problem,
    model_name,
    model_note,
    padding_note,
    read_buffer,
    unflatten,
    write_buffer,
)
from d3fast.preflight import resolve_data_loader
from d3fast.progress import bar as progress_bar
from d3fast.recipes.experts import open_folder
from d3fast.runtime import resolve_device
from d3fast.training import evaluate_accuracy, load_flat_params, param_layout
from d3fast.trajectories import (
    expert_path,
    experts_command,
    experts_dir,
    need_epochs,
    read_expert,
    read_expert_meta,
    row_crc,
    write_expert,
    write_manifest,
)


@dataclass
class ImportResult:
    out_dir: Path
    indices: list[int]  # the expert files written, in buffer order
    skipped: int  # trajectories the folder held already (same rows)
    test_acc: list[float]  # of each written expert's last epoch, on the test split
    epochs: list[int]  # of each written expert
    notes: list[str]


def _check_convnet(cfg: Config) -> None:
    if cfg.net.name != "convnet":
        raise D3FastError(f"MTT's replay buffers hold the DC/MTT ConvNet; net.name={cfg.net.name} has another "
                          "parameter layout (--set net.name=convnet)")
    if cfg.data.subtasks > 1:
        raise D3FastError(f"MTT's replay buffers hold whole-dataset experts; data.subtasks={cfg.data.subtasks} "
                          "experts see a block of classes each")


def import_buffers(cfg: Config, path: str | Path, progress: bool = True) -> ImportResult:
    """Import MTT replay buffers (a replay_buffer_<n>.pt file or the folder holding them) as
    expert trajectories of `cfg` (its dataset must be prepared).

    Raises:
        D3FastError: not a replay buffer; a snapshot whose tensors differ from d3fast's
            network (one line: the file, trajectory, epoch, tensor, both shapes, and what the
            buffer's shapes say: depth, width, channels, norm, classes); a non-finite value
            (each found before anything is written);
            a config d3fast cannot import into (another network, subtasks, batchnorm's
            running statistics, several snapshots per epoch).
    """
    _check_convnet(cfg)
    if cfg.experts.snapshots_per_epoch != 1:
        raise D3FastError(f"MTT's replay buffers keep one snapshot per epoch; experts.snapshots_per_epoch="
                          f"{cfg.experts.snapshots_per_epoch} names another folder (--set experts.snapshots_per_epoch=1)")
    resolve_data_loader(cfg)
    files = buffer_files(Path(path))
    device = resolve_device(cfg.device)
    test = open_split(cfg, "test", device)
    net = build_network(cfg.net, test.channels, test.num_classes, test.resolution)
    if any(True for _ in net.buffers()):
        raise D3FastError(f"net.norm={cfg.net.norm} keeps running statistics, which MTT's buffers do not hold "
                          "(they save parameters only); import into a network without them (instancenorm, MTT's "
                          "default)")
    layout = param_layout(net)
    ours = describe([tuple(s) for _, s in layout])
    for folder in dict.fromkeys(f.parent for f in files):
        problem = folder_problem(folder, cfg.data.dataset, cfg.data.zca, test.resolution, cfg.net.norm, cfg.net.pooling)
        if problem:
            raise D3FastError(f"{folder}: {problem}")
    total, seen = 0, {}
    for f in files:  # every snapshot of every file checked before anything is written
        seen[f] = _stamp(f)
        for t, traj in enumerate(read_buffer(f)):
            total += 1
            for e, snap in enumerate(traj):
                shapes = [tuple(p.shape) for p in snap]
                problem = layout_problem(shapes, layout)
                if problem:
                    raise D3FastError(
                        f"{f}: trajectory {t}, epoch {e}: {problem}. The buffer holds {describe(shapes)}; d3fast's "
                        f"network for {cfg.data.dataset} is {ours} (net.depth, net.width, net.norm set it)")
                if not all(bool(torch.isfinite(p).all()) for p in snap):
                    raise D3FastError(f"{f}: trajectory {t} holds NaN or infinite values at epoch {e}: a diverged "
                                      "expert; nothing was imported")
    notes = [n for n in [padding_note(test.channels, test.resolution)] if n]
    out = open_folder(cfg)
    net = net.to(device)
    result = ImportResult(out, [], 0, [], [], notes)
    bar = progress_bar(total=total, desc="import", unit="expert", disable=not progress, dynamic_ncols=True)
    # one import at a time per folder (two processes importing the same buffer would each see
    # it new); training takes the per-expert locks only, so it goes on beside an import
    try:
        with locked(out / "import.lock", wait=True):
            _import_files(seen, out, net, test, layout, result, bar)
    finally:  # the experts written before a failure are listed too
        write_manifest(cfg, out, device)
    return result


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def _import_files(seen: dict[Path, tuple[int, int]], out: Path, net: torch.nn.Module, test: Any, layout: list,
                  result: ImportResult, bar: Any) -> None:
    have = _held(out)
    try:
        for f, stamp in seen.items():
            if _stamp(f) != stamp:
                raise D3FastError(f"{f} changed while it was imported (checked, then read again): run the import "
                                  "again once it is complete")
            digest = sha256_file(f)
            for t, traj in enumerate(read_buffer(f)):
                snapshots = torch.stack([flatten(s) for s in traj])
                crcs = tuple(row_crc(row) for row in snapshots)
                if crcs in have:  # the folder holds this trajectory already (imported, or exported from here)
                    result.skipped += 1
                    bar.update(1)
                    continue
                load_flat_params(net, snapshots[-1].to(test.device))
                acc = evaluate_accuracy(net, test)
                index = _write_next(out, snapshots, acc, layout, {"format": "mtt", "file": f.name, "sha256": digest,
                                                                  "trajectory": t})
                have.add(crcs)
                result.indices.append(index)
                result.test_acc.append(acc)
                result.epochs.append(len(snapshots) - 1)
                bar.update(1)
    finally:
        bar.close()


def _held(out: Path) -> set[tuple[int, ...]]:
    """The trajectories `out` holds, each as its rows' CRC-32s (in every expert file's header):
    a trajectory imported before, or one of these experts exported and imported back, is
    recognised without reading a row (51 CRC-32s colliding by chance: never)."""
    return {tuple(m["row_crc32"]) for p in sorted(out.glob("expert_*.safetensors"))
            if (m := read_expert_meta(p)).get("row_crc32") is not None}


def _write_next(out: Path, snapshots: torch.Tensor, acc: float, layout: list, source: dict[str, Any]) -> int:
    """Write an imported expert under the lowest free index, holding that index's lock (the
    one `d3fast experts` training takes), so a concurrent training or import never writes
    the same file."""
    index = 0
    while True:
        path = expert_path(out, index)
        if not path.exists():
            with locked(out / f"expert_{index:04d}.lock") as held:
                if held and not path.exists():
                    write_expert(path, snapshots, index=index, seed=-1, complete=True, test_acc=acc, history=[],
                                 param_layout=layout, imported=source)
                    return index
        index += 1


def import_summary(cfg: Config, res: ImportResult) -> list[str]:
    """What `d3fast experts import` prints: the count, accuracy, and what distill will do."""
    lines = list(f"note: {n}" for n in res.notes)
    if not res.indices:
        lines.append(f"nothing new: {res.out_dir} holds these {res.skipped} trajectories already")
    else:
        acc = torch.tensor(res.test_acc)
        lines.append(f"imported {len(res.indices)} expert trajectories ({min(res.epochs)}-{max(res.epochs)} epochs) "
                     f"into {res.out_dir}" + (f" ({res.skipped} held already)" if res.skipped else ""))
        lines.append(f"last-epoch test accuracy {acc.mean():.1%} ± {acc.std(unbiased=False):.1%} (min {acc.min():.1%})")
        chance = 1 / int(load_split(cfg.data.dataset, "test", mmap=True)[2]["num_classes"])
        if float(acc.mean()) < 2 * chance:
            lines.append(f"warning: near chance ({chance:.0%}): the buffer's experts were trained on other data, "
                         "another normalisation (ZCA: data.zca) or another class order; distilling from them will "
                         "not work")
    # what distill will make of the folder, whether this import wrote to it or found it done
    need = need_epochs(cfg)
    short = [p.name for p in sorted(res.out_dir.glob("expert_*.safetensors"))
             if read_expert_meta(p)["epochs_done"] < need]
    if short:
        lines.append(f"warning: distillation reads {need} epochs (distill.max_start_epoch + distill.expert_epochs); "
                     f"{len(short)} expert(s) here hold fewer and will be left out ({', '.join(short[:3])}"
                     f"{', ...' if len(short) > 3 else ''})")
    total = len(list(res.out_dir.glob("expert_*.safetensors")))
    if total < cfg.experts.num_experts:
        lines.append(f"experts.num_experts={cfg.experts.num_experts}: `d3fast distill` would train the other "
                     f"{cfg.experts.num_experts - total} here first; to use only these, add --set "
                     f"experts.num_experts={total}")
    return lines


def export_buffers(cfg: Config, out_root: str | Path, per_file: int = PER_FILE,
                   echo: Callable[[str], None] = print) -> list[Path]:
    """Write the complete experts of `cfg` as MTT replay buffers under
    <out_root>/<dataset dir>/<model>/replay_buffer_<n>.pt (`per_file` trajectories each, one
    snapshot per epoch); returns the files.

    Raises:
        D3FastError: no complete expert; another network; buffers already in that folder
            (never mixed with or overwritten).
    """
    _check_convnet(cfg)
    if per_file < 1:
        raise D3FastError(f"--per-file must be at least 1, got {per_file}")
    resolve_data_loader(cfg)
    folder = experts_dir(cfg)
    paths = sorted(folder.glob("expert_*.safetensors")) if folder.is_dir() else []
    metas = [(p, read_expert_meta(p)) for p in paths]
    done = [(p, m) for p, m in metas if m["complete"]]
    if not done:
        raise D3FastError(f"no complete expert trajectory in {folder}; train them with:\n  {experts_command(cfg)}")
    manifest = load_split(cfg.data.dataset, "train", mmap=True)[2]
    res, channels = int(manifest["resolution"]), int(manifest["channels"])
    net = build_network(cfg.net, channels, int(manifest["num_classes"]), res)
    target = Path(out_root).expanduser() / dataset_dir(cfg.data.dataset, cfg.data.zca, res) / model_name(
        cfg.net.width, cfg.net.depth or default_depth(res), cfg.net.norm, cfg.net.pooling)
    blocked = next((p for p in [target, *target.parents] if p.exists() and not p.is_dir()), None)
    if blocked is not None:
        raise D3FastError(f"{blocked} is a file, where the buffers' folder {target} would go: pass another --out")
    if target.is_dir() and any(BUFFER_RE.match(p.name) for p in target.iterdir()):
        raise D3FastError(f"{target} holds replay buffers already: MTT reads every replay_buffer_<n>.pt there, so "
                          "d3fast never mixes experts into them; pass another --out or remove them")
    layout = param_layout(net)
    if any(m["param_layout"] != [[name, list(shape)] for name, shape in layout] for _, m in done):
        raise D3FastError(f"the experts in {folder} have another parameter layout than net.* builds now")
    for note in (padding_note(channels, res), model_note(target.name), dataset_note(cfg.data.dataset)):
        if note:
            echo(f"note: {note}")
    if any(b for _, m in done for b in [m.get("__shapes__", {}).get("buffers")]):
        echo("note: MTT's buffers hold parameters only: the experts' running statistics are left out")
    written = []
    for n, start in enumerate(range(0, len(done), per_file)):
        trajectories = []
        for p, m in done[start:start + per_file]:
            rows = read_expert(p)[0]["trajectory"][::m.get("snapshots_per_epoch", 1)]
            trajectories.append([unflatten(row, layout) for row in rows])
        path = target / f"replay_buffer_{n}.pt"
        write_buffer(path, trajectories)
        written.append(path)
    ds_dir = dataset_dir(cfg.data.dataset, cfg.data.zca, res).split("/")
    args = f"--dataset {ds_dir[0].removesuffix('_NO_ZCA')} --model {target.name} --buffer_path {Path(out_root)}"
    if ds_dir[0] == "ImageNet":
        args += f" --subset {ds_dir[1]} --res {res}"
    if cfg.data.zca:
        args += " --zca"
    echo(f"wrote {len(done)} expert trajectories to {len(written)} replay buffer(s) in {target}; MTT's distill.py "
         f"reads them with: {args}")
    return written


def command_import(cfg: Config, path: str | Path, no_auto: bool = False) -> None:
    """`d3fast experts import PATH`: prepare the dataset if needed, import, print the summary."""
    import click

    from d3fast.preflight import ensure_prepared

    ensure_prepared(cfg, no_auto)
    res = import_buffers(cfg, path)
    for line in import_summary(cfg, res):
        click.echo(line)
