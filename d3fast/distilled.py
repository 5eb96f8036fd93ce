"""The distilled object: per-prior latent Gaussians, one shared decoder, labels, and the
learned student lr (docs/algorithm.md section 1). Sampling, storage accounting, its state
dict (the checkpoint's share, d3fast/state.py); its safetensors file: d3fast/exports.py.

A `Merged` object holds the S subtask objects of one dataset (docs/algorithm.md section 9):
class c decodes through the decoder of the subtask whose block holds c; its storage is the
sum of theirs. `Sampler` draws from either kind."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from d3fast.compiling import Compiled
from d3fast.config import CHOICES
from d3fast.data.normalize import to_pixels
from d3fast.errors import D3FastError
from d3fast.models import Decoder
from d3fast.quantize import fake_quant, round_trip, stored_bytes
from d3fast.storage import ipc_equivalent, stored_tensors

# distill.lr_param's values; objects written before the key existed hold a leaky_relu alpha
LR_PARAMS = CHOICES["distill.lr_param"]
# leaky_relu(alpha) + 1e-4: the reference's lr, 1e-4 (its floor) at alpha = 0 and about that below
LEAKY_LR_FLOOR = 1e-4


def lr_param_of(meta: dict[str, Any]) -> str:
    """An object's lr parametrisation from its meta (absent: leaky_relu, as written before the key)."""
    return meta.get("lr_param", "leaky_relu")


def student_lr_of(alpha: torch.Tensor, lr_param: str) -> torch.Tensor:
    """The student lr of alpha: exp(alpha) (log) or leaky_relu(alpha) + 1e-4 (the reference's)."""
    if lr_param == "log":
        return alpha.exp()
    return torch.nn.functional.leaky_relu(alpha) + LEAKY_LR_FLOOR


