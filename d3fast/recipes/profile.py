"""`d3fast profile`: where a distillation step's time and memory go.

Runs the real distillation loop (d3fast/recipes/distill.py, same code path) for
`warmup + steps + trace_steps` steps and writes a report directory:

    report.md      phases of a step, throughput, peak memory, top kernels, fused-kernel rates
    report.json    the same numbers, machine-readable
    trace.json     Chrome trace of the traced steps (chrome://tracing or ui.perfetto.dev)
    phases.png     mean time per phase
    memory.png     memory over the timed steps, phases shaded
    metrics.jsonl  the loop's own per-step metrics

Timing is split on purpose. `free_steps` run with no marker at all: the loop as `distill`
runs it, one wait for the device per step, so the CPU queues kernels while the GPU runs
them; their time is the step rate, and the projection uses it. The `steps` timed steps run
with the phase timer (a GPU sync at each phase edge, a few hundred per step): honest
per-phase times, at the cost of that overlap. torch.profiler, whose per-op bookkeeping slows
a CPU step by 10-40%, runs only on the `trace_steps` after them, which feed the trace and
the kernel tables. The report gives every step time. On the CPU the phase edges wait for
nothing, so `free_steps` defaults to 0 there.

Without the dataset's cache or its experts (profiling ImageWoof before spending hours on
experts), stand-ins of the same shapes are used: random uint8 images and random-walk
expert trajectories of the right network. Step cost does not depend on the values; the
report says which inputs were used.
"""

from __future__ import annotations

import contextlib
import copy
import math
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import torch

from d3fast import compiling, gpu_model, ledger
from d3fast.config import Config
from d3fast.data.cache import read_manifest
from d3fast.data.datasets import get_spec, subtask_block
from d3fast.data.loader import DeviceDataset, load_view
from d3fast.data.prepare import prepare_command
from d3fast.errors import D3FastError
from d3fast.io import atomic_path, atomic_write_json, atomic_write_text, file_stamp, timestamp
from d3fast.models import build_network
from d3fast.models._layers import FeatureClassifier
from d3fast.paths import data_dir
from d3fast.phases import PHASES, FlopCounter, KernelCounter, PhaseTimer, active, set_marking
from d3fast.preflight import resolve_data_loader
from d3fast.progress import bar as progress_bar
from d3fast.recipes.distill import DistillInputs, compiled, distill
from d3fast.run import Run
from d3fast.runtime import device_name, device_peaks, peak_memory_gib, resolve_device, versions
from d3fast.training import flat_params
from d3fast.trajectories import ExpertBank, need_epochs, ready_experts, write_expert

# names the fused ops carry in the profiler: Triton kernels on CUDA, record_function
# ranges around the C++ calls on the CPU (kernels/__init__.py)
FUSED = {
    "mmd2": ("_mmd_fwd_kernel", "d3fast::mmd2_cpp"),
    "param distance (sums)": ("_param_dist_fwd_kernel", "d3fast::param_dist_sums_cpp"),
    "param distance (grads)": ("_param_dist_bwd_kernel", "d3fast::param_dist_grads_cpp"),
}


@dataclass
class ProfileResult:
    out: Path
    report: dict[str, Any]


