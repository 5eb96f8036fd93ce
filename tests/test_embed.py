"""The chunked two-pass MMD update (d3fast/embed.py): the same loss and the same gradients
for latents and decoder as one graph through every sample, for chunk sizes that do and do
not divide the sample count, one class, and uneven class sizes."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from d3fast import embed as embed_mod
from d3fast import kernels
from d3fast.config import resolve_config
from d3fast.data.loader import DeviceDataset
from d3fast.distilled import init_distilled
from d3fast.embed import activation_bytes, auto_chunk, embed
from d3fast.mmd_update import mmd_terms
from d3fast.models import build_network
from tests._utils import F64_GRAD_TOL, assert_grads_match, assert_within_floor, rel_err

META = {"resolution": 16, "channels": 3, "mean": [0.4, 0.5, 0.6], "std": [0.2, 0.25, 0.3], "z_dim": 8,
        "decoder": "paper", "decoder_width": 16}


def _setup(n_cls: int, dtype: torch.dtype, norm: str = "instancenorm"):
    d = init_distilled(n_cls, 1, [str(i) for i in range(n_cls)], META, 0.01, torch.device("cpu"), seed=3, dtype=dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        net = build_network("convnet", 3, n_cls, 16, width=8, depth=2, norm=norm).requires_grad_(False)
    return d, net.to(dtype)


def _grads(d, net, counts: list[int], chunk: int, exact: bool):
    """MMD^2 summed over classes between decoded samples (counts[c] for class c) and fixed
    'real' features, differentiated w.r.t. latents and every decoder tensor."""
    idx = torch.cat([torch.full((k,), c) for c, k in enumerate(counts)])
    g = torch.Generator().manual_seed(11)
    dec = copy.deepcopy(d.decoder)
    x = dec(d.sample_latents(idx, g))
    f = embed(net, x, chunk, exact_graph=exact)
    if not exact and 0 < chunk < len(x):
        assert f.grad_fn.name() == "_ChunkedEmbedBackward"  # the two-pass path ran
    # class c's rows into a padded [C, max, D] block; padding rows are NaN and get no gradient
    C, top = len(counts), max(counts)
    padded = f.new_full((C, top, f.shape[-1]), float("nan"))
    rows = torch.cat([torch.arange(k) for k in counts])
    padded = padded.index_put((idx, rows), f)
    gy = torch.Generator().manual_seed(5)
    y = (torch.randn(C, 6, f.shape[-1], generator=gy) * 0.3).to(f.dtype) + f.detach().mean()  # float32 draws: one set of values
    loss = kernels.mmd2(padded, y, (0.5, 1.0, 2.0), x_lengths=torch.tensor(counts)).sum()
    params = [d.latents, *dec.parameters()]
    return loss.detach(), torch.autograd.grad(loss, params), [b.clone() for b in dec.buffers()]


def _compare(counts, chunks, dtype):
    """Chunked against one graph: float64 within F64_GRAD_TOL (measured: 0 apart, the same
    per-sample operations); float32 against the float64 one-graph result, at most 8x the
    one-graph float32 run's own error (a floor measured here: tests/test_unroll.py F32_FACTOR).
    A gradient whose reference is ~0 (a conv bias feeding train-mode BatchNorm, which removes
    per-channel constants) is measured against 1e-3 of the whole gradient (`grad_errors`)."""
    d, net = _setup(len(counts), dtype)
    ref_loss, ref, ref_bufs = _grads(d, net, counts, 0, exact=True)
    if dtype == torch.float32:
        truth_loss, truth, _ = _grads(*_setup(len(counts), torch.float64), counts, 0, exact=True)
    for chunk in chunks:
        loss, grads, bufs = _grads(d, net, counts, chunk, exact=False)
        names = [f"chunk {chunk} tensor {k}" for k in range(len(ref))]
        if dtype == torch.float64:
            assert abs(float(loss - ref_loss)) <= F64_GRAD_TOL * abs(float(ref_loss))
            assert_grads_match(names, grads, ref, F64_GRAD_TOL)
        else:
            assert_within_floor(["loss"], [loss], [ref_loss], [truth_loss], 8)
            assert_within_floor(names, grads, ref, truth, 8)
        total = torch.cat([t.flatten() for t in ref]).norm()
        assert ref[0].norm() > 1e-3 * total  # the latents' gradient is a real one
        for a, b in zip(bufs, ref_bufs, strict=True):  # decoder BN ran once, on the whole set
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("counts", [[5, 5, 5], [5, 3, 4], [7]], ids=["even", "uneven", "one-class"])
def test_two_pass_equals_one_graph_float64(counts):
    # 1 sample per chunk, chunks that do not divide the count, and one short of all
    _compare(counts, [1, 2, 4, sum(counts) - 1], torch.float64)


def test_two_pass_equals_one_graph_float32():
    _compare([6, 4, 5], [1, 4, 7], torch.float32)


def chunked_and_one_graph(device: str | torch.device = "cpu", samples: int = 5, dtype: torch.dtype = torch.float64):
    """The distill loop's MMD term and its gradients to latents and decoder, chunked
    (mmd_chunk=4 over 3 classes x `samples`) and through one graph, on `device`, in `dtype`
    (the same values in either: float32 draws cast up)."""
    cfg = resolve_config("digits", overrides=[f"distill.mmd_samples={samples}"])
    out = []
    for over in ({"mmd_chunk": 4}, {"mmd_exact_graph": True}):
        dcfg = copy.deepcopy(cfg.distill)
        for k, v in over.items():
            setattr(dcfg, k, v)
        d, net = _setup(3, dtype)
        d.decoder.to(device)
        d.latents = d.latents.detach().to(device).requires_grad_(True)
        net.to(device)
        images = torch.randint(0, 256, (30, 3, 16, 16), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
        train = DeviceDataset(images.to(device), torch.arange(3).repeat_interleave(10).to(device),
                              torch.tensor(META["mean"], device=device), torch.tensor(META["std"], device=device),
                              ["a", "b", "c"])
        mmd, _ = mmd_terms(net, d, train, dcfg, torch.Generator(device=device).manual_seed(0))
        out.append((mmd.detach(), torch.autograd.grad(mmd, [d.latents, *d.decoder.parameters()])))
    return out


def assert_chunked_equals_one_graph(device: str | torch.device = "cpu", samples: int = 5) -> None:
    """float64: chunked and one-graph within F64_GRAD_TOL (measured: 0 apart on the CPU, the same
    per-sample operations). float32: against the float64 one-graph result, the chunked
    error at most 8x the one-graph float32 run's worst (a floor measured here, on this
    machine's rounding), loss and every gradient."""
    (m1, g1), (m2, g2) = chunked_and_one_graph(device, samples, torch.float64)
    assert rel_err(m1, m2) < F64_GRAD_TOL
    assert_grads_match(range(len(g2)), g1, g2, F64_GRAD_TOL)
    (c1, h1), (c2, h2) = chunked_and_one_graph(device, samples, torch.float32)
    # measured on the CPU: chunked float32 equals one-graph float32 to the bit (ratio 1); 8 as
    # for the unroll (tests/test_unroll.py F32_FACTOR): a GPU may pick other kernels per chunk
    assert_within_floor(["loss"], [c1], [c2], [m2], 8)
    assert_within_floor(range(len(g2)), h1, h2, g2, 8)


