"""The Triton kernels read from the compiler's output, without a GPU.

    python -m benchmarks.kernel_audit [--arch 90] [--out FILE.md] [--json FILE]

Every configuration the dispatch picks at D3's shapes is captured by calling the public ops
(`kernels.mmd2`, `kernels.param_dist`, forward and backward) on fake CUDA tensors
(torch's FakeTensorMode: shapes and dtypes, no memory, no device): each Triton launch is
recorded with its arguments, grid and options instead of run, and every other op that would
launch a GPU kernel (a copy, a fill, arithmetic; not views or allocations) is counted. Each
recorded launch is bound as Triton's own launcher binds it (the same divisibility
specialisations) and compiled ahead of time for the target with `triton.compile(ASTSource,
GPUTarget)`; the cubin is read with the cuobjdump and nvdisasm shipped in the triton wheel:

  regs, smem     registers per thread, static shared memory per CTA (cuobjdump)
  spill          local-memory instructions (STL/LDL) in the SASS: Triton keeps nothing in
                 local memory on purpose, so every one is a spill
  CTA/SM         CTAs resident per SM from registers, shared memory and warps
  TC             tensor-core instructions (HMMA/HGMMA/IMMA), and how many sit in loops
  issue us       a floor on the kernel's time from instruction issue: the SASS instructions
                 one warp executes (loop bodies weighted by their trip counts, which the
                 audit knows from the launch: `trips()`), times the warps that share one of an
                 SM's 4 schedulers, at one instruction per cycle at SM_CLOCK_GHZ
  dram us        the bytes of every tensor the launch touches, read or written once, at the
                 DRAM bandwidth
  bound us       per call: the sum over its launches of max(issue, dram), plus every torch op
                 at its DRAM time (ops are counted, not compiled)

The issue time assumes perfect latency hiding, and counts every instruction outside loops once
for every warp, on branches taken or not: the work of the slowest program (the last of a
group, which also reduces the group's partial sums), which the others do not all do. It is a
static estimate, not a strict floor. scripts/gpu_check.py times the same shapes on a GPU
against these bounds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from d3fast.phases import launches_kernel

ROOT = Path(__file__).resolve().parent.parent

# Per target: SMs, SM clock (GHz), DRAM bandwidth (GB/s), shared memory per SM (KiB), registers
# per SM. H100 SXM5 (sm_90): 132 SMs, 1.755 GHz (the clock it holds under sustained load;
# 1.98 GHz max), 3,350 GB/s HBM3, 228 KiB. A100 SXM4 (sm_80): 108 SMs, 1.41 GHz, 2,039 GB/s,
# 164 KiB. Both: 65,536 registers, 64 warps and 32 CTAs per SM, 1 KiB of shared memory
# reserved per CTA.
ARCH = {
    90: {"gpu": "H100 SXM5", "sms": 132, "ghz": 1.755, "dram_gbs": 3350.0, "smem_kib": 228},
    80: {"gpu": "A100 SXM4", "sms": 108, "ghz": 1.41, "dram_gbs": 2039.0, "smem_kib": 164},
}
REGS_PER_SM, WARPS_PER_SM, CTAS_PER_SM = 65536, 64, 32

# D3's shapes (SPEC: ConvNet features are 2,048-d; mmd_samples 30, 12 or 20 a side)
MMD_SHAPES = {  # name: (C, n, m, D)
    "imagewoof": (10, 30, 30, 2048),
    "imagenet64 subtask": (200, 20, 20, 2048),
    "n=m=256": (10, 256, 256, 2048),
    "n=m=1024, D=64": (10, 1024, 1024, 64),
}
PARAM_SHAPES = {"P=615,690 (ConvNet-5 @128)": 615_690, "P=64M": 64 << 20}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Targets the audit test holds the kernels to (issue 30)
MAX_LAUNCHES = {"mmd2": 2, "param_dist": 2}
IMAGEWOOF_BOUND_US = 10.0

@dataclass
class Launch:
    """One recorded launch: a Triton kernel (fn set) or a torch op (fn None)."""

    name: str
    nbytes: int
    fn: Any = None
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    grid: tuple = ()


def _nbytes(values: Any) -> int:
    seen, total = set(), 0
    for v in values:
        if isinstance(v, torch.Tensor) and id(v) not in seen:
            seen.add(id(v))
            total += v.numel() * v.element_size()
    return total


class _CountOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every op that launches a GPU kernel while counting[0] is set."""

    def __init__(self, log: list[Launch], counting: list[bool]):
        super().__init__()
        self.log = log
        self.counting = counting

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        flat = list(torch.utils._pytree.tree_leaves((args, kwargs, out)))
        on_gpu = any(isinstance(t, torch.Tensor) and t.is_cuda for t in flat)
        if self.counting[0] and on_gpu and launches_kernel(func):
            self.log.append(Launch(f"torch.{name}", _nbytes(flat)))
        return out


