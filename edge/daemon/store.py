"""Results in SQLite (WAL, synchronous=FULL) and JPEG snapshots written atomically.

A store is a protocol of four steps: the snapshot is written to a hidden temp file and synced;
renamed to its final name (and the folder synced); the result row and its sample row are
inserted in one transaction; the transaction commits, and only then does the result get its id.
So an id handed to a user survives a crash or power cut, and no row ever points at a
half-written file. A crash between the rename and the commit (or a failed INSERT) leaves a
snapshot no row names: a failed INSERT removes it at once, and start-up removes what a crash
left (``reconcile``), so no patient image outlives its row or the retention period.

Retention only ever deletes results past their age (and their snapshots). It never deletes
results to make room: a disk filled by something else must not wipe the kit's records, so low
space is reported (health, System page) and a store that cannot write fails with
:class:`StorageError` while classification goes on.

The store knows nothing of where results go next: the outbox (``edge/daemon/outbox.py``)
registers with :meth:`Store.on_save` and queues its messages inside the save's transaction.
Snapshot files are :mod:`edge.daemon.snapshots`' job, done before the lock is taken.
"""

from __future__ import annotations

import builtins  # `list` is also a method of Store
import json
import logging
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import FieldScopeError
from .snapshots import Snapshots

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created REAL NOT NULL,
    mode TEXT NOT NULL,
    sample_code TEXT,
    label TEXT NOT NULL,
    score REAL NOT NULL,
    assessable INTEGER NOT NULL DEFAULT 1,
    decision_outcome TEXT,
    decision_positive INTEGER,
    group_score REAL,
    probabilities TEXT NOT NULL,
    quality TEXT,
    timings TEXT,
    backend TEXT,
    model TEXT,
    snapshot TEXT,
    source TEXT
);
CREATE INDEX IF NOT EXISTS results_sample ON results(sample_code);
CREATE INDEX IF NOT EXISTS results_created ON results(created);
CREATE TABLE IF NOT EXISTS samples (
    code TEXT PRIMARY KEY,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS settings (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""
# Columns added after the first release: (table, column, type). A kit's existing database gets
# them at start-up; older rows read NULL.
ADDED_COLUMNS = (
    ("results", "profile", "TEXT"),
    ("samples", "profile", "TEXT"),
    # The scope check's verdict {"in_scope", "score", "threshold"} and the activation maps.
    ("results", "scope", "TEXT"),
    ("results", "map", "TEXT"),
)


class StorageError(FieldScopeError):
    """Could not store (disk full, read-only, write limit); the result is not acknowledged."""


STEPS = ("snapshot-temp-written", "snapshot-renamed", "rows-inserted", "committed")
# A Pi has no real-time clock unless one is fitted: until NTP (rarely reachable in the field)
# or an RTC sets it, the clock starts where fake-hwclock saved it, or in 1970. Times before
# this (2026-01-01) cannot be right on a kit running this software.
EARLIEST_PLAUSIBLE = 1767225600.0
MAX_ID = 2**63 - 1  # SQLite's largest integer


@dataclass(frozen=True)
class Saved:
    """A result just stored, as a save hook sees it (inside the save's transaction)."""

    result_id: int
    sample_code: str | None
    has_snapshot: bool
    created: float


SaveHook = Callable[[sqlite3.Connection, Saved], None]
# The aggregates of a sample's fields, computed once, here, in SQL (the sample list and a
# sample's summary both read them). A field that failed the quality gate (blurred,
# over-exposed) says nothing about the sample: counted as not assessable, never as flagged or
# in the scores. Over ``results r``.
SAMPLE_AGGREGATES = (
    "COUNT(r.id) AS fields, "
    "COALESCE(SUM(CASE WHEN r.assessable THEN COALESCE(r.decision_positive, 0) ELSE 0 END), 0) "
    "AS flagged, "
    "COALESCE(SUM(CASE WHEN r.assessable THEN 0 ELSE 1 END), 0) AS not_assessable, "
    "COALESCE(SUM(CASE WHEN json_extract(r.scope, '$.in_scope') = 0 THEN 1 ELSE 0 END), 0) "
    "AS out_of_scope, "
    "AVG(CASE WHEN r.assessable THEN r.group_score END) AS mean_score, "
    "MAX(CASE WHEN r.assessable THEN r.group_score END) AS max_score"
)


class Store:
    def __init__(
        self,
        data_dir: Path,
        retention_days: int = 90,
        min_free_mb: int = 500,
        read_only: bool = False,
    ) -> None:
        """``read_only``: for a command that reads beside a running daemon (an export):
        nothing is created, migrated or reconciled (reconciling then could remove a snapshot
        whose row is being written)."""
        self.root = Path(data_dir)
        self.snapshots = self.root / "snapshots"
        if read_only and not (self.root / "fieldscope.db").is_file():
            raise StorageError(
                f"no kit database in {self.root}",
                "give the kit's data folder (--data-dir or --config)",
            )
        if not read_only:
            self.snapshots.mkdir(parents=True, exist_ok=True)
        self.retention_days = retention_days
        self.min_free_mb = min_free_mb
        self._lock = threading.Lock()
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        db = self.root / "fieldscope.db"
        self._db = sqlite3.connect(
            f"file:{db}?mode=ro" if read_only else db,
            uri=read_only,
            check_same_thread=False,
            timeout=10,
            isolation_level=None,
        )
        self._db.row_factory = sqlite3.Row
        self._db_path = db
        # The database file's identity (device, inode): SQLite goes on writing into a file
        # that was deleted or whose card was unmounted, and every result stored then would be
        # lost at the next start (see vanished()).
        self._identity: tuple[int, int] | None = None  # set once the file surely exists
        self._in_transaction: list[SaveHook] = []
        self._after_commit: list[Callable[[], None]] = []
        # Tests set this to stop the process between two steps of a store (see STEPS).
        self.step_hook: Callable[[str], None] | None = None
        self.files = Snapshots(self.snapshots, step=self._step)
        self._closed = read_only  # nothing is ever saved through a read-only store
        self._closing = read_only
        self._flight = threading.Condition()
        self._in_flight = 0
        self.reconciled = {"temp_files": 0, "orphan_snapshots": 0}
        if read_only:
            return
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        self._identity = self._file_identity()
        self._migrate()
        self.reconciled = self.reconcile()

    def _file_identity(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self._db_path)
        except OSError:
            return None
        return st.st_dev, st.st_ino

    def vanished(self) -> str | None:
        """Why the data folder is no longer the one the kit opened, or None: its database
        removed (the folder deleted, the card unmounted) or replaced by another file."""
        if self._identity is None:
            return None
        now = self._file_identity()
        if now == self._identity:
            return None
        what = "is gone" if now is None else "was replaced"
        return (f"the kit's database {self._db_path} {what} (data folder removed, or its card "
                "unmounted)")

    def _migrate(self) -> None:
        for table, column, kind in ADDED_COLUMNS:
            have = {r[1] for r in self._db.execute(f"PRAGMA table_info({table})")}
            if column not in have:
                self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")

    def on_save(self, in_transaction: SaveHook,
                after_commit: Callable[[], None] | None = None) -> None:
        """Have ``in_transaction(db, saved)`` run inside every save's transaction (what it
        writes commits or rolls back with the result) and ``after_commit()`` after it."""
        self._in_transaction.append(in_transaction)
        if after_commit is not None:
            self._after_commit.append(after_commit)

    @contextmanager
    def locked(self) -> Iterator[sqlite3.Connection]:
        """The connection, under the store's lock: how the outbox reads and writes beside the
        results (one connection, one lock)."""
        with self._lock:
            yield self._db

    @contextmanager
    def locked_transaction(self) -> Iterator[sqlite3.Connection]:
        """:meth:`transaction` under the store's lock."""
        with self._lock, self.transaction() as db:
            yield db

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE … COMMIT, rolled back on any error, so a failed write never leaves
        the connection inside a transaction that every later write would trip on. The caller
        holds the store's lock (the outbox's writes share it)."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise

    def _step(self, name: str) -> None:
        if self.step_hook is not None:
            self.step_hook(name)

    def reconcile(self) -> dict[str, int]:
        """Remove what an interrupted store left: temp files, and snapshots no row names.
        Returns the counts (logged when not zero)."""
        with self._lock:
            named = {
                r[0]
                for r in self._db.execute("SELECT snapshot FROM results WHERE snapshot IS NOT NULL")
            }
        return self.files.reconcile(named)

    # -- writing ---------------------------------------------------------------------------
    def save(
        self,
        result: dict[str, Any],
        mode: str,
        sample_code: str | None = None,
        jpeg: bytes | None = None,
        source: str = "",
        profile: str | None = None,
    ) -> int:
        """Store one result (and its snapshot); returns the durable id or raises StorageError.
        A new sample remembers the profile that made its first result. :meth:`close` waits
        for the saves in flight (their files are written before the lock is taken)."""
        with self._flight:
            self._in_flight += 1
        try:
            return self._save(result, mode, sample_code, jpeg, source, profile)
        finally:
            with self._flight:
                self._in_flight -= 1
                self._flight.notify_all()

    def _save(self, result: dict[str, Any], mode: str, sample_code: str | None,
              jpeg: bytes | None, source: str, profile: str | None) -> int:
        decision = result.get("decision") or {}
        snapshot = None
        try:
            if self._closing:  # shutting down: write nothing a closed database can't name
                raise sqlite3.ProgrammingError("the store is closed (the daemon is stopping)")
            gone = self.vanished()
            if gone:  # acknowledging into a deleted file would lose the result at restart
                raise FileNotFoundError(gone)
            # The file first, outside the lock that reads and health checks wait on (an SD
            # card's fsync can take hundreds of milliseconds); no row names it yet.
            snapshot = self.files.write(jpeg) if jpeg else None
            with self._lock:
                if self._closed:
                    raise sqlite3.ProgrammingError("the store is closed (the daemon is stopping)")
                now = time.time()
                # One transaction: the result and its sample exist together or not at all.
                with self.transaction():
                    cur = self._db.execute(
                        "INSERT INTO results (created, mode, sample_code, label, score, "
                        "assessable, decision_outcome, decision_positive, group_score, "
                        "probabilities, quality, timings, backend, model, snapshot, source, "
                        "profile, scope, map) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                        (
                            now,
                            mode,
                            sample_code,
                            result["label"],
                            float(result["score"]),
                            int(result.get("assessable", True)),
                            decision.get("outcome"),
                            None if not decision else int(bool(decision.get("positive"))),
                            decision.get("score"),
                            json.dumps(result.get("probabilities", {})),
                            json.dumps(result.get("quality")),
                            json.dumps(result.get("timings_ms")),
                            result.get("backend"),
                            result.get("model"),
                            snapshot,
                            source,
                            profile,
                            json.dumps(result["scope"]) if result.get("scope") else None,
                            json.dumps(result["map"]) if result.get("map") else None,
                        ),
                    )
                    if sample_code:
                        self._db.execute(
                            "INSERT OR IGNORE INTO samples (code, created, profile) VALUES (?,?,?)",
                            (sample_code, now, profile),
                        )
                    # What else must exist with it (the outbox's messages), in the same
                    # transaction.
                    result_id = cur.lastrowid
                    assert result_id is not None  # an INSERT always sets it
                    saved = Saved(result_id, sample_code, snapshot is not None, now)
                    for hook in self._in_transaction:
                        hook(self._db, saved)
                    self._step("rows-inserted")
                self._step("committed")
        except (sqlite3.Error, OSError) as exc:
            if snapshot:  # renamed but never referenced: do not leave a patient image behind
                self.files.remove(snapshot)
            self.last_error = f"{type(exc).__name__}: {exc}"
            self.last_error_at = time.time()
            log.error("storage failed: %s", self.last_error)
            raise StorageError(
                f"could not store the result: {exc}",
                "put the kit's card back and restart FieldScope" if self.vanished() else
                "free disk space; results resume storing by themselves",
            ) from exc
        if self.last_error:
            log.info("storage works again")
        self.last_error = None
        for notify in self._after_commit:
            notify()
        return result_id

    # -- reading ---------------------------------------------------------------------------
    @staticmethod
    def _row(row: sqlite3.Row) -> dict[str, Any]:
        out = dict(row)
        for key in ("probabilities", "quality", "timings", "scope", "map"):
            out[key] = json.loads(out[key]) if out.get(key) else None
        out["assessable"] = bool(out["assessable"])
        out["in_scope"] = out["scope"] is None or bool(out["scope"]["in_scope"])
        if out["decision_positive"] is not None:
            out["decision_positive"] = bool(out["decision_positive"])
        return out

    def get(self, result_id: int) -> dict[str, Any] | None:
        if not 0 <= result_id <= MAX_ID:  # SQLite cannot even compare a larger integer
            return None
        with self._lock:
            row = self._db.execute("SELECT * FROM results WHERE id=?", (result_id,)).fetchone()
        return self._row(row) if row else None

    def list(
        self, limit: int = 50, before: int | None = None, sample_code: str | None = None
    ) -> list[dict[str, Any]]:
        sql, args = "SELECT * FROM results WHERE 1=1", list[object]()
        if before is not None:  # 0 is a cursor too (nothing is older)
            before = max(-MAX_ID, min(before, MAX_ID))
            sql += " AND id < ?"
            args.append(before)
        if sample_code is not None:
            sql += " AND sample_code = ?"
            args.append(sample_code)
        sql += " ORDER BY id DESC LIMIT ?"
        args.append(max(1, min(limit, 500)))
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [self._row(r) for r in rows]

    def samples(self) -> builtins.list[dict[str, Any]]:
        """Every sample, newest first, with its aggregates (``mean``/``max``: its scores)."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT s.code, s.created, s.profile, {SAMPLE_AGGREGATES} "
                "FROM samples s LEFT JOIN results r "
                "ON r.sample_code = s.code GROUP BY s.code ORDER BY s.created DESC"
            ).fetchall()
        out = []
        for r in rows:
            doc = dict(r)
            doc["mean"], doc["max"] = doc.pop("mean_score"), doc.pop("max_score")
            out.append(doc)
        return out

    def fields_of(self, code: str) -> builtins.list[dict[str, Any]]:
        """Every field of a sample, newest first (a scanned smear can have thousands: every
        export holds them all)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM results WHERE sample_code = ? ORDER BY id DESC", (code,)
            ).fetchall()
        return [self._row(r) for r in rows]

    def sample_summary(self, code: str) -> dict[str, Any] | None:
        """A sample's aggregates (the same SQL as :meth:`samples`) and every field."""
        with self._lock:
            agg = self._db.execute(
                f"SELECT {SAMPLE_AGGREGATES} FROM results r WHERE r.sample_code = ?", (code,)
            ).fetchone()
        if not agg or not agg["fields"]:
            return None
        return {"code": code, "profile": self.sample_profile(code), **dict(agg),
                "results": self.fields_of(code)}

    def sample_created(self, code: str) -> float | None:
        with self._lock:
            row = self._db.execute("SELECT created FROM samples WHERE code=?", (code,)).fetchone()
        return row[0] if row else None

    def sample_profile(self, code: str) -> str | None:
        """The profile that made the sample's first result (None: unknown sample, or one stored
        before profiles existed)."""
        with self._lock:
            row = self._db.execute("SELECT profile FROM samples WHERE code=?", (code,)).fetchone()
        return row[0] if row else None

    def setting(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM settings WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def set_setting(self, key: str, value: str) -> None:
        """Kept across restarts (the profile chosen on the page, for example)."""
        with self._lock:
            self._db.execute(
                "INSERT INTO settings (key, value) VALUES (?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM results").fetchone()[0])

    def snapshot_path(self, rel: str) -> Path | None:
        """Resolve a stored snapshot name; None for anything outside the snapshot folder."""
        return self.files.path(rel)

    # -- housekeeping ----------------------------------------------------------------------
    def free_mb(self) -> float:
        return shutil.disk_usage(self.root).free / 1e6

    def clock_problem(self, now: float | None = None) -> str | None:
        """Why the system clock cannot be trusted, or None: before this software existed, or
        behind the newest stored result (it went back: a Pi without RTC after a power cut)."""
        now = time.time() if now is None else now
        with self._lock:
            return self.clock_problem_locked(now)

    def clock_problem_locked(self, now: float) -> str | None:
        """:meth:`clock_problem` for a caller that holds the store's lock."""
        if now < EARLIEST_PLAUSIBLE:
            return "the clock is not set (it reads a date before 2026)"
        newest = self._db.execute("SELECT MAX(created) FROM results").fetchone()[0]
        if newest is not None and now < newest - 3600:
            return "the clock is behind the newest stored result (it went back)"
        return None

    def enforce_retention(self, now: float | None = None) -> int:
        """Delete results older than ``retention_days`` (0 keeps everything), with their
        snapshots; returns how many. Runs at start-up and periodically (see the daemon).
        Paused while the clock cannot be trusted: ages measured with a wrong clock would
        delete the wrong results."""
        if self.retention_days <= 0:
            return 0
        now = time.time() if now is None else now
        problem = self.clock_problem(now)
        if problem:
            log.warning("retention paused: %s", problem)
            return 0
        removed = 0
        cutoff = now - self.retention_days * 86400
        while True:
            with self._lock:
                rows = self._db.execute(
                    "SELECT id, snapshot FROM results WHERE created < ? ORDER BY id LIMIT 200",
                    (cutoff,),
                ).fetchall()
                if not rows:
                    break
                # Rows first: a crash after the commit leaves only unreferenced files, which
                # start-up removes; the other order could leave rows naming missing files.
                with self.transaction() as db:
                    db.executemany("DELETE FROM results WHERE id=?", [(r["id"],) for r in rows])
                    db.execute(
                        "DELETE FROM samples WHERE code NOT IN "
                        "(SELECT sample_code FROM results WHERE sample_code IS NOT NULL)"
                    )
            for row in rows:
                if row["snapshot"]:
                    self.files.remove(row["snapshot"])
            removed += len(rows)
        if removed:
            log.info(
                "retention: removed %d results older than %d days", removed, self.retention_days
            )
        return removed

    def close(self, wait_s: float = 10.0) -> None:
        """Refuse new saves, let those in flight finish (a file written and no row yet would
        be left behind), then close the database."""
        with self._flight:
            self._closing = True
            if not self._flight.wait_for(lambda: self._in_flight == 0, timeout=wait_s):
                log.warning("closing with %d save(s) still in flight", self._in_flight)
        with self._lock:
            self._closed = True
            self._db.close()
