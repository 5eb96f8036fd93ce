"""MTT replay buffers in and out (`d3fast experts import` / `export --format mtt`).

The oracle is independent of d3fast's network code: `mtt_forward` below is MTT's ConvNet
written from the paper's description (Cazenavette et al. 2022, after Gidaris & Komodakis
2018 and the DC papers: depth x [3x3 conv, instance norm, ReLU, 2x2 average pooling], then
a linear classifier; a 1-channel input's first conv padded by 3), and the buffers are built
here tensor by tensor in that network's parameter order, not from d3fast's layout."""

import argparse

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from d3fast.cli import cli
from d3fast.config import resolve_config
from d3fast.data.prepare import prepare
from d3fast.models import build_network
from d3fast.preflight import resolve_data_loader
from d3fast.recipes.experts import run_experts
from d3fast.training import load_flat_params
from d3fast.trajectories import experts_dir, read_expert
from tests._utils import make_cifar10, make_fashion_mnist

TINY = ["net.width=8", "experts.num_experts=2", "experts.epochs=2", "device=cpu", "data.zca=false",
        "distill.max_start_epoch=1", "distill.expert_epochs=1"]


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def mtt_shapes(channels, width, depth, classes, res, norm=True):
    """The parameter shapes of MTT's ConvNet in parameters() order."""
    side = 32 if res == 28 else res
    shapes, c = [], channels
    for _ in range(depth):
        shapes += [(width, c, 3, 3), (width,)] + ([(width,), (width,)] if norm else [])
        c, side = width, side // 2
    return shapes + [(classes, width * side * side), (classes,)]


def mtt_buffer(shapes, trajectories=2, epochs=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[[torch.randn(s, generator=g) * 0.3 for s in shapes] for _ in range(epochs + 1)]
            for _ in range(trajectories)]


def mtt_forward(params, x, depth):
    """MTT's ConvNet (instancenorm, ReLU, average pooling) as a function of its parameter list."""
    out, i = x, 0
    for d in range(depth):
        w, b, gw, gb = params[i:i + 4]
        i += 4
        pad = 3 if x.shape[1] == 1 and d == 0 else 1
        out = F.conv2d(out, w, b, padding=pad)
        out = F.group_norm(out, w.shape[0], gw, gb, eps=1e-5)  # one group per channel: instance norm
        out = F.avg_pool2d(F.relu(out), 2)
    return F.linear(out.flatten(1), params[i], params[i + 1])


@pytest.fixture
def cifar(tmp_path):
    make_cifar10(tmp_path / "src", per_batch=10)
    cfg = resolve_config("cifar10", overrides=TINY + [f"data.data_path={tmp_path / 'src'}"])
    resolve_data_loader(cfg)
    prepare(cfg, progress=False)
    return cfg


def save(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)
    return path


@pytest.mark.parametrize("dataset", ["cifar10", "fashion-mnist"])
def test_imported_experts_compute_mtts_convnet(tmp_path, dataset):
    if dataset == "cifar10":
        make_cifar10(tmp_path / "src", per_batch=10)
        channels, res = 3, 32
    else:
        make_fashion_mnist(tmp_path / "src")
        channels, res = 1, 28
    buf = mtt_buffer(mtt_shapes(channels, 8, 3, 10, res))
    path = save(tmp_path / "buffers" / "X" / "ConvNetW8" / "replay_buffer_0.pt", buf)
    r = run("experts", "import", path.parent, "--dataset", dataset, "--data-path", tmp_path / "src",
            *[a for o in TINY for a in ("--set", o)])
    assert r.exit_code == 0, r.output
    assert "imported 2 expert trajectories (3-3 epochs)" in r.output and "test accuracy" in r.output
    cfg = resolve_config(dataset, overrides=TINY)
    resolve_data_loader(cfg)
    files = sorted(experts_dir(cfg).glob("expert_*.safetensors"))
    assert [f.name for f in files] == ["expert_0000.safetensors", "expert_0001.safetensors"]
    net = build_network(cfg.net, channels, 10, res).double()
    x = torch.randn(5, channels, res, res, dtype=torch.float64)
    for t, f in enumerate(files):
        tensors, meta = read_expert(f)
        assert meta["complete"] and meta["epochs_done"] == 3 and meta["imported"]["trajectory"] == t
        for e in (0, 3):
            load_flat_params(net, tensors["trajectory"][e].double())
            want = mtt_forward([p.double() for p in buf[t][e]], x, depth=3)
            torch.testing.assert_close(net(x), want, rtol=1e-10, atol=1e-10)
    # the same buffer again adds nothing
    r = run("experts", "import", path, "--dataset", dataset, *[a for o in TINY for a in ("--set", o)])
    assert r.exit_code == 0 and "holds these 2 trajectories already" in r.output, r.output
    assert len(list(experts_dir(cfg).glob("expert_*.safetensors"))) == 2


