"""Progress bars for long training work that stay readable in a log file.

On a terminal a bar redraws itself in place; a run started in the background writes every redraw
to its log (a carriage return each, ten a second), which buried a run's epochs under about 200 kB
of bars. Off a terminal the bar is therefore drawn once a minute at most."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any, TypeVar

from tqdm import tqdm

T = TypeVar("T")

# Seconds between redraws when standard error is not a terminal.
LOG_INTERVAL = 60.0


def bar(items: Iterable[T], **kw: Any) -> Iterable[T]:
    """``tqdm(items, **kw)``, redrawn at most every LOG_INTERVAL seconds into a file.

    Both of tqdm's clocks are slowed: ``mininterval`` between updates, and ``maxinterval``, after
    which its monitor thread redraws a bar that has not drawn itself (every 10 s by default)."""
    stream = kw.get("file") or sys.stderr
    isatty = getattr(stream, "isatty", None)
    if not (isatty and isatty()):
        kw["mininterval"] = max(kw.get("mininterval", 0.1), LOG_INTERVAL)
        kw["maxinterval"] = max(kw.get("maxinterval", 10.0), LOG_INTERVAL)
    return tqdm(items, **kw)