def test_mmd_terms_chunked_equals_exact_graph():
    """The distill loop's MMD term: chunked (mmd_chunk=4 over 3 x 5 samples) vs one graph."""
    assert_chunked_equals_one_graph()


def test_batch_dependent_networks_take_one_graph():
    d, net = _setup(2, torch.float32, norm="batchnorm")
    x = d.decoder(d.sample_latents(torch.tensor([0, 0, 1, 1]), None))
    f = embed(net, x, chunk=1)
    assert f.grad_fn is not None and f.grad_fn.name() != "_ChunkedEmbedBackward"
    net.eval()  # running statistics: per-sample again, so chunking is exact
    assert embed(net, x, chunk=1).grad_fn.name() == "_ChunkedEmbedBackward"


def test_no_grad_inputs_are_embedded_in_chunks_without_a_graph():
    _, net = _setup(2, torch.float64)
    x = torch.randn(9, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        whole = net.features(x)
    # float64, the same per-sample operations (measured: equal to the bit)
    torch.testing.assert_close(embed(net, x, chunk=4), whole, rtol=1e-12, atol=1e-12)
    assert embed(net, x, chunk=4).grad_fn is None


def test_activation_bytes_and_auto_chunk(monkeypatch):
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2))
    x = torch.randn(5, 3, 8, 8)
    # conv 4x8x8 + relu 4x8x8 + pool 4x4x4 = 576 floats per sample, whatever the batch
    assert activation_bytes(net, net, x) == 576 * 4
    monkeypatch.setattr(embed_mod, "free_memory", lambda device: 576 * 4 * 40)
    assert auto_chunk(net, net, x) == 10  # a quarter of the free memory
    monkeypatch.setattr(embed_mod, "free_memory", lambda device: 1 << 50)
    assert auto_chunk(net, net, x) == (1 << 30) // (576 * 4)  # capped at 1 GiB
    monkeypatch.setattr(embed_mod, "free_memory", lambda device: 10)
    assert auto_chunk(net, net, x) == 1