class _Ctx:
    """What an autograd Function's forward and backward use of their ctx."""

    def __init__(self, needs: list[bool]):
        self.needs_input_grad = tuple(needs)
        self.saved_tensors: tuple = ()

    def save_for_backward(self, *tensors: torch.Tensor) -> None:
        self.saved_tensors = tensors


def _apply_now(counting: list[bool]) -> Callable[..., Any]:
    """An autograd Function's apply that runs forward, then at once backward with a ones
    upstream gradient when an input requires one. Fake CUDA tensors cannot enter the autograd
    graph on a CPU-only torch build (it asks the missing CUDA device guard), so the audit
    drives the two halves itself, as the engine would."""

    def apply(cls: Any, *args: Any) -> Any:
        ctx = _Ctx([isinstance(a, torch.Tensor) and a.requires_grad for a in args])
        with torch.no_grad():
            out = cls.forward(ctx, *args)
            if any(ctx.needs_input_grad):
                was, counting[0] = counting[0], False  # the engine's upstream gradient is not the op's launch
                # expanded, as the mean over students or classes gives it
                up = torch.ones((), device=out.device, dtype=out.dtype).expand(out.shape)
                counting[0] = was
                cls.backward(ctx, up)
        return out

    return apply


def capture(setup: Callable[[], Any], call: Callable[[Any], Any]) -> list[Launch]:
    """Every GPU launch `call` makes on fake CUDA tensors, in order, forward then backward (it
    runs twice: caches of device constants fill on the first run, the second is recorded).
    setup() makes the inputs, unrecorded; call(inputs) is the op."""
    from triton.runtime.jit import JITFunction

    from d3fast.kernels import mmd_triton, param_dist_triton

    log: list[Launch] = []
    counting = [False]
    real_run = JITFunction.run
    functions = (mmd_triton.MMDFunction, param_dist_triton.ParamDistFunction)
    real_apply = [f.__dict__["apply"] if "apply" in f.__dict__ else None for f in functions]

    def record(self, *args, grid, warmup, **kwargs):  # type: ignore[no-untyped-def]
        if counting[0]:
            g = grid(kwargs) if callable(grid) else grid
            log.append(Launch(self.fn.__name__, _nbytes(args), self, args, kwargs, tuple(g)))
        return None

    JITFunction.run = record
    for f in functions:
        f.apply = classmethod(_apply_now(counting))  # type: ignore[method-assign, assignment]
    try:
        for rec in (False, True):
            with _CountOps(log, counting):
                inputs = setup()
                counting[0] = rec
                call(inputs)
                counting[0] = False
    finally:
        JITFunction.run = real_run
        for f, orig in zip(functions, real_apply, strict=True):
            if orig is None:
                del f.apply
            else:
                f.apply = orig
    return log


class _Ptr:
    """A fake tensor as Triton's binder sees a pointer argument: a dtype and an address with
    the alignment a CUDA allocation has (256 bytes, plus the storage offset)."""

    def __init__(self, t: torch.Tensor):
        self.dtype = t.dtype
        self._addr = (1 << 30) + t.storage_offset() * t.element_size()

    def data_ptr(self) -> int:
        return self._addr


