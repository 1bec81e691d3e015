"""Raspberry Pi CSI cameras (the HQ camera on a microscope) through picamera2.

A low-resolution stream feeds inference and the live view; a still uses the full sensor. The
frame rate, and where asked the exposure, gain and white balance, are fixed through libcamera
controls, so colour stays the same from field to field under a microscope lamp. On Raspberry Pi
OS picamera2 comes from apt (python3-picamera2), not pip. What this module sends to picamera2 is
checked by tests/test_cameras.py against a stand-in module; a real camera is unverified here.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from .base import Source, SourceError

log = logging.getLogger(__name__)


class Picamera2Source(Source):
    name = "picamera2"

    def __init__(
        self,
        width: int = 640,
        height: int = 480,
        still_size: tuple[int, int] = (0, 0),
        camera_num: int = 0,
        fps: float = 0.0,
        exposure_us: int = 0,
        gain: float = 0.0,
        colour_gains: tuple[float, ...] | list[float] = (),
    ) -> None:
        self.size = (width, height)
        self.still_size = still_size
        self.camera_num = camera_num
        self.fps = fps
        self.exposure_us = exposure_us
        self.gain = gain
        self.colour_gains = tuple(colour_gains)
        self._cam = None

    def controls(self) -> dict[str, Any]:
        """The libcamera controls this configuration asks for (only what is set)."""
        out: dict[str, Any] = {}
        if self.fps > 0:
            frame_us = int(round(1e6 / self.fps))
            out["FrameDurationLimits"] = (frame_us, frame_us)
        if self.exposure_us or self.gain:
            out["AeEnable"] = False
            if self.exposure_us:
                out["ExposureTime"] = int(self.exposure_us)
            if self.gain:
                out["AnalogueGain"] = float(self.gain)
        if self.colour_gains:
            out["AwbEnable"] = False
            out["ColourGains"] = (float(self.colour_gains[0]), float(self.colour_gains[1]))
        return out

    def open(self) -> None:
        try:
            from picamera2 import Picamera2
        except ImportError as exc:
            raise SourceError(
                "picamera2 is not installed: `sudo apt install python3-picamera2` and create the "
                "venv with --system-site-packages (scripts/install.sh does both)"
            ) from exc
        cam = None
        try:
            cam = Picamera2(self.camera_num)
            main = (
                {"size": self.still_size, "format": "RGB888"}
                if all(self.still_size)
                else {"format": "RGB888"}
            )
            config = cam.create_still_configuration(
                main=main,
                lores={"size": self.size, "format": "YUV420"},
                display=None,
                buffer_count=2,
                controls=self.controls(),
            )
            cam.configure(config)
            cam.start()
        except Exception as exc:  # libcamera raises RuntimeError and friends
            if cam is not None:  # acquired but not started: release it, or every reopen
                _release(cam)    # finds the camera "in use" until the daemon restarts
            raise SourceError(f"camera {self.camera_num} unavailable: {exc}") from exc
        self._cam = cam

    def read(self) -> np.ndarray:
        if self._cam is None:
            raise SourceError("camera not open")
        try:
            yuv = self._cam.capture_array("lores")
        except Exception as exc:
            raise SourceError(f"camera read failed: {exc}") from exc
        import cv2  # apt: python3-opencv, pulled in by picamera2

        rgb = cv2.cvtColor(yuv, cv2.COLOR_YUV420p2RGB)
        # picamera2 hands YUV420 as (height × 3/2, stride): rows padded past the width (to the
        # ISP's alignment) convert as extra columns, cut here.
        width = self.size[0]
        return np.ascontiguousarray(rgb[:, :width]) if rgb.shape[1] > width else rgb

    def capture_still(self) -> np.ndarray:
        if self._cam is None:
            raise SourceError("camera not open")
        try:
            bgr = self._cam.capture_array("main")  # "RGB888" is B,G,R in memory order
        except Exception as exc:
            raise SourceError(f"still capture failed: {exc}") from exc
        return bgr[..., ::-1].copy()

    def close(self) -> None:
        if self._cam is not None:
            cam, self._cam = self._cam, None
            _release(cam)


def _release(cam: Any) -> None:
    """Stop and close a camera, closing it although stop fails (an unplugged camera's stop
    raises): only close gives the camera back to libcamera for the next open."""
    try:
        cam.stop()
    except Exception:
        log.debug("stopping the camera failed", exc_info=True)
    finally:
        try:
            cam.close()
        except Exception:
            log.warning("closing the camera failed", exc_info=True)
