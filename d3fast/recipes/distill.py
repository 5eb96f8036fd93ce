"""`d3fast distill`: Algorithm 1 of D3 (docs/algorithm.md section 5), top to bottom.

Per step:
  1. draw K students: an expert and a start epoch each (host generator)
  2. MTT update (latents, decoder, learnable lr alpha): unroll N student SGD steps on freshly
     decoded samples (d3fast/unroll.py: exact gradient, memory flat in N),
     L = mean_k ||theta_N - theta*||^2 / ||theta_0 - theta*||^2 + KL
  3. MMD update (latents, decoder; d3fast/mmd_update.py): per class, MMD^2 between ConvNet
     features of real and decoded samples, + diversity
  4. log a metrics line; checkpoint every `checkpoint_every` steps, at the end, on Ctrl-C

The state one step hands to the next is a TrainState (d3fast/state.py), whose random
generators are checkpointed, so a resumed run repeats the uninterrupted one. Every loss and
the whole state after every update are checked on the device, and read back with the step's
metrics in one transfer (the step's only wait for a GPU): a NaN stops the run, naming the
update where it began, before anything non-finite can reach a checkpoint. The run directory belongs to `Run`
(d3fast/run.py); the phases are marked for `d3fast profile` (d3fast/phases.py); the
device-hours go to the ledger (d3fast/ledger.py).
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import json
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, closing, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import click
import numpy as np
import torch
import torch.distributed as td
from tqdm import tqdm

from d3fast import ledger, losses
from d3fast.compiling import Compiled
from d3fast.config import Config, DistillConfig, flatten, resolve_config
from d3fast.data.augment import DSA
from d3fast.data.loader import DeviceDataset, load_view
from d3fast.dist import World
from d3fast.distilled import init_distilled
from d3fast.errors import D3FastError, Interrupted
from d3fast.io import lock_holder, locked, timestamp
from d3fast.mmd_update import mmd_update
from d3fast.models import build_network
from d3fast.paths import home
from d3fast.phases import DATA, LOSSES, OPTIMIZERS, UNROLL_BACKWARD, UNROLL_FORWARD, phase
from d3fast.preflight import (
    Echo,
    budget_overrides,
    check_split,
    check_trackers,
    each_subtask,
    ensure_prepared,
    plan,
    resolve_data_loader,
    run_name,
    silent,
)
from d3fast.progress import bar as progress_bar
from d3fast.recipes.evaluate import command as evaluate_command
from d3fast.recipes.evaluate import run_target
from d3fast.recipes.experts import ensure_experts
from d3fast.recipes.label import ensure_labelling_expert, label_run
from d3fast.recipes.subtasks import merge_runs, up_to_date
from d3fast.run import (
    FIRST_CHECKPOINT_FAILED,
    Run,
    is_merged_dir,
    read_merged_manifest,
    runs_folder,
)
from d3fast.runtime import (
    device_name,
    peak_memory_gib,
    reset_peak_memory,
    resolve_device,
    torch_dtype,
    versions,
)
from d3fast.state import DivergedError, StepChecks, TrainState, distilled_problems
from d3fast.trackers import Trackers, for_run
from d3fast.trajectories import ExpertBank, experts_command, need_epochs, ready_experts
from d3fast.unroll import Student, UnrollSpec, mtt_loss, unroll
from d3fast.visualize import grid_image


@dataclass
class DistillInputs:
    """What a run reads besides its config: the real train split and the expert bank.
    `d3fast profile` hands in stand-ins of the right shapes when these are not on disk."""

    train: DeviceDataset
    bank: ExpertBank


@dataclass
class DistillResult:
    run: Run
    step: int
    seconds: float
    interrupted: bool  # stopped before distill.steps
    last: dict[str, Any]
    stop_requested: bool = False  # Ctrl-C or SIGTERM arrived (also during the last step)


def distill(
    cfg: Config, run: Run, resume: bool = False, *, inputs: DistillInputs | None = None, progress: bool = True,
    on_step: Callable[[dict[str, Any]], None] | None = None, ledger_phase: str = "distill",
    clock: Callable[[], float] = time.perf_counter, world: World | None = None,
    checked: dict[str, list[Any]] | None = None,
) -> DistillResult:
    """Run Algorithm 1 in `run` (`cfg.data.loader` settled), or continue it from its checkpoint
    (`resume`; changed keys applied and recorded, or refused: `checked` holds `run.check_resume
    (cfg)` when the caller ran it). `on_step(metrics)` after every step; `ledger_phase` names the
    ledger row; `clock` (s) times steps and hours; `world`: this rank (rank 0 alone writes).

    Raises:
        D3FastError: missing experts or data, a refused change on resume, a non-finite loss
            or state (the last good checkpoint is kept), ranks that disagree.
    """
    world = world or World()
    dcfg, device = cfg.distill, resolve_device(cfg.device)
    stop, t_start, last = _StopRequest(world.distributed, world.main), clock(), {}
    main = world.main
    with run.lock() if main else nullcontext(), stop.installed():
        parts = _build(cfg, run, resume, device, inputs, world, checked)
        state, bank = parts.state, parts.bank
        bar = progress_bar(total=dcfg.steps, initial=state.step, desc="distill", unit="step", disable=not (progress and main))
        meter_cm = ledger.track(ledger_phase, cfg.data.dataset, cfg.preset, device, steps_target=dcfg.steps,
                                run=str(run.path.resolve()), clock=clock, prior_hours=run.hours_at(state.step),
                                devices=world.size, record=main)
        trackers = for_run(cfg, run) if main else Trackers([], run.path, "", {})
        with closing(bar), run.metrics(state.step) if main else _no_metrics() as metrics, meter_cm as meter, trackers:
            if parts.restored:
                _checkpoint(state, run, world, meter)
            stopping = False
            while state.step < dcfg.steps and not stopping:
                t0 = clock()
                reset_peak_memory(device)
                state.distilled.fake_quant = finishing(dcfg, state.step)
                students = draw_students(bank, dcfg, state.g_host, device, parts.spec.share)
                checks = StepChecks(world)
                mtt_update(state, parts.spec, students, dcfg, checks, world)
                mmd_update(state, parts.feature_net, students.feat_params, parts.train, dcfg, parts.amp, checks, world,
                           parts.features)
                checks.raise_flag(stop.requested)  # a stop on any rank stops them all, after the same step
                values = _read(checks, state, run, cfg)
                stopping = checks.flag
                state.step += 1
                meter.tick()
                last = step_metrics(state, students, dcfg, clock, t0, meter, device, values)
                _watch(state, last, main)
                metrics.write(last)
                _to_trackers(trackers, cfg, state, parts.train, run.path.name, last)
                bar.set_postfix_str(_postfix(last) + meter.budget_text(cfg.data.dataset, dcfg.steps, state.step),
                                    refresh=False)
                bar.update(1)
                if state.step % dcfg.checkpoint_every == 0 or state.step == dcfg.steps or stopping:
                    _checkpoint(state, run, world, meter)
                if on_step is not None:
                    on_step(last)
            interrupted = state.step < dcfg.steps
            if interrupted:
                meter.final_status = "interrupted"
    return DistillResult(run, state.step, clock() - t_start, interrupted, last, stop.requested)


def _watch(state: TrainState, metrics: dict[str, Any], main: bool) -> None:
    """The step's metrics into the state's MTT health watch (d3fast/health.py),
    the health into the metrics; a new problem's warning printed."""
    metrics["mtt_health"], warning = state.health.update(state.step, metrics["mtt"], metrics["student_lr"])
    if warning and main:
        tqdm.write(warning)


