"""The outbox: what the kit owes its destinations (an MQTT broker, a PACS), kept in its SQLite.

A message is queued inside the transaction of :meth:`Store.save` that stores its result (the
outbox registers with :meth:`Store.on_save`; the store knows nothing of destinations), so a
result that has an id also has its messages, through a crash or a power cut, and a result that
was never stored is never announced. The senders (``edge/outbound``) take what is due, and a
message leaves the outbox only when its destination acknowledged it (a PUBACK, a STOW-RS 200).
Each message has a unique id from the moment it is queued: a receiver that gets one twice (an
acknowledgement lost on the way back) can tell.

Bounded: undelivered messages past ``max_age_days``, or beyond ``max_messages`` (oldest first),
are dropped and counted, and so is a message whose result retention already removed. Nothing
here blocks classification: queueing is two INSERTs in a transaction the store makes anyway.
"""

from __future__ import annotations

import itertools
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from ..destinations import BY_NAME, Stored

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    destination TEXT NOT NULL,
    kind TEXT NOT NULL,
    message_id TEXT NOT NULL UNIQUE,
    result_id INTEGER,
    sample_code TEXT,
    created REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_try REAL NOT NULL DEFAULT 0,
    last_error TEXT
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox(destination, next_try);
CREATE INDEX IF NOT EXISTS outbox_age ON outbox(destination, created);
CREATE TABLE IF NOT EXISTS outbox_counts (
    destination TEXT NOT NULL,
    what TEXT NOT NULL,
    n INTEGER NOT NULL,
    PRIMARY KEY (destination, what)
);
"""


@dataclass(frozen=True)
class Message:
    id: int
    destination: str
    kind: str
    message_id: str
    result_id: int | None
    sample_code: str | None
    created: float
    attempts: int


def enqueue(
    db: sqlite3.Connection,
    destinations: tuple[str, ...],
    result_id: int,
    sample_code: str | None,
    has_snapshot: bool,
    now: float,
) -> int:
    """Queue what a stored result owes each destination (each declares it in
    edge/destinations); the caller holds the store's open transaction."""
    queued = 0
    stored = Stored(sample_code, has_snapshot)
    for dest in destinations:
        for owed in BY_NAME[dest].owes(stored):
            if owed.per_sample:
                # One summary per sample waiting at a time, read when sent. The waiting one is
                # replaced, not kept: a sender may have read it already (a batch in flight),
                # and kept it would leave this result out of every summary.
                db.execute(
                    "DELETE FROM outbox WHERE destination=? AND kind=? AND sample_code=?",
                    (dest, owed.kind, sample_code),
                )
            db.execute(
                "INSERT INTO outbox (destination, kind, message_id, result_id, sample_code, "
                "created, next_try) VALUES (?,?,?,?,?,?,?)",
                (dest, owed.kind, uuid.uuid4().hex, None if owed.per_sample else result_id,
                 sample_code, now, now),
            )
            queued += 1
    return queued


class Database(Protocol):
    """What the outbox needs of the store: its connection under its lock (so results and
    their messages are written by one connection), and whether the clock can be trusted."""

    def locked(self) -> AbstractContextManager[sqlite3.Connection]: ...

    def on_save(self, in_transaction: Callable[[sqlite3.Connection, Any], None],
                after_commit: Callable[[], None] | None = None) -> None: ...

    def locked_transaction(self) -> AbstractContextManager[sqlite3.Connection]: ...

    def clock_problem_locked(self, now: float) -> str | None: ...


