"""The camera interface: everything above it is tested with the replay source.

A source yields RGB frames (H, W, 3) uint8 for live inference and preview, and can take a
full-quality still for on-demand captures. Real hardware (picamera2, V4L2) sits behind it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from ..errors import FieldScopeError


class SourceError(FieldScopeError, RuntimeError):
    """The camera is unavailable (unplugged, busy, driver error); the daemon retries."""


class SourceFinished(SourceError):
    """A replay that does not loop has shown everything: a final state, not a lost camera."""


class Source(ABC):
    name = "?"

    @abstractmethod
    def open(self) -> None:
        """Acquire the device; raise SourceError when it is not there."""

    @abstractmethod
    def read(self) -> np.ndarray:
        """The next frame for live inference; blocks at most about one frame interval."""

    def capture_still(self) -> np.ndarray:
        """A full-quality frame for an on-demand capture (default: the next live frame)."""
        return self.read()

    def close(self) -> None:  # noqa: B027  (optional for sources holding nothing)
        """Release the device."""

    def interrupt(self) -> None:  # noqa: B027  (optional: real cameras block one frame at most)
        """Called from another thread when the kit stops or switches profile: a read that
        waits on its own pacing (a slow replay) should return now."""

    def describe(self) -> str:
        return self.name
