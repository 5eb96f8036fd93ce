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

import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import click

from d3fast.errors import D3FastError


class _Group(click.Group):
    """Expected failures (D3FastError) print one `error:` line and exit 2; anything else
    prints one line naming the file that holds its traceback and exits 1."""

    # the commands that know how to run under torchrun; the others would run W full copies
    # (each rank writing the same files and booking the same hours)
    DISTRIBUTED = ("distill", "experts", "doctor", "config", "budget")

    def resolve_command(self, ctx: click.Context, args: list[str]) -> Any:
        name, cmd, rest = super().resolve_command(ctx, args)
        if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 and name not in self.DISTRIBUTED:
            raise D3FastError(f"`d3fast {name}` runs in one process: launch it without torchrun "
                              "(distill and experts are the commands that use several)")
        return name, cmd, rest

    def main(self, *args: Any, **kwargs: Any) -> Any:
        quiet = os.environ.get("D3FAST_QUIET")
        try:
            return super().main(*args, **kwargs)
        finally:  # --quiet holds for this command only, also when it runs inside a Python process
            if quiet is None:  # (click's test runner, the Python API)
                os.environ.pop("D3FAST_QUIET", None)
            else:
                os.environ["D3FAST_QUIET"] = quiet

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except D3FastError as e:
            if os.environ.get("D3FAST_API") == "1":  # called from d3fast.distill(...): the caller gets it
                raise
            click.secho(f"error: {_rank_prefix()}{e}", fg="red", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            if ctx.invoked_subcommand in ("prepare", "experts", "distill", "merge", "label"):
                click.secho("interrupted: finished work is saved; re-run the same command to continue", err=True)
            else:
                click.secho("interrupted: nothing of this command was written (earlier results are as they were)",
                            err=True)
            sys.exit(130)
        except BrokenPipeError:  # `d3fast config | head`: the reader left; nothing to report
            # stdout is pointed at /dev/null so that Python's exit-time flush cannot fail again
            # (the recipe of the Python docs, "Note on SIGPIPE")
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(141)
        except (click.exceptions.Exit, click.ClickException, SystemExit):
            raise
        except Exception as e:
            if os.environ.get("D3FAST_DEBUG", "0") == "1":
                raise
            from d3fast.dist import collective_failure

            dist_failed = collective_failure(e)
            if dist_failed:  # another rank died, hung past D3FAST_DIST_TIMEOUT, or left
                click.secho(f"error: {_rank_prefix()}{dist_failed}", fg="red", err=True)
                if os.environ.get("D3FAST_API") != "1":  # the program, not a caller's process:
                    # the group cannot be destroyed (that may wait on the dead peer), and interpreter
                    # teardown with gloo's threads alive can abort (d3fast/dist.py, World.from_env),
                    # which would turn this exit 2 into a SIGABRT; files are closed by now
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(2)
                sys.exit(2)
            from d3fast.io import write_failure

            failure = write_failure(getattr(e, "filename", None) or ".", e)
            if failure is not None:
                click.secho(f"error: {failure}", fg="red", err=True)
                sys.exit(2)
            click.secho(f"error: unexpected {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                        f" (a bug in d3fast; the traceback is in {_crash_report(e)})", fg="red", err=True)
            sys.exit(1)


def _rank_prefix() -> str:
    """"rank R: " in a process of a torchrun job (each rank prints its own errors)."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        return f"rank {os.environ.get('RANK', '?')}: "
    return ""


def _crash_report(e: BaseException) -> str:
    """Write the traceback of `e` under <home>/logs/; returns the file's path."""
    import traceback

    from d3fast.io import atomic_write_text
    from d3fast.paths import home

    path = home() / "logs" / f"crash-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.txt"
    text = f"d3fast {' '.join(sys.argv[1:])}\n\n" + "".join(traceback.format_exception(e))
    try:
        atomic_write_text(path, text)
    except Exception:  # nowhere to write: the traceback goes to stderr instead
        sys.stderr.write(text)
        return "the output above"
    return str(path)


def _remember_resolution(ctx: click.Context, param: click.Parameter, value: int | None) -> None:
    if value is not None and value <= 0:
        raise D3FastError(f"--resolution {value}: give the image size, a power of two in 8..512")
    if value is not None:  # read by _resolve as data.resolution
        ctx.meta["d3fast.resolution"] = value


def _config_options(f: Any) -> Any:
    f = click.option("--resolution", type=int, default=None, expose_value=False, callback=_remember_resolution,
                     help="Image size of an imagefolder dataset (data.resolution; a power of two, 8..512).")(f)
    f = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                     help="Override a config key, e.g. --set experts.lr=0.02 (repeatable).")(f)
    f = click.option("--preset", "--config", "preset", default=None,
                     help="Preset name (default: the dataset's own; `d3fast presets` lists them), or a TOML file "
                          "of your own in the same form (`d3fast config --format toml` writes one).")(f)
    f = click.option("--dataset", default=None, help="Dataset name, e.g. digits, fashion-mnist, imagewoof.")(f)
    return f


def _runs_dir_option(what: str) -> Any:
    """--runs-dir, resolved when the command starts: the option, else $D3FAST_RUNS, else
    <home>/runs (so `latest` finds the runs from any working directory)."""
    def resolve(ctx: click.Context, param: click.Parameter, value: str | None) -> str:
        from d3fast.paths import runs_root

        return value if value else str(runs_root())

    return click.option("--runs-dir", default=None, callback=resolve,
                        help=f"{what} (default: $D3FAST_RUNS, else $D3FAST_HOME/runs).")


def _quiet(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    if value:  # read by d3fast/progress.py, in this process and the ones it starts
        os.environ["D3FAST_QUIET"] = "1"
    return value


def _quiet_option(f: Any) -> Any:
    return click.option("--quiet", "-q", is_flag=True, expose_value=False, callback=_quiet, is_eager=True,
                        help="No progress bar (results, notes and warnings are still printed).")(f)


def _subtask_options(f: Any) -> Any:
    f = click.option("--subtask", type=int, default=None,
                     help="Work on block i (0..S-1) of the --subtasks split only (default: every block).")(f)
    f = click.option("--subtasks", type=int, default=None,
                     help="Split the classes into S contiguous blocks, distilled independently and merged "
                          "(ImageNet-1K: 5 x 200 or 2 x 500).")(f)
    return f


def _budget_options(f: Any) -> Any:
    f = click.option("--budget-images", type=click.Choice(["float32", "uint8"]), default="float32", show_default=True,
                     help="What one image of --budget-ipc is: float32 values (the paper's accounting, as synthetic "
                          "images are stored) or uint8 pixels (d3fast's reports).")(f)
    f = click.option("--budget-ipc", type=float, default=None,
                     help="Storage budget in images per class: chooses the decoder size/width and priors per class "
                          "that fit it (soft labels and subtasks included; float32 storage).")(f)
    return f


def _resolve(dataset: str | None, preset: str | None, overrides: tuple[str, ...], base: Any = None, **typed: Any):
    """The config of a command: defaults < preset < typed flags < --set, or, for a resumed
    run, its recorded config (`base`) < typed flags < --set (d3fast/config.py)."""
    from d3fast.config import resolve_config

    ctx = click.get_current_context(silent=True)
    if ctx is not None and "d3fast.resolution" in ctx.meta:
        typed.setdefault("data.resolution", ctx.meta["d3fast.resolution"])
    nested: dict[str, Any] = {}
    for dotted, value in typed.items():
        if value is None:
            continue
        *section, key = dotted.split(".")
        (nested.setdefault(section[0], {}) if section else nested)[key] = value
    return resolve_config(dataset, preset, overrides, typed_overrides=nested, base=base)


def _open_run(where: str, runs_dir: str):
    from d3fast.run import Run

    return Run.open(where, runs_dir)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="d3fast")
@_quiet_option
def cli() -> None:
    """d3fast: Distributional Dataset Distillation, fast.

    Learn a tiny distilled dataset (per class a few latent Gaussians plus one shared
    decoder) from a large image dataset. Data, experts and runs live under $D3FAST_HOME
    (default ~/.d3fast). Run `d3fast doctor` to see what this machine will use. Off a
    terminal, progress is one plain line every $D3FAST_PROGRESS_EVERY seconds (60).
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
    (scikit-learn, embedded), cifar10 (cifar-10-batches-py or -bin), cifar100
    (cifar-100-python or -binary), tinyimagenet
    (tiny-imagenet-200), imagenette/imagewoof (ImageNet-1k tree or fast.ai
    imagenette2/imagewoof2: train/<wnid>/, val/<wnid>/), imagenet64 (Imagenet64_train_npz/
    and Imagenet64_val_npz/, or the pickled Imagenet64_train/ and _val/). `--format ffcv`
    then writes train/test .beton files beside the cache from the same decoded images.
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
@_subtask_options
@click.option("--data-path", type=click.Path(), default=None, help="Where the dataset's files are (for preparing it).")
@_quiet_option
def experts(dataset, preset, overrides, num_experts, epochs, seed, device, no_auto, loader, subtasks, subtask,
            data_path) -> None:
    """Train expert trajectories (docs/algorithm.md section 4) for MTT.

    Each expert saves its parameters at init and after every epoch, atomically. Re-running
    after an interruption continues the missing experts (and the interrupted one from its
    last epoch); the same seed gives the same trajectories. With --subtasks S, each
    subtask's experts see its classes only (one directory per subtask; all of them, one
    after another, unless --subtask picks one).
    """
    from d3fast.dist import World
    from d3fast.experts import run_experts

    # under torchrun each rank trains its share (experts rank, rank + W, ...) on its own GPU;
    # the per-expert locks make the ranks finish together: no process group, no collective
    world = World.from_env(device or "auto", join=False)
    if world.distributed:
        device = world.device(device or "auto")
    cfg = _resolve(dataset, preset, overrides, **{
        "experts.num_experts": num_experts, "experts.epochs": epochs, "experts.seed": seed, "data.loader": loader,
        "device": device, "data.subtasks": subtasks, "data.subtask": subtask, "data.data_path": data_path})
    if cfg.distill.dtype != "float32" and world.main:
        click.echo(f"note: expert trajectories train and are stored in float32; distill.dtype={cfg.distill.dtype} "
                   "applies to `d3fast distill`, which reads them cast up")
    _ensure_prepared(cfg, no_auto)
    for one in _each_subtask(cfg, click.echo if world.main else lambda *a, **k: None):
        if one.data.subtasks > 1 and world.main:
            click.echo(f"subtask {one.data.subtask} of {one.data.subtasks}:")
        res = run_experts(one, progress=world.main, shard=(world.rank, world.size))
        if world.main:
            _report_experts(one, res)


def _each_subtask(cfg, echo=click.echo) -> list:
    """`cfg` itself, or with data.subtasks > 1 and no data.subtask, one copy per subtask.
    Blocks of unequal size are stated (S does not divide the classes)."""
    import copy

    from d3fast.data.datasets import class_blocks, get_spec

    if cfg.data.subtasks > 1:
        blocks = class_blocks(get_spec(cfg.data.dataset).num_classes, cfg.data.subtasks)
        sizes = [b - a for a, b in blocks]
        if len(set(sizes)) > 1:
            echo(f"note: {sum(sizes)} classes do not split evenly into {len(sizes)} subtasks: blocks of "
                 f"{', '.join(map(str, sizes))} classes")
    if cfg.data.subtasks == 1 or cfg.data.subtask >= 0:
        return [cfg]
    out = []
    for i in range(cfg.data.subtasks):
        one = copy.deepcopy(cfg)
        one.data.subtask = i
        out.append(one)
    return out


def _report_experts(cfg, res) -> None:
    m = res.manifest
    acc = ""
    if m["test_acc_mean"] is not None:
        acc = f"; test accuracy {m['test_acc_mean']:.1%} ± {m['test_acc_std']:.1%} (n={m['num_complete']})"
    asked = cfg.experts.num_experts
    done = sum(r["complete"] for r in m["experts"] if r["index"] < asked)
    extra = f" (+{m['num_complete'] - done} more from earlier runs)" if m["num_complete"] > done else ""
    click.echo(f"{done}/{asked} experts complete in {res.out_dir}{extra}{acc}")
    if res.trained_epochs:
        click.echo(f"this run: {res.trained_epochs} epochs in {res.seconds:.1f} s, "
                   f"{res.images_per_s:.0f} train img/s on {m['device']}")


def _ensure_prepared(cfg, no_auto: bool) -> None:
    """Prepare the dataset when it has no cache yet (unless --no-auto)."""
    from d3fast.data.cache import read_manifest
    from d3fast.data.prepare import prepare as run_prepare
    from d3fast.data.prepare import prepare_command
    from d3fast.paths import data_dir

    ds = cfg.data.dataset
    if cfg.data.data_path is not None and read_manifest(data_dir(ds)) is not None:
        # a path given now: the cache must be of it (prepare reuses it when the files are the same)
        _report_prepare(run_prepare(cfg))
        return
    if read_manifest(data_dir(ds)) is None:
        if no_auto:
            raise D3FastError(f"dataset {ds!r} is not prepared; run:\n  {prepare_command(cfg)}")
        click.echo(f"{ds} is not prepared yet: preparing it first")
        _report_prepare(run_prepare(cfg))


@cli.command()
@_config_options
@click.option("--ppc", type=int, default=None, help="Latent priors per class.")
@click.option("--steps", type=int, default=None, help="Distillation steps (with --resume: the new total).")
@click.option("--amp", is_flag=True, default=None, help="bf16 autocast on CUDA (decoder, unroll, MMD); a no-op on CPU.")
@click.option("--unroll", type=click.Choice(["auto", "flat", "naive"]), default=None,
              help="MTT unroll: auto (keep step graphs within distill.unroll_budget of free memory, recompute the "
                   "rest; default), flat (recompute all: memory flat in syn_steps) or naive (graph through every "
                   "step). The gradient is the same exact one.")
@click.option("--students-per-step", type=int, default=None, help="Students (expert trajectories) per MTT update.")
@click.option("--dtype", type=click.Choice(["float32", "float64"]), default=None,
              help="The dtype of the whole distillation (distill.dtype; default float32). float64 is for checking "
                   "gradients and comparing runs; its checkpoint holds float64, while evaluation, samples and exports "
                   "use the object in float32.")
@click.option("--mmd-chunk", type=int, default=None,
              help="Samples per feature-network graph in the MMD update (exact two-pass gradient); 0: automatic.")
@click.option("--mmd-exact-graph", is_flag=True, default=None,
              help="MMD update through one graph over every sample (the reference's memory; for checks).")
@click.option("--resume", "resume_dir", default=None,
              help="Continue the run in this directory (`latest`: the newest; `auto` with --name: the run of that "
                   "name if there is one, else start it: for jobs torchrun or a scheduler restarts).")
@_runs_dir_option("Where run directories are created")
@click.option("--name", default=None, help="Run name (default: the preset).")
@click.option("--device", default=None, help="auto | cpu | cuda | cuda:N.")
@click.option("--no-auto", is_flag=True, help="Fail instead of preparing data / training experts.")
@click.option("--evaluate", "then_evaluate", is_flag=True, help="Run `d3fast evaluate` on the result.")
@click.option("--soft-labels/--no-soft-labels", default=None,
              help="Label each prior with a whole-dataset expert's softmax at the end (stored and counted in storage).")
@_subtask_options
@_budget_options
@click.option("--data-path", type=click.Path(), default=None, help="Where the dataset's files are (for preparing it).")
@click.option("--log", "trackers", default=None, metavar="TRACKERS",
              help="Also send metrics, sample grids and the eval table to tensorboard,wandb,mlflow (log.trackers; "
                   "each its own pip package; offline by default).")
@_quiet_option
def distill(
    dataset, preset, overrides, ppc, steps, amp, unroll, students_per_step, dtype, mmd_chunk, mmd_exact_graph, resume_dir,
    runs_dir, name, device, no_auto, then_evaluate, soft_labels, subtasks, subtask, budget_ipc, budget_images,
    data_path, trackers,
) -> None:
    """Learn the distilled distribution (Algorithm 1: MTT + MMD + KL + diversity).

    Writes runs/<dataset>/<timestamp>-<name>/: config.json, manifest.json, metrics.jsonl
    (every loss term, lr, step time, images/s, peak memory) and checkpoint.pt (whole state,
    every distill.checkpoint_every steps and on Ctrl-C/SIGTERM). --resume RUN_DIR continues.

    With --subtasks S (and no --subtask) it distills every subtask, each in its own run
    <name>-sub<i>of<S> (one after another; under torchrun, rank r takes subtasks r, r+W, ...),
    then merges them into runs/<dataset>/<name>-merged. Running the same command again
    continues the unfinished subtask runs and reuses the finished ones.
    """
    from d3fast.dist import World
    from d3fast.distill import distill as run_distill
    from d3fast.experts import ensure_experts, resolve_data_loader
    from d3fast.run import Run

    # under torchrun: join the other ranks (NCCL on CUDA, gloo on the CPU); each rank
    # trains on cuda:LOCAL_RANK
    world = World.from_env(device or "auto")
    if world.distributed:
        device = world.device(device or "auto")
    typed = {"distill.ppc": ppc, "distill.steps": steps, "distill.amp": amp, "distill.unroll": unroll,
             "distill.students_per_step": students_per_step, "distill.dtype": dtype, "distill.mmd_chunk": mmd_chunk,
             "distill.mmd_exact_graph": mmd_exact_graph, "device": device, "distill.soft_labels": soft_labels,
             "data.subtasks": subtasks, "data.subtask": subtask, "data.data_path": data_path,
             "log.trackers": None if trackers is None else [t.strip() for t in trackers.split(",") if t.strip()]}
    if budget_ipc is not None:
        if resume_dir not in (None, "auto"):
            raise D3FastError("--budget-ipc chooses the decoder and priors of a new run; a resumed run keeps its own")
        typed |= _budget(dataset, preset, overrides, typed, budget_ipc, budget_images)
    announce = not dataset and resume_dir in (None, "auto")  # say what a new run without --dataset will use
    if announce and not preset:  # the default dataset with its own preset, not the bare defaults
        from d3fast.config import Config

        dataset = Config().data.dataset
    if resume_dir in (None, "auto"):
        whole = _resolve(dataset, preset, overrides, **typed)
        _run_name(whole, name)  # a bad --name fails now, not after the experts
        if announce and world.main:
            click.echo(f"dataset {whole.data.dataset} (preset {whole.preset}"
                       + ("" if preset else "; --dataset or --preset picks another, `d3fast presets` lists them")
                       + ")")
        if whole.data.subtasks > 1 and whole.data.subtask < 0:
            _distill_subtasks(whole, world, runs_dir, name, no_auto, then_evaluate)
            return
    # which run, and its config, are rank 0's decisions (every rank gets them, or its error)
    if resume_dir == "auto":  # continue the run named NAME if there is one (restarted jobs), else start it
        if not name:
            raise D3FastError("--resume auto needs --name NAME: it continues the newest run of that name")
        cfg = _resolve(dataset, preset, overrides, **typed)
        found = world.on_main(lambda: Run.named(runs_dir, cfg.data.dataset, _run_name(cfg, name)))
        resume_dir, name = (str(found.path), None) if found is not None else (None, name)
    if resume_dir is not None:
        if name is not None:
            raise D3FastError("--name names a new run; a resumed run keeps its directory")
        run = world.on_main(lambda: Run.open(resume_dir, runs_dir))
        if run.merged_path.exists():
            raise D3FastError(f"{run.path} is a merged object, not a run: resume its subtask runs (its manifest.json "
                              "lists them), or re-run the `distill --subtasks` command, which continues them and "
                              "merges again")
        cfg = _resolve(dataset, preset, overrides, base=world.on_main(run.read_config), **typed)
        world.on_main(lambda: run.check_resume(cfg))  # a refused change fails before any data is prepared
    else:
        cfg = _resolve(dataset, preset, overrides, **typed)
    world.check_split(cfg)  # same config, K and the classes divisible: before any work
    from d3fast.trackers import check_available

    check_available(cfg.log.trackers)  # a missing tracker package fails now, not after the experts
    # every rank prepares and trains experts: both are locked per dataset and per expert,
    # so the ranks share the work and find it done
    _ensure_prepared(cfg, no_auto)
    if resume_dir is None:  # a resumed run reads the experts its manifest lists
        resolve_data_loader(cfg)
        ensure_experts(cfg, auto=not no_auto, echo=click.echo if world.main else lambda *a, **k: None)
        run = world.on_main(lambda: Run.create(runs_dir, cfg, _run_name(cfg, name)))
    res = run_distill(cfg, run, resume=resume_dir is not None, world=world, progress=world.main)
    world.close()
    if not world.main:
        sys.exit(130 if res.interrupted else 0)
    last = res.last
    summary = f"; last mtt {last['mtt']:.4f} mmd {last['mmd']:.4f} student lr {last['student_lr']:.4g}" if last else ""
    state = "stopped early at" if res.interrupted else "reached"
    click.echo(f"{state} step {res.step}/{cfg.distill.steps} in {res.seconds:.1f} s{summary}")
    click.echo(f"run directory: {run.path}")
    if res.interrupted:
        click.echo(f"continue with: d3fast distill --resume {run.path}")
        sys.exit(130)
    if cfg.distill.soft_labels and cfg.data.subtasks == 1:
        from d3fast.soft_labels import ensure_labelling_expert

        if not no_auto:
            ensure_labelling_expert(cfg, click.echo)
        _label_run(run, cfg, device)
    if then_evaluate:
        _evaluate(_run_target(run), None, None, None, None)


# the keys --budget-ipc sets (d3fast/storage.py choose_budget)
BUDGET_KEYS = ("distill.decoder", "distill.decoder_width", "distill.decoder_linear", "distill.z_dim", "distill.ppc")


def _budget(dataset, preset, overrides, typed: dict[str, Any], ipc: float, images: str) -> dict[str, Any]:
    """The settings that fit `ipc` images per class of storage, printed with their bytes.

    Raises:
        D3FastError: a budget key also set by hand, or a budget nothing fits (naming the
            smallest that does)."""
    from d3fast.config import parse_overrides
    from d3fast.data.datasets import get_spec
    from d3fast.storage import choose_budget, ipc_equivalent

    by_hand = parse_overrides(list(overrides)).get("distill", {})
    given = [k for k in BUDGET_KEYS if typed.get(k) is not None or k.split(".")[1] in by_hand]
    if given:
        raise D3FastError(f"--budget-ipc chooses {', '.join(BUDGET_KEYS)}; drop {', '.join(given)} or the budget")
    cfg = _resolve(dataset, preset, overrides, **typed)
    spec = get_spec(cfg.data.dataset)
    res = spec.resolution
    choice = choose_budget(ipc, num_classes=spec.num_classes, channels=spec.channels, res=res,
                           subtasks=cfg.data.subtasks, soft_labels=cfg.distill.soft_labels,
                           pixel_bytes=4 if images == "float32" else 1)
    limit = 10000  # distill.ppc's range (d3fast/config.py)
    if choice.ppc > limit:
        raise D3FastError(f"a storage budget of {ipc:g} images per class buys {choice.ppc:,} priors per class, more "
                          f"than distill.ppc's limit of {limit:,}: give a smaller budget")
    other = ipc_equivalent(choice.bytes, spec.num_classes, spec.channels, res, pixel_bytes=1 if images == "float32" else 4)
    # notes on stderr: stdout holds the config that `d3fast config --budget-ipc N --format toml > F` writes
    click.echo(f"storage budget {ipc:g} {images} images per class ({spec.num_classes} classes, {cfg.data.subtasks} "
               f"subtask(s), {'with' if cfg.distill.soft_labels else 'without'} soft labels, float32 storage): "
               f"{choice.describe()} ({other:.3f} {'uint8' if images == 'float32' else 'float32'} images)", err=True)
    chosen = {"distill.decoder": choice.decoder, "distill.decoder_width": choice.decoder_width,
              "distill.decoder_linear": choice.decoder_linear, "distill.z_dim": choice.z_dim, "distill.ppc": choice.ppc}
    was = {k: getattr(cfg.distill, k.split(".")[1]) for k in chosen}
    replaced = [f"{k.split('.')[1]} {was[k]} -> {v}" for k, v in chosen.items() if was[k] != v]
    kept = [f"{k.split('.')[1]} {v}" for k, v in chosen.items() if was[k] == v]
    click.echo(f"it replaces {f'preset {cfg.preset}' if cfg.preset else 'the defaults'}: "
               + (", ".join(replaced) or "nothing") + (f" ({', '.join(kept)} kept)" if kept else ""), err=True)
    return chosen


def _label_run(run, cfg, device) -> None:
    """Soft labels for the run's checkpoint, beside it (d3fast/soft_labels.py)."""
    from d3fast.runtime import resolve_device
    from d3fast.soft_labels import label, save_run_labels

    dev = resolve_device(device or cfg.device)
    d, step = run.load_distilled(dev)
    info = label(d, cfg, dev)
    assert d.soft_labels is not None
    path = save_run_labels(run.path, d.soft_labels, step, info)
    click.echo(f"soft labels of step {step} from {info['expert']} (epoch {info['epoch']}): {path}")