def profile(
    cfg: Config, out: Path, steps: int = 5, trace_steps: int = 2, warmup: int = 1,
    stand_in: str = "auto", progress: bool = True, clock: Callable[[], float] = time.perf_counter,
    free_steps: int | None = None,
) -> ProfileResult:
    """Profile `cfg`'s distillation steps: `warmup`, then `free_steps` without markers (None:
    as many as `steps` on CUDA, 0 on the CPU), `steps` with the phase timer, `trace_steps`
    under torch.profiler; write the report directory `out`. stand_in: auto (stand-ins for
    what is missing) | always | never. `clock` (seconds) drives the phase timer and the
    loop's step times alike (tests pass a fake one)."""
    if steps < 1 or trace_steps < 0 or warmup < 0 or (free_steps or 0) < 0:
        raise D3FastError("profile: need --steps >= 1, --trace-steps >= 0, --warmup >= 0, --free-steps >= 0")
    if stand_in not in ("auto", "always", "never"):
        raise D3FastError(f"profile: stand_in must be auto, always or never, not {stand_in!r}")
    device = resolve_device(cfg.device)
    if free_steps is None:
        free_steps = steps if device.type == "cuda" else 0
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise D3FastError(f"profile: --out {out} is a file; name a folder") from None
    full_steps = cfg.distill.steps
    pcfg = copy.deepcopy(cfg)
    # step k's kind; the markers are on for every kind but "free". One "counted" step runs
    # under a kernel counter (a profiler: not timed). It follows a step (the counter
    # starts in on_step) and never ends the run (distill writes the run's checkpoint after the
    # last step, before on_step could stop the counter): after the warm-up and free steps, or
    # after the first timed step. A "flops" step follows it, eager, under a FLOP counter
    # (phases.FlopCounter; compiled graphs refuse its dispatch mode, and the arithmetic is the
    # same): the GPU projection's second count. One untimed "tail" step ends the run if nothing else would.
    pre = ["warmup"] * warmup + ["free"] * free_steps
    timed = ["timed"] * steps
    counted = ["counted", "flops"]
    kinds = (pre + counted + timed if pre else timed[:1] + counted + timed[1:]) + ["traced"] * trace_steps
    if kinds[-1] == "flops":
        kinds.append("tail")
    pcfg.distill.steps = len(kinds)
    pcfg.distill.checkpoint_every = 10**9  # one checkpoint, after the last step

    scratch = Path(tempfile.mkdtemp(prefix=".profile-", dir=out))
    try:
        inputs, sources = _inputs(pcfg, device, stand_in, scratch)
        if sources["experts"].startswith("stand-in"):
            # random-walk trajectories give meaningless gradients that can throw the learned
            # lr below zero and stop the run; optimisers stepping with lr 0 do the same work
            pcfg.distill.lr_latent = pcfg.distill.lr_lr = pcfg.distill.lr_decode = 0.0
            sources["experts"] += "; optimiser learning rates set to 0"
        timer = PhaseTimer(device, clock)
        per_step: list[dict[str, Any]] = []
        tracer = _tracer(device)
        bar = progress_bar(total=pcfg.distill.steps, desc="profile", unit="step", disable=not progress, dynamic_ncols=True)

        # entered for the counted and the flops step: the counter and the stack that closes it
        counter: list[tuple[contextlib.ExitStack, KernelCounter | FlopCounter]] = []
        compiled_s = [compiling.seconds()]  # torch.compile's seconds in this process, after the last step

        def open_counter(kind: str) -> None:
            stack = contextlib.ExitStack()
            if kind == "flops":
                stack.enter_context(compiling.eager())
            c = stack.enter_context(KernelCounter(device) if kind == "counted" else FlopCounter())
            counter.append((stack, c))

        def on_step(metrics: dict[str, Any]) -> None:
            phases = timer.end_step()
            compile_now = compiling.seconds()
            k = len(per_step)
            kind = kinds[k]
            per_step.append({"kind": kind, "step_s": metrics["step_s"], "images_per_s": metrics["images_per_s"],
                             "peak_mem_gib": metrics["peak_mem_gib"], "phases": phases,
                             "edge_s": timer.step_edges[-1], "compile_s": compile_now - compiled_s[0]})
            compiled_s[0] = compile_now
            if kind in ("counted", "flops"):
                stack, done = counter.pop()
                stack.close()
                if isinstance(done, KernelCounter):
                    per_step[-1]["kernels"] = done.counts
                else:
                    per_step[-1]["flops"] = done.flops
            if k + 1 < len(kinds) and kinds[k + 1] in ("counted", "flops"):
                open_counter(kinds[k + 1])
            bar.set_postfix_str(f"{kind} step {metrics['step_s']:.2f} s", refresh=False)
            bar.update(1)
            if k + 1 < len(kinds):
                set_marking(None if kinds[k + 1] == "free" else timer)
            if k + 1 == len(kinds) - trace_steps and trace_steps:
                tracer.start()
                tracing.append(True)

        tracing: list[bool] = []
        with active(timer), timer.sample_memory():
            set_marking(None if kinds[0] == "free" else timer)
            try:
                # compiled kernels name themselves in the profiler's record (KernelCounter)
                import torch._inductor.config as inductor_config

                with inductor_config.patch({"cpp.enable_kernel_profile": True}):
                    res = distill(pcfg, Run.at(scratch / "run"), inputs=inputs, progress=False, on_step=on_step,
                                  ledger_phase="profile", clock=clock)
            finally:
                for stack, _ in counter:  # the run stopped inside a counted step
                    stack.close()
                if tracing:  # started only once the traced steps began (a stop may come first)
                    tracer.stop()
                bar.close()
        if res.interrupted:
            raise KeyboardInterrupt
        shutil.copyfile(Run(scratch / "run").metrics_path, out / "metrics.jsonl")
        report = _report(cfg, device, sources, per_step, timer, tracer if trace_steps else None,
                         inputs, full_steps, warmup, steps, trace_steps, free_steps)
        if trace_steps:
            with atomic_path(out / "trace.json") as tmp:
                tracer.export_chrome_trace(str(tmp))
            report["files"].append("trace.json")
        _plots(report, timer, per_step, out)
        atomic_write_json(out / "report.json", report)
        atomic_write_text(out / "report.md", markdown(report))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return ProfileResult(out, report)


