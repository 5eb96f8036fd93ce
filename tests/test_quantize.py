"""Stored formats of the distilled object (d3fast/quantize.py): round trips against a numpy
reference of the formula, byte accounting against what is written, the straight-through
finishing phase, exports and runs in every format."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from d3fast.distilled import Merged, init_distilled
from d3fast.errors import D3FastError
from d3fast.exports import export, load
from d3fast.quantize import LEVELS, dequantize, fake_quant, quantize, round_trip, stored_bytes
from d3fast.storage import CANDIDATES, choose_budget, object_bytes

SHAPES = [((7,), False), ((3, 5), False), ((6, 3, 3, 3), False), ((5, 4, 2), True), ((3, 3), False), ((1, 1), False),
          ((2, 7, 3), True)]


def ref_int(x: np.ndarray, top: int, latents: bool) -> np.ndarray:
    """Symmetric per-channel quantisation by its formula, in float32 numpy: s = max|x| / top
    over a channel (and per half for latents), q = round(x / s), x ~ q s."""
    axes = tuple(range(1, x.ndim - 1)) if latents else tuple(range(1, x.ndim))
    s = (np.abs(x).max(axis=axes, keepdims=True) / np.float32(top)).astype(np.float32)
    q = np.clip(np.round(x / np.where(s > 0, s, np.float32(1))), -top, top)
    return (q * s).astype(np.float32)


@pytest.mark.parametrize(("shape", "latents"), SHAPES)
@pytest.mark.parametrize("storage", ["float32", "float16", "int8", "int4"])
def test_round_trips_follow_the_formula_and_count_their_bytes(shape, latents, storage):
    g = torch.Generator().manual_seed(len(shape) * 10 + shape[0])
    x = torch.randn(shape, generator=g) * torch.linspace(0.1, 4, shape[-1])
    stored = quantize(x, storage, latents)
    back = dequantize(stored, storage, shape)
    assert back.dtype == torch.float32 and back.shape == x.shape
    if storage == "float32":
        assert torch.equal(back, x)
    elif storage == "float16" or len(shape) < 2:
        assert torch.equal(back, x.half().float() if storage == "float16" else x)
    else:
        want = ref_int(x.numpy(), LEVELS[storage], latents)
        assert np.array_equal(back.numpy(), want)
        # every channel's largest value is stored exactly at +-top levels
        assert float((back - x).abs().max()) <= float(stored["scale"].max()) / 2 * (1 + 1e-6)
    # the bytes counted are the bytes written
    written = sum(t.numel() * t.element_size() for t in stored.values())
    assert written == stored_bytes(shape, storage, latents)
    # storing the stored value again changes nothing
    again = quantize(back, storage, latents)
    assert all(torch.equal(again[k], stored[k]) for k in ("values",)) and \
        torch.equal(dequantize(again, storage, shape), back)


def test_zero_channels_and_a_single_value_survive():
    x = torch.tensor([[0.0, 0.0, 0.0], [1.0, -2.0, 0.5]])
    for storage in ("int8", "int4"):
        back = round_trip(x, storage)
        assert torch.equal(back[0], torch.zeros(3)) and float(back[1, 1]) == -2.0
    assert torch.equal(round_trip(torch.tensor([[3.0]]), "int4"), torch.tensor([[3.0]]))


def test_bad_values_and_damaged_stored_tensors_are_refused():
    with pytest.raises(D3FastError, match="non-finite"):
        quantize(torch.tensor([[1.0, float("nan")]]), "int8")
    with pytest.raises(D3FastError, match="beyond float16"):
        quantize(torch.tensor([1e5]), "float16")
    with pytest.raises(D3FastError, match="unknown storage format 'int2'"):
        quantize(torch.ones(2, 2), "int2")
    good = quantize(torch.randn(4, 3), "int8")
    with pytest.raises(D3FastError, match="scales .* missing or unusable"):
        dequantize({"values": good["values"]}, "int8", (4, 3))
    with pytest.raises(D3FastError, match="want torch.int8"):
        dequantize({"values": good["values"].float(), "scale": good["scale"]}, "int8", (4, 3))
    with pytest.raises(D3FastError, match="-128"):
        dequantize({"values": torch.full((4, 3), -128, dtype=torch.int8), "scale": good["scale"]}, "int8", (4, 3))
    with pytest.raises(D3FastError, match="missing or unusable"):
        dequantize({"values": good["values"], "scale": -good["scale"]}, "int8", (4, 3))
    packed = quantize(torch.randn(3, 3), "int4")
    with pytest.raises(D3FastError, match="-8"):
        dequantize({"values": torch.zeros_like(packed["values"]), "scale": packed["scale"]}, "int4", (3, 3))


@pytest.mark.parametrize("storage", ["float16", "int8", "int4"])
def test_fake_quant_is_the_stored_value_forward_and_the_identity_backward(storage):
    for shape, latents in SHAPES:
        x = torch.randn(shape, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
        y = fake_quant(x, storage, latents)
        assert torch.equal(y.detach(), round_trip(x.detach(), storage, latents))
        w = torch.randn(shape)
        (y * w).sum().backward()
        assert torch.equal(x.grad, w)


META = {"resolution": 32, "channels": 1, "mean": [0.5], "std": [0.25], "z_dim": 16, "decoder": "small",
        "decoder_width": 32, "decoder_linear": True, "lr_param": "log"}


def _object(storage: str, classes=("a", "b", "c"), seed=0):
    meta = dict(META) | ({"storage": storage} if storage != "float32" else {})
    return init_distilled(len(classes), 2, list(classes), meta, 0.01, torch.device("cpu"), seed)


@pytest.mark.parametrize("storage", ["float32", "float16", "int8", "int4"])
def test_an_export_holds_the_stored_object_in_the_bytes_it_counts(storage, tmp_path):
    d = _object(storage)
    d.soft_labels = torch.softmax(torch.randn(6, 3), 1)
    path = tmp_path / "o.safetensors"
    export(d, path)
    got, want = load(path), d.stored()
    assert got.storage == storage
    assert torch.equal(got.latents, want.latents) and torch.equal(got.alpha, want.alpha)
    assert torch.equal(got.soft_labels, want.soft_labels)
    for (k, a), b in zip(got.decoder.state_dict().items(), want.decoder.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    # storage_bytes = the settings' formula = the bytes of the stored tensors in the file
    # (less the normalisation buffers and BatchNorm's integer batch counts, which are not the object)
    kw = dict(num_classes=3, ppc=2, z_dim=16, decoder="small", decoder_width=32, res=32, channels=1, soft_labels=True)
    assert d.storage_bytes() == got.storage_bytes() == object_bytes(**kw, storage=storage)
    with safe_open(str(path), "pt") as f:
        held = {k: f.get_tensor(k) for k in f.keys()}
    counted = sum(t.numel() * t.element_size() for k, t in held.items()
                  if k not in ("decoder.mean", "decoder.std") and not k.endswith("num_batches_tracked"))
    assert counted == d.storage_bytes()
    # a quantised object is smaller by about its bytes per value
    f32 = object_bytes(**kw)
    assert {"float32": 1.0, "float16": 0.5, "int8": 0.25, "int4": 0.125}[storage] <= d.storage_bytes() / f32 < \
        {"float32": 1.01, "float16": 0.51, "int8": 0.3, "int4": 0.2}[storage]


def test_a_damaged_quantised_export_is_one_clear_error(tmp_path):
    from d3fast.exports import DIGEST, _digest
    from d3fast.io import load_tensors, save_tensors

    path = tmp_path / "o.safetensors"
    export(_object("int8"), path)
    tensors, meta = load_tensors(path, "x")
    del tensors["latents@scale"]
    meta[DIGEST] = _digest(tensors, meta)  # a consistent file that lacks the scales
    save_tensors(tmp_path / "bad.safetensors", tensors, meta)
    with pytest.raises(D3FastError, match=r"damaged distilled export \(latents: .*scales"):
        load(tmp_path / "bad.safetensors")


def test_merging_needs_one_storage_and_keeps_it(tmp_path):
    a, b = _object("int8", ("a", "b")), _object("int8", ("c", "d"), seed=1)
    m = Merged.of([a, b])
    export(m, tmp_path / "m.safetensors")
    got = load(tmp_path / "m.safetensors")
    assert [p.storage for p in got.parts] == ["int8", "int8"]
    assert torch.equal(got.parts[1].latents, b.stored().latents) and got.storage_bytes() == m.storage_bytes()
    with pytest.raises(D3FastError, match="stored as int8 and float16"):
        Merged.of([a, _object("float16", ("c", "d"))])


def test_a_budget_buys_more_in_a_smaller_format():
    kw = dict(num_classes=10, channels=1, res=28)
    chosen = {s: choose_budget(16, **kw, storage=s) for s in ("float16", "int8", "int4")}
    with pytest.raises(D3FastError, match="fits no decoder"):
        choose_budget(16, **kw)  # float32: the smallest object is ~32 uint8 images per class
    # more priors, or as many (at most one per image of budget) and a larger decoder
    def size(c):
        return c.ppc, CANDIDATES.index((c.decoder, c.decoder_width, c.decoder_linear, c.z_dim))

    assert size(chosen["float16"]) < size(chosen["int8"]) < size(chosen["int4"])
    for s, c in chosen.items():
        assert c.bytes <= 16 * 10 * 28 * 28 * 1.01
        assert c.bytes == object_bytes(num_classes=10, ppc=c.ppc, z_dim=c.z_dim, decoder=c.decoder,
                                       decoder_width=c.decoder_width, decoder_linear=c.decoder_linear, res=28,
                                       channels=1, storage=s)


def test_a_quantised_run_finishes_through_its_stored_values_and_is_evaluated_as_stored(home, tmp_path, monkeypatch):
    from d3fast.distilled import Distilled
    from d3fast.recipes.distill import distill
    from d3fast.run import Run
    from tests._utils import cfg_of, evaluate_run

    seen = []
    real = Distilled._decode

    def spy(self, z):
        seen.append(self.fake_quant)
        return real(self, z)

    monkeypatch.setattr(Distilled, "_decode", spy)
    run = Run.at(tmp_path / "run")
    distill(cfg_of("distill.steps=3", "distill.storage=int8", "distill.quant_steps=1"), run, progress=False,
            on_step=lambda _: seen.append("|"))
    monkeypatch.setattr(Distilled, "_decode", real)
    steps = "".join("|" if v == "|" else "q" if v else "-" for v in seen).split("|")
    # every decode of the last step (and only of it) goes through the stored values
    assert steps[0] and set(steps[0]) == set(steps[1]) == {"-"} and set(steps[2]) == {"q"}, steps
    state = run.load_state("cpu")
    masters = state["distilled"]["latents"] if "distilled" in state else state["latents"]
    d, step = run.load_distilled()
    assert step == 3 and d.storage == "int8" and json.loads(json.dumps(d.meta))["storage"] == "int8"
    assert torch.equal(d.latents, round_trip(masters.float(), "int8", latents=True))
    r = evaluate_run(run, {"eval": {"students": 1, "epochs": 1, "coresets": []}}, progress=False, device="cpu")
    cfg = cfg_of()
    assert r["storage_bytes"] == d.storage_bytes() == object_bytes(
        num_classes=10, ppc=1, z_dim=cfg.distill.z_dim, decoder=cfg.distill.decoder, res=32, channels=1,
        decoder_width=cfg.distill.decoder_width, decoder_linear=cfg.distill.decoder_linear, storage="int8")


def _tampered(tmp_path, src, edit):
    """`src` (an export) edited by `edit(tensors, meta)`, its checksum written again: only the
    stored-format checks stand between the edit and a wrong object."""
    from d3fast.exports import DIGEST, _digest
    from d3fast.io import load_tensors, save_tensors

    tensors, meta = load_tensors(src, "x")
    edit(tensors, meta)
    meta[DIGEST] = _digest(tensors, meta)
    out = tmp_path / f"t{len(list(tmp_path.iterdir()))}.safetensors"
    save_tensors(out, tensors, meta)
    return out


@pytest.mark.parametrize(("edit", "says"), [
    # breaker, issue 33: a weight without its stored shape was read as raw integers (127 for 0.07)
    (lambda t, m: m["stored_shapes"].pop("decoder.project.weight"), r"decoder.project.weight \(torch.int8\) has no "
                                                                   "stored shape"),
    (lambda t, m: t.__setitem__("decoder.project.bias@scale", torch.ones(1)), "scales for a tensor"),
    # scales that do not broadcast per channel, latents of another z: a RuntimeError before
    (lambda t, m: t.__setitem__("decoder.project.weight@scale", torch.ones(t["decoder.project.weight"].shape[0], 2)),
     "missing or unusable"),
    (lambda t, m: m["stored_shapes"].__setitem__("latents", [6, 32, 1]), "latents"),
    (lambda t, m: m["stored_shapes"].__setitem__("nothing", [2]), "stored shapes of tensors the export lacks"),
])
def test_an_int8_export_edited_with_a_fresh_checksum_is_refused(tmp_path, edit, says):
    src = tmp_path / "o.safetensors"
    export(_object("int8"), src)
    bad = _tampered(tmp_path, src, edit)
    with pytest.raises(D3FastError, match=says):
        load(bad)


def test_a_merged_export_whose_parts_say_another_storage_is_refused(tmp_path):
    src = tmp_path / "m.safetensors"
    export(Merged.of([_object("int8", ("a", "b")), _object("int8", ("c", "d"), seed=1)]), src)

    def edit(t, m):
        for p in m["parts"]:
            p["meta"]["storage"] = "int4"

    with pytest.raises(D3FastError, match="its parts say another storage than its tensors' int8"):
        load(_tampered(tmp_path, src, edit))


def test_a_value_float16_cannot_hold_names_its_tensor(tmp_path):
    d = _object("float16")
    with torch.no_grad():
        d.decoder.blocks[0][1].running_var[0] = 1e6
    with pytest.raises(D3FastError, match=r"cannot be stored as float16 .*decoder.blocks.0.1.running_var: .*65504"):
        d.stored()


def test_resuming_a_finished_run_with_another_storage_stores_it_the_new_way(home, tmp_path):
    from d3fast.recipes.distill import distill
    from d3fast.run import Run
    from tests._utils import cfg_of

    run = Run.at(tmp_path / "run")
    distill(cfg_of("distill.steps=2", "distill.storage=int8"), run, progress=False)
    before = run.load_distilled()[0]
    cfg = cfg_of("distill.steps=2", "distill.storage=int4")
    distill(cfg, run, resume=True, progress=False, checked=run.check_resume(cfg))
    d, step = run.load_distilled()
    assert step == 2 and before.storage == "int8" and d.storage == "int4"
    assert d.storage_bytes() < before.storage_bytes()
    masters = run.load_state("cpu")["latents"]
    assert torch.equal(d.latents, round_trip(masters.float(), "int4", latents=True))