def _distill_subtasks(cfg, world, runs_dir: str, name: str | None, no_auto: bool, then_evaluate: bool) -> None:
    """Every subtask of cfg's split in its own run, then the merge (rank 0). Under torchrun
    with W <= S ranks, rank r distills subtasks r, r + W, ... alone; with W = G x S, the G
    consecutive ranks of group i distill subtask i together (data-parallel, as one run)."""
    import datetime

    import torch.distributed as td

    from d3fast.config import flatten
    from d3fast.dist import World
    from d3fast.io import lock_holder, locked

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
    base = name or cfg.preset or "run"
    _ensure_prepared(cfg, no_auto)
    echo = click.echo if world.main else (lambda *a, **k: None)
    # one job per name: a second one started alongside would create its own subtask runs
    job_lock = Path(runs_dir) / cfg.data.dataset / f".{base}-subtasks.lock"
    with contextlib.ExitStack() as job:  # held until the job ends (the OS releases it if it dies)
        held = world.on_main(lambda: job.enter_context(locked(job_lock)))
        if not held:
            raise D3FastError(f"another `d3fast distill --subtasks` job named {base!r} is running (pid "
                              f"{lock_holder(job_lock)}): wait for it, or pass another --name")
        _run_subtasks(cfg, world, team, mine, done_group, runs_dir, base, no_auto, then_evaluate, echo)


