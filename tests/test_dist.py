"""One distillation over several processes (torch.distributed, gloo on the CPU; d3fast/dist.py):
2 ranks x 1 student must equal 1 process x 2 students, the ranks must agree on their
config, and a run directory a rank cannot see is an error on every rank."""

from __future__ import annotations

import os
import signal
import socket
import sys
import traceback
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from d3fast.errors import D3FastError
from d3fast.recipes.distill import distill
from d3fast.recipes.experts import run_experts
from d3fast.run import Run
from tests._utils import F64_TOL, assert_same_state, cfg_of

STEPS = 3
# float64 (distill.dtype): a split is held to what float64 can promise, every tensor of the
# checkpoint (tests/_utils.py, F64_TOL). In float32 no fixed tolerance can tell a split from
# a bug: after the first step Adam turns rounding differences in near-zero gradients into
# lr-sized steps (2 ranks vs 1 process: the decoder's convs 1.5e-3 to 6.4e-3 apart after 2
# steps, and the same process on 1 and 2 threads 9e-5 to 1e-3 apart)
OVER = (f"distill.steps={STEPS}", "distill.students_per_step=2", "distill.ppc=2", "distill.checkpoint_every=1",
        "distill.dtype=float64")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, size: int, port: int, run_dir: str, overrides: tuple[str, ...], out: str,
          rank_overrides: dict[int, tuple[str, ...]], die_after: dict[int, int] | None = None,
          run_dirs: dict[int, str] | None = None) -> None:
    """One rank of a torchrun-like launch: the environment torchrun sets, then distill."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), D3FAST_DIST_TIMEOUT="120")
    torch.set_num_threads(1)
    from d3fast.dist import World

    world = World.from_env("cpu")
    try:
        run_dir = (run_dirs or {}).get(rank, run_dir)  # another node's view of the filesystem
        run = Run.at(run_dir) if world.main else Run(run_dir)
        def on_step(m: dict) -> None:
            after = (die_after or {}).get(rank)
            if after == m["step"]:
                os._exit(9)  # a crash: no cleanup, no goodbye to the other ranks
            if after == -m["step"]:  # a Slurm stop: SIGTERM to the worker, then torchrun's copy of it
                os.kill(os.getpid(), signal.SIGTERM)
                os.kill(os.getpid(), signal.SIGTERM)

        distill(cfg_of(*overrides, *rank_overrides.get(rank, ())), run, progress=False, world=world, on_step=on_step)
        Path(out, f"rank{rank}.ok").write_text("ok")
    except Exception as e:  # reported to the test through a file: spawn only says "failed"
        from d3fast.dist import collective_failure

        # what the CLI prints (collective_failure), else the exception
        text = collective_failure(e) or f"{type(e).__name__}: {e}"
        Path(out, f"rank{rank}.err").write_text(f"{text}\n{traceback.format_exc()}")
    finally:
        _close_and_check_freed(world, Path(out, f"rank{rank}.err"))


def _close_and_check_freed(world, err: Path) -> None:
    """World.close(), then the process group must be gone: one that outlives it keeps gloo's
    worker threads into interpreter teardown, which aborts a finished rank now and then
    (d3fast/dist.py, World.from_env)."""
    import gc
    import weakref

    import torch.distributed as td

    group = weakref.ref(td.distributed_c10d._get_default_group()) if td.is_initialized() else None
    world.close()
    gc.collect()
    if group is not None and group() is not None:
        with err.open("a") as f:
            f.write(f"the process group outlived World.close() ({sys.getrefcount(group()) - 1} references)\n")


def launch(
    size: int, run_dir: Path, overrides: tuple[str, ...], out: Path, rank_overrides: dict | None = None,
    run_dirs: dict | None = None,
) -> dict[int, str]:
    """Run `size` ranks (`rank_overrides`: extra config per rank; `run_dirs`: the run
    directory as another rank sees it); {rank: error text} for those that failed."""
    out.mkdir(parents=True, exist_ok=True)
    mp.spawn(_rank, args=(size, _free_port(), str(run_dir), overrides, str(out), rank_overrides or {}, None,
                          run_dirs), nprocs=size, join=True)
    return {r: (out / f"rank{r}.err").read_text() for r in range(size) if (out / f"rank{r}.err").exists()}


def _one_process(path: Path, over: tuple[str, ...] = OVER) -> Run:
    """The reference: the same distillation in this process, on 1 thread as each rank is."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = Run.at(path)
        distill(cfg_of(*over), run, progress=False)
        return run
    finally:
        torch.set_num_threads(before)


