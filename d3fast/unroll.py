"""The MTT unroll: N student SGD steps on decoded samples, differentiable with respect to the
latents, the decoder and the learned student lr.

Two ways to get the same gradient (tests/test_unroll.py checks they agree to 1e-8 in
float64):

naive  keeps the autograd graph of every step (create_graph through each update), as the
       reference code does. Memory grows linearly with N: every step's activations and
       their double-backward graph stay alive until the loss is differentiated.
flat   reverse mode by recomputation. The forward pass keeps only theta_i (P floats per
       step per student) and each step's batch indices and generator state. Backward walks
       the steps in reverse; step i is recomputed from its stored state (same decoded
       samples, same augmentation), and the adjoint a_{i+1} = dL/dtheta_{i+1} is pushed
       through it with one Hessian-vector product:

           theta_{i+1} = theta_i - lr g_i,       g_i = grad_theta CE(theta_i; x_i(phi))
           s_i         = <g_i, a_{i+1}>
           a_i         = a_{i+1} - lr ds_i/dtheta_i                 (HVP)
           dL/dphi    += -lr ds_i/dx_i . dx_i/dphi                   (decoder, latents)
           dL/dlr     += -s_i

       Peak memory is one step's double-backward graph, whatever N is.
auto   the last `keep` steps naive, the first N - keep flat, with keep the number of steps
       whose graphs fit `budget` x the free memory (device memory on a GPU, MemAvailable on
       the host): no recomputation when memory is plentiful, flat when it is not. The naive
       tail runs on top of the flat head (theta_{N-keep} = flat(theta_0)), so autograd
       brings the adjoint of theta_{N-keep} to the flat part's backward: the gradient is the
       same exact one. One step's graph is measured once per UnrollSpec by a probe step on
       a copy of the generator (the bytes autograd saves, via saved_tensors_hooks).

Students (`students_per_step` K > 1) run in lockstep: theta is [K, P], each step decodes K
batches in one call (student k gets rows k*B..(k+1)*B), and the flat unroll evaluates the
student's gradient and HVP with torch.func.vmap over the K students. A single student takes
plain autograd instead: at the ImageWoof shape (ConvNet-5, 128 px, B = 10, 2-core CPU) the
vmapped gradient took 0.98 s against 0.64 s, the HVP 3.40 s against 2.82 s.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, grad_and_value, vmap

from d3fast import compiling, losses
from d3fast.compiling import Compiled
from d3fast.data.augment import DSA
from d3fast.distilled import Distilled
from d3fast.errors import D3FastError
from d3fast.phases import DECODE, PARAM_DISTANCE, backward_phase, phase
from d3fast.runtime import free_memory


@dataclass
class Student:
    """A network used as a pure function of its flat parameter vector.

    `compiled` (distill.compile): the three per-step functions of the unroll run as
    torch.compile graphs (`_StepFunctions`); otherwise eagerly. Both give the same values to
    float rounding (tests/test_compile_step.py: within F64_GRAD_TOL, 1e-10, in float64)."""

    module: torch.nn.Module
    compiled: bool = False
    names: list[str] = field(init=False)
    shapes: list[torch.Size] = field(init=False)
    sizes: list[int] = field(init=False)
    fns: _StepFunctions = field(init=False, repr=False)

    def __post_init__(self) -> None:
        params = list(self.module.named_parameters())
        self.names = [n for n, _ in params]
        self.shapes = [p.shape for _, p in params]
        self.sizes = [p.numel() for _, p in params]
        self.fns = _StepFunctions(self)

    def loss(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the network with flat parameters theta [P] on images x [B, ...]."""
        params = {n: t.view(s) for n, t, s in zip(self.names, theta.split(self.sizes), self.shapes, strict=True)}
        return F.cross_entropy(functional_call(self.module, params, (x,)), y)