def _run_subtasks(cfg, world, team, mine: list[int], done_group, runs_dir: str, base: str, no_auto: bool,
                  then_evaluate: bool, echo) -> None:
    """The body of `_distill_subtasks`, under its job lock: this rank's subtasks (`mine`,
    on the world `team`), the barrier, then rank 0's merge."""
    import torch.distributed as td

    from d3fast.distill import distill as run_distill
    from d3fast.experts import ensure_experts, resolve_data_loader
    from d3fast.merge import is_merged_dir, merge_runs, read_merged_manifest, up_to_date
    from d3fast.run import Run
    from d3fast.runtime import resolve_device

    S = cfg.data.subtasks
    for one in _each_subtask(cfg, echo):
        i = one.data.subtask
        if i not in mine:
            continue
        team.check_split(one)  # K students a multiple of the group's ranks, before any work
        run_name = _run_name(one, base)
        found = team.on_main(lambda: Run.named(runs_dir, one.data.dataset, run_name))  # noqa: B023
        echo(f"subtask {i} of {S}: " + (f"continuing {found.path}" if found else f"new run {run_name}")
             + (f" on ranks {world.rank}..{world.rank + team.size - 1}" if team.distributed else ""))
        resolve_data_loader(one)
        if found is None:  # the group's ranks share the expert training through its locks
            ensure_experts(one, auto=not no_auto, echo=echo)
            run = team.on_main(lambda: Run.create(runs_dir, one, run_name))  # noqa: B023
        else:
            run = found
        res = run_distill(one, run, resume=found is not None, world=team, progress=world.main)
        if res.interrupted or res.stop_requested:  # a stop during a subtask's last step ends the job too
            click.echo(f"stopped at step {res.step} of subtask {i}: run the same command again to continue")
            sys.exit(130)
    if done_group is not None:
        td.barrier(group=done_group)
    if not world.main:
        world.close()
        return
    runs = []
    for one in _each_subtask(cfg, lambda *a, **k: None):
        found = Run.named(runs_dir, cfg.data.dataset, _run_name(one, base))
        if found is None:
            raise D3FastError(f"the run of subtask {one.data.subtask} ({_run_name(one, base)}) is missing under "
                              f"{runs_dir}/{cfg.data.dataset}")
        runs.append(found.path)
    out = Path(runs_dir) / cfg.data.dataset / f"{base}-merged"
    if is_merged_dir(out) and read_merged_manifest(Run(out)).get("subtasks") != S:
        raise D3FastError(f"{out} holds the merge of another split (not {S} subtasks): pass another --name, or "
                          "delete it")
    if up_to_date(out, runs):  # the same command again: the merged object (its labels, its evaluation) stays
        world.close()
        click.echo(f"{out} is up to date with the {S} subtask runs")
        if then_evaluate:
            _evaluate(_run_target(Run(out)), None, None, None, None)
        return
    merged, out = merge_runs(runs, out, force=True, soft_labels=cfg.distill.soft_labels, device=resolve_device(cfg.device),
                             train_labeller=not no_auto)
    world.close()
    click.echo(f"merged {S} subtasks into {out}: {merged.num_classes} classes, {merged.storage_bytes() / 2**20:.2f} MiB "
               f"(= {merged.images_per_class_equivalent():.2f} uint8 images per class)"
               + ("; soft labels" if merged.soft_labels is not None else ""))
    if then_evaluate:
        _evaluate(_run_target(Run(out)), None, None, None, None)


