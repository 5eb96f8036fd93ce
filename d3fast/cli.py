"""The `d3fast` command line.

    d3fast prepare --dataset NAME [--data-path PATH]   decode once into the uint8 cache
    d3fast experts --dataset NAME [--num-experts N]    train expert trajectories
    d3fast config  --dataset NAME [--set k=v]          print the resolved configuration
    d3fast distill --dataset NAME [--amp]              learn the distilled distribution
    d3fast evaluate RUN_DIR                            students on it vs real baselines
    d3fast frontier --dataset NAME --budgets 8,16,32   D3 vs real images and coresets of equal storage
    d3fast budget  [--dataset NAME] [--json]           device-hours spent vs the paper's budget
    d3fast profile --dataset NAME [--steps N]          where a distill step's time and memory go
    d3fast doctor                                      versions, devices, active backends

Every command takes --preset and repeated --set section.key=value overrides
(defaults < preset < overrides). Errors in the input print one line and exit with 2;
Ctrl-C exits with 130 after saving what was finished.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from typing import Any

import click

from d3fast.config import CHOICES
from d3fast.errors import D3FastError, Interrupted


def _warning_line(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None,
                  line: str | None = None) -> None:
    """A warning as one `warning:` line (Python's format adds the file, line and source line
    of the library's code), written around a progress bar."""
    from tqdm import tqdm

    tqdm.write(f"warning: {message}", file=sys.stderr)


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
            with warnings.catch_warnings():
                warnings.showwarning = _warning_line
                return super().invoke(ctx)
        except Interrupted:  # the command said what was saved and how to continue
            sys.exit(130)
        except D3FastError as e:
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
                # the group cannot be destroyed (that may wait on the dead peer), and interpreter
                # teardown with gloo's threads alive can abort (d3fast/dist.py, World.from_env),
                # which would turn this exit 2 into a SIGABRT; files are closed by now
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(2)
            from d3fast.io import write_failure

            failure = write_failure(getattr(e, "filename", None), e)
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

    from d3fast.io import atomic_write_text, file_stamp
    from d3fast.paths import home

    path = home() / "logs" / f"crash-{file_stamp()}-{os.getpid()}.txt"
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


def _typed(flags: dict[str, Any]) -> dict[str, Any]:
    """A command's typed flags by dotted key (None: not given), --resolution included."""
    ctx = click.get_current_context(silent=True)
    if ctx is not None and "d3fast.resolution" in ctx.meta:
        flags = {"data.resolution": ctx.meta["d3fast.resolution"], **flags}
    return flags


def _config(dataset: str | None, preset: str | None, overrides: tuple[str, ...], flags: dict[str, Any]) -> Any:
    """The config of a command: defaults < preset < typed flags < --set (d3fast/config.py)."""
    from d3fast.config import resolve_config

    return resolve_config(dataset, preset, overrides, typed_overrides=_typed(flags))


def _config_options(f: Any) -> Any:
    f = click.option("--resolution", type=int, default=None, expose_value=False, callback=_remember_resolution,
                     help="Image size of an imagefolder or hf dataset (data.resolution; a power of two, 8..512).")(f)
    f = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                     help="Override a config key, e.g. --set experts.lr=0.02 (repeatable).")(f)
    f = click.option("--preset", "--config", "preset", default=None,
                     help="Preset name (default: the dataset's own; `d3fast presets` lists them), or a TOML file "
                          "of your own in the same form (`d3fast config --format toml` writes one).")(f)
    f = click.option("--dataset", default=None, help="Dataset name, e.g. digits, fashion-mnist, imagewoof, "
                     "imagefolder[-<label>] (a train/<class>/ tree), hf[-<label>] (a local Hugging Face dataset).")(f)
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
    f = click.option("--budget-images", type=click.Choice(["uint8", "float32"]), default="uint8", show_default=True,
                     help="What one image of --budget-ipc is: uint8 pixels (what a real image costs on disk, and "
                          "the equal-storage baselines' unit) or float32 values (the paper's accounting); the other "
                          "is printed too.")(f)
    f = click.option("--budget-ipc", type=float, default=None,
                     help="Storage budget in images per class: chooses the decoder size/width and priors per class "
                          "that fit it in the object's distill.storage (float32, float16, int8, int4; soft labels "
                          "and subtasks included).")(f)
    return f


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
    and Imagenet64_val_npz/, or the pickled Imagenet64_train/ and _val/), imagefolder[-<label>]
    (train/<class>/ and val/<class>/, at --resolution R), hf[-<label>] (a local Hugging Face
    dataset: Parquet shards or a save_to_disk folder, at --resolution R; docs/datasets.md).
    `--format ffcv` then writes train/test .beton files beside the cache from the same decoded
    images.
    """
    from d3fast.recipes.prepare import command

    command(_config(dataset, preset, overrides, {"data.data_path": data_path, "data.skip_corrupt": skip_corrupt,
                                                 "data.workers": workers}), force, fmt, ffcv_mode, jpeg_quality)


@cli.group(invoke_without_command=True)
@_config_options
@click.option("--num-experts", type=int, default=None, help="How many experts (default: preset's).")
@click.option("--epochs", type=int, default=None, help="Epochs per expert (default: preset's).")
@click.option("--seed", type=int, default=None, help="Base seed; expert i uses a seed derived from (seed, i).")
@click.option("--device", default=None, help="auto | cpu | cuda | cuda:N (default: auto).")
@click.option("--no-auto", is_flag=True, help="Fail instead of preparing the dataset when it is missing.")
@click.option("--loader", type=click.Choice(CHOICES["data.loader"]), default=None,
              help="Where training batches stream from (default auto: FFCV files when present, else the cache).")
@_subtask_options
@click.option("--data-path", type=click.Path(), default=None, help="Where the dataset's files are (for preparing it).")
@_quiet_option
@click.pass_context
def experts(ctx, dataset, preset, overrides, num_experts, epochs, seed, device, no_auto, loader, subtasks, subtask,
            data_path) -> None:
    """Train expert trajectories (docs/algorithm.md section 4) for MTT.

    Each expert saves its parameters at init and after every epoch, atomically. Re-running
    after an interruption continues the missing experts (and the interrupted one from its
    last epoch); the same seed gives the same trajectories. With --subtasks S, each
    subtask's experts see its classes only (one directory per subtask; all of them, one
    after another, unless --subtask picks one). `d3fast experts import` and `d3fast experts
    export` move trajectories in and out of MTT's replay buffers.
    """
    if ctx.invoked_subcommand is not None:
        given = [k for k, v in ctx.params.items() if v not in (None, False, ())]
        if given:
            raise click.UsageError(f"options go after `{ctx.invoked_subcommand}`: `d3fast experts "
                                   f"{ctx.invoked_subcommand} ... --dataset D` (got {', '.join(given)} before it)")
        return
    from d3fast.recipes.experts import command

    command(dataset, preset, overrides, _typed({
        "experts.num_experts": num_experts, "experts.epochs": epochs, "experts.seed": seed, "data.loader": loader,
        "device": device, "data.subtasks": subtasks, "data.subtask": subtask, "data.data_path": data_path}), no_auto)


@experts.command("import")
@click.argument("path", type=click.Path())
@_config_options
@click.option("--device", default=None, help="auto | cpu | cuda | cuda:N (where each expert is evaluated).")
@click.option("--no-auto", is_flag=True, help="Fail instead of preparing the dataset when it is missing.")
@click.option("--data-path", type=click.Path(), default=None, help="Where the dataset's files are (for preparing it).")
@_quiet_option
def experts_import(path, dataset, preset, overrides, device, no_auto, data_path) -> None:
    """Import MTT replay buffers (PATH: a replay_buffer_<n>.pt or the <buffer_path>/<dataset>/<model>/
    folder of MTT, DATM, FTD or D3's buffer.py) as the experts of this config, which `d3fast
    distill` then reads as if trained here.

    Every tensor is checked against d3fast's network for the dataset first (net.depth,
    net.width, net.norm set it; the first mismatch is named), and each expert's last epoch is
    evaluated on the test split. Importing a buffer again adds nothing.
    """
    from d3fast.recipes.expert_buffers import command_import

    command_import(_config(dataset, preset, overrides, {"device": device, "data.data_path": data_path}), path, no_auto)


@experts.command("export")
@_config_options
@click.option("--format", "fmt", type=click.Choice(["mtt"]), default="mtt", show_default=True,
              help="mtt: replay_buffer_<n>.pt files as MTT's buffer.py writes them (MTT, DATM, FTD and D3 read them).")
@click.option("--out", "out", type=click.Path(), required=True,
              help="The buffer path: files go to OUT/<dataset dir>/<model>/ (e.g. OUT/CIFAR10/ConvNet).")
@click.option("--per-file", type=int, default=10, show_default=True, help="Trajectories per file (buffer.py's "
              "--save_interval).")
@_quiet_option
def experts_export(dataset, preset, overrides, fmt, out, per_file) -> None:
    """Write this config's complete experts as MTT replay buffers."""
    from d3fast.recipes.expert_buffers import export_buffers

    export_buffers(_config(dataset, preset, overrides, {}), out, per_file, echo=click.echo)


@cli.command()
@_config_options
@click.option("--ppc", type=int, default=None, help="Latent priors per class.")
@click.option("--steps", type=int, default=None, help="Distillation steps (with --resume: the new total).")
@click.option("--amp", is_flag=True, default=None, help="bf16 autocast on CUDA (decoder, unroll, MMD); a no-op on CPU.")
@click.option("--unroll", type=click.Choice(CHOICES["distill.unroll"]), default=None,
              help="MTT unroll: auto (keep step graphs within distill.unroll_budget of free memory, recompute the "
                   "rest; default), flat (recompute all: memory flat in syn_steps) or naive (graph through every "
                   "step). The gradient is the same exact one.")
@click.option("--students-per-step", type=int, default=None, help="Students (expert trajectories) per MTT update.")
@click.option("--dtype", type=click.Choice(CHOICES["distill.dtype"]), default=None,
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
    from d3fast.recipes.distill import DistillJob, command

    typed = _typed({
        "distill.ppc": ppc, "distill.steps": steps, "distill.amp": amp, "distill.unroll": unroll,
        "distill.students_per_step": students_per_step, "distill.dtype": dtype, "distill.mmd_chunk": mmd_chunk,
        "distill.mmd_exact_graph": mmd_exact_graph, "device": device, "distill.soft_labels": soft_labels,
        "data.subtasks": subtasks, "data.subtask": subtask, "data.data_path": data_path,
        "log.trackers": None if trackers is None else [t.strip() for t in trackers.split(",") if t.strip()]})
    command(DistillJob(runs_dir, dataset, preset, overrides, typed, resume_dir, name, no_auto, then_evaluate,
                       budget_ipc, budget_images))






@cli.command()
@_config_options
@click.option("--budgets", required=True, metavar="B1,B2,...",
              help="Storage budgets in uint8 images per class, comma-separated, e.g. 8,16,32,64.")
@click.option("--storage", "storages", default="int8", show_default=True, metavar="FORMATS",
              help="The object's storage formats to try, comma-separated: float32, float16, int8, int4 "
                   "(distill.storage); one D3 run per format and budget.")
@click.option("--students", type=int, default=None, help="Students per row (default: the preset's eval.students).")
@click.option("--epochs", type=int, default=None, help="Epochs per student (default: the preset's eval.epochs).")
@click.option("--device", default=None, help="auto | cpu | cuda | cuda:N.")
@_quiet_option
@_runs_dir_option("Where the runs go (runs/<dataset>/frontier-<budget>ipc-<storage>) and the table (frontier/)")
def frontier(dataset, preset, overrides, budgets, storages, students, epochs, device, runs_dir) -> None:
    """D3 against real images of equal storage: per storage format and budget, distil (or
    continue, or reuse) the object --budget-ipc chooses, evaluate it beside random real, herding
    and k-center greedy coresets holding its bytes in uint8 images, and write the table and a
    plot of accuracy against storage to runs/<dataset>/frontier/. Running it again continues
    unfinished runs and reuses finished runs and their evaluations."""
    from d3fast.recipes.frontier import frontier as run_frontier
    from d3fast.recipes.frontier import parse_budgets, parse_storages

    for name, value in (("--students", students), ("--epochs", epochs)):
        if value is not None and value < 1:
            raise D3FastError(f"{name} must be at least 1, got {value}")
    run_frontier(dataset, preset, overrides, parse_budgets(budgets), parse_storages(storages), runs_dir, students,
                 epochs, device)


@cli.command()
@click.argument("target")
@_config_options
@click.option("--arch", "archs", default=None, help="Comma-separated: convnet,resnet18,vgg11,alexnet.")
@click.option("--students", type=int, default=None, help="Students per architecture (default: the run's eval.students).")
@click.option("--epochs", type=int, default=None, help="Epochs per student (default: the run's eval.epochs).")
@click.option("--device", default=None, help="auto | cpu | cuda | cuda:N.")
@click.option("--loader", type=click.Choice(CHOICES["data.loader"]), default=None,
              help="Where the real test set streams from (default: the run's data.loader).")
@click.option("--evals-dir", default=None, type=click.Path(),
              help="Where to keep the evaluation (default: the run's evals/, else <TARGET>.evals/ beside it).")
@_quiet_option
@_runs_dir_option("Where `latest` looks for runs")
def evaluate(target, dataset, preset, overrides, archs, students, epochs, device, loader, evals_dir,
             runs_dir) -> None:
    """Train students on the distilled set and on real-image baselines (random images of the
    same count and of the same storage; herding and k-center greedy coresets of the same
    storage, eval.coresets); report mean ± std test accuracy. TARGET: a run or merged directory,
    `latest`, a d3fast export (.safetensors), a .pt image set (images.pt + labels.pt [+ lr.pt],
    MTT-family files included: pass --dataset) or an ImageFolder of images. --preset takes
    the preset's eval.* keys; --set changes eval.* (and data.loader) keys. Every evaluation
    is kept, none overwritten."""
    from d3fast.recipes.evaluate import command, open_target
    from d3fast.runtime import resolve_device

    t = open_target(target, runs_dir, dataset, preset, overrides, resolve_device(device or "auto"), evals_dir)
    command(t, archs, students, epochs, device, loader)


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
    from d3fast.recipes.evaluate import distilled_target
    from d3fast.recipes.export import sample_command

    sample_command(lambda: distilled_target(run_dir, runs_dir, dataset, preset, overrides, "sample"), out, samples,
                   seed, max_classes)


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
    from d3fast.recipes.evaluate import distilled_target
    from d3fast.recipes.export import export_command

    export_command(lambda: distilled_target(run_dir, runs_dir, dataset, preset, overrides, "export"), out, fmt,
                   per_class, pixels, seed, force)


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
    from d3fast.recipes.subtasks import command

    command(run_dirs, out, partial, soft_labels, force, device, runs_dir)


@cli.command()
@click.argument("run_dir")
@click.option("--epoch", type=int, default=None, help="Epoch of the whole-dataset expert (default: distill.soft_label_epoch).")
@click.option("--device", default=None, help="auto | cpu | cuda | cuda:N.")
@_runs_dir_option("Where `latest` looks for runs")
def label(run_dir, epoch, device, runs_dir) -> None:
    """Soft labels for a run's latest checkpoint or a merged object: each prior's mean image
    through a ConvNet expert trained on all classes (its softmax), stored with the object."""
    from d3fast.recipes.label import command

    command(run_dir, epoch, device, runs_dir)


@cli.command()
@_config_options
@_budget_options
@click.option("--format", "fmt", type=click.Choice(["json", "toml"]), default="json", show_default=True,
              help="toml: a file that --config reads back to this configuration.")
def config(dataset, preset, overrides, budget_ipc, budget_images, fmt) -> None:
    """Print the resolved configuration as JSON or TOML (--budget-ipc: with the decoder and
    priors that budget chooses)."""
    from d3fast.config import to_dict, to_toml
    from d3fast.preflight import budget_overrides

    typed = _typed({})
    if budget_ipc is not None:
        typed |= budget_overrides(dataset, preset, overrides, typed, budget_ipc, budget_images)
    cfg = _config(dataset, preset, overrides, typed)
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


@cli.command()
@click.option("--dataset", default=None, help="Only this dataset.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_runs_dir_option("Where the runs are")
def runs(dataset, as_json, runs_dir) -> None:
    """List the runs and merged objects: dataset, preset, step/steps, status, the MTT term's
    health at the last step, best loss, last evaluation and device-hours (from each run's files; `latest` is the last row with a checkpoint)."""
    from d3fast.report import runs_table
    from d3fast.run import list_runs

    rows = list_runs(runs_dir, dataset)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    elif not rows:
        click.echo(f"no runs under {runs_dir}/" + (f"{dataset}/" if dataset else ""))
    else:
        click.echo(runs_table(rows))
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
        click.echo(json.dumps(ledger.budget_json(book.path, rows, show_records), indent=2))
    else:
        click.echo(ledger.budget_text(book.path, rows, show_records))


@cli.command()
@_config_options
@click.option("--steps", type=int, default=5, show_default=True,
              help="Timed steps (after the warm-up); one more step then counts the kernels each phase runs.")
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
@click.option("--unroll", type=click.Choice(CHOICES["distill.unroll"]), default=None, help="MTT unroll mode, as in distill.")
@click.option("--dtype", type=click.Choice(CHOICES["distill.dtype"]), default=None, help="distill.dtype, as in distill.")
@click.option("--device", default=None, help="auto | cpu | cuda | cuda:N.")
@_subtask_options
def profile(dataset, preset, overrides, steps, trace_steps, warmup, free_steps, out, stand_in, amp, unroll, dtype, device,
            subtasks, subtask) -> None:
    """Where a distillation step's time and memory go: runs warm-up + timed + traced steps of
    the real loop and writes report.md, report.json, trace.json (Chrome trace), phases.png
    and memory.png. Needs no experts: stand-ins of the right shapes are used when missing."""
    from d3fast.recipes.profile import command

    command(_config(dataset, preset, overrides, {
        "distill.amp": amp, "distill.unroll": unroll, "distill.dtype": dtype, "device": device,
        "data.subtasks": subtasks, "data.subtask": subtask}), out, steps, trace_steps, warmup, stand_in, free_steps)


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