def _tracer(device: torch.device) -> torch.profiler.profile:
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    return torch.profiler.profile(activities=acts, record_shapes=False, profile_memory=False, with_stack=False)


# ---- inputs: the real ones, or stand-ins of the same shapes


def _inputs(cfg: Config, device: torch.device, stand_in: str, scratch: Path) -> tuple[DistillInputs, dict[str, str]]:
    ds = cfg.data.dataset
    spec = get_spec(ds)
    need = need_epochs(cfg)
    prepared = read_manifest(data_dir(ds)) is not None
    if stand_in == "never" and not prepared:
        raise D3FastError(f"dataset {ds!r} is not prepared (profile --stand-in never); run:\n  {prepare_command(cfg)}")
    if prepared and stand_in != "always":
        train = load_view(cfg, "train", device)
        sources = {"data": f"real ({len(train)} train images)"}
    else:
        start, stop = subtask_block(ds, cfg.data.subtasks, max(cfg.data.subtask, 0))
        train = _stand_in_data(stop - start, spec.channels, spec.resolution, cfg.distill.mmd_samples, device)
        if cfg.data.zca:  # the whitening matmul costs the same with any matrix of its size
            dim = spec.channels * spec.resolution**2
            train.zca = (torch.eye(dim, device=device), torch.zeros(dim, device=device))
        sources = {"data": f"stand-in (random uint8, {len(train)} images of {spec.channels}x{spec.resolution}x{spec.resolution})"}
    bank = None
    if prepared and stand_in != "always":
        resolve_data_loader(cfg)
        try:
            bank = ready_experts(cfg)
            sources["experts"] = f"real ({len(bank)} trajectories)"
        except D3FastError:
            if stand_in == "never":
                raise
    if bank is None:
        bank = _stand_in_experts(cfg, train, need, scratch / "experts")
        rows = need * cfg.experts.snapshots_per_epoch + 1
        sources["experts"] = f"stand-in ({len(bank)} random-walk trajectories of {rows} snapshots, {need} epochs)"
    return DistillInputs(train, bank), sources


def _stand_in_data(n_cls: int, ch: int, res: int, mmd_samples: int, device: torch.device) -> DeviceDataset:
    per_class = max(2 * mmd_samples, 64)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n_cls * per_class, ch, res, res), generator=g, dtype=torch.uint8)
    return DeviceDataset(
        images=images.to(device), labels=torch.arange(n_cls).repeat_interleave(per_class).to(device),
        mean=torch.full((ch,), 0.5, device=device), std=torch.full((ch,), 0.25, device=device),
        classes=[f"class{i}" for i in range(n_cls)],
    )


def _stand_in_experts(cfg: Config, train: DeviceDataset, need: int, folder: Path, count: int = 2) -> ExpertBank:
    """Random-walk trajectories from the network's own init, in the expert file format, so
    the loop reads them from disk as it would real ones."""
    per_epoch = cfg.experts.snapshots_per_epoch
    for i in range(count):
        torch.manual_seed(1000 + i)
        net = _network(cfg, train)
        theta = flat_params(net)
        steps = torch.randn(need * per_epoch, theta.numel()) * (1e-3 * theta.abs().mean())
        traj = torch.cat([theta[None], theta[None] + steps.cumsum(0)])
        write_expert(folder / f"expert_{i:04d}.safetensors", traj, index=i, seed=1000 + i, complete=True,
                     test_acc=None, history=[], param_layout=[], snapshots_per_epoch=per_epoch, stand_in=True)
    return ExpertBank(folder, need)


def _network(cfg: Config, train: DeviceDataset) -> FeatureClassifier:
    return build_network(cfg.net, train.channels, train.num_classes, train.resolution)  # type: ignore[return-value]


# ---- the report


