"""The claims of docs/reliability.md that had no test of their own: each named there."""

from __future__ import annotations

import threading
import time

import numpy as np
from PIL import Image

from edge.capture.base import Source
from tests.daemon_helpers import poll
from tests.test_pipeline import _pipeline
from tests.test_web import daemon  # noqa: F401  (the fixture)


class UnusableSource(Source):
    """Opens fine, then sends only frames that cannot be prepared (a broken driver)."""

    name = "unusable"

    def __init__(self) -> None:
        self.opens = 0
        self.opened_at: list[float] = []

    def open(self) -> None:
        self.opens += 1
        self.opened_at.append(time.monotonic())

    def read(self) -> np.ndarray:
        time.sleep(0.002)
        return np.zeros((7,), np.uint8)  # not an image


def test_25_unusable_frames_in_a_row_reopen_the_camera(blood_bundle, tmp_path):
    source = UnusableSource()
    pipe, _ = _pipeline(blood_bundle, tmp_path, [], source=source)
    pipe.start()
    poll(lambda: source.opens >= 3, 30, 0.02)
    errors = pipe.state.errors
    pipe.stop()
    pipe.store.close()
    assert source.opens >= 3, "the camera was never reopened"
    assert errors >= 50
    # With backoff: the wait before each reopen grows (1 s, then 2 s), although every read
    # succeeds; the frames are what is of no use.
    t = source.opened_at
    assert t[2] - t[1] > (t[1] - t[0]) + 0.5, t


class ForeverSource(Source):
    """Two frames, then a read that never returns until the source is closed."""

    name = "forever"

    def __init__(self, frame: np.ndarray) -> None:
        self.frame, self.reads = frame, 0
        self.closed = threading.Event()

    def open(self) -> None:
        pass

    def read(self) -> np.ndarray:
        self.reads += 1
        if self.reads > 2:
            self.closed.wait()  # wedged until closed under it
        return self.frame

    def close(self) -> None:
        self.closed.set()


def test_stopping_while_a_read_hangs_for_ever(blood_bundle, blood_samples, tmp_path):
    frame = np.asarray(Image.open(blood_samples[0]).convert("RGB"))
    source = ForeverSource(frame)
    pipe, _ = _pipeline(blood_bundle, tmp_path, [], source=source)
    pipe.start()
    poll(lambda: source.reads >= 3, 20, 0.02)
    assert source.reads >= 3
    t0 = time.monotonic()
    pipe.stop(timeout=1.5)
    took = time.monotonic() - t0
    pipe.store.close()
    assert source.closed.is_set(), "the wedged camera was not closed under its read"
    assert took < 6.0, took


def test_a_tpu_fallback_shows_in_health_metrics_and_the_model_page(daemon):  # noqa: F811
    """The fallback itself is tested at the backend (tests/test_backends.py); here: what it
    sets is shown everywhere the docs say."""
    pipeline, app = daemon()
    clf = pipeline.profile.classifier
    why = "the Edge TPU failed during inference (USB transfer error); switched to the CPU"
    clf.degraded = {"since": time.time(), "reason": why}
    clf.fallback_events.append(why)
    c = app.test_client()
    health = c.get("/api/health")
    assert health.status_code == 503 or health.get_json()["status"] == "degraded"
    assert health.get_json()["inference"]["degraded"] is True
    assert "fieldscope_inference_degraded 1" in c.get("/metrics").get_data(as_text=True)
    assert "USB transfer error" in c.get("/model").get_data(as_text=True)


def test_low_space_makes_health_degraded(daemon):  # noqa: F811
    pipeline, app = daemon()
    c = app.test_client()
    pipeline.store.min_free_mb = 10**9  # more than any disk has free
    doc = c.get("/api/health").get_json()
    assert doc["status"] == "degraded" and doc["storage"]["low_space"] is True


def test_a_clock_that_cannot_be_right_shows_in_health(daemon, monkeypatch):  # noqa: F811
    pipeline, app = daemon()
    monkeypatch.setattr(pipeline.store, "clock_problem", lambda now=None: "the clock reads 1970")
    assert app.test_client().get("/api/health").get_json()["clock"]["ok"] is False


def test_retention_runs_while_the_kit_runs_not_only_at_start(blood_bundle, blood_samples,
                                                              tmp_path):
    """Hourly in the field; here the period is shortened: an old result goes without a
    restart."""
    frame = np.asarray(Image.open(blood_samples[0]).convert("RGB"))
    pipe, _ = _pipeline(blood_bundle, tmp_path, [frame])
    pipe.results.housekeeping_s = 0.2
    pipe.store.retention_days = 1
    doc = {"label": "Benign", "score": 1.0, "probabilities": {"Benign": 1.0}}
    old = pipe.store.save(doc, "upload")
    pipe.store._db.execute("UPDATE results SET created = created - 3 * 86400 WHERE id = ?",
                           (old,))
    pipe.store._db.execute("INSERT INTO results (created, mode, label, score, probabilities) "
                           "VALUES (?, 'upload', 'Benign', 1.0, '{}')", (time.time(),))
    pipe.start()
    poll(lambda: pipe.store.get(old) is None, 10, 0.05)
    gone = pipe.store.get(old) is None
    pipe.stop()
    pipe.store.close()
    assert gone, "retention did not run while the kit ran"
