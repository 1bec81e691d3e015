"""The running profile: its configuration, model, camera, and the two threads that use them.

A module of its own so that the services below the pipeline (results, the web layer's reads)
can name it without importing the pipeline that builds it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from ..config import Config, Profile
from ..inference.classifier import Classifier
from .capture_loop import CaptureLoop
from .worker import InferenceWorker


@dataclass
class Active:
    """The running profile: its resolved configuration, its model and camera, the capture and
    inference threads and the event that stops just them."""

    profile: Profile
    cfg: Config
    classifier: Classifier
    capture: CaptureLoop
    worker: InferenceWorker
    stop: threading.Event
    threads: list[threading.Thread] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.profile.name or self.classifier.bundle.name

    def describe(self) -> dict[str, Any]:
        b = self.classifier.bundle
        return {"id": self.profile.id, "name": self.name, "model": b.name, "version": b.version}