# the files d3fast keeps in a run (or merged) directory (d3fast/run.py)
RUN_FILES = frozenset({"config.json", "manifest.json", "history.jsonl", "metrics.jsonl", "checkpoint.pt", ".lock",
                       "merged.safetensors", "soft_labels.safetensors", "eval.json", "eval.md"})


def _refuse_run_file(out: str) -> None:
    """--out must not write into a run directory (its files, evals/, tensorboard/, ...).

    Raises:
        D3FastError: naming the run."""
    if not str(out).strip():
        raise D3FastError("--out is empty: name the file or directory to write")
    path = Path(out).absolute()
    if path.name in RUN_FILES and (path.parent / "config.json").is_file():
        raise D3FastError(f"--out {out} is a file of the run {path.parent}: write elsewhere")
    for parent in path.parents:
        if (parent / "config.json").is_file() and ((parent / "checkpoint.pt").exists() or
                                                  (parent / "history.jsonl").exists() or
                                                  (parent / "merged.safetensors").exists()):
            raise D3FastError(f"--out {out} is inside the run {parent}: write elsewhere")


def _refuse_overwrite(out: str, force: bool, ours: bool, what: str) -> None:
    """An existing --out file is replaced only with --force, and only when it is d3fast's
    own kind of file (`ours`: an export, a sample grid).

    Raises:
        D3FastError: a directory, or a file that is not d3fast's, or one without --force."""
    path = Path(out)
    if path.is_dir():
        raise D3FastError(f"cannot write {out}: it is a directory ({what} is one file)")
    if path.parent.exists() and not path.parent.is_dir():
        raise D3FastError(f"cannot write {out}: {path.parent} is a file, not a directory")
    if path.exists() or path.is_symlink():
        if not ours:
            raise D3FastError(f"--out {out} exists and is not a d3fast {what}: choose another name "
                              "(d3fast never replaces a file it did not write)")
        if not force:
            raise D3FastError(f"--out {out} holds an earlier {what}: pass --force to replace it")


