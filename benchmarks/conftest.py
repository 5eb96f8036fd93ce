"""`pytest benchmarks/ --benchmark` runs the benchmark suite (pytest-benchmark has no such
flag: it is registered here). Without `--benchmark` every benchmark is skipped.

With it, each benchmark's record (timing statistics, extra_info, provenance) is collected,
written to `benchmarks/results/<device>/<time>-<commit>.json` and `latest.json` (atomic
writes), and a summary table of the ratios the benchmarks report (speedups, memory savings,
each against its stated target) is printed at the end.

A benchmark reports ratios through `benchmark.extra_info["ratios"] = {label: value}` and
targets through `benchmark.extra_info["targets"] = {label: minimum}`.
"""

from __future__ import annotations

import os
import platform
import re
import time
from pathlib import Path
from typing import Any

import pytest

RESULTS = pytest.StashKey[list]()
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def pytest_addoption(parser):
    parser.addoption(
        "--benchmark", action="store_true", default=False,
        help="run d3fast's benchmarks (they are skipped otherwise)",
    )
    parser.addoption(
        "--results-dir", default=str(RESULTS_DIR),
        help="where --benchmark writes <device>/<time>-<commit>.json (default: benchmarks/results)",
    )


def pytest_configure(config):
    config.stash[RESULTS] = []


def pytest_collection_modifyitems(config, items):
    if config.getoption("--benchmark"):
        return
    skip = pytest.mark.skip(reason="benchmarks run with: pytest benchmarks/ --benchmark")
    for item in items:
        item.add_marker(skip)


def _machine() -> dict[str, Any]:
    from d3fast.runtime import device_name, resolve_device

    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        mem_gib = None
    import torch

    return {
        "device": device_name(resolve_device("auto")),
        "host_cpu": device_name(torch.device("cpu")),
        "cores": os.cpu_count(),
        "memory_gib": round(mem_gib, 1) if mem_gib else None,
        "platform": platform.platform(),
        "cuda": torch.version.cuda,
        "cpu_levels": _cpu_levels(),
    }


# what picks the instruction set of each side of a CPU comparison: set all four to AVX2 and an
# AVX-512 machine runs as an AVX2 one (ATen's kernels and Inductor's code, MKL, oneDNN, d3fast._C)
ISA_VARIABLES = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA", "D3FAST_CPU_ISA")


def _cpu_levels() -> dict[str, Any]:
    import torch

    from d3fast._ext import _C

    return {"aten": torch.backends.cpu.get_cpu_capability(), "d3fast": _C.cpu_isa() if _C is not None else None,
            "d3fast_available": _C.cpu_isas() if _C is not None else [],
            "set": {k: os.environ[k] for k in ISA_VARIABLES if k in os.environ}}


@pytest.fixture
def provenance(benchmark, request):
    """Device and versions stored with every benchmark record; after the test, the record
    joins the session's results file."""
    from d3fast.runtime import device_name, resolve_device, versions

    info = {"device": device_name(resolve_device("auto")), **versions()}
    benchmark.extra_info.update(info)
    yield info
    stats = benchmark.stats
    if stats is None:  # skipped inside the test, or failed before timing
        return
    s = stats.stats
    request.config.stash[RESULTS].append({
        "name": request.node.nodeid,
        "module": request.node.module.__name__.rsplit(".", 1)[-1],
        "id": request.node.callspec.id if hasattr(request.node, "callspec") else "",
        "params": {k: _plain(v) for k, v in request.node.callspec.params.items()} if hasattr(request.node, "callspec") else {},
        "seconds": {"median": s.median, "mean": s.mean, "min": s.min, "max": s.max, "rounds": s.rounds},
        "extra_info": {k: v for k, v in benchmark.extra_info.items() if k not in info},
    })


def _plain(v: Any) -> Any:
    return v if isinstance(v, (int, float, str, bool)) or v is None else str(v)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60]


def pytest_sessionfinish(session, exitstatus):
    config = session.config
    results = config.stash.get(RESULTS, [])
    if not config.getoption("--benchmark") or not results:
        return
    from d3fast.io import atomic_write_json
    from d3fast.runtime import versions

    machine = _machine()
    vers = versions()
    kind = "cuda" if machine["cuda"] and "CPU" not in machine["device"] else "cpu"
    folder = Path(config.getoption("--results-dir")) / f"{kind}-{_slug(machine['device'].replace('(CPU)', ''))}"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    doc = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": "pytest " + " ".join(config.invocation_params.args),
        "exit_status": int(exitstatus),
        "machine": machine,
        "versions": vers,
        "git_dirty": _git_dirty(),
        "results": results,
    }
    path = folder / f"{stamp}-{(vers['git_commit'] or 'nogit')[:8]}.json"
    atomic_write_json(path, doc)
    atomic_write_json(folder / "latest.json", doc)
    config.stash[_WRITTEN] = path


_WRITTEN = pytest.StashKey[Path]()


def _git_dirty() -> bool | None:
    import subprocess

    try:
        out = subprocess.run(["git", "-C", str(RESULTS_DIR.parent.parent), "status", "--porcelain", "--",
                              "d3fast", "kernels", "csrc", "benchmarks/*.py"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return bool(out.stdout.strip()) if out.returncode == 0 else None


def summary_rows(results: list[dict[str, Any]]) -> list[list[str]]:
    """One row per reported ratio: benchmark, median time, ratio, value, target, verdict."""
    rows = [["benchmark", "median", "ratio", "value", "target", ""]]
    for r in results:
        extra = r["extra_info"]
        ratios, targets = extra.get("ratios") or {}, extra.get("targets") or {}
        name = r["module"].removeprefix("bench_") + (f"[{r['id']}]" if r["id"] else "")
        med = _fmt_s(r["seconds"]["median"])
        if not ratios:
            rows.append([name, med, "-", "", "", ""])
        for label, value in ratios.items():
            target = targets.get(label)
            verdict = "" if target is None or value is None else ("met" if value >= target else "MISSED")
            rows.append([name, med, label, "n/a" if value is None else f"{value:.2f}x",
                         "" if target is None else f">= {target:g}x", verdict])
    return rows


def _fmt_s(s: float) -> str:
    return f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.2f} s"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    results = config.stash.get(RESULTS, [])
    if not config.getoption("--benchmark") or not results:
        return
    rows = summary_rows(results)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    terminalreporter.section("d3fast benchmark summary")
    for k, r in enumerate(rows):
        terminalreporter.write_line("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
        if k == 0:
            terminalreporter.write_line("  ".join("-" * w for w in widths))
    path = config.stash.get(_WRITTEN, None)
    if path is not None:
        terminalreporter.write_line(f"results: {path}")


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("D3FAST_HOME", str(tmp_path / "home"))
    return tmp_path / "home"