def _report(
    cfg: Config, device: torch.device, sources: dict[str, str], per_step: list[dict[str, Any]],
    timer: PhaseTimer, tracer: torch.profiler.profile | None, inputs: DistillInputs, full_steps: int,
    warmup: int, steps: int, trace_steps: int, free_steps: int,
) -> dict[str, Any]:
    timed = [s for s in per_step if s["kind"] == "timed"]
    traced = [s for s in per_step if s["kind"] == "traced"]
    free = [s for s in per_step if s["kind"] == "free"]
    step_s = statistics.mean(s["step_s"] for s in timed)
    # the step rate: free-running steps where measured (the markers' syncs cost a GPU its
    # overlap with the host), else the timed ones (on the CPU they are the same)
    rate_s = statistics.median(s["step_s"] for s in free) if free else step_s
    phases = {p: statistics.mean(s["phases"].get(p, 0.0) for s in timed) for p in PHASES}
    unknown = sorted({p for s in timed for p in s["phases"]} - set(PHASES))
    for p in unknown:  # a phase added to the loop but not to PHASES still shows up
        phases[p] = statistics.mean(s["phases"].get(p, 0.0) for s in timed)
    named = sum(phases.values())
    phases["other"] = step_s - named
    dcfg = cfg.distill
    unit = ledger.hours_unit(device.type)
    proj_hours = rate_s * full_steps / 3600
    paper = ledger.PAPER_BUDGETS.get(cfg.data.dataset)
    shapes = _shapes(cfg, inputs.train)
    report: dict[str, Any] = {
        "dataset": cfg.data.dataset, "preset": cfg.preset, "device": device_name(device), "device_kind": device.type,
        "versions": versions(), "created": timestamp(), "inputs": sources,
        "config": {k: getattr(dcfg, k) for k in ("ppc", "syn_steps", "batch_syn", "students_per_step", "mmd_samples",
                                                 "unroll", "amp", "dtype", "decoder", "decoder_width",
                                                 "decoder_linear", "z_dim")}
        | {"net": f"{cfg.net.name} width {cfg.net.width} depth {cfg.net.depth or 'auto'} {cfg.net.norm}"},
        "shapes": shapes,
        "steps": {"warmup": warmup, "free": free_steps, "timed": steps, "counted": 1, "flops": 1,
                  "traced": trace_steps},
        "step_s": {"mean": step_s, "median": statistics.median(s["step_s"] for s in timed),
                   "min": min(s["step_s"] for s in timed), "max": max(s["step_s"] for s in timed),
                   "per_step": [s["step_s"] for s in timed]},
        "steps_per_s": 1 / rate_s,
        # seconds per step as `distill` runs (no markers): the median of the free-running
        # steps, or the timed steps' mean when none ran
        "rate_step_s": rate_s,
        "images_per_s": statistics.mean(s["images_per_s"] for s in timed),
        "phases_s": phases,
        "phases_fraction": {p: v / step_s for p, v in phases.items()},
        # how much of the measured step the named phases account for (the rest is "other")
        "phase_coverage": named / step_s,
        "peak_memory": _peak_memory(device, timed, timer),
        # a subtask's hours; the job distills data.subtasks of them (one after another, or
        # one per device in parallel: the same device-hours)
        "projection": {"steps": full_steps, "device_hours": proj_hours, "unit": unit,
                       "subtasks": cfg.data.subtasks, "all_subtasks_device_hours": proj_hours * cfg.data.subtasks,
                       "paper_gpu_hours": paper.gpu_hours if paper else None, "paper_steps": paper.steps if paper else None},
        "files": ["report.md", "report.json", "phases.png", "memory.png", "metrics.jsonl"],
    }
    if free:
        report["free_step_s"] = {"median": rate_s, "min": min(s["step_s"] for s in free),
                                 "max": max(s["step_s"] for s in free), "per_step": [s["step_s"] for s in free]}
        report["marker_overhead"] = step_s / rate_s
    if traced:
        traced_s = statistics.mean(s["step_s"] for s in traced)
        report["traced_step_s"] = traced_s
        report["profiler_overhead"] = traced_s / step_s
    counted = [s for s in per_step if s["kind"] == "counted" and "kernels" in s]
    if counted:
        ops = counted[0]["kernels"]
        order = [p for p in (*PHASES, *sorted(set(ops) - set(PHASES) - {"other"}), "other") if p in ops]
        is_compiled = compiled(cfg.distill, device)
        report["kernels_per_step"] = {"total": sum(ops.values()), "by_phase": {p: ops[p] for p in order},
                                      "counted_step_s": counted[0]["step_s"], "compiled": is_compiled,
                                      "compile_s": round(compiling.seconds(), 2)}
        flops = next((st["flops"] for st in per_step if st["kind"] == "flops" and "flops" in st), None)
        if flops is not None:
            total = sum(ops.values())
            report["gpu_projection"] = {
                "flops_per_step": flops,
                "per_gpu": [p.as_dict() for p in gpu_model.project(total, flops, is_compiled, cfg.distill.amp)],
                "launch_us_assumed": gpu_model.LAUNCH_US,
                "measured": gpu_model.measured(rate_s, total, flops, device_name(device), cfg.distill.amp)
                if device.type == "cuda" else None,
            }
    # graphs first met in a timed step (a DSA op drawn for the first time, --warmup 0) compile
    # inside it: their seconds are in that step's time
    report["compile_s_in_timed_steps"] = round(sum(s["compile_s"] for s in timed), 2)
    if tracer is not None:
        report["top_kernels"], report["fused_kernels"] = _kernels(tracer, device, trace_steps, shapes)
    return report