@pytest.mark.slow
def test_two_ranks_of_one_student_equal_one_process_of_two(home, tmp_path):
    """Students split (one per rank) and classes split (five per rank in the MMD update, the
    median bandwidth taken over all of them): every tensor of the checkpoint after 3 steps."""
    over = (*OVER, "distill.mmd_scale=median")
    one = _one_process(tmp_path / "one", over)
    errors = launch(2, tmp_path / "two", over, tmp_path / "out")
    assert not errors, errors
    two = Run(tmp_path / "two")
    assert two.load_state()["step"] == STEPS
    assert_same_state(two.load_state(), one.load_state(), "2 ranks vs 1 process")
    # rank 0 alone wrote the run: one metrics line per step, with the terms of all ranks
    m1, m2 = one.read_metrics(), two.read_metrics()
    assert [m["step"] for m in m2] == [1, 2, 3]
    for a, b in zip(m1, m2, strict=True):
        for key in ("mtt", "kl", "mmd", "div", "loss", "student_lr"):
            assert b[key] == pytest.approx(a[key], rel=F64_TOL, abs=1e-300), key
    assert two.read_manifest()["world_size"] == 2


@pytest.mark.slow
def test_ranks_with_other_configs_or_an_unseen_run_directory_stop_together(home, tmp_path):
    # rank 1 gets another seed: both ranks stop at the config check, naming the rank
    errors = launch(2, tmp_path / "a", OVER, tmp_path / "out-a", rank_overrides={1: ("distill.seed=5",)})
    assert set(errors) == {0, 1} and all("ranks [1]" in e and "another config" in e for e in errors.values()), errors
    # K = 3 students cannot be split over 2 ranks
    errors = launch(2, tmp_path / "b", (*OVER[:1], "distill.students_per_step=3"), tmp_path / "out-b")
    assert set(errors) == {0, 1} and all("multiple of the 2 ranks" in e for e in errors.values()), errors
    # rank 1 does not see rank 0's run directory (no shared filesystem): both stop, rank 1 named
    errors = launch(2, tmp_path / "c", OVER, tmp_path / "out-c", run_dirs={1: str(tmp_path / "elsewhere")})
    assert set(errors) == {0, 1} and all("rank 1: cannot see rank 0's run directory" in e for e in errors.values()), errors


def _torchrun_cmd(*args: str, nproc: int = 2, extra: tuple[str, ...] = ()) -> list[str]:
    import sys

    sets = sum((["--set", o] for o in OVERRIDES_CLI), [])
    return [str(Path(sys.executable).parent / "torchrun"), *extra, "--nproc-per-node", str(nproc),
            "-m", "d3fast", "distill", "--dataset", "digits", "--no-auto", *sets, *args]


def _torchrun(home: Path, *args: str, nproc: int = 2, extra: tuple[str, ...] = (), timeout: int = 300):
    """`torchrun --nproc-per-node N -m d3fast distill ...` with the tiny digits settings, as a
    user runs it; returns the finished process."""
    import subprocess

    cmd = _torchrun_cmd(*args, nproc=nproc, extra=extra)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(home))


