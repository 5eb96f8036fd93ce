"""How the distilled object's values are stored (distill.storage; docs/algorithm.md section 1):

    float32  4 bytes a value (what the object computes in)
    float16  2 bytes a value (IEEE half; values beyond +-65504 are refused, not stored as inf)
    int8     a tensor of 2 or more dimensions as signed 8-bit integers q in [-127, 127] with a
             float32 scale per output channel: x ~ q * s, s = max|x| / 127 over the channel
             (symmetric, round to nearest; Jacob et al. 2018, "Quantization and training of
             neural networks for efficient integer-arithmetic-only inference", section 2.1, with
             the zero point at 0; per-channel scales as Krishnamoorthi 2018, section 2.3)
    int4     the same with q in [-7, 7] and s = max|x| / 7, two values a byte
A channel is a slice along the first dimension (a Linear's or Conv2d's output channel, a
ConvTranspose2d's input channel, a prior's row of soft labels); the latents [P, z, 2] take a
scale per prior and per half (mean, log-variance), whose ranges differ. In the integer formats,
tensors of fewer dimensions (biases, BatchNorm parameters and statistics, alpha) stay float32:
a few thousand values of a decoder, which a scale per value would not make smaller.

`fake_quant` is the finishing phase's view (distill.quant_steps): the stored value forward, the
identity backward (the straight-through estimator; Bengio et al. 2013, arXiv 1308.3432), so the
float32 masters learn to decode well through their stored values. `stored_bytes` counts every
byte a format writes, scales included.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from d3fast.config import STORAGES
from d3fast.errors import D3FastError

# the largest |q| of each integer format
LEVELS = {"int8": 127, "int4": 7}
HALF_MAX = 65504.0


def check_storage(storage: str) -> str:
    if storage not in STORAGES:
        raise D3FastError(f"unknown storage format {storage!r}: one of {', '.join(STORAGES)}")
    return storage


def is_integer(storage: str, shape: Sequence[int]) -> bool:
    """Whether a tensor of `shape` is stored as integers with scales under `storage`."""
    return storage in LEVELS and len(shape) >= 2


def _scale_shape(shape: Sequence[int], latents: bool) -> tuple[int, ...]:
    """The scales' shape: one per channel (first dimension), and per half for the latents."""
    if latents:
        return (shape[0], *[1] * (len(shape) - 2), shape[-1])
    return (shape[0], *[1] * (len(shape) - 1))


