"""`d3fast distill`: Algorithm 1 of D3 (SPEC.md section 5), top to bottom.

Per step:
  1. MTT update (latents, decoder, learnable lr alpha): start K students from expert
     epochs, unroll N student SGD steps on freshly decoded (and augmented) samples
     (d3fast/unroll.py: exact gradient, memory flat in N), L = mean_k ||theta_N - theta*||^2
     / ||theta_0 - theta*||^2 + KL.
  2. MMD update (latents, decoder): per class, unbiased mixture-of-Gaussians MMD^2 between
     ConvNet features (expert weights at T + M) of real and decoded samples, + diversity.
     All classes in one batched decode and one MMD op; the features are embedded chunk by
     chunk with an exact two-pass gradient (d3fast/embed.py: memory of one chunk's graph).

Every random draw comes from two generators (host: expert and start epoch; device: the
rest) whose states are checkpointed, so a resumed run repeats the uninterrupted one.

Each phase of a step is marked (`with phase(...)`, d3fast/phases.py) for `d3fast profile`;
the device-hours go to the ledger (d3fast/ledger.py), and the progress bar projects them
to the full step count next to the paper's budget.
"""

from __future__ import annotations

import copy
import json
import math
import resource
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from d3fast import ledger, losses
from d3fast.checkpoint import load_checkpoint, save_checkpoint
from d3fast.config import Config, apply_updates, to_dict
from d3fast.data.augment import DSA
from d3fast.data.loader import DeviceDataset, load_dataset
from d3fast.distilled import Distilled, init_distilled
from d3fast.embed import auto_chunk, embed
from d3fast.errors import D3FastError
from d3fast.experts import experts_dir, read_expert_meta
from d3fast.io import atomic_write_json, read_json
from d3fast.models import build_network
from d3fast.phases import phase
from d3fast.runtime import device_name, resolve_device, versions
from d3fast.training import load_flat_params
from d3fast.unroll import Student, UnrollSpec, mtt_loss, unroll


@dataclass
class DistillInputs:
    """What a run reads besides its config: the real train split and the expert bank.
    `d3fast profile` hands in stand-ins of the right shapes when these are not on disk."""

    train: DeviceDataset
    bank: ExpertBank


@dataclass
class DistillResult:
    run_dir: Path
    step: int
    seconds: float
    interrupted: bool
    last: dict[str, float]


class ExpertBank:
    """The complete expert trajectories of a config; rows are read lazily from the
    safetensors files (one expert of ConvNet-5 x 51 epochs is 125 MB)."""

    def __init__(self, folder: Path, need_epochs: int):
        from safetensors import safe_open

        self._open = safe_open
        usable = []
        for path in sorted(folder.glob("expert_*.safetensors")):
            # the header alone, not the trajectory (125 MB for ConvNet-5)
            if read_expert_meta(path)["epochs_done"] >= need_epochs:
                usable.append(path)
        if not usable:
            raise D3FastError(
                f"no expert in {folder} has the {need_epochs} epochs distillation needs "
                f"(max_start_epoch + expert_epochs); run `d3fast experts` with --epochs {need_epochs}"
            )
        self.files = usable
        self.folder = folder

    def __len__(self) -> int:
        return len(self.files)

    def rows(self, index: int, epochs: list[int]) -> list[torch.Tensor]:
        with self._open(str(self.files[index]), framework="pt") as f:
            traj = f.get_slice("trajectory")
            last = traj.get_shape()[0] - 1
            return [traj[min(e, last) if e >= 0 else last] for e in epochs]


def new_run_dir(cfg: Config, runs_dir: Path, name: str | None) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run = runs_dir / cfg.data.dataset / f"{stamp}-{name or cfg.preset or 'run'}"
    suffix = 1
    while run.exists():
        run = run.with_name(f"{run.name}-{suffix}")
        suffix += 1
    return run


class _StopRequest:
    """First Ctrl-C / SIGTERM: finish the step, checkpoint, stop. Second Ctrl-C: abort now."""

    def __init__(self) -> None:
        self.requested = False

    @contextmanager
    def installed(self) -> Iterator[None]:
        def handler(signum: int, frame: Any) -> None:
            if self.requested and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.requested = True
            tqdm.write("stop requested: finishing this step and saving a checkpoint (Ctrl-C again aborts)")

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


