"""Results leaving the kit: the senders that empty the outbox into the configured destinations
(MQTT, a PACS by DICOMweb), and the exports (DICOM files, a FHIR bundle).

``Delivery`` runs one sender thread per destination plus the outbox's bounds, apart from the
capture and inference threads; a destination that is down or slow only delays its own queue.
"""

from __future__ import annotations

import importlib
import logging
import threading
from typing import Any

from ..config import Config
from ..daemon.outbox import Outbox
from ..daemon.store import Store
from ..destinations import DESTINATIONS
from .dicom import BundleFor
from .sender import Destination, Sender

log = logging.getLogger(__name__)
BOUNDS_EVERY_S = 60.0


def destinations(cfg: Config, store: Store, bundle_for: BundleFor) -> list[Destination]:
    """A sender's destination for each destination the config turns on (edge/destinations
    says which class sends for it; it is imported only when on)."""
    out: list[Destination] = []
    for spec in DESTINATIONS:
        if spec.name not in cfg.destinations:
            continue
        module, _, name = spec.sender.partition(":")
        cls = getattr(importlib.import_module(module), name)
        out.append(cls(cfg.section(spec.name), cfg.kit_id, store, bundle_for))
    return out


class Delivery:
    def __init__(self, cfg: Config, store: Store, outbox: Outbox, bundle_for: BundleFor) -> None:
        self.store = store
        self.outbox = outbox
        self._stop = threading.Event()
        self.senders = [
            Sender(d, outbox, self._stop, retry_max_s=cfg.outbox.retry_max_s)
            for d in destinations(cfg, store, bundle_for)
        ]
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for s in self.senders:
            t = threading.Thread(target=s.run, name=f"send-{s.dest.name}", daemon=True)
            t.start()
            self._threads.append(t)
        if self.senders:
            t = threading.Thread(target=self._bounds, name="outbox-bounds", daemon=True)
            t.start()
            self._threads.append(t)

    def _bounds(self) -> None:
        while True:
            try:
                dropped = self.outbox.enforce_bounds()
                if dropped:
                    log.warning("outbox: dropped %d undelivered message(s) past [outbox] "
                                "max_age_days or max_messages", dropped)
            except Exception:
                log.exception("outbox bounds")
            if self._stop.wait(BOUNDS_EVERY_S):
                return

    def stop(self, timeout: float = 3.0) -> None:
        self._stop.set()
        self.outbox.notify()
        for t in self._threads:
            t.join(timeout)

    def status(self) -> dict[str, Any]:
        """Per destination: the outbox's counts, the oldest waiting message, whether the
        sender is connected, and where it sends."""
        counts = self.outbox.status()
        for s in self.senders:
            entry = counts.setdefault(s.dest.name, {})
            entry.update(connected=s.connected, target=s.dest.describe())
        return counts