def stored_bytes(shape: Sequence[int], storage: str, latents: bool = False) -> int:
    """Bytes a floating tensor of `shape` takes in `storage` (module docstring): values, and
    for the integer formats the float32 scales; int4 packs two values a byte (a tensor of an
    odd count pads one value)."""
    n = math.prod(shape)
    if storage == "float32":
        return 4 * n
    if storage == "float16":
        return 2 * n
    check_storage(storage)
    if not is_integer(storage, shape):
        return 4 * n
    scales = 4 * math.prod(_scale_shape(shape, latents))
    return (n if storage == "int8" else (n + 1) // 2) + scales


def _levels(x: torch.Tensor, storage: str, latents: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, s) of an integer format (module docstring), q still floating: s = max|x| / L per
    channel (and per half for the latents), q = round(x / s) clamped to [-L, L]; a channel of
    zeros has s = 0 and q = 0. The one formula `quantize` stores and `fake_quant` trains through."""
    top = LEVELS[storage]
    dims = tuple(range(1, x.dim() - 1)) if latents else tuple(range(1, x.dim()))
    scale = x.abs().amax(dim=dims, keepdim=True) / top
    return torch.round(x / torch.where(scale > 0, scale, 1.0)).clamp(-top, top), scale


def quantize(t: torch.Tensor, storage: str, latents: bool = False) -> dict[str, torch.Tensor]:
    """A floating tensor as `storage` stores it: {"values": ...} (float32, float16, int8, or
    int4 packed into uint8 [ceil(n / 2)]) and, for the integer formats, {"scale": float32}.

    Raises:
        D3FastError: non-finite values, values float16 cannot hold, an unknown format.
    """
    check_storage(storage)
    x = t.detach().float()
    if not torch.isfinite(x).all():
        raise D3FastError(f"a tensor of shape {list(x.shape)} holds non-finite values: it cannot be stored")
    if storage == "float32" or not is_integer(storage, x.shape) and storage != "float16":
        return {"values": x.contiguous()}
    if storage == "float16":
        if x.numel() and float(x.abs().max()) > HALF_MAX:
            raise D3FastError(f"a tensor of shape {list(x.shape)} holds values up to {float(x.abs().max()):.4g}, "
                              f"beyond float16's {HALF_MAX:g}: store it as float32 or int8")
        return {"values": x.half().contiguous()}
    q, scale = _levels(x, storage, latents)
    q = q.to(torch.int8)
    if storage == "int4":
        flat = (q.flatten() + 8).to(torch.uint8)  # 1..15; the pad is 8, a zero
        if flat.numel() % 2:
            flat = torch.cat([flat, flat.new_full((1,), 8)])
        q = flat[0::2] | (flat[1::2] << 4)
    return {"values": q.contiguous(), "scale": scale.contiguous()}


def dequantize(stored: dict[str, torch.Tensor], storage: str, shape: Sequence[int]) -> torch.Tensor:
    """The float32 tensor of `shape` that `quantize` stored.

    Raises:
        D3FastError: stored values or scales of the wrong dtype or size for `shape`.
    """
    check_storage(storage)
    values, shape = stored["values"], tuple(int(s) for s in shape)
    n = math.prod(shape)
    if not is_integer(storage, shape):
        want = torch.float16 if storage == "float16" else torch.float32
        if values.dtype != want or values.numel() != n:
            raise D3FastError(f"stored {storage} values of {values.dtype} [{values.numel()}] for a tensor of shape "
                              f"{list(shape)}")
        if "scale" in stored:
            raise D3FastError(f"scales for a tensor of shape {list(shape)}, which {storage} stores as floats")
        return values.float().reshape(shape)
    scale = stored.get("scale")
    packed = storage == "int4"
    want_dtype, want_n = (torch.uint8, (n + 1) // 2) if packed else (torch.int8, n)
    if values.dtype != want_dtype or values.numel() != want_n:
        raise D3FastError(f"stored {storage} values of {values.dtype} [{values.numel()}] for a tensor of shape "
                          f"{list(shape)} (want {want_dtype} [{want_n}])")
    # a scale per channel, or (latents) per channel and half: nothing else broadcasts as stored
    shapes = {_scale_shape(shape, False), _scale_shape(shape, True)}
    if scale is None or scale.dtype != torch.float32 or tuple(scale.shape) not in shapes \
            or not bool(torch.isfinite(scale).all()) or bool((scale < 0).any()):
        raise D3FastError(f"the {storage} scales of a tensor of shape {list(shape)} are missing or unusable")
    if packed:
        v = values.flatten()
        q = torch.stack([(v & 15), (v >> 4)], 1).flatten()[:n].to(torch.int8) - 8
        if bool((q < -7).any()):  # nibble 0 is no value int4 writes
            raise D3FastError(f"stored int4 values of a tensor of shape {list(shape)} hold -8: not written by d3fast")
    else:
        q = values
        if bool((q < -127).any()):
            raise D3FastError(f"stored int8 values of a tensor of shape {list(shape)} hold -128: not written by d3fast")
    return q.reshape(shape).float() * scale


def round_trip(t: torch.Tensor, storage: str, latents: bool = False) -> torch.Tensor:
    """`dequantize(quantize(t))` in t's dtype: the value the stored object holds.

    Raises:
        D3FastError: as `quantize`.
    """
    if storage == "float32":
        return t.detach().clone()
    return dequantize(quantize(t, storage, latents), storage, t.shape).to(t.dtype)


def fake_quant(t: torch.Tensor, storage: str, latents: bool = False) -> torch.Tensor:
    """The stored value forward, gradient 1 backward (straight-through; module docstring), in
    tensor ops only (no read-back: it runs in every decode of the finishing phase). A value
    float16 cannot hold becomes inf, a NaN stays NaN: the step's checks name them."""
    check_storage(storage)
    if storage == "float32" or storage != "float16" and not is_integer(storage, t.shape):
        return t
    x = t.detach()
    if storage == "float16":
        stored = x.half().to(t.dtype)
    else:
        q, scale = _levels(x, storage, latents)
        stored = q * scale
    return t + (stored - x)
