"""Frame sources: replay (folder or video), picamera2 (CSI), v4l2 (USB)."""

from __future__ import annotations

from .base import Source, SourceError, SourceFinished
from .replay import ReplaySource

__all__ = ["Source", "SourceError", "SourceFinished", "ReplaySource", "make_source"]


def make_source(cfg) -> Source:
    """Build the source a ``SourceSection`` describes."""
    if cfg.kind == "replay":
        return ReplaySource(cfg.path, fps=cfg.fps, loop=cfg.loop)
    if cfg.kind == "picamera2":
        from .picamera2_source import Picamera2Source

        return Picamera2Source(
            cfg.width,
            cfg.height,
            (cfg.still_width, cfg.still_height),
            fps=cfg.fps,
            exposure_us=cfg.exposure_us,
            gain=cfg.gain,
            colour_gains=cfg.colour_gains,
        )
    if cfg.kind == "v4l2":
        from .v4l2 import V4l2Source

        return V4l2Source(
            cfg.path or "/dev/video0",
            cfg.width,
            cfg.height,
            cfg.fps,
            still_size=(cfg.still_width, cfg.still_height),
            exposure_us=cfg.exposure_us,
            gain=cfg.gain,
            white_balance_k=cfg.white_balance_k,
        )
    raise ValueError(f"unknown source kind {cfg.kind!r}")