@dataclass
class UnrollSpec:
    student: Student
    steps: int  # N
    batch: int  # latents per step; 0 = all
    augment: DSA | None
    amp: Callable[[], AbstractContextManager[None]] = nullcontext
    # distributed (d3fast/dist.py): (K, this rank's students) of all K students of the step;
    # the draws are made for all K, the rows of this rank's students decoded. None: one process.
    share: tuple[int, slice] | None = None
    # auto: the fraction of free memory the kept graphs may take (distill.unroll_budget)
    budget: float = 0.5
    # auto: bytes of one step's graph, measured by the first auto unroll (`_step_bytes`)
    step_bytes: int | None = None
    # auto: the steps kept naive by the last unroll
    kept: int | None = None


class _Chunks:
    """Latent indices per step: a fresh permutation (from the generator) whenever the last
    one is used up, split into batches; the same draws in both unrolls."""

    def __init__(self, count: int, batch: int, g: torch.Generator, device: torch.device):
        self.count, self.batch, self.g, self.device = count, batch or count, g, device
        self.queue: list[torch.Tensor] = []

    def next(self) -> torch.Tensor:
        if not self.queue:
            order = torch.randperm(self.count, generator=self.g, device=self.device)
            self.queue = list(torch.split(order, self.batch))
        return self.queue.pop(0)


def _samples(
    spec: UnrollSpec, d: Distilled, idx: torch.Tensor, students: int, g: torch.Generator, op: int | None
) -> torch.Tensor:
    """Decoded, augmented (DSA op `op`) samples of priors idx for this process's `students`
    students: [students * B, C, H, W]. Distributed, the noise and augmentation draws are
    those of all K students and this rank keeps its students' rows."""
    if spec.share is None:
        with phase(DECODE):
            x = d.decode(idx.repeat(students), g)
        return spec.augment(x, g, op) if spec.augment is not None else x
    total, mine = spec.share
    B = len(idx)
    rows = slice(mine.start * B, mine.stop * B)
    with phase(DECODE):
        x = d.decode(idx.repeat(total), g, rows)
    return spec.augment(x, g, op, rows=rows, batch=total * B) if spec.augment is not None else x


def _ops(spec: UnrollSpec, g: torch.Generator, host: torch.Generator | None) -> list[int | None]:
    """The DSA op of every unrolled step, drawn up front on the host: from `host`, or from
    `g` when that is a CPU generator; a CUDA `g` alone leaves the draw to each step."""
    if spec.augment is None:
        return [None] * spec.steps
    host = host if host is not None else g if g.device.type == "cpu" else None
    return spec.augment.draw_ops(spec.steps, host) if host is not None else [None] * spec.steps


def unroll(
    spec: UnrollSpec, d: Distilled, theta0: torch.Tensor, g: torch.Generator, mode: str = "flat",
    host: torch.Generator | None = None,
) -> torch.Tensor:
    """theta_N [K, P] from theta0 [K, P] (K students), differentiable w.r.t. d.latents,
    d.decoder's parameters and d.alpha. mode: "flat" (recomputation, memory flat in N) or
    "naive" (graph through every step). `g` draws the batches, samples and augmentation
    parameters on the device; `host`, a CPU generator, picks the DSA ops (see `_ops`)."""
    if theta0.dim() != 2:
        raise D3FastError(f"unroll: theta0 must be [students, P], got {list(theta0.shape)}")
    lr = d.lr()
    ops = _ops(spec, g, host)
    has_buffers = any(True for _ in spec.student.module.buffers())
    chunks = _Chunks(len(d.latents), spec.batch, g, theta0.device)
    if mode == "auto":
        # a student with running statistics cannot be recomputed: all naive
        keep = spec.steps if has_buffers else _kept_steps(spec, d, theta0, lr, g, ops)
        spec.kept = keep
        if keep == spec.steps:
            return _unroll_naive(spec, d, theta0, lr, g, ops, chunks)
        head = spec.steps - keep
        theta = _unroll_flat(spec, d, theta0, lr, g, ops[:head], chunks)
        return _unroll_naive(spec, d, theta, lr, g, ops[head:], chunks) if keep else theta
    if mode == "naive":
        return _unroll_naive(spec, d, theta0, lr, g, ops, chunks)
    if mode == "flat":
        if has_buffers:
            raise D3FastError(
                "the flat unroll needs a student without running statistics (net.norm=batchnorm keeps "
                "some); use net.norm=instancenorm or --unroll naive"
            )
        return _unroll_flat(spec, d, theta0, lr, g, ops, chunks)
    raise D3FastError(f"unknown unroll mode {mode!r}: use auto, flat or naive")


