#!/usr/bin/env python3
"""Peak memory of the daemon under the worst uploads it allows.

Starts the shipped demo (`scripts/demo.toml`, both profiles) as a process on loopback, then
for each kind of "small file, huge decode" image just under the pixel limit (a 16-bit
greyscale PNG, an RGBA PNG, a 32-bit float TIFF, an 8-bit JPEG, a palette GIF) sends N at once
and samples the daemon's resident memory every 10 ms. Prints, per kind, the HTTP answers and
the peak RSS, and the daemon's high-water mark (VmHWM) at the end, with the machine line.

Usage: python scripts/bench_upload_memory.py [--concurrent 8] [--side 7000] [--json FILE]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from edge import hardware  # noqa: E402


def worst_images(side: int) -> dict[str, bytes]:
    """Each a few hundred KB or less on the wire, ``side``² pixels once decoded."""
    ramp = (np.arange(side, dtype=np.uint32) * 65535 // max(1, side - 1)).astype(np.uint16)
    out = {}
    buf = io.BytesIO()
    Image.fromarray(np.broadcast_to(ramp, (side, side)).copy()).save(buf, "PNG")
    out["png-16bit-grey"] = buf.getvalue()
    buf = io.BytesIO()
    Image.new("RGBA", (side, side), (200, 120, 90, 255)).save(buf, "PNG", optimize=True)
    out["png-rgba"] = buf.getvalue()
    buf = io.BytesIO()
    Image.new("F", (side, side), 0.5).save(buf, "TIFF", compression="tiff_deflate")
    out["tiff-float"] = buf.getvalue()
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (180, 140, 120)).save(buf, "JPEG", quality=50)
    out["jpeg-rgb"] = buf.getvalue()
    buf = io.BytesIO()
    Image.new("P", (side, side), 3).save(buf, "GIF")
    out["gif-palette"] = buf.getvalue()
    buf = io.BytesIO()
    Image.new("RGBA", (side, side), (90, 60, 40, 200)).save(buf, "WEBP", lossless=True)
    out["webp-rgba"] = buf.getvalue()
    buf = io.BytesIO()  # the largest WebP the kit decodes (WEBP_MAX_PIXELS)
    w = int(12_000_000 ** 0.5)
    Image.new("RGBA", (w, w), (90, 60, 40, 200)).save(buf, "WEBP", lossless=True)
    out["webp-12mp"] = buf.getvalue()
    buf = io.BytesIO()  # a multi-page TIFF: only the first page is ever decoded
    pages = [Image.new("L", (side, side), 100 + i) for i in range(3)]
    pages[0].save(buf, "TIFF", save_all=True, append_images=pages[1:], compression="tiff_lzw")
    out["tiff-3-pages"] = buf.getvalue()
    return out


def rss_kb(pid: int, key: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


class Session:
    """A browser's session: its cookie and CSRF token (uploads need both)."""

    def __init__(self, port: int) -> None:
        import http.cookiejar

        self.port = port
        self.opener = urllib.request.build_opener(
            urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
        with self.opener.open(f"http://127.0.0.1:{port}/api/session", timeout=10) as r:
            self.token = json.loads(r.read())["csrf_token"]


def upload(session: Session, data: bytes, name: str) -> int:
    boundary = "fieldscopebench"
    body = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{name}\"\r\n"
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode() + data + f"\r\n--{boundary}--\r\n".encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{session.port}/api/classify", data=body, method="POST",
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}",
                 "X-CSRFToken": session.token},
    )
    try:
        with session.opener.open(req, timeout=120) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return -1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--concurrent", type=int, default=8)
    p.add_argument("--side", type=int, default=7000, help="7000 → 49 MP, under the 50 MP limit")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    images = worst_images(args.side)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as data_dir:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen(
            [sys.executable, "-m", "edge", "serve", "--config", str(ROOT / "scripts/demo.toml"),
             "--port", str(port), "--data-dir", data_dir],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2)
                    break
                except OSError:
                    time.sleep(0.2)
            time.sleep(2)
            session = Session(port)
            base = rss_kb(proc.pid)
            print(hardware.machine_line())
            print(f"daemon at rest: {base / 1024:.0f} MB RSS; {args.concurrent} uploads at once "
                  f"of each {args.side}×{args.side} image")
            rows = []
            for kind, data in images.items():
                peak = [0]
                done = threading.Event()

                def sample(peak=peak, done=done) -> None:
                    while not done.is_set():
                        peak[0] = max(peak[0], rss_kb(proc.pid))
                        time.sleep(0.01)

                sampler = threading.Thread(target=sample)
                sampler.start()
                codes: list[int] = []

                def send(data=data, kind=kind, codes=codes) -> None:
                    codes.append(upload(session, data, kind))

                threads = [threading.Thread(target=send) for _ in range(args.concurrent)]
                t0 = time.monotonic()
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                done.set()
                sampler.join()
                row = {"kind": kind, "file_kb": round(len(data) / 1024), "answers": sorted(codes),
                       "peak_rss_mb": round(peak[0] / 1024), "seconds": round(
                           time.monotonic() - t0, 1)}
                rows.append(row)
                print(f"{kind:15s} {row['file_kb']:6d} KB: answers {row['answers']}, peak RSS "
                      f"{row['peak_rss_mb']} MB, {row['seconds']} s")
            hwm = rss_kb(proc.pid, "VmHWM")
            print(f"high-water mark over the run: {hwm / 1024:.0f} MB")
            if args.json:
                args.json.write_text(json.dumps({"machine": hardware.machine_line(),
                                                 "rest_mb": round(base / 1024), "rows": rows,
                                                 "hwm_mb": round(hwm / 1024)}, indent=2))
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
