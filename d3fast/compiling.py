"""torch.compile for the distillation step (distill.compile, issue 31), with the eager path
behind it.

Eager, a distillation step is ~20,000 small kernels at the ImageWoof shape (GroupNorm's double
backward alone is ~70 % of them): on a GPU, launch overhead. Compiled, Inductor fuses each
traced function's pointwise and reduction ops into a few kernels around the convolutions.
What is compiled: the unrolled student's gradient, HVP and double backward
(d3fast/unroll.py), the decoder (d3fast/distilled.py), DSA's ops (d3fast/data/augment.py) and
the MMD feature network (d3fast/recipes/distill.py); docs/performance.md has the numbers.
Random draws stay outside the graphs (Dynamo does not trace explicit generators), so the random
streams are those of the eager step.

`Compiled(fn, what)` is torch.compile(fn, fullgraph=True, dynamic=False): one graph per
function with static shapes. A new shape, grad mode or network compiles again; Dynamo counts
these per code object, and every Student, decoder and DSA op of a process shares its code
(subtasks distilled one after another, the decoder at 3-4 batch sizes in two grad modes), so
the limit is raised from PyTorch's 8 to RECOMPILE_LIMIT. A function past it runs eagerly
(one warning). When compiling itself fails (no C++ compiler, an op Inductor cannot lower) it
warns once for the process and every compiled function runs eagerly from then on (a broken
toolchain would fail them all, each after a trace): the values are the same. A compiler
killed by a signal (Ctrl-C reaches g++ too) is an interruption: that call runs eagerly and the
next one compiles. Backward graphs compile with their forward (not lazily at the first
backward), so their failures take the same path. Errors of the computation itself pass
through.
"""

from __future__ import annotations

import subprocess
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch


def is_compile_error(e: BaseException) -> bool:
    """Whether `e` came from torch.compile (Dynamo, AOTAutograd, Inductor, the C++ or Triton
    toolchain) rather than from the computation itself."""
    import torch._dynamo.exc as dexc

    known = (dexc.BackendCompilerFailed, dexc.Unsupported, dexc.TorchRuntimeError, dexc.InternalTorchDynamoError)
    return isinstance(e, known) or type(e).__module__.startswith(("torch._inductor", "torch._dynamo"))


RECOMPILE_LIMIT = 64

# why compiling failed in this process (then everything runs eagerly); empty while it has not
FAILED: list[str] = []


# >0 inside `eager()`
_EAGER = [0]


@contextmanager
def eager() -> Iterator[None]:
    """Every `Compiled` runs its eager function while inside (for what torch.compile cannot
    run under, such as saved-tensor hooks: d3fast/unroll.py's memory probe)."""
    _EAGER[0] += 1
    try:
        yield
    finally:
        _EAGER[0] -= 1


def _interrupted(e: BaseException) -> bool:
    """Whether a compiler process behind `e` was killed by a signal (a Ctrl-C reaches the
    whole process group, g++ included): an interruption, not a broken toolchain."""
    seen: BaseException | None = e
    for _ in range(16):
        if seen is None:
            return False
        if isinstance(seen, subprocess.CalledProcessError) and seen.returncode < 0:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _too_many_graphs(e: BaseException) -> bool:
    import torch._dynamo.exc as dexc

    return isinstance(e, dexc.FailOnRecompileLimitHit)


class Compiled:
    """`fn` through torch.compile, falling back to `eager` (default: `fn`; one warning per
    process) if compiling fails. `failed` holds the reason once this function's compile has
    failed."""

    def __init__(self, fn: Callable[..., Any], what: str, eager: Callable[..., Any] | None = None):
        self.fn, self.what = fn, what
        self.eager = eager or fn
        self.graph: Callable[..., Any] | None = None
        self.failed: str | None = None

    def __call__(self, *args: Any) -> Any:
        if self.failed is not None or FAILED or _EAGER[0]:
            return self.eager(*args)
        if self.graph is None:
            import torch._dynamo.config as dynamo
            import torch._functorch.config as functorch

            dynamo.recompile_limit = max(dynamo.recompile_limit, RECOMPILE_LIMIT)
            # compile a graph's backward with its forward, inside this call's `try`: lazily, at
            # the first backward, a failure there would escape the eager fallback
            functorch.force_non_lazy_backward_lowering = True
            self.graph = torch.compile(self.fn, fullgraph=True, dynamic=False)
        try:
            return self.graph(*args)
        except Exception as e:  # noqa: BLE001 - a compiler failure leaves the eager path
            if not is_compile_error(e):
                raise
            if _interrupted(e):  # Ctrl-C reached the compiler too: this call eagerly, compile next time
                return self.eager(*args)
            self.failed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            if not _too_many_graphs(e):  # the toolchain failed: nothing else will compile either
                FAILED.append(self.failed)
            warnings.warn(f"distill.compile: compiling {self.what} failed ({self.failed}); running it eagerly",
                          stacklevel=2)
            return self.eager(*args)


def seconds() -> float:
    """Seconds this process has spent in torch.compile so far (Dynamo's record of its frame
    compiles, which include AOTAutograd's and Inductor's work for each graph)."""
    from torch._dynamo.utils import compilation_time_metrics

    return float(sum(compilation_time_metrics.get("_compile.compile_inner", [])))
