"""The training state of a distillation run and its checkpoint file.

`TrainState` is everything one step hands to the next (docs/algorithm.md section 5): the
distilled object (latents, decoder, learnable student lr alpha), its three optimisers, both
random generators (host: expert and start epoch; device: every other draw) and the step
count. Its `state_dict()` is the checkpoint's schema, written in this one place;
`Distilled.from_state_dict` reads the distilled part back without the optimisers (evaluate,
sample, export).

A checkpoint is written only from usable state (`check_state`), atomically, and read
with `torch.load(weights_only=True)`: tensors, numbers, strings, lists and dicts, no code.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import pickle
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from d3fast.config import DistillConfig
from d3fast.dist import World
from d3fast.distilled import LR_PARAMS, Distilled, lr_param_of
from d3fast.errors import D3FastError
from d3fast.health import MTTHealth
from d3fast.io import atomic_path

# 2: without the unused "best" record of format 1 (2026-12); a format-1 checkpoint still loads
# (its "best" is ignored), a format-2 one always carries its sha256
CKPT_FORMAT = 2
CKPT_READABLE = (1, 2)


# exp(logvar) (the KL term) overflows float32 above 88.7, and sampling takes exp(logvar / 2):
# a log-variance past this bound is finite in the checkpoint but makes every later step NaN
MAX_LOGVAR = 88.0


class DivergedError(D3FastError):
    """The update `where` produced a loss or a state that training cannot continue from:
    `what` says which kind ("non-finite loss", "non-finite state", "overflowing state",
    "non-positive student lr"), `detail` names the terms, tensors or values."""

    def __init__(self, what: str, where: str, detail: str) -> None:
        self.what, self.where, self.detail = what, where, detail
        super().__init__(f"{what} in the {where}: {detail}")


def distilled_problems(d: Distilled) -> tuple[str, str] | None:
    """(what, detail) when the distilled object cannot be trained or used: a NaN or inf
    tensor, a log-variance whose exp overflows, or a student lr <= 0 or inf; else None."""
    checks = StepChecks()
    checks.state(list(d.named_tensors()), d, "checkpoint")
    return checks.problem(checks.fetch())


def check_state(state: TrainState, where: str) -> None:
    """Raise DivergedError when the state is unusable: any NaN or inf tensor (a finite loss
    can still have inf gradients), an overflowing log-variance, or a non-positive student
    lr. Reads the device at once (a checkpoint is about to be written)."""
    checks = StepChecks()
    checks.state(list(state.named_tensors()), state.distilled, where)
    checks.raise_first(checks.fetch())


class StepChecks:
    """The checks of one distillation step, computed on the device as the step runs and
    read back together with the step's metrics in one transfer (`read`): a GPU step then
    waits for the device once, not at every `if` (about 10 reads per step before).

    `loss(where, **terms)` notes loss terms (non-finite: "non-finite loss"); `state(...)`
    notes the state after an update: whether each tensor is finite, the largest latent
    log-variance (above MAX_LOGVAR: "overflowing state") and the student lr (<= 0:
    "non-positive student lr"). `read` raises DivergedError for the first check that
    failed, in the order they were noted, so the report names the update where it began;
    the updates after it ran on the bad values, which nothing keeps (no checkpoint is
    written from this step)."""

    def __init__(self, world: World | None = None) -> None:
        # (kind, where, names, number of values); the values themselves, in order, on the
        # devices that hold them
        self._notes: list[tuple[str, str, list[str], int]] = []
        self._values: list[torch.Tensor] = []
        # distributed: the loss terms noted are this rank's shares, summed over the ranks
        # (one all-reduce) before they are read
        self.world = world
        self._shares: list[int] = []
        # a host flag every rank reports (a stop request), OR-ed over the ranks by the same
        # all-reduce: `flag` after `read`
        self._flag = 0.0
        self.flag = False

    def raise_flag(self, on: bool) -> None:
        self._flag = 1.0 if on else 0.0

    def loss(self, where: str, **terms: torch.Tensor) -> None:
        self._shares.append(len(self._values))
        # float64: the terms of a float64 run are read without rounding to float32
        self._note("loss", where, list(terms), [torch.stack([t.detach().double().reshape(()) for t in terms.values()])])

    def state(self, named: list[tuple[str, torch.Tensor]], d: Distilled, where: str) -> None:
        groups: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}
        for k, t in named:  # Adam's step counts stay on the CPU beside CUDA parameters
            if t.is_floating_point() and t.numel():
                groups.setdefault(t.device, []).append((k, t.detach()))
        # 0 * x is NaN exactly where x is NaN or inf; its 1-norm is then NaN, else 0: no
        # overflow, whatever the magnitudes (a plain sum of x could reach inf from finite
        # values), and a few multi-tensor launches for all ~120 tensors
        flags = [torch.stack(torch._foreach_norm(torch._foreach_mul([t for _, t in g], 0.0), 1)).double()
                 for g in groups.values()]
        top = d.latents.detach()[..., 1].max().double().reshape(1)
        lr = d.lr().detach().double().reshape(1)
        self._note("state", where, [k for g in groups.values() for k, _ in g], [*flags, top, lr])

    def _note(self, kind: str, where: str, names: list[str], values: list[torch.Tensor]) -> None:
        self._notes.append((kind, where, names, sum(v.numel() for v in values)))
        self._values += values

    def fetch(self, **extra: torch.Tensor) -> list[float]:
        """Every noted value, then `extra`'s, read with one transfer per device holding them.
        Distributed, the loss shares and the flag are first summed over the ranks (one
        all-reduce), and the flag read with the rest sets `flag`."""
        parts = self._values + [t.detach().reshape(1) for t in extra.values()]
        summed_flag = None
        if self.world is not None and self.world.distributed:
            dev = self._values[self._shares[0]].device if self._shares else torch.device("cpu")
            flag = torch.full((1,), self._flag, device=dev)
            summed = self.world.sum_(torch.cat([*(self._values[i] for i in self._shares), flag]))
            sizes = [self._values[i].numel() for i in self._shares]
            for i, v in zip(self._shares, summed[:-1].split(sizes), strict=True):
                parts[i] = v
            summed_flag = summed[-1:]
        values = _read_all(parts + ([summed_flag] if summed_flag is not None else []))
        self.flag = (values.pop() if summed_flag is not None else self._flag) > 0
        return values

    def read(self, **metrics: torch.Tensor) -> dict[str, float]:
        """One read of the device: raises DivergedError for the first failed check, else
        returns the loss terms noted (summed over the ranks) and `metrics` (0-d tensors) as
        floats, by name."""
        values = self.fetch(**metrics)
        self.raise_first(values)
        out: dict[str, float] = {}
        at = 0
        for kind, _, names, n in self._notes:
            if kind == "loss":
                out.update(zip(names, values[at : at + n], strict=True))
            at += n
        return out | dict(zip(metrics, values[len(values) - len(metrics):], strict=True))

    def raise_first(self, values: list[float]) -> None:
        found = self.problem(values, with_where=True)
        if found is not None:
            what, detail, where = found
            raise DivergedError(what, where, detail)

    def problem(self, values: list[float], with_where: bool = False) -> Any:
        """The first failed check as (what, detail[, where]), or None."""
        at = 0
        for kind, where, names, n in self._notes:
            v, at = values[at : at + n], at + n
            found = _loss_problem(names, v) if kind == "loss" else _state_problem(names, v)
            if found is not None:
                return (*found, where) if with_where else found
        return None


def _read_all(parts: list[torch.Tensor]) -> list[float]:
    """The values of `parts`, in order, with one transfer per device holding some."""
    by_device: dict[torch.device, list[int]] = {}
    for i, t in enumerate(parts):
        by_device.setdefault(t.device, []).append(i)
    read: list[list[float]] = [[] for _ in parts]
    for idx in by_device.values():
        flat = torch.cat([parts[i].to(torch.float64) for i in idx]).tolist()
        at = 0
        for i in idx:
            read[i], at = flat[at : at + parts[i].numel()], at + parts[i].numel()
    return [v for chunk in read for v in chunk]


def _loss_problem(names: list[str], values: list[float]) -> tuple[str, str] | None:
    bad = {k: v for k, v in zip(names, values, strict=True) if not math.isfinite(v)}
    return ("non-finite loss", str(bad)) if bad else None


def _state_problem(names: list[str], values: list[float]) -> tuple[str, str] | None:
    """From `StepChecks.state`'s values: one flag per tensor (0 or NaN), top, lr."""
    *flags, top, lr = values
    bad = [k for k, f in zip(names, flags, strict=True) if not f == 0]
    if bad:
        return "non-finite state", ", ".join(bad[:5]) + (" ..." if len(bad) > 5 else "")
    if top > MAX_LOGVAR:
        return "overflowing state", f"latent log-variance up to {top:.4g} (exp overflows float32 above {MAX_LOGVAR:g})"
    if not lr > 0:
        return "non-positive student lr", f"{lr:.4g} (distill.lr_lr moved alpha too far down)"
    if not math.isfinite(lr):
        return "non-finite student lr", f"{lr:.4g} (distill.lr_lr moved alpha past exp's range)"
    return None