def _postfix(metrics: dict[str, Any]) -> str:
    """The progress line's losses and lr, with the MTT term's health when it is not ok."""
    unwell = "" if metrics["mtt_health"] in ("ok", "off") else f" ({metrics['mtt_health']})"
    return f"mtt {metrics['mtt']:.3f}{unwell} mmd {metrics['mmd']:.3f} lr {metrics['student_lr']:.4f} | "


def _to_trackers(trackers: Trackers, cfg: Config, state: TrainState, train: DeviceDataset, name: str,
                 metrics: dict[str, Any]) -> None:
    """The step's metrics, and every log.sample_every steps (and at the last) a labelled
    sample grid of 10 classes, to the run's trackers (log.trackers; none: nothing to do)."""
    if not trackers.open:
        return
    trackers.metrics(state.step, metrics)
    every = cfg.log.sample_every
    if every and (state.step % every == 0 or state.step == cfg.distill.steps):
        grid = grid_image(state.distilled, samples=4, bn=cfg.eval.decoder_bn, zca=train.zca,
                          title=f"{name}  step {state.step}", max_classes=10)
        trackers.image("samples", np.asarray(grid), state.step)


def finishing(dcfg: DistillConfig, step: int) -> bool:
    """Whether step `step` (0-based) is in the finishing phase: the last distill.quant_steps
    steps of a run whose distill.storage is not float32 decode and sample through the stored
    values (`Distilled.fake_quant`, straight-through to the float32 masters)."""
    return dcfg.storage != "float32" and step >= dcfg.steps - dcfg.quant_steps


def _checkpoint(state: TrainState, run: Run, world: World, meter: ledger.Meter) -> None:
    """Rank 0 saves the state, once the ranks are known to hold the same one."""
    world.check_same([t for _, t in state.named_tensors()], f"states at step {state.step}")
    if world.main:
        run.save_state(state)
    meter.flush()


class _NoMetrics:
    def write(self, record: dict[str, Any]) -> None:
        pass


@contextmanager
def _no_metrics() -> Iterator[_NoMetrics]:
    """The metrics writer of ranks other than 0: rank 0 writes the run's metrics."""
    yield _NoMetrics()


