"""The daemon's pipeline: capture → quality gate → classify → smooth → store.

Capture keeps only the newest frame (a slot, not a queue), so a slow model never builds a
backlog. The capture thread also prepares one frame at a time (resize, quality gate) while the
worker classifies the previous one, and the worker only invokes and records. A camera that fails
is reopened with backoff while the rest keeps serving. The worker pings the systemd watchdog, so
a stuck loop gets the service restarted.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from PIL import Image

from ..capture import Source, SourceError
from ..config import Config
from ..inference import postprocess
from ..inference.classifier import Classifier
from ..inference.quality import Quality, assess
from . import notify
from .smoothing import Smoother
from .store import StorageError, Store

log = logging.getLogger(__name__)
BAD_FRAMES_LIMIT = 25


@dataclass
class Frame:
    """A camera frame; ``small`` (model-size), ``times`` and ``quality`` are filled by the
    capture thread for the frames it hands to the worker."""

    id: int
    rgb: np.ndarray
    at: float
    small: np.ndarray | None = None
    times: dict[str, float] = field(default_factory=dict)
    quality: Quality | None = None


@dataclass(frozen=True)
class LiveState:
    """What the kit shows now, as one immutable snapshot: a reader (the page, the API) gets a
    result, its quality and its smoothed state from the same frame, never a mix. The threads
    that change it publish a new snapshot under one lock (``Pipeline._publish``)."""

    frame_id: int = 0
    at: float = 0.0
    result: dict[str, Any] | None = None
    quality: dict[str, Any] | None = None
    smoothed: dict[str, Any] | None = None
    camera: str = "starting"
    camera_error: str | None = None
    classified: int = 0
    not_assessable: int = 0
    errors: int = 0


def encode_jpeg(rgb: np.ndarray, quality: int = 85) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


class Pipeline:
    def __init__(self, cfg: Config, classifier: Classifier, source: Source, store: Store) -> None:
        self.cfg = cfg
        self.classifier = classifier
        self.source = source
        self.store = store
        self._state = LiveState()
        self._state_lock = threading.Lock()
        self._latencies: deque = deque(maxlen=50)  # under _state_lock
        self._stamps: deque = deque(maxlen=50)
        self.smoother = Smoother(
            classifier.bundle.labels, cfg.pipeline.smoothing, cfg.pipeline.hold
        )
        self._frame: Frame | None = None  # the newest frame (live view)
        self._prepped: Frame | None = None  # prepared on the capture thread, not yet taken
        self._refresh = 0.005
        self._cond = threading.Condition()
        self._source_lock = threading.Lock()  # the camera is used by capture and stills
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._last_store = 0.0
        self._ready_sent = False
        self._jpeg_cache: tuple[int, bytes] | None = None
        self._jpeg_lock = threading.Lock()
        self.started = time.time()
        self.last_heartbeat = time.monotonic()
        self.last_frame_at = time.monotonic()
        # A camera that stops delivering without an error (a hung driver) for this long stops
        # the systemd watchdog pings, so systemd restarts the daemon.
        self.source_timeout = max(cfg.source.timeout_s, 3.0 / cfg.source.fps)
        self.housekeeping_s = 3600.0

    # -- live state --------------------------------------------------------------------------
    @property
    def state(self) -> LiveState:
        """The current snapshot (replaced, never changed in place)."""
        return self._state

    def _publish(self, count: tuple[str, ...] = (), **changes: Any) -> LiveState:
        """Replace the snapshot: ``changes`` set fields, each name in ``count`` adds one."""
        with self._state_lock:
            st = self._state
            for name in count:
                changes[name] = getattr(st, name) + 1
            self._state = replace(st, **changes)
            return self._state

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        for target, name in (
            (self._capture_loop, "capture"),
            (self._infer_loop, "inference"),
            (self._housekeeping_loop, "housekeeping"),
        ):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def _housekeeping_loop(self) -> None:
        """Retention while the kit runs, not only at start-up: a kit left on for months must
        still forget results past their age."""
        while not self._stop.wait(self.housekeeping_s):
            try:
                self.store.enforce_retention()
            except Exception:  # a locked or failing database: try again next round
                log.exception("retention failed")

    def stop(self, timeout: float = 1.5) -> None:
        """Stop within a few seconds even when the camera is wedged inside read().

        The capture thread is asked to stop and joined first, so the camera is normally
        closed only once nobody is inside read(); only a read that is still stuck after
        ``timeout`` (a hung driver) has the camera closed under it, which is what unblocks it.
        """
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        for t in self._threads:
            if t.name == "capture":
                t.join(timeout)
        locked = self._source_lock.acquire(timeout=timeout)
        if not locked:
            log.warning("the camera is stuck inside a read: closing it under the reader")
        try:
            self.source.close()
        except Exception:  # closing a broken camera must not block shutdown
            log.exception("closing the source")
        finally:
            if locked:
                self._source_lock.release()
        for t in self._threads:
            t.join(timeout)

    @property
    def running(self) -> bool:
        return not self._stop.is_set()

    # -- capture -----------------------------------------------------------------------------
    def _capture_loop(self) -> None:
        backoff = 1.0
        opened = False
        next_id = 1
        bad_frames = 0  # consecutive frames that could not be prepared
        last_bad_log = 0.0
        while not self._stop.is_set():
            try:
                with self._source_lock:
                    if not opened:
                        self.source.open()
                        opened = True
                    rgb = self.source.read()
                self.last_frame_at = time.monotonic()
                # "ok" once a frame arrives, not at open: a camera that opens and then fails
                # each read stays "lost" (one log line), instead of flapping.
                if self.state.camera != "ok":
                    was = self.state.camera
                    self._publish(camera="ok", camera_error=None)
                    log.info("source %s delivers (was %s)", self.source.describe(), was)
                    backoff = 1.0
            except Exception as exc:
                # Any failure of the camera, the driver or its library (SourceError, OSError,
                # cv2.error, an ImportError on first use) is "camera lost": retried with
                # backoff while the rest of the kit keeps serving. One log line per change.
                opened = False
                why = str(exc) if isinstance(exc, SourceError) else f"{type(exc).__name__}: {exc}"
                was = self.state
                self._publish(camera="lost", camera_error=why)
                if was.camera != "lost" or was.camera_error != why:
                    log.warning("camera lost (%s); retrying with backoff", why,
                                exc_info=not isinstance(exc, (SourceError, OSError)))
                else:
                    log.debug("camera still lost (%s); next try in %.0f s", why, backoff)
                # Up without a camera is still up: the page says "camera lost" and uploads work;
                # not being READY would have systemd kill and restart the kit in a loop.
                self._mark_ready("camera lost, retrying")
                with self._source_lock:
                    try:
                        self.source.close()
                    except Exception:
                        log.debug("close after failure", exc_info=True)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            frame = Frame(next_id, rgb, time.monotonic())
            # Prepare one frame per inference, not every frame: it overlaps the worker's
            # inference of the previous one. When the interpreter's threads take every core this
            # is no worse than preparing on the worker (2 threads on 2 cores: 0.86-0.895 × the
            # bare loop against 0.857-0.872) and better with viewers attached. Frames read while
            # the prepared one waits only refresh the live view.
            prep = self._prepped is None
            try:
                if prep:
                    frame.small, frame.times, frame.quality = self._prepare(rgb)
                bad_frames = 0
            except Exception as exc:  # a malformed frame is dropped; the camera keeps going
                self._publish(count=("errors",))
                bad_frames += 1
                now = time.monotonic()
                if bad_frames == 1 or now - last_bad_log > 60:
                    # The first with its traceback, then a line a minute, not one per frame.
                    log.error("could not prepare frame %d (%d in a row): %s", next_id,
                              bad_frames, exc, exc_info=bad_frames == 1)
                    last_bad_log = now
                next_id += 1
                if bad_frames >= BAD_FRAMES_LIMIT:
                    # A camera that only sends what cannot be used is a lost camera: reopen it
                    # with backoff instead of spinning at camera rate.
                    opened, bad_frames = False, 0
                    why = f"{BAD_FRAMES_LIMIT} frames in a row could not be used: {exc}"
                    self._publish(camera="lost", camera_error=why)
                    log.warning("camera lost (%s); reopening with backoff", why)
                    with self._source_lock:
                        try:
                            self.source.close()
                        except Exception:
                            log.debug("close after bad frames", exc_info=True)
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, 30.0)
                continue
            with self._cond:
                self._frame = frame
                if prep:
                    self._prepped = frame
                next_id += 1
                self._cond.notify_all()
                # Do not outrun the classifier: read the next frame once the worker has taken
                # the prepared one, or after a short refresh so the live view stays current.
                self._cond.wait_for(
                    lambda: self._stop.is_set() or self._prepped is None, self._refresh
                )

    def _prepare(self, rgb: np.ndarray) -> tuple[np.ndarray, dict[str, float], Quality]:
        """The model-size input, its stage times and its quality (on whichever thread)."""
        small, times = self.classifier.prepare(rgb)
        p = self.cfg.pipeline
        return small, times, assess(small, p.min_focus, p.max_clipped)

    def source_hung(self) -> bool:
        return self.state.camera in ("ok", "stalled") and (
            time.monotonic() - self.last_frame_at > self.source_timeout
        )

    def latest_frame(self) -> Frame | None:
        return self._frame

    def wait_frame(self, timeout: float) -> Frame | None:
        """The next prepared frame for the worker (at most one inference older than the
        newest), or None after ``timeout``."""
        with self._cond:
            self._cond.wait_for(lambda: self._stop.is_set() or self._prepped is not None, timeout)
            frame, self._prepped = self._prepped, None
            if frame is not None:
                self._cond.notify_all()  # the capture thread prepares the next one
            return frame

    def preview_jpeg(self, max_width: int = 640) -> tuple[int, bytes] | None:
        """The newest frame as JPEG, encoded once per frame however many viewers there are."""
        frame = self._frame
        if frame is None:
            return None
        with self._jpeg_lock:
            if self._jpeg_cache and self._jpeg_cache[0] == frame.id:
                return self._jpeg_cache
            rgb = frame.rgb
            if rgb.shape[1] > max_width:
                step = int(np.ceil(rgb.shape[1] / max_width))
                rgb = rgb[::step, ::step]
            self._jpeg_cache = (frame.id, encode_jpeg(np.ascontiguousarray(rgb), 75))
            return self._jpeg_cache

    # -- inference ---------------------------------------------------------------------------
    def _infer_loop(self) -> None:
        interval = notify.watchdog_interval()
        last_ping = 0.0
        min_gap = 1.0 / self.cfg.pipeline.max_fps if self.cfg.pipeline.max_fps > 0 else 0.0
        last_run = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            self.last_heartbeat = now
            if self.source_hung():
                if self.state.camera != "stalled":
                    log.error(
                        "camera delivered nothing for %.0f s: stalled; no more watchdog "
                        "pings so systemd restarts the daemon",
                        self.source_timeout,
                    )
                    self._publish(
                        camera="stalled",
                        camera_error=f"no frame for {self.source_timeout:.0f} s",
                    )
            elif interval and now - last_ping >= interval:
                notify.notify("WATCHDOG=1")
                last_ping = now
            frame = self.wait_frame(timeout=1.0)
            if frame is None:
                continue
            if min_gap and time.monotonic() - last_run < min_gap:
                self._stop.wait(min_gap - (time.monotonic() - last_run))
            last_run = time.monotonic()
            try:
                self._process(frame)
            except Exception:
                self._publish(count=("errors",))
                log.exception("inference failed on frame %d", frame.id)

    def _process(self, frame: Frame) -> None:
        p = self.cfg.pipeline
        quality = frame.quality.to_dict()  # frames reach the worker prepared (see wait_frame)
        if not frame.quality.assessable:
            self._publish(
                count=("not_assessable",),
                quality=quality,
                result={
                    "label": None,
                    "assessable": False,
                    "reason": frame.quality.reason,
                    "quality": quality,
                },
                frame_id=frame.id,
                at=time.time(),
            )
            self._mark_ready()
            return
        result = self.classifier.infer(
            frame.small, frame.times, top_k=p.top_k, name=f"frame {frame.id}"
        )
        done = time.monotonic()
        bundle = self.classifier.bundle
        shown = self.smoother.update(
            result.probabilities,
            lambda mean: postprocess.decide(
                postprocess.group_scores(mean, bundle.labels, bundle.label_groups),
                bundle.decision,
            ),
        )
        doc = result.to_dict()
        doc["quality"] = quality
        doc["assessable"] = True
        doc["frame_to_result_ms"] = round((done - frame.at) * 1e3, 2)
        smoothed = {
            "label": shown.label,
            "probabilities": dict(zip(self.smoother.labels, map(float, shown.mean), strict=True)),
            "decision": shown.decision,
            "frame_id": frame.id,
            "shown_for_frames": shown.age,
        }
        with self._state_lock:
            self._latencies.append(doc["frame_to_result_ms"])
            self._stamps.append(done)
        # One snapshot: this frame's result, its quality and the smoothed state it led to.
        self._publish(
            count=("classified",),
            result=doc,
            quality=quality,
            smoothed=smoothed,
            frame_id=frame.id,
            at=time.time(),
        )
        self._mark_ready()
        if p.store_every_s > 0 and time.time() - self._last_store >= p.store_every_s:
            try:
                self.store.save(doc, "live", source=self.source.describe())
                self._last_store = time.time()
            except StorageError:
                pass  # reported through /api/health; live results are not acknowledged anyway

    def _mark_ready(self, status: str = "classifying") -> None:
        if not self._ready_sent:
            self._ready_sent = True
            notify.notify(f"READY=1\nSTATUS={status}")
            log.info("ready (%s)", status)

    # -- on-demand ---------------------------------------------------------------------------
    def capture(self, sample_code: str | None) -> dict[str, Any]:
        """Full-quality still → classify → store with snapshot; returns the stored result."""
        if not self._source_lock.acquire(timeout=5.0):
            raise SourceError("the camera is not answering (busy or hung)")
        try:
            rgb = self.source.capture_still()
        finally:
            self._source_lock.release()
        return self.classify_and_store(rgb, "capture", sample_code)

    def classify_and_store(self, image: Any, mode: str, sample_code: str | None) -> dict[str, Any]:
        """Classify an RGB array (a camera still) or an encoded image (an upload); raises
        ImageError or StorageError.

        An encoded image takes exactly the path of ``classify`` and of training's evaluation
        (Classifier.prepare on the bytes: JPEG draft decoding, then the Pillow resize), so the
        same file gives the same model input however it enters. The snapshot is re-encoded
        from a full decode (which also drops the upload's metadata)."""
        from ..inference.preprocess import open_image

        p = self.cfg.pipeline
        if isinstance(image, np.ndarray):
            rgb = image
            small, times, quality = self._prepare(rgb)
        else:
            small, times = self.classifier.prepare(image)
            quality = assess(small, p.min_focus, p.max_clipped)
            rgb = np.asarray(
                open_image(image, max_pixels=self.classifier.max_pixels), dtype=np.uint8
            )
        # On demand a few more invokes cost nothing a user notices: average the bundle's
        # test-time views (the live stream never does, see _process).
        result = self.classifier.infer(
            small, times, top_k=self.cfg.pipeline.top_k, name=mode, tta=True
        )
        doc = result.to_dict()
        doc["quality"] = quality.to_dict()
        doc["assessable"] = quality.assessable
        jpeg = encode_jpeg(rgb, self.cfg.storage.snapshot_quality)
        doc["id"] = self.store.save(
            doc,
            mode,
            sample_code=sample_code,
            jpeg=jpeg,
            source=self.source.describe() if mode == "capture" else mode,
        )
        doc["sample_code"] = sample_code
        return doc

    # -- status ------------------------------------------------------------------------------
    def fps(self) -> float:
        with self._state_lock:
            stamps = list(self._stamps)
        if len(stamps) < 2 or stamps[-1] == stamps[0]:
            return 0.0
        return (len(stamps) - 1) / (stamps[-1] - stamps[0])

    def recent_latencies(self) -> list[float]:
        """Frame-to-result times (ms) of the last classified frames, oldest first."""
        with self._state_lock:
            return list(self._latencies)

    def latency_ms(self) -> float | None:
        with self._state_lock:
            lat = list(self._latencies)
        return float(np.median(lat)) if lat else None

    def status(self) -> dict[str, Any]:
        st = self.state
        return {
            "uptime_s": round(time.time() - self.started, 1),
            "camera": {
                "state": st.camera,
                "error": st.camera_error,
                "source": self.source.describe(),
            },
            "backend": self.classifier.describe(),
            "model": {
                "name": self.classifier.bundle.name,
                "version": self.classifier.bundle.version,
            },
            "fps": round(self.fps(), 2),
            "latency_ms": self.latency_ms(),
            "frame_id": st.frame_id,
            "frames_classified": st.classified,
            "frames_not_assessable": st.not_assessable,
            "errors": st.errors,
            "last_result": st.result,
            "smoothed": st.smoothed,
            "quality": st.quality,
            "storage": {
                "ok": self.store.last_error is None,
                "error": self.store.last_error,
                "free_mb": round(self.store.free_mb(), 1),
                "low_space": self.store.low_on_space(),
                "clock_problem": self.store.clock_problem(),
                "min_free_mb": self.store.min_free_mb,
            },
        }
