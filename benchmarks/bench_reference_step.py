"""One whole distillation step (Algorithm 1 of D3: MTT update, then MMD update) of the D3
authors' code (github.com/sunnytqin/D3, `distill_distribution.py`) against one d3fast step at
the reference's configuration, on the same inputs; the ratio reported is reference s / d3fast s.

The reference is never copied into this repository: it runs from a checkout named by
$D3FAST_D3_REFERENCE (`git clone https://github.com/sunnytqin/D3`); without it the benchmark
skips. Its own `distill_distribution.py` runs unmodified, as `python distill_distribution.py
--flags` would (runpy, under its own argparse and defaults), with only what a CPU process
without its dataset, its expert buffers and its logger needs put around it:

* `utils.get_dataset` returns the benchmark's images (below) instead of downloading CIFAR-10,
  and `utils.get_eval_pool` returns no model, so the loop does not train evaluation networks
  (the reference evaluates only every `eval_it` steps; not part of a distillation step).
* `wandb` is a stand-in module whose `log` stamps the time: every iteration of the reference
  loop logs "Progress" at its start and "Grand_Loss" once both updates have stepped their
  optimisers. The reference's step is "Progress" -> "Grand_Loss" (the iteration also walks
  every element of the student's parameter vector in Python afterwards, `for _ in
  student_params: del _`, 0.8-1.2 s for ConvNet-3's 320k parameters: the whole iteration is
  reported as `ref_iteration_s` and `ratio_with_ref_iteration`, and left out of the ratio).
* CPU fix: decoder.py's TinyVAE.z draws its noise with `.cuda() if self._is_on_cuda else ...`,
  the method object rather than its result, which is always true, so every sample calls
  `.cuda()` (an error on a CPU build). Without CUDA, `_is_on_cuda` is made a property that
  returns what the method would (False): the noise is drawn on the CPU as the code intends.
* `torchvision` and `einops`, when not installed, are stand-in modules: the step calls neither
  (image grids, datasets and the ViT only).

The configuration (a previous measurement's): CIFAR-10 shapes (10 classes, 3x32x32), 1 prior
per class, ConvNet-3 width 128 instance norm, the reference's 32 px decoder (`--decoder_size
small`: TinyVAE, kernel_num 128, z_dim 64; d3fast `distill.decoder=tiny`, width 128: the same
layers), batch_syn 10, MMD on 30 samples per class, syn_steps 10 and 20, no DSA inside the
unroll (the reference's MTT loop has none: its `--dsa` only switches decoder sampling on;
d3fast `distill.augment_unroll=false`), the reference's learned lr parametrisation (d3fast
`distill.lr_param=leaky_relu`, SGD momentum 0.5; lr_lr 1e-7, not the reference's 1e-5, on
both: at 1e-5 the first step's gradient on these random inputs sends alpha below zero, and
d3fast stops a run whose student lr is not positive), no KL term (the reference has
none: `distill.kl_weight=0`), MMD bandwidths 1..16 on raw features summed over classes (both
defaults). Same inputs on both sides: 300 random uint8 images (30 per class, seeded; the
reference gets them normalised with the same mean/std, d3fast normalises the uint8 copy per
step), so each side's MMD draw of 30 per class is the same set; one expert trajectory
[start, target, target] (ConvNet-3 init, seed 0, and a seeded random step from it) as the
reference's replay buffer and as a d3fast expert file; max_start_epoch 1 and expert_epochs 1
make both start at the same vector and match the same target, and the MMD feature network
takes the last snapshot on both (`--mmd_param final`). Learning rates: latents and decoder
3e-4 on both (d3fast's CIFAR-10 preset; the reference's argparse defaults are 1000 and 1e-2,
its clean_script.md passes 3e-4 to 5e-3 for the latents; a rate changes no cost), lr_teacher
0.01.

The d3fast step is the loop's (d3fast/recipes/distill.py): draw_students, mtt_update (unroll
`distill.unroll=auto`), mmd_update, the step's checks read back; built as `_build` builds it
(no run directory, metrics file or ledger). `compile`: the student's step, the decoder and the
MMD features through torch.compile (`distill.compile=on`), compiled by the warm-up step
(`d3fast_warmup_s`: ~2 min with a cold Inductor cache on the 2-core VM, ~10 s once its on-disk
cache holds the graphs; `d3fast_graphs_timed` counts graphs built after the warm-up: 0).

Measurement: 1 thread per process (torch.set_num_threads(1); OMP/MKL too) to cut noise on a
shared machine; fresh processes interleaved reference, d3fast, reference, d3fast, ...
($D3FAST_REF_PAIRS pairs, default 2); in each process 1 warm-up step then the median of 3
steps; a side's time is the median of its processes'. Reported with the CPU model, the load
average before and after, each process's peak RSS (VmHWM: imports, inputs and compiling
included), and the last step's losses of both sides as a sanity check.

Known differences, by design of d3fast (not configuration): the reference builds a fresh
random student network every step (`get_network`, part of its step), computes the real
images' features with a graph it then detaches, and decodes the MMD samples as 30 decoder
calls of 10 latents (its BatchNorm normalises over 10 samples per call); d3fast decodes the
300 in one call (BatchNorm over all 300), embeds the features through d3fast/embed.py (one
pass here: the automatic chunk, 480 samples of 2.1 MiB under its 1 GiB CPU cap, covers the
300), and checks every loss and the state for NaN each step. d3fast's decoder maps its
tanh to the normalised pixel range (one affine op more), so the two sides' losses differ in
value (both are reported). The d3fast side leaves out its loop's per-step bookkeeping (the
metrics line, progress bar, health watch: milliseconds), as the reference's time leaves out
its wandb calls.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REFERENCE = os.environ.get("D3FAST_D3_REFERENCE")
ROOT = Path(__file__).resolve().parent.parent
PAIRS = int(os.environ.get("D3FAST_REF_PAIRS", "2"))
THREADS = 1
WARMUP, STEPS = 1, 3
CLASSES, PER_CLASS, RES = 10, 30, 32
MEAN, STD = [0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010]  # CIFAR-10's
LR_LATENT = LR_DECODE = 3e-4
# lr_lr: the reference's 1e-5 sends alpha below zero within a step on these random inputs (its
# MTT gradient is ~1e3), where d3fast stops the run (non-positive student lr); 1e-7 keeps both
# sides' lr positive and costs the same (one SGD step of a scalar)
LR_LR, LR_TEACHER = 1e-7, 0.01
TARGET = 2.0
_MARK = "BENCH_RESULT "

if not REFERENCE:
    pytestmark = pytest.mark.skip(reason="set D3FAST_D3_REFERENCE to a checkout of the D3 authors' code: "
                                  "git clone https://github.com/sunnytqin/D3")
elif not (Path(REFERENCE) / "distill_distribution.py").is_file():
    pytestmark = pytest.mark.skip(reason=f"D3FAST_D3_REFERENCE={REFERENCE} holds no distill_distribution.py "
                                  "(git clone https://github.com/sunnytqin/D3)")

# ---- the reference's side: its distill_distribution.py as __main__, timed through wandb.log
_REF_DRIVER = r"""
import importlib.util, json, os, runpy, statistics, sys, time, types
spec = json.loads(sys.argv[1])
import torch
torch.set_num_threads(spec["threads"])
ref = spec["reference"]
sys.path.insert(0, ref)