def test_export_reimports_identical_and_imported_experts_are_never_extended(cifar, tmp_path, monkeypatch):
    run_experts(cifar, progress=False)
    r = run("experts", "export", "--format", "mtt", "--out", tmp_path / "out", "--dataset", "cifar10",
            "--per-file", 1, *[a for o in TINY for a in ("--set", o)])
    assert r.exit_code == 0, r.output
    target = tmp_path / "out" / "CIFAR10_NO_ZCA" / "ConvNetW8"
    assert sorted(p.name for p in target.iterdir()) == ["replay_buffer_0.pt", "replay_buffer_1.pt"]
    assert "--dataset CIFAR10 --model ConvNetW8 --buffer_path" in r.output
    originals = [read_expert(p)[0]["trajectory"] for p in sorted(experts_dir(cifar).glob("expert_*.safetensors"))]
    for n, orig in enumerate(originals):  # MTT's structure: list of trajectories of per-epoch parameter lists
        buf = torch.load(target / f"replay_buffer_{n}.pt", weights_only=True)
        assert len(buf) == 1 and len(buf[0]) == 3
        assert [tuple(p.shape) for p in buf[0][0]] == mtt_shapes(3, 8, 3, 10, 32)
        assert torch.equal(torch.stack([torch.cat([p.reshape(-1) for p in s]) for s in buf[0]]), orig)
    assert "has no model ConvNetW8" in r.output  # MTT's get_network knows W32..W1024
    # a second export never mixes into those files; a file where a folder goes is named
    r = run("experts", "export", "--out", tmp_path / "out", "--dataset", "cifar10", *[a for o in TINY for a in ("--set", o)])
    assert r.exit_code == 2 and "holds replay buffers already" in r.output
    (tmp_path / "blocked").mkdir()
    (tmp_path / "blocked" / "CIFAR10_NO_ZCA").write_text("x")
    r = run("experts", "export", "--out", tmp_path / "blocked", "--dataset", "cifar10", *[a for o in TINY for a in ("--set", o)])
    assert r.exit_code == 2 and "CIFAR10_NO_ZCA is a file, where the buffers' folder" in r.output, r.output
    # imported back where they came from: recognised by their rows, nothing written twice
    r = run("experts", "import", target, "--dataset", "cifar10", *[a for o in TINY for a in ("--set", o)])
    assert r.exit_code == 0 and "holds these 2 trajectories already" in r.output, r.output
    assert len(list(experts_dir(cifar).glob("expert_*.safetensors"))) == 2
    # into a fresh home: the same tensors come back
    monkeypatch.setenv("D3FAST_HOME", str(tmp_path / "home2"))
    prepare(cifar, progress=False)
    r = run("experts", "import", target, "--dataset", "cifar10", *[a for o in TINY for a in ("--set", o)])
    assert r.exit_code == 0, r.output
    back = [read_expert(p)[0]["trajectory"] for p in sorted(experts_dir(cifar).glob("expert_*.safetensors"))]
    assert len(back) == 2 and all(torch.equal(a, b) for a, b in zip(back, originals, strict=True))
    # training more experts (and more epochs) leaves the imported ones as they are
    r = run("experts", "--dataset", "cifar10", "--num-experts", 3, "--epochs", 4,
            *[a for o in TINY if not o.startswith("experts.") for a in ("--set", o)])
    assert r.exit_code == 0, r.output
    assert "was imported with 2 epochs; left as it is" in r.output
    now = sorted(experts_dir(cifar).glob("expert_*.safetensors"))
    assert len(now) == 3 and all(torch.equal(read_expert(p)[0]["trajectory"], b) for p, b in zip(now[:2], back, strict=True))
    assert read_expert(now[2])[1]["epochs_done"] == 4 and "imported" not in read_expert(now[2])[1]


