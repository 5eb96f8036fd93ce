"""The phase timer behind `d3fast profile`: exclusive accounting of nested phases, backward
passes booked through autograd marks, and no effect on values or gradients. Time comes
from a fake clock the tests move by hand."""

from __future__ import annotations

import threading

import pytest
import torch

from d3fast import phases
from d3fast.phases import PhaseTimer, active, backward_phase, phase
from tests._utils import FakeClock


class _SlowBackward(torch.autograd.Function):
    """x * 3, whose backward takes 0.05 s of the test's clock."""

    clock: FakeClock

    @staticmethod
    def forward(ctx, x):
        return x * 3

    @staticmethod
    def backward(ctx, g):
        _SlowBackward.clock.t += 0.05
        return g * 3


def test_nested_phases_are_exclusive():
    clock = FakeClock()
    timer = PhaseTimer(torch.device("cpu"), clock)
    with active(timer):
        with phase("outer"):
            clock.t += 0.03
            with phase("inner"):
                clock.t += 0.05
            with phase("inner"):
                clock.t += 0.02
        clock.t += 0.5  # outside every phase: not booked
        step = timer.end_step()
    assert step == {"inner": pytest.approx(0.07), "outer": pytest.approx(0.03)}
    assert [(s.name, s.depth) for s in timer.spans] == [("inner", 1), ("inner", 1), ("outer", 0)]
    assert [round(s.end - s.start, 9) for s in timer.spans] == [0.05, 0.02, 0.1]
    assert timer.step_edges == [pytest.approx(0.6)]
    assert len(timer.memory) == 6 and all(m > 0 for _, m in timer.memory)  # RSS at every edge


def test_backward_marks_book_the_backward_and_keep_gradients():
    clock = FakeClock()
    _SlowBackward.clock = clock
    x = torch.randn(5, requires_grad=True)
    timer = PhaseTimer(torch.device("cpu"), clock)
    with active(timer):
        y = backward_phase("slow op", x, lambda t: _SlowBackward.apply(t).sum())
        with phase("backward"):
            clock.t += 0.02
            y.backward()
        step = timer.end_step()
    # the op's 0.05 s inside autograd go to "slow op", only the rest to the enclosing phase
    assert step == {"slow op": pytest.approx(0.05), "backward": pytest.approx(0.02)}
    torch.testing.assert_close(x.grad, torch.full((5,), 3.0))


def test_inactive_markers_do_nothing():
    assert phases._ACTIVE is None
    x = torch.randn(3, requires_grad=True)
    y = backward_phase("p", x, lambda t: (t * 2).sum())
    assert y.grad_fn.name() == "SumBackward0"  # no identity nodes without a timer
    with phase("anything"):
        pass
    with pytest.raises(RuntimeError, match="closed while"):
        timer = PhaseTimer(torch.device("cpu"))
        timer.enter("a")
        timer.exit("b")


def test_memory_sampler_sees_a_peak_inside_a_phase():
    clock = FakeClock()
    timer = PhaseTimer(torch.device("cpu"), clock)
    read = timer._read_mem
    sampled, edges, seen = [], [], threading.Event()

    def sampler_read() -> float:
        mib = read()
        sampled.append(mib)
        if len(sampled) >= 3:
            seen.set()
        return mib

    def edge(t: float) -> None:
        edges.append(read())
        timer.memory.append((t, edges[-1]))

    timer._read_mem, timer._mem = sampler_read, edge  # type: ignore[method-assign]
    with active(timer), timer.sample_memory(0.001):
        with phase("p"):
            big = torch.ones(64 * 2**20)  # 256 MiB, written: resident
            sampled.clear()
            seen.clear()
            # three sampler readings while the tensor lives: wait on an event, not a sleep
            assert seen.wait(timeout=60)
            clock.t += 1.0
            del big
    assert len(edges) == 2  # the phase's entry and exit
    assert max(m for _, m in timer.memory) > max(edges) + 200  # the edges alone would miss the peak
    assert [t for t, _ in timer.memory] == sorted(t for t, _ in timer.memory)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_the_kernel_counter_counts_kernels_only_and_books_them_to_the_open_phase(compiled):
    """KernelCounter counts what runs a kernel, by the innermost open phase: not the phase
    markers' own profiler ranges, allocations, views or in-place metadata changes (autograd's
    backward calls unsqueeze_ and _unsafe_view), each of which a breaker found counted in an
    earlier counter; an op that calls another counts once. Compiled, Inductor's fused C++
    kernel (mul and sum in one loop) counts once in place of the two ops."""
    import torch._inductor.config as inductor

    from d3fast.phases import KernelCounter, PhaseTimer, active

    timer = PhaseTimer(torch.device("cpu"))
    x = torch.randn(4, 3)

    def scaled_sum(y):
        return (y * 2).sum()

    fn = torch.compile(scaled_sum, fullgraph=True) if compiled else scaled_sum
    with inductor.patch({"cpp.enable_kernel_profile": True}):
        fn(x)  # compiles outside the count
    with active(timer), KernelCounter(torch.device("cpu")) as c:
        with torch.profiler.record_function("marker"):
            pass
        z = torch.empty(3)
        z.unsqueeze_(0)
        x.view(12).t()
        x.to(torch.float64)  # to -> _to_copy -> copy_: one kernel
        torch._foreach_mul([x, x, x], 2.0)  # one multi-tensor op (the CPU loops over mul)
        with timer.span("decode"):
            y = x * 2  # mul
            with timer.span("mmd"):
                fn(y)  # mul + sum, or one fused kernel
            y.add_(1)  # add_
    assert c.counts == {"other": 2, "decode": 2, "mmd": 1 if compiled else 2}


def test_the_flop_counter_matches_the_formulas_under_grad_in_backward_and_vmap():
    # independent counts: a 3x3 convolution of N x Cin x H x W into Cout channels (padding 1)
    # is 2 N Cout H W Cin 9 FLOPs forward and twice that backward (input and weight
    # gradients); a [m, k] x [k, n] product 2 m k n
    N, Cin, Cout, H = 2, 3, 5, 7
    conv = 2 * N * Cout * H * H * Cin * 9
    x = torch.randn(N, Cin, H, H, requires_grad=True)
    w = torch.randn(Cout, Cin, 3, 3, requires_grad=True)
    with phases.FlopCounter() as fc:
        torch.nn.functional.conv2d(x, w, padding=1).sum().backward()
    assert fc.flops == 3 * conv

    # an autograd.grad inside a backward (the flat unroll's adjoint), where torch's
    # FlopCounterMode raises: the inner forward and both gradients are counted
    class Inner(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            with torch.enable_grad():
                xi = x.detach().requires_grad_(True)
                wi = w.detach().requires_grad_(True)
                out = torch.nn.functional.conv2d(xi, wi, padding=1)
                gx, _ = torch.autograd.grad(out.sum(), [xi, wi])
            return g + gx

    with phases.FlopCounter() as fc:
        Inner.apply(x).sum().backward()
    assert fc.flops == 3 * conv

    # torch.func's vmap over K weight matrices: the batched product it runs
    K, m, k, n = 4, 3, 6, 5
    a, b = torch.randn(K, m, k), torch.randn(K, k, n)
    with phases.FlopCounter() as fc:
        torch.func.vmap(torch.mm)(a, b)
    assert fc.flops == K * 2 * m * k * n
    with phases.FlopCounter() as fc:
        torch.relu(a)  # no formula: not counted
    assert fc.flops == 0
