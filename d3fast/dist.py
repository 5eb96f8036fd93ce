"""One distillation across processes: torch.distributed under torchrun (docs/algorithm.md
section 9).

`torchrun --nproc-per-node G -m d3fast distill ...` starts G processes with RANK, WORLD_SIZE
and LOCAL_RANK set; `World.from_env()` joins them into one process group (NCCL on CUDA,
gloo on the CPU) with a collective timeout (D3FAST_DIST_TIMEOUT seconds, default 600), so a
dead or hung rank stops the others with an error instead of a hang. Without those variables
it is the single-process world (rank 0 of 1) and every method is a no-op.

The split (d3fast/recipes/distill.py, d3fast/mmd_update.py): the K students of a step are divided
into W contiguous groups (K a multiple of W) and the MMD update's classes into W contiguous
ranges. Every rank draws every random number a single process would (the same generators,
the same full-size draws) and keeps its rows, so the run does not depend on W: the same
seed gives the same run on 1 or W ranks, up to float summation order. Each rank's loss is
scaled so that the mean of the ranks' losses is the single-process loss, and the gradients
are averaged (`average_grads`) before every optimiser step: every rank then holds the same
state, which `check_same` verifies by a checksum at every checkpoint.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as td

from d3fast.errors import D3FastError
from d3fast.runtime import full_precision

DEFAULT_TIMEOUT_S = 600
T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """The processes of one job: this one's `rank` of `size`; `local_rank` picks its GPU."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    # a world of some of the job's ranks (`groups`): their process group and the job rank of
    # its rank 0 (the source of broadcasts); None and 0 for the whole job
    group: Any = None
    root: int = 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes the run directory, the metrics and the ledger."""
        return self.rank == 0

    @classmethod
    def from_env(cls, device: str = "auto", join: bool = True) -> World:
        """The world torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK), joined into a process
        group unless `join` is False (a command that needs no collective); the single process
        without them.

        Raises:
            D3FastError: a partial environment, or a process group that cannot form.
        """
        if "WORLD_SIZE" not in os.environ or os.environ["WORLD_SIZE"].strip() == "1":
            return cls()
        try:
            rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            local = int(os.environ.get("LOCAL_RANK", "0"))
        except (KeyError, ValueError) as e:
            raise D3FastError(f"torch.distributed environment incomplete ({e}); launch with torchrun") from None
        if join and not td.is_initialized():
            cuda = device != "cpu" and torch.cuda.is_available()
            if cuda:
                torch.cuda.set_device(local)
            timeout = datetime.timedelta(seconds=timeout_s())
            # torch._dynamo imported after the group exists (the optimisers import it on first use)
            # keeps 10 references to it (torch 2.13): destroy_process_group then frees nothing, and
            # gloo's worker threads run on into interpreter teardown, where one that drops a finished
            # collective's tensors needs the GIL and aborts the process ("terminate called without
            # an active exception", exit -6, after a job that had finished). Imported first, it holds none.
            import torch._dynamo as _dynamo  # noqa: F401  (bound to another name: `torch` stays the module)
            try:
                td.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
            except Exception as e:  # RuntimeError, DistStoreError, ValueError from a bad rendezvous
                raise D3FastError(f"rank {rank}: the process group did not form ({type(e).__name__}: {e})") from None
        return cls(rank, size, local)

    def groups(self, n: int) -> tuple[int, World]:
        """(g, this rank's world) of n equal groups of consecutive ranks: group g holds ranks
        g W/n .. (g + 1) W/n - 1, and its world runs one distillation over them (subtask g of
        n under torchrun, docs/algorithm.md section 9). Every rank creates every group, in
        order (torch.distributed's rule for new_group).

        Raises:
            D3FastError: W not a multiple of n."""
        if self.size % n:
            raise D3FastError(f"{self.size} processes cannot form {n} equal groups: use a multiple of {n}")
        per = self.size // n
        if not self.distributed or per == self.size:
            return 0, self
        mine: tuple[int, Any] = (0, None)
        for g in range(n):
            ranks = list(range(g * per, (g + 1) * per))
            pg = td.new_group(ranks) if per > 1 else None
            if self.rank in ranks:
                mine = (g, pg)
        g, pg = mine
        return g, World(self.rank - g * per, per, self.local_rank, pg, g * per)

    def device(self, name: str) -> str:
        """The device this rank trains on: "auto"/"cuda" become cuda:LOCAL_RANK."""
        if self.distributed and name in ("auto", "cuda") and torch.cuda.is_available():
            return f"cuda:{self.local_rank}"
        return name

    def split(self, n: int) -> slice:
        """This rank's contiguous share of n items (the first n % W ranks get one more)."""
        base, extra = divmod(n, self.size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (1 if self.rank < extra else 0))

    def students(self, k: int) -> slice:
        """This rank's students of a step.

        Raises:
            D3FastError: K not a multiple of the world size (ranks would carry unequal work
                and the average of their losses would not be the single-process loss).
        """
        if k % self.size:
            raise D3FastError(f"distill.students_per_step={k} must be a multiple of the {self.size} ranks "
                              f"(--students-per-step {self.size * max(k // self.size, 1)} works)")
        return self.split(k)

    # ---- collectives (no-ops in the single-process world)

    def average_grads(self, params: Iterable[torch.Tensor]) -> None:
        """Every parameter's gradient replaced by its mean over the ranks: one all-reduce of
        one flat buffer (missing gradients count as zeros, so every rank sends the same
        layout)."""
        if not self.distributed:
            return
        params = list(params)
        # float32, or float64 when the parameters are (distill.dtype=float64)
        flat = torch.cat([full_precision(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                          for p in params])
        td.all_reduce(flat, group=self.group)
        flat /= self.size
        at = 0
        for p in params:
            n = p.numel()
            g = flat[at : at + n].view_as(p).to(p.dtype)
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)
            at += n

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """In place: the sum of `t` over the ranks."""
        if self.distributed:
            td.all_reduce(t, group=self.group)
        return t

    def gather_cat(self, t: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Every rank's `t` concatenated along `dim` in rank order (shapes may differ along
        `dim`); no gradient."""
        if not self.distributed:
            return t
        sizes = [torch.zeros(1, dtype=torch.int64, device=t.device) for _ in range(self.size)]
        td.all_gather(sizes, torch.tensor([t.shape[dim]], device=t.device), group=self.group)
        big = max(int(s) for s in sizes)
        pad = list(t.shape)
        pad[dim] = big - t.shape[dim]
        padded = torch.cat([t, t.new_zeros(pad)], dim) if pad[dim] else t.contiguous()
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        td.all_gather(parts, padded, group=self.group)
        return torch.cat([p.narrow(dim, 0, int(s)) for p, s in zip(parts, sizes, strict=True)], dim)

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's picklable `obj` on every rank."""
        if not self.distributed:
            return obj
        box = [obj if self.main else None]
        td.broadcast_object_list(box, src=self.root, group=self.group)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            td.barrier(group=self.group)

    def check_same(self, tensors: Sequence[torch.Tensor], what: str) -> None:
        """Stop every rank when the ranks' `tensors` differ (a checksum compared by one
        all-reduce of max and min).

        Raises:
            D3FastError: the ranks hold different values (names the ranks)."""
        if not self.distributed:
            return
        dev = tensors[0].device  # Adam's step counts live on the CPU beside CUDA parameters
        s = torch.stack([t.detach().double().sum().to(dev) for t in tensors] + [torch.zeros((), dtype=torch.float64,
                                                                                              device=dev)])
        lo, hi = s.clone(), s.clone()
        td.all_reduce(lo, td.ReduceOp.MIN, group=self.group)
        td.all_reduce(hi, td.ReduceOp.MAX, group=self.group)
        if not torch.equal(lo, hi):
            mine = s.tolist()
            raise D3FastError(f"rank {self.rank}: the ranks' {what} differ (checksums {lo.tolist()[:3]} .. "
                              f"{hi.tolist()[:3]}, this rank {mine[:3]}); a rank ran other code, data or a "
                              "nondeterministic kernel: stop and resume from the last checkpoint")

    def check_config(self, config: dict[str, Any], what: str = "config") -> None:
        """Every rank must run the same `config` (or files): compared by hash.

        Raises:
            D3FastError: naming the ranks whose `what` differs from rank 0's."""
        if not self.distributed:
            return
        digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()
        all_digests: list[str | None] = [None] * self.size
        td.all_gather_object(all_digests, digest, group=self.group)
        odd = [r for r, h in enumerate(all_digests) if h != all_digests[0]]
        if odd:
            raise D3FastError(f"ranks {odd} were started with another {what} than rank 0 (hashes differ); "
                              "every rank must get the same command line and files")

    def on_main(self, fn: Callable[[], T]) -> T:
        """fn() run on rank 0 and its result on every rank; a D3FastError it raises is
        raised on every rank (the others would otherwise wait for rank 0 until the timeout)."""
        if not self.distributed:
            return fn()
        payload: tuple[str, Any] = ("ok", None)
        if self.main:
            try:
                payload = ("ok", fn())
            except D3FastError as e:
                payload = ("error", str(e))
        kind, value = self.broadcast(payload)
        if kind == "error":
            raise D3FastError(value if self.main else f"rank 0: {value}")
        return value

    def agree(self, problem: str | None) -> None:
        """Every rank's `problem` (None: fine) gathered; any one is raised on every rank.

        Raises:
            D3FastError: naming the rank(s) and their problem."""
        if not self.distributed:
            if problem:
                raise D3FastError(problem)
            return
        found: list[str | None] = [None] * self.size
        td.all_gather_object(found, problem, group=self.group)
        bad = [(r, p) for r, p in enumerate(found) if p]
        if bad:
            raise D3FastError("; ".join(f"rank {r}: {p}" for r, p in bad))

    def same_files(self, run: Any) -> None:
        """Every rank sees the run directory rank 0 writes (a shared filesystem): rank 0's
        last history line, read back by each rank.

        Raises:
            D3FastError: on every rank, naming those that cannot see it."""
        if not self.distributed:
            return
        theirs = self.broadcast(_last_line(run) if self.main else None)  # sent once written
        mine = _last_line(run)
        problem = None
        if mine != theirs:
            problem = (f"cannot see rank 0's run directory {run.path} (on {os.uname().nodename}): the runs directory "
                       "must be on a filesystem every node shares (--runs-dir)")
        self.agree(problem)

    def close(self) -> None:
        if self.group is None and td.is_initialized():  # a group's world leaves with the whole job's
            td.destroy_process_group()


def collective_failure(e: BaseException) -> str | None:
    """The one-line message for an exception raised inside a torch.distributed collective
    (another rank crashed, hung past D3FAST_DIST_TIMEOUT, or left), or None for any other.
    gloo reports a dead peer as a plain RuntimeError ("Connection closed by peer"), so the
    traceback's frames decide, not the type."""
    tb, inside = e.__traceback__, type(e).__module__.startswith("torch.distributed")
    while tb is not None and not inside:
        inside = "/torch/distributed/" in tb.tb_frame.f_code.co_filename
        tb = tb.tb_next
    if not inside:
        return None
    first = str(e).splitlines()[0][:240] if str(e) else ""
    return (f"a collective with the other ranks failed ({type(e).__name__}: {first}): another rank died or "
            "hangs, so this one stops too. The last checkpoint is kept: relaunch with --resume")


def _last_line(run: Any) -> str | None:
    try:
        lines = run.history()
    except (D3FastError, OSError):
        return None
    return json.dumps(lines[-1], sort_keys=True) if lines else None


class _SumOverRanks(torch.autograd.Function):
    """y = sum over ranks of x, differentiable: every rank's loss depends on y, so the
    gradient of x is the sum over ranks of their dL/dy (one all-reduce each way)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any = None) -> torch.Tensor:
        ctx.group = group
        y = x.clone()
        td.all_reduce(y, group=group)
        return y

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        g = g.clone()
        td.all_reduce(g, group=ctx.group)
        return g, None


def batch_moments(x: torch.Tensor, group: Any = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of x [B, C, ...] over every rank's batch, with
    their gradient, and the count of values per channel (a float64 0-d tensor): one
    differentiable all-reduce of float64 sums [sum x, sum x^2, count]. float64 keeps
    E[x^2] - E[x]^2 exact to ~1e-16 relative for activations of this size."""
    dims = [0, *range(2, x.dim())]
    xd = x.double()
    local = torch.cat([xd.sum(dims), (xd * xd).sum(dims),
                       torch.full((1,), x.numel() / x.shape[1], dtype=torch.float64, device=x.device)])
    total = _SumOverRanks.apply(local, group)
    c = x.shape[1]
    n = total[-1]
    mean = total[:c] / n
    var = total[c : 2 * c] / n - mean * mean
    return mean, var.clamp_min(0), n




def step_traffic(learned: int, bn_channels: list[int], syn_steps: int, unroll: str, ppc: int,
                 median_floats: int = 0, value_bytes: int = 4, kept: int | None = None) -> list[tuple[str, int, int]]:
    """The collectives one distributed step makes, as (what, calls, bytes per call), for any
    world size (the bytes each rank contributes; a ring all-reduce moves 2 (W - 1) / W of them
    per rank). `value_bytes`: 4, or 8 for distill.dtype=float64.

    - the two gradient averages (MTT, MMD update): `learned` values each;
    - one float64 [2 C_l + 1] all-reduce per decoder BatchNorm layer (channels C_l) per decode
      forward, and one more per decode backward. A flat unroll decodes each of its
      `syn_steps` steps forward (no gradient) and again in its backward (with one); the naive
      one once with a gradient; auto its `kept` steps (default: all) as naive, the others as
      flat; the MMD update once, the diversity term (PPC > 1) once more;
    - the step's terms and stop flag (5 float64) and, with the median heuristic, an all-gather
      of the real features (`median_floats` values per rank).
    """
    bn = [8 * (2 * c + 1) for c in bn_channels]
    naive = {"flat": 0, "naive": syn_steps, "auto": syn_steps if kept is None else kept}[unroll]
    decodes_fwd = 2 * (syn_steps - naive) + naive + 1 + (1 if ppc > 1 else 0)
    decodes_bwd = syn_steps + 1 + (1 if ppc > 1 else 0)
    out = [("gradient average", 2, value_bytes * learned)]
    out += [(f"BatchNorm moments ({c} channels)", decodes_fwd + decodes_bwd, b) for c, b in zip(bn_channels, bn, strict=True)]
    out.append(("terms and stop flag", 1, 8 * 5))
    if median_floats:
        out.append(("real features for the median", 1, value_bytes * median_floats))
    return out


def timeout_s() -> float:
    """The collective timeout: $D3FAST_DIST_TIMEOUT seconds, else DEFAULT_TIMEOUT_S.

    Raises:
        D3FastError: a value that is not a finite number of seconds > 0."""
    text = os.environ.get("D3FAST_DIST_TIMEOUT", "").strip()
    if not text:
        return float(DEFAULT_TIMEOUT_S)
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    # timedelta takes up to ~8.6e13 s; a day is already longer than any collective should wait
    if not (math.isfinite(value) and 0 < value <= 1e9):
        raise D3FastError(f"D3FAST_DIST_TIMEOUT must be seconds in (0, 1e9], such as 600; got {text!r}")
    return value


__all__ = ["DEFAULT_TIMEOUT_S", "World", "batch_moments", "collective_failure", "step_traffic", "timeout_s"]
