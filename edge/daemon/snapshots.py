"""Snapshot files: the JPEG of each stored result, written so that a crash never leaves half
of one under its final name.

A write is: a hidden temp file, written and fsynced; renamed to its final name; the folder
fsynced (a rename is durable only then), new day folders each synced in their parent. Only then
does the store insert the row that names it. The store does this outside the lock that reads
and health checks wait on: on an SD card one fsync can take hundreds of milliseconds.
``reconcile`` removes what an interrupted store left (temp files, files no row names).
"""

from __future__ import annotations

import logging
import os
import re
import time
import uuid
from collections.abc import Callable
from pathlib import Path, PurePosixPath

log = logging.getLogger(__name__)

# What this kit names its snapshots: day folders and a random hex name. Reconciliation and
# lookups touch nothing else in the folder.
SNAPSHOT_NAME = re.compile(r"^\d{4}/\d{2}/\d{2}/[0-9a-f]{32}\.jpg$")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Snapshots:
    """The snapshot folder. ``step`` is called after each durable step (tests stop the process
    there to prove what a crash leaves)."""

    def __init__(self, folder: Path, step: Callable[[str], None] | None = None) -> None:
        self.folder = Path(folder)
        self._step = step or (lambda name: None)

    def _day_folder(self, day: str) -> Path:
        """The day's folder, each newly made level synced in its parent (a new directory entry
        is only durable once its parent is synced)."""
        folder = self.folder / day
        if not folder.is_dir():
            if not self.folder.is_dir():  # never made again here: the card may be gone
                raise FileNotFoundError(f"the snapshot folder {self.folder} is gone")
            missing = []
            p = folder
            while not p.is_dir():
                missing.append(p)
                p = p.parent
            for level in reversed(missing):
                level.mkdir(exist_ok=True)
                fsync_dir(level.parent)
        return folder

    def write(self, jpeg: bytes) -> str:
        """Write one snapshot durably; returns its name (``YYYY/MM/DD/<hex>.jpg``)."""
        day = time.strftime("%Y/%m/%d")
        folder = self._day_folder(day)
        name = f"{uuid.uuid4().hex}.jpg"
        tmp = folder / f".{name}.tmp"
        try:
            with open(tmp, "wb") as fh:
                fh.write(jpeg)
                fh.flush()
                os.fsync(fh.fileno())
            self._step("snapshot-temp-written")
            tmp.replace(folder / name)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(folder)
        self._step("snapshot-renamed")
        return f"{day}/{name}"

    def path(self, name: str) -> Path | None:
        """The file of a snapshot name; None for any name this kit does not make (so nothing
        outside the folder, ``..`` or absolute, can be reached) or a file that is gone."""
        if not SNAPSHOT_NAME.match(name) or PurePosixPath(name).is_absolute():
            return None
        path = self.folder / name
        return path if path.is_file() else None

    def remove(self, name: str) -> None:
        path = self.path(name)
        if path is not None:
            path.unlink(missing_ok=True)

    def reconcile(self, named: set[str]) -> dict[str, int]:
        """Remove temp files and the snapshots no row names (``named``); returns the counts."""
        temps = 0
        for leftover in self.folder.rglob(".*.tmp"):
            leftover.unlink(missing_ok=True)
            temps += 1
        orphans = 0
        for path in self.folder.rglob("*.jpg"):
            rel = path.relative_to(self.folder).as_posix()
            if SNAPSHOT_NAME.match(rel) and rel not in named:
                path.unlink(missing_ok=True)
                orphans += 1
        if temps or orphans:
            log.warning(
                "start-up: removed %d unfinished and %d unreferenced snapshot files "
                "(a store was interrupted)", temps, orphans)
        return {"temp_files": temps, "orphan_snapshots": orphans}