@dataclass
class Distilled:
    latents: torch.Tensor  # [C * PPC, z, 2]: mean and log-variance
    decoder: Decoder
    alpha: torch.Tensor  # [] learnable student lr (pre-activation)
    num_classes: int
    ppc: int
    classes: list[str]
    meta: dict[str, Any]  # resolution, channels, mean, std, decoder kind/width/linear, z_dim
    # [C * PPC, classes of the whole dataset]: each prior's soft label (a probability row),
    # when labelled (d3fast/soft_labels.py); stored with the object and counted in its storage
    soft_labels: torch.Tensor | None = field(default=None, repr=False)
    # the dataset's ZCA (W, mu) when its images are whitened: `sample(pixels=True)` undoes it
    # (set by d3fast.load; not stored with the object)
    zca: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)
    # the decoder as a torch.compile graph while a compiled distillation runs (`compile_decoder`)
    _decoder_graph: Compiled | None = field(default=None, init=False, repr=False, compare=False)
    # the finishing phase (distill.quant_steps): decode and sample through the values as
    # stored (`storage`), the gradient straight through to the float32 masters
    fake_quant: bool = field(default=False, init=False, repr=False, compare=False)

    @property
    def num_priors(self) -> int:
        return self.latents.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the object computes in: float32, or float64 (distill.dtype=float64)."""
        return self.latents.dtype

    def sample(self, n_per_class: int, pixels: bool = True, bn: str = "running", seed: int = 0,
               batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """`sample_images` of this object."""
        return sample_images(self, n_per_class, pixels, bn, seed, batch_size)

    @property
    def parts(self) -> list[Distilled]:
        """The objects holding the priors, each with its own decoder: this one."""
        return [self]

    @property
    def labels(self) -> torch.Tensor:
        """[C * PPC]: prior i belongs to class i // PPC."""
        return torch.arange(self.num_classes, device=self.latents.device).repeat_interleave(self.ppc)

    def params(self) -> list[torch.Tensor]:
        """Every learned tensor: latents, alpha, the decoder's parameters."""
        return [self.latents, self.alpha, *self.decoder.parameters()]

    @property
    def lr_param(self) -> str:
        """How alpha gives the lr (distill.lr_param): "log", or "leaky_relu" (the reference's;
        objects written before the key existed)."""
        return lr_param_of(self.meta)

    def lr(self) -> torch.Tensor:
        """The student lr, a 0-d tensor with alpha's graph (`student_lr_of`)."""
        return student_lr_of(self.alpha, self.lr_param)

    @property
    def student_lr(self) -> float:
        """`lr()` as a number (reads the device)."""
        return float(self.lr().detach())

    def sample_latents(
        self, idx: torch.Tensor, generator: torch.Generator | None, rows: slice | None = None
    ) -> torch.Tensor:
        """z = mu + eps * exp(logvar / 2) for priors `idx` ([B]) -> [B, z]; with `rows`, the
        noise of all B is drawn (the generator moves as for the whole batch) and rows `rows`
        are returned: a rank of a distributed run keeps its share of a single process's draw."""
        # drawn in float32 and cast: a float64 object draws the noise a float32 one draws
        eps = torch.randn((len(idx), self.latents.shape[1]), generator=generator, device=self.latents.device,
                          dtype=torch.float32).to(self.latents.dtype)
        if rows is not None:
            idx, eps = idx[rows], eps[rows]
        lat = self._latents()[idx]
        mu, logvar = lat[..., 0], lat[..., 1]
        return mu + eps * torch.exp(0.5 * logvar)

    def decode(self, idx: torch.Tensor, generator: torch.Generator | None, rows: slice | None = None) -> torch.Tensor:
        """Fresh samples of priors `idx` (rows `rows` of them): normalised images [B, C, H, W]."""
        return self._decode(self.sample_latents(idx, generator, rows))

    def mean_images(self, priors: slice | None = None) -> torch.Tensor:
        """f(mu) for every prior (or the priors `priors`): [C * PPC, C, H, W]."""
        mu = self._latents()[..., 0]
        return self._decode(mu if priors is None else mu[priors])

    def compile_decoder(self) -> None:
        """Decode through torch.compile from now on (distill.compile; d3fast/compiling.py): the
        decoder's forward and backward, train-mode BatchNorm's statistics updates included,
        as a few fused kernels. The module, its state dict and its checkpoints are unchanged."""
        self._decoder_graph = Compiled(self.decoder, "the decoder")

    def _latents(self) -> torch.Tensor:
        """The latents as decoded: through their stored values in the finishing phase."""
        return fake_quant(self.latents, self.storage, latents=True) if self.fake_quant else self.latents

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        if self.fake_quant:  # through the stored weights, straight-through to the masters (eager)
            s = self.storage
            params = {k: fake_quant(p, s) for k, p in self.decoder.named_parameters()}
            return torch.func.functional_call(self.decoder, params, (z,))
        return self.decoder(z) if self._decoder_graph is None else self._decoder_graph(z)

    @property
    def storage(self) -> str:
        """How the object's values are stored (distill.storage; d3fast/quantize.py): float32
        (objects of before the key), float16, int8 or int4."""
        return str(self.meta.get("storage", "float32"))

    def storage_bytes(self) -> int:
        """Bytes to store the object in its `storage`: latents + decoder weights and BatchNorm
        statistics + the lr (hard labels are implied by the prior order) + the soft labels
        when it has them, scales included; d3fast/storage.py's formula, which
        `storage.object_bytes` computes from the settings alone."""
        s = self.storage
        soft = 0 if self.soft_labels is None else stored_bytes(self.soft_labels.shape, s)
        return (stored_bytes(self.latents.shape, s, latents=True) + stored_bytes((1,), s) + soft
                + sum(stored_bytes(v.shape, s) for _, v in stored_tensors(self.decoder)))

    def stored(self) -> Distilled:
        """The object as its `storage` holds it: a copy whose latents, alpha, decoder tensors and
        soft labels are `quantize.round_trip`ped (float32: an equal copy). What evaluation,
        sampling and exports of a run use; the run's checkpoints keep the float32 masters."""
        s = self.storage

        def stored(name: str, t: torch.Tensor, latents: bool = False) -> torch.Tensor:
            try:
                return round_trip(t, s, latents)
            except D3FastError as e:
                raise D3FastError(f"the object cannot be stored as {s} (distill.storage): {name}: {e}; resume the run "
                                  "with another --set distill.storage") from None

        decoder = copy.deepcopy(self.decoder)
        if s != "float32":
            with torch.no_grad():
                state = decoder.state_dict()
                for k, v in stored_tensors(decoder):
                    state[k].copy_(stored(f"decoder.{k}", v))
        soft = None if self.soft_labels is None else stored("soft_labels", self.soft_labels)
        return Distilled(latents=stored("latents", self.latents, latents=True), decoder=decoder,
                         alpha=stored("alpha", self.alpha.reshape(1)).reshape(()), num_classes=self.num_classes,
                         ppc=self.ppc, classes=list(self.classes), meta=dict(self.meta), soft_labels=soft, zca=self.zca)

    def images_per_class_equivalent(self) -> float:
        """`storage_bytes` in uint8 images per class (`storage.ipc_equivalent`)."""
        return ipc_equivalent(self.storage_bytes(), self.num_classes, self.meta["channels"], self.meta["resolution"])

    def named_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor of the object by name: latents, alpha, decoder.<state key>."""
        yield "latents", self.latents
        yield "alpha", self.alpha
        for k, v in self.decoder.state_dict().items():
            yield f"decoder.{k}", v

    def state_dict(self) -> dict[str, Any]:
        """The object for a checkpoint: tensors, the decoder's state dict, and classes and
        meta as JSON strings (what `torch.load(weights_only=True)` reads back)."""
        return {
            "latents": self.latents.detach(), "alpha": self.alpha.detach(), "decoder": self.decoder.state_dict(),
            "classes": json.dumps(self.classes), "meta": json.dumps(self.meta), "ppc": self.ppc,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], device: torch.device | str = "cpu",
                        dtype: torch.dtype | None = None) -> Distilled:
        """Inverse of `state_dict` (also reads the distilled part of a whole checkpoint), in
        `dtype`; None keeps the stored one (float64 for a distill.dtype=float64 run)."""
        meta, classes = json.loads(state["meta"]), json.loads(state["classes"])
        dtype = dtype or state["latents"].dtype
        decoder = decoder_holding(meta, state["decoder"]).to(dtype)
        try:
            decoder.load_state_dict(state["decoder"])
        except RuntimeError as e:
            raise D3FastError(f"the checkpoint's decoder does not match its settings ({str(e).splitlines()[0]})") from None
        return cls(
            latents=state["latents"].to(device, dtype), decoder=decoder.to(device),
            alpha=state["alpha"].to(device, dtype),
            num_classes=len(classes), ppc=int(state["ppc"]), classes=classes, meta=meta,
        )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Copy a state dict of the same shapes into this object's tensors, in place (the
        optimisers keep pointing at them)."""
        if int(state["ppc"]) != self.ppc or json.loads(state["classes"]) != self.classes \
                or state["latents"].shape != self.latents.shape:
            raise D3FastError("the checkpoint holds another distilled object (classes, PPC or latent size differ)")
        with torch.no_grad():
            self.latents.copy_(state["latents"])
            self.alpha.copy_(state["alpha"])
        try:
            self.decoder.load_state_dict(state["decoder"])
        except RuntimeError as e:
            raise D3FastError(f"the checkpoint's decoder does not match this run ({str(e).splitlines()[0]})") from None


