"""Results in SQLite (WAL, synchronous=FULL) and JPEG snapshots written atomically.

A result gets its id only after its row is committed, and its snapshot is renamed into place
(and the folder synced) before the row that names it: so an id handed to a user survives a crash
or power cut, and no row ever points at a half-written file.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from .errors import FieldScopeError

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
"""


class StorageError(FieldScopeError):
    """Could not store (disk full, read-only, write limit); the result is not acknowledged."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Store:
    def __init__(self, data_dir: Path, retention_days: int = 90, min_free_mb: int = 500) -> None:
        self.root = Path(data_dir)
        self.snapshots = self.root / "snapshots"
        self.snapshots.mkdir(parents=True, exist_ok=True)
        self.retention_days = retention_days
        self.min_free_mb = min_free_mb
        self._lock = threading.Lock()
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self._db = sqlite3.connect(
            self.root / "fieldscope.db", check_same_thread=False, timeout=10, isolation_level=None
        )
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        for leftover in self.snapshots.rglob(".*.tmp"):  # a crash mid-write; never referenced
            leftover.unlink(missing_ok=True)

    # -- writing ---------------------------------------------------------------------------
    def _write_snapshot(self, jpeg: bytes) -> str:
        day = time.strftime("%Y/%m/%d")
        folder = self.snapshots / day
        folder.mkdir(parents=True, exist_ok=True)
        name = f"{uuid.uuid4().hex}.jpg"
        tmp = folder / f".{name}.tmp"
        with open(tmp, "wb") as fh:
            fh.write(jpeg)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(folder / name)
        _fsync_dir(folder)
        return f"{day}/{name}"

    def save(
        self,
        result: dict[str, Any],
        mode: str,
        sample_code: str | None = None,
        jpeg: bytes | None = None,
        source: str = "",
    ) -> int:
        """Store one result (and its snapshot); returns the durable id or raises StorageError."""
        decision = result.get("decision") or {}
        try:
            with self._lock:
                snapshot = self._write_snapshot(jpeg) if jpeg else None
                cur = self._db.execute(
                    "INSERT INTO results (created, mode, sample_code, label, score, assessable, "
                    "decision_outcome, decision_positive, group_score, probabilities, quality, "
                    "timings, backend, model, snapshot, source) "
                    "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (
                        time.time(),
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
                    ),
                )
                if sample_code:
                    self._db.execute(
                        "INSERT OR IGNORE INTO samples (code, created) VALUES (?,?)",
                        (sample_code, time.time()),
                    )
        except (sqlite3.Error, OSError) as exc:
            self.last_error = f"{type(exc).__name__}: {exc}"
            self.last_error_at = time.time()
            log.error("storage failed: %s", self.last_error)
            raise StorageError(
                f"could not store the result: {exc}",
                "free disk space; results resume storing by themselves",
            ) from exc
        if self.last_error:
            log.info("storage works again")
        self.last_error = None
        return int(cur.lastrowid)

    # -- reading ---------------------------------------------------------------------------
    @staticmethod
    def _row(row: sqlite3.Row) -> dict[str, Any]:
        out = dict(row)
        for key in ("probabilities", "quality", "timings"):
            out[key] = json.loads(out[key]) if out[key] else None
        out["assessable"] = bool(out["assessable"])
        if out["decision_positive"] is not None:
            out["decision_positive"] = bool(out["decision_positive"])
        return out

    def get(self, result_id: int) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM results WHERE id=?", (result_id,)).fetchone()
        return self._row(row) if row else None

    def list(
        self, limit: int = 50, before: int | None = None, sample_code: str | None = None
    ) -> list[dict[str, Any]]:
        sql, args = "SELECT * FROM results WHERE 1=1", []
        if before:
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

    def samples(self) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT s.code, s.created, COUNT(r.id) AS fields, "
                "SUM(COALESCE(r.decision_positive, 0)) AS flagged, AVG(r.group_score) AS mean, "
                "MAX(r.group_score) AS max FROM samples s LEFT JOIN results r "
                "ON r.sample_code = s.code GROUP BY s.code ORDER BY s.created DESC"
            ).fetchall()
        return [dict(r) for r in rows]

    def sample_summary(self, code: str) -> dict[str, Any] | None:
        fields = self.list(limit=500, sample_code=code)
        if not fields:
            return None
        scores = [f["group_score"] for f in fields if f["group_score"] is not None]
        return {
            "code": code,
            "fields": len(fields),
            "flagged": sum(1 for f in fields if f["decision_positive"]),
            "not_assessable": sum(1 for f in fields if not f["assessable"]),
            "mean_score": sum(scores) / len(scores) if scores else None,
            "max_score": max(scores) if scores else None,
            "results": fields,
        }

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM results").fetchone()[0])

    def snapshot_path(self, rel: str) -> Path | None:
        """Resolve a stored snapshot name; None for anything outside the snapshot folder."""
        from werkzeug.security import safe_join

        joined = safe_join(str(self.snapshots), rel)
        return Path(joined) if joined and Path(joined).is_file() else None

    # -- housekeeping ----------------------------------------------------------------------
    def free_mb(self) -> float:
        return shutil.disk_usage(self.root).free / 1e6

    def enforce_retention(self) -> int:
        """Delete results older than retention_days, then the oldest until min_free_mb is free."""
        removed = 0
        cutoff = time.time() - self.retention_days * 86400
        while True:
            with self._lock:
                if self.retention_days > 0:
                    rows = self._db.execute(
                        "SELECT id, snapshot FROM results WHERE created < ? ORDER BY id LIMIT 200",
                        (cutoff,),
                    ).fetchall()
                else:
                    rows = []
                if not rows and self.free_mb() < self.min_free_mb:
                    rows = self._db.execute(
                        "SELECT id, snapshot FROM results WHERE snapshot IS NOT NULL "
                        "ORDER BY id LIMIT 50"
                    ).fetchall()
                if not rows:
                    return removed
                for row in rows:
                    if row["snapshot"]:
                        path = self.snapshot_path(row["snapshot"])
                        if path:
                            path.unlink(missing_ok=True)
                self._db.executemany("DELETE FROM results WHERE id=?", [(r["id"],) for r in rows])
                removed += len(rows)

    def close(self) -> None:
        with self._lock:
            self._db.close()
