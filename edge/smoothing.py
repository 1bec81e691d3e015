"""Live results: average the last N frames, change the shown state only after it holds."""

from __future__ import annotations

from collections import deque

import numpy as np


class Smoother:
    def __init__(self, labels: list[str], window: int = 5, hold: int = 3) -> None:
        self.labels = labels
        self.window: deque[np.ndarray] = deque(maxlen=window)
        self.hold = hold
        self.state: str | None = None
        self._candidate: str | None = None
        self._count = 0

    def update(self, probabilities: dict[str, float]) -> tuple[str, np.ndarray]:
        """Add one frame; returns the shown state and the averaged probabilities."""
        self.window.append(np.array([probabilities[lab] for lab in self.labels]))
        # sum() of a few small arrays, not np.mean of the deque (which copies it into a new
        # 2-D array first): this runs once per classified frame.
        mean = sum(self.window) / len(self.window)
        top = self.labels[int(mean.argmax())]
        if self.state is None:
            self.state = top
        elif top != self.state:
            if top == self._candidate:
                self._count += 1
            else:
                self._candidate, self._count = top, 1
            if self._count >= self.hold:
                self.state, self._candidate, self._count = top, None, 0
        else:
            self._candidate, self._count = None, 0
        return self.state, mean

    def reset(self) -> None:
        self.window.clear()
        self.state, self._candidate, self._count = None, None, 0