def _run_name(cfg, name: str | None) -> str:
    """A run's name: --name, else the preset; a subtask's run adds -sub<i>of<S>, the name
    `distill --subtasks S --name NAME` looks for (and `d3fast merge runs/*-sub?of5` matches).

    Raises:
        D3FastError: a name that is not one folder name."""
    import re

    if name is not None and not re.fullmatch(r"[^/\\\x00]{1,100}", name) or name in (".", ".."):
        raise D3FastError(f"--name {name!r}: a run name is one folder name (no '/', at most 100 characters)")
    base = name or cfg.preset or "run"
    return f"{base}-sub{cfg.data.subtask}of{cfg.data.subtasks}" if cfg.data.subtasks > 1 else base


def _evaluate(target, archs, students, epochs, device, loader=None) -> None:
    """Evaluate a `d3fast.evaluate.Target` (flags over its protocol) and print the table."""
    from d3fast.evaluate import _with, evaluate, rendered
    from d3fast.runtime import resolve_device

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
    _with(target.cfg, updates or None)
    report = evaluate(target, resolve_device(device or "auto"), progress=True)
    click.echo(rendered(report))
    kept = target.evals_dir
    click.echo(f"kept in {kept}/ (index.json lists every evaluation)"
               + (f"; latest in {target.run.path / 'eval.md'}" if target.run is not None else "")
               + f" ({report['seconds']:.0f} s)")


