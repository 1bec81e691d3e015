"""Opening a profile: its model (with the previous good bundle as fallback) and its camera.

The daemon opens one profile at start-up and another whenever the page switches profiles; both
go through :func:`open_profile`, so a switch builds exactly what a fresh start would.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from ..capture import Source, make_source
from ..config import Config
from ..errors import FieldScopeError
from ..inference.bundle import Bundle, load_model
from ..inference.classifier import Classifier

log = logging.getLogger(__name__)


def open_classifier(cfg: Config) -> Classifier:
    """The configured bundle, or the previous good one when it is refused."""
    m = cfg.model
    def classifier(bundle: Bundle) -> Classifier:
        return Classifier(bundle, backend=m.backend, threads=m.threads,
                          device=m.device or None,
                          max_pixels=int(cfg.web.max_megapixels * 1_000_000))

    try:
        return classifier(load_model(cfg.bundle_path, m.labels or None))
    except FieldScopeError as exc:
        if not m.fallback_bundle:
            raise
        log.error(
            "model %s refused (%s); using the previous bundle %s",
            cfg.bundle_path,
            exc,
            m.fallback_bundle,
        )
        try:
            clf = classifier(load_model(m.fallback_bundle))
        except FieldScopeError as second:  # say why the real one was refused, first
            raise FieldScopeError(
                f"model {cfg.bundle_path} refused ({exc.message}), and the fallback "
                f"([model].fallback_bundle) {m.fallback_bundle} too: {second.message}",
                exc.hint,
            ) from second
        clf.backend_reason += f" · configured bundle refused: {exc.message}"
        return clf


def open_profile(cfg: Config) -> tuple[Classifier, Source]:
    """The model and the (not yet opened) source of ``cfg``'s profile."""
    return open_classifier(cfg), make_source(cfg.source)


def profile_bundle(cfg: Config, profile_id: str | None) -> Bundle | None:
    """The bundle a profile names (read from its folder), for exports and pages about results
    it made; None for a profile no longer configured or a bundle that cannot be read."""
    try:
        run = cfg.for_profile(profile_id or cfg.first_profile())
        return load_model(run.bundle_path, run.model.labels or None)
    except FieldScopeError:
        return None


class ProfileBundles:
    """Each profile's bundle, for pages and exports about the results it made: the running
    profile's is the one its classifier runs (a fallback bundle included), the others are read
    from their folders once. Built before the pipeline and the delivery, which both use it;
    an export without a config passes ``remembered``, the folder the store recorded for each
    profile's bundle, read instead of the (default) config's profiles."""

    def __init__(self, cfg: Config,
                 remembered: Callable[[str], str | None] | None = None) -> None:
        self.cfg = cfg
        self._remembered = remembered
        self._cache: dict[str, Bundle] = {}
        self._running: tuple[str, Bundle] | None = None
        self._lock = threading.Lock()

    def set_running(self, profile_id: str, bundle: Bundle) -> None:
        with self._lock:
            self._running = (profile_id, bundle)

    def __call__(self, profile_id: str | None) -> Bundle | None:
        with self._lock:
            running = self._running
            if running is not None and (not profile_id or profile_id == running[0]):
                return running[1]
            pid = profile_id or self.cfg.first_profile()
            if pid not in self._cache:
                bundle = self._read(pid)
                if bundle is None:
                    return None
                self._cache[pid] = bundle
            return self._cache[pid]

    def _read(self, pid: str) -> Bundle | None:
        folder = self._remembered(pid) if self._remembered is not None else None
        if not folder:
            return profile_bundle(self.cfg, pid)
        try:
            return load_model(folder)
        except FieldScopeError:
            return None
