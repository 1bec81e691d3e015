"""A camera that hangs without an error stops the systemd watchdog pings (systemd restarts)."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time

import numpy as np

from edge.capture.base import Source
from edge.config import load_config
from edge.daemon.pipeline import Pipeline
from edge.daemon.store import Store
from edge.inference.bundle import load_bundle
from edge.inference.classifier import Classifier


class HangingSource(Source):
    """Delivers frames until ``hang`` is set, then blocks in read() like a wedged driver.

    The test sets ``hang`` itself: a fixed count of good frames made the healthy window depend
    on how fast a loaded machine classified them."""

    name = "hanging"

    def __init__(self, frame: np.ndarray) -> None:
        self.frame = frame
        self.hang, self.release = threading.Event(), threading.Event()

    def open(self) -> None:
        pass

    def read(self) -> np.ndarray:
        if self.hang.is_set():
            self.release.wait()
        time.sleep(0.02)
        return self.frame

    def close(self) -> None:
        self.release.set()


def test_hung_camera_stops_watchdog_and_is_reported(blood_bundle, blood_samples, tmp_path,
                                                    monkeypatch):
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(0.05)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # ping every 0.1 s
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    from PIL import Image

    frame = np.asarray(Image.open(blood_samples[0]).convert("RGB"))
    cfg = load_config(None, {"model.bundle": str(blood_bundle), "source.path": "x",
                             "source.timeout_s": 1.0, "source.fps": 20.0,
                             "storage.data_dir": str(tmp_path / "data")})
    clf = Classifier(load_bundle(blood_bundle), backend="cpu", threads=1)
    store = Store(tmp_path / "data")
    source = HangingSource(frame)
    pipe = Pipeline(cfg, clf, source, store)
    pipe.start()

    def pings(seconds: float) -> int:
        end, n = time.monotonic() + seconds, 0
        while time.monotonic() < end:
            with contextlib.suppress(TimeoutError):
                n += sock.recv(100) == b"WATCHDOG=1"
        return n

    try:
        # healthy for the whole 2 s: pinging (20 due; a loaded machine delays some, never most)
        assert pings(2.0) >= 5
        source.hang.set()
        deadline = time.monotonic() + 10
        while pipe.state.camera != "stalled" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pipe.state.camera == "stalled" and "no frame" in pipe.state.camera_error
        pings(0.5)  # drain what was in flight
        assert pings(1.0) == 0  # stalled: systemd's watchdog will fire
        assert pipe.state.classified >= 1
        # A still from the wedged camera is refused at once, not after a wait.
        from edge.capture import SourceError

        t0 = time.monotonic()
        try:
            pipe.profile.capture.take_still()
            raise AssertionError("a still came from a wedged camera")
        except SourceError as exc:
            assert "stalled" in str(exc)
        assert time.monotonic() - t0 < 0.2
    finally:
        pipe.stop()
        store.close()
        sock.close()
