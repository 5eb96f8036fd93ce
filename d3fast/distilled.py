"""The distilled object: per-prior latent Gaussians, one shared decoder, labels, and the
learned student lr (docs/algorithm.md section 1). Sampling, storage accounting, its state
dict (the checkpoint's share, d3fast/state.py) and the safetensors export."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from d3fast.errors import D3FastError
from d3fast.io import load_tensors, save_tensors
from d3fast.models import Decoder
from d3fast.storage import decoder_state_values, ipc_equivalent

EXPORT_FORMAT = 1


@dataclass
class Distilled:
    latents: torch.Tensor  # [C * PPC, z, 2]: mean and log-variance
    decoder: Decoder
    alpha: torch.Tensor  # [] learnable student lr (pre-activation)
    num_classes: int
    ppc: int
    classes: list[str]
    meta: dict[str, Any]  # resolution, channels, mean, std, decoder kind/width/linear, z_dim

    @property
    def labels(self) -> torch.Tensor:
        """[C * PPC]: prior i belongs to class i // PPC."""
        return torch.arange(self.num_classes, device=self.latents.device).repeat_interleave(self.ppc)

    def params(self) -> list[torch.Tensor]:
        """Every learned tensor: latents, alpha, the decoder's parameters."""
        return [self.latents, self.alpha, *self.decoder.parameters()]

    def lr(self) -> torch.Tensor:
        """The student lr leaky_relu(alpha) + 1e-4, a 0-d tensor with alpha's graph."""
        return torch.nn.functional.leaky_relu(self.alpha) + 1e-4

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
        eps = torch.randn((len(idx), self.latents.shape[1]), generator=generator, device=self.latents.device,
                          dtype=self.latents.dtype)
        if rows is not None:
            idx, eps = idx[rows], eps[rows]
        lat = self.latents[idx]
        mu, logvar = lat[..., 0], lat[..., 1]
        return mu + eps * torch.exp(0.5 * logvar)

    def decode(self, idx: torch.Tensor, generator: torch.Generator | None, rows: slice | None = None) -> torch.Tensor:
        """Fresh samples of priors `idx` (rows `rows` of them): normalised images [B, C, H, W]."""
        return self.decoder(self.sample_latents(idx, generator, rows))

    def mean_images(self, priors: slice | None = None) -> torch.Tensor:
        """f(mu) for every prior (or the priors `priors`): [C * PPC, C, H, W]."""
        mu = self.latents[..., 0]
        return self.decoder(mu if priors is None else mu[priors])

    def storage_bytes(self) -> int:
        """Bytes to store the object as float32: latents + decoder weights and BatchNorm
        statistics + the lr (labels are implied by the prior order); d3fast/storage.py's
        formula, which `storage.object_bytes` computes from the settings alone."""
        return 4 * (self.latents.numel() + decoder_state_values(self.decoder) + 1)

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
    def from_state_dict(cls, state: dict[str, Any], device: torch.device | str = "cpu") -> Distilled:
        """Inverse of `state_dict` (also reads the distilled part of a whole checkpoint)."""
        meta, classes = json.loads(state["meta"]), json.loads(state["classes"])
        decoder = _decoder_holding(meta, state["decoder"])
        try:
            decoder.load_state_dict(state["decoder"])
        except RuntimeError as e:
            raise D3FastError(f"the checkpoint's decoder does not match its settings ({str(e).splitlines()[0]})") from None
        return cls(
            latents=state["latents"].to(device), decoder=decoder.to(device), alpha=state["alpha"].to(device),
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


def _decoder_holding(meta: dict[str, Any], stored: dict[str, torch.Tensor]) -> Decoder:
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


def export(d: Distilled, path: str | Path) -> None:
    """The object as one safetensors file (no pickle): latents, alpha, decoder.<key>, and
    the metadata decoding needs."""
    tensors = {"latents": d.latents.detach(), "alpha": d.alpha.detach().reshape(1)}
    tensors.update({f"decoder.{k}": v for k, v in d.decoder.state_dict().items()})
    meta = {
        "format": EXPORT_FORMAT,
        **d.meta,
        "classes": d.classes,
        "num_classes": d.num_classes,
        "ppc": d.ppc,
        "student_lr": d.student_lr,
        "storage_bytes": d.storage_bytes(),
        "images_per_class_equivalent": round(d.images_per_class_equivalent(), 3),
    }
    save_tensors(path, tensors, meta)


def load(path: str | Path, device: torch.device | str = "cpu") -> Distilled:
    """Load an exported distilled object (safetensors; no pickle)."""
    tensors, meta = load_tensors(path, "distilled object")
    if meta.get("format") != EXPORT_FORMAT or "latents" not in tensors:
        raise D3FastError(f"{path} is not a d3fast distilled export")
    state = {k[len("decoder."):]: v for k, v in tensors.items() if k.startswith("decoder.")}
    decoder = _decoder_holding(meta, state)
    decoder.load_state_dict(state)
    return Distilled(
        latents=tensors["latents"].to(device),
        decoder=decoder.to(device),
        alpha=tensors["alpha"].reshape(()).to(device),
        num_classes=meta["num_classes"],
        ppc=meta["ppc"],
        classes=meta["classes"],
        meta={**{k: meta[k] for k in ("resolution", "channels", "mean", "std", "z_dim", "decoder", "decoder_width")},
              "decoder_linear": meta.get("decoder_linear", True)},
    )


def init_distilled(
    num_classes: int, ppc: int, classes: list[str], meta: dict[str, Any], lr_teacher: float,
    device: torch.device, seed: int,
) -> Distilled:
    """Latents ~ N(0, 1) (mean and log-variance alike, as the reference), a fresh decoder."""
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(num_classes * ppc, meta["z_dim"], 2, generator=g)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        decoder = build_decoder(meta)
    if not math.isfinite(lr_teacher):
        raise D3FastError(f"distill.lr_teacher must be finite, got {lr_teacher}")
    return Distilled(
        latents=latents.to(device).requires_grad_(True),
        decoder=decoder.to(device),
        alpha=torch.tensor(lr_teacher, device=device).requires_grad_(True),
        num_classes=num_classes,
        ppc=ppc,
        classes=classes,
        meta=meta,
    )
