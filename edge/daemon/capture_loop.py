"""The capture loop: the camera's own thread.

It keeps only the newest frame (a slot, not a queue), so a slow model never builds a backlog,
and prepares one frame at a time (resize, quality gate) while the worker classifies the
previous one. A camera that fails in any way is "lost" and reopened with backoff while the rest
of the kit keeps serving. Stills for on-demand captures are taken here too, under the same
camera lock, so the camera is only ever used by one thread at a time.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import numpy as np

from ..capture import Source, SourceError, SourceFinished
from ..config import Config
from ..inference.classifier import Classifier
from .frames import Frame, encode_jpeg, prepare_frame
from .live import LiveBoard

log = logging.getLogger(__name__)
BAD_FRAMES_LIMIT = 25


class CaptureLoop:
    def __init__(
        self,
        cfg: Config,
        classifier: Classifier,
        source: Source,
        board: LiveBoard,
        stop: threading.Event,
        on_camera_lost: Callable[[], None],
        first_id: int = 1,
    ) -> None:
        self.cfg = cfg
        self.classifier = classifier
        self.source = source
        self.board = board
        self._stop = stop
        self._on_camera_lost = on_camera_lost  # READY even without a camera (see below)
        # Frame ids carry on across a profile switch, so a viewer never sees an id again.
        self.next_id = first_id
        self._frame: Frame | None = None  # the newest frame (live view)
        self._prepped: Frame | None = None  # prepared here, not yet taken by the worker
        self._refresh = 0.005
        self._cond = threading.Condition()
        self._source_lock = threading.Lock()  # the camera is used by capture and stills
        self._jpeg_cache: tuple[int, bytes] | None = None
        self._jpeg_lock = threading.Lock()
        self.last_frame_at = time.monotonic()
        # A camera that stops delivering without an error (a hung driver) for this long stops
        # the systemd watchdog pings, so systemd restarts the daemon.
        self.source_timeout = max(cfg.source.timeout_s, 3.0 / cfg.source.fps)

    def _prepare(self, rgb: np.ndarray):
        p = self.cfg.pipeline
        return prepare_frame(self.classifier, rgb, p.min_focus, p.max_clipped)

    # -- the thread ------------------------------------------------------------------------------
    def run(self) -> None:
        backoff = 1.0
        opened = False
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
                if self.board.state.camera != "ok":
                    was = self.board.state.camera
                    self.board.publish(camera="ok", camera_error=None)
                    log.info("source %s delivers (was %s)", self.source.describe(), was)
            except SourceFinished as exc:
                # Final: the kit stays up with its results; nothing to reopen, nothing lost.
                self.board.publish(camera="finished", camera_error=None)
                log.info("%s; the live view keeps its last frame", exc)
                self._close_quietly()
                return
            except Exception as exc:
                # Any failure of the camera, the driver or its library (SourceError, OSError,
                # cv2.error, an ImportError on first use) is "camera lost": retried with
                # backoff while the rest of the kit keeps serving. One log line per change.
                opened = False
                why = str(exc) if isinstance(exc, SourceError) else f"{type(exc).__name__}: {exc}"
                before = self.board.state
                self.board.publish(camera="lost", camera_error=why)
                if before.camera != "lost" or before.camera_error != why:
                    log.warning("camera lost (%s); retrying with backoff", why,
                                exc_info=not isinstance(exc, (SourceError, OSError)))
                else:
                    log.debug("camera still lost (%s); next try in %.0f s", why, backoff)
                # Up without a camera is still up: the page says "camera lost" and uploads work;
                # not being READY would have systemd kill and restart the kit in a loop.
                self._on_camera_lost()
                self._close_quietly()
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            frame = Frame(self.next_id, rgb, time.monotonic())
            # Prepare one frame per inference, not every frame: it overlaps the worker's
            # inference of the previous one. When the interpreter's threads take every core this
            # is no worse than preparing on the worker (2 threads on 2 cores: 0.86-0.895 × the
            # bare loop against 0.857-0.872) and better with viewers attached. Frames read while
            # the prepared one waits only refresh the live view.
            prep = self._prepped is None
            try:
                if prep:
                    frame.small, frame.times, frame.quality = self._prepare(rgb)
                    # Back to the first backoff only once a frame is of use: a camera that
                    # opens and reads but sends only frames that cannot be used must not be
                    # reopened every 25 frames and a second.
                    backoff = 1.0
                bad_frames = 0
            except Exception as exc:  # a malformed frame is dropped; the camera keeps going
                self.board.publish(count=("errors",))
                bad_frames += 1
                now = time.monotonic()
                if not last_bad_log or now - last_bad_log > 60:
                    # The first with its traceback, then a line a minute, not one per frame.
                    log.error("could not prepare frame %d (%d in a row): %s", self.next_id,
                              bad_frames, exc, exc_info=not last_bad_log)
                    last_bad_log = now
                self.next_id += 1
                if bad_frames >= BAD_FRAMES_LIMIT:
                    # A camera that only sends what cannot be used is a lost camera: reopen it
                    # with backoff instead of spinning at camera rate.
                    opened, bad_frames = False, 0
                    why = f"{BAD_FRAMES_LIMIT} frames in a row could not be used: {exc}"
                    self.board.publish(camera="lost", camera_error=why)
                    log.warning("camera lost (%s); reopening with backoff", why)
                    self._close_quietly()
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, 30.0)
                continue
            with self._cond:
                self._frame = frame
                if prep:
                    self._prepped = frame
                self.next_id += 1
                self._cond.notify_all()
                # Do not outrun the classifier: read the next frame once the worker has taken
                # the prepared one, or after a short refresh so the live view stays current.
                self._cond.wait_for(
                    lambda: self._stop.is_set() or self._prepped is None, self._refresh
                )

    def _close_quietly(self) -> None:
        with self._source_lock:
            try:
                self.source.close()
            except Exception:
                log.debug("close after failure", exc_info=True)

    # -- for the worker and the web --------------------------------------------------------------
    def wait_frame(self, timeout: float) -> Frame | None:
        """The next prepared frame for the worker (at most one inference older than the
        newest), or None after ``timeout``."""
        with self._cond:
            self._cond.wait_for(lambda: self._stop.is_set() or self._prepped is not None, timeout)
            frame, self._prepped = self._prepped, None
            if frame is not None:
                self._cond.notify_all()  # the capture thread prepares the next one
            return frame

    def wake(self) -> None:
        """Wake both threads for a stop: the worker waiting for a frame, and the camera
        waiting on its own pacing."""
        try:
            self.source.interrupt()
        except Exception:
            log.debug("interrupting the source", exc_info=True)
        with self._cond:
            self._cond.notify_all()

    def latest_frame(self) -> Frame | None:
        return self._frame

    def source_hung(self) -> bool:
        return self.board.state.camera in ("ok", "stalled") and (
            time.monotonic() - self.last_frame_at > self.source_timeout
        )

    def take_still(self) -> np.ndarray:
        """A full-quality still for an on-demand capture (the camera held for that frame). A
        camera known to be wedged (no frame for ``timeout_s``) is refused at once; otherwise
        the wait is at most a couple of frame intervals (the live read holds the camera)."""
        if self.board.state.camera == "stalled" or self.source_hung():
            raise SourceError("the camera is not answering (stalled); the kit restarts it")
        wait = min(5.0, max(1.0, 2.0 / max(self.cfg.source.fps, 0.1)))
        if not self._source_lock.acquire(timeout=wait):
            raise SourceError("the camera is not answering (busy or hung)")
        try:
            return self.source.capture_still()
        finally:
            self._source_lock.release()

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

    def close_source(self, timeout: float) -> None:
        """Close the camera once the capture thread is out of read(); a read still stuck after
        ``timeout`` (a hung driver) has the camera closed under it, which unblocks it."""
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
