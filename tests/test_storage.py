"""Storage accounting (d3fast/storage.py) against real distilled objects, and the choice
of decoder and priors per class for a budget."""

import itertools
import re
from pathlib import Path

import pytest
import torch

from d3fast.distilled import init_distilled
from d3fast.errors import D3FastError
from d3fast.storage import (
    CANDIDATES,
    choose_budget,
    decoder_bytes,
    decoder_state_values,
    decoder_values,
    ipc_equivalent,
    object_bytes,
    storage_table_markdown,
)

KINDS = [  # (kind, width, linear, z_dim)
    ("paper", 16, True, 8),
    ("tiny", 32, True, 8),
    ("small", 16, True, 8),
    ("medium", 256, True, 16),
    ("medium", 256, False, 2048),
    ("large", 256, False, 4096),
]


def _meta(kind, width, linear, z_dim, res=32, channels=3):
    return {"resolution": res, "channels": channels, "mean": [0.5] * channels, "std": [0.25] * channels,
            "z_dim": z_dim, "decoder": kind, "decoder_width": width, "decoder_linear": linear}


@pytest.mark.parametrize("kind, width, linear, z_dim", KINDS)
def test_formula_equals_a_real_distilled_object(kind, width, linear, z_dim):
    meta = _meta(kind, width, linear, z_dim, res=16, channels=1)
    d = init_distilled(3, 2, ["a", "b", "c"], meta, 0.01, torch.device("cpu"), 0)
    formula = object_bytes(num_classes=3, ppc=2, z_dim=z_dim, decoder=kind, decoder_width=width, res=16, channels=1,
                           decoder_linear=linear)
    assert d.storage_bytes() == formula
    assert d.images_per_class_equivalent() == ipc_equivalent(formula, 3, 1, 16)
    # counted on the meta device = counted on the built decoder
    assert decoder_values(kind, width, 16, 1, z_dim, linear) == decoder_state_values(d.decoder)


def test_subtasks_are_the_sum_of_their_objects():
    # 6 classes in 3 subtasks of 2: three objects, each with its own decoder and lr
    meta = _meta("small", 32, True, 8)
    parts = [init_distilled(2, 3, [f"{i}a", f"{i}b"], meta, 0.01, torch.device("cpu"), i) for i in range(3)]
    total = sum(d.storage_bytes() for d in parts)
    assert total == object_bytes(num_classes=6, ppc=3, z_dim=8, decoder="small", decoder_width=32, res=32,
                                 channels=3, subtasks=3)
    # soft labels: each of the 18 priors stores a softmax over all 6 classes
    assert object_bytes(num_classes=6, ppc=3, z_dim=8, decoder="small", decoder_width=32, res=32, channels=3,
                        subtasks=3, soft_labels=True) == total + 4 * 18 * 6


def test_decoder_values_never_build_the_decoder():
    # a paper decoder 50,000 wide at 128 px holds ~2e10 values (~80 GB): counted, not built
    assert decoder_values("paper", 50_000, 128, 3) > 10**10


# the reference code's ImageNet-1K objects (1000 classes, 3 x 64 x 64, soft labels)
PUBLISHED = [
    # ipc, subtasks, (decoder, width, linear, z_dim, ppc), bytes, in float32 images, in uint8 images
    (1, 5, ("small", 256, True, 64, 1), 20_307_280, 0.413, 1.653),
    (2, 2, ("medium", 256, True, 2048, 2), 86_973_728, 1.769, 7.078),
    (10, 5, ("large", 256, False, 4096, 10), 493_891_920, 10.048, 40.193),
]


@pytest.mark.parametrize("ipc, subtasks, choice, nbytes, float_ipc, uint8_ipc", PUBLISHED)
def test_the_papers_budgets(ipc, subtasks, choice, nbytes, float_ipc, uint8_ipc):
    c = choose_budget(ipc, num_classes=1000, channels=3, res=64, subtasks=subtasks, soft_labels=True, pixel_bytes=4)
    assert (c.decoder, c.decoder_width, c.decoder_linear, c.z_dim, c.ppc) == choice
    assert c.bytes == nbytes
    # the published figures have 2 or 3 decimals: abs 1e-3 is their rounding (exact integer bytes otherwise)
    assert c.ipc_equivalent == pytest.approx(float_ipc, abs=1e-3)
    assert ipc_equivalent(nbytes, 1000, 3, 64) == pytest.approx(uint8_ipc, abs=1e-3)
    assert f"{choice[4]} prior" in c.describe() and f"{nbytes:,} bytes" in c.describe()


def _needs(message: str) -> float:
    return float(re.search(r"needs at least ([0-9.]+) images per class", message).group(1))


@pytest.mark.parametrize("kw, below", [
    (dict(num_classes=1000, channels=3, res=64, subtasks=5, soft_labels=True), 0.1),  # needs < 1 image
    (dict(num_classes=10, channels=3, res=32), 5),  # CIFAR-10 in uint8 images: the decoder alone is ~8
])
def test_refusal_names_the_smallest_budget_that_fits(kw, below):
    with pytest.raises(D3FastError, match="the smallest object, small decoder width 64 with 1 prior") as e:
        choose_budget(below, **kw)
    need = _needs(str(e.value))
    c = choose_budget(need, **kw)
    assert (c.decoder, c.decoder_width) == ("small", 64)
    with pytest.raises(D3FastError, match="fits no decoder"):
        choose_budget(need * 0.99 if need < 1 else need - 1, **kw)


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf")])
def test_refuses_a_budget_that_is_not_positive(bad):
    with pytest.raises(D3FastError, match="finite positive number of images per class"):
        choose_budget(bad, num_classes=10, channels=3, res=32)


