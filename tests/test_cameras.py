"""Camera contract tests: what FieldScope sends to picamera2 and to OpenCV's V4L2 capture,
checked against stand-in modules that record the calls (no camera is attached here), and a
camera whose library raises something unexpected coming back."""

from __future__ import annotations

import logging
import sys
import time
import types

import numpy as np
import pytest

from edge.capture import SourceError, make_source
from edge.config import load_config
from tests.conftest import require_module


class FakePicamera2:
    """Records what picamera2 is asked; serves a lores YUV420 and a main RGB888 (B,G,R) frame."""

    instances: list[FakePicamera2] = []

    def __init__(self, num: int = 0) -> None:
        self.num, self.calls = num, []
        FakePicamera2.instances.append(self)

    def create_still_configuration(self, **kwargs):
        self.calls.append(("create_still_configuration", kwargs))
        return {"config": kwargs}

    def configure(self, config):
        self.calls.append(("configure", config))
        self.config = config["config"]

    def start(self):
        self.calls.append(("start",))

    def capture_array(self, stream: str):
        self.calls.append(("capture_array", stream))
        if stream == "lores":
            w, h = self.config["lores"]["size"]
            yuv = np.zeros((h * 3 // 2, w), np.uint8)
            yuv[:h] = 200  # bright luma, neutral chroma
            yuv[h:] = 128
            return yuv
        w, h = self.config["main"]["size"]
        bgr = np.zeros((h, w, 3), np.uint8)
        bgr[..., 0] = 255  # blue in B,G,R memory order
        return bgr

    def stop(self):
        self.calls.append(("stop",))

    def close(self):
        self.calls.append(("close",))


@pytest.fixture
def picamera2_module(monkeypatch):
    FakePicamera2.instances.clear()
    mod = types.ModuleType("picamera2")
    mod.Picamera2 = FakePicamera2
    monkeypatch.setitem(sys.modules, "picamera2", mod)
    return mod


def _source(**source):
    cfg = load_config(None, {f"source.{k}": v for k, v in source.items()})
    return make_source(cfg.source)


def test_picamera2_gets_streams_rate_and_locked_exposure_and_colour(picamera2_module):
    require_module("cv2", "the YUV → RGB conversion (python3-opencv on a Pi)")
    src = _source(kind="picamera2", width=320, height=240, still_width=1014, still_height=760,
                  fps=10.0, exposure_us=8000, gain=2.0, colour_gains=[1.8, 1.5])
    src.open()
    cam = FakePicamera2.instances[-1]
    (name, kw), *_ = cam.calls
    assert name == "create_still_configuration"
    assert kw["main"] == {"size": (1014, 760), "format": "RGB888"}
    assert kw["lores"] == {"size": (320, 240), "format": "YUV420"}
    assert kw["buffer_count"] == 2 and kw["display"] is None
    assert kw["controls"] == {
        "FrameDurationLimits": (100000, 100000),
        "AeEnable": False,
        "ExposureTime": 8000,
        "AnalogueGain": 2.0,
        "AwbEnable": False,
        "ColourGains": (1.8, 1.5),
    }
    assert [c[0] for c in cam.calls[1:3]] == ["configure", "start"]
    frame = src.read()
    assert frame.shape == (240, 320, 3) and frame.dtype == np.uint8
    assert abs(int(frame[..., 0].mean()) - int(frame[..., 2].mean())) < 3  # grey stays grey
    still = src.capture_still()
    assert still.shape == (760, 1014, 3) and still[0, 0].tolist() == [0, 0, 255]  # RGB
    src.close()
    assert cam.calls[-2:] == [("stop",), ("close",)]


def test_a_picamera2_that_fails_to_start_or_stop_is_still_released(picamera2_module):
    """picamera2 holds the camera until close(): one that failed to start, or whose stop
    raised (unplugged), must be closed, or every reopen finds it in use."""

    class FailsToStart(FakePicamera2):
        def start(self):
            super().start()
            raise RuntimeError("Failed to start camera: Device or resource busy")

    class FailsToStop(FakePicamera2):
        def stop(self):
            super().stop()
            raise RuntimeError("camera unplugged")

    picamera2_module.Picamera2 = FailsToStart
    with pytest.raises(SourceError, match="unavailable"):
        _source(kind="picamera2").open()
    assert FakePicamera2.instances[-1].calls[-2:] == [("stop",), ("close",)]
    picamera2_module.Picamera2 = FailsToStop
    src = _source(kind="picamera2")
    src.open()
    src.close()  # raises nothing: the camera is gone either way
    assert FakePicamera2.instances[-1].calls[-2:] == [("stop",), ("close",)]


def test_picamera2_on_auto_sends_only_the_frame_rate(picamera2_module):
    src = _source(kind="picamera2", fps=2.0)
    src.open()
    kw = FakePicamera2.instances[-1].calls[0][1]
    assert kw["controls"] == {"FrameDurationLimits": (500000, 500000)}
    assert kw["main"] == {"format": "RGB888"}


class FakeCapture:
    """Records ``set`` calls; frames come in the size last set (B,G,R, red pixels)."""

    instances: list[FakeCapture] = []

    def __init__(self, dev, backend) -> None:
        self.dev, self.backend, self.sets, self.grabs = dev, backend, [], 0
        self.props: dict[int, float] = {}
        FakeCapture.instances.append(self)

    def isOpened(self):  # noqa: N802  (OpenCV's name)
        return self.dev != "/dev/video9"

    def set(self, prop, value):
        self.sets.append((prop, value))
        self.props[prop] = value
        return True

    def grab(self):
        self.grabs += 1
        return True

    def read(self):
        import cv2

        w = int(self.props.get(cv2.CAP_PROP_FRAME_WIDTH, 640))
        h = int(self.props.get(cv2.CAP_PROP_FRAME_HEIGHT, 480))
        frame = np.zeros((h, w, 3), np.uint8)
        frame[..., 2] = 255
        return True, frame

    def release(self):
        self.sets.append(("release", None))


@pytest.fixture
def cv2_capture(monkeypatch):
    cv2 = require_module("cv2", "the V4L2 source is OpenCV's capture")
    FakeCapture.instances.clear()
    monkeypatch.setattr(cv2, "VideoCapture", FakeCapture)
    return cv2


def test_v4l2_gets_format_size_rate_buffer_and_locks(cv2_capture):
    cv2 = cv2_capture
    src = _source(kind="v4l2", path="/dev/video2", width=800, height=600, fps=12.0,
                  exposure_us=20000, gain=4.0, white_balance_k=5000)
    src.open()
    cap = FakeCapture.instances[-1]
    assert cap.dev == "/dev/video2" and cap.backend == cv2.CAP_V4L2
    sets = dict(cap.sets)
    assert sets[cv2.CAP_PROP_FOURCC] == cv2.VideoWriter_fourcc(*"MJPG")
    assert (sets[cv2.CAP_PROP_FRAME_WIDTH], sets[cv2.CAP_PROP_FRAME_HEIGHT]) == (800, 600)
    assert sets[cv2.CAP_PROP_FPS] == 12.0 and sets[cv2.CAP_PROP_BUFFERSIZE] == 1
    assert sets[cv2.CAP_PROP_AUTO_EXPOSURE] == 1 and sets[cv2.CAP_PROP_EXPOSURE] == 200.0
    assert sets[cv2.CAP_PROP_GAIN] == 4.0
    assert sets[cv2.CAP_PROP_AUTO_WB] == 0 and sets[cv2.CAP_PROP_WB_TEMPERATURE] == 5000
    frame = src.read()
    assert frame.shape == (600, 800, 3) and frame[0, 0].tolist() == [255, 0, 0]  # RGB


def test_v4l2_still_uses_the_still_size_then_returns_to_live(cv2_capture):
    cv2 = cv2_capture
    src = _source(kind="v4l2", path="0", width=640, height=480, still_width=1920,
                  still_height=1080)
    src.open()
    cap = FakeCapture.instances[-1]
    assert cap.dev == 0  # an index, not a path
    still = src.capture_still()
    assert still.shape == (1080, 1920, 3) and cap.grabs >= 1
    assert cap.props[cv2.CAP_PROP_FRAME_WIDTH] == 640  # back to the live size
    assert src.read().shape == (480, 640, 3)
    assert not any(p in dict(cap.sets) for p in (cv2.CAP_PROP_AUTO_EXPOSURE, cv2.CAP_PROP_GAIN,
                                                 cv2.CAP_PROP_AUTO_WB))  # auto unless asked


def test_v4l2_unplugged_is_a_source_error(cv2_capture):
    with pytest.raises(SourceError, match="cannot open /dev/video9"):
        _source(kind="v4l2", path="/dev/video9").open()


def test_bad_camera_options_are_refused():
    from edge.config import ConfigError

    for bad in ({"source.colour_gains": [1.0]}, {"source.exposure_us": -1},
                {"source.colour_gains": [0.0, 99.0]}, {"source.width": 0},
                {"source.height": -5}, {"source.still_width": 1000},
                {"source.still_width": -1, "source.still_height": -1}):
        with pytest.raises(ConfigError):
            load_config(None, {"source.path": "x", **bad})


def test_a_camera_raising_something_unexpected_comes_back(blood_bundle, blood_samples, tmp_path,
                                                          caplog):
    """A library error that is no SourceError (a cv2.error, a RuntimeError) marks the camera
    lost, is logged once, retried with backoff, and the camera comes back."""
    from PIL import Image

    from tests.test_pipeline import ListSource, _pipeline

    class Flaky(ListSource):
        failures = 3

        def read(self):
            if Flaky.failures:
                Flaky.failures -= 1
                raise RuntimeError("VIDIOC_DQBUF: No such device")  # as cv2 reports it
            return super().read()

    frames = [np.asarray(Image.open(blood_samples[0]).convert("RGB"))]
    pipe, _ = _pipeline(blood_bundle, tmp_path, frames, source=Flaky(frames))
    caplog.set_level(logging.WARNING, logger="edge.daemon.capture_loop")
    pipe.start()
    try:
        seen_lost = False
        end = time.monotonic() + 30
        while time.monotonic() < end and not (seen_lost and pipe.state.classified >= 2):
            seen_lost |= pipe.state.camera == "lost"
            time.sleep(0.01)
        assert seen_lost and pipe.state.camera == "ok" and pipe.state.classified >= 2
    finally:
        pipe.stop()
        pipe.store.close()
    lost = [r for r in caplog.records if "camera lost" in r.getMessage()]
    assert len(lost) == 1 and "RuntimeError: VIDIOC_DQBUF" in lost[0].getMessage()


def test_a_video_written_by_opencv_replays_and_finishes(tmp_path):
    """A real video file (MJPG in AVI, written by OpenCV): every frame once, RGB, then the
    replay finishes when it does not loop."""
    cv2 = require_module("cv2", "video replay reads through OpenCV")
    from edge.capture import SourceFinished
    from edge.capture.replay import ReplaySource

    path = tmp_path / "fields.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (64, 48))
    for i in range(5):
        frame = np.zeros((48, 64, 3), np.uint8)
        frame[..., 2] = 40 * i + 20  # BGR: red grows frame by frame
        writer.write(frame)
    writer.release()
    src = ReplaySource(path, fps=100.0, loop=False)
    src.open()
    reds = []
    with pytest.raises(SourceFinished):
        for _ in range(10):
            rgb = src.read()
            assert rgb.shape == (48, 64, 3)
            reds.append(int(rgb[..., 0].mean()))
    src.close()
    assert len(reds) == 5 and reds == sorted(reds) and reds[0] < 40 < reds[-1]


class PaddedPicamera2(FakePicamera2):
    """Like the Pi's ISP: each YUV420 row padded past the width (here by 64 bytes of luma and
    32 of each chroma), padding filled with values that would show."""

    PAD = 64

    def capture_array(self, stream: str):
        if stream != "lores":
            return super().capture_array(stream)
        self.calls.append(("capture_array", stream))
        w, h = self.config["lores"]["size"]
        s = w + self.PAD
        y = np.zeros((h, s), np.uint8)
        y[:, :w] = 200
        chroma = np.full((h // 2, s // 2), 255, np.uint8)
        chroma[:, : w // 2] = 128
        planes = [y.reshape(-1), chroma.reshape(-1), chroma.reshape(-1)]
        return np.concatenate(planes).reshape(h * 3 // 2, s)


def test_picamera2_frames_with_row_padding_come_out_at_their_own_width(picamera2_module):
    require_module("cv2", "the YUV → RGB conversion (python3-opencv on a Pi)")
    picamera2_module.Picamera2 = PaddedPicamera2
    src = _source(kind="picamera2", width=320, height=240)
    src.open()
    rgb = src.read()
    src.close()
    assert rgb.shape == (240, 320, 3)
    # Only the picture: grey everywhere, no padding columns, chroma rows aligned.
    assert int(rgb.max()) - int(rgb.min()) <= 2 and rgb.min() > 180, (rgb.min(), rgb.max())
