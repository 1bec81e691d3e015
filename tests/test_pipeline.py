"""The pipeline's division of work: the capture thread prepares frames, the worker classifies
them; a malformed frame is dropped and counted while the camera keeps going."""

from __future__ import annotations

import threading
import time

import numpy as np
from PIL import Image

from edge.capture.base import Source
from edge.config import load_config
from edge.daemon.pipeline import Pipeline
from edge.daemon.store import Store
from edge.inference.bundle import load_bundle
from edge.inference.classifier import Classifier
from tests.daemon_helpers import poll


class ListSource(Source):
    """Frames from a list, looped, 100 per second."""

    name = "list"

    def __init__(self, frames: list[np.ndarray]) -> None:
        self.frames, self.i = frames, 0

    def open(self) -> None:
        pass

    def read(self) -> np.ndarray:
        time.sleep(0.01)
        self.i += 1
        return self.frames[(self.i - 1) % len(self.frames)]


def _pipeline(blood_bundle, tmp_path, frames, source=None, **overrides):
    cfg = load_config(
        None,
        {
            "model.bundle": str(blood_bundle),
            "source.path": "x",
            "storage.data_dir": str(tmp_path / "data"),
            "pipeline.min_focus": 0.0,
            "pipeline.max_clipped": 1.0,
            **overrides,
        },
    )
    clf = Classifier(load_bundle(blood_bundle), backend="cpu", threads=1)
    return Pipeline(cfg, clf, source or ListSource(frames), Store(tmp_path / "data")), clf


def _run_until(pipe: Pipeline, classified: int, timeout: float = 20.0) -> None:
    pipe.start()
    deadline = time.monotonic() + timeout
    while pipe.state.classified < classified and time.monotonic() < deadline:
        time.sleep(0.02)
    pipe.stop()
    pipe.store.close()


def test_frames_are_prepared_on_the_capture_thread(blood_bundle, blood_samples, tmp_path):
    frame = np.asarray(Image.open(blood_samples[0]).convert("RGB"))
    pipe, clf = _pipeline(blood_bundle, tmp_path, [frame])
    threads: list[str] = []
    prepare = clf.prepare

    def recording(source):
        threads.append(threading.current_thread().name)
        return prepare(source)

    clf.prepare = recording
    _run_until(pipe, 5)
    assert pipe.state.classified >= 5
    assert set(threads) == {"capture"}
    expected = clf.classify(frame)
    result = pipe.state.result
    assert result["label"] == expected.label
    assert result["timings_ms"]["preprocess"] > 0
    assert result["frame_to_result_ms"] >= result["timings_ms"]["invoke"]


def test_a_malformed_frame_is_dropped_and_the_camera_keeps_going(
    blood_bundle, blood_samples, tmp_path, caplog
):
    good = np.asarray(Image.open(blood_samples[0]).convert("RGB"))
    bad = np.zeros((7,), dtype=np.uint8)  # not an image
    pipe, _ = _pipeline(blood_bundle, tmp_path, [good, bad, good])
    _run_until(pipe, 6)
    assert pipe.state.classified >= 6
    assert pipe.state.errors >= 1
    assert pipe.state.camera == "ok"
    assert "could not prepare" in caplog.text


