"""Where the model looked, drawn on the stored snapshot: the activation map (a few cells per
side) smoothed up to the part of the image the model saw and laid over it as a heat colour,
with the rest dimmed, so that it reads at a glance on a phone and on paper."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from ..inference.scope import to_png_map

MAX_SIDE = 800  # the overlay is for a screen or a printed page, not for measuring


def model_box(width: int, height: int, size: tuple[int, int], mode: str) -> tuple[int, ...]:
    """The region of a ``width``×``height`` image that the model's (h, w) input covers."""
    h, w = size
    if mode == "center-crop":
        scale = max(w / width, h / height)
        cw, ch = w / scale, h / scale
        left, top = (width - cw) / 2, (height - ch) / 2
        return round(left), round(top), round(left + cw), round(top + ch)
    return 0, 0, width, height  # squash and letterbox: the whole image (letterbox pads)


def overlay_png(
    snapshot: Path, values: list[list[float]], size: tuple[int, int], mode: str
) -> bytes:
    """PNG of ``snapshot`` with the map ``values`` over the region the model saw."""
    with Image.open(snapshot) as im:
        im.draft("RGB", (MAX_SIDE, MAX_SIDE))
        img = im.convert("RGB")
    img.thumbnail((MAX_SIDE, MAX_SIDE))
    left, top, right, bottom = model_box(img.width, img.height, size, mode)
    heat = to_png_map(np.asarray(values, dtype=np.float64)).astype(np.float32)
    cells = Image.fromarray(heat, mode="F")
    up = np.asarray(
        cells.resize((max(1, right - left), max(1, bottom - top)), Image.Resampling.BICUBIC),
        dtype=np.float32,
    ).clip(0, 1)
    base = np.asarray(img, dtype=np.float32)
    region = base[top:bottom, left:right]
    # Red where the evidence is moderate, yellow where it is strongest; low evidence dimmed.
    colour = np.stack([np.full_like(up, 255), 255 * up, np.zeros_like(up)], axis=-1)
    alpha = (0.6 * up)[..., None]
    dim = (0.45 + 0.55 * np.sqrt(up))[..., None]
    base[top:bottom, left:right] = region * dim * (1 - alpha) + colour * alpha
    out = io.BytesIO()
    Image.fromarray(base.clip(0, 255).astype(np.uint8)).save(out, "PNG", optimize=False)
    return out.getvalue()
