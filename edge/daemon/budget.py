"""A budget of bytes for the full-size pixels of uploads being decoded at once.

One upload may be small on the wire and huge once decoded (a 100 KB 16-bit PNG of 49
megapixels is 98 MB of pixels, a float TIFF 196 MB): a handful at once would take a Pi's
memory. Each decode holds its own size against the budget while its full-size pixels exist;
others wait a few seconds for room, then are answered 503 with Retry-After. A decode larger
than the whole budget runs when it is alone (the pixel limit bounds it).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from ..errors import FieldScopeError


class Busy(FieldScopeError):
    """Too many large images are being decoded right now; try again shortly."""

    status = 503
    retry_after_s = 5


class DecodeBudget:
    def __init__(self, limit_bytes: int, wait_s: float = 10.0) -> None:
        self.limit = max(1, int(limit_bytes))
        self.wait_s = wait_s
        self.used = 0
        self.peak = 0
        self._cond = threading.Condition()

    @contextmanager
    def hold(self, nbytes: int) -> Iterator[None]:
        need = min(max(0, int(nbytes)), self.limit)
        deadline = time.monotonic() + self.wait_s
        with self._cond:
            while self.used + need > self.limit:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Busy(
                        f"the kit is decoding other large images ({self.used / 2**20:.0f} of "
                        f"{self.limit / 2**20:.0f} MB in use)",
                        f"send it again in {Busy.retry_after_s} s, or send a smaller image",
                    )
                self._cond.wait(left)
            self.used += need
            self.peak = max(self.peak, self.used)
        try:
            yield
        finally:
            with self._cond:
                self.used -= need
                self._cond.notify_all()