def _lr_optimizer(d: Distilled, lr_lr: float) -> torch.optim.Optimizer:
    """alpha's optimiser: Adam in log space (distill.lr_param "log": its steps are about lr_lr
    in log lr whether dL/dalpha is 300, as on a random decoder's samples, or 0.01), else the
    reference's SGD with momentum 0.5."""
    if d.lr_param == "log":
        return torch.optim.Adam([d.alpha], lr=lr_lr)
    return torch.optim.SGD([d.alpha], lr=lr_lr, momentum=0.5)


@dataclass
class TrainState:
    distilled: Distilled
    opt_latent: torch.optim.SGD
    opt_lr: torch.optim.Optimizer  # Adam (lr_param log) or SGD (leaky_relu, the reference's)
    opt_decoder: torch.optim.Adam
    g_host: torch.Generator
    g_device: torch.Generator
    step: int = 0
    # the lowest total loss so far and its step
    # the MTT term's health watch (d3fast/health.py)
    health: MTTHealth = field(default_factory=lambda: MTTHealth(0, "log", 0.01))

    @classmethod
    def create(cls, d: Distilled, dcfg: DistillConfig, device: torch.device) -> TrainState:
        """Step 0: the optimisers of docs/algorithm.md section 5 (latents: SGD with momentum
        0.5; alpha: `_lr_optimizer`; decoder: Adam, weight decay 1e-5) and generators seeded from
        `dcfg.seed` (device generator: seed + 7, so the two streams differ)."""
        return cls(
            distilled=d,
            opt_latent=torch.optim.SGD([d.latents], lr=dcfg.lr_latent, momentum=0.5),
            opt_lr=_lr_optimizer(d, dcfg.lr_lr),
            # multi-tensor: a few launches for the decoder's ~40 tensors (the CPU's default loops)
            opt_decoder=torch.optim.Adam(d.decoder.parameters(), lr=dcfg.lr_decode, weight_decay=1e-5, foreach=True),
            g_host=torch.Generator().manual_seed(dcfg.seed),
            g_device=torch.Generator(device=device).manual_seed(dcfg.seed + 7),
            health=MTTHealth(dcfg.health_steps, dcfg.lr_param, dcfg.lr_teacher, dcfg.mtt_weight > 0),
        )

    @property
    def optimizers(self) -> tuple[torch.optim.Optimizer, ...]:
        return (self.opt_latent, self.opt_lr, self.opt_decoder)

    def set_learning_rates(self, dcfg: DistillConfig) -> None:
        """The config's learning rates into the optimisers' param groups: a resumed run's
        `--set distill.lr_*` must win over the rates stored with the optimiser state."""
        for opt, lr in zip(self.optimizers, (dcfg.lr_latent, dcfg.lr_lr, dcfg.lr_decode), strict=True):
            for group in opt.param_groups:
                group["lr"] = lr

    def named_tensors(self) -> Iterable[tuple[str, torch.Tensor]]:
        """The distilled tensors and every optimiser buffer (momenta, Adam moments)."""
        yield from self.distilled.named_tensors()
        for name, opt in zip(("opt_latent", "opt_lr", "opt_decoder"), self.optimizers, strict=True):
            for i, per_param in enumerate(opt.state.values()):
                for k, v in per_param.items():
                    if isinstance(v, torch.Tensor):
                        yield f"{name}.{i}.{k}", v

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": CKPT_FORMAT,
            "step": self.step,
            **self.distilled.state_dict(),
            "opt_latent": self.opt_latent.state_dict(),
            "opt_lr": self.opt_lr.state_dict(),
            "opt_decoder": self.opt_decoder.state_dict(),
            "rng_host": self.g_host.get_state(),
            "rng_device": self.g_device.get_state(),
            "rng_device_type": self.g_device.device.type,
            "health": json.dumps(self.health.state_dict()),
        }

    def load_state_dict(self, state: dict[str, Any], dcfg: DistillConfig) -> None:
        """Restore a checkpoint into this state (built by `create` with the run's config),
        then apply the config's learning rates. A device generator saved on another kind of
        device (a CPU run resumed on CUDA) cannot continue its stream: it is reseeded from
        (seed, step) and a note says the run now differs from an uninterrupted one."""
        held, runs = state["latents"].dtype, self.distilled.latents.dtype
        if held != runs:
            raise D3FastError(f"the checkpoint holds {str(held).removeprefix('torch.')} tensors and this run computes in "
                              f"{str(runs).removeprefix('torch.')} (distill.dtype): a run keeps the dtype it started with")
        held_param = lr_param_of(json.loads(state["meta"])) if "meta" in state else None
        if held_param not in (None, self.distilled.lr_param):
            raise D3FastError(f"the checkpoint's student lr is parametrised as {held_param} and this run's as "
                              f"{self.distilled.lr_param} (distill.lr_param): a run keeps the one it started with")
        self.distilled.load_state_dict(state)
        try:
            self.opt_latent.load_state_dict(state["opt_latent"])
            self.opt_lr.load_state_dict(state["opt_lr"])
            self.opt_decoder.load_state_dict(state["opt_decoder"])
            for opt in self.optimizers:  # loaded onto the device with the rest: back to the CPU
                _steps_on_cpu(opt)
            self.health.load_state_dict(json.loads(state.get("health", "{}")))  # none before the watch existed
            self.g_host.set_state(state["rng_host"].cpu())
        except (KeyError, ValueError, TypeError, RuntimeError) as e:
            raise D3FastError(f"the checkpoint's optimiser or generator state does not fit this run ({e})") from None
        self.step = int(state["step"])
        saved_type = state.get("rng_device_type")
        try:
            if saved_type not in (None, self.g_device.device.type):
                raise RuntimeError(saved_type)
            self.g_device.set_state(state["rng_device"].cpu())
        except RuntimeError:
            from tqdm import tqdm

            self.g_device.manual_seed(dcfg.seed + 7 + 1_000_003 * self.step)
            tqdm.write(f"note: the device random stream was saved on {saved_type or 'another device'}; "
                       f"it restarts here, so this run no longer repeats an uninterrupted one exactly")
        self.set_learning_rates(dcfg)


