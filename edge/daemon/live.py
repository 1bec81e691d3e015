"""The live state: what the kit shows now, published as one immutable snapshot.

Three threads change it (capture: the camera's state; the inference worker: each frame's
result and its smoothed state; both: error counters) and any number of web threads read it.
Writers replace the snapshot under one lock; readers take the reference and get a result, its
quality and its smoothed state from the same frame, never a mix.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, replace
from typing import Any

import numpy as np


@dataclass(frozen=True)
class LiveState:
    profile: str = ""  # the profile whose model made ``result`` and ``smoothed``
    frame_id: int = 0
    at: float = 0.0
    result: dict[str, Any] | None = None
    quality: dict[str, Any] | None = None
    smoothed: dict[str, Any] | None = None
    camera: str = "starting"
    camera_error: str | None = None
    classified: int = 0
    not_assessable: int = 0
    out_of_scope: int = 0  # classified, but not what the model is for (the scope check)
    errors: int = 0


class LiveBoard:
    """Holds the current :class:`LiveState` and the recent per-frame timings."""

    def __init__(self, history: int = 50) -> None:
        self._state = LiveState()
        self._lock = threading.Lock()
        self._latencies: deque[float] = deque(maxlen=history)
        self._stamps: deque[float] = deque(maxlen=history)

    @property
    def state(self) -> LiveState:
        """The current snapshot (replaced, never changed in place)."""
        return self._state

    def publish(
        self, count: tuple[str, ...] = (), only_for: str | None = None, **changes: Any
    ) -> LiveState:
        """Replace the snapshot: ``changes`` set fields, each name in ``count`` adds one.
        ``only_for``: a profile id; when the board shows another profile (a switch happened
        while this frame was inside the old model), nothing changes."""
        with self._lock:
            st = self._state
            if only_for is not None and st.profile != only_for:
                return st
            for name in count:
                changes[name] = getattr(st, name) + 1
            self._state = replace(st, **changes)
            return self._state

    def record(self, frame_to_result_ms: float, done: float) -> None:
        with self._lock:
            self._latencies.append(frame_to_result_ms)
            self._stamps.append(done)

    def fps(self) -> float:
        with self._lock:
            stamps = list(self._stamps)
        if len(stamps) < 2 or stamps[-1] == stamps[0]:
            return 0.0
        return (len(stamps) - 1) / (stamps[-1] - stamps[0])

    def recent_latencies(self) -> list[float]:
        """Frame-to-result times (ms) of the last classified frames, oldest first."""
        with self._lock:
            return list(self._latencies)

    def latency_ms(self) -> float | None:
        lat = self.recent_latencies()
        return float(np.median(lat)) if lat else None
