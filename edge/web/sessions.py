"""Login sessions kept on the kit, so that they really end.

The browser's cookie (Flask's signed session) carries only a random session id; the kit keeps
what it means in its SQLite database (table ``web_sessions``, its own connection): the digest
of the id, the client's address and browser, when it began and when it was last seen, and a
tag of the password it was opened with. A session ends when it is logged out, ended from the
System page, idle or old past its limits, or opened with a password that is no longer the
kit's (a password change, by config reload or restart, ends every session). A cookie copied
before any of these is refused after it.

A card that turns read-only or fails under the kit (ext4 remounts read-only on errors) must not
lock everyone out of the page that says so: a session that cannot be written is kept in memory
until the daemon stops, and a logout that cannot be written is remembered there too.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS web_sessions (
    digest TEXT PRIMARY KEY,
    created REAL NOT NULL,
    last_seen REAL NOT NULL,
    client TEXT,
    agent TEXT,
    password_tag TEXT NOT NULL
);
"""
log = logging.getLogger(__name__)
TOUCH_EVERY_S = 60.0  # last_seen is written at most this often (an SD card wears)


def _digest(sid: str) -> str:
    return hashlib.sha256(sid.encode()).hexdigest()


def password_tag(password_hash: str) -> str:
    """A tag of the password a session was opened with (never the hash itself)."""
    return hashlib.sha256(("fieldscope-session:" + password_hash).encode()).hexdigest()[:16]


class Sessions:
    def __init__(self, db: Path, password_hash: str, idle_s: float, max_age_s: float) -> None:
        self.idle_s, self.max_age_s = idle_s, max_age_s
        self.tag = password_tag(password_hash)
        self._lock = threading.Lock()
        # Sessions the card would not take: digest -> [created, last_seen, client, agent].
        self._in_memory: dict[str, list[Any]] = {}
        self._ended: set[str] = set()  # logged out while the card refused the DELETE
        self.storage_error: str | None = None
        self._db = sqlite3.connect(str(db), check_same_thread=False, timeout=10,
                                   isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(SCHEMA)
        with self._lock:  # sessions of another password end now
            self._write("DELETE FROM web_sessions WHERE password_tag != ?", (self.tag,))

    def _write(self, sql: str, args: tuple) -> sqlite3.Cursor | None:
        """One write, under the lock; None when the card refuses it (logged once a change)."""
        try:
            cur = self._db.execute(sql, args)
        except sqlite3.Error as exc:
            why = f"{type(exc).__name__}: {exc}"
            if why != self.storage_error:
                log.warning("login sessions: the database refuses writes (%s); keeping them "
                            "in memory until FieldScope stops", why)
            self.storage_error = why
            return None
        self.storage_error = None
        return cur

    def _expired(self, created: float, last_seen: float, now: float) -> bool:
        return now - last_seen > self.idle_s or now - created > self.max_age_s

    def open(self, client: str, agent: str) -> str:
        """A new session; returns its id (for the cookie)."""
        sid = secrets.token_urlsafe(32)
        digest, now = _digest(sid), time.time()
        client, agent = client[:64], agent[:200]
        with self._lock:
            if self._write(
                "INSERT INTO web_sessions (digest, created, last_seen, client, agent, "
                "password_tag) VALUES (?,?,?,?,?,?)",
                (digest, now, now, client, agent, self.tag),
            ) is None:
                self._in_memory[digest] = [now, now, client, agent]
        return sid

    def valid(self, sid: str | None) -> bool:
        """Whether ``sid`` names a live session; refreshes its last-seen time now and then."""
        if not sid or not isinstance(sid, str):
            return False
        digest, now = _digest(sid), time.time()
        with self._lock:
            if digest in self._ended:
                return False
            kept = self._in_memory.get(digest)
            if kept is not None:
                if self._expired(kept[0], kept[1], now):
                    del self._in_memory[digest]
                    return False
                kept[1] = now
                return True
            row = self._db.execute(
                "SELECT created, last_seen, password_tag, client, agent FROM web_sessions "
                "WHERE digest=?", (digest,),
            ).fetchone()
            if row is None:
                return False
            created, last_seen, tag, client, agent = row
            if tag != self.tag or self._expired(created, last_seen, now):
                self._write("DELETE FROM web_sessions WHERE digest=?", (digest,))
                return False
            if now - last_seen > TOUCH_EVERY_S and self._write(
                    "UPDATE web_sessions SET last_seen=? WHERE digest=?", (now, digest)) is None:
                # Refused: its last-seen time goes on in memory, or a browser in use all
                # along would be logged out once the stale one passed the idle limit.
                self._in_memory[digest] = [created, now, client, agent]
        return True

    def end(self, sid: str | None) -> None:
        if sid and isinstance(sid, str):
            self.end_digest(_digest(sid))

    def end_digest(self, digest: str) -> bool:
        with self._lock:
            kept = self._in_memory.pop(digest, None) is not None
            known = self._db.execute(
                "SELECT 1 FROM web_sessions WHERE digest=?", (digest,)).fetchone() is not None
            if not known:
                return kept
            if self._write("DELETE FROM web_sessions WHERE digest=?", (digest,)) is None:
                self._ended.add(digest)  # refused from now on, although its row stays
        return True

    def active(self, current: str | None = None) -> list[dict[str, Any]]:
        """Live sessions, newest first: a short id, client, browser, since, last seen."""
        now = time.time()
        mine = _digest(current) if current else None
        with self._lock:
            if self._write(
                "DELETE FROM web_sessions WHERE password_tag != ? OR last_seen < ? OR "
                "created < ?", (self.tag, now - self.idle_s, now - self.max_age_s),
            ) is not None:  # the card takes writes again: the logouts it refused, now
                for d in list(self._ended):
                    if self._write("DELETE FROM web_sessions WHERE digest=?", (d,)) is not None:
                        self._ended.discard(d)
            rows = [r for r in self._db.execute(
                "SELECT digest, created, last_seen, client, agent, password_tag "
                "FROM web_sessions").fetchall()
                if r[5] == self.tag and not self._expired(r[1], r[2], now)
                and r[0] not in self._ended and r[0] not in self._in_memory]
            for d, kept in list(self._in_memory.items()):
                if self._expired(kept[0], kept[1], now):
                    del self._in_memory[d]
                else:
                    rows.append((d, *kept, self.tag))
        rows.sort(key=lambda r: r[1], reverse=True)
        return [{"id": d[:16], "digest": d, "since": c, "last_seen": s, "client": cl,
                 "agent": a, "this": d == mine} for d, c, s, cl, a, _ in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()
