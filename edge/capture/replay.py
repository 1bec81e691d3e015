"""Replay a folder of images (or a video file) as if it were a camera, looped at a set rate.

For demos, tests and re-screening stored slides. Unreadable files are skipped with a warning,
so one corrupt image never stops the loop.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ImageError
from ..inference.preprocess import open_image
from .base import Source, SourceError, SourceFinished

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
VIDEO_SUFFIXES = {".mp4", ".avi", ".mkv", ".mov", ".mjpg", ".mjpeg"}


class ReplaySource(Source):
    name = "replay"

    def __init__(self, path: str | Path, fps: float = 2.0, loop: bool = True) -> None:
        self.path = Path(path)
        self.interval = 1.0 / fps if fps > 0 else 0.0
        self.loop = loop
        self._files: list[Path] = []
        self._index = 0
        self._next_at = 0.0
        self._video: Any = None  # cv2.VideoCapture for a video file
        self._last: np.ndarray | None = None
        self.current: Path | None = None
        self._interrupted = threading.Event()

    def open(self) -> None:
        self._interrupted.clear()
        if not self.path.exists():
            raise SourceError(f"replay source {self.path} does not exist")
        if self.path.is_file() and self.path.suffix.lower() in VIDEO_SUFFIXES:
            try:
                import cv2
            except ImportError as exc:
                raise SourceError("replaying a video needs opencv-python-headless") from exc
            self._video = cv2.VideoCapture(str(self.path))
            if not self._video.isOpened():
                raise SourceError(f"cannot open video {self.path}")
            return
        files = (
            sorted(
                p
                for p in self.path.rglob("*")
                if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
            if self.path.is_dir()
            else [self.path]
        )
        if not files:
            raise SourceError(f"no images in {self.path}")
        self._files = files
        self._index = 0

    def _pace(self) -> None:
        now = time.monotonic()
        if self._next_at > now:
            # A demo replays at 0.5 fps: waiting here must not hold up a stop or a switch.
            self._interrupted.wait(self._next_at - now)
        self._next_at = max(now, self._next_at) + self.interval

    def _next_video_frame(self) -> np.ndarray:
        ok, frame = self._video.read()
        if not ok and self.loop:
            self._video.set(1, 0)  # CAP_PROP_POS_FRAMES
            ok, frame = self._video.read()
        if not ok and not self.loop:
            raise SourceFinished(f"video {self.path} finished (loop = false)")
        if not ok:
            raise SourceError(f"cannot read video {self.path}")
        return frame[..., ::-1].copy()  # BGR → RGB

    def read(self) -> np.ndarray:
        self._pace()
        if self._video is not None:
            self._last = self._next_video_frame()
            return self._last
        for _ in range(len(self._files)):
            if self._index >= len(self._files):
                if not self.loop:
                    raise SourceFinished(f"replay of {self.path} finished (loop = false)")
                self._index = 0
            path = self._files[self._index]
            self._index += 1
            try:
                self._last = np.asarray(open_image(path), dtype=np.uint8)
                self.current = path
                return self._last
            except ImageError as exc:
                log.warning("replay: skipping %s", exc)
        raise SourceError(f"no readable images in {self.path}")

    def capture_still(self) -> np.ndarray:
        if self._last is None:
            return self.read()
        return self._last

    def interrupt(self) -> None:
        self._interrupted.set()

    def close(self) -> None:
        if self._video is not None:
            self._video.release()
            self._video = None

    def describe(self) -> str:
        return f"replay:{self.path}"