def decoder_holding(meta: dict[str, Any], stored: dict[str, torch.Tensor]) -> Decoder:
    """The decoder `meta` describes (a checkpoint's or an export's), once its tensor shapes
    are known to equal the stored ones: checked on the meta device first, where nothing is allocated, so that a damaged
    width (say 50,000: an 80 GB decoder) is refused instead of built.

    Raises:
        D3FastError: settings that build no decoder, or one of other shapes.
    """
    try:
        with torch.device("meta"):
            shapes = {k: tuple(v.shape) for k, v in build_decoder(meta).state_dict().items()}
        held = {k: tuple(v.shape) for k, v in stored.items()}
        if shapes != held:
            diff = sorted(set(shapes.items()) ^ set(held.items()), key=str)[:3]
            raise D3FastError(f"the stored decoder does not match its settings (differing: {diff})")
        return build_decoder(meta)
    except (KeyError, ValueError, TypeError, RuntimeError, OverflowError) as e:
        raise D3FastError(f"the decoder settings stored with it are unusable ({type(e).__name__}: {e})") from None


def build_decoder(meta: dict[str, Any]) -> Decoder:
    """The decoder `meta` describes. Checkpoints and exports from before the medium and
    large decoders have no "decoder_linear": their decoders always have the linear layer.

    Raises:
        D3FastError: a decoder_linear that is not true/false, or settings Decoder refuses.
    """
    linear = meta.get("decoder_linear", True)
    if not isinstance(linear, bool):
        raise D3FastError(f"the stored decoder_linear must be true or false, got {linear!r}")
    return Decoder(
        meta["resolution"], meta["channels"], meta["mean"], meta["std"],
        z_dim=meta["z_dim"], kind=meta["decoder"], width=meta["decoder_width"], linear=linear,
    )


