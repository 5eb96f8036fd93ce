"""The compiled student step (distill.compile=on) against the eager one: the three per-step
functions traced by torch.compile give the unroll's loss and every gradient (latents, alpha,
decoder) to float64 rounding, for the naive, flat and auto unrolls and for vmapped students.

Compiling costs tens of seconds on a 2-core CPU, so the fast smoke test covers the flat
unroll at one student (two graphs), beside two fallback checks that compile a one-line
function; the rest is marked slow."""

import pytest
import torch

from d3fast.unroll import unroll
from tests._utils import F64_GRAD_TOL, assert_grads_match, rel_err
from tests.test_unroll import gradients, setup


def compiled_fns(spec):
    return {k for k, c in spec.student.fns._compiled.items() if c.graph is not None}


def compare(mode, students=1, steps=2, monkeypatch=None):
    d, spec, theta0, target = setup(torch.float64, students=students, steps=steps)
    loss_e, grads_e, state_e = gradients(mode, d, spec, theta0, target)
    d2, spec2, _, _ = setup(torch.float64, students=students, steps=steps)
    spec2.student.compiled = True
    loss_c, grads_c, state_c = gradients(mode, d2, spec2, theta0, target)
    assert spec2.student.fns.failed is None, spec2.student.fns.failed
    assert compiled_fns(spec2), "nothing was compiled: the comparison would prove nothing"
    assert torch.equal(state_e, state_c)
    names = ["latents", "alpha"] + [n for n, _ in d.decoder.named_parameters()]
    assert all(g.abs().max() > 0 for g in grads_e)
    assert rel_err(loss_c, loss_e) < F64_GRAD_TOL
    assert_grads_match(names, grads_c, grads_e, F64_GRAD_TOL)
    for b, b2 in zip(d.decoder.buffers(), d2.decoder.buffers(), strict=True):
        torch.testing.assert_close(b, b2, rtol=1e-12, atol=1e-12)
    return spec2


def test_compiled_flat_unroll_equals_eager():
    spec = compare("flat")
    assert compiled_fns(spec) == {"grads", "adjoints"}


@pytest.mark.slow
@pytest.mark.parametrize("students", [1, 2])
def test_compiled_naive_unroll_equals_eager(students):
    spec = compare("naive", students=students)
    assert compiled_fns(spec) == {"with_graph"}


@pytest.mark.slow
def test_compiled_vmapped_flat_and_auto_equal_eager(monkeypatch):
    compare("flat", students=2)
    # auto with room for 1 of 3 steps: a flat head, a naive tail on top of it
    import d3fast.unroll as u

    monkeypatch.setattr(u, "_kept_steps", lambda *a, **k: 1)
    spec = compare("auto", steps=3)
    assert compiled_fns(spec) == {"grads", "adjoints", "with_graph"}


def _fresh_process(script: str, tmp_path, *args: str) -> dict:
    """`script`'s last stdout line (JSON) from a fresh Python process run in the repository
    with an empty Inductor cache (a cached kernel would hide what the compiler does)."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": root}
    res = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env, cwd=root,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


_NO_COMPILER = """
import json, warnings, torch
import torch._inductor.config as inductor
inductor.cpp.cxx = (None, "/nonexistent/g++")  # what a machine without a C++ toolchain has
from tests.test_unroll import gradients, setup
d, spec, theta0, target = setup(torch.float64)
loss_e, grads_e, _ = gradients("flat", d, spec, theta0, target)
d2, spec2, _, _ = setup(torch.float64)
spec2.student.compiled = True
with warnings.catch_warnings(record=True) as record:
    warnings.simplefilter("always")
    loss_c, grads_c, _ = gradients("flat", d2, spec2, theta0, target)
