"""Decoding and preprocessing: orientation, colour modes, resize modes, quantised input."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from edge.errors import ImageError
from edge.inference.preprocess import KEEP_SIDE, InputAdapter, open_image, resize, to_rgb
from tests.conftest import require_module


def jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95, **kw)
    return buf.getvalue()


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    out = open_image(jpeg_bytes(img, exif=exif.tobytes()))
    assert out.size == (20, 40)


def test_grayscale_palette_rgba_and_16bit_become_rgb():
    gray = Image.new("L", (4, 4), 100)
    assert np.asarray(to_rgb(gray))[0, 0].tolist() == [100, 100, 100]
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([10, 20, 30] + [0] * 765)
    assert np.asarray(to_rgb(pal))[0, 0].tolist() == [10, 20, 30]
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))  # fully transparent → white background
    assert np.asarray(to_rgb(rgba))[0, 0].tolist() == [255, 255, 255]
    deep = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    assert deep.mode.startswith("I;16")
    assert np.asarray(to_rgb(deep))[0, 0].tolist() == [255, 255, 255]
    cmyk = Image.new("CMYK", (4, 4), (0, 0, 0, 0))
    assert np.asarray(to_rgb(cmyk))[0, 0].tolist() == [255, 255, 255]


def halves(w: int, h: int) -> Image.Image:
    """Left half red, right half blue, a green stripe 10% wide at each end."""
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:, : w // 2] = (255, 0, 0)
    arr[:, w // 2 :] = (0, 0, 255)
    arr[:, : w // 10] = (0, 255, 0)
    arr[:, w - w // 10 :] = (0, 255, 0)
    return Image.fromarray(arr)


def test_center_crop_cuts_the_sides_of_a_wide_image():
    out = np.asarray(resize(halves(400, 100), (50, 50), "center-crop"))
    assert out.shape == (50, 50, 3)
    assert not (out[..., 1] > 200).any()  # green ends cropped away
    assert out[25, 5].tolist() == [255, 0, 0] and out[25, 45].tolist() == [0, 0, 255]


def test_squash_keeps_everything():
    out = np.asarray(resize(halves(400, 100), (50, 50), "squash"))
    assert out.shape == (50, 50, 3)
    assert out[25, 1, 1] > 200 and out[25, 48, 1] > 200


def test_letterbox_pads_with_black():
    out = np.asarray(resize(halves(400, 100), (100, 100), "letterbox"))
    assert out.shape == (100, 100, 3)
    assert out[2, 50].tolist() == [0, 0, 0] and out[97, 50].tolist() == [0, 0, 0]
    assert out[50, 1, 1] > 200


def test_draft_mode_decodes_big_jpeg_smaller_but_large_enough():
    """Reduced in the decoder, but not below the stored snapshot's size (KEEP_SIDE)."""
    big = Image.new("RGB", (4000, 3200), (120, 30, 200))
    img = open_image(jpeg_bytes(big), target=(224, 224))
    assert KEEP_SIDE <= min(img.size) < 3200


def test_uint8_input_identity_fast_path():
    detail = {"shape": [1, 2, 2, 3], "dtype": np.uint8, "quantization": (0.0078125, 128)}
    spec = {"normalization": {"mean": [128] * 3, "std": [128] * 3}}
    adapter = InputAdapter.for_model(detail, spec)
    rgb = np.array([[[0, 128, 255], [1, 2, 3]], [[4, 5, 6], [7, 8, 9]]], np.uint8)
    assert adapter._identity
    assert np.array_equal(adapter(rgb)[0], rgb)
    # MobileNet's 127.5 with a scale of 1/128 is not the identity: values follow the formula
    spec = {"normalization": {"mean": [127.5] * 3, "std": [127.5] * 3}}
    adapter = InputAdapter.for_model(detail, spec)
    want = np.clip(np.floor((rgb - 127.5) / 127.5 / 0.0078125 + 128 + 0.5), 0, 255)
    assert not adapter._identity
    assert np.array_equal(adapter(rgb)[0], want)


