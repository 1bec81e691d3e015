"""MJPEG live view: the newest frame, encoded once per frame and shared by every viewer."""

from __future__ import annotations

import time

from flask import Blueprint, Response, current_app

bp = Blueprint("stream", __name__)
BOUNDARY = "fieldscopeframe"


def mjpeg(pipeline, fps: float, max_seconds: float | None = None):
    gap = 1.0 / fps if fps > 0 else 0.2
    last_id = -1
    started = time.monotonic()
    while pipeline.running:
        if max_seconds is not None and time.monotonic() - started > max_seconds:
            return
        item = pipeline.preview_jpeg()
        if item and item[0] != last_id:
            last_id, jpeg = item
            yield (
                (
                    f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\n"
                    f"Content-Length: {len(jpeg)}\r\n\r\n"
                ).encode()
                + jpeg
                + b"\r\n"
            )
        time.sleep(gap)


@bp.get("/stream.mjpg")
def stream():
    ext = current_app.extensions["fieldscope"]
    gen = mjpeg(ext["pipeline"], ext["cfg"].web.stream_fps)
    return Response(
        gen,
        mimetype=f"multipart/x-mixed-replace; boundary={BOUNDARY}",
        headers={"Cache-Control": "no-store"},
    )