@dataclass
class _Parts:
    state: TrainState
    train: DeviceDataset
    bank: ExpertBank
    spec: UnrollSpec
    feature_net: torch.nn.Module
    amp: Callable[[], AbstractContextManager[Any]]
    # feature_net.features, through torch.compile under distill.compile
    features: Callable[[torch.Tensor], torch.Tensor]
    # a resume changed distill.storage: the checkpoint is written again before any step, so that
    # the object a finished run is read as (`Run.load_distilled`) is stored the new way
    restored: bool = False


def _build(
    cfg: Config, run: Run, resume: bool, device: torch.device, inputs: DistillInputs | None, world: World,
    checked: dict[str, list[Any]] | None,
) -> _Parts:
    """Data, experts, the student and feature networks, and the state: fresh (and the run
    recorded) or restored from the run's checkpoint (and the resume recorded). Distributed:
    the ranks' configs are compared, rank 0 decides and records, every rank reads the same
    files (a run directory rank 1 cannot see is an error on every rank)."""
    dcfg = cfg.distill
    if cfg.data.subtasks > 1 and cfg.data.subtask < 0:
        raise D3FastError(f"data.subtasks={cfg.data.subtasks}: a run distills one subtask; set data.subtask "
                          f"(0..{cfg.data.subtasks - 1}), or run `d3fast distill --subtasks {cfg.data.subtasks}`, "
                          "which distills every subtask and merges them")
    torch.manual_seed(dcfg.seed)
    if dcfg.amp and device.type != "cuda" and world.main:
        tqdm.write("note: --amp has no effect on the CPU (bf16 autocast is used on CUDA only)")
    if dcfg.lr_param == "leaky_relu" and dcfg.lr_lr > 1e-4 and world.main:
        tqdm.write(f"note: distill.lr_param=leaky_relu steps alpha by SGD at distill.lr_lr={dcfg.lr_lr:g}, a rate for "
                   "the log parametrisation's Adam; the reference used 1e-5 to 1e-6 (--set distill.lr_lr=1e-5)")
    world.check_config({k: v for k, v in flatten(cfg).items() if k != "device"})
    share = (dcfg.students_per_step, world.students(dcfg.students_per_step)) if world.distributed else None

    def decide() -> tuple[bool, dict[str, Any]]:
        recorded = resume and run.recorded()  # nothing recorded yet: a resume is a start
        found = (run.check_resume(cfg) if checked is None else checked) if recorded else {}  # before anything is built
        if not recorded and run.has_checkpoint():
            raise D3FastError(f"{run.path} already holds a checkpoint: continue it with --resume, or start a new run")
        return recorded, found

    resume, changes = world.on_main(decide)
    if inputs is None:
        inputs = DistillInputs(load_view(cfg, "train", device), _bank(cfg, run, resume))
    train, bank = inputs.train, inputs.bank
    # ranks on unshared homes read their own data and experts: they must be the same files
    world.check_config({"experts": [(f.name, f.stat().st_size) for f in bank.files], "train": len(train),
                        "classes": train.classes}, "expert files or training data")
    res, channels, n_cls = train.images.shape[-1], train.images.shape[1], train.num_classes
    dtype = torch_dtype(dcfg.dtype)  # every tensor of the step in it (distill.dtype)
    student = build_network(cfg.net, channels, n_cls, res).to(device, dtype)
    meta = {"resolution": res, "channels": channels, "mean": train.mean.tolist(), "std": train.std.tolist(),
            "z_dim": dcfg.z_dim, "decoder": dcfg.decoder, "decoder_width": dcfg.decoder_width,
            "decoder_linear": dcfg.decoder_linear, "lr_param": dcfg.lr_param}
    if dcfg.storage != "float32":  # float32 objects keep the meta (and export checksums) of before the key
        meta["storage"] = dcfg.storage
    d = init_distilled(n_cls, dcfg.ppc, train.classes, meta, dcfg.lr_teacher, device, dcfg.seed, dtype)
    d.decoder.span_ranks(world.distributed, world.group)
    state = TrainState.create(d, dcfg, device)
    restored = False  # the object's stored format changed on resume: checkpointed before the first step
    if resume:
        if run.has_checkpoint():
            held = run.load_state(device)
            state.load_state_dict(held, dcfg)
            restored = json.loads(held["meta"]).get("storage", "float32") != dcfg.storage
            problem = distilled_problems(state.distilled)
            if problem is not None:
                raise D3FastError(f"the checkpoint of {run.path} (step {state.step}) cannot be trained on: "
                                  f"{problem[0]} ({problem[1]}); start a new run with lower learning rates")
        else:
            _check_no_progress_lost(run, dcfg)
        if dcfg.steps < state.step:
            raise D3FastError(f"distill.steps={dcfg.steps} is below the step this run reached ({state.step}); "
                              f"pass --steps {state.step} or more")
        if world.main:
            run.resume(cfg, state.step, changes, world.size)
    elif world.main:
        run.start(cfg, {
            "dataset": cfg.data.dataset, "preset": cfg.preset, "device": device_name(device), "versions": versions(),
            "experts_dir": str(bank.folder), "experts_rel": _under_home(bank.folder), "experts_used": len(bank),
            "experts_files": [p.name for p in bank.files],
            "seeds": {"distill": dcfg.seed, "experts": cfg.experts.seed}, "created": timestamp(),
            "world_size": world.size,
        })
    world.same_files(run)
    amp = _amp(dcfg, device)
    fast = compiled(dcfg, device)
    if fast and not world.distributed:  # a decoder spanning ranks all-reduces inside its BatchNorm: eager
        d.compile_decoder()
    augment = DSA(cfg.augment, compiled=fast) if dcfg.augment_unroll else None
    spec = UnrollSpec(Student(student, compiled=fast), dcfg.syn_steps, dcfg.batch_syn, augment, amp, share,
                      dcfg.unroll_budget)
    feature_net = copy.deepcopy(student).requires_grad_(False)
    features = cast(Callable[[torch.Tensor], torch.Tensor], feature_net.features)
    if fast:
        features = Compiled(features, "the MMD features")
    return _Parts(state, train, bank, spec, feature_net, amp, features, restored)


