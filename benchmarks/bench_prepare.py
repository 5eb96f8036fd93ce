"""`d3fast prepare` throughput: 128x128 center crops decoded from ImageNet-like 500x375
JPEGs (quality 90), 10 classes x (300 train + 50 val) = 3,500 files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from benchmarks._data import make_tree
from d3fast.config import resolve_config
from d3fast.data.prepare import prepare

_RATES: dict[int, float] = {}  # workers -> images/s of this session
TREE = Path(os.environ.get("D3FAST_BENCH_TREE", "/tmp/d3fast-bench/imagenette-like"))


@pytest.mark.parametrize("workers", [1, os.cpu_count() or 1])
def test_prepare_throughput(benchmark, provenance, home, workers):
    root = make_tree(TREE, n_train=300, n_val=50)
    cfg = resolve_config("imagenette", overrides=[f"data.data_path={root}", f"data.workers={workers}"])
    res = benchmark.pedantic(lambda: prepare(cfg, force=True, progress=False), rounds=1, iterations=1)
    assert res.decoded == 3500
    rate = res.decoded / benchmark.stats["mean"]
    _RATES[workers] = rate
    if workers > 1 and 1 in _RATES:
        benchmark.extra_info["ratios"] = {f"{workers} workers vs 1": round(rate / _RATES[1], 2)}
    benchmark.extra_info.update(workers=workers, images=res.decoded, images_per_s=round(rate, 1))