def _run_target(run):
    """A run as an evaluation target with its recorded protocol, on the automatic device."""
    from d3fast.evaluate import run_target
    from d3fast.runtime import resolve_device

    return run_target(run, resolve_device("auto"))


@cli.command()
@click.argument("target")
@_config_options
@click.option("--arch", "archs", default=None, help="Comma-separated: convnet,resnet18,vgg11,alexnet.")
@click.option("--students", type=int, default=None, help="Students per architecture (default 5).")
@click.option("--epochs", type=int, default=None, help="Epochs per student (default: the run's eval.epochs).")
@click.option("--device", default=None, help="auto | cpu | cuda | cuda:N.")
@click.option("--loader", type=click.Choice(["auto", "cache", "ffcv"]), default=None,
              help="Where the real test set streams from (default: the run's data.loader).")
@click.option("--evals-dir", default=None, type=click.Path(),
              help="Where to keep the evaluation (default: the run's evals/, else <TARGET>.evals/ beside it).")
@_quiet_option
@_runs_dir_option("Where `latest` looks for runs")
def evaluate(target, dataset, preset, overrides, archs, students, epochs, device, loader, evals_dir,
             runs_dir) -> None:
    """Train students on the distilled set and on two random-real baselines (same count,
    same storage); report mean ± std test accuracy. TARGET: a run or merged directory,
    `latest`, a d3fast export (.safetensors), a .pt image set (images.pt + labels.pt [+ lr.pt],
    MTT-family files included: pass --dataset) or an ImageFolder of images. --preset takes
    the preset's eval.* keys; --set changes eval.* (and data.loader) keys. Every evaluation
    is kept, none overwritten."""
    from d3fast.evaluate import open_target
    from d3fast.runtime import resolve_device

    t = open_target(target, runs_dir, dataset, preset, overrides, resolve_device(device or "auto"), evals_dir)
    _evaluate(t, archs, students, epochs, device, loader)


def _distilled_target(where: str, runs_dir: str, dataset, preset, overrides, what: str):
    from d3fast.evaluate import open_target

    t = open_target(where, runs_dir, dataset, preset, overrides, config_optional=True)
    if t.d is None:
        raise D3FastError(f"{what} needs a distilled object (a run, merged directory or .safetensors export); "
                          f"{where} is a fixed image set")
    return t


@cli.command()
@click.argument("run_dir")
@click.option("--out", required=True, type=click.Path(), help="PNG file to write.")
@click.option("--samples", default=9, show_default=True, type=click.IntRange(1, 100),
              help="Samples per prior after its mean image.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0, 2**63 - 1))
@click.option("--max-classes", type=click.IntRange(0, None), default=20, show_default=True,
              help="Rows of at most this many classes (the first ones); 0 = every class.")
@_config_options
@_runs_dir_option("Where `latest` looks for runs")
def sample(run_dir, out, samples, seed, max_classes, dataset, preset, overrides, runs_dir) -> None:
    """Write a grid: per prior, its mean image then fresh samples, each row named by its
    class, titled with the run and step; ZCA datasets are shown de-whitened. RUN_DIR: a run,
    merged directory, `latest` or .safetensors export; BatchNorm as eval.decoder_bn."""
    from d3fast.visualize import is_grid, sample_grid

    _refuse_run_file(out)
    if Path(out).suffix.lower() in (".jpg", ".jpeg", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".pdf", ".svg"):
        raise D3FastError(f"--out {out}: the grid is written as PNG; name it <something>.png")
    # re-sampling into the same file is the usual loop: an earlier d3fast grid is replaced freely
    _refuse_overwrite(out, True, not Path(out).exists() or is_grid(Path(out)), "sample grid")
    t = _distilled_target(run_dir, runs_dir, dataset, preset, overrides, "sample")
    zca = _zca_or_note(t.cfg)
    path = sample_grid(t.d, Path(out), samples, seed, bn=t.cfg.eval.decoder_bn, zca=zca,
                       title=f"{Path(t.name).name}  step {t.step}", max_classes=max_classes)
    shown = t.d.num_classes if max_classes == 0 else min(max_classes, t.d.num_classes)
    click.echo(f"wrote {path} (step {t.step}, {shown * t.d.ppc} of {t.d.num_priors} priors)")


def _zca_or_note(cfg):
    """The dataset's ZCA to de-whiten with, or None with a note when it cannot be had."""
    from d3fast.exports import zca_of

    try:
        return zca_of(cfg)
    except D3FastError as e:
        click.echo(f"note: showing ZCA-whitened images ({e})", err=True)
        return None


@cli.command()
@click.argument("run_dir")
@click.option("--out", required=True, type=click.Path(),
              help="File (safetensors) or directory (pt, imagefolder) to write.")
@click.option("--format", "fmt", type=click.Choice(["safetensors", "pt", "imagefolder"]), default="safetensors",
              show_default=True, help="safetensors: the distribution (latents + decoder); pt: a fixed set of "
              "images.pt/labels.pt/lr.pt (MTT-family, DD-Ranking); imagefolder: PNGs per class.")
@click.option("--per-class", type=int, default=None,
              help="pt/imagefolder: images per class (default: the run's eval.samples_per_class).")
@click.option("--pixels", is_flag=True, help="pt: images in [0, 1] (normalisation and ZCA undone) instead of "
              "normalised as the students see them.")
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=None,
              help="pt/imagefolder: the draw's seed (default: eval.seed).")
