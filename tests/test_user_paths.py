"""User paths no test walked before: a capture while the camera is lost, health when inference
is stuck, live views turned off, classify --tta and --device, the port already taken, and a
blurred field through the live worker."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from tests.daemon_helpers import poll
from tests.test_pipeline import _pipeline
from tests.test_web import csrf_of, daemon  # noqa: F401  (the fixture)

ROOT = Path(__file__).resolve().parents[1]
SKIN = ROOT / "models" / "skin-lesion"


def test_a_capture_while_the_camera_is_lost_is_503(daemon, tmp_path):  # noqa: F811
    import shutil

    pipeline, app = daemon()
    c = app.test_client()
    shutil.rmtree(tmp_path / "replay")  # the camera goes away
    poll(lambda: pipeline.state.camera == "lost", 20, 0.05)
    r = c.post("/api/capture", json={"sample_code": "S-1"}, headers={"X-CSRFToken": csrf_of(c)})
    assert r.status_code == 503 and "camera not available" in r.get_json()["error"]


def test_health_is_503_when_inference_is_stuck(daemon):  # noqa: F811
    pipeline, app = daemon()
    c = app.test_client()
    assert c.get("/api/health").status_code == 200
    pipeline.profile.worker.last_heartbeat -= 60  # the inference loop has not turned for 60 s
    r = c.get("/api/health")
    assert r.status_code == 503 and r.get_json()["inference"]["ok"] is False


def test_live_views_can_be_turned_off(daemon):  # noqa: F811
    _, app = daemon(**{"web.max_streams": 0})
    r = app.test_client().get("/stream.mjpg")
    assert r.status_code == 503 and "at most 0" in r.get_json()["error"]


def test_classify_with_views_and_a_device_string(tmp_path):
    sample = sorted((SKIN / "samples").glob("*.jpg"))[0]
    run = [sys.executable, "-m", "edge", "classify", "--model", str(SKIN), "--json"]
    plain = subprocess.run(run + [str(sample)], capture_output=True, text=True, cwd=ROOT,
                           timeout=120, check=True)
    views = subprocess.run(run + ["--tta", str(sample)], capture_output=True, text=True,
                           cwd=ROOT, timeout=120, check=True)
    a, b = json.loads(plain.stdout), json.loads(views.stdout)
    assert a["views"] == 1 and b["views"] == 4 and a["probabilities"] != b["probabilities"]
    bad = subprocess.run(run + ["--device", "usb:x", str(sample)], capture_output=True,
                         text=True, cwd=ROOT, timeout=120)
    assert bad.returncode == 2 and "usb:x" in bad.stderr


def test_the_port_already_taken_is_a_clear_error(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        out = subprocess.run(
            [sys.executable, "-m", "edge", "serve", "--model", str(SKIN), "--source",
             f"replay:{SKIN / 'samples'}", "--port", str(port), "--data-dir",
             str(tmp_path / "data")],
            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode != 0
    assert str(port) in out.stderr and "in use" in out.stderr.lower(), out.stderr[-800:]


def test_a_blurred_field_through_the_live_worker_is_not_assessable(blood_bundle,
                                                                    blood_samples, tmp_path):
    sharp = Image.open(blood_samples[0]).convert("RGB")
    blurred = np.asarray(sharp.filter(ImageFilter.GaussianBlur(12)))
    pipe, _ = _pipeline(blood_bundle, tmp_path, [blurred], **{"pipeline.min_focus": 5.0,
                                                            "pipeline.store_every_s": 0.001})
    pipe.start()
    poll(lambda: pipe.state.not_assessable >= 3, 20, 0.02)
    st = pipe.state
    pipe.stop()
    assert st.not_assessable >= 3 and st.classified == 0
    assert st.result["assessable"] is False and st.smoothed is None
    assert pipe.store.count() == 0  # never stored, never flagged
    pipe.store.close()


def test_max_fps_caps_the_live_rate(blood_bundle, blood_samples, tmp_path):
    frame = np.asarray(Image.open(blood_samples[0]).convert("RGB"))
    pipe, _ = _pipeline(blood_bundle, tmp_path, [frame], **{"pipeline.max_fps": 4.0})
    pipe.start()
    poll(lambda: pipe.state.classified >= 2, 20, 0.01)
    first, t0 = pipe.state.classified, time.monotonic()
    time.sleep(2.0)
    rate = (pipe.state.classified - first) / (time.monotonic() - t0)
    pipe.stop()
    pipe.store.close()
    assert 0 < rate <= 4.0 * 1.25, rate  # the source offers 100 frames a second


def test_snapshot_quality_sets_the_stored_jpeg(daemon, blood_samples, tmp_path):  # noqa: F811
    sizes = {}
    for quality in (20, 95):
        pipeline, app = daemon(**{"storage.snapshot_quality": quality,
                                  "storage.data_dir": str(tmp_path / f"d{quality}")})
        c = app.test_client()
        r = c.post("/api/classify", headers={"X-CSRFToken": csrf_of(c)},
                   data={"image": (io.BytesIO(blood_samples[0].read_bytes()), "x.jpg")})
        row = pipeline.results.get(r.get_json()["id"])
        sizes[quality] = pipeline.results.snapshot_path(row["snapshot"]).stat().st_size
    assert sizes[20] < sizes[95] * 0.6, sizes
