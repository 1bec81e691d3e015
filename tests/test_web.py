"""The web app over Flask's test client, with a real pipeline on the bundled model."""

from __future__ import annotations

import io
import re
import shutil
import time

import numpy as np
import pytest
from PIL import Image

from edge.serve import build
from tests.daemon_helpers import make_config, replay_folder


def wait_for(predicate, timeout=30.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


@pytest.fixture
def daemon(blood_bundle, blood_samples, tmp_path):
    def start(images=None, bundle=None, **overrides):
        replay = replay_folder(tmp_path / "replay", images or blood_samples[:4])
        cfg = make_config(bundle or blood_bundle, replay, tmp_path / "data", **overrides)
        pipeline, app, store = build(cfg)
        pipeline.start()
        started.append((pipeline, store))
        return pipeline, app

    started = []
    yield start
    for pipeline, store in started:
        pipeline.stop()
        store.close()


def csrf_of(client) -> str:
    return client.get("/api/session").get_json()["csrf_token"]


def jpeg_of(path) -> bytes:
    return path.read_bytes()


def test_results_arrive_and_status_reports_them(daemon):
    pipeline, app = daemon()
    c = app.test_client()
    wait_for(lambda: pipeline.state.classified >= 3)
    st = c.get("/api/status").get_json()
    assert st["backend"]["backend"] == "cpu" and "no Edge TPU" in st["backend"]["reason"]
    assert st["last_result"]["label"] in ("Benign", "Early", "Pre", "Pro")
    assert st["last_result"]["decision"]["group"] == "ALL"
    assert st["fps"] > 0 and st["latency_ms"] > 0
    h = c.get("/api/health")
    assert h.status_code == 200 and h.get_json()["status"] == "ok"
    assert "fieldscope_frames_classified_total" in c.get("/metrics").get_data(as_text=True)
    model_page = c.get("/model").get_data(as_text=True)
    assert "Results on the held-out test split" in model_page and "CPU fallback" not in model_page
    # The card is HTML (markdown-it-py): tables and plots, no raw Markdown left.
    assert "<table>" in model_page and "<h2>Results on the held-out test split" in model_page
    assert "![" not in model_page and "|---|" not in model_page
    plots = re.findall(r'<img src="(/model/files/[^"]+\.png)"', model_page)
    assert "/model/files/roc.png" in plots
    for plot in plots:
        assert c.get(plot).data[:4] == b"\x89PNG", plot
    for page in ("/", "/samples", "/model", "/system"):
        r = c.get(page)
        assert r.status_code == 200, page
        assert "Content-Security-Policy" in r.headers and r.headers["X-Frame-Options"] == "DENY"


def test_upload_is_classified_stored_and_listed(daemon, blood_samples):
    pipeline, app = daemon()
    c = app.test_client()
    token = csrf_of(c)
    sample = blood_samples[0]
    truth = sample.name.split("_")[0]
    r = c.post(
        "/api/classify",
        headers={"X-CSRFToken": token},
        data={"image": (io.BytesIO(jpeg_of(sample)), "f.jpg"), "sample_code": "SMEAR-7"},
    )
    assert r.status_code == 201, r.get_json()
    doc = r.get_json()
    assert doc["id"] > 0 and doc["label"] == truth and doc["sample_code"] == "SMEAR-7"
    stored = c.get(f"/api/results/{doc['id']}").get_json()
    assert stored["label"] == truth and stored["mode"] == "upload"
    snap = c.get(f"/api/results/{doc['id']}/snapshot")
    assert snap.status_code == 200 and snap.data[:2] == b"\xff\xd8"
    listed = c.get("/api/results?sample=SMEAR-7").get_json()["results"]
    assert [x["id"] for x in listed] == [doc["id"]]


def _score_of(clf, image_bytes: bytes) -> dict:
    """The decision the kit gives these bytes, by the path uploads and stills take."""
    from edge.inference.preprocess import open_image

    rgb = np.asarray(open_image(image_bytes), dtype=np.uint8)
    small, times = clf.prepare(rgb)
    return clf.infer(small, times, tta=True).decision


def test_capture_lands_in_a_sample_with_summary_and_exports(daemon, blood_samples):
    """Two captures of a known lymphoblast field and one upload of a known benign field: the
    summary must give exactly their count, flags, mean and maximum."""
    pro = next(p for p in blood_samples if p.name.startswith("Pro_"))
    benign = next(p for p in blood_samples if p.name.startswith("Benign_"))
    pipeline, app = daemon(images=[pro])
    c = app.test_client()
    wait_for(lambda: pipeline.state.camera == "ok" and pipeline.state.classified > 0)
    token = csrf_of(c)
    ids = []
    for _ in range(2):
        r = c.post("/api/capture", json={"sample_code": "P-001"}, headers={"X-CSRFToken": token})
        assert r.status_code == 201, r.get_json()
        ids.append(r.get_json()["id"])
    r = c.post(
        "/api/classify",
        headers={"X-CSRFToken": token},
        data={"image": (io.BytesIO(benign.read_bytes()), "b.jpg"), "sample_code": "P-001"},
    )
    assert r.status_code == 201
    ids.append(r.get_json()["id"])
    pro_rule = _score_of(pipeline.profile.classifier, pro.read_bytes())
    benign_rule = _score_of(pipeline.profile.classifier, benign.read_bytes())
    assert pro_rule["positive"] and not benign_rule["positive"]  # what these fields are
    s = c.get("/api/samples/P-001").get_json()
    assert s["fields"] == 3 and {x["id"] for x in s["results"]} == set(ids)
    assert s["flagged"] == 2 and s["not_assessable"] == 0
    assert s["max_score"] == pytest.approx(pro_rule["score"], abs=1e-6)
    assert s["mean_score"] == pytest.approx(
        (2 * pro_rule["score"] + benign_rule["score"]) / 3, abs=1e-6
    )
    csv_text = c.get("/api/samples/P-001/export.csv").get_data(as_text=True)
    lines = csv_text.strip().splitlines()
    assert lines[0].startswith("id,time_utc,label,score,decision") and len(lines) == 4
    assert "P-001" in c.get("/samples/P-001").get_data(as_text=True)
    report = c.get("/samples/P-001/report").get_data(as_text=True)
    assert "screening report" in report and "Aria M." in report
    assert [x["code"] for x in c.get("/api/samples").get_json()["samples"]] == ["P-001"]


def test_a_field_that_fails_the_quality_gate_states_no_finding_anywhere(daemon, blood_samples):
    """A blurred or over-exposed field keeps its scores for the record, but no page, export or
    message may say "refer" or "no ALL pattern" of it, nor outline it as flagged."""
    from edge.outbound.messages import result_message

    pipeline, app = daemon(**{"pipeline.min_focus": 1e9})  # every image fails the gate
    c = app.test_client()
    token = csrf_of(c)
    outcomes = set()
    for path in blood_samples[:4]:
        r = c.post("/api/classify", headers={"X-CSRFToken": token},
                   data={"image": (io.BytesIO(path.read_bytes()), "f.jpg"), "sample_code": "Q-1"})
        assert r.status_code == 201
        doc = r.get_json()
        assert doc["assessable"] is False and doc["decision"]["positive"] is False
        outcomes.add(doc["decision"]["outcome"])
        assert doc["decision"]["text"].startswith("not assessable")
    assert outcomes == {"not assessable"}
    rule = pipeline.profile.classifier.bundle.decision
    words = (rule["positive"], rule["negative"])
    rows = c.get("/api/samples/Q-1").get_json()["results"]
    assert {(x["decision_outcome"], x["decision_positive"]) for x in rows} == {
        ("not assessable", 0)}
    csv_text = c.get("/api/samples/Q-1/export.csv").get_data(as_text=True)
    page = c.get("/samples/Q-1").get_data(as_text=True)
    report = c.get("/samples/Q-1/report").get_data(as_text=True)
    for text in (csv_text, page, report.split("<h2>Fields</h2>")[1]):
        assert not any(w in text for w in words)
    assert 'class="field flag"' not in page and "not assessable (image quality)" in csv_text

    class Msg:
        result_id, message_id = rows[0]["id"], "m"

    message = result_message(pipeline.store, Msg(), "kit")
    assert message["decision_outcome"] == "not assessable" and not message["decision_positive"]


def test_a_sample_code_with_a_newline_and_a_broken_json_body_are_refused(daemon, blood_samples):
    """"P-1\n" would pass a "^...$" pattern (and later break the CSV's header with a 500); a
    capture whose JSON does not parse must not go on as a capture without its sample."""
    _, app = daemon()
    c = app.test_client()
    token = csrf_of(c)
    r = c.post("/api/classify", headers={"X-CSRFToken": token},
               data={"image": (io.BytesIO(blood_samples[0].read_bytes()), "f.jpg"),
                     "sample_code": "SMEAR-7\n"})
    assert r.status_code == 400 and "sample_code" in r.get_json()["error"]
    assert c.get("/api/samples/SMEAR-7%0A/export.csv").status_code == 400
    r = c.post("/api/capture", data='{"sample_code": "P-1"', content_type="application/json",
               headers={"X-CSRFToken": token})
    assert r.status_code == 400 and "not valid JSON" in r.get_json()["error"]


def test_the_printed_rule_is_the_one_captures_and_uploads_are_judged_by(daemon):
    """A bundle with test-time views judges uploads on their mean by ``tta_threshold``: the
    report states that threshold, the Model page both, each with its use."""
    from tests.conftest import ROOT

    skin = ROOT / "models" / "skin-lesion"
    images = sorted((skin / "samples").glob("*.jpg"))
    pipeline, app = daemon(images=images[:2], bundle=skin)
    rule = pipeline.profile.classifier.bundle.decision
    c = app.test_client()
    r = c.post("/api/classify", headers={"X-CSRFToken": csrf_of(c)},
               data={"image": (io.BytesIO(images[0].read_bytes()), "s.jpg"), "sample_code": "R-1"})
    assert r.status_code == 201 and r.get_json()["decision"]["threshold"] == rule["tta_threshold"]
    report = c.get("/samples/R-1/report").get_data(as_text=True)
    assert f"{rule['group']} ≥ {rule['tta_threshold']:.4g} →" in report
    model = c.get("/model").get_data(as_text=True)
    assert f"≥ {rule['threshold']:.4g} → {rule['positive']} on the live stream" in model
    assert f"≥ {rule['tta_threshold']:.4g} on captures and uploads" in model


@pytest.mark.parametrize(
    "payload,status,needle",
    [
        (b"", 400, "empty"),
        (b"this is not an image at all", 400, "not a readable image"),
        (None, 400, "damaged or truncated"),  # truncated JPEG, filled in below
    ],
)
def test_bad_uploads_get_4xx_and_classification_goes_on(
    daemon, blood_samples, payload, status, needle
):
    pipeline, app = daemon()
    c = app.test_client()
    token = csrf_of(c)
    if payload is None:
        payload = jpeg_of(blood_samples[0])[:1500]
    before = wait_for(lambda: pipeline.state.classified or None)
    r = c.post(
        "/api/classify",
        headers={"X-CSRFToken": token},
        data={"image": (io.BytesIO(payload), "x.jpg")},
    )
    assert r.status_code == status and needle in r.get_json()["error"]
    wait_for(lambda: pipeline.state.classified > before)


def test_huge_and_bomb_uploads_are_refused(daemon):
    pipeline, app = daemon(**{"web.max_upload_mb": 1})
    c = app.test_client()
    token = csrf_of(c)
    r = c.post(
        "/api/classify",
        headers={"X-CSRFToken": token},
        data={"image": (io.BytesIO(b"\xff" * (2 * 1024 * 1024)), "big.jpg")},
    )
    assert r.status_code == 413 and "larger than 1 MB" in r.get_json()["error"]
    # The page's script is told the limit, to say so before sending (the server itself cuts
    # a larger body off, which a browser may see only as a broken connection).
    assert b'data-max-mb="1"' in c.get("/").data
    from tests.test_preprocess import png_claiming

    r = c.post(
        "/api/classify",
        headers={"X-CSRFToken": token},
        data={"image": (io.BytesIO(png_claiming(40000, 40000)), "bomb.png")},
    )
    assert r.status_code == 413 and "decompression bomb" in r.get_json()["error"]


def test_post_without_csrf_token_is_refused(daemon, blood_samples):
    _, app = daemon()
    c = app.test_client()
    r = c.post("/api/classify", data={"image": (io.BytesIO(jpeg_of(blood_samples[0])), "a.jpg")})
    assert r.status_code == 400 and "CSRF" in r.get_json()["error"]
    r = c.post("/api/capture", json={"sample_code": "X"}, headers={"X-CSRFToken": "forged"})
    assert r.status_code == 400


def test_path_traversal_in_snapshot_urls_is_refused(daemon, tmp_path, blood_bundle):
    # A real PNG beside the bundle: only the path guard (not the .png rule) keeps it out.
    bundle = tmp_path / "models" / "blood-smear"
    shutil.copytree(blood_bundle, bundle)
    Image.new("RGB", (4, 4)).save(bundle.parent / "outside.png")
    pipeline, app = daemon(bundle=bundle)
    c = app.test_client()
    for url in (
        "/snapshots/../fieldscope.db",
        "/snapshots/..%2Ffieldscope.db",
        "/snapshots/%2e%2e/secret_key",
        "/snapshots//etc/passwd",
        "/model/files/..%2Fmanifest.json",
        "/model/files/..%2Foutside.png",
    ):
        r = c.get(url, follow_redirects=True)
        assert r.status_code == 404, url
        assert b"SQLite" not in r.data
    # The router never hands a name with "/" to the view; the view's own guard must refuse it
    # too (defence in depth), so call it as a router that did would.
    from werkzeug.exceptions import NotFound

    from edge.web.pages import model_file

    with app.test_request_context("/model/files/x"):
        assert model_file("roc.png").status_code == 200
        with pytest.raises(NotFound):
            model_file("../outside.png")


def test_bad_sample_code_is_refused(daemon):
    _, app = daemon()
    c = app.test_client()
    r = c.post(
        "/api/capture", json={"sample_code": "../../etc"}, headers={"X-CSRFToken": csrf_of(c)}
    )
    assert r.status_code == 400 and "sample_code" in r.get_json()["error"]


def test_network_bound_kit_requires_login(daemon, blood_samples):
    pipeline, app = daemon(**{"web.password": "correct horse"})
    c = app.test_client()
    assert c.get("/api/health").status_code == 200  # open for monitoring
    assert c.get("/api/status").status_code == 401
    assert c.get("/metrics").status_code == 401
    r = c.get("/samples")
    assert r.status_code == 302 and "/login" in r.headers["Location"]
    token = csrf_of(c)
    bad = c.post("/login", data={"password": "wrong", "csrf_token": token})
    assert bad.status_code == 401 and b"Wrong password" in bad.data
    no_csrf = c.post("/login", data={"password": "correct horse"})
    assert no_csrf.status_code == 400
    ok = c.post("/login", data={"password": "correct horse", "csrf_token": token})
    assert ok.status_code == 302
    cookie = ok.headers.get("Set-Cookie", "")
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert c.get("/api/status").status_code == 200


def test_login_is_rate_limited(daemon):
    _, app = daemon(**{"web.password": "pw"})
    c = app.test_client()
    token = csrf_of(c)
    codes = [
        c.post("/login", data={"password": f"guess{i}", "csrf_token": token}).status_code
        for i in range(7)
    ]
    assert codes[:5] == [401] * 5 and codes[5:] == [429, 429]
    r = c.post("/login", data={"password": "pw", "csrf_token": token})
    assert r.status_code == 429  # even the right password waits out the window


def test_source_that_fails_is_retried_and_reported(daemon, tmp_path, blood_samples):
    pipeline, app = daemon()
    c = app.test_client()
    wait_for(lambda: pipeline.state.classified > 0)
    replay = tmp_path / "replay"
    hidden = tmp_path / "replay-away"
    replay.rename(hidden)  # the camera goes away
    wait_for(lambda: pipeline.state.camera == "lost", timeout=20)
    h = c.get("/api/health").get_json()
    assert h["camera"]["state"] == "lost" and h["status"] == "degraded"
    assert c.get("/").status_code == 200  # still serving
    hidden.rename(replay)  # and comes back
    wait_for(lambda: pipeline.state.camera == "ok", timeout=20)
    n = pipeline.state.classified
    wait_for(lambda: pipeline.state.classified > n)


def test_mjpeg_stream_yields_jpeg_frames(daemon):
    from edge.web.stream import mjpeg

    pipeline, _ = daemon()
    wait_for(lambda: pipeline.profile.capture.latest_frame())
    parts = []
    for chunk in mjpeg(pipeline, fps=20, max_seconds=3):
        parts.append(chunk)
        if len(parts) == 2:
            break
    assert len(parts) == 2
    for part in parts:
        head, _, body = part.partition(b"\r\n\r\n")
        length = int(re.search(rb"Content-Length: (\d+)", head).group(1))
        jpeg = body[:length]
        assert jpeg[:2] == b"\xff\xd8"
        Image.open(io.BytesIO(jpeg)).verify()


def test_no_password_in_logs(daemon, caplog):
    import logging

    _, app = daemon(**{"web.password": "hunter2-correct"})
    c = app.test_client()
    token = csrf_of(c)
    with caplog.at_level(logging.DEBUG):
        c.post("/login", data={"password": "hunter2-guess", "csrf_token": token})
        c.post("/login", data={"password": "hunter2-correct", "csrf_token": token})
    assert "failed login" in caplog.text  # the attempt is logged...
    assert "hunter2" not in caplog.text  # ...never the password


def test_ids_beyond_sqlite_integers_are_not_found_not_a_crash(daemon):
    """Found by the API fuzzer: an id past 2**63 made SQLite raise OverflowError (a 500)."""
    _, app = daemon()
    c = app.test_client()
    huge = 2**70
    assert c.get(f"/api/results/{huge}").status_code == 404
    assert c.get(f"/api/results/{huge}/snapshot").status_code == 404
    assert c.get(f"/api/results?before={huge}").status_code == 200
    assert c.get(f"/api/results?before={-huge}").get_json() == {"results": []}


def test_every_route_but_the_open_ones_needs_a_login(daemon):
    """With a password, each route of the app (new ones included: profile switching, the FHIR
    export) answers 401 or redirects to the login, except the few that are open by design."""
    import re

    from edge.web.auth import OPEN_ENDPOINTS

    _, app = daemon(**{"web.password": "correct horse"})
    c = app.test_client()
    checked = []
    for rule in app.url_map.iter_rules():
        if rule.endpoint in OPEN_ENDPOINTS or rule.endpoint == "static":
            continue
        path = re.sub(r"<(?:int:)?result_id>", "1", rule.rule)
        path = re.sub(r"<[^>]+>", "X-1", path)
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            r = c.open(path, method=method, headers={"Accept": "application/json"})
            assert r.status_code in (401, 302), (method, path, r.status_code)
            if r.status_code == 302:
                assert "/login" in r.headers["Location"], (method, path)
            checked.append((method, path))
    assert ("POST", "/api/profile") in checked and ("POST", "/profile") in checked
    assert ("GET", "/api/samples/X-1/fhir") in checked


def test_a_full_decode_budget_and_a_memory_error_are_503_with_retry_after(
    daemon, blood_samples
):
    """Uploads waiting past the decode budget's wait get 503 + Retry-After; so does an upload
    that runs out of memory (never 500), and the kit classifies the next one."""
    pipeline, app = daemon()
    c = app.test_client()
    token = csrf_of(c)
    budget = pipeline.results.decode_budget
    budget.wait_s = 0.2
    data = jpeg_of(blood_samples[0])

    def post():
        return c.post("/api/classify", headers={"X-CSRFToken": token},
                      data={"image": (io.BytesIO(data), "x.jpg")})

    with budget.hold(budget.limit):  # another upload's pixels fill the budget
        r = post()
    assert r.status_code == 503 and r.headers["Retry-After"] == "5"
    assert "decoding other large images" in r.get_json()["error"]
    real = pipeline.results._classify_and_store

    def short_of_memory(*args, **kwargs):
        raise MemoryError

    pipeline.results._classify_and_store = short_of_memory
    r = post()
    assert r.status_code == 503 and "short of memory" in r.get_json()["error"]
    assert r.headers["Retry-After"]
    pipeline.results._classify_and_store = real
    assert post().status_code == 201


def test_the_system_page_answers_when_the_data_folder_is_gone(daemon, tmp_path):
    """An unmounted card: the page one opens to diagnose it says so instead of a 500."""
    import shutil

    pipeline, app = daemon()
    c = app.test_client()
    shutil.rmtree(tmp_path / "data")
    r = c.get("/system")
    assert r.status_code == 200
    assert "unreadable" in r.get_data(as_text=True)


def test_before_zero_is_a_cursor_not_no_cursor(daemon, blood_samples):
    pipeline, app = daemon()
    c = app.test_client()
    r = c.post("/api/classify", headers={"X-CSRFToken": csrf_of(c)},
               data={"image": (io.BytesIO(jpeg_of(blood_samples[0])), "x.jpg")})
    assert r.status_code == 201
    assert c.get("/api/results").get_json()["results"]
    assert c.get("/api/results?before=0").get_json()["results"] == []