def test_import_refusals_are_one_line(cifar, tmp_path):
    b = tmp_path / "b"
    good = mtt_shapes(3, 8, 3, 10, 32)
    cases = {
        "width": (mtt_buffer(mtt_shapes(3, 16, 3, 10, 32)),
                  "tensor 0 is [16, 3, 3, 3] where d3fast's network has features_net.0.weight [8, 3, 3, 3]"),
        "depth": (mtt_buffer(mtt_shapes(3, 8, 4, 10, 32)), "a ConvNet of depth 4, width 8"),
        "norm": (mtt_buffer(mtt_shapes(3, 8, 3, 10, 32, norm=False)), "no norm"),
        "channels": (mtt_buffer(mtt_shapes(1, 8, 3, 10, 32)), "1 input channel(s)"),
        "classes": (mtt_buffer(mtt_shapes(3, 8, 3, 100, 32)), "100 classes"),
        "ragged": ([[[torch.zeros(s) for s in good], [torch.zeros(s) for s in good[:-1]]]],
                   "trajectory 0, epoch 1 holds 13 tensors, trajectory 0's init 14"),
        "one-epoch": ([[[torch.zeros(s) for s in good]]], "not a list of the init and at least one epoch"),
        "dict": ({"a": torch.zeros(1)}, "is not a replay buffer"),
        "object": (argparse.Namespace(x=1), "weights_only=True"),
        "nan": ([[[torch.zeros(s) for s in good], [torch.full(s, float("nan")) for s in good]]],
                "trajectory 0 holds NaN or infinite values at epoch 1"),
        "float8": ([[[torch.zeros(s).to(torch.float8_e4m3fn) for s in good]] * 2], "one is torch.float8_e4m3fn"),
        "sparse": ([[[torch.zeros(s).to_sparse() for s in good]] * 2], "torch.sparse_coo"),
        # what the shapes cannot tell, the folders' names in MTT's layout do
        "ConvNetBN": (mtt_buffer(good), "MTT's ConvNet with norm batchnorm, the config's net.norm is instancenorm"),
        "CIFAR10/ConvNetW8": (mtt_buffer(good), "trained with ZCA whitening, the config's data.zca is false: "
                                                "--set data.zca=true"),
        "FashionMNIST/ConvNetW8": (mtt_buffer(good), "MTT's name for another dataset than cifar10"),
        "ConvNetAS": (mtt_buffer(good), "sigmoid activations"),
    }
    for name, (obj, text) in cases.items():
        path = save(b / name / "replay_buffer_0.pt", obj)
        r = run("experts", "import", path, "--dataset", "cifar10", *[a for o in TINY for a in ("--set", o)])
        assert r.exit_code == 2, (name, r.output)
        assert text in r.output and "Traceback" not in r.output, (name, r.output)
        assert len(r.output.strip().splitlines()) == 1, (name, r.output)
    # a torn file, an empty one; numbering MTT would not read; a folder a level above the buffers; a
    # missing path; batchnorm; nothing written by any
    torn = save(b / "torn" / "replay_buffer_0.pt", mtt_buffer(good))
    torn.write_bytes(torn.read_bytes()[:200])
    empty = save(b / "empty" / "replay_buffer_0.pt", [])
    empty.write_bytes(b"")
    for n in (0, 2):
        save(b / "gap" / f"replay_buffer_{n}.pt", mtt_buffer(good))
    save(b / "zeros" / "replay_buffer_00.pt", mtt_buffer(good))
    save(b / "up" / "CIFAR10" / "ConvNet" / "replay_buffer_0.pt", mtt_buffer(good))
    for args, text in [((torn,), "corrupt or truncated"), ((empty,), "corrupt or truncated"),
                       ((b / "gap",), "replay_buffer_2.pt after a gap (no replay_buffer_1.pt)"),
                       ((b / "zeros",), "holds no replay_buffer_<n>.pt files"),
                       ((b / "up",), f"found them in {b / 'up' / 'CIFAR10' / 'ConvNet'}"),
                       ((b / "nope",), "does not exist"),
                       ((b / "up" / "CIFAR10" / "ConvNet", "--set", "net.norm=batchnorm"), "running statistics")]:
        r = run("experts", "import", *args, "--dataset", "cifar10", *[a for o in TINY for a in ("--set", o)])
        assert r.exit_code == 2 and text in r.output and "Traceback" not in r.output, (args, r.output)
    assert not list(experts_dir(cifar).glob("expert_*.safetensors")) if experts_dir(cifar).is_dir() else True
    # options before the subcommand are refused rather than dropped
    r = run("experts", "--dataset", "cifar10", "import", b / "up")
    assert r.exit_code == 2 and "options go after `import`" in r.output


