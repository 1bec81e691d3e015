"""The daemon's pipeline: capture → quality gate → classify → smooth → store, as four parts.

- :class:`~edge.daemon.capture_loop.CaptureLoop` (the camera's thread): newest frame, prepared
  one at a time, the camera reopened with backoff, stills.
- :class:`~edge.daemon.worker.InferenceWorker` (the inference thread): classify, smooth,
  publish, watchdog, READY.
- :class:`~edge.daemon.results.ResultsService`: everything stored (uploads, captures, live
  results, retention) and every read of stored results.
- :class:`~edge.daemon.live.LiveBoard`: the live state, one immutable snapshot under a lock.

The model, the camera and the two threads belong to the running *profile* (:class:`Active`);
``switch_profile`` replaces them without a restart while the store, the live board and the web
server stay (see docs/profiles.md).

``Pipeline`` wires them and is what the web layer gets, one route per service: ``results``
(every store and every read of stored results: uploads, captures, samples), ``store`` (the
database itself, for the exports that walk a whole sample), ``bundles``
(each profile's bundle), ``state`` (the live board's snapshot), the running ``profile`` and
``cfg``, ``profiles`` and ``switch_profile``, ``status``, ``health``, ``model``, ``backend``
and ``preview_jpeg``; ``start``, ``stop``, ``running`` and ``fatal`` for the daemon. Never the
parts' internals. See docs/architecture.md.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from ..capture import Source
from ..config import Config
from ..errors import FieldScopeError
from ..inference.bundle import Bundle
from ..inference.classifier import Classifier
from . import notify
from .active import Active
from .budget import DecodeBudget
from .capture_loop import CaptureLoop
from .gate import Gate
from .live import LiveBoard, LiveState
from .profiles import ProfileBundles
from .results import ResultsService
from .store import Store
from .worker import InferenceWorker

log = logging.getLogger(__name__)
__all__ = ["Pipeline", "LiveState", "Active", "ProfileError", "UnknownProfile"]
Opener = Callable[[Config], tuple[Classifier, Source]]


class ProfileError(FieldScopeError):
    """A profile could not be switched to (unknown, or its model or camera would not open);
    the kit stays on (or returns to) the profile it was on."""


class UnknownProfile(ProfileError):
    """No profile of that id in the configuration."""


class Pipeline:
    def __init__(
        self,
        cfg: Config,
        classifier: Classifier,
        source: Source,
        store: Store,
        opener: Opener | None = None,
        delivery: Any = None,
        bundles: ProfileBundles | None = None,
    ) -> None:
        """``cfg`` is resolved for the starting profile (or has no profiles); ``opener`` opens
        another profile's model and source for ``switch_profile`` (the daemon's is
        :func:`edge.daemon.profiles.open_profile`; tests pass stand-in cameras); ``delivery``:
        the senders of results to MQTT and a PACS (:class:`edge.outbound.Delivery`), started
        and stopped with the pipeline."""
        if not cfg.profile:
            cfg = cfg.for_profile(cfg.first_profile())
        self.base_cfg = cfg
        self.store = store
        self.board = LiveBoard()
        self._stop = threading.Event()
        # Why the daemon must end (set when no profile can be opened any more), else None.
        self.fatal: str | None = None
        self._ready_sent = False
        self._ready_lock = threading.Lock()
        self._switch_lock = threading.Lock()
        self._gate = Gate()
        self._opener = opener
        self.delivery = delivery
        self.bundles = bundles if bundles is not None else ProfileBundles(cfg)
        self._housekeeping: threading.Thread | None = None
        self.started = time.time()
        self.results = ResultsService(
            store, self._use, DecodeBudget(cfg.web.decode_budget_mb * 2**20)
        )
        self._next_frame_id = 1
        self._run = self._make_run(cfg, classifier, source)
        self.board.publish(profile=self._run.profile.id)

    def _make_run(self, cfg: Config, classifier: Classifier, source: Source) -> Active:
        stop = threading.Event()
        capture = CaptureLoop(
            cfg, classifier, source, self.board, stop,
            on_camera_lost=lambda: self._mark_ready("camera lost, retrying"),
            first_id=self._next_frame_id,
        )
        worker = InferenceWorker(
            cfg, classifier, capture, self.board, self.results.store_live, stop,
            mark_ready=self._mark_ready,
        )
        profile = cfg.all_profiles()[cfg.profile]
        self.bundles.set_running(profile.id, classifier.bundle)
        return Active(profile, cfg, classifier, capture, worker, stop)

    @contextmanager
    def _use(self) -> Iterator[Active]:
        """The running profile, kept running while the caller is inside (a switch waits)."""
        with self._gate.enter():
            yield self._run

    # -- lifecycle ---------------------------------------------------------------------------
    def _start_run(self, run: Active) -> None:
        for target, name in ((run.capture.run, "capture"), (run.worker.run, "inference")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            run.threads.append(t)

    def _halt(self, run: Active, timeout: float) -> None:
        """Stop a profile's threads within a few seconds even when the camera is wedged inside
        read(): the capture thread is joined first, so the camera is normally closed with
        nobody inside read()."""
        run.stop.set()
        run.capture.wake()
        for t in run.threads:
            if t.name == "capture":
                t.join(timeout)
        run.capture.close_source(timeout)
        for t in run.threads:
            t.join(timeout)
        self._next_frame_id = run.capture.next_id

    def _close_when_stopped(self, run: Active) -> None:
        """Close a halted profile's model (an Edge TPU is then free for the next one), but only
        once its threads are gone: a worker still inside ``infer`` (a slow TPU call) keeps its
        interpreter until it returns, and then publishes nothing (its profile is not the
        board's any more)."""
        alive = [t for t in run.threads if t.is_alive()]
        if not alive:
            run.classifier.close()
            return
        log.warning("profile %s: %s still running after the stop; its model is closed when "
                    "they end", run.profile.id, ", ".join(t.name for t in alive))

        def reap() -> None:
            for t in alive:
                t.join()
            run.classifier.close()
            log.info("profile %s: its model is closed", run.profile.id)

        threading.Thread(target=reap, name=f"close-{run.profile.id}", daemon=True).start()

    def start(self) -> None:
        self._start_run(self._run)
        self._housekeeping = threading.Thread(
            target=lambda: self.results.housekeeping(self._stop), name="housekeeping",
            daemon=True,
        )
        self._housekeeping.start()
        if self.delivery is not None:
            self.delivery.start()

    def stop(self, timeout: float = 1.5) -> None:
        self._stop.set()
        with self._switch_lock:
            self._halt(self._run, timeout)
        if self.delivery is not None:
            self.delivery.stop(timeout)
        if self._housekeeping is not None:
            self._housekeeping.join(timeout)

    # -- profiles ------------------------------------------------------------------------------
    @property
    def profile(self) -> Active:
        return self._run

    def profiles(self) -> list[dict[str, Any]]:
        """Every configured profile, the running one marked."""
        out = []
        run = self._run
        for pid, p in self.base_cfg.all_profiles().items():
            active = pid == run.profile.id
            if active:
                name = run.name
            else:  # unnamed: its bundle's name, as the running one shows
                bundle = None if p.name else self.bundles(pid)
                name = p.name or (bundle.name if bundle else pid)
            out.append({"id": pid, "name": name, "active": active})
        return out

    def switch_profile(self, profile_id: str) -> dict[str, Any]:
        """Swap model and camera for another profile's, without a restart.

        Uploads and captures in progress finish on the old profile; those that arrive during
        the switch wait and run on the new one; stored results are untouched. If the new
        profile's model or camera cannot be opened, the old profile is opened again and
        ProfileError says why. The choice is remembered across restarts."""
        try:
            cfg = self.base_cfg.for_profile(profile_id)
        except FieldScopeError as exc:
            raise UnknownProfile(exc.message, exc.hint) from exc
        if self._opener is None:
            raise ProfileError("this pipeline cannot switch profiles (no opener)")
        with self._switch_lock:
            if self._stop.is_set():
                raise ProfileError("the kit is stopping")
            old = self._run
            if profile_id == old.profile.id:
                return old.describe()
            t0 = time.monotonic()
            with self._gate.closed():
                self._halt(old, timeout=1.5)
                self._close_when_stopped(old)
                try:
                    classifier, source = self._opener(cfg)
                except Exception as exc:
                    log.error("profile %s would not open (%s); back to %s", profile_id, exc,
                              old.profile.id)
                    try:
                        classifier, source = self._opener(old.cfg)
                    except Exception as again:
                        # Neither opens (the model's storage failed?): nothing can classify, so
                        # the daemon ends with an error (serve() sees `fatal`) and systemd
                        # starts it again on the saved profile, the old one.
                        log.critical("profile %s would not open again either: %s",
                                     old.profile.id, again)
                        self.fatal = (f"profile {profile_id!r} would not open ({exc}) and "
                                      f"{old.profile.id!r} would not open again ({again})")
                        self._stop.set()
                        raise ProfileError(
                            f"profile {profile_id!r} could not start ({exc}), nor could "
                            f"{old.profile.id!r} again ({again})",
                            "the kit stops now: under systemd it starts again by itself on "
                            f"{old.profile.id!r}; otherwise start it again",
                        ) from again
                    self._run = self._make_run(old.cfg, classifier, source)
                    self._start_run(self._run)
                    raise ProfileError(
                        f"profile {profile_id!r} could not start: {exc}",
                        f"the kit is back on {old.profile.id!r}; see its log",
                    ) from exc
                self._run = self._make_run(cfg, classifier, source)
                # The live view starts over for the new model; the counters carry on.
                self.board.publish(profile=profile_id, result=None, quality=None,
                                   smoothed=None, camera="starting", camera_error=None)
                self._start_run(self._run)
            try:
                self.store.set_setting("profile", profile_id)
            except (sqlite3.Error, OSError) as exc:  # a full card: switched, not remembered
                log.warning("profile %s is running but not remembered for the next start: %s",
                            profile_id, exc)
            log.info("profile %s → %s in %.0f ms (%s)", old.profile.id, profile_id,
                     (time.monotonic() - t0) * 1e3, self._run.classifier.bundle.name)
            return self._run.describe()

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
    def cfg(self) -> Config:
        """The configuration resolved for the running profile."""
        return self._run.cfg

    @property
    def model(self) -> Bundle:
        """The bundle in use (its manifest, labels, card and plots)."""
        return self._run.classifier.bundle

    def backend(self) -> dict[str, Any]:
        """Which backend runs the model, why, and on which runtime (no storage or camera
        queries, unlike status())."""
        return self._run.classifier.describe()

    def preview_jpeg(self, max_width: int = 640) -> tuple[int, bytes] | None:
        """The newest frame as a JPEG for the live view (None before the first)."""
        return self._run.capture.preview_jpeg(max_width)

    def health(self) -> tuple[dict[str, Any], bool]:
        """What the open health endpoint says (states only, no error texts), and whether
        inference is alive."""
        st, run = self.state, self._run
        age = time.monotonic() - run.worker.last_heartbeat
        storage = self.results.storage_status()
        camera_ok = st.camera in ("ok", "finished")  # a replay that ended on purpose
        inference_ok = age < 10
        tpu_lost = run.classifier.degraded is not None
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
                "backend": run.classifier.backend.name,
                # The Edge TPU failed and the CPU stands in (the reason is in status()).
                "degraded": tpu_lost,
            },
        }
        return body, inference_ok

    def status(self) -> dict[str, Any]:
        st, run = self.state, self._run  # one snapshot, one profile for the whole answer
        bundle = run.classifier.bundle
        return {
            "uptime_s": round(time.time() - self.started, 1),
            "profile": run.describe(),
            "camera": {
                "state": st.camera,
                "error": st.camera_error,
                "source": run.capture.source.describe(),
            },
            "backend": run.classifier.describe(),
            "runtime": run.classifier.runtime.label,
            "model": {"name": bundle.name, "version": bundle.version,
                      "members": [run.classifier.backend.artifact.path.name]
                      + [m.path.name for m in bundle.members]},
            "fps": round(self.board.fps(), 2),
            "latency_ms": self.board.latency_ms(),
            "frame_id": st.frame_id,
            "frames_classified": st.classified,
            "frames_not_assessable": st.not_assessable,
            "frames_out_of_scope": st.out_of_scope,
            "errors": st.errors,
            "last_result": st.result,
            "smoothed": st.smoothed,
            "quality": st.quality,
            "storage": self.results.storage_status(),
            # Per destination: queued, delivered, failed, dropped, oldest waiting, connected.
            "outbox": self.delivery.status() if self.delivery is not None else {},
        }