def _under_home(path: Path) -> str | None:
    try:
        return str(path.resolve().relative_to(home().resolve()))
    except ValueError:
        return None


def _check_no_progress_lost(run: Run, dcfg: DistillConfig) -> None:
    """A resume without a checkpoint starts from step 0, which is right when none was ever
    written (a crash before the first one) and destroys progress when it was lost.

    Raises:
        D3FastError: the run had passed a checkpoint step, or had been resumed before, and
            its first checkpoint had not failed (Run.save_state).
    """
    reached = max((int(m.get("step", 0)) for m in run.read_metrics()), default=0)
    history = run.history()
    resumed = max((int(r.get("step", 0)) for r in history if r.get("event") != FIRST_CHECKPOINT_FAILED), default=0)
    if resumed == 0 and any(r.get("event") == FIRST_CHECKPOINT_FAILED for r in history):
        tqdm.write(f"note: {run.path} reached step {reached}, but its first checkpoint could not be written: "
                   "starting it from step 0")
        return
    if reached >= dcfg.checkpoint_every or resumed > 0:
        raise D3FastError(
            f"{run.checkpoint_path} is missing, but the run had reached step {max(reached, resumed)}: restore the "
            f"checkpoint from a copy, or delete {run.metrics_path} to start this run over from step 0"
        )
    tqdm.write(f"note: {run.path} holds no checkpoint yet: starting it from step 0")


def _bank(cfg: Config, run: Run, resume: bool) -> ExpertBank:
    """A new run takes every ready expert of its config; a resumed one the files its manifest
    lists, so that its draws repeat the uninterrupted run's even if more experts were
    trained since."""
    if resume:
        m = run.read_manifest()
        # under the current home first: a home moved or mounted elsewhere keeps its runs
        rel = m.get("experts_rel")
        folder = home() / rel if rel and (home() / rel).is_dir() else Path(m["experts_dir"])
        files = [folder / f for f in m.get("experts_files", [])] or sorted(folder.glob("expert_*.safetensors"))
        missing = [f.name for f in files if not f.exists()]
        if missing or not files:
            raise D3FastError(f"the expert trajectories this run matches are gone from {folder}"
                              + (f": {', '.join(missing)}" if missing else ""))
        try:
            return ExpertBank(folder, need_epochs(cfg), files, snapshots_per_epoch=cfg.experts.snapshots_per_epoch)
        except D3FastError as e:
            raise D3FastError(f"{e}; extend them with:\n  {experts_command(cfg)}") from None
    return ready_experts(cfg)  # data.loader settled by the caller (preflight.resolve_data_loader)


@dataclass
class Students:
    """The K students of a step: (expert, start epoch) each, their start and target
    parameters [K, P], and the MMD feature network's parameters [P] (first student's expert),
    in distill.dtype (the trajectories are stored in float32)."""

    picks: list[tuple[int, int]]
    theta0: torch.Tensor
    target: torch.Tensor
    feat_params: torch.Tensor
    # the bank's snapshots per epoch: a pick's start snapshot s is epoch s / snapshots_per_epoch
    snapshots_per_epoch: int = 1


def draw_students(
    bank: ExpertBank, dcfg: DistillConfig, g: torch.Generator, device: torch.device, share: tuple[int, slice] | None = None,
) -> Students:
    """Expert k ~ U{bank}, start t ~ U{0, 1/S, .., T - 1/S} (epochs; S = the bank's snapshots
    per epoch, 1 in MTT); theta_0 = expert[t], theta* = expert[t + M]; the feature network
    takes the first expert at epoch T + M ("expert") or its last ("final"). `picks` holds
    (expert, start snapshot = t S). Every rank draws all K students; with `share` (K, this
    rank's students) only its own students' rows are read and moved to the device."""
    with phase(DATA):
        starts, ahead = dcfg.max_start_epoch * bank.snapshots_per_epoch, bank.snapshot(dcfg.expert_epochs)
        picks = [(int(torch.randint(len(bank), (1,), generator=g)), int(torch.randint(starts, (1,), generator=g)))
                 for _ in range(dcfg.students_per_step)]
        feat_row = bank.snapshot(dcfg.max_start_epoch + dcfg.expert_epochs) if dcfg.mmd_param == "expert" else -1
        mine = share[1] if share is not None else slice(0, len(picks))
        rows = [bank.rows(e, [s, s + ahead]) for e, s in picks[mine]]
        feat = bank.rows(picks[0][0], [feat_row])[0]
        dtype = torch_dtype(dcfg.dtype)
        return Students(picks, _to_device(torch.stack([r[0] for r in rows]), device, dtype),
                        _to_device(torch.stack([r[1] for r in rows]), device, dtype), _to_device(feat, device, dtype),
                        bank.snapshots_per_epoch)


