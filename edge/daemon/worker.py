"""The inference worker: the thread that classifies the frames the capture loop prepared.

It only invokes, smooths and publishes; it pings systemd's watchdog while the camera delivers
(a stuck loop, or a camera silent for ``source.timeout_s``, stops the pings and systemd restarts
the service) and sends READY after the first classified frame.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from ..config import Config
from ..inference import postprocess
from ..inference.classifier import Classifier
from . import notify
from .capture_loop import CaptureLoop
from .frames import Frame
from .live import LiveBoard
from .smoothing import Smoother

log = logging.getLogger(__name__)


class InferenceWorker:
    def __init__(
        self,
        cfg: Config,
        classifier: Classifier,
        capture: CaptureLoop,
        board: LiveBoard,
        store_live: Callable[[dict, str, str], None],
        stop: threading.Event,
        mark_ready: Callable[[], None],
    ) -> None:
        self.cfg = cfg
        self.classifier = classifier
        self.capture = capture
        self.board = board
        self._store_live = store_live  # (result, profile, source): the results service's
        self._stop = stop
        self._mark_ready = mark_ready
        self.smoother = Smoother(
            classifier.bundle.labels, cfg.pipeline.smoothing, cfg.pipeline.hold
        )
        self.last_heartbeat = time.monotonic()
        self._last_store = 0.0

    def run(self) -> None:
        interval = notify.watchdog_interval()
        last_ping = 0.0
        min_gap = 1.0 / self.cfg.pipeline.max_fps if self.cfg.pipeline.max_fps > 0 else 0.0
        last_run = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            self.last_heartbeat = now
            if self.capture.source_hung():
                if self.board.state.camera != "stalled":
                    timeout = self.capture.source_timeout
                    log.error(
                        "camera delivered nothing for %.0f s: stalled; no more watchdog "
                        "pings so systemd restarts the daemon",
                        timeout,
                    )
                    self.board.publish(
                        camera="stalled", camera_error=f"no frame for {timeout:.0f} s"
                    )
            elif interval and now - last_ping >= interval:
                notify.notify("WATCHDOG=1")
                last_ping = now
            frame = self.capture.wait_frame(timeout=1.0)
            if frame is None:
                continue
            if min_gap and time.monotonic() - last_run < min_gap:
                self._stop.wait(min_gap - (time.monotonic() - last_run))
            last_run = time.monotonic()
            try:
                self.process(frame)
            except Exception:
                self.board.publish(count=("errors",))
                log.exception("inference failed on frame %d", frame.id)

    def process(self, frame: Frame) -> None:
        p = self.cfg.pipeline
        checked, small = frame.quality, frame.small
        if checked is None or small is None:  # the capture loop hands over prepared frames
            raise ValueError(f"frame {frame.id} reached the worker unprepared")
        quality = checked.to_dict()
        if not checked.assessable:
            self.board.publish(
                only_for=self.cfg.profile,
                count=("not_assessable",),
                quality=quality,
                result={
                    "label": None,
                    "assessable": False,
                    "reason": checked.reason,
                    "quality": quality,
                },
                frame_id=frame.id,
                at=time.time(),
            )
            self._mark_ready()
            return
        result = self.classifier.infer(
            small, frame.times, top_k=p.top_k, name=f"frame {frame.id}"
        )
        done = time.monotonic()
        bundle = self.classifier.bundle
        if not result.in_scope:
            # Not what the model is for (an empty stage, a finger, the wrong use's subject):
            # like a failed quality gate, it is shown as such, never smoothed into the live
            # decision and never stored.
            doc = result.to_dict()
            doc.update(
                assessable=False,
                reason=bundle.scope_texts["nothing_in_view"],
                quality=quality,
                label=None,
                profile=self.cfg.profile,
            )
            self.board.publish(
                only_for=self.cfg.profile,
                count=("out_of_scope",),
                quality=quality,
                result=doc,
                frame_id=frame.id,
                at=time.time(),
            )
            self._mark_ready()
            return
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
        doc["profile"] = self.cfg.profile  # the profile whose model made it
        doc["frame_to_result_ms"] = round((done - frame.at) * 1e3, 2)
        smoothed = {
            "label": shown.label,
            "probabilities": dict(zip(self.smoother.labels, map(float, shown.mean), strict=True)),
            "decision": shown.decision,
            "frame_id": frame.id,
            "shown_for_frames": shown.age,
        }
        self.board.record(doc["frame_to_result_ms"], done)
        # One snapshot: this frame's result, its quality and the smoothed state it led to.
        self.board.publish(
            only_for=self.cfg.profile,
            count=("classified",),
            result=doc,
            quality=quality,
            smoothed=smoothed,
            frame_id=frame.id,
            at=time.time(),
        )
        self._mark_ready()
        if p.store_every_s > 0 and time.time() - self._last_store >= p.store_every_s:
            self._last_store = time.time()
            self._store_live(doc, self.cfg.profile, self.capture.source.describe())
