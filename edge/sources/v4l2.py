"""USB microscopes and webcams through OpenCV's V4L2 backend (device path or index, MJPG).

Unverified here: no camera is attached to the machines that run the tests.
"""

from __future__ import annotations

import numpy as np

from .base import Source, SourceError


class V4l2Source(Source):
    name = "v4l2"

    def __init__(
        self, device: str = "/dev/video0", width: int = 640, height: int = 480, fps: float = 15.0
    ) -> None:
        self.device = device
        self.size = (width, height)
        self.fps = fps
        self._cap = None

    def open(self) -> None:
        try:
            import cv2  # type: ignore[import-not-found]
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
        cap.set(cv2.CAP_PROP_FOURCC, cv2.VideoWriter_fourcc(*"MJPG"))
        cap.set(cv2.CAP_PROP_FRAME_WIDTH, self.size[0])
        cap.set(cv2.CAP_PROP_FRAME_HEIGHT, self.size[1])
        cap.set(cv2.CAP_PROP_FPS, self.fps)
        cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # newest frame, not a queue of old ones
        self._cap = cap

    def read(self) -> np.ndarray:
        if self._cap is None:
            raise SourceError("camera not open")
        ok, frame = self._cap.read()
        if not ok or frame is None:
            raise SourceError(f"{self.device}: no frame (camera unplugged?)")
        return frame[..., ::-1].copy()

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None

    def describe(self) -> str:
        return f"v4l2:{self.device}"