def _to_device(t: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A host tensor on `device` in `dtype`; to a GPU through pinned memory, without waiting
    for it (a copy from pageable memory blocks the host until the device has caught up)."""
    if device.type != "cuda":
        return t.to(device, dtype)
    return t.pin_memory().to(device, non_blocking=True).to(dtype)


def mtt_update(
    state: TrainState, spec: UnrollSpec, students: Students, dcfg: DistillConfig, checks: StepChecks,
    world: World | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One MTT update of `state` (latents, decoder, alpha): returns the (MTT, KL) terms,
    detached (in a distributed run, this rank's shares: they sum over the ranks to the
    terms); zeros when `mtt_weight` is 0. The terms and the state after the step are noted
    in `checks`, which the loop reads once per step (d3fast/state.py)."""
    world = world or World()
    d = state.distilled
    zero = torch.zeros((), device=d.latents.device)
    if dcfg.mtt_weight <= 0:
        checks.loss("MTT update", mtt=zero, kl=zero)
        return zero, zero
    with phase(UNROLL_FORWARD):
        theta_n = unroll(spec, d, students.theta0, state.g_device, dcfg.unroll, host=state.g_host)
    mtt = mtt_loss(theta_n, students.target, students.theta0)
    with phase(LOSSES):
        kl = losses.kl_standard_normal(d.latents[..., 0], d.latents[..., 1])
        # this rank's students are K / W of the K: its share of the mean over students
        mtt_share, kl_share = mtt / world.size, kl / world.size
        checks.loss("MTT update", mtt=mtt_share, kl=kl_share)
    with phase(OPTIMIZERS):
        for opt in state.optimizers:
            opt.zero_grad(set_to_none=True)
    with phase(UNROLL_BACKWARD):
        # the mean of the ranks' losses is the one-process loss; their gradients are averaged
        (dcfg.mtt_weight * mtt + dcfg.kl_weight * kl).backward()
    with phase(OPTIMIZERS):
        world.average_grads(d.params())
        for opt in state.optimizers:
            opt.step()
        checks.state(list(state.named_tensors()), d, "MTT update")
    return mtt_share.detach(), kl_share.detach()


def step_metrics(
    state: TrainState, students: Students, dcfg: DistillConfig, clock: Callable[[], float], started: float,
    meter: ledger.Meter, device: torch.device, values: dict[str, float],
) -> dict[str, Any]:
    """The metrics.jsonl line of the step just finished: every loss term and the student lr
    (`values`, read from the device: that waited for it), the weighted total, the first
    student's draw, time (clock() - started), throughput, memory and device-hours."""
    values = dict(values)
    student_lr = values.pop("student_lr")
    seconds = clock() - started
    weights = {"mtt": dcfg.mtt_weight, "kl": dcfg.kl_weight, "mmd": dcfg.mmd_weight, "div": dcfg.div_weight}
    d = state.distilled
    images = 0
    if dcfg.mtt_weight > 0:
        images += dcfg.students_per_step * dcfg.syn_steps * (dcfg.batch_syn or len(d.latents))
    if dcfg.mmd_weight > 0 or (dcfg.div_weight > 0 and dcfg.ppc > 1):
        images += d.num_classes * max(dcfg.mmd_samples // dcfg.ppc, 1) * dcfg.ppc
    expert, start = students.picks[0]
    per_epoch = students.snapshots_per_epoch
    return {
        "step": state.step, **values, "loss": sum(weights[k] * v for k, v in values.items()),
        "student_lr": student_lr, "expert": expert,
        "start_epoch": start if per_epoch == 1 else round(start / per_epoch, 6),
        "step_s": round(seconds, 4), "images_per_s": round(images / seconds, 1) if seconds > 0 else 0.0,
        "peak_mem_gib": round(peak_memory_gib(device), 3),
        "device_hours": round(meter.prior_hours + meter.hours, 6),
        "projected_device_hours": round(meter.projected_hours(dcfg.steps, state.step) or 0.0, 6),
        "hours_unit": meter.unit,
    }


def _read(checks: StepChecks, state: TrainState, run: Run, cfg: Config) -> dict[str, float]:
    """The step's noted terms and checks, with the student lr: the step's one wait for the
    device. A non-finite loss or state is an error naming the step and the last checkpoint."""
    try:
        with phase(LOSSES):
            return checks.read(student_lr=state.distilled.lr())
    except DivergedError as e:
        raise D3FastError(_diverged_message(e, state.step, run, cfg)) from None


def _diverged_message(e: DivergedError, step: int, run: Run, cfg: Config) -> str:
    """What diverged, what was kept, and the --resume command with lower learning rates:
    the preset's value, or a tenth of the current one when that is lower."""
    keep = (f"the last good checkpoint ({run.checkpoint_path}) is kept" if run.has_checkpoint()
            else "no checkpoint was written yet")
    preset = flatten(resolve_config(cfg.data.dataset, cfg.preset or None))
    lower = []
    for k in ("lr_latent", "lr_decode", "lr_lr"):
        now = getattr(cfg.distill, k)
        if now > 0:
            lower.append(f"--set distill.{k}={min(now / 10, preset[f'distill.{k}']):.3g}")
    return (f"{e.what} at step {step + 1}: {e.detail} in the {e.where}; stopped without saving this step, "
            f"{keep}. Lower the learning rates and continue: d3fast distill --resume {run.path} {' '.join(lower)}")


def compiled(dcfg: DistillConfig, device: torch.device) -> bool:
    """Whether the step's student functions, decoder, DSA ops and MMD features run compiled
    (distill.compile; auto: on CUDA)."""
    return dcfg.compile == "on" or (dcfg.compile == "auto" and device.type == "cuda")


def _amp(dcfg: DistillConfig, device: torch.device) -> Callable[[], AbstractContextManager[Any]]:
    """bf16 autocast on CUDA under --amp (decoder, unrolled student, MMD features); else nothing."""
    if dcfg.amp and device.type == "cuda":
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext


class _StopRequest:
    """First Ctrl-C / SIGTERM: finish the step, checkpoint, stop. A second one: abort now;
    but not under torchrun (`distributed`): there one stop reaches a worker twice (Slurm
    signals every process of the step, torchrun forwards it again), and torchrun kills its
    workers 30 s after a stop anyway."""

    def __init__(self, distributed: bool = False, main: bool = True) -> None:
        self.requested = False
        self.distributed, self.main = distributed, main

    @contextmanager
    def installed(self) -> Iterator[None]:
        def handler(signum: int, frame: Any) -> None:
            if self.requested:  # the second signal: a step that never ends must not hold the job
                if self.distributed:
                    return
                raise KeyboardInterrupt
            self.requested = True
            if self.main:
                tqdm.write("stop requested: finishing this step and saving a checkpoint"
                           + ("" if self.distributed else " (Ctrl-C again aborts)"))

        try:
            old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        except ValueError:  # not the main thread: no signal handling
            yield
            return
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)


__all__ = ["DistillInputs", "DistillResult", "Students", "distill", "draw_students", "mtt_update", "step_metrics"]


# ---- the command: a new run or a resumed one, or every subtask of a split and their merge


@dataclass
class DistillJob:
    """What `d3fast distill` and `d3fast.distill()` ask for. `typed` holds the typed flags
    by dotted key (None: not given); `resume` a run directory, `latest`, or `auto` (with
    `name`: the newest run of that name, else a new one)."""

    runs_dir: str
    dataset: str | None = None
    preset: str | None = None
    overrides: tuple[str, ...] = ()
    typed: dict[str, Any] = field(default_factory=dict)
    resume: str | None = None
    name: str | None = None
    no_auto: bool = False
    evaluate: bool = False
    budget_ipc: float | None = None
    budget_images: str = "uint8"


def command(job: DistillJob) -> Path:
    """`d3fast distill`, top to bottom; returns the run directory (for a `data.subtasks`
    split, the merged object's). Prepares the data and trains the experts first when they
    are missing (unless `no_auto`); labels (distill.soft_labels) and evaluates (`evaluate`)
    the result.

    Raises:
        D3FastError: what the command reports; `Interrupted` after Ctrl-C / SIGTERM (the
            finished work is saved).
    """
    with contextlib.ExitStack() as claims:  # names this job holds while it runs
        return _command(job, claims)


@contextlib.contextmanager
def claimed_name(runs_dir: str, dataset: str, name: str) -> Iterator[None]:
    """Hold the name of a `--resume auto` job: an flock on runs_dir/<dataset>/.name-<name>.lock
    from before the job looks for its run until it ends (the OS releases it however the job
    ends, so a restart claims it again). Looking up the run and creating it when missing is
    then one decision: two jobs started at the same moment can never both create a run.

    Raises:
        D3FastError: another live job holds the name (its pid named)."""
    path = runs_folder(runs_dir, dataset) / f".name-{name}.lock"
    with locked(path) as held:
        if not held:
            raise D3FastError(f"another job (pid {lock_holder(path)}) is running the run named {name!r}: this one "
                              "stops; once that job ends, --resume auto continues the run")
        yield


def _command(job: DistillJob, claims: contextlib.ExitStack) -> Path:
    # under torchrun: join the other ranks (NCCL on CUDA, gloo on the CPU); each rank
    # trains on cuda:LOCAL_RANK
    device = job.typed.get("device")
    world = World.from_env(device or "auto")
    typed = dict(job.typed)
    if world.distributed:
        typed["device"] = device = world.device(device or "auto")
    resume, name, dataset = job.resume, job.name, job.dataset
    if job.budget_ipc is not None:
        if resume not in (None, "auto"):
            raise D3FastError("--budget-ipc chooses the decoder and priors of a new run; a resumed run keeps its own")
        typed |= budget_overrides(dataset, job.preset, job.overrides, typed, job.budget_ipc, job.budget_images)
    announce = not dataset and resume in (None, "auto")  # say what a new run without --dataset will use
    if announce and not job.preset:  # the default dataset with its own preset, not the bare defaults
        dataset = Config().data.dataset
    preset = job.preset

    def resolve(base: Config | None = None) -> Config:
        return resolve_config(dataset, preset, job.overrides, typed_overrides=typed, base=base)

    if resume in (None, "auto"):
        whole = resolve()
        run_name(whole, name)  # a bad --name fails now, not after the experts
        if announce and world.main:
            click.echo(f"dataset {whole.data.dataset} (preset {whole.preset}"
                       + ("" if job.preset else "; --dataset or --preset picks another, `d3fast presets` lists them")
                       + ")")
        if whole.data.subtasks > 1 and whole.data.subtask < 0:
            return distill_subtasks(whole, world, job)
    # which run, and its config, are rank 0's decisions (every rank gets them, or its error)
    if resume == "auto":  # continue the run named NAME if there is one (restarted jobs), else start it
        if not name:
            raise D3FastError("--resume auto needs --name NAME: it continues the newest run of that name")
        cfg = resolve()

        def claim_and_find() -> Run | None:  # rank 0's: one decision for the job
            claims.enter_context(claimed_name(job.runs_dir, cfg.data.dataset, run_name(cfg, name)))
            return Run.named(job.runs_dir, cfg.data.dataset, run_name(cfg, name))

        found = world.on_main(claim_and_find)
        resume, name = (str(found.path), None) if found is not None else (None, name)
        # a scheduler restarts the whole command line, --preset included: the run's own preset is no change
        if found is not None and preset and (theirs := found.read_config().preset) != cfg.preset:
            raise D3FastError(f"--resume auto found {found.path}, a run of preset {theirs}, not {cfg.preset}: a run "
                              "keeps its configuration; another --name starts a new one")
        preset = None if found is not None else preset
    if resume is not None:
        if name is not None:
            raise D3FastError("--name names a new run; a resumed run keeps its directory")
        run = world.on_main(lambda: Run.open(resume, job.runs_dir))
        if run.merged_path.exists():
            raise D3FastError(f"{run.path} is a merged object, not a run: resume its subtask runs (its manifest.json "
                              "lists them), or re-run the `distill --subtasks` command, which continues them and "
                              "merges again")
        cfg = resolve(base=world.on_main(run.read_config))
        checked = world.on_main(lambda: run.check_resume(cfg))  # a refused change fails before any data is prepared
    else:
        cfg, checked = resolve(), None
    check_split(world, cfg)  # same config, K and the classes divisible: before any work
    check_trackers(cfg)
    # every rank prepares and trains experts: both are locked per dataset and per expert,
    # so the ranks share the work and find it done
    ensure_prepared(cfg, job.no_auto)
    if resume is None:  # a resumed run reads the experts its manifest lists
        resolve_data_loader(cfg)
        if world.main:  # what the run will do, and how long, before the experts and steps
            click.echo(plan(cfg, resolve_device(cfg.device).type))
        ensure_experts(cfg, auto=not job.no_auto, echo=click.echo if world.main else silent)
        run = world.on_main(lambda: Run.create(job.runs_dir, cfg, run_name(cfg, name)))
    res = distill(cfg, run, resume=resume is not None, world=world, progress=world.main, checked=checked)
    world.close()
    if not world.main:
        if res.interrupted:
            raise Interrupted(f"stopped at step {res.step}")
        return run.path
    last = res.last
    summary = f"; last mtt {last['mtt']:.4f} mmd {last['mmd']:.4f} student lr {last['student_lr']:.4g}" if last else ""
    state = "stopped early at" if res.interrupted else "reached"
    click.echo(f"{state} step {res.step}/{cfg.distill.steps} in {res.seconds:.1f} s{summary}")
    click.echo(f"run directory: {run.path}")
    if res.interrupted:
        click.echo(f"continue with: d3fast distill --resume {run.path}")
        raise Interrupted(f"stopped at step {res.step}: continue with d3fast distill --resume {run.path}")
    if cfg.distill.soft_labels and cfg.data.subtasks == 1:
        if not job.no_auto:
            ensure_labelling_expert(cfg, click.echo)
        label_run(run, cfg, device)
    if job.evaluate:
        evaluate_command(run_target(run, resolve_device("auto")))
    return run.path


def distill_subtasks(cfg: Config, world: World, job: DistillJob) -> Path:
    """Every subtask of cfg's split in its own run, then the merge (rank 0); returns the
    merged directory. Under torchrun with W <= S ranks, rank r distills subtasks r, r + W,
    ... alone; with W = G x S, the G consecutive ranks of group i distill subtask i together
    (data-parallel, as one run)."""
    S = cfg.data.subtasks
    if world.size > S and world.size % S:
        raise D3FastError(f"{world.size} processes for {S} subtasks: launch at most {S} (each rank distills whole "
                          f"subtasks) or a multiple of {S} (each subtask on {S} equal groups of ranks)")
    world.check_config({k: v for k, v in flatten(cfg).items() if k != "device"})
    if world.size > S:  # groups of G = W / S ranks, one subtask each
        g, team = world.groups(S)
        mine = [g]
    else:
        team, mine = World(), list(range(world.rank, S, world.size))
    # the ranks meet again when every subtask is done, hours later: a barrier on its own group
    # with a timeout past any distillation (a crashed rank still stops the job: torchrun ends them all)
    done_group = td.new_group(backend="gloo", timeout=datetime.timedelta(days=30)) if world.distributed else None
    base = job.name or cfg.preset or "run"
    ensure_prepared(cfg, job.no_auto)
    echo = click.echo if world.main else silent
    # one job per name: a second one started alongside would create its own subtask runs
    job_lock = Path(job.runs_dir) / cfg.data.dataset / f".{base}-subtasks.lock"
    with contextlib.ExitStack() as stack:  # held until the job ends (the OS releases it if it dies)
        held = world.on_main(lambda: stack.enter_context(locked(job_lock)))
        if not held:
            raise D3FastError(f"another `d3fast distill --subtasks` job named {base!r} is running (pid "
                              f"{lock_holder(job_lock)}): wait for it, or pass another --name")
        return _run_subtasks(cfg, world, team, mine, done_group, base, job, echo)


def _run_subtasks(cfg: Config, world: World, team: World, mine: list[int], done_group: Any, base: str,
                  job: DistillJob, echo: Echo) -> Path:
    """The body of `distill_subtasks`, under its job lock: this rank's subtasks (`mine`,
    on the world `team`), the barrier, then rank 0's merge."""
    S, runs_dir = cfg.data.subtasks, job.runs_dir
    out = Path(runs_dir) / cfg.data.dataset / f"{base}-merged"
    for one in each_subtask(cfg, echo):
        i = one.data.subtask
        if i not in mine:
            continue
        check_split(team, one)  # K students a multiple of the group's ranks, before any work
        name = run_name(one, base)
        found = team.on_main(lambda: Run.named(runs_dir, one.data.dataset, name))  # noqa: B023
        echo(f"subtask {i} of {S}: " + (f"continuing {found.path}" if found else f"new run {name}")
             + (f" on ranks {world.rank}..{world.rank + team.size - 1}" if team.distributed else ""))
        resolve_data_loader(one)
        if found is None:  # the group's ranks share the expert training through its locks
            ensure_experts(one, auto=not job.no_auto, echo=echo)
            run = team.on_main(lambda: Run.create(runs_dir, one, name))  # noqa: B023
        else:
            run = found
        res = distill(one, run, resume=found is not None, world=team, progress=world.main)
        if res.interrupted or res.stop_requested:  # a stop during a subtask's last step ends the job too
            click.echo(f"stopped at step {res.step} of subtask {i}: run the same command again to continue")
            raise Interrupted(f"stopped at step {res.step} of subtask {i}: run the same command again to continue")
    if done_group is not None:
        td.barrier(group=done_group)
    if not world.main:
        world.close()
        return out
    runs = []
    for one in each_subtask(cfg, silent):
        found = Run.named(runs_dir, cfg.data.dataset, run_name(one, base))
        if found is None:
            raise D3FastError(f"the run of subtask {one.data.subtask} ({run_name(one, base)}) is missing under "
                              f"{runs_dir}/{cfg.data.dataset}")
        runs.append(found.path)
    if is_merged_dir(out) and read_merged_manifest(Run(out)).get("subtasks") != S:
        raise D3FastError(f"{out} holds the merge of another split (not {S} subtasks): pass another --name, or "
                          "delete it")
    if up_to_date(out, runs):  # the same command again: the merged object (its labels, its evaluation) stays
        world.close()
        click.echo(f"{out} is up to date with the {S} subtask runs")
    else:
        merged, out = merge_runs(runs, out, force=True, soft_labels=cfg.distill.soft_labels,
                                 device=resolve_device(cfg.device), train_labeller=not job.no_auto)
        world.close()
        click.echo(f"merged {S} subtasks into {out}: {merged.num_classes} classes, "
                   f"{merged.storage_bytes() / 2**20:.2f} MiB (= {merged.images_per_class_equivalent():.2f} uint8 "
                   "images per class)" + ("; soft labels" if merged.soft_labels is not None else ""))
    if job.evaluate:
        evaluate_command(run_target(Run(out), resolve_device("auto")))
    return out
