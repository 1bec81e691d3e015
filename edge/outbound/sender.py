"""The sender: one thread per destination, taking what the outbox has due and delivering it.

It connects when there is something to send, sends in queue order, and marks a message
delivered only after the destination acknowledged it. A failure closes the connection and
waits with backoff (1 s doubling to ``[outbox] retry_max_s``); one log line per change of state,
not one per try. It only ever reads the store, so a destination that is down costs
classification nothing.
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator

from ..daemon.outbox import Message, Outbox
from .messages import Gone, Refused, short_reason

log = logging.getLogger(__name__)


class Destination(ABC):
    """An MQTT broker, a PACS: connect, send one message (return = acknowledged), close."""

    name = "?"

    @abstractmethod
    def open(self) -> None:
        """Connect; raise when the destination cannot be reached."""

    @abstractmethod
    def send(self, msg: Message) -> None:
        """Deliver one message and return once the destination acknowledged it. Raise Gone or
        Refused when it can never be delivered, anything else to try again later."""

    def send_batch(self, batch: list[Message]) -> Iterator[tuple[Message, Exception | None]]:
        """Deliver several, yielding each message with None (acknowledged) or its error, in
        order. A destination that can keep several in flight (MQTT) overrides this; the sender
        stops reading at the first error that is not Gone or Refused."""
        for msg in batch:
            try:
                self.send(msg)
            except Exception as exc:
                yield msg, exc
            else:
                yield msg, None

    def close(self) -> None:  # noqa: B027  (optional)
        """Disconnect (also after a failure; must not raise)."""

    def describe(self) -> str:
        return self.name


class Sender:
    def __init__(self, dest: Destination, outbox: Outbox, stop: threading.Event,
                 retry_max_s: float = 300.0, poll_s: float = 5.0) -> None:
        self.dest = dest
        self.outbox = outbox
        self._stop = stop
        self.retry_max_s = retry_max_s
        self.poll_s = poll_s
        self.connected = False
        self._wake = outbox.event(dest.name)
        self._backoff = 1.0
        self._down_since_logged: str | None = None

    def _failed(self, why: str) -> None:
        if self._down_since_logged != why:
            log.warning("%s: %s; retrying with backoff (up to %.0f s)", self.dest.describe(),
                        why, self.retry_max_s)
            self._down_since_logged = why
        self._disconnect()
        self._stop.wait(self._backoff)
        self._backoff = min(self._backoff * 2, self.retry_max_s)

    def _disconnect(self) -> None:
        self.connected = False
        try:
            self.dest.close()
        except Exception:
            log.debug("closing %s", self.dest.name, exc_info=True)

    def run(self) -> None:
        try:
            while not self._stop.is_set():
                self._wake.clear()
                batch = self.outbox.due(self.dest.name)
                if not batch:
                    self._wake.wait(self.poll_s)
                    continue
                if not self.connected:
                    try:
                        self.dest.open()
                    except Exception as exc:
                        why = f"cannot connect: {short_reason(exc)}"
                        self.outbox.unreachable(self.dest.name, why)
                        self._failed(why)
                        continue
                    self.connected = True
                    if self._down_since_logged is not None:
                        log.info("%s: connected again; delivering %s waiting message(s)",
                                 self.dest.describe(), "the" if len(batch) < 20 else "20+")
                    self._down_since_logged = None
                    self._backoff = 1.0
                try:
                    self._send_batch(batch)
                except Exception as exc:  # the store itself failing: keep the thread alive
                    log.exception("%s: sending failed", self.dest.name)
                    self._failed(f"{type(exc).__name__}: {exc}")
        finally:
            self._disconnect()

    def _send_batch(self, batch: list[Message]) -> None:
        outcomes = self.dest.send_batch(batch)
        try:
            for msg, exc in outcomes:
                if exc is None:
                    self.outbox.delivered(msg)
                elif isinstance(exc, (Gone, Refused)):
                    log.error("%s: message %s dropped: %s", self.dest.name, msg.message_id, exc)
                    self.outbox.dropped(msg, str(exc))
                else:
                    why = short_reason(exc)
                    self.outbox.retry(msg, why, self._backoff)
                    self._failed(why)
                    return
                if self._stop.is_set():
                    return
        finally:
            close = getattr(outcomes, "close", None)
            if close is not None:
                close()