@click.option("--force", is_flag=True, help="Replace an earlier export at --out.")
@_config_options
@_runs_dir_option("Where `latest` looks for runs")
def export(run_dir, out, fmt, per_class, pixels, seed, force, dataset, preset, overrides, runs_dir) -> None:
    """Export the distilled object: the distribution as safetensors (latents, decoder,
    learned lr, config, dataset, step, version), or a fixed draw of images that other tools
    read (`--format pt | imagefolder`; the draw `d3fast evaluate --set eval.fresh_samples=false`
    trains on, so the export re-evaluates to the run's numbers)."""
    from d3fast.data.normalize import to_pixels
    from d3fast.distilled import draw_set
    from d3fast.distilled import export as run_export
    from d3fast.exports import describe, write_imagefolder, write_pt

    _refuse_run_file(out)
    t = _distilled_target(run_dir, runs_dir, dataset, preset, overrides, "export")
    d, cfg, e = t.d, t.cfg, t.cfg.eval
    if fmt == "safetensors":
        from d3fast.distilled import is_export

        if Path(out).is_dir():
            raise D3FastError(f"cannot write {out}: it is a directory (the safetensors export is one file; "
                              "--format pt or imagefolder write directories)")
        _refuse_overwrite(out, force, is_export(Path(out)), "safetensors export")
        if pixels or per_class is not None or seed is not None:
            raise D3FastError("--pixels, --per-class and --seed choose a draw of images: use them with --format pt "
                              "or imagefolder")
        run_export(d, out, describe(cfg, d, t.step, _zca_or_note(cfg) if cfg.data.zca else None))
        click.echo(f"wrote {out}: {d.num_priors} priors, {d.storage_bytes() / 2**20:.2f} MiB "
                   f"(= {d.images_per_class_equivalent():.1f} uint8 images per class), step {t.step}")
        return
    if pixels and fmt == "imagefolder":
        raise D3FastError("--pixels chooses pixels for --format pt; an ImageFolder always holds pixels (PNG)")
    k = per_class if per_class is not None else e.samples_per_class
    if not 1 <= k <= 100_000:
        raise D3FastError(f"--per-class must be in 1..100000, got {k}")
    zca = None
    if cfg.data.zca and (pixels or fmt == "imagefolder"):
        from d3fast.exports import zca_of

        zca = zca_of(cfg)  # de-whitening needs the dataset's own ZCA: an error names the prepare command
    seed = e.seed if seed is None else seed
    x, y, soft = draw_set(d, k, seed, e.decoder_bn, e.batch_size)
    info = describe(cfg, d, t.step, zca) | {"per_class": k, "seed": seed, "pixels": bool(pixels or fmt == "imagefolder")}
    if fmt == "pt":
        write_pt(Path(out), to_pixels(x, d.meta, zca) if pixels else x, y, soft, d.student_lr, info, force)
        what = "pixels in [0, 1]" if pixels else "normalised" + (" and ZCA-whitened" if cfg.data.zca else "")
    else:
        write_imagefolder(Path(out), to_pixels(x, d.meta, zca), y, d.classes, soft, d.student_lr, info, force)
        what = "PNG"
    click.echo(f"wrote {out}: {len(x)} images ({k} per class x {d.num_classes} classes, {what}), "
               f"lr {d.student_lr:.4g}" + (", soft labels" if soft is not None else "") + f", step {t.step}")


@cli.command()
@click.argument("run_dirs", nargs=-1, required=True)
@click.option("--out", required=True, type=click.Path(), help="Directory of the merged object (run-shaped).")
@click.option("--partial", is_flag=True, help="Also merge runs stopped before their distill.steps.")
@click.option("--soft-labels/--no-soft-labels", default=None,
              help="Label the merged object with a whole-dataset expert (default: as the runs' distill.soft_labels).")
@click.option("--force", is_flag=True, help="Replace --out when it exists.")
@click.option("--device", default=None, help="auto | cpu | cuda | cuda:N (for soft labels).")
@_runs_dir_option("Where `latest` looks for runs")
def merge(run_dirs, out, partial, soft_labels, force, device, runs_dir) -> None:
    """Merge the runs of every subtask of one split (RUN_0 ... RUN_{S-1}, any order) into one
    distilled object: each class decodes through its own subtask's decoder; storage is the
    sum. evaluate, sample and export take the --out directory like a run's."""
    from d3fast.merge import merge_runs
    from d3fast.runtime import resolve_device

    merged, path = merge_runs(list(run_dirs), out, partial=partial, soft_labels=soft_labels, force=force,
                              device=resolve_device(device or "auto"), runs_dir=runs_dir, train_labeller=True)
    steps = ", ".join(str(s["step"]) for s in merged.sources)
    click.echo(f"merged {len(merged.parts)} subtasks (steps {steps}) into {path}: {merged.num_classes} classes x "
               f"{merged.ppc} priors, {merged.storage_bytes() / 2**20:.2f} MiB (= "
               f"{merged.images_per_class_equivalent():.2f} uint8 images per class)"
               + ("; soft labels" if merged.soft_labels is not None else ""))


@cli.command()
@click.argument("run_dir")
@click.option("--epoch", type=int, default=None, help="Epoch of the whole-dataset expert (default: distill.soft_label_epoch).")
@click.option("--device", default=None, help="auto | cpu | cuda | cuda:N.")
@_runs_dir_option("Where `latest` looks for runs")
def label(run_dir, epoch, device, runs_dir) -> None:
    """Soft labels for a run's latest checkpoint or a merged object: each prior's mean image
    through a ConvNet expert trained on all classes (its softmax), stored with the object."""
    from d3fast.config import validate
    from d3fast.distilled import Merged
    from d3fast.runtime import resolve_device

    run = _open_run(run_dir, runs_dir)
    cfg = run.read_config()
    if epoch is not None:
        cfg.distill.soft_label_epoch = epoch
        validate(cfg)
    if cfg.data.subtasks == 1 or run.merged_path.exists():
        from d3fast.soft_labels import ensure_labelling_expert

        ensure_labelling_expert(cfg, click.echo)
    if run.merged_path.exists():
        from d3fast.merge import relabel

        merged = relabel(run, cfg, resolve_device(device or "auto"))
        assert isinstance(merged, Merged)
        click.echo(f"labelled {merged.num_priors} priors of {run.path} ({merged.storage_bytes() / 2**20:.2f} MiB "
                   "with the labels)")
        return
    _label_run(run, cfg, device)


