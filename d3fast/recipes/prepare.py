"""`d3fast prepare`: decode a dataset once into the uint8 cache (d3fast/data/prepare.py) and,
with `--format ffcv`, write FFCV .beton files beside it from the same decoded images
(d3fast/data/beton.py)."""

from __future__ import annotations

import click

from d3fast.config import Config
from d3fast.data.beton import require_ffcv, write_betons
from d3fast.data.prepare import prepare
from d3fast.preflight import describe_prepare


def command(cfg: Config, force: bool = False, fmt: str = "cache", ffcv_mode: str = "raw",
            jpeg_quality: int = 90) -> None:
    """Prepare `cfg`'s dataset (`force`: decode again even when the cache is up to date);
    `fmt` "ffcv" also writes train/test .beton files (`ffcv_mode` raw or jpg).

    Raises:
        D3FastError: FFCV missing (checked before decoding anything), unreadable or missing
            files, a wrong layout."""
    if fmt == "ffcv":
        require_ffcv(cfg.data.dataset)  # before decoding anything
    click.echo(describe_prepare(prepare(cfg, force=force)))
    if fmt == "ffcv":
        status, man = write_betons(cfg.data.dataset, ffcv_mode, jpeg_quality, cfg.data.workers, force)
        sizes = ", ".join(f"{s} {man['counts'][s]} images {man['bytes'][s] / 2**20:.1f} MiB" for s in ("train", "test"))
        click.echo(f"{'reused' if status == 'reused' else 'wrote'} FFCV ({man['mode']}) files: {sizes}")