class _Absent(types.ModuleType):
    # a module this process lacks and the step never calls (image grids, datasets, ViT)
    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        def absent(*a, **k):
            raise RuntimeError(f"{self.__name__}.{attr}: not installed (stand-in of bench_reference_step)")
        return absent

for top, subs in (("torchvision", ("utils", "datasets", "transforms")), ("einops", ("layers", "layers.torch"))):
    if importlib.util.find_spec(top) is None:
        sys.modules[top] = _Absent(top)
        for sub in subs:
            name = f"{top}.{sub}"
            sys.modules[name] = _Absent(name)
            parent, leaf = name.rsplit(".", 1)
            setattr(sys.modules[parent], leaf, sys.modules[name])

# wandb: the reference logs "Progress" as an iteration starts and "Grand_Loss" after both
# updates; the stand-in stamps them (its runs are mode="disabled" anyway)
events, losses = [], {}
wandb = types.ModuleType("wandb")
wandb.config = types.SimpleNamespace(_items={})
wandb.run = types.SimpleNamespace(name="bench")
def _init(config=None, **kw):
    wandb.config._items = dict(vars(config))
def _log(d, step=None):
    now = time.perf_counter()
    for k, v in d.items():
        if k in ("Progress", "Grand_Loss"):
            events.append((k, now))
        if k in ("MTT_Loss", "MMD_Loss"):
            losses[k] = float(v)