@cli.command()
@_config_options
@_budget_options
@click.option("--format", "fmt", type=click.Choice(["json", "toml"]), default="json", show_default=True,
              help="toml: a file that --config reads back to this configuration.")
def config(dataset, preset, overrides, budget_ipc, budget_images, fmt) -> None:
    """Print the resolved configuration as JSON or TOML (--budget-ipc: with the decoder and
    priors that budget chooses)."""
    from d3fast.config import to_dict, to_toml

    typed = _budget(dataset, preset, overrides, {}, budget_ipc, budget_images) if budget_ipc is not None else {}
    cfg = _resolve(dataset, preset, overrides, **typed)
    click.echo(to_toml(cfg) if fmt == "toml" else json.dumps(to_dict(cfg), indent=2), nl=fmt == "json")


@cli.command()
def presets() -> None:
    """The packaged presets: name, dataset and what each is for (their first comment line)."""
    from importlib import resources

    from d3fast.config import available_presets, load_preset

    for name in available_presets():
        text = (resources.files("d3fast.presets") / f"{name}.toml").read_text()
        lead = []  # the leading comment block, up to its first sentence
        for line in text.splitlines():
            if not line.startswith("#"):
                break
            lead.append(line.lstrip("# ").strip())
        about = " ".join(lead).split(". ")[0].rstrip(".")
        dataset = load_preset(name).get("data", {}).get("dataset", "?")
        click.echo(f"{name:<24} {dataset:<14} {about}")


def _cell(value: Any, width: int = 60) -> str:
    """A value read from a run's files as one table cell: printable, one line, at most `width`."""
    text = "".join(ch if ch.isprintable() else " " for ch in str(value or "-"))
    return text if len(text) <= width else text[: width - 3] + "..."


@cli.command()
@click.option("--dataset", default=None, help="Only this dataset.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_runs_dir_option("Where the runs are")
def runs(dataset, as_json, runs_dir) -> None:
    """List the runs and merged objects: dataset, preset, step/steps, status, the MTT term's
    health at the last step, best loss, last evaluation and device-hours (from each run's files; `latest` is the last row with a checkpoint)."""
    from d3fast.ledger import text_table
    from d3fast.run import list_runs

    rows = list_runs(runs_dir, dataset)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo(f"no runs under {runs_dir}/" + (f"{dataset}/" if dataset else ""))
        return
    table = [["run", "dataset", "preset", "step", "status", "MTT", "best loss", "hours", "last evaluation"]]
    for r in rows:
        hours = "" if r["device_hours"] is None else f"{r['device_hours']:.3g} {r['hours_unit']}"
        best = "" if r["best_loss"] is None else f"{r['best_loss']:.4g}"
        table.append([r["name"], r["dataset"], r["preset"], f"{r['step']}/{r['steps']}", r["status"],
                      _cell(r["mtt_health"]), best, hours, r["last_eval"]])
    click.echo(text_table([[str(v) for v in row] for row in table]))
    click.echo(f"({len(rows)} under {runs_dir}/)")


@cli.command()
@click.option("--dataset", default=None, help="Only this dataset.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--records", "show_records", is_flag=True, help="Also list every ledger row.")
def budget(dataset, as_json, show_records) -> None:
    """Device-hours spent per dataset and phase (from the ledger under $D3FAST_HOME),
    against the paper's GPU-hour budget (docs/algorithm.md section 8). CPU time is listed as CPU-h,
    never as GPU time."""
    from d3fast import ledger

    book = ledger.Ledger()
    rows = book.records(dataset=dataset)
    if as_json:
        totals = ledger.totals(rows)
        out = {"ledger": str(book.path), "records": len(rows), "totals": totals, "paper": ledger.paper_comparison(totals),
               "paper_budgets": {k: vars(v) for k, v in ledger.PAPER_BUDGETS.items()}}
        if show_records:
            out["rows"] = rows
        click.echo(json.dumps(out, indent=2))
        return
    click.echo(ledger.budget_text(book.path, rows, show_records))


@cli.command()
@_config_options
@click.option("--steps", type=int, default=5, show_default=True, help="Timed steps (after the warm-up).")
@click.option("--trace-steps", type=int, default=2, show_default=True,
              help="Steps after the timed ones run under torch.profiler (trace, kernel tables); 0: none.")
@click.option("--warmup", type=int, default=1, show_default=True, help="Untimed steps first (allocator, autotuning, JIT).")
@click.option("--free-steps", type=int, default=None,
              help="Steps without phase markers (no GPU syncs), timed as distill runs; they give the step rate. "
                   "Default: --steps on CUDA, 0 on the CPU.")
@click.option("--out", type=click.Path(), default=None, help="Report directory (default: profiles/<dataset>-<time>).")
@click.option("--stand-in", type=click.Choice(["auto", "always", "never"]), default="auto", show_default=True,
              help="Random data / expert trajectories of the right shapes when the real ones are missing.")
@click.option("--amp", is_flag=True, default=None, help="bf16 autocast on CUDA, as in distill.")
@click.option("--unroll", type=click.Choice(["auto", "flat", "naive"]), default=None, help="MTT unroll mode, as in distill.")
@click.option("--dtype", type=click.Choice(["float32", "float64"]), default=None, help="distill.dtype, as in distill.")
@click.option("--device", default=None, help="auto | cpu | cuda | cuda:N.")
@_subtask_options
def profile(dataset, preset, overrides, steps, trace_steps, warmup, free_steps, out, stand_in, amp, unroll, dtype, device,
            subtasks, subtask) -> None:
    """Where a distillation step's time and memory go: runs warm-up + timed + traced steps of
    the real loop and writes report.md, report.json, trace.json (Chrome trace), phases.png
    and memory.png. Needs no experts: stand-ins of the right shapes are used when missing."""
    from d3fast.profile import profile as run_profile
    from d3fast.profile import summary_line

    cfg = _resolve(dataset, preset, overrides, **{"distill.amp": amp, "distill.unroll": unroll, "distill.dtype": dtype,
                                                  "device": device, "data.subtasks": subtasks, "data.subtask": subtask})
    if cfg.data.subtasks > 1 and cfg.data.subtask < 0:
        cfg.data.subtask = 0  # the subtasks are alike in size: one stands for all (the projection counts S)
    out_dir = Path(out) if out else Path("profiles") / f"{cfg.data.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
    res = run_profile(cfg, out_dir, steps=steps, trace_steps=trace_steps, warmup=warmup, stand_in=stand_in,
                      free_steps=free_steps)
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
