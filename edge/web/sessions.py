"""Login sessions kept on the kit, so that they really end.

The browser's cookie (Flask's signed session) carries only a random session id; the kit keeps
what it means in its SQLite database (table ``web_sessions``, its own connection): the digest
of the id, the client's address and browser, when it began and when it was last seen, and a
tag of the password it was opened with. A session ends when it is logged out, ended from the
System page, idle or old past its limits, or opened with a password that is no longer the
kit's (a password change, by config reload or restart, ends every session). A cookie copied
before any of these is refused after it.
"""

from __future__ import annotations

import hashlib
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
        self._db = sqlite3.connect(str(db), check_same_thread=False, timeout=10,
                                   isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(SCHEMA)
        with self._lock:  # sessions of another password end now
            self._db.execute("DELETE FROM web_sessions WHERE password_tag != ?", (self.tag,))

    def open(self, client: str, agent: str) -> str:
        """A new session; returns its id (for the cookie)."""
        sid = secrets.token_urlsafe(32)
        now = time.time()
        with self._lock:
            self._db.execute(
                "INSERT INTO web_sessions (digest, created, last_seen, client, agent, "
                "password_tag) VALUES (?,?,?,?,?,?)",
                (_digest(sid), now, now, client[:64], agent[:200], self.tag),
            )
        return sid

    def valid(self, sid: str | None) -> bool:
        """Whether ``sid`` names a live session; refreshes its last-seen time now and then."""
        if not sid or not isinstance(sid, str):
            return False
        digest, now = _digest(sid), time.time()
        with self._lock:
            row = self._db.execute(
                "SELECT created, last_seen, password_tag FROM web_sessions WHERE digest=?",
                (digest,),
            ).fetchone()
            if row is None:
                return False
            created, last_seen, tag = row
            if (tag != self.tag or now - last_seen > self.idle_s
                    or now - created > self.max_age_s):
                self._db.execute("DELETE FROM web_sessions WHERE digest=?", (digest,))
                return False
            if now - last_seen > TOUCH_EVERY_S:
                self._db.execute("UPDATE web_sessions SET last_seen=? WHERE digest=?",
                                 (now, digest))
        return True

    def end(self, sid: str | None) -> None:
        if sid and isinstance(sid, str):
            self.end_digest(_digest(sid))

    def end_digest(self, digest: str) -> bool:
        with self._lock:
            cur = self._db.execute("DELETE FROM web_sessions WHERE digest=?", (digest,))
        return cur.rowcount > 0

    def active(self, current: str | None = None) -> list[dict[str, Any]]:
        """Live sessions, newest first: a short id, client, browser, since, last seen."""
        now = time.time()
        mine = _digest(current) if current else None
        with self._lock:
            self._db.execute(
                "DELETE FROM web_sessions WHERE password_tag != ? OR last_seen < ? OR "
                "created < ?", (self.tag, now - self.idle_s, now - self.max_age_s))
            rows = self._db.execute(
                "SELECT digest, created, last_seen, client, agent FROM web_sessions "
                "ORDER BY created DESC").fetchall()
        return [{"id": d[:16], "digest": d, "since": c, "last_seen": s, "client": cl,
                 "agent": a, "this": d == mine} for d, c, s, cl, a in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()