def test_notes_on_names_mtt_lacks():
    from d3fast.mtt_buffers import dataset_note, model_name, model_note

    assert model_name(128, 3, "instancenorm", "avgpooling") == "ConvNet" and model_note("ConvNet") is None
    assert model_name(128, 5, "instancenorm", "avgpooling") == "ConvNetD5" and model_note("ConvNetD5") is None
    assert model_name(64, 4, "batchnorm", "avgpooling") == "ConvNetD4W64BN" and "has no model" in model_note("ConvNetD4W64BN")
    assert dataset_note("cifar10") is None and "has no digits" in dataset_note("digits")


def test_export_needs_complete_experts(cifar, tmp_path):
    r = run("experts", "export", "--out", tmp_path / "o", "--dataset", "cifar10", *[a for o in TINY for a in ("--set", o)])
    assert r.exit_code == 2 and "no complete expert trajectory" in r.output and "d3fast experts --dataset cifar10" in r.output


def test_imported_buffer_distills_and_evaluates(cifar, tmp_path):
    """A buffer in MTT's layout (here: real trajectories of d3fast's experts, written as MTT
    does) imports into a fresh folder and `distill --no-auto` runs from it, then evaluates."""
    run_experts(cifar, progress=False)
    trajs = [read_expert(p)[0]["trajectory"] for p in sorted(experts_dir(cifar).glob("expert_*.safetensors"))]
    shapes = mtt_shapes(3, 8, 3, 10, 32)
    sizes = [torch.Size(s).numel() for s in shapes]
    buf = [[[p.reshape(s).clone() for p, s in zip(row.split(sizes), shapes, strict=True)] for row in t] for t in trajs]
    path = save(tmp_path / "mtt" / "replay_buffer_0.pt", buf)
    other = TINY + ["experts.seed=7"]  # another experts folder: only the imported trajectories are there
    r = run("experts", "import", path, "--dataset", "cifar10", *[a for o in other for a in ("--set", o)])
    assert r.exit_code == 0 and "imported 2 expert trajectories" in r.output, r.output
    r = run("distill", "--dataset", "cifar10", "--no-auto", "--runs-dir", tmp_path / "runs", "--name", "imp",
            "--evaluate", *[a for o in other + ["distill.steps=2", "distill.syn_steps=2", "distill.mmd_samples=4",
                                               "distill.decoder_width=16", "distill.compile=off", "eval.students=1",
                                               "eval.epochs=2"] for a in ("--set", o)])
    assert r.exit_code == 0, r.output
    assert "reached step 2/2" in r.output and "D3 (fresh samples)" in r.output and "test accuracy" in r.output