def test_live_state_is_one_frame_at_a_time(blood_bundle, tmp_path, blood_samples):
    """Readers polling while the pipeline runs always see a result, its quality and its
    smoothed state from one frame, and counters that only grow."""
    frames = [np.asarray(Image.open(p).convert("RGB")) for p in blood_samples[:4]]
    pipe, _ = _pipeline(blood_bundle, tmp_path, frames)
    seen, problems = [], []
    stop = threading.Event()

    def reader():
        last = 0
        while not stop.is_set():
            st = pipe.state
            if st.result is not None and st.smoothed is not None:
                if st.result["image"] != f"frame {st.frame_id}":
                    problems.append(("result", st.frame_id, st.result["image"]))
                if st.smoothed["frame_id"] != st.frame_id:
                    problems.append(("smoothed", st.frame_id, st.smoothed["frame_id"]))
                if st.result["quality"] != st.quality:
                    problems.append(("quality", st.frame_id))
                seen.append(st.frame_id)
            if st.classified < last:
                problems.append(("counter", last, st.classified))
            last = st.classified
            status = pipe.status()
            smoothed = status["smoothed"]
            if status["last_result"] and smoothed and smoothed["frame_id"] != status["frame_id"]:
                problems.append(("status", status["frame_id"]))

    threads = [threading.Thread(target=reader) for _ in range(2)]
    pipe.start()
    for t in threads:
        t.start()
    try:
        poll(lambda: pipe.state.classified >= 40, 30, 0.02)
    finally:
        stop.set()
        for t in threads:
            t.join()
        pipe.stop()
        pipe.store.close()
    assert len(set(seen)) >= 10, "the readers saw too few frames to mean anything"
    assert not problems, problems[:5]


def _frames(paths) -> list[np.ndarray]:
    return [np.asarray(Image.open(p).convert("RGB")) for p in paths]


def test_out_of_scope_frames_are_not_smoothed_stored_or_counted_as_classified(
    blood_bundle, blood_samples, tmp_path
):
    """Skin images in front of the blood-smear model: the live page says "no smear in view",
    the smoothed decision is not fed, and store_every_s stores none of them; blood fields
    among them are classified, smoothed and stored as before."""
    from tests.test_scope import SKIN, samples

    skin = _frames(samples(SKIN)[:4])
    every = {"pipeline.store_every_s": 0.001}
    pipe, clf = _pipeline(blood_bundle, tmp_path, skin, **every)
    pipe.start()
    poll(lambda: pipe.state.out_of_scope >= 8, 30, 0.02)
    st = pipe.state
    pipe.stop()
    assert st.out_of_scope >= 8
    assert st.classified == 0 and st.smoothed is None
    assert st.result["assessable"] is False and st.result["reason"] == "no smear in view"
    assert st.result["scope"]["in_scope"] is False
    assert pipe.store.count() == 0
    pipe.store.close()

    mixed = _frames(blood_samples[:3]) + skin[:3]
    pipe, clf = _pipeline(blood_bundle, tmp_path / "mixed", mixed, **every)
    pipe.start()
    deadline = time.monotonic() + 30
    while (pipe.state.out_of_scope < 6 or pipe.state.classified < 6) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.02)
    pipe.stop()
    stored = pipe.store.list(limit=500)
    assert stored and all(r["in_scope"] for r in stored)
    assert pipe.state.out_of_scope >= 6 and pipe.state.classified >= 6
    pipe.store.close()


def test_a_replay_without_loop_finishes_once_and_for_all(blood_bundle, blood_samples, tmp_path):
    """loop = false: every image once, then "finished" (health ok), never replayed, never
    "lost"; the watchdog keeps being fed (a finished replay is not a hung camera)."""
    from edge.capture.replay import ReplaySource

    replay = tmp_path / "replay"
    replay.mkdir()
    for p in blood_samples[:3]:
        (replay / p.name).write_bytes(p.read_bytes())
    source = ReplaySource(replay, fps=50, loop=False)
    pipe, _ = _pipeline(blood_bundle, tmp_path, [], source=source)
    pipe.start()
    poll(lambda: pipe.state.camera == "finished", 20, 0.02)
    assert pipe.state.camera == "finished"
    seen = []
    end = time.monotonic() + 3  # a replay that starts over would be back within a second
    while time.monotonic() < end:
        seen.append(pipe.state.camera)
        time.sleep(0.05)
    health, alive = pipe.health()
    pipe.stop()
    pipe.store.close()
    assert set(seen) == {"finished"}
    assert health["status"] == "ok" and health["camera"]["state"] == "finished" and alive
    assert not pipe._run.capture.source_hung()
    assert pipe.state.classified <= 3