wandb.init, wandb.log = _init, _log
wandb.finish = lambda *a, **k: events.append(("finish", time.perf_counter()))
wandb.Histogram = wandb.Image = lambda *a, **k: None
sys.modules["wandb"] = wandb

import decoder, utils
if not torch.cuda.is_available():
    # CPU fix (see the benchmark's docstring): TinyVAE.z tests `self._is_on_cuda`, a bound
    # method (always true), and calls .cuda(); as a property it is the bool the code meant
    decoder.TinyVAE._is_on_cuda = property(lambda self: next(self.parameters()).is_cuda)

inputs = torch.load(spec["inputs"])
mean, std = inputs["mean"], inputs["std"]
images = (inputs["images"].float() / 255 - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
dst_train = [(images[i], int(inputs["labels"][i])) for i in range(len(images))]
n_cls = int(inputs["labels"].max()) + 1
identity = {c: c for c in range(n_cls)}

def get_dataset(*args, **kwargs):
    # channel, im_size, num_classes, class_names, mean, std, dst_train, dst_test, testloader,
    # loader_train_dict, class_map, class_map_inv
    return (images.shape[1], tuple(images.shape[-2:]), n_cls, [str(c) for c in range(n_cls)], mean.tolist(),
            std.tolist(), dst_train, None, None, None, identity, identity)

utils.get_dataset = get_dataset
utils.get_eval_pool = lambda *a, **k: []  # no evaluation networks inside the timed loop
os.chdir(spec["workdir"])
sys.argv = ["distill_distribution.py", *spec["argv"]]
runpy.run_path(os.path.join(ref, "distill_distribution.py"), run_name="__main__")

starts = [t for k, t in events if k == "Progress"]
ends = [t for k, t in events if k == "Grand_Loss"]
finish = [t for k, t in events if k == "finish"][-1]
body = [e - s for s, e in zip(starts, ends)]
whole = [b - a for a, b in zip(starts, starts[1:] + [finish])]
w = spec["warmup"]
with open("/proc/self/status") as f:
    peak = next(int(l.split()[1]) for l in f if l.startswith("VmHWM")) / 1024
print("BENCH_RESULT " + json.dumps({
    "step_s": statistics.median(body[w:]), "steps_s": body[w:], "warmup_s": body[:w],
    "iteration_s": statistics.median(whole[w:]), "peak_rss_mib": round(peak, 1),
    "threads": torch.get_num_threads(), "losses": losses}))
"""

# ---- d3fast's side: the loop's step (d3fast/recipes/distill.py), built as `_build` builds it
_D3FAST_DRIVER = r"""
import copy, json, statistics, sys, time
from contextlib import nullcontext
from pathlib import Path
spec = json.loads(sys.argv[1])
import torch
torch.set_num_threads(spec["threads"])
from d3fast import compiling
from d3fast.compiling import Compiled
from d3fast.config import resolve_config
from d3fast.data.loader import DeviceDataset
from d3fast.dist import World
from d3fast.distilled import init_distilled
from d3fast.mmd_update import mmd_update
from d3fast.models import build_network
from d3fast.recipes.distill import compiled, draw_students, mtt_update
from d3fast.state import StepChecks, TrainState
from d3fast.trajectories import ExpertBank, need_epochs
from d3fast.unroll import Student, UnrollSpec

cfg = resolve_config("cifar10", overrides=spec["overrides"])
dcfg, device, world = cfg.distill, torch.device("cpu"), World()
inputs = torch.load(spec["inputs"])
n_cls = int(inputs["labels"].max()) + 1
train = DeviceDataset(images=inputs["images"], labels=inputs["labels"], mean=inputs["mean"], std=inputs["std"],
                      classes=[str(c) for c in range(n_cls)])
bank = ExpertBank(Path(spec["experts"]), need_epochs(cfg))
torch.manual_seed(dcfg.seed)
res, channels = train.resolution, train.channels
student = build_network(cfg.net, channels, n_cls, res).to(device)
meta = {"resolution": res, "channels": channels, "mean": train.mean.tolist(), "std": train.std.tolist(),
        "z_dim": dcfg.z_dim, "decoder": dcfg.decoder, "decoder_width": dcfg.decoder_width,
        "decoder_linear": dcfg.decoder_linear, "lr_param": dcfg.lr_param}
d = init_distilled(n_cls, dcfg.ppc, train.classes, meta, dcfg.lr_teacher, device, dcfg.seed)
state = TrainState.create(d, dcfg, device)
amp = nullcontext  # distill._amp on a CPU
fast = compiled(dcfg, device)
if fast:
    d.compile_decoder()
assert not dcfg.augment_unroll  # the reference's unroll has no DSA
unroll_spec = UnrollSpec(Student(student, compiled=fast), dcfg.syn_steps, dcfg.batch_syn, None, amp, None,
                         dcfg.unroll_budget)
feature_net = copy.deepcopy(student).requires_grad_(False)
features = feature_net.features
if fast:
    features = Compiled(features, "the MMD features")

def step():
    students = draw_students(bank, dcfg, state.g_host, device, None)
    checks = StepChecks(world)
    mtt_update(state, unroll_spec, students, dcfg, checks, world)
    mmd_update(state, feature_net, students.feat_params, train, dcfg, amp, checks, world, features)
    checks.raise_flag(False)
    values = checks.read(student_lr=state.distilled.lr())
    state.step += 1
    return values

def graphs():  # torch.compile graphs built so far in this process
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])