def distill(
    cfg: Config,
    run_dir: Path | None = None,
    resume: bool = False,
    progress: bool = True,
    runs_dir: Path = Path("runs"),
    name: str | None = None,
    *,
    inputs: DistillInputs | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    ledger_phase: str = "distill",
    clock: Callable[[], float] = time.monotonic,
) -> DistillResult:
    """Run (or resume) Algorithm 1. `on_step(metrics)` is called after every step;
    `ledger_phase` names the ledger row ("profile" under `d3fast profile`); `clock` times
    the device-hours (tests pass a fake one)."""
    dcfg = cfg.distill
    device = resolve_device(cfg.device)
    torch.manual_seed(dcfg.seed)
    if dcfg.amp and device.type != "cuda":
        tqdm.write("note: --amp has no effect on the CPU (bf16 autocast is used on CUDA only)")

    # ---- setup: data, experts, networks, the distilled object, optimisers
    need = dcfg.max_start_epoch + dcfg.expert_epochs
    if inputs is None:
        zca = cfg.data.zca_eps if cfg.data.zca else None
        inputs = DistillInputs(load_dataset(cfg.data.dataset, "train", device, zca), ExpertBank(experts_dir(cfg), need))
    train, bank = inputs.train, inputs.bank
    res, channels, n_cls = train.images.shape[-1], train.images.shape[1], train.num_classes
    student = build_network(
        cfg.net.name, channels, n_cls, res, width=cfg.net.width, depth=cfg.net.depth,
        norm=cfg.net.norm, pooling=cfg.net.pooling,
    ).to(device)
    feature_net = copy.deepcopy(student).requires_grad_(False)
    meta = {
        "resolution": res, "channels": channels,
        "mean": train.mean.tolist(), "std": train.std.tolist(),
        "z_dim": dcfg.z_dim, "decoder": dcfg.decoder, "decoder_width": dcfg.decoder_width,
    }
    d = init_distilled(n_cls, dcfg.ppc, train.classes, meta, dcfg.lr_teacher, device, dcfg.seed)
    opt_latent = torch.optim.SGD([d.latents], lr=dcfg.lr_latent, momentum=0.5)
    opt_lr = torch.optim.SGD([d.alpha], lr=dcfg.lr_lr, momentum=0.5)
    opt_decoder = torch.optim.Adam(d.decoder.parameters(), lr=dcfg.lr_decode, weight_decay=1e-5)
    amp_on = dcfg.amp and device.type == "cuda"

    def amp() -> Any:
        return torch.autocast("cuda", dtype=torch.bfloat16) if amp_on else nullcontext()

    spec = UnrollSpec(
        Student(student), dcfg.syn_steps, dcfg.batch_syn, DSA(cfg.augment) if dcfg.augment_unroll else None, amp,
    )
    g_host = torch.Generator().manual_seed(dcfg.seed)
    g_dev = torch.Generator(device=device).manual_seed(dcfg.seed + 7)
    step, best = 0, {"step": None, "loss": math.inf}

    if resume:
        assert run_dir is not None
        state = load_checkpoint(run_dir / "checkpoint.pt", device)
        with torch.no_grad():
            d.latents.copy_(state["latents"])
            d.alpha.copy_(state["alpha"])
        d.decoder.load_state_dict(state["decoder"])
        opt_latent.load_state_dict(state["opt_latent"])
        opt_lr.load_state_dict(state["opt_lr"])
        opt_decoder.load_state_dict(state["opt_decoder"])
        g_host.set_state(state["rng_host"].cpu())
        g_dev.set_state(state["rng_device"].cpu())
        step, best = state["step"], json.loads(state["best"])
        _truncate_metrics(run_dir / "metrics.jsonl", step)
    else:
        run_dir = run_dir or new_run_dir(cfg, runs_dir, name)
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run_dir / "config.json", to_dict(cfg))
        atomic_write_json(run_dir / "manifest.json", {
            "dataset": cfg.data.dataset, "preset": cfg.preset, "device": device_name(device),
            "versions": versions(), "experts_dir": str(bank.folder), "experts_used": len(bank),
            "seeds": {"distill": dcfg.seed, "experts": cfg.experts.seed},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        })

    def checkpoint() -> None:
        save_checkpoint(run_dir / "checkpoint.pt", {
            "step": step,
            "latents": d.latents.detach(), "alpha": d.alpha.detach(),
            "decoder": d.decoder.state_dict(),
            "opt_latent": opt_latent.state_dict(), "opt_lr": opt_lr.state_dict(),
            "opt_decoder": opt_decoder.state_dict(),
            "rng_host": g_host.get_state(), "rng_device": g_dev.get_state(),
            "best": json.dumps(best),
            "classes": json.dumps(d.classes), "meta": json.dumps(d.meta), "ppc": dcfg.ppc,
        })

    # ---- the loop
    stop = _StopRequest()
    bar = tqdm(total=dcfg.steps, initial=step, desc="distill", unit="step", disable=not progress, dynamic_ncols=True)
    t_start, last = time.perf_counter(), {}
    metrics = open(run_dir / "metrics.jsonl", "a")
    interrupted = False
    meter_cm = ledger.track(
        ledger_phase, cfg.data.dataset, cfg.preset, device, steps_target=dcfg.steps,
        run=str(run_dir.resolve()), clock=clock,
    )
    with stop.installed(), meter_cm as meter:
        while step < dcfg.steps and not stop.requested:
            t0 = time.perf_counter()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            with phase("data"):
                picks = []
                for _ in range(dcfg.students_per_step):
                    expert = int(torch.randint(len(bank), (1,), generator=g_host))
                    picks.append((expert, int(torch.randint(dcfg.max_start_epoch, (1,), generator=g_host))))
                # the MMD features use the first student's expert; -1: its last epoch
                feat_epoch = need if dcfg.mmd_param == "expert" else -1
                rows = [bank.rows(e, [s, s + dcfg.expert_epochs] + ([feat_epoch] if k == 0 else []))
                        for k, (e, s) in enumerate(picks)]
                theta0 = torch.stack([r[0] for r in rows]).to(device)  # [K, P]
                target = torch.stack([r[1] for r in rows]).to(device)
                feat_params = rows[0][2].to(device)
            expert, start = picks[0]
            images = 0

            # 1. MTT update: latents, decoder, alpha
            mtt = kl = torch.zeros((), device=device)
            if dcfg.mtt_weight > 0:
                with phase("unroll forward"):
                    theta_n = unroll(spec, d, theta0, g_dev, dcfg.unroll)
                mtt = mtt_loss(theta_n, target, theta0)
                with phase("losses"):
                    kl = losses.kl_standard_normal(d.latents[..., 0], d.latents[..., 1])
                    _check_finite(step, run_dir, mtt=mtt, kl=kl)
                with phase("optimizers"):
                    for opt in (opt_latent, opt_lr, opt_decoder):
                        opt.zero_grad(set_to_none=True)
                with phase("unroll backward"):
                    (dcfg.mtt_weight * mtt + dcfg.kl_weight * kl).backward()
                with phase("optimizers"):
                    for opt in (opt_latent, opt_lr, opt_decoder):
                        opt.step()
                images += dcfg.students_per_step * dcfg.syn_steps * (dcfg.batch_syn or len(d.latents))

            # 2. MMD update: latents, decoder
            mmd = div = torch.zeros((), device=device)
            if dcfg.mmd_weight > 0 or (dcfg.div_weight > 0 and dcfg.ppc > 1):
                with phase("mmd"):
                    load_flat_params(feature_net, feat_params)
                    with amp():
                        mmd, div = mmd_terms(feature_net, d, train, dcfg, g_dev)
                with phase("losses"):
                    _check_finite(step, run_dir, mmd=mmd, div=div)
                with phase("optimizers"):
                    opt_latent.zero_grad(set_to_none=True)
                    opt_decoder.zero_grad(set_to_none=True)
                with phase("mmd"):
                    (dcfg.mmd_weight * mmd + dcfg.div_weight * div).backward()
                with phase("optimizers"):
                    opt_latent.step()
                    opt_decoder.step()
                images += n_cls * (dcfg.mmd_samples // dcfg.ppc) * dcfg.ppc

            step += 1
            with phase("losses"):
                total = (dcfg.mtt_weight * mtt + dcfg.kl_weight * kl + dcfg.mmd_weight * mmd + dcfg.div_weight * div).item()
            dt = time.perf_counter() - t0
            meter.tick()
            last = {
                "step": step, "mtt": mtt.item(), "kl": kl.item(), "mmd": mmd.item(), "div": div.item(),
                "loss": total, "student_lr": d.student_lr, "expert": expert, "start_epoch": start,
                "step_s": round(dt, 4), "images_per_s": round(images / dt, 1), "peak_mem_gib": _peak_mem(device),
                "device_hours": round(meter.prior_hours + meter.hours, 6),
                "projected_device_hours": round(meter.projected_hours(dcfg.steps, step), 6),
                "hours_unit": meter.unit,
            }
            if total < best["loss"]:
                best = {"step": step, "loss": total}
            metrics.write(json.dumps(last) + "\n")
            metrics.flush()
            bar.set_postfix_str(
                f"mtt {last['mtt']:.3f} mmd {last['mmd']:.3f} lr {last['student_lr']:.4f} | "
                + meter.budget_text(cfg.data.dataset, dcfg.steps, step),
                refresh=False,
            )
            bar.update(1)
            if step % dcfg.checkpoint_every == 0 or step == dcfg.steps or stop.requested:
                checkpoint()
                meter.flush()
            if on_step is not None:
                on_step(last)
        interrupted = stop.requested and step < dcfg.steps
        if interrupted:
            meter.final_status = "interrupted"
    bar.close()
    metrics.close()
    return DistillResult(run_dir, step, time.perf_counter() - t_start, interrupted, last)


def mmd_terms(
    feature_net: torch.nn.Module, d: Distilled, train: DeviceDataset, dcfg: Any, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(MMD term, diversity term). Real features come from S images per class; each prior
    decodes S // PPC samples, so both sides hold about S samples per class. Every class is
    decoded in one batch (the decoder's BatchNorm sees the whole sample set, as in the
    reference) and embedded in chunks of `mmd_chunk` samples (d3fast/embed.py) unless
    `mmd_exact_graph`."""
    n_cls, ppc = d.num_classes, d.ppc
    per_prior = max(dcfg.mmd_samples // ppc, 1)
    chunk, one_graph = dcfg.mmd_chunk, dcfg.mmd_exact_graph
    mmd = torch.zeros((), device=d.latents.device)
    if dcfg.mmd_weight > 0:
        with torch.no_grad():
            with phase("data"):
                real = train.sample_per_class(per_prior * ppc, g)  # [C, S, ch, H, W]
            if not chunk and not one_graph:  # once for both sides: they have the same image shape
                chunk = auto_chunk(feature_net.features, feature_net, real[0])
            f_real = embed(feature_net, real.flatten(0, 1), chunk, one_graph).float().view(n_cls, per_prior * ppc, -1)
        idx = torch.arange(len(d.latents), device=d.latents.device).repeat_interleave(per_prior)
        x = d.decode(idx, g)  # [C * PPC * per_prior, ch, H, W], class-major
        f_syn = embed(feature_net, x, chunk, one_graph).float().view(n_cls, ppc * per_prior, -1)
        bandwidths = dcfg.mmd_bandwidths
        if dcfg.mmd_scale == "median":
            med = losses.pairwise_sq_dists(f_real, f_real).median().sqrt().item()
            bandwidths = [b * med for b in bandwidths]
        per_class = losses.mmd2(f_syn, f_real, bandwidths)
        mmd = per_class.sum() if dcfg.mmd_reduction == "sum" else per_class.mean()
    div = torch.zeros((), device=d.latents.device)
    if ppc > 1 and dcfg.div_weight > 0:
        means = d.mean_images().float()
        div = losses.diversity(means.view(n_cls, ppc, *means.shape[1:]))
    return mmd, div


def _check_finite(step: int, run_dir: Path, **terms: torch.Tensor) -> None:
    bad = {k: float(v.detach()) for k, v in terms.items() if not torch.isfinite(v).all()}
    if bad:
        ckpt = run_dir / "checkpoint.pt"
        keep = f"the last good checkpoint ({ckpt}) is kept" if ckpt.exists() else "no checkpoint was written yet"
        raise D3FastError(
            f"non-finite loss at step {step + 1}: {bad}; stopped without saving this step, {keep}. "
            "Lower distill.lr_latent / lr_decode / lr_lr, or resume with --resume after changing them."
        )


def _peak_mem(device: torch.device) -> float:
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    # peak resident set of the process (Linux reports KiB)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines written after the checkpoint we resume from."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
    path.write_text("".join(ln + "\n" for ln in keep))


def load_run_config(run_dir: Path) -> Config:
    """The resolved config a run was started with (unknown keys are errors)."""
    cfg = Config()
    apply_updates(cfg, read_json(run_dir / "config.json", "run config"), "", from_string=False)
    return cfg


def distilled_from_run(run_dir: Path, device: torch.device | str = "cpu") -> tuple[Distilled, Config, int]:
    """The distilled object of a run's latest checkpoint."""
    from d3fast.distilled import build_decoder

    cfg = load_run_config(run_dir)
    state = load_checkpoint(run_dir / "checkpoint.pt", device)
    meta = json.loads(state["meta"])
    decoder = build_decoder(meta)
    decoder.load_state_dict(state["decoder"])
    classes = json.loads(state["classes"])
    d = Distilled(
        latents=state["latents"], decoder=decoder.to(device), alpha=state["alpha"],
        num_classes=len(classes), ppc=int(state["ppc"]), classes=classes, meta=meta,
    )
    return d, cfg, int(state["step"])


