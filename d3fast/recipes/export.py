"""`d3fast export` and `d3fast sample`: a distilled object written as other tools read it
(its distribution as safetensors; a fixed draw of images as .pt or an ImageFolder:
d3fast/exports.py), or as a PNG grid of its priors (d3fast/visualize.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import click
import torch

from d3fast.config import Config
from d3fast.data.normalize import to_pixels
from d3fast.distilled import draw_set
from d3fast.errors import D3FastError
from d3fast.exports import describe, export, is_export, write_imagefolder, write_pt, zca_of
from d3fast.recipes.evaluate import Target
from d3fast.run import refuse_overwrite, refuse_run_file
from d3fast.visualize import is_grid, sample_grid

# what a sample grid may be named: it is written as PNG
NOT_PNG = (".jpg", ".jpeg", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".pdf", ".svg")


def zca_or_note(cfg: Config) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The dataset's ZCA to de-whiten with, or None with a note when it cannot be had."""
    try:
        return zca_of(cfg)
    except D3FastError as e:
        click.echo(f"note: showing ZCA-whitened images ({e})", err=True)
        return None


def sample_command(opened: Callable[[], Target], out: str, samples: int, seed: int,
                   max_classes: int) -> Path:
    """`d3fast sample`: per prior its mean image then `samples` fresh samples, a row per
    class (the first `max_classes`; 0: every class), written to the PNG `out`. `opened` opens the
    object (`distilled_target`), after `out` is checked.

    Raises:
        D3FastError: `out` inside a run, not .png, or a file that is not an earlier grid."""
    refuse_run_file(out)
    if Path(out).suffix.lower() in NOT_PNG:
        raise D3FastError(f"--out {out}: the grid is written as PNG; name it <something>.png")
    # re-sampling into the same file is the usual loop: an earlier d3fast grid is replaced freely
    refuse_overwrite(out, True, not Path(out).exists() or is_grid(Path(out)), "sample grid")
    t = opened()
    assert t.d is not None
    path = sample_grid(t.d, Path(out), samples, seed, bn=t.cfg.eval.decoder_bn, zca=zca_or_note(t.cfg),
                       title=f"{Path(t.name).name}  step {t.step}", max_classes=max_classes)
    shown = t.d.num_classes if max_classes == 0 else min(max_classes, t.d.num_classes)
    click.echo(f"wrote {path} (step {t.step}, {shown * t.d.ppc} of {t.d.num_priors} priors)")
    return path


def export_command(opened: Callable[[], Target], out: str, fmt: str, per_class: int | None = None, pixels: bool = False,
                   seed: int | None = None, force: bool = False) -> None:
    """`d3fast export`: the distribution as safetensors (latents, decoder, learned lr, config,
    dataset, step, version), or a fixed draw of images (`fmt` pt | imagefolder; the draw
    `d3fast evaluate --set eval.fresh_samples=false` trains on, so the export re-evaluates to
    the run's numbers).

    Raises:
        D3FastError: `out` inside a run, in the way, or an earlier export without `force`;
            options of another format; a draw size out of range."""
    refuse_run_file(out)
    t = opened()
    d, cfg, e = t.d, t.cfg, t.cfg.eval
    assert d is not None
    if fmt == "safetensors":
        if Path(out).is_dir():
            raise D3FastError(f"cannot write {out}: it is a directory (the safetensors export is one file; "
                              "--format pt or imagefolder write directories)")
        refuse_overwrite(out, force, is_export(Path(out)), "safetensors export")
        if pixels or per_class is not None or seed is not None:
            raise D3FastError("--pixels, --per-class and --seed choose a draw of images: use them with --format pt "
                              "or imagefolder")
        export(d, out, describe(cfg, d, t.step, zca_or_note(t.cfg) if cfg.data.zca else None))
        click.echo(f"wrote {out}: {d.num_priors} priors, {d.storage_bytes() / 2**20:.2f} MiB "
                   f"(= {d.images_per_class_equivalent():.1f} uint8 images per class), step {t.step}")
        return
    if pixels and fmt == "imagefolder":
        raise D3FastError("--pixels chooses pixels for --format pt; an ImageFolder always holds pixels (PNG)")
    k = per_class if per_class is not None else e.samples_per_class
    if not 1 <= k <= 100_000:
        raise D3FastError(f"--per-class must be in 1..100000, got {k}")
    zca = None
    if cfg.data.zca and (pixels or fmt == "imagefolder"):
        zca = zca_of(cfg)  # de-whitening needs the dataset's own ZCA: an error names the prepare command
    seed = e.seed if seed is None else seed
    x, y, soft = draw_set(d, k, seed, e.decoder_bn, e.batch_size)
    info = describe(cfg, d, t.step, zca) | {"per_class": k, "seed": seed, "pixels": bool(pixels or fmt == "imagefolder")}
    if fmt == "pt":
        write_pt(Path(out), to_pixels(x, d.meta, zca) if pixels else x, y, soft, d.student_lr, info, force)
        what = "pixels in [0, 1]" if pixels else "normalised" + (" and ZCA-whitened" if cfg.data.zca else "")
    else:
        write_imagefolder(Path(out), to_pixels(x, d.meta, zca), y, d.classes, soft, d.student_lr, info, force)
        what = "PNG"
    click.echo(f"wrote {out}: {len(x)} images ({k} per class x {d.num_classes} classes, {what}), "
               f"lr {d.student_lr:.4g}" + (", soft labels" if soft is not None else "") + f", step {t.step}")