def _steps_on_cpu(opt: torch.optim.Optimizer) -> None:
    """Adam's step counts where torch keeps them for a plain (not fused, not capturable)
    optimiser: on the CPU. A checkpoint loaded with map_location=cuda puts them on the GPU,
    and foreach Adam then reads each with .item(): two device waits per parameter per step."""
    for per_param in opt.state.values():
        step = per_param.get("step")
        if isinstance(step, torch.Tensor) and step.device.type != "cpu":
            per_param["step"] = step.cpu()


def state_digest(state: dict[str, Any]) -> str:
    """sha256 over a state dict's content: every tensor's dtype, shape and bytes, and every
    other value's repr, walked in a fixed order. Stored in the checkpoint and checked on
    load, it catches damage that the zip CRCs miss (a flipped bit in the zip's directory can
    make torch read the wrong bytes without any error)."""
    h = hashlib.sha256()

    def walk(v: Any) -> None:
        if isinstance(v, torch.Tensor):
            t = v.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(v, dict):
            h.update(b"D%d" % len(v))
            for k in sorted(v, key=repr):
                h.update(repr(k).encode())
                walk(v[k])
        elif isinstance(v, list | tuple):
            h.update(b"L%d" % len(v))
            for x in v:
                walk(x)
        else:
            h.update(repr(v).encode())

    walk({k: v for k, v in state.items() if k != "sha256"})
    return h.hexdigest()