def _kept_steps(spec: UnrollSpec, d: Distilled, theta0: torch.Tensor, lr: torch.Tensor, g: torch.Generator,
                ops: list[int | None]) -> int:
    """How many steps' graphs fit spec.budget x the free memory (at least 0, at most N)."""
    if spec.budget <= 0:
        return 0
    if spec.step_bytes is None:
        spec.step_bytes = _step_bytes(spec, d, theta0, lr, g, ops[0])
    return max(0, min(spec.steps, int(spec.budget * free_memory(theta0.device) // max(spec.step_bytes, 1))))


def _step_bytes(spec: UnrollSpec, d: Distilled, theta0: torch.Tensor, lr: torch.Tensor, g: torch.Generator,
                op: int | None) -> int:
    """The bytes one naive step keeps alive until the backward: every tensor autograd saves
    (counted once per storage) plus theta_{i+1}, measured on a probe step that draws from a
    copy of `g` and leaves the decoder's BatchNorm statistics as they were."""
    saved: dict[tuple[int, str], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            st = t.untyped_storage()
            saved[(st.data_ptr(), str(t.device))] = st.nbytes()
        except (RuntimeError, NotImplementedError):  # tensors without a storage (views of functorch, ...)
            saved[(id(t), str(t.device))] = t.numel() * t.element_size()
        return t

    probe = torch.Generator(device=g.device)
    probe.set_state(g.get_state())
    buffers = [b.detach().clone() for b in d.decoder.buffers()]
    chunks = _Chunks(len(d.latents), spec.batch, probe, theta0.device)
    # eager: torch.func and compiled graphs refuse saved-tensor hooks; a compiled step saves
    # fewer bytes than this (Inductor keeps fewer intermediates), so the estimate errs on the
    # side of memory
    with compiling.eager(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = _unroll_naive(spec, d, theta0, lr, probe, [op], chunks)
    with torch.no_grad():
        for b, v in zip(d.decoder.buffers(), buffers, strict=True):
            b.copy_(v)
    del out
    return sum(saved.values()) + theta0.numel() * theta0.element_size()


def _unroll_flat(
    spec: UnrollSpec, d: Distilled, theta0: torch.Tensor, lr: torch.Tensor, g: torch.Generator, ops: list[int | None],
    chunks: _Chunks,
) -> torch.Tensor:
    return _FlatUnroll.apply(lr, theta0, _Run(spec, d, g, ops, chunks), d.latents, *d.decoder.parameters())


def _unroll_naive(
    spec: UnrollSpec, d: Distilled, theta0: torch.Tensor, lr: torch.Tensor, g: torch.Generator, ops: list[int | None],
    chunks: _Chunks,
) -> torch.Tensor:
    K = theta0.shape[0]
    # after a flat head (auto) theta0 carries its graph: the tail continues it
    thetas = list(theta0.unbind()) if theta0.requires_grad else [t.clone().requires_grad_(True) for t in theta0.detach()]
    for op in ops:
        idx = chunks.next()
        with spec.amp():
            x = _samples(spec, d, idx, K, g, op).unflatten(0, (K, -1))
        y = d.labels[idx]
        for k in range(K):
            with spec.amp():
                gk = spec.student.fns.with_graph(thetas[k], x[k], y)
            thetas[k] = thetas[k] - lr * gk.to(thetas[k].dtype)
    return torch.stack(thetas)


@dataclass
class _Run:
    """What the flat unroll's backward needs besides tensors."""

    spec: UnrollSpec
    d: Distilled
    g: torch.Generator
    ops: list[int | None]  # the DSA op of each step
    # the latent batches, shared with a naive tail that continues the same permutation (auto)
    chunks: _Chunks
    # theta_0 .. theta_{N-1}, [K, P] each; in host memory when the unroll runs on a GPU, so
    # that device memory stays flat in N (on CPU they are the one term that grows: 4 P bytes
    # per step, 2.3 MiB for ConvNet-5). On a GPU they are rows of one pinned buffer, copied
    # asynchronously both ways: the stream orders each copy, and the host never waits.
    thetas: list[torch.Tensor] = field(default_factory=list)
    plan: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (idx, generator state)


def _grads(student: Student, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """g_k = grad_theta CE(theta_k; x_k, y) for every student: [K, P] from [K, P], [K, B, ...]."""
    return vmap(grad(student.loss), in_dims=(0, 0, None))(theta, x, y)


def _adjoints(
    student: Student, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, a: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """With s_k = <g_k, a_k>: (ds/dtheta [K, P] (the HVP), ds/dx [K, B, ...], s [K])."""

    def inner(t: torch.Tensor, xk: torch.Tensor, yk: torch.Tensor, adj: torch.Tensor) -> torch.Tensor:
        return (grad(student.loss)(t, xk, yk) * adj).sum()

    (hvp, dx), s = vmap(grad_and_value(inner, argnums=(0, 1)), in_dims=(0, 0, None, 0))(theta, x, y, a)
    return hvp, dx, s


class _StepFunctions:
    """The unroll's three per-step functions of one student network, eager or compiled.

    grads(theta [K, P], x [K, B, ...], y [B])       -> g [K, P]          (flat forward)
    adjoints(theta, x, y, a [K, P])                 -> (HVP, ds/dx, s)   (flat backward)
    with_graph(theta_k [P], x_k [B, ...], y [B])    -> g_k [P], differentiable w.r.t.
                                                       theta_k and x_k   (naive steps)

    Eager, one student takes plain autograd (faster than torch.func there: see the module
    docstring) and the naive step autograd.grad(create_graph=True). Compiled, all three are
    torch.func functions traced whole by torch.compile (fullgraph, static shapes): Inductor
    fuses GroupNorm, ReLU, pooling and their first and second derivatives into a few
    kernels, and the naive step's backward (the double backward) is AOTAutograd's compiled
    backward of the traced gradient. A shape or requires-grad pattern not seen before
    compiles again (d3fast/compiling.py; a failing compiler leaves the eager path)."""

    def __init__(self, student: Student):
        self.student = student
        self._compiled = {
            "grads": Compiled(partial(_grads, student), "the student's gradient", self._grads_eager),
            "adjoints": Compiled(partial(_adjoints, student), "the student's HVP", self._adjoints_eager),
            "with_graph": Compiled(grad(student.loss), "the student's step", self._with_graph_eager),
        }

    @property
    def failed(self) -> str | None:
        """Why compiling failed (the step then runs eagerly); None if it has not."""
        return next((c.failed for c in self._compiled.values() if c.failed is not None), None)

    def _run(self, name: str, *args: Any) -> Any:
        fn = self._compiled[name]
        return fn(*args) if self.student.compiled else fn.eager(*args)

    def grads(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self._run("grads", theta, x, y)

    def adjoints(
        self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, a: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self._run("adjoints", theta, x, y, a)

    def with_graph(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self._run("with_graph", theta, x, y)

    def _grads_eager(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if theta.shape[0] > 1:
            return _grads(self.student, theta, x, y)
        with torch.enable_grad():
            t = theta[0].detach().requires_grad_(True)
            return torch.autograd.grad(self.student.loss(t, x[0], y), t)[0][None]

    def _adjoints_eager(
        self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, a: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if theta.shape[0] > 1:
            return _adjoints(self.student, theta, x, y, a)
        with torch.enable_grad():
            t = theta[0].detach().requires_grad_(True)
            xk = x[0].detach().requires_grad_(True)
            (g,) = torch.autograd.grad(self.student.loss(t, xk, y), t, create_graph=True)
            s = (g * a[0]).sum()
            hvp, dx = torch.autograd.grad(s, [t, xk])
        return hvp[None], dx[None], s.detach()[None]

    def _with_graph_eager(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        (g,) = torch.autograd.grad(self.student.loss(theta, x, y), theta, create_graph=True)
        return g


class _FlatUnroll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, lr: torch.Tensor, theta0: torch.Tensor, run: _Run, *phi: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        spec, d = run.spec, run.d
        K = theta0.shape[0]
        chunks = run.chunks
        theta, lr_ = theta0.detach(), lr.detach()
        # pinned: the caching host allocator hands the same pages back every step
        store = torch.empty((len(run.ops), *theta.shape), dtype=theta.dtype, pin_memory=True) if theta.is_cuda else None
        for i, op in enumerate(run.ops):
            idx = chunks.next()
            state = run.g.get_state()
            with torch.no_grad(), spec.amp():
                x = _samples(spec, d, idx, K, run.g, op).unflatten(0, (K, -1))
                gk = spec.student.fns.grads(theta, x, d.labels[idx])
            if store is not None:
                run.thetas.append(store[i].copy_(theta, non_blocking=True))
            else:
                run.thetas.append(theta)
            run.plan.append((idx, state))
            # fp32 parameters even when the step ran under bf16 autocast
            theta = theta - lr_ * gk.to(theta.dtype)
        ctx.run = run
        ctx.save_for_backward(lr)
        return theta

    @staticmethod
    def backward(ctx, a: torch.Tensor):  # type: ignore[override]
        run: _Run = ctx.run
        (lr,) = ctx.saved_tensors
        spec, d = run.spec, run.d
        K = a.shape[0]
        phi = [d.latents, *d.decoder.parameters()]
        grads_phi: list[torch.Tensor] = [torch.zeros_like(p) for p in phi]
        grad_lr = torch.zeros((), dtype=torch.float64, device=a.device)
        lr_ = lr.detach()

        # re-decoding must not move the decoder's BatchNorm running statistics a second time
        saved_buffers = [b.detach().clone() for b in d.decoder.buffers()]
        gen = torch.Generator(device=run.g.device)
        a = a.detach()
        for stored, (idx, state), op in zip(reversed(run.thetas), reversed(run.plan), reversed(run.ops), strict=True):
            theta = stored.to(a.device, non_blocking=True)
            gen.set_state(state)
            with torch.enable_grad():
                with spec.amp():
                    x = _samples(spec, d, idx, K, gen, op)  # [K * B, C, H, W], graph to phi
                with spec.amp():
                    # s_i = <g_i, a_{i+1}>; its derivatives w.r.t. theta_i (HVP) and x_i
                    hvp, dx, s = spec.student.fns.adjoints(theta, x.detach().unflatten(0, (K, -1)), d.labels[idx], a)
                step_phi = torch.autograd.grad(x, phi, grad_outputs=(-lr_ * dx).flatten(0, 1).to(x.dtype), allow_unused=True)
            grad_lr -= s.double().sum()
            a = a - lr_ * hvp.to(a.dtype)
            for acc, gp in zip(grads_phi, step_phi, strict=True):
                if gp is not None:
                    acc += gp
        with torch.no_grad():
            for b, v in zip(d.decoder.buffers(), saved_buffers, strict=True):
                b.copy_(v)
        run.thetas.clear()
        return (grad_lr.to(lr.dtype).reshape(lr.shape), None, None, *grads_phi)


def mtt_loss(theta_n: torch.Tensor, target: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """Mean over students of ||theta_N - theta*||^2 / ||theta_0 - theta*||^2 ([K, P] each)."""
    return backward_phase(PARAM_DISTANCE, theta_n, lambda t: losses.param_dist(t, target, start).mean())


__all__ = ["Student", "UnrollSpec", "mtt_loss", "unroll"]
