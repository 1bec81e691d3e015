"""Live results: average the last N frames, change what is shown only after it holds.

What is shown is a pair: the top label of the running mean and the decision on that mean
(e.g. "refer"). Both change together, and only when a new pair has held for ``hold``
consecutive frames; until then the last shown pair stays, label and decision from the same
frame, so the page never shows one frame's label next to another's decision.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any, NamedTuple, cast

import numpy as np


class Shown(NamedTuple):
    label: str
    mean: np.ndarray  # the running mean of the probabilities (for the bars), always current
    decision: dict[str, Any] | None  # the decision shown with ``label``
    age: int  # frames since this label/decision pair began to be shown


class Smoother:
    def __init__(self, labels: list[str], window: int = 5, hold: int = 3) -> None:
        self.labels = labels
        self.window: deque[np.ndarray] = deque(maxlen=window)
        self.hold = hold
        self.state: str | None = None
        self.decision: dict[str, Any] | None = None
        self._key: tuple | None = None
        self._candidate: tuple | None = None
        self._count = 0
        self._age = 0

    def update(
        self,
        probabilities: dict[str, float],
        decide: Callable[[np.ndarray], dict[str, Any] | None] | None = None,
    ) -> Shown:
        """Add one frame; ``decide`` maps a mean to its decision (None: no decision rule)."""
        self.window.append(np.array([probabilities[lab] for lab in self.labels]))
        # sum() of a few small arrays, not np.mean of the deque (which copies it into a new
        # 2-D array first): this runs once per classified frame.
        mean = cast(np.ndarray, sum(self.window)) / len(self.window)
        top = self.labels[int(mean.argmax())]
        decision = decide(mean) if decide else None
        key = (top, None if decision is None else bool(decision["positive"]))
        self._age += 1
        if self._key is None or key == self._key:
            # Same pair as shown: refresh it (the score in the decision text stays current).
            if self._key is None:
                self._age = 0
            self._key, self.state, self.decision = key, top, decision
            self._candidate, self._count = None, 0
        else:
            if key == self._candidate:
                self._count += 1
            else:
                self._candidate, self._count = key, 1
            if self._count >= self.hold:
                self._key, self.state, self.decision = key, top, decision
                self._candidate, self._count, self._age = None, 0, 0
        # A state is always shown once a frame came (the first one sets it).
        return Shown(self.state if self.state is not None else top, mean, self.decision,
                     self._age)

    def reset(self) -> None:
        self.window.clear()
        self.state, self.decision, self._key = None, None, None
        self._candidate, self._count, self._age = None, 0, 0
