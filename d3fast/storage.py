"""Storage accounting of the distilled object (docs/algorithm.md section 1) and the choice
of decoder size and priors per class for a storage budget.

The object stores, as values in its storage format (distill.storage, d3fast/quantize.py:
float32 4 bytes a value, float16 2, int8 1 and int4 half a byte plus a float32 scale per
channel of each tensor of 2 or more dimensions):
    latents      C * PPC * z * 2          (mean and log-variance per prior)
    decoder      every floating tensor of its state dict (weights, biases, BatchNorm
                 affine parameters and running statistics) except the normalisation
                 mean/std buffers, which are dataset metadata
    lr           1                        (alpha)
With S subtasks (docs/algorithm.md section 9) there are S decoders and S lrs; with soft
labels, every prior carries a softmax over all C classes, C * PPC * C values more. Labels
are implied by the prior order. "Images per class" is bytes / (C * channels * res^2 *
pixel_bytes), pixel_bytes 1 (a uint8 image: d3fast's reports, and what the equal-storage
baseline of section 6 spends) or 4 (a float32 image, the same number of values: the
accounting in which the paper's ImageNet-1K budgets of 1, 2 and 10 images per class hold,
its objects storing 0.41, 1.77 and 10.05 of them; in uint8 images they store 1.65, 7.08
and 40.2; see `choose_budget`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from d3fast.config import VAE_TOP
from d3fast.errors import D3FastError
from d3fast.models import Decoder
from d3fast.quantize import check_storage, stored_bytes

# a budget is met within 1%: the paper's 10-images-per-class ImageNet-1K object stores 10.05
# (choose_budget)
TOLERANCE = 0.01
# choose_budget's candidates, smallest first: (kind, width, linear, z_dim) of the reference
# code's decoders. Decoder values and z grow together along the list, so at any number of
# priors the objects' bytes grow along it too. Width is ignored by medium and large (256:
# the config default)
Candidate = tuple[str, int, bool, int]
CANDIDATES: tuple[Candidate, ...] = (
    ("small", 64, True, 64),
    ("small", 128, True, 64),
    ("small", 256, True, 64),
    ("medium", 256, True, 2048),
    ("large", 256, False, 4096),
)


def stored_tensors(decoder: Decoder) -> Iterator[tuple[str, torch.Tensor]]:
    """The decoder tensors an object stores: its state dict's floating tensors less the
    normalisation mean/std buffers (dataset metadata)."""
    for k, v in decoder.state_dict().items():
        if v.is_floating_point() and k not in ("mean", "std"):
            yield k, v


@functools.lru_cache(maxsize=256)
def decoder_bytes(kind: str, width: int, res: int, channels: int, z_dim: int = 64, linear: bool = True,
                  storage: str = "float32") -> int:
    """Bytes of a decoder's `stored_tensors` in `storage` (d3fast/quantize.py `stored_bytes`:
    values and scales), built on the meta device.

    Raises:
        D3FastError: settings Decoder refuses, an unknown storage.
    """
    check_storage(storage)
    with torch.device("meta"):
        dec = Decoder(res, channels, [0.5] * channels, [0.5] * channels, z_dim=z_dim, kind=kind, width=width,
                      linear=linear)
    return sum(stored_bytes(v.shape, storage) for _, v in stored_tensors(dec))


def decoder_state_values(decoder: Decoder) -> int:
    """Values `decoder` stores: its state dict's floating tensors less the normalisation
    mean/std buffers (2 * channels values). num_batches_tracked is an int64 counter that
    the object does not need, so it is not counted."""
    total = sum(t.numel() for t in decoder.state_dict().values() if t.is_floating_point())
    return total - decoder.mean.numel() - decoder.std.numel()


@functools.lru_cache(maxsize=256)
def decoder_values(kind: str, width: int, res: int, channels: int, z_dim: int = 64, linear: bool = True) -> int:
    """`decoder_state_values` of Decoder(res, channels, ..., z_dim, kind, width, linear),
    built on the meta device (nothing is allocated, so a 6M-parameter decoder costs
    milliseconds).

    Raises:
        D3FastError: settings Decoder refuses (kind, resolution, z_dim without linear).
    """
    with torch.device("meta"):
        dec = Decoder(res, channels, [0.5] * channels, [0.5] * channels, z_dim=z_dim, kind=kind, width=width,
                      linear=linear)
    return decoder_state_values(dec)


def _counts(**counts: int) -> None:
    for name, v in counts.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise D3FastError(f"{name} must be a whole number >= 1, got {v!r}")
    if counts.get("subtasks", 1) > counts.get("num_classes", 1):
        raise D3FastError(f"{counts['subtasks']} subtasks need at least as many classes, got {counts['num_classes']}")


def object_values(
    *, num_classes: int, ppc: int, z_dim: int, decoder: str, decoder_width: int, res: int, channels: int,
    decoder_linear: bool = True, subtasks: int = 1, soft_labels: bool = False,
) -> int:
    """Values the distilled object stores: C * PPC * z * 2 (latents) + S * (decoder + 1 lr)
    + C * PPC * C with soft labels (module docstring).

    Raises:
        D3FastError: counts below 1, more subtasks than classes, or decoder settings
            Decoder refuses.
    """
    _counts(num_classes=num_classes, ppc=ppc, subtasks=subtasks, channels=channels)
    dec = decoder_values(decoder, decoder_width, res, channels, z_dim, decoder_linear)
    priors = num_classes * ppc
    return priors * z_dim * 2 + subtasks * (dec + 1) + (priors * num_classes if soft_labels else 0)


def object_bytes(
    *, num_classes: int, ppc: int, z_dim: int, decoder: str, decoder_width: int, res: int, channels: int,
    decoder_linear: bool = True, subtasks: int = 1, soft_labels: bool = False, storage: str = "float32",
) -> int:
    """Bytes the object takes in `storage` (d3fast/quantize.py): the latents [C * PPC, z, 2]
    with their scales, S decoders and lrs, the soft labels [C * PPC, C]; float32:
    4 x `object_values`. What `Distilled.storage_bytes` reports.

    Raises:
        D3FastError: as `object_values`, an unknown storage.
    """
    _counts(num_classes=num_classes, ppc=ppc, subtasks=subtasks, channels=channels)
    check_storage(storage)
    priors = num_classes * ppc
    return (stored_bytes((priors, z_dim, 2), storage, latents=True)
            + subtasks * (decoder_bytes(decoder, decoder_width, res, channels, z_dim, decoder_linear, storage)
                          + stored_bytes((1,), storage))
            + (stored_bytes((priors, num_classes), storage) if soft_labels else 0))


def ipc_equivalent(nbytes: float, num_classes: int, channels: int, res: int, *, pixel_bytes: int = 1) -> float:
    """Images per class the same bytes would store: nbytes / (C * channels * res^2 *
    pixel_bytes); pixel_bytes 1 is a uint8 image (d3fast's figure), 4 a float32 image (the
    accounting of the paper's budgets; module docstring)."""
    return nbytes / (num_classes * channels * res * res * pixel_bytes)


@dataclass(frozen=True)
class BudgetChoice:
    """A decoder and priors per class for a storage budget (`choose_budget`): the
    distill.decoder, decoder_width, decoder_linear, z_dim and ppc settings, and the
    object's bytes and images-per-class equivalent (in the accounting it was chosen in)."""

    decoder: str
    decoder_width: int
    decoder_linear: bool
    z_dim: int
    ppc: int
    bytes: int
    ipc_equivalent: float

    def describe(self) -> str:
        """One line: decoder, z, priors, bytes and images per class."""
        size = _name((self.decoder, self.decoder_width, self.decoder_linear, self.z_dim))
        per = "prior" if self.ppc == 1 else "priors"
        return (f"{size}, z {self.z_dim}, {self.ppc} {per} per class: {self.bytes:,} bytes, "
                f"{self.ipc_equivalent:.3f} images per class")


def choose_budget(
    ipc: float, *, num_classes: int, channels: int, res: int, subtasks: int = 1, soft_labels: bool = False,
    storage: str = "float32", pixel_bytes: int = 1,
) -> BudgetChoice:
    """The decoder and priors per class for a budget of `ipc` images per class of storage.

    Rule. Candidates: `CANDIDATES`, the reference code's decoders (small at widths 64, 128
    and 256 with z 64; medium with its linear layer and z 2048; large without it and z
    4096). A budget of k = floor(ipc) >= 1 images per class buys, within `TOLERANCE` (1%):
      1. priors first: the most priors per class, at most k (one per image of budget, as
         the reference code's ImageNet-1K runs pair them: 1, 2 and 10 at 1, 2 and 10
         images per class), that some
         candidate's object (`object_bytes`: latents, S decoders and lrs, soft labels)
         fits in k images per class;
      2. then the largest candidate that fits those priors.
    Below 1 image per class the budget is ipc itself and buys 1 prior; when the whole images
    of a larger budget buy nothing, the budget itself buys the cheapest object (small width
    64, 1 prior) if it fits. Why: the priors are
    what a student samples each class from, so a budget buys them before decoder capacity
    (the reference's 2-image object takes medium with 2 priors over large with 1, which
    also fits). The fraction above a whole number buys nothing, which makes the rule monotone: a
    larger budget never stores fewer bytes. Proof sketch, from k to k + 1 images (along the
    candidates, the decoder and z both grow, so at any number of priors the cost grows too;
    small width 64 is the cheapest): with the full k priors, the chosen decoder costs > 0,
    so one more prior costs it less than the image added and it still fits k + 1 priors;
    with fewer than k priors, small w64 could not fit one more in k images, and any choice
    with more priors costs at least that; with as many priors, the budget is larger.

    The reference code's three ImageNet-1K objects (1000 classes, 3 x 64 x 64, soft labels,
    float32 values; its budgets of 1, 2 and 10 images per class) are reproduced with
    pixel_bytes=4, budgets counted in float32 images (stored values against pixel
    values), the accounting in which they hold: they store 0.413 images per class
    (budget 1: small w256, 1 prior, 5 subtasks; 20,307,280 bytes), 1.769 (budget 2:
    medium, 2 priors, 2 subtasks; 86,973,728 bytes) and 10.048 (budget 10: large without
    its linear layer, 10 priors, 5 subtasks; 493,891,920 bytes: hence the tolerance;
    without soft labels, 9.23). In d3fast's uint8 images (pixel_bytes=1) the same objects
    store 1.65, 7.08 and 40.2 images per class, and the budgets 1, 2 and 10 choose small
    w128 with 1 prior, small w256 with 2 and small w256 with 10.

    Args:
        ipc: budget, images per class (> 0).
        num_classes, channels, res: the dataset (28 px counts as 28 x 28).
        subtasks: S, one decoder and lr each. Default: 1.
        soft_labels: each prior stores a softmax over all classes. Default: False.
        storage: how the object's values are stored (d3fast/quantize.py: float32, float16,
            int8, int4); a smaller format buys more priors or a larger decoder. Default: float32.
        pixel_bytes: bytes of one pixel value of the image the budget counts: 1 uint8
            (d3fast's reports), 4 float32 (the paper's budgets hold in it). Default: 1.

    Raises:
        D3FastError: a non-positive or non-finite ipc, bad counts, or a budget below the
            smallest one that fits, naming it.
    """
    if not (isinstance(ipc, int | float) and not isinstance(ipc, bool) and math.isfinite(ipc) and ipc > 0):
        raise D3FastError(f"the storage budget must be a finite positive number of images per class, got {ipc!r}")
    _counts(num_classes=num_classes, subtasks=subtasks, channels=channels, res=res, pixel_bytes=pixel_bytes)
    check_storage(storage)
    unit = num_classes * channels * res * res * pixel_bytes  # bytes of one image per class
    # cost(c, p) = fixed + p * per: S decoders and lrs, and per prior per class its latents
    # (and soft labels) for every class
    costs = []
    for cand in CANDIDATES:
        fixed = subtasks * (decoder_bytes(cand[0], cand[1], res, channels, cand[3], cand[2], storage)
                            + stored_bytes((1,), storage))
        # one prior per class: latents and soft labels have a scale per prior, so bytes grow
        # linearly in the priors (int4: 2 z values a prior, never an odd count)
        per = stored_bytes((num_classes, cand[3], 2), storage, latents=True) + (
            stored_bytes((num_classes, num_classes), storage) if soft_labels else 0)
        costs.append((cand, fixed, per))

    def tier(budget: float, cap: int) -> tuple[int, int, Candidate] | None:
        """(bytes, priors, candidate) that `budget` bytes buy with at most `cap` priors."""
        best: tuple[int, int, Candidate] | None = None
        for cand, fixed, per in costs:  # smallest first: a tie in priors goes to the larger
            p = min(cap, math.floor((budget - fixed) / per)) if budget >= fixed + per else 0
            if p >= 1 and (best is None or p >= best[1]):
                best = (fixed + p * per, p, cand)
        return best

    room = unit * (1 + TOLERANCE)
    k = max(1, math.floor(ipc))
    chosen = tier((ipc if ipc < 1 else k) * room, k)
    cand, fixed, per = costs[0]  # the cheapest at any number of priors
    if chosen is None and fixed + per <= ipc * room:
        # the whole images buy nothing, the budget itself the cheapest object: fixed until the
        # next whole image (which buys at least as much), so the rule stays monotone
        chosen = (fixed + per, 1, cand)
    if chosen is None:
        need = (fixed + per) / room
        shown = math.ceil(need * 1000) / 1000  # rounded up, so the value named is accepted
        raise D3FastError(f"a storage budget of {ipc:g} images per class fits no decoder: it needs at least "
                          f"{shown:g} images per class of storage (the smallest object, {_name(cand)} with 1 prior "
                          f"per class, stores {(fixed + per) / unit:.3g})")
    nbytes, ppc, (kind, width, linear, z_dim) = chosen
    return BudgetChoice(decoder=kind, decoder_width=width, decoder_linear=linear, z_dim=z_dim, ppc=ppc,
                        bytes=nbytes, ipc_equivalent=nbytes / unit)


def _name(cand: Candidate) -> str:
    kind, width, linear, _ = cand
    return f"{kind} decoder" + (f" width {width}" if kind not in VAE_TOP else "" if linear else " without its linear layer")


@dataclass(frozen=True)
class StorageRow:
    """One row of `storage_table`: a decoder at one resolution, its float32 bytes, and the
    images per class (uint8) of the decoder plus one prior per class for 10 classes, and
    for 1000 classes in 5 subtasks (5 decoders), without soft labels."""

    label: str
    z_dim: int
    res: int
    decoder_bytes: int
    ipc_10: float
    ipc_1000_s5: float


# (label, kind, width, linear, z_dim) of storage_table's rows
TABLE_DECODERS: tuple[tuple[str, str, int, bool, int], ...] = (
    ("paper w256", "paper", 256, True, 64),
    ("tiny/small w128", "small", 128, True, 64),
    ("small w256", "small", 256, True, 64),
    ("medium", "medium", 256, True, 2048),
    ("large", "large", 256, True, 64),
    ("large, no linear", "large", 256, False, 4096),
)


def storage_table(resolutions: Sequence[int] = (32, 64, 128), channels: int = 3) -> list[StorageRow]:
    """`TABLE_DECODERS` at each resolution (float32 values, uint8 images)."""
    def ipc(num_classes: int, subtasks: int, kind: str, width: int, linear: bool, z_dim: int, res: int) -> float:
        b = object_bytes(num_classes=num_classes, ppc=1, z_dim=z_dim, decoder=kind, decoder_width=width, res=res,
                         channels=channels, decoder_linear=linear, subtasks=subtasks)
        return ipc_equivalent(b, num_classes, channels, res)

    return [
        StorageRow(label, z_dim, res, 4 * decoder_values(kind, width, res, channels, z_dim, linear),
                   ipc(10, 1, kind, width, linear, z_dim, res), ipc(1000, 5, kind, width, linear, z_dim, res))
        for label, kind, width, linear, z_dim in TABLE_DECODERS
        for res in resolutions
    ]


def storage_table_markdown(resolutions: Sequence[int] = (32, 64, 128), channels: int = 3) -> str:
    """`storage_table` as the markdown table of docs/storage.md."""
    lines = [
        "| decoder | z | px | decoder MiB | 10 classes: images/class | 1000 classes, 5 subtasks: images/class |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in storage_table(resolutions, channels):
        lines.append(f"| {r.label} | {r.z_dim} | {r.res} | {r.decoder_bytes / 2**20:.2f} | {r.ipc_10:.1f} | "
                     f"{r.ipc_1000_s5:.2f} |")
    return "\n".join(lines) + "\n"
