"""MJPEG live view: the newest frame, encoded once per frame and shared by every viewer.

A viewer holds a server thread for as long as it watches. The server has ``web.threads`` for
pages and the API plus ``web.max_streams`` for viewers, and this cap turns the viewer past that
away with 503 (Retry-After), so a room full of phones can never starve logins, uploads and
health checks.
"""

from __future__ import annotations

import threading
import time
from functools import lru_cache

from flask import Blueprint, Response, current_app, jsonify

bp = Blueprint("stream", __name__)
BOUNDARY = "fieldscopeframe"


KEEPALIVE_S = 2.0  # with no new frame (camera lost, paused), the last one is sent again


@lru_cache(maxsize=1)
def placeholder_jpeg() -> bytes:
    """A plain grey frame for a viewer that arrives before the camera's first frame."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (320, 240), (96, 96, 96)).save(buf, "JPEG", quality=60)
    return buf.getvalue()


def _part(jpeg: bytes) -> bytes:
    head = f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(jpeg)}\r\n\r\n"
    return head.encode() + jpeg + b"\r\n"


def mjpeg(pipeline, fps: float, max_seconds: float | None = None,
          keepalive_s: float = KEEPALIVE_S):
    """Each new frame once; with none for ``keepalive_s``, the last (or a placeholder) again:
    a viewer that left is only noticed when a write fails, and its slot must come back even
    while the camera is out."""
    gap = 1.0 / fps if fps > 0 else 0.2
    last_id, last_jpeg = -1, None
    started = sent_at = time.monotonic()
    while pipeline.running:
        now = time.monotonic()
        if max_seconds is not None and now - started > max_seconds:
            return
        item = pipeline.preview_jpeg()
        if item and item[0] != last_id:
            last_id, last_jpeg = item
            sent_at = now
            yield _part(last_jpeg)
        elif now - sent_at >= keepalive_s:
            sent_at = now
            yield _part(last_jpeg or placeholder_jpeg())
        time.sleep(gap)


class _Slot:
    """The response body: the frames, and the viewer's slot given back when the server closes
    the body (client gone, server stopping), even if no frame was ever sent."""

    def __init__(self, frames, slots: threading.BoundedSemaphore) -> None:
        self._frames, self._slots, self._open = frames, slots, True

    def __iter__(self):
        return self

    def __next__(self) -> bytes:
        return next(self._frames)

    def close(self) -> None:
        if self._open:
            self._open = False
            self._frames.close()
            self._slots.release()


def viewer_slots(app) -> tuple[threading.BoundedSemaphore, int]:
    ext = app.extensions["fieldscope"]
    if "stream_slots" not in ext:
        n = ext["cfg"].web.max_streams
        ext["stream_slots"] = (threading.BoundedSemaphore(max(n, 1)), n)
    return ext["stream_slots"]


@bp.get("/stream.mjpg")
def stream():
    ext = current_app.extensions["fieldscope"]
    slots, n = viewer_slots(current_app)
    if n == 0 or not slots.acquire(blocking=False):
        resp = jsonify(error=f"too many live viewers (at most {n}); the page retries by itself")
        resp.status_code = 503
        resp.headers["Retry-After"] = "5"
        return resp
    body = _Slot(mjpeg(ext["pipeline"], ext["cfg"].web.stream_fps), slots)
    return Response(
        body,
        mimetype=f"multipart/x-mixed-replace; boundary={BOUNDARY}",
        headers={"Cache-Control": "no-store"},
    )
