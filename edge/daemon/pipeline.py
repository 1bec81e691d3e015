"""The daemon's pipeline: capture → quality gate → classify → smooth → store, as four parts.

- :class:`~edge.daemon.capture_loop.CaptureLoop` (the camera's thread): newest frame, prepared
  one at a time, the camera reopened with backoff, stills.
- :class:`~edge.daemon.worker.InferenceWorker` (the inference thread): classify, smooth,
  publish, watchdog, READY.
- :class:`~edge.daemon.results.ResultsService`: everything stored (uploads, captures, live
  results, retention) and every read of stored results.
- :class:`~edge.daemon.live.LiveBoard`: the live state, one immutable snapshot under a lock.

``Pipeline`` wires them and is what the web layer gets: a narrow set of methods (``status``,
``health``, ``model``, ``backend``, ``preview_jpeg``, ``capture``, ``classify_and_store``,
``results``), never the parts' internals. See docs/architecture.md.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from ..capture import Source
from ..config import Config
from ..inference.bundle import Bundle
from ..inference.classifier import Classifier
from . import notify
from .capture_loop import CaptureLoop
from .frames import Frame, encode_jpeg  # noqa: F401  (re-exported for scripts and tests)
from .live import LiveBoard, LiveState
from .results import ResultsService
from .store import Store
from .worker import InferenceWorker

log = logging.getLogger(__name__)
__all__ = ["Pipeline", "LiveState", "Frame"]


class Pipeline:
    def __init__(self, cfg: Config, classifier: Classifier, source: Source, store: Store) -> None:
        self.cfg = cfg
        self.classifier = classifier
        self.store = store
        self.board = LiveBoard()
        self._stop = threading.Event()
        self._ready_sent = False
        self._ready_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self.started = time.time()
        self.capture_loop = CaptureLoop(
            cfg, classifier, source, self.board, self._stop,
            on_camera_lost=lambda: self._mark_ready("camera lost, retrying"),
        )
        self.results = ResultsService(
            cfg, classifier, store, self.capture_loop.take_still, source.describe
        )
        self.worker = InferenceWorker(
            cfg, classifier, self.capture_loop, self.board, self.results, self._stop,
            mark_ready=self._mark_ready,
        )

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        for target, name in (
            (self.capture_loop.run, "capture"),
            (self.worker.run, "inference"),
            (lambda: self.results.housekeeping(self._stop), "housekeeping"),
        ):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, timeout: float = 1.5) -> None:
        """Stop within a few seconds even when the camera is wedged inside read(): the capture
        thread is joined first, so the camera is normally closed with nobody inside read()."""
        self._stop.set()
        self.capture_loop.wake()
        for t in self._threads:
            if t.name == "capture":
                t.join(timeout)
        self.capture_loop.close_source(timeout)
        for t in self._threads:
            t.join(timeout)

    @property
    def running(self) -> bool:
        return not self._stop.is_set()

    def _mark_ready(self, status: str = "classifying") -> None:
        with self._ready_lock:
            if self._ready_sent:
                return
            self._ready_sent = True
        notify.notify(f"READY=1\nSTATUS={status}")
        log.info("ready (%s)", status)

    # -- what the web layer (and tests, benchmarks) use ------------------------------------------
    @property
    def state(self) -> LiveState:
        return self.board.state

    @property
    def source(self) -> Source:
        return self.capture_loop.source

    @property
    def model(self) -> Bundle:
        """The bundle in use (its manifest, labels, card and plots)."""
        return self.classifier.bundle

    def backend(self) -> dict[str, Any]:
        """Which backend runs the model, why, and on which runtime (no storage or camera
        queries, unlike status())."""
        return self.classifier.describe()

    @property
    def last_heartbeat(self) -> float:
        return self.worker.last_heartbeat

    def preview_jpeg(self, max_width: int = 640) -> tuple[int, bytes] | None:
        return self.capture_loop.preview_jpeg(max_width)

    def latest_frame(self) -> Frame | None:
        return self.capture_loop.latest_frame()

    def capture(self, sample_code: str | None) -> dict[str, Any]:
        return self.results.capture(sample_code)

    def classify_and_store(self, image: Any, mode: str, sample_code: str | None) -> dict[str, Any]:
        return self.results.classify_and_store(image, mode, sample_code)

    def fps(self) -> float:
        return self.board.fps()

    def latency_ms(self) -> float | None:
        return self.board.latency_ms()

    def recent_latencies(self) -> list[float]:
        return self.board.recent_latencies()

    def health(self) -> tuple[dict[str, Any], bool]:
        """What the open health endpoint says (states only, no error texts), and whether
        inference is alive."""
        st = self.state
        age = time.monotonic() - self.last_heartbeat
        storage = self.results.storage_status()
        camera_ok = st.camera == "ok"
        inference_ok = age < 10
        tpu_lost = self.classifier.degraded is not None
        ok = (storage["ok"] and camera_ok and inference_ok and not storage["low_space"]
              and not tpu_lost)
        body = {
            "status": "ok" if ok else "degraded",
            "camera": {"ok": camera_ok, "state": st.camera},
            "storage": {"ok": storage["ok"], "low_space": storage["low_space"]},
            "clock": {"ok": storage["clock_problem"] is None},
            "inference": {
                "ok": inference_ok,
                "heartbeat_age_s": round(age, 2),
                "backend": self.classifier.backend.name,
                # The Edge TPU failed and the CPU stands in (the reason is in status()).
                "degraded": tpu_lost,
            },
        }
        return body, inference_ok

    def status(self) -> dict[str, Any]:
        st = self.state  # one snapshot for the whole answer
        return {
            "uptime_s": round(time.time() - self.started, 1),
            "camera": {
                "state": st.camera,
                "error": st.camera_error,
                "source": self.source.describe(),
            },
            "backend": self.backend(),
            "runtime": self.classifier.runtime.label,
            "model": {"name": self.model.name, "version": self.model.version},
            "fps": round(self.fps(), 2),
            "latency_ms": self.latency_ms(),
            "frame_id": st.frame_id,
            "frames_classified": st.classified,
            "frames_not_assessable": st.not_assessable,
            "errors": st.errors,
            "last_result": st.result,
            "smoothed": st.smoothed,
            "quality": st.quality,
            "storage": self.results.storage_status(),
        }