def check_soft_labels(d: Distilled | Merged, where: str) -> None:
    s = d.soft_labels
    if s is not None and (s.dim() != 2 or s.shape[0] != d.num_priors or not torch.isfinite(s).all()):
        raise D3FastError(f"the soft labels of {where} do not fit the object ({list(s.shape)} for {d.num_priors} "
                          "priors, or not finite): label it again with `d3fast label`")


@dataclass
class Merged:
    """The S subtask objects of one dataset as one distilled object (docs/algorithm.md
    section 9). Prior i of the merged order is prior i - offset of the part holding it;
    class c's priors are c * PPC .. c * PPC + PPC - 1, as in a single object."""

    parts: list[Distilled]  # in class order: part k holds classes offsets[k] .. offsets[k+1]-1
    classes: list[str]
    ppc: int
    soft_labels: torch.Tensor | None = field(default=None, repr=False)  # [C * PPC, C]
    # the runs it was merged from: [{"run", "subtask", "step", ...}]
    sources: list[dict[str, Any]] = field(default_factory=list)
    zca: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)  # as Distilled.zca

    def sample(self, n_per_class: int, pixels: bool = True, bn: str = "running", seed: int = 0,
               batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """`sample_images` of this object (each class through its own subtask's decoder)."""
        return sample_images(self, n_per_class, pixels, bn, seed, batch_size)

    @classmethod
    def of(cls, parts: list[Distilled], soft_labels: torch.Tensor | None = None,
           sources: list[dict[str, Any]] | None = None) -> Merged:
        """Raises D3FastError: parts of another PPC, resolution, channels or normalisation."""
        if not parts:
            raise D3FastError("nothing to merge")
        first = parts[0]
        for p in parts[1:]:
            if p.ppc != first.ppc:
                raise D3FastError(f"cannot merge objects of {first.ppc} and {p.ppc} priors per class")
            if p.storage != first.storage:
                raise D3FastError(f"cannot merge objects stored as {first.storage} and {p.storage} (distill.storage): "
                                  "distill the subtasks with one storage")
            same = ("resolution", "channels", "mean", "std")
            if any(p.meta[k] != first.meta[k] for k in same):
                raise D3FastError("cannot merge objects of other image sizes or normalisation (resolution, channels, "
                                  "mean/std differ)")
        classes = [c for p in parts for c in p.classes]
        m = cls(parts, classes, first.ppc, soft_labels, list(sources or []))
        check_soft_labels(m, "the merged object")
        return m

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def num_priors(self) -> int:
        return sum(p.num_priors for p in self.parts)

    @property
    def meta(self) -> dict[str, Any]:
        return self.parts[0].meta

    @property
    def latents(self) -> torch.Tensor:
        """Every prior's [mean, log-variance], merged order: [C * PPC, z, 2] when the parts
        share z_dim (for counting and inspection; decoding goes through `Sampler`)."""
        return torch.cat([p.latents for p in self.parts]) if len({p.latents.shape[1:] for p in self.parts}) == 1 \
            else torch.empty(self.num_priors, 0, 2)

    @property
    def labels(self) -> torch.Tensor:
        return torch.arange(self.num_classes, device=self.parts[0].latents.device).repeat_interleave(self.ppc)

    @property
    def student_lr(self) -> float:
        """The mean of the parts' learned student lrs: each was learned for its subtask's
        students; the merged students train on every class (the reference evaluates its
        merged objects at a fixed lr, lr_teacher)."""
        return sum(p.student_lr for p in self.parts) / len(self.parts)

    def storage_bytes(self) -> int:
        """The parts' bytes (latents, decoders, lrs, in each part's storage) + the soft labels
        (in the first part's storage: `d3fast merge` takes parts of one storage)."""
        soft = 0 if self.soft_labels is None else stored_bytes(self.soft_labels.shape, self.parts[0].storage)
        return sum(p.storage_bytes() for p in self.parts) + soft

    def images_per_class_equivalent(self) -> float:
        """`storage_bytes` in uint8 images per class (`storage.ipc_equivalent`)."""
        return ipc_equivalent(self.storage_bytes(), self.num_classes, self.meta["channels"], self.meta["resolution"])

    def stored(self) -> Merged:
        """`Distilled.stored` of every part, the soft labels round-tripped in the parts' storage."""
        s = self.parts[0].storage
        soft = None if self.soft_labels is None else round_trip(self.soft_labels, s)
        return Merged.of([p.stored() for p in self.parts], soft, self.sources)

    def to(self, device: torch.device | str) -> Merged:
        for p in self.parts:
            p.latents, p.alpha, p.decoder = p.latents.to(device), p.alpha.to(device), p.decoder.to(device)
        if self.soft_labels is not None:
            self.soft_labels = self.soft_labels.to(device)
        return self


def sample_images(d: Distilled | Merged, n_per_class: int, pixels: bool = True, bn: str = "running", seed: int = 0,
                  batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(images [C * n, channels, H, W], labels [C * n] int64), class-major: n fresh samples
    per class (each prior equally often; `draw_set`). `pixels`: in [0, 1]
    (normalisation and, with `d.zca`, ZCA undone), else normalised as students see them.
    `bn`: "running" decodes in eval mode (the BatchNorm statistics gathered while
    distilling), "batch" in train mode (each batch's own statistics, as while distilling and
    eval.decoder_bn's default). The object is not changed.

    Raises:
        D3FastError: n_per_class < 1, a bn other than running/batch, or more images than the
            device's free memory holds.
    """
    if not (isinstance(n_per_class, int) and isinstance(batch_size, int) and isinstance(seed, int)) \
            or isinstance(n_per_class, bool) or n_per_class < 1 or batch_size < 1 or not 0 <= seed < 2**63 \
            or bn not in ("running", "batch"):
        raise D3FastError(f"sample: n_per_class must be >= 1, batch_size >= 1 and seed in [0, 2^63) (integers), bn "
                          f"running or batch; got {n_per_class!r}, {batch_size!r}, {seed!r}, {bn!r}")
    _fits(d, n_per_class)
    x, y, _ = draw_set(d, n_per_class, seed, bn, batch_size)
    return (to_pixels(x, d.meta, d.zca) if pixels else x), y


def _fits(d: Distilled | Merged, n_per_class: int) -> None:
    """Refuse a draw whose images (float32, and as many again while decoding and converting)
    exceed the free memory of the object's device, before allocating any.

    Raises:
        D3FastError: naming the bytes needed and free."""
    from d3fast.runtime import free_memory

    res, ch = int(d.meta["resolution"]), int(d.meta["channels"])
    need = 2 * d.num_classes * n_per_class * ch * res * res * 4
    device = d.parts[0].latents.device
    free = free_memory(device)
    if need > free:
        raise D3FastError(f"sample: {n_per_class:,} per class x {d.num_classes} classes of {ch}x{res}x{res} needs "
                          f"~{need / 2**30:,.1f} GiB, more than the {free / 2**30:.1f} GiB free on {device}; draw "
                          "fewer per call")


class Sampler:
    """Fresh samples of a distilled or merged object through copies of its decoder(s), in
    train mode (BatchNorm on the batch's statistics, as while distilling: `bn="batch"`) or
    eval mode (the running statistics: `bn="running"`). The object is not changed."""

    def __init__(self, d: Distilled | Merged, bn: str = "batch") -> None:
        self.parts = d.parts
        self.decoders = [copy.deepcopy(p.decoder).train(bn == "batch") for p in self.parts]
        counts = [p.num_priors for p in self.parts]
        self.starts = [sum(counts[:k]) for k in range(len(counts) + 1)]

    @torch.no_grad()
    def __call__(self, priors: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Samples of priors `priors` ([B], merged order) -> normalised images [B, C, H, W]."""
        if len(self.parts) == 1:
            return self.decoders[0](self.parts[0].sample_latents(priors, generator))
        out: torch.Tensor | None = None
        for k, (part, dec) in enumerate(zip(self.parts, self.decoders, strict=True)):
            rows = torch.nonzero((priors >= self.starts[k]) & (priors < self.starts[k + 1])).flatten()
            if len(rows) == 0:
                continue
            x = dec(part.sample_latents(priors[rows] - self.starts[k], generator))
            if out is None:
                out = x.new_empty((len(priors), *x.shape[1:]))
            out[rows] = x
        assert out is not None, "no prior of any part"
        return out

    @torch.no_grad()
    def means(self) -> torch.Tensor:
        """f(mu) of every prior, merged order: [C * PPC, C, H, W] (each part's priors as one batch)."""
        return torch.cat([dec(p.latents[..., 0]) for p, dec in zip(self.parts, self.decoders, strict=True)])


def init_distilled(
    num_classes: int, ppc: int, classes: list[str], meta: dict[str, Any], lr_teacher: float,
    device: torch.device, seed: int, dtype: torch.dtype = torch.float32,
) -> Distilled:
    """Latents ~ N(0, 1) (mean and log-variance alike, as the reference), a fresh decoder;
    drawn in float32 and then cast to `dtype`, so a float64 run starts where a float32 one does."""
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(num_classes * ppc, meta["z_dim"], 2, generator=g)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        decoder = build_decoder(meta)
    if not math.isfinite(lr_teacher) or lr_teacher <= 0:
        raise D3FastError(f"distill.lr_teacher must be finite and positive, got {lr_teacher}")
    # the alpha whose lr (Distilled.lr) is lr_teacher; leaky_relu: alpha = lr_teacher as the
    # reference (its lr is lr_teacher + 1e-4)
    alpha = math.log(lr_teacher) if lr_param_of(meta) == "log" else lr_teacher
    return Distilled(
        latents=latents.to(device, dtype).requires_grad_(True),
        decoder=decoder.to(device, dtype),
        alpha=torch.tensor(alpha, device=device).to(dtype).requires_grad_(True),
        num_classes=num_classes,
        ppc=ppc,
        classes=classes,
        meta=meta,
    )


def draw_set(
    d: Distilled | Merged, per_class: int, seed: int, bn: str = "batch", batch_size: int = 256
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """K = `per_class` samples of every class, class-major: (images [C * K, C, H, W]
    normalised, labels [C * K] int64, soft labels [C * K, classes] or None). Sample k of class
    c comes from prior c * PPC + k mod PPC (every prior equally often); the order is shuffled
    with `seed` and decoded `batch_size` at a time, as eval's students are fed."""
    dev = d.parts[0].latents.device
    g = torch.Generator(device=dev).manual_seed(seed)
    labels = torch.arange(d.num_classes, device=dev).repeat_interleave(per_class)
    priors = labels * d.ppc + torch.arange(per_class, device=dev).repeat(d.num_classes) % d.ppc
    order = torch.randperm(len(priors), generator=g, device=dev)
    sample = Sampler(d, bn)
    images: torch.Tensor | None = None
    for rows in order.split(batch_size):
        x = sample(priors[rows], g)
        if images is None:
            images = x.new_empty((len(priors), *x.shape[1:]))
        images[rows] = x
    assert images is not None
    if not bool(torch.isfinite(images).all()):  # never hand on NaN images (a set of them trains to chance)
        raise D3FastError(f"decoding gave {int((~torch.isfinite(images)).sum()):,} non-finite pixel values: the "
                          "object's latents or decoder weights are out of range")
    soft = None if d.soft_labels is None else d.soft_labels[priors]
    return images, labels, soft