def _shapes(cfg: Config, train: DeviceDataset) -> dict[str, int]:
    """The fused ops' problem sizes in a step of this config."""
    dcfg = cfg.distill
    net = _network(cfg, train)
    with torch.no_grad():
        feat_dim = net.features(torch.zeros(1, train.channels, train.resolution, train.resolution)).shape[-1]
    per_prior = max(dcfg.mmd_samples // dcfg.ppc, 1)
    return {"classes": train.num_classes, "mmd_syn": per_prior * dcfg.ppc, "mmd_real": per_prior * dcfg.ppc,
            "feature_dim": int(feat_dim), "params": int(sum(p.numel() for p in net.parameters())),
            "students": dcfg.students_per_step}


def _peak_memory(device: torch.device, timed: list[dict[str, Any]], timer: PhaseTimer) -> dict[str, Any]:
    if device.type == "cuda":
        return {"what": "torch.cuda.max_memory_allocated per timed step", "gib": max(s["peak_mem_gib"] for s in timed),
                "reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30}
    # the timed steps' window: the traced steps after them carry the profiler's own buffers
    lo, hi = timed[0]["edge_s"] - timed[0]["step_s"], timed[-1]["edge_s"]
    samples = [m for t, m in timer.memory if lo <= t <= hi] or [m for _, m in timer.memory]
    return {"what": "resident set (RSS) every 20 ms and at phase edges, timed steps; process peak from getrusage",
            "gib": max(samples) / 1024, "process_peak_gib": peak_memory_gib(torch.device("cpu"))}


def _kernels(
    tracer: torch.profiler.profile, device: torch.device, trace_steps: int, shapes: dict[str, int]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    events = tracer.key_averages()
    cuda = device.type == "cuda"

    def self_us(e: Any) -> float:
        return float(e.self_device_time_total if cuda else e.self_cpu_time_total)

    # the phase ranges themselves are not kernels (their self time is Python between ops)
    rows = sorted((e for e in events if self_us(e) > 0 and e.key not in PHASES), key=self_us, reverse=True)
    total = sum(self_us(e) for e in rows) or 1.0
    top = [{"name": e.key, "calls": int(e.count) // max(trace_steps, 1),
            "ms_per_step": self_us(e) / 1e3 / max(trace_steps, 1), "fraction": self_us(e) / total}
           for e in rows[:15]]

    peak = device_peaks(device)
    C, n, m, D = shapes["classes"], shapes["mmd_syn"], shapes["mmd_real"], shapes["feature_dim"]
    K, P = shapes["students"], shapes["params"]
    fused = []
    for op, names in FUSED.items():
        name = names[0] if cuda else names[1]
        # Triton may suffix a kernel's name with its specialisation; sum every variant
        hits = [e for e in events if e.key == name or (cuda and e.key.startswith(name))]
        if not hits:
            continue
        calls = sum(int(e.count) for e in hits)
        total_us = sum(float(e.self_device_time_total if cuda else e.cpu_time_total) for e in hits)
        us = total_us / max(calls, 1)
        row: dict[str, Any] = {"op": op, "kernel": name, "calls_per_step": calls // max(trace_steps, 1),
                               "us_per_call": us}
        if op == "mmd2":
            # loss and input gradient in one launch: two [n+m, n+m, D] contractions per class
            flops = 4.0 * C * (n + m) ** 2 * D
            row["tflops"] = flops / (us * 1e-6) / 1e12
            row["peak_fraction"] = row["tflops"] / peak[0] if peak else None
        else:
            # fp32 reads of student, target and start ([K, P] each), or two reads and a write
            nbytes = 3.0 * K * P * 4
            row["tb_per_s"] = nbytes / (us * 1e-6) / 1e12
            row["peak_fraction"] = row["tb_per_s"] / peak[1] if peak else None
        fused.append(row)
    return top, fused


def markdown(r: dict[str, Any]) -> str:
    ms = 1e3
    lines = [
        f"# d3fast profile: {r['dataset']} ({r['preset'] or 'no preset'})",
        "",
        f"- device: {r['device']}; torch {r['versions']['torch']}, d3fast {r['versions']['d3fast']}, "
        f"commit {(r['versions']['git_commit'] or 'unknown')[:10]}; {r['created']}",
        f"- inputs: data {r['inputs']['data']}; experts {r['inputs']['experts']}",
        "- config: " + ", ".join(f"{k}={v}" for k, v in r["config"].items()),
        f"- steps: {r['steps']['warmup']} warm-up, {r['steps'].get('free', 0)} free-running (no markers), "
        f"{r['steps']['timed']} timed (phase markers), {r['steps'].get('counted', 0)} counted (kernels), "
        f"{r['steps'].get('flops', 0)} eager with a FLOP counter, "
        f"{r['steps']['traced']} traced (torch.profiler)",
        "",
        "## Throughput",
        "",
    ]
    if "free_step_s" in r:
        f = r["free_step_s"]
        lines.append(f"- step as distill runs it: {f['median'] * ms:.1f} ms, median of the free-running steps "
                     f"(min {f['min'] * ms:.1f}, max {f['max'] * ms:.1f}); {r['steps_per_s']:.3f} steps/s")
    lines += [
        f"- step with phase markers: {r['step_s']['mean'] * ms:.1f} ms mean (median {r['step_s']['median'] * ms:.1f}, "
        f"min {r['step_s']['min'] * ms:.1f}, max {r['step_s']['max'] * ms:.1f})"
        + (f", {r['marker_overhead']:.2f}x the free-running step (their syncs)" if "marker_overhead" in r
           else f"; {r['steps_per_s']:.3f} steps/s"),
        f"- images through the networks: {r['images_per_s']:.1f} /s (decoded samples of the MTT and MMD updates)",
        f"- peak memory: {r['peak_memory']['gib']:.2f} GiB ({r['peak_memory']['what']})",
    ]
    p = r["projection"]
    line = f"- projected: {p['device_hours']:.2f} {p['unit']} for {p['steps']} steps at this rate"
    if p.get("subtasks", 1) > 1:
        line += f" per subtask, {p['all_subtasks_device_hours']:.2f} {p['unit']} for all {p['subtasks']} subtasks"
    if p["paper_gpu_hours"] is not None:
        line += f"; paper: {p['paper_gpu_hours']:g} GPU-h for {p['paper_steps']} steps"
    lines.append(line)
    if "profiler_overhead" in r:
        lines.append(f"- traced steps: {r['traced_step_s'] * ms:.1f} ms ({r['profiler_overhead']:.2f}x the timed steps: "
                     "profiler overhead)")
    lines += [
        "",
        "## Time per phase (timed steps, exclusive: nested phases are subtracted from their parent)",
        "",
        "| phase | ms / step | share |",
        "|---|---:|---:|",
    ]
    for name, sec in r["phases_s"].items():
        lines.append(f"| {name} | {sec * ms:.1f} | {r['phases_fraction'][name]:.1%} |")
    lines += [f"| **step (measured)** | **{r['step_s']['mean'] * ms:.1f}** | phases cover {r['phase_coverage']:.1%} |", ""]
    if r.get("compile_s_in_timed_steps", 0) > 1:
        lines.append(f"note: {r['compile_s_in_timed_steps']:.1f} s of the timed steps were torch.compile at work "
                     "(graphs first met there): the times above include it; more --warmup steps leave it out.")
        lines.append("")
    lines.append("decode: decoder forward wherever it runs (unroll, its recomputation in backward, MMD); "
                 "unroll backward: the adjoint recomputation and HVPs; mmd: features, loss and backward of the MMD update.")
    if r.get("kernels_per_step"):
        o = r["kernels_per_step"]
        how = "compiled: distill.compile" if o.get("compiled") else "eager"
        lines += ["", f"## Kernels per step ({how}; the counted step)", "",
                  f"{o['total']:,} kernels, from a profiler record: "
                  + ("every kernel the GPU ran. " if r["device_kind"] == "cuda" else
                     "Inductor's generated kernels plus every aten op that runs a kernel and calls no other "
                     "(views, allocations and metadata left out): about one GPU launch each. ")
                  + "Booked to the innermost open phase."
                  + (f" Compiling took {o['compile_s']:.1f} s of this process (once per graph: in the step "
                     "that first meets it; each DSA op compiles when first drawn)."
                     if o.get("compiled") else ""), "",
                  "| phase | kernels / step | share |", "|---|---:|---:|"]
        for name, n in o["by_phase"].items():
            lines.append(f"| {name} | {n:,} | {n / max(o['total'], 1):.1%} |")
    if r.get("gpu_projection"):
        lines += _projection_lines(r["gpu_projection"])
    if r.get("top_kernels"):
        which = "self CUDA time" if r["device_kind"] == "cuda" else "self CPU time"
        lines += ["", f"## Top kernels / ops ({which}, traced steps)", "", "| name | calls / step | ms / step | share |",
                  "|---|---:|---:|---:|"]
        for k in r["top_kernels"]:
            lines.append(f"| `{k['name'][:80]}` | {k['calls']} | {k['ms_per_step']:.2f} | {k['fraction']:.1%} |")
    if r.get("fused_kernels"):
        lines += ["", "## Fused kernels", "", "| op | kernel | calls / step | us / call | achieved | of peak |",
                  "|---|---|---:|---:|---:|---:|"]
        for f in r["fused_kernels"]:
            rate = f"{f['tflops']:.3f} TFLOP/s" if "tflops" in f else f"{f['tb_per_s'] * 1e3:.1f} GB/s"
            frac = f"{f['peak_fraction']:.1%}" if f.get("peak_fraction") is not None else "n/a"
            lines.append(f"| {f['op']} | `{f['kernel']}` | {f['calls_per_step']} | {f['us_per_call']:.0f} | {rate} | {frac} |")
        if r["device_kind"] != "cuda":
            lines.append("\nPeak fractions are given for known GPUs (fp32 FLOP/s, memory bandwidth); none for CPUs.")
    lines += ["", "Files: " + ", ".join(r["files"]), ""]
    return "\n".join(lines)


def _projection_lines(g: dict[str, Any]) -> list[str]:
    us = g["launch_us_assumed"]
    rows = g["per_gpu"]
    mode = rows[0]["mode"]
    lines = ["", "## GPU projection (a floor, from the counted kernels and FLOPs; d3fast/gpu_model.py)", "",
             f"{rows[0]['kernels']:,} kernels ({mode}) and {g['flops_per_step'] / 1e12:.3f} TFLOP (convolutions and "
             f"matrix products, {rows[0]['precision'].upper()}) per step. Launch floor: the kernels x an assumed "
             f"{us[mode]:g} us each as profiled ({mode}), {us['cuda graphs']:g} us replayed in CUDA graphs; compute "
             "floor: the FLOPs at the dense tensor-core peak. A step takes at least the larger.", "",
             f"| GPU | launch floor ({mode}) | in CUDA graphs | compute floor | step floor | target |",
             "|---|---:|---:|---:|---:|---:|"]
    for p in rows:
        lines.append(f"| {p['gpu']} | {p['launch_floor_ms'][mode]:.1f} ms | {p['launch_floor_ms']['cuda graphs']:.1f} ms "
                     f"| {p['compute_floor_ms']:.1f} ms | **{p['floor_ms']:.1f} ms** (bound by {p['bound']}) "
                     f"| {p['target_ms']:.0f} ms |")
    m = g.get("measured")
    if m:
        per_kernel = f"{m['us_per_kernel']:.2f} us per kernel beyond the compute floor" if m["us_per_kernel"] else ""
        lines += ["", f"Measured here: {m['step_ms']:.1f} ms per step against the {m['target_ms']:.0f} ms target "
                  f"({'met' if m['meets_target'] else 'missed'}); {per_kernel}."]
    return lines


def _plots(report: dict[str, Any], timer: PhaseTimer, per_step: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("tab10")
    colors = {name: cmap(i) for i, name in enumerate((*PHASES, "other"))}
    names = list(report["phases_s"])
    vals = [report["phases_s"][n] * 1e3 for n in names]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(names) + 1.2))
    ax.barh(names[::-1], vals[::-1], color=[colors.get(n, "grey") for n in names[::-1]])
    for y, (n, v) in enumerate(zip(names[::-1], vals[::-1], strict=True)):
        ax.text(v, y, f" {v:.1f} ms ({report['phases_fraction'][n]:.0%})", va="center", fontsize=8)
    ax.set_xlabel("ms per step (exclusive)")
    ax.set_title(f"{report['dataset']} on {report['device'][:48]}: step {report['step_s']['mean'] * 1e3:.0f} ms")
    ax.set_xlim(0, max(max(vals), 1e-9) * 1.35)
    fig.tight_layout()
    with atomic_path(out / "phases.png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)

    timed = [i for i, s in enumerate(per_step) if s["kind"] == "timed"]
    t_lo = per_step[timed[0] - 1]["edge_s"] if timed[0] > 0 else 0.0
    t_hi = per_step[timed[-1]]["edge_s"]
    mem = [(t, m) for t, m in timer.memory if t_lo <= t <= t_hi]
    fig, ax = plt.subplots(figsize=(10, 3.6))
    if mem:
        ax.step([t - t_lo for t, _ in mem], [m for _, m in mem], where="post", color="black", lw=1)
    seen = set()
    for sp in timer.spans:
        if sp.depth == 0 and t_lo <= sp.start <= t_hi:
            label = sp.name if sp.name not in seen else None
            seen.add(sp.name)
            ax.axvspan(sp.start - t_lo, sp.end - t_lo, color=colors.get(sp.name, "grey"), alpha=0.25, lw=0, label=label)
    for i in timed[:-1]:
        ax.axvline(per_step[i]["edge_s"] - t_lo, color="grey", ls="--", lw=0.8)
    unit = "allocated MiB" if report["device_kind"] == "cuda" else "resident MiB"
    ax.set_xlabel("seconds (timed steps; dashed: step boundaries; memory read every 20 ms)")
    ax.set_ylabel(unit)
    ax.set_title("memory over the step")
    if seen:
        ax.legend(fontsize=7, ncol=4, loc="upper left", bbox_to_anchor=(0, -0.22), frameon=False)
    fig.tight_layout()
    with atomic_path(out / "memory.png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def summary_line(r: dict[str, Any]) -> str:
    p = r["projection"]
    text = (f"{r['dataset']}: {r.get('rate_step_s', r['step_s']['mean']) * 1e3:.0f} ms/step, {r['images_per_s']:.0f} images/s, "
            f"peak {r['peak_memory']['gib']:.2f} GiB; {p['device_hours']:.2f} {p['unit']} for {p['steps']} steps")
    if p.get("subtasks", 1) > 1:
        text += f" per subtask ({p['all_subtasks_device_hours']:.2f} {p['unit']} for all {p['subtasks']})"
    if p["paper_gpu_hours"] is not None:
        text += f" (paper {p['paper_gpu_hours']:g} GPU-h)"
    if not math.isfinite(r["phase_coverage"]):
        return text
    return text + f"; phases cover {r['phase_coverage']:.0%} of the step"


__all__ = ["PHASES", "ProfileResult", "markdown", "profile", "summary_line"]


def command(cfg: Config, out: str | None, steps: int, trace_steps: int, warmup: int, stand_in: str,
            free_steps: int | None) -> ProfileResult:
    """`d3fast profile`: `profile` into `out` (default profiles/<dataset>-<time>), its
    summary printed. A split's subtasks are alike in size: subtask 0 stands for all (the
    projection counts S).

    Raises:
        D3FastError: what `profile` raises."""
    if cfg.data.subtasks > 1 and cfg.data.subtask < 0:
        cfg.data.subtask = 0
    out_dir = Path(out) if out else Path("profiles") / f"{cfg.data.dataset}-{file_stamp()}"
    res = profile(cfg, out_dir, steps=steps, trace_steps=trace_steps, warmup=warmup, stand_in=stand_in,
                  free_steps=free_steps)
    click.echo(summary_line(res.report))
    click.echo(f"inputs: data {res.report['inputs']['data']}; experts {res.report['inputs']['experts']}")
    click.echo(f"report: {out_dir / 'report.md'} (+ {', '.join(f for f in res.report['files'] if f != 'report.md')})")
    return res