def save_checkpoint(path: Path, state: TrainState) -> None:
    """Write `state` atomically with its content digest, refusing unusable state (the last
    good file stays). Serialised in memory first: the zip's record names are then
    torch's fixed "archive/...", not the temporary file's name."""
    check_state(state, "checkpoint")
    sd = state.state_dict()
    sd["sha256"] = state_digest(sd)
    buf = io.BytesIO()
    torch.save(sd, buf)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getbuffer())


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """A checkpoint's state dict, loaded with weights_only=True onto `device`, after every
    record's CRC-32 in the zip (torch.save writes them; torch.load does not check them) has
    been verified: a flipped byte is refused, not trained on.

    Raises:
        D3FastError: missing, truncated, corrupt (a CRC mismatch), holding objects other
            than tensors and plain values, or not a d3fast checkpoint.
    """
    if not path.exists():
        raise D3FastError(f"no checkpoint at {path}")
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except Exception as e:  # BadZipFile, OSError, NotImplementedError (a flipped flag or method), ...
        raise D3FastError(f"checkpoint {path} is corrupt or truncated (not a readable zip: {type(e).__name__}: {e})") from None
    if bad is not None:
        raise D3FastError(f"checkpoint {path} is corrupt: its record {bad!r} fails its CRC check (bit rot or an "
                          "overwrite); resume from a copy, or start the run again")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError:
        raise D3FastError(
            f"{path} was refused: it holds Python objects other than tensors and plain values, which only a "
            "load that runs code could read. A d3fast checkpoint never does; do not load this file"
        ) from None
    except Exception as e:  # RuntimeError, EOFError, ValueError, OSError, ... from a damaged file
        first = str(e).split(". ")[0].splitlines()[0][:160] if str(e) else ""
        raise D3FastError(f"checkpoint {path} is corrupt or truncated ({type(e).__name__}: {first})") from None
    if not isinstance(state, dict) or state.get("format") not in CKPT_READABLE:
        raise D3FastError(f"{path} is not a d3fast checkpoint (or one of a newer d3fast)")
    if state["format"] >= 2 and "sha256" not in state:
        raise D3FastError(f"checkpoint {path} is corrupt: the digest written with it is missing; resume from a copy, "
                          "or start the run again")
    if "sha256" in state and state.pop("sha256") != state_digest(state):
        raise D3FastError(f"checkpoint {path} is corrupt: its content does not match the digest written with it "
                          "(bit rot or an overwrite); resume from a copy, or start the run again")
    problem = _checkpoint_problem(state)
    if problem:
        raise D3FastError(f"checkpoint {path} is damaged ({problem})")
    return state