def _env(home: Path) -> dict[str, str]:
    # a restarted round must not read the last round's addresses from a shared store
    # (pytorch/pytorch#135712): docs/distributed.md says to set this with --max-restarts
    env = {**os.environ, "D3FAST_HOME": str(home), "OMP_NUM_THREADS": "1", "D3FAST_DIST_TIMEOUT": "60",
           "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    env.pop("D3FAST_DEBUG", None)
    return env


@pytest.mark.slow
def test_two_nodes_rendezvous_on_localhost_and_distill(home, tmp_path):
    """Two torchrun "nodes" (one process each) meeting through c10d rendezvous on 127.0.0.1."""
    import subprocess

    port, runs = _free_port(), tmp_path / "runs"
    procs = [subprocess.Popen(
        _torchrun_cmd("--steps", "2", "--students-per-step", "2", "--runs-dir", str(runs), nproc=1,
                      extra=("--nnodes", "2", "--node-rank", str(node), "--rdzv-backend", "c10d",
                             "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", tmp_path.name)),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(home)) for node in (0, 1)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[-2000:] for o in outs]
    (run_dir,) = [p for p in (runs / "digits").iterdir() if p.is_dir()]  # beside it: the name's lock
    run = Run(run_dir)
    assert [m["step"] for m in run.read_metrics()] == [1, 2] and run.read_manifest()["world_size"] == 2


OVERRIDES_CLI = [o for o in __import__("tests._utils", fromlist=["OVERRIDES"]).OVERRIDES
                 if not o.startswith(("device", "distill.steps"))]


@pytest.mark.slow
def test_torchrun_runs_one_distillation_and_a_restarted_job_resumes_it(home, tmp_path):
    runs = tmp_path / "runs"
    res = _torchrun(home, "--steps", "2", "--students-per-step", "2", "--runs-dir", str(runs), "--name", "job",
                    "--resume", "auto", extra=("--standalone",))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    made = [p for p in (runs / "digits").iterdir() if p.is_dir()]
    assert len(made) == 1  # rank 0 made the run; rank 1 used it
    run = Run(made[0])
    assert [m["step"] for m in run.read_metrics()] == [1, 2] and run.read_manifest()["world_size"] == 2
    assert res.stdout.count("reached step 2/2") == 1  # rank 0 reports
    # the same command again, as a scheduler's restart: --resume auto finds the run of that
    # name; one process continues what two began (the draws do not depend on the world size)
    res = _torchrun(home, "--steps", "3", "--students-per-step", "2", "--runs-dir", str(runs), "--name", "job",
                    "--resume", "auto", nproc=1, extra=("--standalone",))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert [p for p in (runs / "digits").iterdir() if p.is_dir()] == made and [m["step"] for m in run.read_metrics()] == [1, 2, 3]
    assert run.history()[-1]["world_size"] == 1  # the resume records the processes it ran on
    # a split that cannot work is refused on every rank before anything is made
    res = _torchrun(home, "--steps", "2", "--students-per-step", "3", "--runs-dir", str(tmp_path / "none"),
                    extra=("--standalone",))
    assert res.returncode != 0 and res.stderr.count("must be a multiple of the 2 ranks") == 2, res.stderr[-2000:]
    # no worker traceback (torchrun prints its own ChildFailedError), nothing made
    assert 'd3fast/' not in res.stderr.replace(str(home), "") and not (tmp_path / "none").exists()


def _pid_of_rank(rank: int, marker: str) -> int | None:
    """The pid of the torchrun worker with RANK=rank whose environment holds `marker`."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and marker.encode() in b"\0".join(env) and b"TORCHELASTIC_RUN_ID" in b"\0".join(env):
            return int(proc.name)
    return None


@pytest.mark.slow
def test_a_killed_rank_restarts_the_job_which_resumes_to_the_uninterrupted_state(home, tmp_path):
    import signal
    import threading
    import time

    runs, steps = tmp_path / "runs", 5
    # the uninterrupted run: one process, 2 students (the job's 2 ranks take one each)
    straight = _one_process(tmp_path / "straight", (f"distill.steps={steps}", "distill.students_per_step=2",
                                                    "distill.dtype=float64"))
    marker = f"D3FAST_TEST_MARK={tmp_path.name}"
    killed: list[int] = []

    def kill_rank_1_after_step_2() -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not killed:
            metrics = list(runs.glob("digits/*/metrics.jsonl"))
            if metrics and len(metrics[0].read_text().splitlines()) >= 2:
                pid = _pid_of_rank(1, marker)
                if pid:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
            time.sleep(0.05)

    watcher = threading.Thread(target=kill_rank_1_after_step_2, daemon=True)
    watcher.start()
    os.environ[marker.split("=")[0]] = marker.split("=")[1]
    try:
        res = _torchrun(home, "--steps", str(steps), "--students-per-step", "2", "--dtype", "float64", "--runs-dir",
                        str(runs), "--name", "job", "--resume", "auto", extra=("--standalone", "--max-restarts", "1"))
    finally:
        os.environ.pop(marker.split("=")[0])
    watcher.join(5)
    assert killed, "rank 1 was never seen running"
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    (run_dir,) = [p for p in (runs / "digits").iterdir() if p.is_dir()]  # beside it: the name's lock
    run = Run(run_dir)
    assert [m["step"] for m in run.read_metrics()] == list(range(1, steps + 1))
    assert sum(1 for r in run.history() if r.get("event") == "resume" or "resumed" in str(r)) >= 1
    assert run.load_state()["step"] == steps
    assert_same_state(run.load_state(), straight.load_state(), "restarted 2-rank job vs 1 process")


@pytest.mark.slow
def test_experts_sharded_over_two_ranks_equal_one_process(tmp_path, monkeypatch):
    """`torchrun -m d3fast experts`: rank r trains experts r, r + 2, ...; the files hold the
    same tensors bit for bit and the same metadata as a single process's (a trajectory depends
    only on (seed, index)), but for each epoch's wall time; safetensors orders the header's
    keys differently from write to write, so the raw bytes are not compared."""
    import subprocess
    import sys

    args = ["-m", "d3fast", "experts", "--dataset", "digits", "--num-experts", "3", "--epochs", "2",
            "--set", "net.width=8", "--device", "cpu"]
    homes = {}
    for label, launcher in (("one", [sys.executable]),
                            ("two", [str(Path(sys.executable).parent / "torchrun"), "--standalone",
                                     "--nproc-per-node", "2"])):
        homes[label] = tmp_path / label
        res = subprocess.run([*launcher, *args], capture_output=True, text=True, timeout=300,
                             env=_env(homes[label]))
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    files = {k: sorted(h.glob("experts/*/*/expert_*.safetensors")) for k, h in homes.items()}
    assert len(files["one"]) == len(files["two"]) == 3
    from d3fast.io import load_tensors

    def untimed(meta: dict) -> dict:
        return {**meta, "history": [{k: v for k, v in h.items() if k != "seconds"} for h in meta["history"]]}

    for a, b in zip(files["one"], files["two"], strict=True):
        (ta, ma), (tb, mb) = load_tensors(a, "expert"), load_tensors(b, "expert")
        assert a.name == b.name and ta.keys() == tb.keys()
        assert all(torch.equal(ta[k], tb[k]) for k in ta), a.name
        assert untimed(ma) == untimed(mb), a.name
    # the work was shared: rank 0 trained experts 0 and 2, rank 1 expert 1 (2 epochs each)
    from d3fast import ledger

    monkeypatch.setenv("D3FAST_HOME", str(homes["two"]))
    rows = [r for r in ledger.Ledger().records(dataset="digits") if r["phase"] == "experts"]
    assert sorted(r["steps"] for r in rows) == [2, 4], rows


@pytest.mark.slow
def test_a_rank_that_dies_stops_the_others_with_a_clear_error(home, tmp_path):
    """Without torchrun's agent to clean up: rank 1 crashes after step 2; rank 0 must not wait
    forever but fail within the collective timeout (60 s here) with an error naming the
    collective, and the last checkpoint (step 2) must stay usable."""
    import time

    ctx = mp.get_context("spawn")
    out = tmp_path / "out"
    out.mkdir()
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, 2, port, str(tmp_path / "run"), (*OVER[1:], "distill.steps=20"),
                                             str(out), {}, {1: 2})) for r in range(2)]
    t0 = time.monotonic()
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=180)
    waited = time.monotonic() - t0
    assert all(p.exitcode is not None for p in procs), "a rank is still hanging"
    assert procs[1].exitcode == 9 and waited < 150
    err = (out / "rank0.err").read_text()
    assert "another rank died or hangs" in err.splitlines()[0] and not (out / "rank0.ok").exists(), err[:500]
    d, step = Run(tmp_path / "run").load_distilled()
    assert step >= 2


def test_commands_that_run_in_one_process_refuse_torchrun(monkeypatch, tmp_path):
    from click.testing import CliRunner

    from d3fast.cli import cli

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    res = CliRunner().invoke(cli, ["evaluate", str(tmp_path)])
    assert res.exit_code == 2 and "rank 1: `d3fast evaluate` runs in one process" in res.output, res.output
    assert CliRunner().invoke(cli, ["doctor"]).exit_code == 0


@pytest.mark.slow
def test_a_slurm_stop_reaching_every_worker_twice_saves_a_checkpoint(home, tmp_path):
    """scancel signals every process of the step and torchrun forwards it again: a second
    SIGTERM must not abort a distributed worker. Rank 1 gets both after step 2 (between steps:
    the request is read with step 3's terms); both ranks stop after step 3 and rank 0 saves it."""
    ctx = mp.get_context("spawn")
    out = tmp_path / "out"
    out.mkdir()
    port = _free_port()
    over = (*OVER[1:], "distill.steps=20", "distill.checkpoint_every=100")
    procs = [ctx.Process(target=_rank, args=(r, 2, port, str(tmp_path / "run"), over, str(out), {}, {1: -2}))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=180)
    assert [p.exitcode for p in procs] == [0, 0] and not list(out.glob("*.err"))
    d, step = Run(tmp_path / "run").load_distilled()
    assert step == 3 and [m["step"] for m in Run(tmp_path / "run").read_metrics()] == [1, 2, 3]


@pytest.mark.slow
def test_torchrun_spreads_subtasks_over_the_ranks_and_rank_0_merges(home, tmp_path):
    """`torchrun --nproc-per-node 2 -m d3fast distill --subtasks 2`: rank r distills subtask r
    as one process would (its own run), then rank 0 merges both."""
    from d3fast.distilled import Merged

    runs = tmp_path / "runs"
    for i in range(2):  # the subtasks' experts, as `d3fast experts --subtasks 2` trains them
        run_experts(cfg_of("data.subtasks=2", f"data.subtask={i}"), progress=False)
    res = _torchrun(home, "--steps", "3", "--subtasks", "2", "--dtype", "float64", "--runs-dir", str(runs),
                    "--name", "job", extra=("--standalone",))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert res.stdout.count("merged 2 subtasks") == 1  # rank 0 merges and reports
    parts = [Run.named(runs, "digits", f"job-sub{i}of2") for i in range(2)]
    assert all(p is not None and p.read_manifest()["world_size"] == 1 for p in parts)
    merged, _ = Run(runs / "digits" / "job-merged").load_distilled()
    assert isinstance(merged, Merged) and merged.num_classes == 10
    # rank 1's subtask equals the same subtask distilled alone in this process
    alone = _one_process(tmp_path / "alone", ("data.subtasks=2", "data.subtask=1", "distill.steps=3",
                                              "distill.dtype=float64"))
    assert_same_state(parts[1].load_state(), alone.load_state(), "rank 1's subtask vs 1 process")  # type: ignore[union-attr]


def test_subtask_jobs_refuse_ranks_that_do_not_split_into_the_subtasks(home, tmp_path):
    """Refused before any collective or work: 3 ranks for 2 subtasks; groups of 2 ranks with 1 student."""
    from d3fast.dist import World
    from d3fast.errors import D3FastError
    from d3fast.recipes.distill import DistillJob, distill_subtasks

    with pytest.raises(D3FastError, match="3 processes for 2 subtasks: launch at most 2"):
        distill_subtasks(cfg_of("data.subtasks=2"), World(0, 3), DistillJob(str(tmp_path / "none"), no_auto=True))
    # what each group's check_split asks of its 2 ranks (the 1 student of a step cannot be split)
    with pytest.raises(D3FastError, match="must be a multiple of the 2 ranks"):
        World(0, 2).students(cfg_of("data.subtasks=2", "data.subtask=0").distill.students_per_step)
    assert not (tmp_path / "none").exists()


@pytest.mark.slow
def test_torchrun_groups_of_ranks_distill_one_subtask_each(home, tmp_path):
    """4 ranks, 2 subtasks: ranks 0-1 distill subtask 0 and ranks 2-3 subtask 1, each pair as
    one data-parallel run (1 student per rank), equal to one process with 2 students."""
    runs = tmp_path / "runs"
    for i in range(2):
        run_experts(cfg_of("data.subtasks=2", f"data.subtask={i}"), progress=False)
    res = _torchrun(home, "--steps", "3", "--subtasks", "2", "--students-per-step", "2", "--dtype", "float64",
                    "--runs-dir", str(runs), "--name", "pairs", nproc=4, extra=("--standalone",))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    parts = [Run.named(runs, "digits", f"pairs-sub{i}of2") for i in range(2)]
    assert all(p is not None and p.read_manifest()["world_size"] == 2 for p in parts)
    assert (runs / "digits" / "pairs-merged" / "merged.safetensors").exists()
    alone = _one_process(tmp_path / "alone", ("data.subtasks=2", "data.subtask=1", "distill.steps=3",
                                              "distill.students_per_step=2", "distill.dtype=float64"))
    assert_same_state(parts[1].load_state(), alone.load_state(), "ranks 2-3's subtask vs 1 process")  # type: ignore[union-attr]


@pytest.mark.parametrize("value", ["abc", "0", "-5", "nan", "inf", "1e30"])
def test_a_bad_collective_timeout_is_one_clear_error_before_any_rendezvous(monkeypatch, value):
    # issue 32: D3FAST_DIST_TIMEOUT=abc was "unexpected ValueError" from inside the group's setup
    from d3fast.dist import DEFAULT_TIMEOUT_S, World, timeout_s

    monkeypatch.delenv("D3FAST_DIST_TIMEOUT", raising=False)
    assert timeout_s() == DEFAULT_TIMEOUT_S
    monkeypatch.setenv("D3FAST_DIST_TIMEOUT", " 90 ")
    assert timeout_s() == 90.0
    monkeypatch.setenv("D3FAST_DIST_TIMEOUT", value)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")  # never reached: the value is refused first
    with pytest.raises(D3FastError, match=f"D3FAST_DIST_TIMEOUT must be seconds in \\(0, 1e9\\], such as 600; got '{value}'"):
        World.from_env("cpu")
    monkeypatch.setenv("WORLD_SIZE", "abc")  # was an "unexpected ValueError" before any of it
    with pytest.raises(D3FastError, match="torch.distributed environment incomplete"):
        World.from_env("cpu")
