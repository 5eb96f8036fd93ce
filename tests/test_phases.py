"""The phase timer behind `d3fast profile`: exclusive accounting of nested phases, backward
passes booked through autograd marks, and no effect on values or gradients."""

from __future__ import annotations

import time

import pytest
import torch

from d3fast import phases
from d3fast.phases import PhaseTimer, active, backward_phase, phase


class _SlowBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 3

    @staticmethod
    def backward(ctx, g):
        time.sleep(0.05)
        return g * 3


def test_nested_phases_are_exclusive():
    timer = PhaseTimer(torch.device("cpu"))
    with active(timer):
        with phase("outer"):
            time.sleep(0.03)
            with phase("inner"):
                time.sleep(0.05)
            with phase("inner"):
                time.sleep(0.02)
        step = timer.end_step()
    assert step["inner"] == pytest.approx(0.07, abs=0.015)
    assert step["outer"] == pytest.approx(0.03, abs=0.015)
    assert [s.depth for s in timer.spans] == [1, 1, 0]
    assert len(timer.memory) == 6 and all(m > 0 for _, m in timer.memory)  # RSS at every edge


def test_backward_marks_book_the_backward_and_keep_gradients():
    x = torch.randn(5, requires_grad=True)
    timer = PhaseTimer(torch.device("cpu"))
    with active(timer):
        y = backward_phase("slow op", x, lambda t: _SlowBackward.apply(t).sum())
        with phase("backward"):
            time.sleep(0.02)
            y.backward()
        step = timer.end_step()
    assert step["slow op"] == pytest.approx(0.05, abs=0.02)
    assert step["backward"] == pytest.approx(0.02, abs=0.015)
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
    timer = PhaseTimer(torch.device("cpu"))
    with active(timer), timer.sample_memory(0.005):
        with phase("p"):
            big = torch.ones(64 * 2**20)  # 256 MiB, written: resident
            time.sleep(0.1)
            del big
            time.sleep(0.02)
    edge = max(m for _, m in timer.memory[:1] + timer.memory[-1:])
    assert max(m for _, m in timer.memory) > edge + 200  # the phase edges alone would miss it
    assert [t for t, _ in timer.memory] == sorted(t for t, _ in timer.memory)
