"""Named phases of a distillation step, for `d3fast profile`.

The loop and the ops mark their work with `with phase("decode"): ...`. Normally no timer is
active and a marker costs one global lookup (~50 ns; a step makes a few hundred). Under
`d3fast profile` a PhaseTimer is active: each marker

  - opens a `torch.profiler.record_function` range, so the Chrome trace shows the phase;
  - synchronises the GPU at its edges (otherwise a phase's wall time would be the launch
    time of its kernels, and the wait would land in whichever phase synchronises next);
  - books wall time *exclusively*: a phase nested in another (decode inside the unroll)
    is subtracted from its parent, so the phases of a step add up to the step;
  - samples memory at its edges (CUDA: allocated bytes; CPU: resident set); a sampler thread
    (`sample_memory`) adds a reading every 20 ms, so peaks inside a phase (the MMD update's
    chunked backward) show in the memory-over-the-step plot.

Backward passes run inside autograd, out of reach of a `with` block: `backward_phase`
places identity nodes around an op, whose backward calls open and close the phase.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# The phases of a distillation step, in the report's display order. The loop, the ops and
# `d3fast profile` import these names; the report adds "other" (time no phase claimed).
DATA = "data"
DECODE = "decode"
UNROLL_FORWARD = "unroll forward"
UNROLL_BACKWARD = "unroll backward"
PARAM_DISTANCE = "param distance"
MMD = "mmd"
LOSSES = "losses"
OPTIMIZERS = "optimizers"
PHASES = (DATA, DECODE, UNROLL_FORWARD, UNROLL_BACKWARD, PARAM_DISTANCE, MMD, LOSSES, OPTIMIZERS)

_ACTIVE: PhaseTimer | None = None
_NULL = nullcontext()

# aten ops with no kernel behind them (besides views, which say so themselves): allocations,
# metadata reads and in-place metadata changes (autograd's backward calls unsqueeze_ and
# _unsafe_view). Every other aten op is about one kernel launch on a GPU in eager mode.
NO_KERNEL = frozenset({
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "alias", "lift_fresh",
    "_local_scalar_dense", "is_same_size", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "device",
    "size", "stride", "dim", "is_contiguous", "numel", "storage_offset", "set_", "record_stream", "resize_",
    "_unsafe_view", "_reshape_alias", "unsqueeze_", "squeeze_", "t_", "transpose_", "as_strided_", "swapdims_",
})


def launches_kernel(func: torch._ops.OpOverload) -> bool:
    """Whether an op runs a kernel: an aten op (not profiler:: bookkeeping such as the phase
    markers' record_function) that is not a view, an allocation or a metadata change."""
    return func.namespace == "aten" and not func.is_view and func.overloadpacket.__name__ not in NO_KERNEL


@dataclass
class Span:
    name: str
    start: float  # seconds since the timer started
    end: float
    depth: int


@dataclass
class _Open:
    name: str
    start: float
    child: float = 0.0  # time spent in nested phases
    record: Any = None


@dataclass
class PhaseTimer:
    device: torch.device
    # seconds; tests pass a fake clock
    clock: Callable[[], float] = time.perf_counter
    t0: float = field(init=False)
    # exclusive seconds per phase of the current step, then of every finished step
    current: dict[str, float] = field(default_factory=dict)
    steps: list[dict[str, float]] = field(default_factory=list)
    spans: list[Span] = field(default_factory=list)
    memory: list[tuple[float, float]] = field(default_factory=list)  # (seconds, MiB)
    step_edges: list[float] = field(default_factory=list)
    _stack: list[_Open] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.t0 = self.clock()

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return self.clock() - self.t0

    def _mem(self, t: float) -> None:
        self.memory.append((t, self._read_mem()))

    def _read_mem(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device) / 2**20
        return _rss_mib()

    @contextmanager
    def sample_memory(self, interval_s: float = 0.02) -> Iterator[None]:
        """Read memory every `interval_s` from a thread (list.append is atomic in CPython;
        the readings are sorted by time when used). No GPU sync: a host-side counter."""
        stop = threading.Event()

        def run() -> None:
            while not stop.wait(interval_s):
                self.memory.append((self.clock() - self.t0, self._read_mem()))

        thread = threading.Thread(target=run, name="d3fast-memory-sampler", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            self.memory.sort()

    def innermost(self) -> str | None:
        """The innermost open phase; None outside every phase."""
        return self._stack[-1].name if self._stack else None

    def enter(self, name: str) -> None:
        rec = torch.profiler.record_function(name)
        rec.__enter__()
        t = self.now()
        self._mem(t)
        self._stack.append(_Open(name, t, record=rec))

    def exit(self, name: str) -> None:
        if not self._stack or self._stack[-1].name != name:
            open_ = [o.name for o in self._stack]
            raise RuntimeError(f"phase {name!r} closed while {open_} are open")
        t = self.now()
        self._mem(t)
        top = self._stack.pop()
        top.record.__exit__(None, None, None)
        total = t - top.start
        self.current[name] = self.current.get(name, 0.0) + total - top.child
        if self._stack:
            self._stack[-1].child += total
        self.spans.append(Span(name, top.start, t, len(self._stack)))

    @contextmanager
    def span(self, name: str) -> Iterator[None]:
        self.enter(name)
        try:
            yield
        finally:
            self.exit(name)

    def end_step(self) -> dict[str, float]:
        """Close the current step's accounting; returns its exclusive seconds per phase."""
        done, self.current = self.current, {}
        self.steps.append(done)
        self.step_edges.append(self.now())
        return done


@functools.cache
def _kernel_op(name: str) -> bool:
    """Whether a profiler event named `name` is an aten op that runs a kernel: `launches_kernel`
    of each of its overloads (the record names the packet only). Cached: a counted step at
    ImageWoof's shape records ~10^5 events of a few hundred names."""
    if not name.startswith("aten::"):
        return False
    base = name[6:]
    packet = getattr(torch.ops.aten, base, None)
    if packet is None:
        return base not in NO_KERNEL
    return base not in NO_KERNEL and all(launches_kernel(getattr(packet, o)) for o in packet.overloads())


def _compiled_kernel(name: str) -> bool:
    """An Inductor-generated C++ kernel's profiler event (cpp.enable_kernel_profile names it
    graph_<i>_cpp_fused_...)."""
    return name.startswith("graph_") and "_cpp_fused_" in name


def _compiling(name: str) -> bool:
    """A profiler range of torch.compile at work (Dynamo's trace, AOTAutograd, Inductor)."""
    return name in ("dynamo", "entire_frame_compile") or "(dynamo_timed)" in name or "compile_fx" in name


class KernelCounter:
    """The kernels run while entered, from a torch.profiler record, each booked to the
    innermost phase range around it ("other" outside every phase). One definition for eager
    and compiled steps:

      CUDA  every kernel the GPU ran (CUPTI's record: Triton, cuBLAS, cuDNN, ATen alike);
      CPU   every Inductor C++ kernel (`_compiled_kernel`; needs
            torch._inductor.config.cpp.enable_kernel_profile when compiling) plus every aten
            op that runs a kernel and calls no other such op (convolution -> _convolution ->
            mkldnn_convolution counts once; views, allocations and metadata not at all; a
            multi-tensor `_foreach_` op counts once, as on a GPU, though the CPU loops over
            its tensors op by op): in eager mode about one GPU launch each, and compiled, the kernels a GPU would launch
            for the same graph up to Inductor's per-device fusion choices. A graph compiled
            while counting adds nothing: the ops torch.compile traces are left out.

    A profiler costs ~1-2 us per op: `d3fast profile` counts one step of its own."""

    def __init__(self, device: torch.device):
        self.device = device
        self.counts: dict[str, int] = {}
        acts = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            acts.append(torch.profiler.ProfilerActivity.CUDA)
        self._prof = torch.profiler.profile(activities=acts)

    def __enter__(self) -> KernelCounter:
        self._prof.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._prof.__exit__(None, None, None)
        self.counts = _book(self._prof.events(), self.device.type == "cuda")


class FlopCounter(TorchDispatchMode):
    """FLOPs of the ops run while entered whose cost torch.utils.flop_counter knows
    (convolution forward and backward, mm, addmm, bmm, baddbmm, attention): the formulas of
    its registry, without FlopCounterMode's module tracker, whose backward hooks refuse an
    autograd.grad inside a backward (the flat unroll's adjoint). Under torch.func's grad and
    vmap it sees the batched ops they run. Eager only: compiled graphs refuse dispatch modes
    (run it under compiling.eager())."""

    def __init__(self) -> None:
        super().__init__()
        from torch.utils.flop_counter import flop_registry

        self._registry = flop_registry
        self.flops = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = self._registry.get(func._overloadpacket)
        if formula is not None:
            self.flops += int(formula(*args, **kwargs, out_val=out))
        return out


def _book(events: Any, cuda: bool) -> dict[str, int]:
    counts: dict[str, int] = {}

    def phase_of(e: Any) -> str:
        while e is not None:
            if e.name in PHASES:
                return str(e.name)
            e = e.cpu_parent
        return "other"

    def add(e: Any, n: int) -> None:
        if n:
            name = phase_of(e)
            counts[name] = counts.get(name, 0) + n

    if cuda:
        for e in events:
            if e.device_type == torch.autograd.DeviceType.CPU:
                add(e, len(e.kernels))
        return counts
    # innermost kernel ops: an event counts when it runs a kernel and nothing below it does
    runs: dict[int, bool] = {}

    def below(e: Any) -> bool:
        key = id(e)
        if key not in runs:
            runs[key] = any(_compiled_kernel(c.name) or _kernel_op(c.name) or below(c) for c in e.cpu_children)
        return runs[key]

    def skipped(e: Any) -> bool:
        """Under a multi-tensor op (counted as one) or inside torch.compile's own work (a
        graph compiled during the count traces ops on fake tensors: not kernels of the step)."""
        e = e.cpu_parent
        while e is not None:
            if e.name.startswith("aten::_foreach_") or _compiling(e.name):
                return True
            e = e.cpu_parent
        return False

    for e in events:
        if e.device_type != torch.autograd.DeviceType.CPU or skipped(e):
            continue
        if e.name.startswith("aten::_foreach_") or _compiled_kernel(e.name) or (_kernel_op(e.name) and not below(e)):
            add(e, 1)
    return counts


def phase(name: str) -> Any:
    """Context manager marking a phase; a no-op unless a PhaseTimer is active."""
    timer = _ACTIVE
    return _NULL if timer is None else timer.span(name)


class _Mark(torch.autograd.Function):
    """Identity whose backward opens (begin=True) or closes a phase."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, name: str, begin: bool) -> torch.Tensor:  # type: ignore[override]
        ctx.name, ctx.begin = name, begin
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        timer = _ACTIVE
        if timer is not None:
            (timer.enter if ctx.begin else timer.exit)(ctx.name)
        return g, None, None


def backward_phase(name: str, inputs: torch.Tensor, fn: Any) -> torch.Tensor:
    """fn(inputs) with its backward booked as `name` (and its forward too)."""
    timer = _ACTIVE
    if timer is None or not inputs.requires_grad:
        with phase(name):
            return fn(inputs)
    with timer.span(name):
        # backward runs outputs first: the output's mark opens the phase, the input's closes it
        out = fn(_Mark.apply(inputs, name, False))
        return _Mark.apply(out, name, True)


def set_marking(timer: PhaseTimer | None) -> None:
    """Between steps: whether the markers report to `timer` or do nothing (`d3fast profile`'s
    free-running steps run without them, so without their GPU syncs)."""
    global _ACTIVE
    _ACTIVE = timer


@contextmanager
def active(timer: PhaseTimer) -> Iterator[PhaseTimer]:
    global _ACTIVE
    if _ACTIVE is not None:
        raise RuntimeError("a PhaseTimer is already active")
    _ACTIVE = timer
    try:
        yield timer
    finally:
        _ACTIVE = None


_PAGE_MIB = os.sysconf("SC_PAGE_SIZE") / 2**20 if hasattr(os, "sysconf") else 4096 / 2**20


def _rss_mib() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE_MIB
    except OSError:
        return float("nan")
