"""Image → model input tensor, following the bundle's input spec.

Decoding is the expensive part on a Pi, so JPEGs are decoded at reduced scale (draft mode) when
the model input is much smaller than the photo, and resizing reduces by whole factors first.
Normalisation is folded into the input quantisation: for a uint8/int8 model a 256-entry lookup
table per channel maps pixels straight to the quantised values the model expects.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import ImageError, ImageTooLargeError

DEFAULT_MAX_PIXELS = 50_000_000  # a 12 MP HQ camera frame is well below; a bomb is far above
RESIZE_MODES = ("center-crop", "squash", "letterbox")
# Shrink by a whole factor (box filter, fast) as far as possible, then resample the rest: about
# half the cost of a direct bilinear resize from camera size, and antialiased all the same.
REDUCING_GAP = 1.0

ImageSource = str | Path | bytes | BinaryIO | Image.Image


# What the kit decodes: the formats of cameras, phones and scanners. Others (ICO, PSD, EPS,
# ...) are refused before any pixel is decoded: an ICO's directory can claim 16×16 around an
# embedded 9000×9000 PNG.
FORMATS = ("JPEG", "PNG", "TIFF", "BMP", "WEBP", "GIF")  # JPEG includes phones' MPO
# Decoded images are kept no larger than this: the shorter side at least KEEP_SIDE (the stored
# snapshot's resolution) and at most about KEEP_PIXELS, never below the model's input.
KEEP_SIDE = 1024
KEEP_PIXELS = 4_000_000
BYTES_PER_PIXEL = {"1": 1, "L": 1, "P": 1, "LA": 2, "PA": 2, "I;16": 2, "I;16B": 2, "I;16L": 2,
                   "I;16N": 2, "RGB": 3, "YCbCr": 3, "LAB": 3, "HSV": 3, "RGBA": 4, "RGBX": 4,
                   "RGBa": 4, "CMYK": 4, "I": 4, "F": 4}
STRIP_ROWS = 256  # rows converted at a time when an image is shrunk
# Pillow decodes every WebP through libwebp's animation decoder, which holds several full RGBA
# canvases: a 2 KB 49-megapixel WebP took 760 MB (measured). WebP from cameras and phones is
# far smaller than this.
WEBP_MAX_PIXELS = 12_000_000


def decoded_bytes(img: Image.Image) -> int:
    """What decoding ``img`` (opened, not loaded; after any draft) will allocate. GIF and WebP
    decoders build full RGBA frames beside the image, whatever its mode (measured)."""
    per_pixel = BYTES_PER_PIXEL.get(img.mode, 4)
    if img.format == "GIF":
        per_pixel += 4
    elif img.format == "WEBP":
        per_pixel += 12  # the animation decoder's canvases (measured)
    return img.width * img.height * per_pixel


def open_image(
    source: ImageSource,
    target: tuple[int, int] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    budget: Callable[[int], AbstractContextManager] | None = None,
) -> Image.Image:
    """Decode to an 8-bit RGB image, EXIF orientation applied; refuse bombs, broken files and
    formats the kit does not take.

    ``target`` is (width, height) of the model input. The decode never keeps more than it
    needs: JPEG decodes at 1/2..1/8 scale (draft), other formats are shrunk by a whole factor
    right after decoding, strip by strip in their own mode (no full-size float or RGB copy), to
    a shorter side of about ``KEEP_SIDE`` (never below ``target``). ``budget(nbytes)``, when
    given, is held while the full-size pixels exist (the daemon bounds concurrent decodes).
    """
    if isinstance(source, Image.Image):
        img = source
    else:
        name = str(source) if isinstance(source, (str, Path)) else "upload"
        if isinstance(source, (str, Path)):
            path = Path(source)
            if not path.is_file():
                raise ImageError(f"{path}: no such file")
            if path.stat().st_size == 0:
                raise ImageError(f"{path}: empty file")
        elif isinstance(source, bytes):
            if not source:
                raise ImageError("empty image data")
            source = io.BytesIO(source)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img = Image.open(source, formats=FORMATS)
                if img.width * img.height > max_pixels:
                    raise ImageTooLargeError(
                        f"{name}: {img.width}×{img.height} pixels is more than the "
                        f"{max_pixels:,} allowed (decompression bomb guard)"
                    )
                if img.format == "WEBP" and img.width * img.height > WEBP_MAX_PIXELS:
                    raise ImageTooLargeError(
                        f"{name}: a {img.width}×{img.height} WebP is more than the "
                        f"{WEBP_MAX_PIXELS:,} pixels the kit decodes in that format (its decoder "
                        "needs several copies); send it as JPEG or PNG"
                    )
                if img.format in ("JPEG", "MPO"):
                    side = max(KEEP_SIDE, *(target or (0,)))
                    img.draft("RGB", (side, side))
                with budget(decoded_bytes(img)) if budget else contextlib.nullcontext():
                    img.load()
                    img = _shrink(img, _factor(img.size, target))
        except ImageError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageTooLargeError(f"{name}: too many pixels (decompression bomb guard)") from exc
        except UnidentifiedImageError as exc:
            raise ImageError(
                f"{name}: not a readable image (the kit reads {', '.join(FORMATS)})"
            ) from exc
        except (OSError, SyntaxError, ValueError) as exc:
            raise ImageError(f"{name}: damaged or truncated image ({_plain(exc)})") from exc
    img = ImageOps.exif_transpose(img) or img
    return to_rgb(img)


def _plain(exc: BaseException) -> str:
    """An error's text without object addresses (a library's repr of a stream, say)."""
    import re

    return re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "the image", str(exc))


def _factor(size: tuple[int, int], target: tuple[int, int] | None) -> int:
    """The whole factor to shrink a decoded image by (1: keep it)."""
    w, h = size
    short = min(w, h)
    keep = max(1, short // KEEP_SIDE)
    pixels = int(np.ceil(np.sqrt(w * h / KEEP_PIXELS)))
    floor = max(target) if target else 1
    return max(1, min(max(keep, pixels), short // max(1, floor)))


def _shrink(img: Image.Image, k: int) -> Image.Image:
    """``img`` reduced by ``k`` (box filter), strip by strip, in an 8-bit or native mode that
    :func:`to_rgb` finishes; ``k`` 1 returns it as it is."""
    if k < 2:
        return img
    w, h = img.width // k * k, img.height // k * k
    mode = img.mode
    if mode.startswith("I;16"):
        out_mode = "L"
    elif mode in ("P", "PA"):
        out_mode = "RGBA" if mode == "PA" or "transparency" in img.info else "RGB"
    elif mode == "1":
        out_mode = "L"
    else:
        out_mode = mode
    out = Image.new(out_mode, (w // k, h // k))
    step = max(k, STRIP_ROWS // k * k)
    for y in range(0, h, step):
        strip = img.crop((0, y, w, min(h, y + step)))
        if mode.startswith("I;16"):
            a = np.asarray(strip, dtype=np.float32)
            a = a.reshape(a.shape[0] // k, k, a.shape[1] // k, k).mean(axis=(1, 3))
            small = Image.fromarray(np.clip(a / 65535.0 * 255.0, 0, 255).astype(np.uint8), "L")
        else:
            if strip.mode != out_mode:
                strip = strip.convert(out_mode)
            small = strip.reduce(k)
        out.paste(small, (0, y // k))
    out.info = dict(img.info)
    exif = img.getexif()
    if exif:
        out.info["exif"] = exif.tobytes()
    return out


def to_rgb(img: Image.Image) -> Image.Image:
    """Grayscale, palette, RGBA, CMYK and 16-bit images become 8-bit RGB (by the time an image
    gets here it is at most about KEEP_PIXELS, so the float copy below is small)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = arr.max() if arr.size else 0.0
        if img.mode.startswith("I;16") or (img.mode == "I" and top > 255):
            arr = arr / (65535.0 if top > 255 or img.mode.startswith("I;16") else 255.0) * 255.0
        elif img.mode == "F" and top <= 1.0:
            arr = arr * 255.0
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def resize(img: Image.Image, size: tuple[int, int], mode: str) -> Image.Image:
    """Resize to (height, width) by ``mode``; reduce by whole factors first (reducing_gap)."""
    h, w = size
    if mode == "squash":
        return img.resize((w, h), Image.Resampling.BILINEAR, reducing_gap=REDUCING_GAP)
    if mode == "center-crop":
        scale = max(w / img.width, h / img.height)
        rw, rh = max(w, round(img.width * scale)), max(h, round(img.height * scale))
        left, top = (rw - w) / 2, (rh - h) / 2
        box = (left / scale, top / scale, (left + w) / scale, (top + h) / scale)
        return img.resize((w, h), Image.Resampling.BILINEAR, box=box, reducing_gap=REDUCING_GAP)
    if mode == "letterbox":
        scale = min(w / img.width, h / img.height)
        rw, rh = max(1, round(img.width * scale)), max(1, round(img.height * scale))
        inner = img.resize((rw, rh), Image.Resampling.BILINEAR, reducing_gap=REDUCING_GAP)
        canvas = Image.new("RGB", (w, h), (0, 0, 0))
        canvas.paste(inner, ((w - rw) // 2, (h - rh) // 2))
        return canvas
    raise ValueError(f"resize mode must be one of {RESIZE_MODES}, not {mode!r}")


_CV2: list = []


def opencv():
    """OpenCV when installed (python3-opencv on Raspberry Pi OS, or the usb-camera extra)."""
    if not _CV2:
        try:
            import cv2

            cv2.setNumThreads(1)  # the interpreter owns the cores
            _CV2.append(cv2)
        except ImportError:
            _CV2.append(None)
    return _CV2[0]


def resize_array(rgb: np.ndarray, size: tuple[int, int], mode: str) -> np.ndarray:
    """Like :func:`resize` for a camera frame already in memory, several times faster with
    OpenCV (the same reduce-then-bilinear scheme). Without OpenCV it is exactly :func:`resize`.
    """
    cv2 = opencv()
    if cv2 is None:
        return np.asarray(resize(Image.fromarray(rgb), size, mode), dtype=np.uint8)
    h, w = size
    src_h, src_w = rgb.shape[:2]

    def fit(img: np.ndarray, out_w: int, out_h: int) -> np.ndarray:
        # Area-average by a whole factor first (OpenCV's fast integer path, antialiased), then
        # bilinear for the rest: a quarter of the cost of one non-integer INTER_AREA resize.
        k = int(min(img.shape[1] / out_w, img.shape[0] / out_h))
        if k >= 2:
            ih, iw = img.shape[0] - img.shape[0] % k, img.shape[1] - img.shape[1] % k
            img = cv2.resize(img[:ih, :iw], (iw // k, ih // k), interpolation=cv2.INTER_AREA)
        if (img.shape[1], img.shape[0]) == (out_w, out_h):
            return np.ascontiguousarray(img)
        return cv2.resize(img, (out_w, out_h), interpolation=cv2.INTER_LINEAR)

    if mode == "squash":
        return fit(rgb, w, h)
    if mode == "center-crop":
        scale = max(w / src_w, h / src_h)
        crop_w, crop_h = min(src_w, round(w / scale)), min(src_h, round(h / scale))
        x0, y0 = (src_w - crop_w) // 2, (src_h - crop_h) // 2
        return fit(rgb[y0 : y0 + crop_h, x0 : x0 + crop_w], w, h)
    if mode == "letterbox":
        scale = min(w / src_w, h / src_h)
        rw, rh = max(1, round(src_w * scale)), max(1, round(src_h * scale))
        canvas = np.zeros((h, w, 3), dtype=np.uint8)
        y0, x0 = (h - rh) // 2, (w - rw) // 2
        canvas[y0 : y0 + rh, x0 : x0 + rw] = fit(rgb, rw, rh)
        return canvas
    raise ValueError(f"resize mode must be one of {RESIZE_MODES}, not {mode!r}")


@dataclass
class InputAdapter:
    """Turns an (H, W, 3) uint8 RGB array into the model's input tensor."""

    shape: tuple[int, ...]
    dtype: np.dtype
    mean: np.ndarray
    std: np.ndarray
    scale: float
    zero_point: int
    bgr: bool = False

    @classmethod
    def for_model(cls, detail: dict[str, Any], spec: dict[str, Any]) -> InputAdapter:
        scale, zero = detail.get("quantization", (0.0, 0))
        norm = spec["normalization"]
        adapter = cls(
            shape=tuple(int(d) for d in detail["shape"]),
            dtype=np.dtype(detail["dtype"]),
            mean=np.asarray(norm["mean"], dtype=np.float64),
            std=np.asarray(norm["std"], dtype=np.float64),
            scale=float(scale),
            zero_point=int(zero),
            bgr=spec.get("color_order", "RGB") == "BGR",
        )
        adapter._build()
        return adapter

    def _build(self) -> None:
        self._lut: np.ndarray | None = None
        self._same_lut = False
        self._identity = False
        if self.dtype in (np.uint8, np.int8):
            if self.scale <= 0:
                raise ImageError("the model's integer input has no quantisation scale")
            info = np.iinfo(self.dtype)
            pixels = np.arange(256, dtype=np.float64)
            real = (pixels[None, :] - self.mean[:, None]) / self.std[:, None]
            # Ties go up, the same way for every pixel. With MobileNet's 127.5 and a zero point of
            # 127 every pixel sits half a step between two codes; round-half-to-even sent odd
            # and even pixels opposite ways and merged them in pairs (7 bits of input left).
            # Snapping first keeps float32 noise in the scale from deciding the tie.
            x = np.round(real / self.scale + self.zero_point, 3)
            q = np.clip(np.floor(x + 0.5), info.min, info.max)
            self._lut = q.astype(self.dtype)  # (3, 256)
            self._same_lut = bool((self._lut == self._lut[0]).all())
            if self.dtype == np.uint8 and all(
                np.array_equal(self._lut[c], np.arange(256)) for c in range(3)
            ):
                self._identity = True
        elif self.dtype != np.float32:
            raise ImageError(f"unsupported model input type {self.dtype}")

    @property
    def size(self) -> tuple[int, int]:
        return self.shape[1], self.shape[2]

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        if self.bgr:
            rgb = rgb[..., ::-1]
        if self._identity:
            out = rgb
        elif self._lut is not None and self._same_lut:
            out = np.take(self._lut[0], rgb)  # one pass when all channels share mean and std
        elif self._lut is not None:
            out = np.empty(rgb.shape, dtype=self.dtype)
            for c in range(3):
                np.take(self._lut[c], rgb[..., c], out=out[..., c])
        else:
            out = ((rgb.astype(np.float32) - self.mean) / self.std).astype(np.float32)
        return np.ascontiguousarray(out, dtype=self.dtype).reshape(self.shape)


# Test-time augmentation: views of a prepared (H, W, 3) input that a lesion or a smear looks the
# same in. Each is a view of the same pixels (no interpolation), so the model input of every
# view is exactly what the plain path would give that rotated image.
TTA_VIEWS: dict[str, Any] = {
    "identity": lambda a: a,
    "flip_lr": lambda a: a[:, ::-1],
    "flip_ud": lambda a: a[::-1],
    "rot180": lambda a: a[::-1, ::-1],
    "rot90": lambda a: np.rot90(a, 1),
    "rot270": lambda a: np.rot90(a, 3),
}


def tta_views(rgb: np.ndarray, names: list[str]) -> list[np.ndarray]:
    """The prepared input under each named view, in order."""
    try:
        return [np.ascontiguousarray(TTA_VIEWS[n](rgb)) for n in names]
    except KeyError as exc:
        raise ValueError(f"unknown test-time view {exc}; known: {sorted(TTA_VIEWS)}") from None
