"""Image decoding for `d3fast prepare`, run in worker processes.

Imports only numpy and Pillow so that spawned workers start in well under a second.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageFile

# A truncated file must fail loudly, not decode into a half-grey image.
ImageFile.LOAD_TRUNCATED_IMAGES = False
# Pixels one image may decode to, checked from its header after JPEG's draft reduction and
# before any pixel is decoded: 64 MP is 192 MB of RGB. It replaces Pillow's own bomb check
# (a warning past 89 MP of the file's full size, an error past 178 MP), which would warn on a
# 108 MP JPEG that decodes at 1/8 scale to 1.7 MP.
MAX_DECODED_PIXELS = 64 * 2**20
Image.MAX_IMAGE_PIXELS = None


def decode_image(path: str | bytes, size: int, channels: int) -> np.ndarray:
    """Decode one image, a file's path or an encoded file's bytes (a Hugging Face dataset's
    rows), to uint8 [channels, size, size]: resize the short side to `size` (bilinear,
    antialiased when shrinking), then center-crop.

    JPEGs are first reduced in the DCT domain by a power of two that keeps both sides
    >= `size` (Pillow's draft mode): a 500x375 ImageNet photo decodes at 250x188, about
    3x faster than a full decode, and the final bilinear resize does the rest.

    Raises:
        ValueError: more than MAX_DECODED_PIXELS to decode (read from the header); what
            Pillow raises for a damaged file.
    """
    mode = "RGB" if channels == 3 else "L"
    with Image.open(io.BytesIO(path) if isinstance(path, bytes) else path) as src:
        src.draft(mode, (size, size))
        if src.size[0] * src.size[1] > MAX_DECODED_PIXELS:
            raise ValueError(f"{src.size[0]}x{src.size[1]} pixels to decode, more than the "
                             f"{MAX_DECODED_PIXELS // 2**20} MP limit of one image")
        im: Image.Image = to_8bit(src).convert(mode)
        w, h = im.size
        if min(w, h) != size:
            scale = size / min(w, h)
            nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
            im = im.resize((nw, nh), Image.Resampling.BILINEAR)
            w, h = nw, nh
        left, top = (w - size) // 2, (h - size) // 2
        if (w, h) != (size, size):
            im = im.crop((left, top, left + size, top + size))
        arr = np.asarray(im, dtype=np.uint8)
    # [H, W, C] -> [C, H, W]
    return arr.transpose(2, 0, 1).copy() if channels == 3 else arr[None].copy()


def to_8bit(im: Image.Image) -> Image.Image:
    """An 8-bit image (L, RGB, ...) from any Pillow mode, values scaled rather than clipped.

    16-bit greys (I;16*, and I holding values above 255) map 0..65535 to 0..255: Pillow's own
    convert("L") clips them, so a 16-bit ramp came out 98% white; I values above 65535 are
    read as 32-bit (0..2^31 - 1). Floats (F) in [0, 1] are scaled by 255, in [-1, 1] shifted
    first. Alpha (LA, RGBA, PA, palettes with a transparent colour) is composited
    over white: convert("RGB") would show whatever colour the transparent pixels hold.
    """
    mode = im.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        a = np.asarray(im).astype(np.float64)
        lo, top = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if mode == "F":
            # [0, 1] and [-1, 1] are the float conventions; anything else is read as 0..255
            a = (a + 1) / 2 if lo < 0 and lo >= -1 and top <= 1 else a
            scale = 255.0 if top <= 1.0 else 1.0
        elif mode == "I" and top <= 255:
            scale = 1.0
        elif top <= 65535:
            scale = 255.0 / 65535.0
        else:  # 32-bit integers
            scale = 255.0 / (2**31 - 1)
        return Image.fromarray(np.clip(np.rint(a * scale), 0, 255).astype(np.uint8), "L")
    if mode in ("LA", "La", "RGBA", "RGBa", "PA") or (mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im


def decode_chunk(
    task: tuple[int, list[str | bytes | None], int, int],
) -> tuple[int, np.ndarray, list[tuple[int, str]]]:
    """Decode rows start..start+len of a split, each a file's path or an encoded image's bytes
    (None: a row without an image); returns (start, images, [(offset, error), ...]).

    A row that fails leaves zeros in its slot and an error message naming the problem.
    """
    start, files, size, channels = task
    out = np.zeros((len(files), channels, size, size), dtype=np.uint8)
    errors: list[tuple[int, str]] = []
    for i, path in enumerate(files):
        try:
            if path is None:
                raise ValueError("the row holds no image (neither bytes nor a path)")
            out[i] = decode_image(path, size, channels)
        except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, ...
            errors.append((i, f"{type(e).__name__}: {e}"))
    return start, out, errors