@pytest.mark.parametrize("num_classes, channels, res, subtasks, soft, pixel_bytes", [
    (s[0], *s[1:]) for s in itertools.product((10, 200, 1000), (1, 3), (32, 64, 128), (1, 5), (False, True), (1, 4))
])
def test_more_budget_never_stores_less(num_classes, channels, res, subtasks, soft, pixel_bytes):
    last, fitted = 0, False
    for ipc in [i / 10 for i in range(1, 10)] + [1, 1.5, 2, 2.5, *[k + f for k in range(3, 60) for f in (0, 0.5)],
                                                   64, 100, 128, 200, 500]:
        try:
            c = choose_budget(ipc, num_classes=num_classes, channels=channels, res=res, subtasks=subtasks,
                              soft_labels=soft, pixel_bytes=pixel_bytes)
        except D3FastError:
            assert not fitted, f"{ipc} refused after a smaller budget fitted"
            continue
        fitted = True
        assert c.bytes >= last, (ipc, c.describe())
        assert c.bytes <= ipc * 1.01 * num_classes * channels * res * res * pixel_bytes  # it fits the budget
        last = c.bytes


@pytest.mark.parametrize("storage, num_classes, channels, res, soft", list(itertools.product(
    ("float16", "int8", "int4"), (10, 1000), (1, 3), (28, 128), (False, True))))
def test_more_budget_never_stores_less_in_any_storage(storage, num_classes, channels, res, soft):
    last, fitted = 0, False
    for ipc in [0.1, 0.5, 1, 1.5, 2, *range(3, 40), 64, 200]:
        try:
            c = choose_budget(ipc, num_classes=num_classes, channels=channels, res=res, soft_labels=soft,
                              storage=storage)
        except D3FastError:
            assert not fitted, f"{ipc} refused after a smaller budget fitted"
            continue
        fitted = True
        assert c.bytes >= last and c.bytes <= ipc * 1.01 * num_classes * channels * res * res, (ipc, c.describe())
        assert c.bytes == object_bytes(num_classes=num_classes, ppc=c.ppc, z_dim=c.z_dim, decoder=c.decoder,
                                       decoder_width=c.decoder_width, decoder_linear=c.decoder_linear, res=res,
                                       channels=channels, soft_labels=soft, storage=storage)
        last = c.bytes


def test_fp16_halves_the_bytes():
    kw = dict(num_classes=1000, ppc=10, z_dim=4096, decoder="large", decoder_width=256, res=64, channels=3,
              decoder_linear=False, subtasks=5, soft_labels=True)
    assert object_bytes(**kw, storage="float16") * 2 == object_bytes(**kw)
    # a float16 object of the same budget is at least half the float32 one, and its bytes
    # are the half of its float32 layout's
    for ipc in (1, 2, 10):
        c32 = choose_budget(ipc, num_classes=1000, channels=3, res=64, subtasks=5, soft_labels=True)
        c16 = choose_budget(ipc, num_classes=1000, channels=3, res=64, subtasks=5, soft_labels=True,
                            storage="float16")
        assert 2 * c16.bytes >= c32.bytes
        assert 2 * c16.bytes == object_bytes(num_classes=1000, ppc=c16.ppc, z_dim=c16.z_dim, decoder=c16.decoder,
                                             decoder_width=c16.decoder_width, res=64, channels=3,
                                             decoder_linear=c16.decoder_linear, subtasks=5, soft_labels=True)


def test_candidates_grow_in_cost():
    # choose_budget's proof of monotonicity needs every candidate to cost more than the one
    # before it at any number of priors: larger decoder and no smaller z
    for res in (28, 32, 64, 128):
        values = [decoder_values(k, w, res, 3, z, lin) for k, w, lin, z in CANDIDATES]
        assert values == sorted(values) and len(set(values)) == len(values)
        for storage in ("float32", "float16", "int8", "int4"):
            nbytes = [decoder_bytes(k, w, res, 3, z, lin, storage) for k, w, lin, z in CANDIDATES]
            assert nbytes == sorted(nbytes) and len(set(nbytes)) == len(nbytes)
    assert [z for *_, z in CANDIDATES] == sorted(z for *_, z in CANDIDATES)


def test_docs_table_is_generated():
    page = (Path(__file__).resolve().parents[1] / "docs" / "storage.md").read_text()
    assert storage_table_markdown() in page


def test_a_budget_between_whole_images_buys_the_cheapest_object_when_whole_images_buy_nothing():
    """digits: 10 classes of 1 x 32 x 32 in float32 images; the cheapest object (small
    width 64, 1 prior) stores 6.09 images per class: 6.5 buys it, 5.9 is refused naming 6.03."""
    kw = {"num_classes": 10, "channels": 1, "res": 32, "pixel_bytes": 4}
    c = choose_budget(6.5, **kw)
    assert (c.decoder, c.decoder_width, c.ppc) == ("small", 64, 1) and 6.0 < c.ipc_equivalent <= 6.5
    with pytest.raises(D3FastError, match="needs at least 6.029 images per class"):
        choose_budget(5.9, **kw)
