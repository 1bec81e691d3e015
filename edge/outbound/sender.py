"""The sender: one thread per destination, taking what the outbox has due and delivering it.

It connects when there is something to send, sends in queue order, and marks a message
delivered only after the destination acknowledged it. A failure closes the connection and
waits with backoff (1 s doubling to ``[outbox] retry_max_s``, back to 1 s once a message is
acknowledged); one log line per change of state, not one per try. A message that fails again
and again (a PACS that rejects one object with a 500) keeps its place for ``KEEP_ORDER_TRIES``
tries, then waits its own growing delay while the next one is tried: if that one fails too, the
fault is the destination's and the first takes its place again; if it is delivered, the first
stays back, so it cannot hold up the messages behind it. The thread outlives any failure, the
store's included (a full or read-only card), and says so in the outbox's status. It only ever
reads the store, so a destination that is down costs classification nothing.
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator

from ..daemon.outbox import Message, Outbox
from .messages import Gone, Refused, short_reason

log = logging.getLogger(__name__)

# Tries a failing message keeps its place in the queue (a link that drops mid-send fails the
# message at the head; order holds through that). Past them it waits 2**tries s, up to
# retry_max_s, while the others go.
KEEP_ORDER_TRIES = 2


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
                 retry_max_s: float = 300.0, poll_s: float = 5.0,
                 keep_order_tries: int = KEEP_ORDER_TRIES) -> None:
        self.dest = dest
        self.keep_order_tries = keep_order_tries
        self.outbox = outbox
        self._stop = stop
        self.retry_max_s = retry_max_s
        self.poll_s = poll_s
        self.connected = False
        self._wake = outbox.event(dest.name)
        self._backoff = 1.0
        self._down_since_logged: str | None = None
        self._unreachable = False
        # The message last pushed back on its own delay, until a delivery shows that the
        # destination takes others (then it was the message) or another message fails too
        # (then it was the destination, and it takes its place in the queue again).
        self._held: Message | None = None

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
                try:
                    self._step()
                except Exception as exc:  # the store itself failing: keep the thread alive
                    why = f"{type(exc).__name__}: {exc}"
                    if self._down_since_logged != why:
                        log.exception("%s: the outbox failed", self.dest.name)
                    self.outbox.last_error[self.dest.name] = why
                    self._failed(why)
        finally:
            self._disconnect()

    def _step(self) -> None:
        """Take what is due and send it (connecting first); wait when nothing is."""
        self._wake.clear()
        batch = self.outbox.due(self.dest.name)
        if not batch:
            self._wake.wait(self.poll_s)
            return
        if not self.connected:
            try:
                self.dest.open()
            except Exception as exc:
                why = f"cannot connect: {short_reason(exc)}"
                self._unreachable = True
                self.outbox.unreachable(self.dest.name, why)
                self._failed(why)
                return
            self.connected = True
            if self._unreachable:
                log.info("%s: connected again; delivering %s waiting message(s)",
                         self.dest.describe(), "the" if len(batch) < 20 else "20+")
                self._unreachable = False
                self._down_since_logged = None
        self._send_batch(batch)

    def message_delay(self, attempts: int) -> float:
        """How long a message that failed (``attempts`` tries before this one) waits on its
        own: nothing while it keeps its place, then 2**attempts s up to retry_max_s."""
        if attempts < self.keep_order_tries:
            return 0.0
        return min(self.retry_max_s, 2.0 ** min(attempts, 32))  # 2.0 ** 1024 overflows

    def _send_batch(self, batch: list[Message]) -> None:
        outcomes = self.dest.send_batch(batch)
        try:
            for msg, exc in outcomes:
                if exc is None:
                    self.outbox.delivered(msg)
                    self._backoff = 1.0  # the link works
                    self._down_since_logged = None
                    self._held = None  # the one held back failed on its own: it stays back
                elif isinstance(exc, (Gone, Refused)):
                    log.error("%s: message %s dropped: %s", self.dest.name, msg.message_id, exc)
                    self.outbox.dropped(msg, str(exc))
                else:
                    why = short_reason(exc)
                    if self._held is not None and self._held.id != msg.id:
                        self.outbox.reschedule(self._held)  # the destination's fault: in order
                        self._held = None
                    delay = self.message_delay(msg.attempts)
                    if delay:  # due only after the wait below, so that the others go first
                        delay += self._backoff
                        self._held = msg
                    self.outbox.retry(msg, why, delay)
                    self._failed(why)
                    return
                if self._stop.is_set():
                    return
        finally:
            close = getattr(outcomes, "close", None)
            if close is not None:
                close()