def compile_launch(launch: Launch, arch: int) -> Any:
    """The launch compiled for sm_<arch> as Triton's launcher would compile it."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.fn
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    args = tuple(_Ptr(a) if isinstance(a, torch.Tensor) else a for a in launch.args)
    bound, spec, opts = binder(*args, **launch.kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, launch.kwargs, bound, spec, opts)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__), bound


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


@dataclass
class Sass:
    regs: int
    smem: int
    spills: int
    tc: int
    tc_in_loops: int
    instructions: int
    ffma: int  # fused multiply-adds (FFMA)
    loads: int  # global loads (LDG)
    wide_loads: int  # of them 64- or 128-bit
    loops: list[tuple[int, int, int]]  # (first address, last address, instructions), in address order
    lines: list[tuple[int, str]]  # (address, opcode)


def read_cubin(cubin: bytes) -> Sass:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", str(path)], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([_tool("nvdisasm"), "-c", str(path)], capture_output=True, text=True, check=True).stdout
    regs = int(re.search(r"REG:(\d+)", usage).group(1))  # type: ignore[union-attr]
    smem = int(re.search(r"SHARED:(\d+)", usage).group(1))  # type: ignore[union-attr]
    labels: dict[str, int] = {}
    lines: list[tuple[int, str]] = []
    branches: list[tuple[int, str]] = []
    pending: list[str] = []
    for raw in sass.splitlines():
        if m := re.match(r"^(\.L_x_\d+):", raw.strip()):
            pending.append(m.group(1))
            continue
        if not (m := re.match(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", raw)):
            continue
        addr, text = int(m.group(1), 16), m.group(2).strip()
        for lab in pending:
            labels[lab] = addr
        pending = []
        op = re.sub(r"^@!?U?P\w+\s+", "", text).split()[0]
        lines.append((addr, op))
        if op.startswith("BRA") and (b := re.search(r"\((\.L_x_\d+)\)", text)):
            branches.append((addr, b.group(1)))
    # a branch back to an earlier address closes a loop; loops sharing a head are one loop;
    # a branch to itself is the trap after the last EXIT, never reached
    heads: dict[int, int] = {}
    for addr, lab in branches:
        if lab in labels and labels[lab] < addr:
            heads[labels[lab]] = max(heads.get(labels[lab], 0), addr)
    loops = sorted((h, e, sum(1 for a, _ in lines if h <= a <= e)) for h, e in heads.items())
    in_loop = [any(h <= a <= e for h, e, _ in loops) for a, _ in lines]
    is_tc = [op.split(".")[0] in ("HMMA", "HGMMA", "IMMA", "IGMMA", "DMMA") for _, op in lines]
    return Sass(
        regs=regs, smem=smem,
        spills=sum(1 for _, op in lines if op.split(".")[0] in ("STL", "LDL")),
        tc=sum(is_tc), tc_in_loops=sum(t and i for t, i in zip(is_tc, in_loop, strict=True)),
        instructions=len(lines), loops=loops, lines=lines,
        ffma=sum(1 for _, op in lines if op.split(".")[0] == "FFMA"),
        loads=sum(1 for _, op in lines if op.startswith("LDG")),
        wide_loads=sum(1 for _, op in lines if op.startswith("LDG") and (".64" in op or ".128" in op)),
    )


def trips(name: str, bound: dict[str, Any]) -> list[int]:
    """Trip counts of the kernel's runtime loops, outermost first in address order, from the
    launch's arguments (the kernels' loops are flat: every other loop is unrolled)."""
    if name == "_mmd_fwd_kernel":
        return [math.ceil(min(bound["D_SPLIT"], bound["D"]) / bound["BD"])]
    if name == "_mmd_bwd_kernel":
        return [math.ceil(bound["N"] / bound["BN"])]
    if name == "_param_dist_fwd_kernel":
        # whole blocks, then the partial sums (the row's last program only: a tail)
        return [bound["ITERS"], math.ceil(bound["num_partials"] / bound["BLOCK"])]
    if name == "_param_dist_bwd_kernel":
        return []
    raise KeyError(f"no trip counts known for {name}: add them to benchmarks/kernel_audit.py trips()")


def warp_instructions(sass: Sass, loop_trips: list[int]) -> int | None:
    """Instructions one warp issues: a loop's body counted trips times (None when the SASS has
    a different number of loops than the kernel is known to have)."""
    top = [lp for lp in sass.loops if not any(o != lp and o[0] <= lp[0] and lp[1] <= o[1] for o in sass.loops)]
    if len(top) != len(loop_trips) or len(top) != len(sass.loops):
        return None
    return sass.instructions + sum(n * (t - 1) for (_, _, n), t in zip(top, loop_trips, strict=True))


def ctas_per_sm(regs: int, smem: int, warps: int, arch: int) -> int:
    regs_per_warp = math.ceil(regs * 32 / 256) * 256
    by_regs = REGS_PER_SM // (regs_per_warp * warps)
    by_smem = (ARCH[arch]["smem_kib"] * 1024) // (smem + 1024)
    return max(min(by_regs, by_smem, WARPS_PER_SM // warps, CTAS_PER_SM), 0)


def _dram_us(nbytes: int, arch: int) -> float:
    """Microseconds to move `nbytes` once at the architecture's DRAM bandwidth."""
    return nbytes / (ARCH[arch]["dram_gbs"] * 1e3)


