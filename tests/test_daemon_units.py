"""Daemon parts on their own: config, quality gate, smoothing, notify, store."""

from __future__ import annotations

import os
import socket
import sqlite3
import threading
import time

import numpy as np
import pytest
from PIL import Image, ImageFilter

from edge.config import ConfigError, load_config, parse_source
from edge.daemon import notify
from edge.daemon.smoothing import Smoother
from edge.daemon.store import StorageError, Store
from edge.inference.quality import assess


def test_config_file_and_overrides(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[source]\nkind = "replay"\npath = "x"\nfps = 5\n[web]\nport = 9000\n')
    cfg = load_config(p, {"web.port": 9001, "model.threads": None})
    assert cfg.source.fps == 5.0 and cfg.web.port == 9001 and cfg.model.threads == 2


@pytest.mark.parametrize(
    "text,needle",
    [
        ('[web]\nport = "x"\n', "[web].port: expected int"),
        ("[web]\nprot = 1\n", "[web]: unknown option(s) prot"),
        ("[camera]\nx = 1\n", "unknown section(s) camera"),
        ('[model]\nbackend = "gpu"\n', "[model].backend: 'gpu'"),
        ('[source]\nkind = "replay"\n', "replay needs a folder"),
        (
            '[web]\nhost = "0.0.0.0"\n[source]\npath = "x"\n',
            "serving to the network needs a password",
        ),
        ("[web\n", "not valid TOML"),
        # A destination's file options are checked whether it is on or off.
        ('[source]\npath = "x"\n[mqtt]\nca_file = "no-ca.pem"\n', "[mqtt].ca_file: no file"),
        ('[source]\npath = "x"\n[dicom]\nstow_url = "http://pacs/dicom-web"\n'
         'ca_file = "no-ca.pem"\n', "[dicom].ca_file: no file"),
    ],
)
def test_config_errors_name_the_option(tmp_path, text, needle, monkeypatch):
    monkeypatch.delenv("FIELDSCOPE_PASSWORD", raising=False)
    p = tmp_path / "c.toml"
    p.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(p)
    assert needle in str(info.value)


def test_network_bind_with_password_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("FIELDSCOPE_PASSWORD", "s3cret")
    cfg = load_config(None, {"web.host": "0.0.0.0", "source.path": "x"})
    assert cfg.network_bound and cfg.web.password == "s3cret"


def test_parse_source():
    assert parse_source("v4l2:/dev/video2") == ("v4l2", "/dev/video2")
    assert parse_source("picamera2") == ("picamera2", "")
    with pytest.raises(ConfigError):
        parse_source("webcam")


def test_quality_gate_blur_and_exposure(parrot):
    rgb = np.asarray(Image.open(parrot).convert("RGB"))
    sharp = assess(rgb, 8.0, 0.6)
    blurred = np.asarray(Image.open(parrot).convert("RGB").filter(ImageFilter.GaussianBlur(8)))
    blur = assess(blurred, 8.0, 0.6)
    assert sharp.assessable and sharp.focus > 5 * blur.focus
    assert not assess(blurred, sharp.focus / 2, 0.6).assessable
    white = np.full((100, 100, 3), 255, np.uint8)
    q = assess(white, 8.0, 0.6)
    assert not q.assessable and "clipped" in q.reason


def test_quality_scores_agree_with_and_without_opencv(parrot, monkeypatch):
    """OpenCV is optional on the device: both paths must give the calibrated focus scale."""
    import edge.inference.quality as quality

    rgb = np.asarray(Image.open(parrot).convert("RGB").resize((224, 224)))
    grey = quality._grey_small(rgb)
    g = grey.astype(np.float64)
    lap = g[1:-1, :-2] + g[1:-1, 2:] + g[:-2, 1:-1] + g[2:, 1:-1] - 4 * g[1:-1, 1:-1]
    want_focus = lap.var()
    want_clipped = ((g <= 2) | (g >= 253)).mean()
    with_cv2 = quality.assess(rgb, 0.0, 1.0)
    monkeypatch.setattr(quality, "opencv", lambda: None)
    without = quality.assess(rgb, 0.0, 1.0)
    for q in (with_cv2, without):
        assert q.focus == pytest.approx(want_focus, rel=1e-4)
        assert q.clipped == pytest.approx(want_clipped)
    assert want_focus > 10


def test_smoother_holds_state_until_it_persists():
    s = Smoother(["a", "b"], window=1, hold=3)
    assert s.update({"a": 0.9, "b": 0.1})[0] == "a"
    assert s.update({"a": 0.1, "b": 0.9})[0] == "a"
    assert s.update({"a": 0.1, "b": 0.9})[0] == "a"
    assert s.update({"a": 0.1, "b": 0.9})[0] == "b"
    s2 = Smoother(["a", "b"], window=4, hold=1)
    s2.update({"a": 1.0, "b": 0.0})
    shown = s2.update({"a": 0.0, "b": 1.0})
    assert np.allclose(shown.mean, [0.5, 0.5])
    s3 = Smoother(["a", "b"], window=2, hold=1)
    for p in (1.0, 0.5, 0.0):  # the first frame leaves the window
        shown = s3.update({"a": p, "b": 1 - p})
    assert np.allclose(shown.mean, [0.25, 0.75]) and shown.label == "b"


def test_shown_label_and_decision_change_together_after_the_hold():
    """The decision shown is held like the label, and both come from the same frame: never
    the held label next to a decision computed from a newer mean."""

    def decide(mean):
        score = float(mean[1])
        return {"positive": score >= 0.3, "score": score, "text": f"b {score:.2f}"}

    s = Smoother(["a", "b"], window=1, hold=3)
    first = s.update({"a": 0.9, "b": 0.1}, decide)
    assert (first.label, first.decision["positive"]) == ("a", False)
    # b rises past the decision threshold but not past a: the pair (a, refer) is new...
    for _ in range(2):
        shown = s.update({"a": 0.6, "b": 0.4}, decide)
        assert (shown.label, shown.decision["positive"]) == ("a", False)
        assert shown.decision["score"] == pytest.approx(0.1)  # the held frame's own score
    # ...and is shown on its third frame, label and decision from that same frame.
    shown = s.update({"a": 0.6, "b": 0.4}, decide)
    assert (shown.label, shown.decision["positive"]) == ("a", True)
    assert shown.decision["score"] == pytest.approx(0.4) and shown.age == 0
    # A single frame that disagrees changes nothing.
    shown = s.update({"a": 0.95, "b": 0.05}, decide)
    assert (shown.label, shown.decision["positive"]) == ("a", True) and shown.age == 1
    assert np.allclose(shown.mean, [0.95, 0.05])  # the bars stay live


def test_notify_sends_datagrams_to_the_socket(tmp_path, monkeypatch):
    path = str(tmp_path / "notify.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(path)
    server.settimeout(2)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    assert notify.notify("READY=1")
    assert server.recv(100) == b"READY=1"
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert notify.watchdog_interval() == 2.0
    monkeypatch.setenv("WATCHDOG_PID", "1")
    assert notify.watchdog_interval() is None
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert notify.notify("READY=1") is False
    server.close()


RESULT = {
    "label": "a",
    "score": 0.9,
    "probabilities": {"a": 0.9, "b": 0.1},
    "decision": {"outcome": "refer", "positive": True, "score": 0.9},
    "timings_ms": {"invoke": 1.0},
    "backend": "cpu",
    "model": "m 1",
}


def test_store_roundtrip_and_sample_summary(tmp_path):
    store = Store(tmp_path)
    i1 = store.save(RESULT, "capture", "S-1", jpeg=b"\xff\xd8jpeg")
    i2 = store.save(
        {**RESULT, "decision": {"outcome": "ok", "positive": False, "score": 0.2}}, "capture", "S-1"
    )
    row = store.get(i1)
    assert row["sample_code"] == "S-1" and row["probabilities"]["a"] == 0.9
    assert store.snapshot_path(row["snapshot"]).read_bytes() == b"\xff\xd8jpeg"
    s = store.sample_summary("S-1")
    assert s["fields"] == 2 and s["flagged"] == 1
    assert s["max_score"] == 0.9 and abs(s["mean_score"] - 0.55) < 1e-9
    assert [r["id"] for r in store.list(sample_code="S-1")] == [i2, i1]
    assert store.snapshot_path("../fieldscope.db") is None
    assert store.snapshot_path("/etc/passwd") is None
    db = sqlite3.connect(tmp_path / "fieldscope.db")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    store.close()


def test_store_reports_failure_and_recovers(tmp_path):
    store = Store(tmp_path)
    snaps = store.snapshots
    snaps.chmod(0o500)
    try:
        if os.access(snaps, os.W_OK):  # root ignores permissions: use a file in the way
            snaps.chmod(0o700)
            import shutil

            shutil.rmtree(snaps)
            snaps.write_text("not a folder")
        with pytest.raises(StorageError):
            store.save(RESULT, "capture", "S", jpeg=b"x")
        assert store.last_error
    finally:
        if snaps.is_file():
            snaps.unlink()
            snaps.mkdir()
        snaps.chmod(0o700)
    assert store.save(RESULT, "capture", "S", jpeg=b"x") > 0
    assert store.last_error is None
    store.close()


def test_store_is_safe_across_threads(tmp_path):
    store = Store(tmp_path)
    errors = []

    def writer():
        try:
            for _ in range(20):
                store.save(RESULT, "upload")
        except Exception as exc:  # pragma: no cover - the assertion reports it
            errors.append(exc)

    threads = [threading.Thread(target=writer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and store.count() == 80
    store.close()


def test_retention_by_age(tmp_path):
    store = Store(tmp_path, retention_days=1, min_free_mb=0)
    old = store.save(RESULT, "capture", "S", jpeg=b"x")
    snap = store.snapshot_path(store.get(old)["snapshot"])
    store._db.execute("UPDATE results SET created = created - 3 * 86400 WHERE id = ?", (old,))
    new = store.save(RESULT, "capture", "S")
    assert store.enforce_retention() == 1
    assert store.get(old) is None and store.get(new) is not None and not snap.exists()
    store.close()


def test_retention_pauses_while_the_clock_cannot_be_trusted(tmp_path):
    """A Pi without RTC may boot in 1970 or behind its newest result: ages measured then are
    wrong, so nothing is deleted until the clock is right."""
    import time as _time

    store = Store(tmp_path, retention_days=1, min_free_mb=0)
    old = store.save(RESULT, "capture", "S")
    store._db.execute("UPDATE results SET created = created - 3 * 86400 WHERE id = ?", (old,))
    assert store.clock_problem(now=86400.0) and store.enforce_retention(now=86400.0) == 0
    newest = store.save(RESULT, "capture", "S")
    back = _time.time() - 2 * 86400  # the clock went back two days
    assert "behind" in store.clock_problem(now=back)
    assert store.enforce_retention(now=back) == 0 and store.get(old) is not None
    assert store.clock_problem() is None and store.enforce_retention() == 1
    assert store.get(old) is None and store.get(newest) is not None
    store.close()


def test_fields_that_failed_the_quality_gate_are_not_flagged_or_scored(tmp_path):
    store = Store(tmp_path)
    flagged = {**RESULT, "decision": {"outcome": "refer", "positive": True, "score": 0.9}}
    clean = {**RESULT, "decision": {"outcome": "ok", "positive": False, "score": 0.1}}
    blurred = {**flagged, "assessable": False, "decision": {**flagged["decision"], "score": 0.99}}
    for r in (flagged, clean, blurred):
        store.save(r, "capture", "S-9")
    s = store.sample_summary("S-9")
    assert (s["fields"], s["flagged"], s["not_assessable"]) == (3, 1, 1)
    assert s["mean_score"] == pytest.approx(0.5) and s["max_score"] == pytest.approx(0.9)
    (row,) = store.samples()
    assert (row["fields"], row["flagged"]) == (3, 1)
    assert row["mean"] == pytest.approx(0.5) and row["max"] == pytest.approx(0.9)
    store.close()


def test_a_sample_counts_its_out_of_scope_fields_in_the_list_and_the_summary(tmp_path):
    store = Store(tmp_path)
    away = {**RESULT, "assessable": False, "scope": {"in_scope": False, "score": 9.0,
                                                     "threshold": 3.0}}
    inside = {**RESULT, "scope": {"in_scope": True, "score": 1.0, "threshold": 3.0}}
    for r in (away, inside, RESULT):
        store.save(r, "capture", "S-10")
    s = store.sample_summary("S-10")
    (row,) = store.samples()
    assert (s["fields"], s["not_assessable"], s["out_of_scope"]) == (3, 1, 1)
    assert (row["fields"], row["not_assessable"], row["out_of_scope"]) == (3, 1, 1)
    assert store.sample_summary("NO-SUCH") is None
    store.close()


def _hold_snapshot_writes(store: Store) -> tuple[threading.Event, threading.Event]:
    """Make the store's snapshot writes wait (a slow SD card's fsync): ``writing`` is set when
    one starts, and it goes on once ``release`` is set."""
    writing, release = threading.Event(), threading.Event()
    real_write = store.files.write

    def slow_write(jpeg):
        writing.set()
        assert release.wait(10)
        return real_write(jpeg)

    store.files.write = slow_write
    return writing, release


def test_reads_do_not_wait_for_a_slow_snapshot_write(tmp_path):
    """An SD card's fsync can take hundreds of milliseconds: the file is written before the
    store's lock is taken, so health, status and pages (reads) go on meanwhile."""
    store = Store(tmp_path)
    store.save(RESULT, "capture", "S-1")
    writing, release = _hold_snapshot_writes(store)
    saver = threading.Thread(target=store.save, args=(RESULT, "capture", "S-1"),
                             kwargs={"jpeg": b"\xff\xd8jpeg"})
    saver.start()
    try:
        assert writing.wait(10)
        t0 = time.monotonic()
        assert store.count() == 1 and store.sample_summary("S-1")["fields"] == 1
        assert store.clock_problem() is None
        took = time.monotonic() - t0
    finally:
        release.set()
        saver.join(10)
    assert took < 1.0, f"a read waited {took:.1f} s for the snapshot's write"
    assert store.count() == 2
    store.close()


def test_close_lets_a_save_in_flight_finish_and_leaves_no_file_behind(tmp_path):
    store = Store(tmp_path)
    writing, release = _hold_snapshot_writes(store)
    ids: list[int] = []
    saver = threading.Thread(target=lambda: ids.append(
        store.save(RESULT, "capture", "S-1", jpeg=b"\xff\xd8jpeg")))
    saver.start()
    assert writing.wait(10)
    closer = threading.Thread(target=store.close)
    closer.start()
    time.sleep(0.1)
    assert closer.is_alive()  # waiting for the save in flight
    release.set()
    saver.join(10)
    closer.join(10)
    assert len(ids) == 1 and not closer.is_alive()
    db = sqlite3.connect(tmp_path / "fieldscope.db")
    (name,) = db.execute("SELECT snapshot FROM results").fetchone()
    files = [p.relative_to(tmp_path / "snapshots").as_posix()
             for p in (tmp_path / "snapshots").rglob("*") if p.is_file()]
    assert files == [name]
    with pytest.raises(StorageError, match="closed"):
        store.save(RESULT, "capture", "S-1")


def test_storage_status_of_a_vanished_data_folder_is_low_space_not_an_error(tmp_path):
    """An unmounted card: the status reads the disk once and says low space, never raises
    (it feeds /api/health, the System page and /metrics)."""
    import shutil

    from edge.daemon.results import ResultsService
    from edge.daemon.store import Store

    store = Store(tmp_path / "data", min_free_mb=1)
    results = ResultsService(store, use=None)
    assert results.storage_status()["low_space"] is False
    shutil.rmtree(tmp_path / "data")
    status = results.storage_status()
    assert status["low_space"] is True and status["free_mb"] is None
    store.close()


def test_a_result_is_never_acknowledged_into_a_vanished_data_folder(tmp_path):
    """The data folder removed (or its card unmounted) under a running kit: SQLite would go on
    writing into the deleted file and every id handed out would be lost at the next start.
    Saves fail with a clear error instead, health says why, and nothing is made again where
    the folder was."""
    import shutil

    from edge.daemon.results import ResultsService
    from edge.daemon.store import StorageError, Store

    data = tmp_path / "data"
    store = Store(data, min_free_mb=1)
    results = ResultsService(store, use=None)
    store.save(RESULT, "capture", "S-1", jpeg=b"\xff\xd8 a jpeg")
    shutil.rmtree(data)
    with pytest.raises(StorageError, match="is gone") as err:
        store.save(RESULT, "capture", "S-1", jpeg=b"\xff\xd8 a jpeg")
    assert "card back" in err.value.hint
    status = results.storage_status()
    assert status["ok"] is False and "fieldscope.db is gone" in status["error"]
    assert not data.exists()  # no snapshot folders made again in its place
    store.close()


def test_a_failed_retention_leaves_no_transaction_open(tmp_path):
    """A retention delete that fails (here: a trigger refusing it) is rolled back, so the
    next store still works instead of tripping on a transaction left open."""
    import sqlite3
    import time

    import pytest

    from edge.daemon.store import Store

    store = Store(tmp_path, retention_days=1)
    store.save({"label": "Benign", "score": 0.9}, "live")
    with store._lock:
        store._db.execute("CREATE TRIGGER refuse BEFORE DELETE ON results "
                          "BEGIN SELECT RAISE(ABORT, 'refused'); END")
    with pytest.raises(sqlite3.IntegrityError):
        store.enforce_retention(now=time.time() + 3 * 86400)
    with store._lock:
        assert not store._db.in_transaction
        store._db.execute("DROP TRIGGER refuse")
    assert store.save({"label": "Benign", "score": 0.9}, "live") == 2
    store.close()


def test_a_sample_holds_every_field_past_500(tmp_path):
    """A scanned smear with 620 fields: the summary (behind the page, CSV, report, FHIR,
    DICOM and MQTT summary) counts and holds all of them."""
    store = Store(tmp_path)
    doc = {"label": "Benign", "score": 0.9, "probabilities": {"Benign": 0.9, "Pro": 0.1},
           "decision": {"outcome": "no ALL pattern", "positive": False, "score": 0.1}}
    for i in range(620):
        flagged = i % 100 == 0
        d = {**doc, "decision": {**doc["decision"], "positive": flagged}}
        store.save(d, "capture", sample_code="SCAN-1")
    s = store.sample_summary("SCAN-1")
    assert s["fields"] == 620 and len(s["results"]) == 620
    assert s["flagged"] == 7
    listed = {r["code"]: r for r in store.samples()}["SCAN-1"]
    assert listed["fields"] == s["fields"] and listed["flagged"] == s["flagged"]
    store.close()


def test_two_kits_on_the_default_host_name_get_different_ids(tmp_path):
    from edge.config import default_kit_id
    from edge.doctor import check_kit_name

    a, b = tmp_path / "a", tmp_path / "b"
    a.write_text("0123456789abcdef0123456789abcdef\n")
    b.write_text("fedcba9876543210fedcba9876543210\n")
    ida, idb = default_kit_id("raspberrypi", a), default_kit_id("raspberrypi", b)
    assert ida != idb and ida.startswith("raspberrypi-")
    assert default_kit_id("lab-kit-3", a) == "lab-kit-3"  # a chosen name is kept
    assert default_kit_id("raspberrypi", tmp_path / "none") == "raspberrypi"
    assert check_kit_name("raspberrypi").status == "warn"
    assert check_kit_name("lab-kit-3").status == "ok"