fns = spec2.student.fns._compiled
print(json.dumps({
    "warnings": [str(w.message) for w in record if "eagerly" in str(w.message)],
    "failed": spec2.student.fns.failed, "adjoints_tried": fns["adjoints"].graph is not None,
    "loss_err": abs(float(loss_c - loss_e)) / abs(float(loss_e)),
    "grad_err": max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(grads_c, grads_e)),
}))
"""


@pytest.mark.slow
def test_a_missing_compiler_leaves_the_eager_path_with_one_warning(tmp_path):
    """In a fresh process with an empty compile cache (a cached kernel would hide the missing
    compiler): the gradient's compile fails, one warning says so, the HVP's is not tried,
    and the gradients are the eager ones."""
    r = _fresh_process(_NO_COMPILER, tmp_path)
    assert len(r["warnings"]) == 1 and "running it eagerly" in r["warnings"][0], r["warnings"]
    assert r["failed"] and not r["adjoints_tried"]
    assert r["loss_err"] < F64_GRAD_TOL and r["grad_err"] < F64_GRAD_TOL


def test_errors_of_the_computation_are_not_swallowed(monkeypatch):
    d, spec, theta0, target = setup(torch.float64)
    spec.student.compiled = True

    def broken(fn, **kw):
        def call(*a):
            raise ValueError("a real bug")
        return call

    monkeypatch.setattr(torch, "compile", broken)
    with pytest.raises(ValueError, match="a real bug"):
        unroll(spec, d, theta0, torch.Generator().manual_seed(5), "flat")


@pytest.mark.slow
def test_a_compiled_distillation_resumed_equals_an_eager_one(home, tmp_path, monkeypatch):
    """distill.compile=on (student step, decoder, DSA compiled): 2 steps, a resume, 1 more,
    all compiled, end within F64_TOL of 3 uninterrupted eager steps, float64, 2 students of
    the flat unroll and PPC 2 (the diversity term and the MMD update's decoder shapes)."""
    from d3fast.recipes.distill import distill
    from d3fast.run import Run
    from tests._utils import assert_same_state, cfg_of

    base = ("distill.ppc=2", "distill.students_per_step=2", "distill.dtype=float64", "distill.mmd_samples=6",
            "distill.unroll=flat")
    import d3fast.compiling

    distill(cfg_of(*base, "distill.compile=off"), Run.at(tmp_path / "eager"), progress=False)
    ran: set[str] = set()  # what ran through a compiled graph
    call = d3fast.compiling.Compiled.__call__

    def spy(self, *args):
        out = call(self, *args)
        if self.graph is not None and self.failed is None:
            ran.add(self.what.split("'s ")[0] if self.what.startswith("DSA") else self.what)
        return out

    monkeypatch.setattr(d3fast.compiling.Compiled, "__call__", spy)
    part = distill(cfg_of(*base, "distill.compile=on", "distill.steps=2"), Run.at(tmp_path / "c"), progress=False)
    assert part.step == 2
    cfg = Run(tmp_path / "c").read_config()
    cfg.distill.steps = 3
    assert distill(cfg, Run.at(tmp_path / "c"), resume=True, progress=False).step == 3
    assert ran == {"the student's gradient", "the student's HVP", "the decoder", "the MMD features", "DSA"}, (ran, d3fast.compiling.FAILED)
    assert not d3fast.compiling.FAILED
    assert_same_state(Run(tmp_path / "c").load_state(), Run(tmp_path / "eager").load_state(), "compiled vs eager")


def test_a_function_past_the_recompile_limit_runs_eagerly_alone(monkeypatch):
    """Past Dynamo's recompile limit only that function falls back (one warning); the toolchain
    works, so the other compiled functions keep compiling."""
    import torch._dynamo.config as dynamo

    import d3fast.compiling as c

    monkeypatch.setattr(c, "RECOMPILE_LIMIT", 1)
    monkeypatch.setattr(c, "FAILED", [])
    f = c.Compiled(lambda x: (x * 3).sum(), "a test function")
    # config.patch, not monkeypatch: undoing a monkeypatch deletes a torch config entry
    with dynamo.patch(recompile_limit=1), pytest.warns(UserWarning, match="a test function failed .*eagerly") as record:
        outs = [f(torch.ones(n)) for n in (2, 3, 4)]
    assert [float(o) for o in outs] == [6.0, 9.0, 12.0]
    assert len([w for w in record if "eagerly" in str(w.message)]) == 1
    assert f.failed and "RecompileLimit" in f.failed and not c.FAILED


_TOOLCHAIN_EVENTS = r"""
import json, os, sys, warnings, torch
import torch._inductor.config as inductor
import d3fast.compiling as c
cxx, marker = sys.argv[1], sys.argv[2]
inductor.cpp.cxx = (None, cxx)
out = {}
with warnings.catch_warnings(record=True) as record:
    warnings.simplefilter("always")
    # 1. g++ killed by a signal (a Ctrl-C reaches it): eager this call, no failure recorded
    os.environ["KILL_CXX"] = "1"
    f = c.Compiled(lambda x: (x.sin() * 2).sum(), "f")
    out["interrupted_value"] = float(f(torch.ones(3)))
    out["interrupted_failed"] = f.failed
    # 2. the next call compiles (the compiler works again)
    os.environ["KILL_CXX"] = "0"
    out["next_value"] = float(f(torch.ones(3)))
    out["next_failed"] = f.failed
    # 3. a backward graph compiles with its forward: a compiler failing after the forward
    # cannot break the backward
    h = c.Compiled(lambda x: (x.cos() * x).sum(), "h")
    x = torch.ones(4, requires_grad=True)
    y = h(x)
    open(marker, "w").close()  # from now on every compile fails
    y.backward()
    out["grad"] = x.grad.tolist()
out["warnings"] = [str(w.message) for w in record if "eagerly" in str(w.message)]
out["FAILED"] = c.FAILED
print(json.dumps(out))
"""


@pytest.mark.slow
def test_an_interrupted_compiler_is_no_failure_and_backward_graphs_compile_with_their_forward(tmp_path):
    import math

    marker = tmp_path / "fail"
    cxx = tmp_path / "cxx.sh"
    # a g++ that kills itself with SIGINT when asked to, or fails once the marker exists
    cxx.write_text('#!/bin/bash\nfor a in "$@"; do case "$a" in *.cpp)\n'
                   '  [ "$KILL_CXX" = 1 ] && kill -INT $$\n'
                   f'  [ -e {marker} ] && exit 1;;\nesac; done\nexec g++ "$@"\n')
    cxx.chmod(0o755)
    r = _fresh_process(_TOOLCHAIN_EVENTS, tmp_path, str(cxx), str(marker))
    assert r["interrupted_value"] == r["next_value"] == pytest.approx(6 * math.sin(1))
    assert r["interrupted_failed"] is None and r["next_failed"] is None and r["FAILED"] == []
    assert r["warnings"] == []
    assert r["grad"] == pytest.approx([math.cos(1) - math.sin(1)] * 4)