times, w = [], spec["warmup"]
for i in range(w + spec["steps"]):
    if i == w:
        warm_graphs = graphs()
    t0 = time.perf_counter()
    values = step()
    times.append(time.perf_counter() - t0)
with open("/proc/self/status") as f:
    peak = next(int(l.split()[1]) for l in f if l.startswith("VmHWM")) / 1024
print("BENCH_RESULT " + json.dumps({
    "step_s": statistics.median(times[w:]), "steps_s": times[w:], "warmup_s": times[:w],
    "peak_rss_mib": round(peak, 1), "threads": torch.get_num_threads(), "compiled": fast,
    "compile_failed": list(getattr(compiling, "FAILED", [])), "kept_naive": unroll_spec.kept,
    "graphs_warmup": warm_graphs, "graphs_timed": graphs() - warm_graphs,
    "losses": {k: values[k] for k in ("mtt", "mmd") if k in values}}))
"""


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        import platform

        return platform.processor() or "unknown"


def _env(d3fast: bool) -> dict[str, str]:
    n = str(THREADS)
    env = {**os.environ, "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n}
    if d3fast:  # this working tree's d3fast; the reference's process does not import it
        env["PYTHONPATH"] = str(ROOT)
    return env


def _run(driver: str, spec: dict, cwd: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", driver, json.dumps(spec)], capture_output=True, text=True,
                         cwd=cwd, env=_env(driver is _D3FAST_DRIVER), timeout=1800)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith(_MARK)]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"driver failed (rc {out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}")
    return json.loads(lines[-1][len(_MARK):])


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The shared inputs: images, labels, mean/std, and one expert trajectory written as the
    reference's replay buffer and as a d3fast expert file."""
    from d3fast.config import resolve_config
    from d3fast.models import build_network
    from d3fast.trajectories import write_expert

    folder = tmp_path_factory.mktemp("reference_step")
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (CLASSES * PER_CLASS, 3, RES, RES), generator=g, dtype=torch.uint8)
    labels = torch.arange(CLASSES).repeat_interleave(PER_CLASS)
    torch.manual_seed(0)
    net = build_network(resolve_config("cifar10").net, 3, CLASSES, RES)
    params = [p.detach().clone() for p in net.parameters()]
    start = torch.cat([p.reshape(-1) for p in params])
    target = start + torch.randn(start.numel(), generator=g) * (0.01 * start.abs().mean())
    torch.save({"images": images, "labels": labels, "mean": torch.tensor(MEAN), "std": torch.tensor(STD)},
               folder / "inputs.pt")
    # the reference: <buffer_path>/CIFAR10_NO_ZCA/ConvNet/replay_buffer_0.pt, a list of
    # trajectories, each a list of epochs, each the network's parameter tensors in order
    buffers = folder / "buffers"
    (buffers / "CIFAR10_NO_ZCA" / "ConvNet").mkdir(parents=True)
    shapes = [p.shape for p in params]

    def as_params(flat: torch.Tensor) -> list[torch.Tensor]:
        return [t.view(s).clone() for t, s in zip(flat.split([s.numel() for s in shapes]), shapes, strict=True)]

    torch.save([[as_params(start), as_params(target), as_params(target)]],
               buffers / "CIFAR10_NO_ZCA" / "ConvNet" / "replay_buffer_0.pt")
    experts = folder / "experts"
    write_expert(experts / "expert_0000.safetensors", torch.stack([start, target, target]), index=0, seed=0,
                 complete=True, test_acc=None, history=[], param_layout=[], snapshots_per_epoch=1, stand_in=True)
    (folder / "work").mkdir()
    return folder


