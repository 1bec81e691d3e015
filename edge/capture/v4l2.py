"""USB microscopes and webcams through OpenCV's V4L2 backend (device path or index, MJPG).

The live stream runs at the configured size and rate; a still switches to the still size for
one frame and back. Exposure, gain and white balance can be fixed (auto off) for consistent
colour. What this module sends to OpenCV is checked by tests/test_cameras.py against a
stand-in ``cv2.VideoCapture``; a real camera is unverified here.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from .base import Source, SourceError

log = logging.getLogger(__name__)
# Frames read and dropped after a size change: the first ones may still be in the old size or
# badly exposed while the camera settles.
SETTLE_FRAMES = 2


class V4l2Source(Source):
    name = "v4l2"

    def __init__(
        self,
        device: str = "/dev/video0",
        width: int = 640,
        height: int = 480,
        fps: float = 15.0,
        still_size: tuple[int, int] = (0, 0),
        exposure_us: int = 0,
        gain: float = 0.0,
        white_balance_k: int = 0,
    ) -> None:
        self.device = device
        self.size = (width, height)
        self.fps = fps
        self.still_size = still_size
        self.exposure_us = exposure_us
        self.gain = gain
        self.white_balance_k = white_balance_k
        self._cap: Any = None  # cv2.VideoCapture once open
        self._cv2: Any = None

    def open(self) -> None:
        try:
            import cv2
        except ImportError as exc:
            raise SourceError(
                "USB cameras need opencv-python-headless (pip install 'fieldscope[usb-camera]')"
            ) from exc
        dev: int | str = int(self.device) if self.device.isdigit() else self.device
        cap = cv2.VideoCapture(dev, cv2.CAP_V4L2)
        if not cap.isOpened():
            raise SourceError(
                f"cannot open {self.device}: unplugged, busy, or no permission "
                "(is the user in the video group?)"
            )
        cap.set(cv2.CAP_PROP_FOURCC, cv2.VideoWriter.fourcc(*"MJPG"))
        self._set_size(cap, cv2, self.size)
        cap.set(cv2.CAP_PROP_FPS, self.fps)
        cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # newest frame, not a queue of old ones
        if self.exposure_us:
            cap.set(cv2.CAP_PROP_AUTO_EXPOSURE, 1)  # V4L2 "manual" through OpenCV
            cap.set(cv2.CAP_PROP_EXPOSURE, self.exposure_us / 100.0)  # in units of 100 µs
        if self.gain:
            cap.set(cv2.CAP_PROP_GAIN, self.gain)
        if self.white_balance_k:
            cap.set(cv2.CAP_PROP_AUTO_WB, 0)
            cap.set(cv2.CAP_PROP_WB_TEMPERATURE, self.white_balance_k)
        self._cap, self._cv2 = cap, cv2

    @staticmethod
    def _set_size(cap, cv2, size: tuple[int, int]) -> None:
        cap.set(cv2.CAP_PROP_FRAME_WIDTH, size[0])
        cap.set(cv2.CAP_PROP_FRAME_HEIGHT, size[1])

    def read(self) -> np.ndarray:
        if self._cap is None:
            raise SourceError("camera not open")
        ok, frame = self._cap.read()
        if not ok or frame is None:
            raise SourceError(f"{self.device}: no frame (camera unplugged?)")
        return frame[..., ::-1].copy()

    def capture_still(self) -> np.ndarray:
        """One frame at the still size when one is set (the live size otherwise)."""
        if self._cap is None:
            raise SourceError("camera not open")
        if not all(self.still_size) or tuple(self.still_size) == tuple(self.size):
            return self.read()
        cv2 = self._cv2
        self._set_size(self._cap, cv2, self.still_size)
        try:
            for _ in range(SETTLE_FRAMES):
                self._cap.grab()
            frame = self.read()
            if frame.shape[1] != self.still_size[0] or frame.shape[0] != self.still_size[1]:
                log.warning(
                    "%s gave a %dx%d still, not the configured %dx%d",
                    self.device, frame.shape[1], frame.shape[0], *self.still_size,
                )
            return frame
        finally:
            self._set_size(self._cap, cv2, self.size)

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None

    def describe(self) -> str:
        return f"v4l2:{self.device}"