def audit_launch(launch: Launch, arch: int) -> dict[str, Any]:
    spec = ARCH[arch]
    kernel, bound = compile_launch(launch, arch)
    sass = read_cubin(kernel.asm["cubin"])
    warps = kernel.metadata.num_warps
    smem = max(sass.smem, kernel.metadata.shared)
    ctas = math.prod(launch.grid)
    resident = ctas_per_sm(sass.regs, smem, warps, arch)
    per_warp = warp_instructions(sass, trips(launch.name, dict(bound)))
    dram_us = _dram_us(launch.nbytes, arch)
    issue_us = None
    if per_warp is not None:
        # the CTAs an SM runs over the whole grid, their warps spread over its 4 schedulers
        warps_per_scheduler = max(math.ceil(math.ceil(ctas / spec["sms"]) * warps / 4), 1)
        issue_us = warps_per_scheduler * per_warp / (spec["ghz"] * 1e3)
    return {
        "kernel": launch.name, "grid": list(launch.grid), "ctas": ctas, "warps": warps, "regs": sass.regs,
        "smem": smem, "spills": sass.spills, "ffma": sass.ffma, "loads": sass.loads, "wide_loads": sass.wide_loads,
        "ctas_per_sm": resident, "tc": sass.tc, "tc_in_loops": sass.tc_in_loops,
        "warp_instructions": per_warp, "issue_us": issue_us, "dram_us": dram_us,
        "bound_us": max(issue_us or 0.0, dram_us),
    }


def _mmd_case(C: int, n: int, m: int, D: int, dtype: torch.dtype, grad: bool) -> tuple[Callable, Callable]:
    from d3fast import kernels

    def setup() -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.randn(C, n, D, device="cuda", dtype=dtype, requires_grad=grad),
                torch.randn(C, m, D, device="cuda", dtype=dtype, requires_grad=grad))

    # with a gradient wanted, backward runs too (_apply_now)
    return setup, lambda xy: kernels.mmd2(*xy, impl="triton")


def _param_case(P: int, dtype: torch.dtype, grad: bool) -> tuple[Callable, Callable]:
    from d3fast import kernels

    def setup() -> tuple[torch.Tensor, ...]:
        # D3's call: [K, P] students (K = 1), the expert's target and start [P]
        return (torch.randn(1, P, device="cuda", dtype=dtype, requires_grad=grad),
                torch.randn(P, device="cuda", dtype=dtype), torch.randn(P, device="cuda", dtype=dtype))

    return setup, lambda ats: kernels.param_dist(*ats, impl="triton")


def cases() -> list[tuple[str, str, tuple[Callable, Callable]]]:
    """(op, case name, (setup, call)) for every configuration D3 runs: each shape in each
    dtype, with and without a gradient."""
    ops: list[tuple[str, str, Callable[[torch.dtype, bool], tuple[Callable, Callable]]]] = [
        *(("mmd2", name, lambda dt, grad, s=s: _mmd_case(*s, dt, grad)) for name, s in MMD_SHAPES.items()),
        *(("param_dist", name, lambda dt, grad, P=P: _param_case(P, dt, grad)) for name, P in PARAM_SHAPES.items()),
    ]
    return [(op, f"{name} {dt_name} {'fwd+bwd' if grad else 'fwd'}", make(dt, grad))
            for op, name, make in ops for dt_name, dt in DTYPES.items() for grad in (True, False)]


