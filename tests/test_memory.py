"""Memory bounded by design: the worst images the kit allows decode within a budget, formats
that can lie about their size are refused before decoding, and a busy or short kit answers
503, never 500."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edge.daemon.budget import Busy, DecodeBudget
from edge.errors import ImageError
from edge.inference.preprocess import open_image

ROOT = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent(
    """
    import resource, sys
    sys.path.insert(0, {root!r})
    sys.path.insert(0, {scripts!r})
    from bench_upload_memory import worst_images
    images = worst_images({side})
    from edge.errors import ImageError
    from edge.inference.preprocess import open_image
    def vm_kb():
        for line in open("/proc/self/status"):
            if line.startswith("VmSize:"):
                return int(line.split()[1])
    limit = (vm_kb() + {headroom_mb} * 1024) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    for kind, data in images.items():
        try:
            img = open_image(data, target=(224, 224))
            print(kind, "decoded", img.size, flush=True)
        except ImageError as exc:
            print(kind, "refused", exc, flush=True)
    print("all done")
    """
)


def test_the_worst_allowed_images_decode_within_an_address_space_limit():
    """Each 49-megapixel image (16-bit PNG, RGBA PNG, float TIFF, JPEG, palette GIF, RGBA
    WebP, a three-page TIFF) decodes
    in a child whose address space may grow by only 400 MB past its start: one full-size copy
    of the pixels, shrunk strip by strip (a float64 copy of a 16-bit image alone is 392 MB)."""
    code = CHILD.format(root=str(ROOT), scripts=str(ROOT / "scripts"), side=7000,
                        headroom_mb=400)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert lines[-1] == "all done"
    decoded = [line for line in lines if " decoded " in line]
    refused = [line for line in lines if " refused " in line]
    assert len(decoded) == 7, out.stdout
    # A WebP that large is refused from its header: its decoder holds several canvases.
    assert len(refused) == 1 and refused[0].startswith("webp-rgba") and "WebP" in refused[0]
    for line in decoded:  # shrunk to the snapshot's size, never below the model's
        w, h = map(int, line.split("(")[1].rstrip(")").split(","))
        assert 1024 <= min(w, h) <= 2048


def _ico_with_png(side: int) -> bytes:
    """An ICO whose directory says 16×16 around an embedded side×side PNG."""
    png = io.BytesIO()
    Image.new("RGBA", (side, side), (0, 0, 0, 0)).save(png, "PNG")
    data = png.getvalue()
    header = struct.pack("<HHH", 0, 1, 1)
    entry = struct.pack("<BBBBHHII", 16, 16, 0, 0, 1, 32, len(data), 6 + 16)
    return header + entry + data


def test_formats_that_can_lie_about_their_size_are_refused_before_decoding():
    with pytest.raises(ImageError, match="not a readable image"):
        open_image(_ico_with_png(9000))
    buf = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buf, "PPM")
    with pytest.raises(ImageError, match="JPEG, PNG"):
        open_image(buf.getvalue())


def test_an_image_over_the_pixel_limit_is_refused_before_its_pixels_are_read():
    buf = io.BytesIO()
    Image.new("L", (8000, 8000)).save(buf, "PNG")
    with pytest.raises(ImageError, match="more than the 50,000,000 allowed"):
        open_image(buf.getvalue())


def test_errors_name_no_object_addresses():
    data = io.BytesIO()
    Image.new("RGB", (300, 300), (9, 9, 9)).save(data, "JPEG")
    with pytest.raises(ImageError) as err:
        open_image(data.getvalue()[:400])
    assert " at 0x" not in str(err.value)


def test_a_shrunk_16_bit_image_keeps_its_tones():
    ramp = (np.arange(4096, dtype=np.uint32) * 65535 // 4095).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(np.broadcast_to(ramp, (2200, 4096)).copy()).save(buf, "PNG")
    img = np.asarray(open_image(buf.getvalue(), target=(224, 224)))
    row = img[0, :, 0].astype(int)
    assert row[0] <= 1 and row[-1] >= 253 and (np.diff(row) >= 0).all()


def test_the_budget_lets_one_big_decode_run_and_answers_busy_past_its_wait():
    budget = DecodeBudget(100, wait_s=0.2)
    inside = threading.Event()
    release = threading.Event()

    def hold():
        with budget.hold(80):
            inside.set()
            release.wait(5)

    t = threading.Thread(target=hold)
    t.start()
    assert inside.wait(5)
    t0 = time.monotonic()
    with pytest.raises(Busy) as err, budget.hold(50):
        pass
    assert time.monotonic() - t0 >= 0.19
    assert err.value.status == 503
    with budget.hold(20):  # what fits goes at once
        assert budget.used == 100
    release.set()
    t.join()
    with budget.hold(10**9):  # larger than the whole budget: runs when alone
        assert budget.used == 100
    assert budget.used == 0
