"""A gate between users of the running profile and a profile switch.

Any number of users (uploads, captures) may be inside at once; a switch closes the gate, waits
until the last user is out, swaps the model and camera, and opens it again. Users that arrive
meanwhile wait and then use the new profile, so a switch never fails a request or closes a
model under an inference in progress.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Gate:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._inside = 0
        self._closed = False

    @contextmanager
    def enter(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._closed)
            self._inside += 1
        try:
            yield
        finally:
            with self._cond:
                self._inside -= 1
                self._cond.notify_all()

    @contextmanager
    def closed(self) -> Iterator[None]:
        """Held by one switch at a time (the caller serialises switches)."""
        with self._cond:
            self._closed = True
            self._cond.wait_for(lambda: self._inside == 0)
        try:
            yield
        finally:
            with self._cond:
                self._closed = False
                self._cond.notify_all()