def run_audit(arch: int, only: list[str] | None = None, fusion: bool = True) -> list[dict[str, Any]]:
    """One row per case: its launches (Triton ones audited) and the call's bound."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    os.environ.pop("TRITON_INTERPRET", None)
    rows = []
    compiled: dict[tuple, dict[str, Any]] = {}
    for op, name, (setup, call) in cases():
        if only and not any(o in f"{op} {name}" for o in only):
            continue
        with FakeTensorMode(allow_non_fake_inputs=True):
            launches = capture(setup, call)
        audited = []
        for ln in launches:
            if not fusion and ln.fn is not None:
                ln.kwargs = {**ln.kwargs, "enable_fp_fusion": False}
            if ln.fn is None:  # a torch op: counted at its DRAM time, not compiled
                audited.append({"kernel": ln.name, "dram_us": _dram_us(ln.nbytes, arch), "bound_us": _dram_us(ln.nbytes, arch)})
                continue
            key = (ln.name, ln.grid, tuple(sorted((k, str(v)) for k, v in ln.kwargs.items())),
                   tuple((a.dtype, tuple(a.shape), a.storage_offset()) if isinstance(a, torch.Tensor) else a for a in ln.args))
            if key not in compiled:
                compiled[key] = audit_launch(ln, arch)
            audited.append(compiled[key])
        rows.append({"op": op, "case": name, "launches": len(launches), "kernels": audited,
                     "bound_us": sum(k["bound_us"] for k in audited)})
    return rows


def _fmt(v: Any, digits: int = 1) -> str:
    if v is None:
        return "?"
    return f"{v:.{digits}f}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else str(v)


def provenance() -> dict[str, str]:
    """Versions, commit and date of an audit (it reads the compiler, not a GPU)."""
    import platform
    import time

    import triton

    def git(*args: str) -> str:
        res = subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT)
        return res.stdout.strip() if res.returncode == 0 else "unknown"

    return {"triton": triton.__version__, "torch": torch.__version__, "python": platform.python_version(),
            "commit": git("rev-parse", "--short", "HEAD") + (" (dirty)" if git("status", "--porcelain", "--", "kernels", "benchmarks/kernel_audit.py") else ""),
            "date": time.strftime("%Y-%m-%d", time.gmtime())}


def table(rows: list[dict[str, Any]], arch: int, only: list[str] | None = None) -> str:
    spec = ARCH[arch]
    prov = provenance()
    head = [
        f"# Triton kernels compiled for sm_{arch} ({spec['gpu']}: {spec['sms']} SMs, {spec['ghz']} GHz, "
        f"{spec['dram_gbs']:,.0f} GB/s)", "",
        f"triton {prov['triton']}, torch {prov['torch']}, Python {prov['python']}; kernels at commit {prov['commit']}, "
        f"{prov['date']}; no GPU involved (ahead-of-time compile on a CPU).", "",
        "Regenerate: `python -m benchmarks.kernel_audit --arch " + str(arch)
        + "".join(f' --only "{o}"' for o in only or []) + " --out <this file>` "
        "(benchmarks/kernel_audit.py says how each column is read from the compiler's output).", "",
        "| op | case | launches | bound us | kernel | grid | warps | regs | spill | smem B | CTA/SM | TC (in loops) "
        "| LDG (64/128-bit) | warp instr | issue us | dram us |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    body = []
    for r in rows:
        first = True
        for k in r["kernels"]:
            if "regs" not in k:
                continue
            lead = [r["op"], r["case"], str(r["launches"]), _fmt(r["bound_us"], 2)] if first else ["", "", "", ""]
            first = False
            body.append("| " + " | ".join(lead + [
                k["kernel"], "x".join(map(str, k["grid"])), str(k["warps"]), str(k["regs"]), str(k["spills"]),
                f"{k['smem']:,}", str(k["ctas_per_sm"]), f"{k['tc']} ({k['tc_in_loops']})",
                f"{k['loads']} ({k['wide_loads']})", _fmt(k["warp_instructions"]),
                _fmt(k["issue_us"], 2), _fmt(k["dram_us"], 2)]) + " |")
        torch_ops = [k["kernel"] for k in r["kernels"] if "regs" not in k]
        if torch_ops:
            body.append(f"| | | | | + {', '.join(torch_ops)} |" + " |" * 11)
    return "\n".join(head + body) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, choices=sorted(ARCH))
    p.add_argument("--out", type=Path, help="write the markdown table here (default: print it)")
    p.add_argument("--json", type=Path, help="write every row as JSON here")
    p.add_argument("--only", action="append", help="cases whose 'op case' contains this text (repeatable)")
    p.add_argument("--no-fp-fusion", action="store_true",
                   help="compile with enable_fp_fusion=False instead of the launchers' options (the test shows they matter)")
    a = p.parse_args(argv)
    rows = run_audit(a.arch, a.only, fusion=not a.no_fp_fusion)
    if not rows:
        p.error(f"no case matches --only {a.only}; the cases: " + "; ".join(f"{op} {name}" for op, name, _ in cases()))
    text = table(rows, a.arch, a.only)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text)
    else:
        sys.stdout.write(text)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"arch": a.arch, **ARCH[a.arch], **provenance(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