def _checkpoint_problem(state: dict[str, Any]) -> str | None:
    """What is missing or mistyped in a loaded checkpoint (None: the schema holds)."""
    def tensor(key: str, dims: int | None = None) -> bool:
        v = state.get(key)
        return isinstance(v, torch.Tensor) and (dims is None or v.dim() == dims)

    step = state.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        return "step is not a count"
    if not tensor("latents", 3) or state["latents"].shape[-1] != 2 or not state["latents"].is_floating_point():
        return "latents are not a float [priors, z, 2] tensor"
    if not tensor("alpha", 0) or not state["alpha"].is_floating_point():
        return "alpha is not a float scalar"
    if not isinstance(state.get("decoder"), dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state["decoder"].items()
    ):
        return "decoder is not a state dict"
    try:
        classes, meta = json.loads(state["classes"]), json.loads(state["meta"])
    except (KeyError, TypeError, ValueError):
        return "classes or meta are not JSON"
    ppc = state.get("ppc")
    if not isinstance(ppc, int) or isinstance(ppc, bool) or ppc < 1:
        return "ppc is not a count"
    if not isinstance(classes, list) or not classes or len(classes) * ppc != len(state["latents"]):
        return f"{len(state['latents'])} latents do not make {ppc} per class of the classes listed"
    keys = {"resolution": int, "channels": int, "mean": list, "std": list, "z_dim": int, "decoder": str,
            "decoder_width": int}
    if not isinstance(meta, dict) or not all(isinstance(meta.get(k), t) for k, t in keys.items()):
        return "meta lacks the decoder's settings"
    if not isinstance(meta.get("decoder_linear", True), bool):
        return "meta.decoder_linear is not true/false"
    if lr_param_of(meta) not in LR_PARAMS:
        return f"meta.lr_param is {meta['lr_param']!r}, not log or leaky_relu"
    if meta["z_dim"] != state["latents"].shape[1]:
        return "meta.z_dim differs from the latents"
    for key in ("opt_latent", "opt_lr", "opt_decoder"):
        if not isinstance(state.get(key), dict):
            return f"{key} is not an optimiser state"
    if not tensor("rng_host", 1) or not tensor("rng_device", 1):
        return "the random generator states are missing"
    return None