def _ref_spec(folder: Path, syn_steps: int) -> dict:
    argv = [
        "--dataset=CIFAR10", "--model=ConvNet", "--lpc=1", "--batch_syn=10", f"--syn_steps={syn_steps}",
        "--decoder_size=small", "--kernel_num=128", "--z_dim=64", f"--mmd_samples={PER_CLASS}", "--mmd_param=final",
        "--expert_epochs=1", "--max_start_epoch=1", f"--lr_teacher={LR_TEACHER}", f"--lr_lr={LR_LR}",
        f"--lr_latent={LR_LATENT}", f"--lr_decode={LR_DECODE}",
        # iterations checkpoint_it .. checkpoint_it + Iteration: warm-up + timed steps; starting
        # at 1 skips the save-at-it%1000 block (it calls .cuda()), eval_it past the run any eval
        f"--Iteration={WARMUP + STEPS - 1}", "--checkpoint_it=1", "--eval_it=1000000", "--load_all",
        f"--buffer_path={folder / 'buffers'}", f"--data_path={folder / 'data'}",
    ]
    return {"reference": str(Path(REFERENCE).resolve()), "inputs": str(folder / "inputs.pt"), "argv": argv,
            "workdir": str(folder / "work"), "threads": THREADS, "warmup": WARMUP}


def _d3fast_spec(folder: Path, syn_steps: int, compile_: bool) -> dict:
    overrides = [
        "device=cpu", "data.zca=false", f"distill.syn_steps={syn_steps}", "distill.batch_syn=10", "distill.ppc=1",
        f"distill.mmd_samples={PER_CLASS}", "distill.decoder=tiny", "distill.decoder_width=128", "distill.z_dim=64",
        "distill.augment_unroll=false", "distill.expert_epochs=1", "distill.max_start_epoch=1",
        "distill.mmd_param=final", "distill.kl_weight=0", "distill.lr_param=leaky_relu",
        f"distill.lr_teacher={LR_TEACHER}", f"distill.lr_lr={LR_LR}", f"distill.lr_latent={LR_LATENT}",
        f"distill.lr_decode={LR_DECODE}", "distill.unroll=auto", f"distill.compile={'on' if compile_ else 'off'}",
    ]
    return {"inputs": str(folder / "inputs.pt"), "experts": str(folder / "experts"), "overrides": overrides,
            "threads": THREADS, "warmup": WARMUP, "steps": STEPS}


