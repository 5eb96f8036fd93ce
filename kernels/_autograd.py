"""What the fused ops' autograd Functions and Triton launches share."""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch

from d3fast.errors import D3FastError

# Compile options every Triton launch passes, set explicitly: Triton 3.9 fuses a * b + c into
# one FMA unless told otherwise and warns that 3.10 will stop by default. Fused is what the
# kernels were tested with (one rounding instead of two in the distance and gradient sums),
# so an upgrade must not change the numbers behind our back (tests/kernels/test_compile.py).
TRITON_OPTIONS = {"enable_fp_fusion": True}


@functools.lru_cache(maxsize=8)
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 132 (an H100 SXM) where none can be asked
    (fake tensors in the compile audit); 64 for the interpreter, so that the tests' small
    shapes exercise the MMD's split (with its 16 x 16 tiles) and param_dist's programs."""
    if device.type != "cuda":
        return 64
    try:
        return torch.cuda.get_device_properties(device).multi_processor_count
    except (RuntimeError, AssertionError):
        return 132


_TICKETS: dict[tuple[torch.device, int], torch.Tensor] = {}
_TICKETS_LOCK = threading.RLock()


@contextlib.contextmanager
def tickets(device: torch.device, n: int) -> Iterator[torch.Tensor]:
    """At least n int32 counters on `device`, all zero, for the launches made inside the
    block, whose programs take a ticket (an atomic add) to find the last of a group, which then
    reduces the group's partial sums in a fixed order: deterministic, where atomic float adds
    are not, and with no zero-fill launch per call.

    Every kernel that takes tickets leaves them at zero (the last program resets its counter),
    so the buffer is filled once and reused: one per device and stream (launches on one stream
    run in order; two streams never share one). The block holds a lock, so that a group of
    launches sharing counters (param_dist's segments) cannot interleave with another thread's
    on the same stream; and if it raises (a launch refused, Ctrl-C between launches), the
    counters are zeroed after what was launched, so a half-counted group cannot corrupt the
    next call. A replaced smaller buffer is freed to the stream-ordered caching allocator,
    which reuses it only after the launches queued on it."""
    with _TICKETS_LOCK:
        stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" and torch.cuda.is_available() else 0
        buf = _TICKETS.get((device, stream))
        if buf is None or buf.numel() < n:
            buf = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
            _TICKETS[(device, stream)] = buf
        try:
            yield buf
        except BaseException:
            buf.zero_()
            raise


def first_order_only(backward: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap the backward of an op whose gradient is computed outside autograd (C++, Triton).

    Under create_graph=True that gradient would carry no graph, so a gradient of it would lack
    the second-order terms without any error (a gradient penalty through `mmd2` gave 0.64
    instead of 0.93). Autograd runs backward with grad mode on exactly when create_graph is
    set: then this raises instead.

    Raises:
        D3FastError: backward called with create_graph=True.
    """

    @functools.wraps(backward)
    def checked(ctx: Any, *grads: torch.Tensor) -> Any:
        if torch.is_grad_enabled():
            raise D3FastError(
                "the fused kernels' gradients are first-order only (this backward was asked for a graph, "
                "create_graph=True); use impl=\"reference\" for higher-order gradients"
            )
        return backward(ctx, *grads)

    return checked