class Outbox:
    """The queue of what each destination is owed, in the store's database (its connection and
    lock). Built with the destinations in use, it hooks into every save of the store."""

    def __init__(self, store: Database, destinations: tuple[str, ...] = (),
                 max_age_days: int = 30, max_messages: int = 100000) -> None:
        self._store = store
        self.destinations = tuple(destinations)
        with store.locked() as db:
            db.executescript(SCHEMA)
        if self.destinations:
            store.on_save(self._queue, self.notify)
        self.max_age_s = max_age_days * 86400.0
        self.max_messages = max_messages
        self._events: dict[str, threading.Event] = {}
        self.last_error: dict[str, str | None] = {}
        self._cached: tuple[int, list, list] | None = None
        self._changes = itertools.count(1)
        self._generation = 0

    def _queue(self, db: sqlite3.Connection, saved: Any) -> None:
        enqueue(db, self.destinations, saved.result_id, saved.sample_code, saved.has_snapshot,
                saved.created)

    # -- waking the senders ----------------------------------------------------------------------
    def event(self, destination: str) -> threading.Event:
        return self._events.setdefault(destination, threading.Event())

    def notify(self) -> None:
        """Something was queued: senders look now instead of at their next poll."""
        self.changed()
        for ev in self._events.values():
            ev.set()

    # -- the senders' calls ----------------------------------------------------------------------
    def due(self, destination: str, limit: int = 20, now: float | None = None) -> list[Message]:
        now = time.time() if now is None else now
        with self._store.locked() as db:
            rows = db.execute(
                "SELECT id, destination, kind, message_id, result_id, sample_code, created, "
                "attempts FROM outbox WHERE destination=? AND next_try<=? ORDER BY id LIMIT ?",
                (destination, now, limit),
            ).fetchall()
        return [Message(*tuple(r)) for r in rows]

    @staticmethod
    def _count(db: sqlite3.Connection, destination: str, what: str, n: int = 1) -> None:
        db.execute(
            "INSERT INTO outbox_counts (destination, what, n) VALUES (?,?,?) "
            "ON CONFLICT(destination, what) DO UPDATE SET n = n + excluded.n",
            (destination, what, n),
        )

    def _remove(self, msg: Message, what: str) -> None:
        with self._store.locked_transaction() as db:
            db.execute("DELETE FROM outbox WHERE id=?", (msg.id,))
            self._count(db, msg.destination, what)
        self.changed()

    def delivered(self, msg: Message) -> None:
        """The destination acknowledged it: gone from the queue, counted."""
        self._remove(msg, "delivered")
        self.last_error[msg.destination] = None

    def dropped(self, msg: Message, why: str) -> None:
        """It can never be delivered (its result was removed, the destination refuses it)."""
        self._remove(msg, "dropped")
        self.last_error[msg.destination] = why

    def retry(self, msg: Message, error: str, delay_s: float) -> None:
        with self._store.locked() as db:
            db.execute(
                "UPDATE outbox SET attempts = attempts + 1, next_try = ?, last_error = ? "
                "WHERE id = ?",
                (time.time() + delay_s, error[:500], msg.id),
            )
            self._count(db, msg.destination, "failed")
        self.changed()
        self.last_error[msg.destination] = error

    def reschedule(self, msg: Message, delay_s: float = 0.0) -> None:
        """Due again after ``delay_s`` (no try counted): a message held back on its own delay
        whose fault turned out to be its destination's takes its place in the queue again."""
        with self._store.locked() as db:
            db.execute("UPDATE outbox SET next_try = ? WHERE id = ?",
                       (time.time() + delay_s, msg.id))
        self.changed()

    def unreachable(self, destination: str, error: str) -> None:
        """A try to reach the destination failed (nothing was sent): counted as failed."""
        with self._store.locked() as db:
            self._count(db, destination, "failed")
        self.changed()
        self.last_error[destination] = error

    # -- bounds and status -----------------------------------------------------------------------
    def enforce_bounds(self, now: float | None = None) -> int:
        """Drop what is too old or too many (oldest first); returns how many. A kit whose
        clock cannot be trusted drops nothing by age (like retention)."""
        now = time.time() if now is None else now
        with self._store.locked_transaction() as db:
            clock_ok = self._store.clock_problem_locked(now) is None
            victims = []
            if clock_ok:
                victims += db.execute(
                    "SELECT id, destination FROM outbox WHERE created < ?",
                    (now - self.max_age_s,),
                ).fetchall()
            total = db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0] - len(victims)
            if total > self.max_messages:
                seen = {r[0] for r in victims}
                extra = db.execute(
                    "SELECT id, destination FROM outbox ORDER BY id LIMIT ?",
                    (total - self.max_messages + len(victims),),
                ).fetchall()
                victims += [r for r in extra if r[0] not in seen]
            for rid, dest in victims:
                db.execute("DELETE FROM outbox WHERE id=?", (rid,))
                self._count(db, dest, "dropped")
            dropped = len(victims)
        self.changed()
        return dropped

    def changed(self) -> None:
        """The queue or its counts changed (a store, a delivery, a drop): read them again."""
        self._generation = next(self._changes)  # atomic, unlike += between threads

    def _read_counts(self) -> tuple[list, list]:
        """The queue's counts, read again only after a change: every open Live page polls the
        status each second, and a long outage can leave 100,000 messages to count (8 ms under
        the store's lock, measured) that uploads would otherwise wait behind."""
        generation = self._generation
        if self._cached is not None and self._cached[0] == generation:
            return self._cached[1], self._cached[2]
        with self._store.locked() as db:
            queued = db.execute(
                "SELECT destination, COUNT(*), MIN(created) FROM outbox GROUP BY destination"
            ).fetchall()
            counts = db.execute("SELECT destination, what, n FROM outbox_counts").fetchall()
        self._cached = (generation, queued, counts)  # stale at once if a change came meanwhile
        return queued, counts

    def status(self, now: float | None = None) -> dict[str, dict[str, Any]]:
        """Per destination: queued, delivered, failed (tries), dropped, the oldest undelivered
        message's age and the last error."""
        now = time.time() if now is None else now
        queued, counts = self._read_counts()
        out: dict[str, dict[str, Any]] = {}

        def entry(dest: str) -> dict[str, Any]:
            return out.setdefault(dest, {"queued": 0, "delivered": 0, "failed": 0, "dropped": 0,
                                         "oldest_age_s": None,
                                         "last_error": self.last_error.get(dest)})

        for dest in self._events:
            entry(dest)
        for dest, n, oldest in queued:
            e = entry(dest)
            e["queued"], e["oldest_age_s"] = n, round(max(0.0, now - oldest), 1)
        for dest, what, n in counts:
            entry(dest)[what] = n
        return out