@pytest.mark.parametrize("compile_", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("syn_steps", [10, 20])
def test_reference_step(benchmark, provenance, inputs, syn_steps, compile_):
    mode = "compiled" if compile_ else "eager"
    load_before = [round(v, 2) for v in os.getloadavg()]
    ref_runs: list[dict] = []
    own_runs: list[dict] = []

    def once():
        for _ in range(PAIRS):  # interleaved: reference, d3fast, reference, d3fast, ...
            ref_runs.append(_run(_REF_DRIVER, _ref_spec(inputs, syn_steps), inputs / "work"))
            own_runs.append(_run(_D3FAST_DRIVER, _d3fast_spec(inputs, syn_steps, compile_), inputs / "work"))

    benchmark.pedantic(once, rounds=1, iterations=1)
    ref_s = statistics.median(r["step_s"] for r in ref_runs)
    ref_iter_s = statistics.median(r["iteration_s"] for r in ref_runs)
    own_s = statistics.median(r["step_s"] for r in own_runs)
    label = f"reference/d3fast {mode} step"
    benchmark.extra_info["ratios"] = {label: round(ref_s / own_s, 2)}
    benchmark.extra_info["targets"] = {label: TARGET}
    benchmark.extra_info.update(
        syn_steps=syn_steps, d3fast_mode=mode, ref_s=round(ref_s, 4), d3fast_s=round(own_s, 4),
        ratio=round(ref_s / own_s, 3), ref_iteration_s=round(ref_iter_s, 4),
        ratio_with_ref_iteration=round(ref_iter_s / own_s, 3),
        ref_process_s=[round(r["step_s"], 4) for r in ref_runs],
        d3fast_process_s=[round(r["step_s"], 4) for r in own_runs],
        ref_steps_s=[[round(t, 4) for t in r["steps_s"]] for r in ref_runs],
        d3fast_steps_s=[[round(t, 4) for t in r["steps_s"]] for r in own_runs],
        ref_warmup_s=[round(r["warmup_s"][0], 2) for r in ref_runs],
        d3fast_warmup_s=[round(r["warmup_s"][0], 2) for r in own_runs],
        ref_peak_rss_mib=[r["peak_rss_mib"] for r in ref_runs],
        d3fast_peak_rss_mib=[r["peak_rss_mib"] for r in own_runs],
        ref_losses=ref_runs[-1]["losses"], d3fast_losses=own_runs[-1]["losses"],
        d3fast_kept_naive_steps=own_runs[-1]["kept_naive"], compile_failed=own_runs[-1]["compile_failed"],
        # torch.compile graphs built by the warm-up, and (should be 0) during the timed steps
        d3fast_graphs_warmup=[r["graphs_warmup"] for r in own_runs],
        d3fast_graphs_timed=[r["graphs_timed"] for r in own_runs],
        cpu_model=_cpu_model(), threads=THREADS, processes_per_side=PAIRS, warmup_steps=WARMUP, timed_steps=STEPS,
        load_average_before=load_before, load_average=[round(v, 2) for v in os.getloadavg()],
        config={"classes": CLASSES, "ppc": 1, "image": [3, RES, RES], "net": "ConvNet-3 w128 instancenorm",
                "decoder": "reference TinyVAE k128 z64 / d3fast tiny w128 z64", "batch_syn": 10,
                "mmd_samples": PER_CLASS, "real_images_per_class": PER_CLASS, "dsa_in_unroll": False,
                "unroll": "auto", "lr_param": "leaky_relu", "kl_weight": 0, "mmd_param": "final"},
    )
    assert not own_runs[-1]["compile_failed"], f"d3fast compile fell back to eager: {own_runs[-1]['compile_failed']}"
