"""`pytest benchmarks/ --benchmark` runs the benchmark suite; without `--benchmark` every
benchmark is skipped (pytest-benchmark has no such flag: it is registered here)."""

from __future__ import annotations

import pytest


def pytest_addoption(parser):
    parser.addoption(
        "--benchmark", action="store_true", default=False,
        help="run d3fast's benchmarks (they are skipped otherwise)",
    )


def pytest_collection_modifyitems(config, items):
    if config.getoption("--benchmark"):
        return
    skip = pytest.mark.skip(reason="benchmarks run with: pytest benchmarks/ --benchmark")
    for item in items:
        item.add_marker(skip)


@pytest.fixture
def provenance(benchmark):
    """Device and versions stored with every benchmark record."""
    from d3fast.runtime import device_name, resolve_device, versions

    info = {"device": device_name(resolve_device("auto")), **versions()}
    benchmark.extra_info.update(info)
    return info


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("D3FAST_HOME", str(tmp_path / "home"))
    return tmp_path / "home"
