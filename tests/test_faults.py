"""Faults against the real daemon process: power cut, full disk, a refused model, SIGTERM."""

from __future__ import annotations

import http.client
import io
import resource
import shutil
import signal
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from tests.daemon_helpers import Client, stop_limit_s
from tests.test_serve_e2e import start_daemon, wait_http


def hammer(
    client: Client, images: list[bytes], acked: list[int], stop: threading.Event, errors: list
) -> None:
    i = 0
    deadline = time.monotonic() + 240  # never past the test's own limit, whatever happens
    while not stop.is_set() and time.monotonic() < deadline:
        try:
            status, doc = client.upload(images[i % len(images)], sample_code="LOAD-1")
        # The daemon died or stopped mid-request (a refused connection, a cut answer): not
        # acknowledged.
        except (OSError, http.client.HTTPException) as exc:
            errors.append(exc)
            return
        if status == 201:
            acked.append(doc["id"])
        i += 1


def check_store(data_dir: Path, acked: list[int]) -> None:
    """No acknowledged result lost, every row's snapshot whole, and every snapshot file named
    by a row (nothing left behind), with no temp files."""
    db = sqlite3.connect(data_dir / "fieldscope.db")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    ids = {row[0] for row in db.execute("SELECT id FROM results")}
    missing = sorted(set(acked) - ids)
    assert not missing, f"acknowledged results lost: {missing[:10]}"
    named = set()
    for (snap,) in db.execute("SELECT snapshot FROM results WHERE snapshot IS NOT NULL"):
        path = data_dir / "snapshots" / snap
        assert path.is_file(), f"row references a missing snapshot {snap}"
        with Image.open(path) as img:
            img.load()  # a half-written JPEG would fail here
        named.add(snap)
    on_disk = {
        p.relative_to(data_dir / "snapshots").as_posix()
        for p in (data_dir / "snapshots").rglob("*")
        if p.is_file()
    }
    assert on_disk == named, f"files no row names: {sorted(on_disk - named)[:5]}"
    db.close()


def test_kill_9_under_load_loses_no_acknowledged_result(tmp_path, blood_bundle, blood_samples):
    proc, base = start_daemon(tmp_path, blood_bundle, blood_samples)
    data_dir = tmp_path / "data"
    try:
        wait_http(base + "/api/health")
        images = [p.read_bytes() for p in blood_samples[:4]]
        acked: list[int] = []
        errors: list = []
        stop = threading.Event()
        workers = [
            threading.Thread(target=hammer, args=(Client(base), images, acked, stop, errors))
            for _ in range(3)
        ]
        for w in workers:
            w.start()
        deadline = time.monotonic() + 30
        while len(acked) < 15 and time.monotonic() < deadline:
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)  # the power cut
        proc.wait(timeout=10)
        stop.set()
        for w in workers:
            w.join(timeout=30)
        assert len(acked) >= 15
    finally:
        if proc.poll() is None:
            proc.kill()
    # and the daemon starts again on the same data, removing what the cut interrupted
    proc2, base2 = start_daemon(
        tmp_path / "again", blood_bundle, blood_samples, args=("--data-dir", str(data_dir))
    )
    try:
        wait_http(base2 + "/api/health")
        status, doc = Client(base2).get_json(f"/api/results/{acked[-1]}")
        assert status == 200 and doc["sample_code"] == "LOAD-1"
    finally:
        proc2.send_signal(signal.SIGTERM)
        proc2.wait(timeout=10)
    check_store(data_dir, acked)


def test_full_disk_keeps_classifying_reports_and_recovers(tmp_path, blood_bundle, blood_samples):
    proc, base = start_daemon(tmp_path, blood_bundle, blood_samples)
    try:
        wait_http(base + "/api/health")
        client = Client(base)
        image = blood_samples[0].read_bytes()
        assert client.upload(image)[0] == 201
        # a real write limit on the daemon: every file write past 4 KiB now fails (EFBIG)
        resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
        status, doc = client.upload(image)
        assert status == 507 and "not stored" in doc["error"]
        _, health = client.get_json("/api/health")
        assert health["storage"]["ok"] is False and health["status"] == "degraded"
        _, st = client.get_json("/api/status")
        n = st["frames_classified"]
        time.sleep(1.5)
        _, st = client.get_json("/api/status")
        assert st["frames_classified"] > n, "classification stopped with the disk full"
        # space returns
        resource.prlimit(
            proc.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY)
        )
        status, doc = client.upload(image)
        assert status == 201 and doc["id"] > 0
        _, health = client.get_json("/api/health")
        assert health["storage"]["ok"] is True
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)