def test_half_step_input_keeps_every_pixel_value():
    """The bundled models' input (scale float32(1/127.5), zero point 127, mean/std 127.5) puts
    each pixel exactly half a step between two codes; ties must not merge pixel values."""
    scale = float(np.float32(1 / 127.5))
    detail = {"shape": [1, 16, 16, 3], "dtype": np.uint8, "quantization": (scale, 127)}
    spec = {"normalization": {"mean": [127.5] * 3, "std": [127.5] * 3}}
    adapter = InputAdapter.for_model(detail, spec)
    rgb = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=2)
    got = adapter(rgb)[0]
    assert len(np.unique(got)) == 256  # no two pixel values share a code
    real = (got.astype(float) - 127) * scale
    assert np.abs(real - (rgb - 127.5) / 127.5).max() <= scale / 2 + 1e-6


def test_int8_input_folds_normalisation():
    detail = {"shape": [1, 1, 2, 3], "dtype": np.int8, "quantization": (0.02, -5)}
    spec = {"normalization": {"mean": [100, 110, 120], "std": [50, 60, 70]}}
    adapter = InputAdapter.for_model(detail, spec)
    rgb = np.array([[[0, 128, 255], [100, 110, 120]]], np.uint8)
    got = adapter(rgb)[0]
    mean, std = np.array([100, 110, 120]), np.array([50, 60, 70])
    want = np.clip(np.round((rgb - mean) / std / 0.02 - 5), -128, 127)
    assert got.dtype == np.int8
    assert np.array_equal(got, want)


def test_float_input_and_bgr():
    detail = {"shape": [1, 1, 1, 3], "dtype": np.float32, "quantization": (0.0, 0)}
    spec = {"normalization": {"mean": [0, 0, 0], "std": [255, 255, 255]}, "color_order": "BGR"}
    out = InputAdapter.for_model(detail, spec)(np.array([[[255, 0, 51]]], np.uint8))
    assert np.allclose(out[0, 0, 0], [0.2, 0.0, 1.0])


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims a huge canvas (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0"))
        + chunk(b"IEND", b"")
    )


def test_decompression_bomb_refused_before_decoding():
    with pytest.raises(ImageError, match="decompression bomb"):
        open_image(png_claiming(30000, 30000))


def test_truncated_jpeg(parrot, tmp_path):
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(parrot.read_bytes()[:3000])
    with pytest.raises(ImageError, match="damaged or truncated"):
        open_image(cut)


def test_empty_and_non_image_files(tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(ImageError, match="empty file"):
        open_image(empty)
    text = tmp_path / "notes.png"
    text.write_text("hello")
    with pytest.raises(ImageError, match="not a readable image"):
        open_image(text)
    with pytest.raises(ImageError, match="no such file"):
        open_image(tmp_path / "missing.jpg")


@pytest.mark.parametrize("mode", ["center-crop", "squash", "letterbox"])
@pytest.mark.parametrize("shape", [(480, 640), (960, 1280), (100, 120)])
def test_resize_array_matches_the_pillow_path(mode, shape, parrot):
    """The OpenCV fast path for camera frames gives the same picture as the Pillow path."""
    from edge.inference import preprocess

    if preprocess.opencv() is None:
        require_module("cv2", "resize_array is then the Pillow path itself")
    img = Image.open(parrot).convert("RGB").resize(shape[::-1])
    rgb = np.asarray(img)
    fast = preprocess.resize_array(rgb, (224, 224), mode)
    slow = np.asarray(resize(img, (224, 224), mode))
    assert fast.shape == slow.shape == (224, 224, 3) and fast.dtype == np.uint8
    assert np.abs(fast.astype(int) - slow.astype(int)).mean() < 4.0


def test_resize_array_without_opencv_is_the_pillow_path(parrot, monkeypatch):
    from edge.inference import preprocess

    monkeypatch.setattr(preprocess, "_CV2", [None])
    rgb = np.asarray(Image.open(parrot).convert("RGB").resize((640, 480)))
    out = preprocess.resize_array(rgb, (224, 224), "center-crop")
    assert np.array_equal(out, np.asarray(resize(Image.fromarray(rgb), (224, 224), "center-crop")))
