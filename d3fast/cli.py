"""The `d3fast` command line.

    d3fast prepare --dataset NAME [--data-path PATH]   decode once into the uint8 cache
    d3fast experts --dataset NAME [--num-experts N]    train expert trajectories
    d3fast config  --dataset NAME [--set k=v]          print the resolved configuration
    d3fast distill --dataset NAME [--amp]              learn the distilled distribution
    d3fast evaluate RUN_DIR                            students on it vs real baselines
    d3fast budget  [--dataset NAME] [--json]           device-hours spent vs the paper's budget
    d3fast profile --dataset NAME [--steps N]          where a distill step's time and memory go
    d3fast doctor                                      versions, devices, active backends

Every command takes --preset and repeated --set section.key=value overrides
(defaults < preset < overrides). Errors in the input print one line and exit with 2;
Ctrl-C exits with 130 after saving what was finished.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import click

from d3fast.errors import D3FastError


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except D3FastError as e:
            click.secho(f"error: {e}", fg="red", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.secho("interrupted: finished work is saved; re-run the same command to continue", err=True)
            sys.exit(130)


def _config_options(f: Any) -> Any:
    f = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                     help="Override a config key, e.g. --set experts.lr=0.02 (repeatable).")(f)
    f = click.option("--preset", default=None, help="Preset name (default: the dataset's own).")(f)
    f = click.option("--dataset", default=None, help="Dataset name, e.g. digits, fashion-mnist, imagewoof.")(f)
    return f


def _resolve(dataset: str | None, preset: str | None, overrides: tuple[str, ...], **typed: Any):
    from d3fast.config import resolve_config

    nested: dict[str, Any] = {}
    for dotted, value in typed.items():
        if value is None:
            continue
        section, key = dotted.split(".")
        nested.setdefault(section, {})[key] = value
    return resolve_config(dataset, preset, overrides, typed_overrides=nested)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="d3fast")
def cli() -> None:
    """d3fast: Distributional Dataset Distillation, fast.

    Learn a tiny distilled dataset (per class a few latent Gaussians plus one shared
    decoder) from a large image dataset. Data and experts live under $D3FAST_HOME
    (default ~/.d3fast). Run `d3fast doctor` to see what this machine will use.
    """


@cli.command()
@_config_options
@click.option("--data-path", type=click.Path(), default=None, help="Where the dataset's files are.")
@click.option("--skip-corrupt", is_flag=True, default=None, help="Leave out unreadable images instead of failing.")
@click.option("--workers", type=int, default=None, help="Decode processes (default: one per core).")
@click.option("--force", is_flag=True, help="Re-decode even if the cache is up to date.")
@click.option("--format", "fmt", type=click.Choice(["cache", "ffcv"]), default="cache", show_default=True,
              help="ffcv: also write FFCV .beton files (RGB datasets) for streaming experts and evaluation.")
@click.option("--ffcv-mode", type=click.Choice(["raw", "jpg"]), default="raw", show_default=True,
              help="How the .beton stores images: raw pixels (exact) or JPEG (smaller, lossy).")
@click.option("--jpeg-quality", type=int, default=90, show_default=True, help="JPEG quality for --ffcv-mode jpg.")
def prepare(dataset, preset, overrides, data_path, skip_corrupt, workers, force, fmt, ffcv_mode, jpeg_quality) -> None:
    """Decode a dataset once into a memory-mappable uint8 cache with a manifest.

    Reuses the cache when the source files are unchanged. Layouts: fashion-mnist (IDX
    files; found automatically where Debian's dataset-fashion-mnist puts them), digits
    (scikit-learn, embedded), cifar10 (cifar-10-batches-py or -bin), tinyimagenet
    (tiny-imagenet-200), imagenette/imagewoof (ImageNet-1k tree or fast.ai
    imagenette2/imagewoof2: train/<wnid>/, val/<wnid>/). `--format ffcv` then writes
    train/test .beton files beside the cache from the same decoded images.
    """
    from d3fast.data.beton import require_ffcv, write_betons
    from d3fast.data.prepare import prepare as run

    cfg = _resolve(dataset, preset, overrides, **{
        "data.data_path": data_path, "data.skip_corrupt": skip_corrupt, "data.workers": workers})
    if fmt == "ffcv":
        require_ffcv(cfg.data.dataset)  # before decoding anything
    _report_prepare(run(cfg, force=force))
    if fmt == "ffcv":
        status, man = write_betons(cfg.data.dataset, ffcv_mode, jpeg_quality, cfg.data.workers, force)
        sizes = ", ".join(f"{s} {man['counts'][s]} images {man['bytes'][s] / 2**20:.1f} MiB" for s in ("train", "test"))
        click.echo(f"{'reused' if status == 'reused' else 'wrote'} FFCV ({man['mode']}) files: {sizes}")


def _report_prepare(res) -> None:
    m = res.manifest
    tr, te = m["splits"]["train"]["count"], m["splits"]["test"]["count"]
    r, c = m["resolution"], m["channels"]
    verb = "reused cache of" if res.status == "reused" else "prepared"
    click.echo(f"{verb} {m['dataset']}: {tr} train / {te} test images, {m['num_classes']} classes, "
               f"{c}x{r}x{r} uint8 -> {res.cache}")
    if res.decoded:
        click.echo(f"decoded {res.decoded} images in {res.seconds:.1f} s ({res.decoded / res.seconds:.0f} img/s)")
    if m["skipped"]:
        click.echo(f"skipped {len(m['skipped'])} unreadable file(s); listed in {res.cache / 'manifest.json'}")


@cli.command()
@_config_options
@click.option("--num-experts", type=int, default=None, help="How many experts (default: preset's).")
@click.option("--epochs", type=int, default=None, help="Epochs per expert (default: preset's).")
@click.option("--seed", type=int, default=None, help="Base seed; expert i uses a seed derived from (seed, i).")
@click.option("--device", default=None, help="auto | cpu | cuda | cuda:N (default: auto).")
@click.option("--no-auto", is_flag=True, help="Fail instead of preparing the dataset when it is missing.")
@click.option("--loader", type=click.Choice(["auto", "cache", "ffcv"]), default=None,
              help="Where training batches stream from (default auto: FFCV files when present, else the cache).")
def experts(dataset, preset, overrides, num_experts, epochs, seed, device, no_auto, loader) -> None:
    """Train expert trajectories (SPEC.md section 4) for MTT.

    Each expert saves its parameters at init and after every epoch, atomically. Re-running
    after an interruption continues the missing experts (and the interrupted one from its
    last epoch); the same seed gives the same trajectories.
    """
    from d3fast.experts import run_experts

    cfg = _resolve(dataset, preset, overrides, **{
        "experts.num_experts": num_experts, "experts.epochs": epochs, "experts.seed": seed, "data.loader": loader})
    if device is not None:
        cfg.device = device
    _ensure_prepared(cfg, no_auto)
    res = run_experts(cfg)
    m = res.manifest
    acc = ""
    if m["test_acc_mean"] is not None:
        acc = f"; test accuracy {m['test_acc_mean']:.1%} ± {m['test_acc_std']:.1%} (n={m['num_complete']})"
    click.echo(f"{m['num_complete']}/{cfg.experts.num_experts} experts complete in {res.out_dir}{acc}")
    if res.trained_epochs:
        click.echo(f"this run: {res.trained_epochs} epochs in {res.seconds:.1f} s, "
                   f"{res.images_per_s:.0f} train img/s on {m['device']}")


def _ensure_prepared(cfg, no_auto: bool) -> None:
    """Prepare the dataset when it has no cache yet (unless --no-auto)."""
    from d3fast.data.cache import read_manifest
    from d3fast.data.prepare import prepare as run_prepare
    from d3fast.paths import data_dir

    ds = cfg.data.dataset
    if read_manifest(data_dir(ds)) is None:
        if no_auto:
            raise D3FastError(f"dataset {ds!r} is not prepared; run `d3fast prepare --dataset {ds}`")
        click.echo(f"{ds} is not prepared yet: preparing it first")
        _report_prepare(run_prepare(cfg))


def _ensure_inputs(cfg, no_auto: bool) -> None:
    """Prepare the dataset and train the experts when missing (unless --no-auto)."""
    from d3fast.experts import experts_dir, run_experts

    ds = cfg.data.dataset
    _ensure_prepared(cfg, no_auto)
    need = cfg.distill.max_start_epoch + cfg.distill.expert_epochs
    if cfg.experts.epochs < need:
        raise D3FastError(
            f"experts.epochs={cfg.experts.epochs} < distill.max_start_epoch + expert_epochs = {need}"
        )
    manifest = experts_dir(cfg) / "manifest.json"
    done = 0
    if manifest.exists():
        done = sum(r["complete"] and r["epochs"] >= need for r in json.loads(manifest.read_text())["experts"])
    if done < cfg.experts.num_experts:
        if no_auto:
            raise D3FastError(f"{done}/{cfg.experts.num_experts} experts are ready; run `d3fast experts --dataset {ds}`")
        click.echo(f"{done}/{cfg.experts.num_experts} expert trajectories ready: training the rest first")
        run_experts(cfg)


def _resolve_run(run_dir: str, runs_dir: str = "runs"):
    from pathlib import Path

    if run_dir == "latest":
        runs = sorted(Path(runs_dir).glob("*/*/checkpoint.pt"), key=lambda p: p.stat().st_mtime)
        if not runs:
            raise D3FastError(f"no runs with a checkpoint under {runs_dir}/")
        return runs[-1].parent
    path = Path(run_dir)
    if not (path / "config.json").exists():
        raise D3FastError(f"{path} is not a run directory (no config.json)")
    return path


@cli.command()
@_config_options
@click.option("--ppc", type=int, default=None, help="Latent priors per class.")
@click.option("--steps", type=int, default=None, help="Distillation steps (with --resume: the new total).")
@click.option("--amp", is_flag=True, default=None, help="bf16 autocast on CUDA (decoder, unroll, MMD); a no-op on CPU.")
@click.option("--unroll", type=click.Choice(["flat", "naive"]), default=None,
              help="MTT unroll: flat (exact, memory flat in syn_steps; default) or naive (graph through every step).")
@click.option("--students-per-step", type=int, default=None, help="Students (expert trajectories) per MTT update.")
@click.option("--mmd-chunk", type=int, default=None,
              help="Samples per feature-network graph in the MMD update (exact two-pass gradient); 0: automatic.")
@click.option("--mmd-exact-graph", is_flag=True, default=None,
              help="MMD update through one graph over every sample (the reference's memory; for checks).")
@click.option("--resume", "resume_dir", default=None, help="Continue the run in this directory.")
@click.option("--runs-dir", default="runs", show_default=True, help="Where run directories are created.")
@click.option("--name", default=None, help="Run name (default: the preset).")
@click.option("--device", default=None, help="auto | cpu | cuda | cuda:N.")
@click.option("--no-auto", is_flag=True, help="Fail instead of preparing data / training experts.")
@click.option("--evaluate", "then_evaluate", is_flag=True, help="Run `d3fast evaluate` on the result.")
def distill(
    dataset, preset, overrides, ppc, steps, amp, unroll, students_per_step, mmd_chunk, mmd_exact_graph, resume_dir,
    runs_dir, name, device, no_auto, then_evaluate,
) -> None:
    """Learn the distilled distribution (Algorithm 1: MTT + MMD + KL + diversity).

    Writes runs/<dataset>/<timestamp>-<name>/: config.json, manifest.json, metrics.jsonl
    (every loss term, lr, step time, images/s, peak memory) and checkpoint.pt (whole state,
    every distill.checkpoint_every steps and on Ctrl-C/SIGTERM). --resume RUN_DIR continues.
    """
    from pathlib import Path

    from d3fast.distill import distill as run_distill
    from d3fast.distill import load_run_config

    if resume_dir:
        run_dir = _resolve_run(resume_dir, runs_dir)
        cfg = load_run_config(run_dir)
        if steps is not None:
            cfg.distill.steps = steps
        if device is not None:
            cfg.device = device
        res = run_distill(cfg, run_dir=run_dir, resume=True)
    else:
        cfg = _resolve(dataset, preset, overrides, **{
            "distill.ppc": ppc, "distill.steps": steps, "distill.amp": amp, "distill.unroll": unroll,
            "distill.students_per_step": students_per_step, "distill.mmd_chunk": mmd_chunk,
            "distill.mmd_exact_graph": mmd_exact_graph})
        if device is not None:
            cfg.device = device
        _ensure_inputs(cfg, no_auto)
        res = run_distill(cfg, runs_dir=Path(runs_dir), name=name)
    last = res.last
    summary = f"; last mtt {last['mtt']:.4f} mmd {last['mmd']:.4f} student lr {last['student_lr']:.4g}" if last else ""
    state = "stopped early at" if res.interrupted else "reached"
    click.echo(f"{state} step {res.step}/{cfg.distill.steps} in {res.seconds:.1f} s{summary}")
    click.echo(f"run directory: {res.run_dir}")
    if res.interrupted:
        click.echo(f"continue with: d3fast distill --resume {res.run_dir}")
        sys.exit(130)
    if then_evaluate:
        _evaluate(res.run_dir, None, None, None, device)


def _evaluate(run_dir, archs, students, epochs, device, loader=None) -> None:
    from d3fast.evaluate import evaluate_run

    over: dict[str, Any] = {}
    if archs:
        over["archs"] = [a.strip() for a in archs.split(",") if a.strip()]
    if students is not None:
        over["students"] = students
    if epochs is not None:
        over["epochs"] = epochs
    updates: dict[str, Any] = {"eval": over} if over else {}
    if loader is not None:
        updates["data"] = {"loader": loader}
    report = evaluate_run(run_dir, updates or None, device=device)
    click.echo((run_dir / "eval.md").read_text())
    click.echo(f"written: {run_dir / 'eval.json'}, {run_dir / 'eval.md'} ({report['seconds']:.0f} s)")


@cli.command()
@click.argument("run_dir")
@click.option("--arch", "archs", default=None, help="Comma-separated: convnet,resnet18,vgg11,alexnet.")
@click.option("--students", type=int, default=None, help="Students per architecture (default 5).")
@click.option("--epochs", type=int, default=None, help="Epochs per student (default: the run's eval.epochs).")
@click.option("--device", default=None, help="auto | cpu | cuda | cuda:N.")
@click.option("--loader", type=click.Choice(["auto", "cache", "ffcv"]), default=None,
              help="Where the real test set streams from (default: the run's data.loader).")
def evaluate(run_dir, archs, students, epochs, device, loader) -> None:
    """Train students on fresh distilled samples and on two random-real baselines (same
    count, same storage); report mean ± std test accuracy. RUN_DIR may be `latest`."""
    _evaluate(_resolve_run(run_dir), archs, students, epochs, device, loader)


@cli.command()
@click.argument("run_dir")
@click.option("--out", required=True, type=click.Path(), help="PNG file to write.")
@click.option("--samples", default=9, show_default=True, help="Samples per prior after its mean image.")
@click.option("--seed", default=0, show_default=True)
def sample(run_dir, out, samples, seed) -> None:
    """Write a grid: per prior, its mean image then fresh samples."""
    from pathlib import Path

    from d3fast.distill import distilled_from_run
    from d3fast.visualize import sample_grid

    d, _, step = distilled_from_run(_resolve_run(run_dir))
    click.echo(f"wrote {sample_grid(d, Path(out), samples, seed)} (step {step}, {len(d.latents)} priors)")


@cli.command()
@click.argument("run_dir")
@click.option("--out", required=True, type=click.Path(), help="safetensors file to write.")
def export(run_dir, out) -> None:
    """Export the distilled object (latents, decoder, learned lr, metadata) as safetensors."""
    from d3fast.distill import distilled_from_run
    from d3fast.distilled import export as run_export

    d, _, step = distilled_from_run(_resolve_run(run_dir))
    run_export(d, out)
    click.echo(f"wrote {out}: {len(d.latents)} priors, {d.storage_bytes() / 2**20:.2f} MiB "
               f"(= {d.images_per_class_equivalent():.1f} uint8 images per class), step {step}")


@cli.command()
@_config_options
def config(dataset, preset, overrides) -> None:
    """Print the resolved configuration as JSON."""
    from d3fast.config import to_dict

    click.echo(json.dumps(to_dict(_resolve(dataset, preset, overrides)), indent=2))


@cli.command()
@click.option("--dataset", default=None, help="Only this dataset.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--records", "show_records", is_flag=True, help="Also list every ledger row.")
def budget(dataset, as_json, show_records) -> None:
    """Device-hours spent per dataset and phase (from the ledger under $D3FAST_HOME),
    against the paper's GPU-hour budget (SPEC.md section 8). CPU time is listed as CPU-h,
    never as GPU time."""
    from d3fast import ledger

    book = ledger.Ledger()
    rows = book.records(dataset=dataset)
    totals = ledger.totals(rows)
    paper = ledger.paper_comparison(totals)
    if as_json:
        out = {"ledger": str(book.path), "records": len(rows), "totals": totals, "paper": paper,
               "paper_budgets": {k: vars(v) for k, v in ledger.PAPER_BUDGETS.items()}}
        if show_records:
            out["rows"] = rows
        click.echo(json.dumps(out, indent=2))
        return
    click.echo(f"ledger: {book.path} ({len(rows)} record{'s' if len(rows) != 1 else ''})")
    if not rows:
        click.echo("nothing recorded yet: prepare, experts, distill, evaluate and profile add rows as they run")
        return
    table = [["dataset", "phase", "device", "runs", "steps", "wall", "device-hours", "energy", "status"]]
    for t in totals:
        energy = f"{t['energy_kwh']:.2f} kWh" if t["energy_kwh"] is not None else "-"
        status = ", ".join(f"{k} {v}" for k, v in sorted(t["status"].items()))
        table.append([t["dataset"], t["phase"], "GPU" if t["device_kind"] == "cuda" else "CPU", str(t["records"]),
                      str(t["steps"]), _hms(t["wall_s"]), f"{_hours(t['device_hours'])} {t['unit']}", energy, status])
    click.echo(_table(table))
    if paper:
        click.echo("\nagainst the paper (distillation to convergence, SPEC.md section 8):")
        for p in paper:
            line = (f"  {p['dataset']}: {p['hours_per_1k_steps']:.3f} {p['unit']} per 1k steps here -> "
                    f"{p['projected_paper_steps']:.2f} {p['unit']} for {p['paper_steps']} steps; "
                    f"paper {p['paper_gpu_hours']:g} GPU-h")
            if p["ratio_to_paper"] is not None:
                line += f" ({p['ratio_to_paper']:.2f}x the paper)"
            else:
                line += " (CPU time: not comparable to GPU-hours)"
            click.echo(line)
    if show_records:
        click.echo("")
        recs = [["id", "started", "phase", "dataset", "device", "steps", "wall", "status"]]
        for r in rows:
            started = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["started"]))
            recs.append([str(r["id"]), started, r["phase"], r["dataset"], r["device_name"], str(r["steps"]),
                         _hms(r["wall_s"]), r["status"]])
        click.echo(_table(recs))


def _hours(h: float) -> str:
    return f"{h:.3f}" if h >= 0.001 or h == 0 else "<0.001"


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


@cli.command()
@_config_options
@click.option("--steps", type=int, default=5, show_default=True, help="Timed steps (after the warm-up).")
@click.option("--trace-steps", type=int, default=2, show_default=True,
              help="Steps after the timed ones run under torch.profiler (trace, kernel tables); 0: none.")
@click.option("--warmup", type=int, default=1, show_default=True, help="Untimed steps first (allocator, autotuning, JIT).")
@click.option("--out", type=click.Path(), default=None, help="Report directory (default: profiles/<dataset>-<time>).")
@click.option("--stand-in", type=click.Choice(["auto", "always", "never"]), default="auto", show_default=True,
              help="Random data / expert trajectories of the right shapes when the real ones are missing.")
@click.option("--amp", is_flag=True, default=None, help="bf16 autocast on CUDA, as in distill.")
@click.option("--unroll", type=click.Choice(["flat", "naive"]), default=None, help="MTT unroll mode, as in distill.")
@click.option("--device", default=None, help="auto | cpu | cuda | cuda:N.")
def profile(dataset, preset, overrides, steps, trace_steps, warmup, out, stand_in, amp, unroll, device) -> None:
    """Where a distillation step's time and memory go: runs warm-up + timed + traced steps of
    the real loop and writes report.md, report.json, trace.json (Chrome trace), phases.png
    and memory.png. Needs no experts: stand-ins of the right shapes are used when missing."""
    from pathlib import Path

    from d3fast.profile import profile as run_profile
    from d3fast.profile import summary_line

    cfg = _resolve(dataset, preset, overrides, **{"distill.amp": amp, "distill.unroll": unroll})
    if device is not None:
        cfg.device = device
    out_dir = Path(out) if out else Path("profiles") / f"{cfg.data.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
    res = run_profile(cfg, out_dir, steps=steps, trace_steps=trace_steps, warmup=warmup, stand_in=stand_in)
    click.echo(summary_line(res.report))
    click.echo(f"inputs: data {res.report['inputs']['data']}; experts {res.report['inputs']['experts']}")
    click.echo(f"report: {out_dir / 'report.md'} (+ {', '.join(f for f in res.report['files'] if f != 'report.md')})")


@cli.command()
def doctor() -> None:
    """Versions, devices, and which kernel backends and loaders are active, and why."""
    from d3fast.doctor import report

    rows = report()
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        click.echo(f"{k:<{width}}  {v}")


def main() -> None:
    cli(prog_name="d3fast")


if __name__ == "__main__":
    main()