def test_sigterm_under_load_stops_fast_and_loses_nothing(tmp_path, blood_bundle, blood_samples):
    proc, base = start_daemon(tmp_path, blood_bundle, blood_samples)
    acked: list[int] = []
    try:
        wait_http(base + "/api/health")
        images = [p.read_bytes() for p in blood_samples[:4]]
        stop = threading.Event()
        errors: list = []
        workers = [
            threading.Thread(target=hammer, args=(Client(base), images, acked, stop, errors))
            for _ in range(2)
        ]
        for w in workers:
            w.start()
        while len(acked) < 5:
            time.sleep(0.05)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        assert time.monotonic() - t0 < stop_limit_s() and proc.returncode == 0
        stop.set()
        for w in workers:
            w.join(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    check_store(tmp_path / "data", acked)


def test_refused_bundle_falls_back_to_the_previous_good_one(tmp_path, blood_bundle):
    from edge.config import load_config
    from edge.serve import open_classifier

    broken = tmp_path / "new-model"
    shutil.copytree(blood_bundle, broken)
    model = next(broken.glob("*.tflite"))
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    cfg = load_config(None, {"model.bundle": str(broken), "source.path": "x"})
    from edge.errors import BundleError

    with pytest.raises(BundleError, match="truncated"):
        open_classifier(cfg)
    cfg = load_config(
        None,
        {
            "model.bundle": str(broken),
            "source.path": "x",
            "model.fallback_bundle": str(blood_bundle),
        },
    )
    clf = open_classifier(cfg)
    assert clf.bundle.root == blood_bundle
    assert "configured bundle refused" in clf.backend_reason
    # A fallback that is not there either: the error says first why the bundle was refused.
    cfg = load_config(None, {"model.bundle": str(broken), "source.path": "x",
                             "model.fallback_bundle": str(tmp_path / "previous")})
    from edge.errors import FieldScopeError

    with pytest.raises(FieldScopeError,
                       match=r"refused \(.*manifest says.*fallback_bundle.*previous"):
        open_classifier(cfg)


KILLER = """
import io, os, signal, sys
from PIL import Image
from edge.daemon.outbox import Outbox
from edge.daemon.store import Store

def jpeg(colour):
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), colour).save(buf, "JPEG")
    return buf.getvalue()

result = {"label": "Benign", "score": 0.9, "probabilities": {"Benign": 0.9}}
store = Store(sys.argv[1])
Outbox(store, ("mqtt", "dicom"))
print(store.save(result, "capture", "S-1", jpeg=jpeg("red")), flush=True)

def hook(step):
    if step == sys.argv[2]:
        os.kill(os.getpid(), signal.SIGKILL)  # the power cut, between two steps

store.step_hook = hook
print(store.save(result, "capture", "S-2", jpeg=jpeg("blue")), flush=True)
"""


@pytest.mark.parametrize("step", ["snapshot-temp-written", "snapshot-renamed", "rows-inserted",
                                  "committed"])
def test_kill_9_at_each_step_of_a_store(tmp_path, step):
    """A child process storing a result is killed with SIGKILL at one step of the protocol.
    On disk the final snapshot name never holds a partial write; after start-up no temp file,
    no unreferenced snapshot and no result without its sample (one transaction) remain, a
    committed result survives, and the outbox holds exactly the messages of the stored results
    (queued in the same transaction: none for a result that was lost, none missing)."""
    import subprocess
    import sys

    from edge.daemon.store import STEPS, Store

    assert step in STEPS
    data = tmp_path / "data"
    proc = subprocess.run(
        [sys.executable, "-c", KILLER, str(data), step],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    first = int(proc.stdout.split()[0])
    files = [p for p in (data / "snapshots").rglob("*") if p.is_file()]
    finals = [p for p in files if not p.name.startswith(".")]
    temps = [p for p in files if p.name.endswith(".tmp")]
    if step == "snapshot-temp-written":
        # Written but not renamed: the second image exists only under its temp name.
        assert len(temps) == 1 and len(finals) == 1
        assert temps[0].read_bytes()[:2] == b"\xff\xd8"
    else:
        assert not temps and len(finals) == 2

    store = Store(data)  # start-up
    rows = store.list(limit=10)
    if step == "committed":
        assert [r["sample_code"] for r in rows] == ["S-2", "S-1"]
        assert store.reconciled == {"temp_files": 0, "orphan_snapshots": 0}
    else:
        assert [r["id"] for r in rows] == [first]
        expected = {"temp_files": int(step == "snapshot-temp-written"),
                    "orphan_snapshots": int(step != "snapshot-temp-written")}
        assert store.reconciled == expected
    assert {s["code"] for s in store.samples()} == {r["sample_code"] for r in rows}
    store.close()
    check_store(data, [first])
    import sqlite3

    with sqlite3.connect(data / "fieldscope.db") as db:
        queued = db.execute(
            "SELECT destination, kind, result_id, sample_code FROM outbox").fetchall()
    expected = set()
    for r in rows:
        code = r["sample_code"]
        expected |= {("mqtt", "result", r["id"], code), ("mqtt", "sample", None, code),
                     ("dicom", "field", r["id"], code)}
    assert sorted(queued, key=str) == sorted(expected, key=str)


def test_a_failed_insert_leaves_no_snapshot_behind(tmp_path):
    """SQLite itself refusing the row (here: the database made read-only under the store)
    fails the store with StorageError and removes the snapshot it had renamed into place."""
    from edge.daemon.store import StorageError, Store

    store = Store(tmp_path)
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(buf, "JPEG")
    store._db.execute("PRAGMA query_only = 1")
    with pytest.raises(StorageError):
        store.save({"label": "x", "score": 1.0}, "upload", "S", jpeg=buf.getvalue())
    assert not [p for p in (tmp_path / "snapshots").rglob("*") if p.is_file()]
    store._db.execute("PRAGMA query_only = 0")
    assert store.save({"label": "x", "score": 1.0}, "upload", "S", jpeg=buf.getvalue()) > 0
    store.close()


SQLITE_FULL = """
import json, os, resource, signal, sys
from edge.daemon.store import StorageError, Store

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # as the daemon does: an error, not a kill
store = Store(sys.argv[1])
row = {"label": "Benign", "score": 0.9, "probabilities": {"Benign": 0.9, "x": "y" * 2000}}
first = store.save(row, "live")
sizes = [os.path.getsize(os.path.join(sys.argv[1], f)) for f in os.listdir(sys.argv[1])
         if f.startswith("fieldscope.db")]
# Every file write past the current largest file now fails (EFBIG), SQLite's WAL included.
resource.setrlimit(resource.RLIMIT_FSIZE, (max(sizes), resource.RLIM_INFINITY))
errors = 0
for _ in range(50):
    try:
        store.save(row, "live")
    except StorageError as exc:
        errors += 1
        message = str(exc)
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
after = store.save(row, "live", sample_code="S-1")
print(json.dumps({"errors": errors, "message": message, "first": first, "after": after,
                  "count": store.count(), "last_error": store.last_error}))
store.close()
"""


def test_sqlite_itself_failing_to_write_is_a_storage_error_and_recovers(tmp_path):
    """ENOSPC-like failure inside SQLite (no snapshot involved): StorageError, nothing
    half-stored, and storing works again once space returns."""
    import json as _json
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", SQLITE_FULL, str(tmp_path)],
        capture_output=True, text=True, timeout=120,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert proc.returncode == 0, proc.stderr
    out = _json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["errors"] >= 1 and "could not store the result" in out["message"]
    assert out["last_error"] is None  # cleared by the store that worked
    db = sqlite3.connect(tmp_path / "fieldscope.db")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    ids = [r[0] for r in db.execute("SELECT id FROM results ORDER BY id")]
    assert ids[0] == out["first"] and ids[-1] == out["after"] and len(ids) == out["count"]
    assert db.execute("SELECT code FROM samples").fetchall() == [("S-1",)]


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MB tmpfs: a real file system that really runs out (ENOSPC). CI runs as root."""
    mnt = tmp_path / "card"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], check=True)
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_is_enospc_answered_507_and_storing_resumes(small_disk, blood_bundle,
                                                                 blood_samples, tmp_path):
    from edge.serve import build
    from tests.daemon_helpers import make_config, replay_folder

    cfg = make_config(blood_bundle, replay_folder(tmp_path / "r", blood_samples[:2]),
                      small_disk / "data", **{"storage.min_free_mb": 0})
    pipeline, app, store = build(cfg)
    pipeline.start()
    try:
        c = app.test_client()
        token = c.get("/api/session").get_json()["csrf_token"]
        image = blood_samples[0].read_bytes()

        def upload():
            return c.post("/api/classify", headers={"X-CSRFToken": token},
                          data={"image": (io.BytesIO(image), "x.jpg")})

        assert upload().status_code == 201
        filler = small_disk / "filler"
        with open(filler, "wb") as fh:  # fill the card to the last block
            try:
                while True:
                    fh.write(b"\0" * 65536)
            except OSError as exc:
                assert exc.errno == 28  # ENOSPC, the real thing
        r = upload()
        assert r.status_code == 507 and "not stored" in r.get_json()["error"]
        assert c.get("/api/health").get_json()["storage"]["ok"] is False
        filler.unlink()
        assert upload().status_code == 201
        assert c.get("/api/health").get_json()["storage"]["ok"] is True
    finally:
        pipeline.stop()
        store.close()
