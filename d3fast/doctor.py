"""`d3fast doctor`: what d3fast will use on this machine, and why."""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import sys

import torch

from d3fast.paths import home


def _version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def report() -> list[tuple[str, str]]:
    from d3fast import kernels
    from d3fast._ext import _C, HAS_EXT, REASON
    from d3fast.runtime import versions

    rows: list[tuple[str, str]] = []
    v = versions()
    rows.append(("d3fast", f"{v['d3fast']} (git {(v['git_commit'] or 'unknown')[:10]})"))
    rows.append(("python", sys.version.split()[0]))
    for pkg in ("torch", "triton", "kornia", "numpy", "pillow", "safetensors", "ffcv"):
        rows.append((pkg, _version(pkg)))
    rows.append(("torch threads", str(torch.get_num_threads())))
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            rows.append((f"cuda:{i}", f"{p.name}, {p.total_memory / 2**30:.1f} GiB, sm_{p.major}{p.minor}"))
        rows.append(("cuda runtime", str(torch.version.cuda)))
    else:
        rows.append(("cuda", "not available: training runs on the CPU"))
    if HAS_EXT and _C is not None:
        info = _C.build_info()
        rows.append(("d3fast._C", f"built ({info['compiler']}, OpenMP threads {info['openmp_threads']}, {info['simd']})"))
    else:
        rows.append(("d3fast._C", REASON))
    for kind, choice in kernels.describe().items():
        rows.append((f"kernels, {kind}", choice))
    rows.append(("loader uint8 cache", "available (default)"))
    from d3fast.data.beton import ffcv_status

    ok, why = ffcv_status()
    rows.append(("loader ffcv", "available (`--loader auto` uses it where `prepare --format ffcv` wrote files)"
                 if ok else f"{why} (bash scripts/bootstrap.sh installs it; `--loader auto` uses the cache)"))
    rows.append(("distributed", _distributed()))
    rows.append(("d3fast home", str(home()) + (" (D3FAST_HOME)" if "D3FAST_HOME" in os.environ else "")))
    data = home() / "data"
    prepared = sorted(p.name for p in data.iterdir() if (p / "manifest.json").exists()) if data.is_dir() else []
    rows.append(("prepared datasets", ", ".join(prepared) or "none"))
    return rows


def _distributed() -> str:
    """What torchrun set for this process (rank, world size, rendezvous) and which backend a
    distributed run would take; the devices this rank may use."""
    import torch.distributed as td

    env = {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k in os.environ}
    backends = [b for b, ok in (("nccl", td.is_nccl_available()), ("gloo", td.is_gloo_available())) if ok]
    backend = "nccl" if torch.cuda.is_available() and "nccl" in backends else "gloo"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    where = (f"rank {env.get('RANK', '?')} of {env['WORLD_SIZE']} (local rank {env.get('LOCAL_RANK', '?')}, "
             f"rendezvous {env.get('MASTER_ADDR', '?')}:{env.get('MASTER_PORT', '?')})"
             if int(env.get("WORLD_SIZE", "1")) > 1 else "single process (launch with torchrun for several)")
    return (f"{where}; backend {backend} (available: {', '.join(backends) or 'none'})"
            + (f"; CUDA_VISIBLE_DEVICES={visible}" if visible is not None else ""))
