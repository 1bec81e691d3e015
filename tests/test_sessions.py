"""Sessions that really end, patient data never cached, only the kit's own host names, and
the open routes documented as the app has them."""

from __future__ import annotations

import io
import re
import time
from pathlib import Path

from tests.test_web import csrf_of, daemon, jpeg_of  # noqa: F401  (the fixture)

ROOT = Path(__file__).resolve().parents[1]
PASSWORD = "correct horse"


def _login(app, password=PASSWORD):
    c = app.test_client()
    token = csrf_of(c)
    r = c.post("/login", data={"password": password, "csrf_token": token})
    assert r.status_code == 302, r.status_code
    return c


def _cookie(client) -> str:
    return client.get_cookie("session").value


def _with_cookie(app, value: str):
    c = app.test_client()
    c.set_cookie("session", value)
    return c


def test_a_cookie_saved_before_logout_is_refused_after_it(daemon):  # noqa: F811
    _, app = daemon(**{"web.password": PASSWORD})
    c = _login(app)
    saved = _cookie(c)
    assert c.get("/api/status").status_code == 200
    c.post("/logout", data={"csrf_token": csrf_of(c)})
    copy = _with_cookie(app, saved)
    assert copy.get("/api/status").status_code == 401


def test_a_card_that_turns_read_only_locks_nobody_out(daemon, monkeypatch):  # noqa: F811
    """ext4 remounts a failing card read-only: sessions can no longer be written, yet the
    logged-in phone keeps working, a new login works (kept in memory), both are listed on the
    System page, and a logout still ends a session although its row cannot be deleted."""
    from edge.web import sessions as sessions_module

    _, app = daemon(**{"web.password": PASSWORD})
    phone = _login(app)
    saved = _cookie(phone)
    store = app.extensions["fieldscope_auth"]["sessions"]
    store._db.execute("PRAGMA query_only=ON")  # what a read-only card does to every write
    monkeypatch.setattr(sessions_module, "TOUCH_EVERY_S", 0.0)  # every request tries a touch
    assert phone.get("/api/status").status_code == 200
    admin = _login(app)
    assert store.storage_error and "readonly" in store.storage_error
    page = admin.get("/system")
    assert page.status_code == 200
    assert len(re.findall(r'name="id" value="([0-9a-f]{64})"', page.get_data(as_text=True))) == 2
    # In use all along, past the idle limit of its last recorded touch: still logged in.
    assert phone.get("/api/status").status_code == 200
    store.idle_s = 1.0
    for _ in range(3):
        time.sleep(0.4)
        assert phone.get("/api/status").status_code == 200
    store.idle_s = 3600
    phone.post("/logout", data={"csrf_token": csrf_of(phone)})
    assert _with_cookie(app, saved).get("/api/status").status_code == 401
    in_memory = _cookie(admin)
    admin.post("/logout", data={"csrf_token": csrf_of(admin)})
    assert _with_cookie(app, in_memory).get("/api/status").status_code == 401


def test_a_password_change_ends_every_session(daemon):  # noqa: F811
    pipeline, app = daemon(**{"web.password": PASSWORD})
    saved = _cookie(_login(app))
    assert _with_cookie(app, saved).get("/api/status").status_code == 200
    # The same data folder (and session key) after a restart with a new password.
    _, app2 = daemon(**{"web.password": "another password"})
    assert _with_cookie(app2, saved).get("/api/status").status_code == 401
    assert _login(app2, "another password").get("/api/status").status_code == 200


def test_the_system_page_lists_sessions_and_ends_one(daemon):  # noqa: F811
    _, app = daemon(**{"web.password": PASSWORD})
    phone = _login(app)
    admin = _login(app)
    page = admin.get("/system").get_data(as_text=True)
    digests = re.findall(r'name="id" value="([0-9a-f]{64})"', page)
    assert len(digests) == 2 and "(this one)" in page
    mine = re.search(r'\(this one\).*?name="id" value="([0-9a-f]{64})"', page, re.S).group(1)
    other = next(d for d in digests if d != mine)
    r = admin.post("/sessions/end", data={"id": other, "csrf_token": csrf_of(admin)})
    assert r.status_code == 302
    assert phone.get("/api/status").status_code == 401
    assert admin.get("/api/status").status_code == 200


def test_sessions_expire_when_idle(daemon):  # noqa: F811
    _, app = daemon(**{"web.password": PASSWORD, "web.session_idle_minutes": 1})
    c = _login(app)
    sessions = app.extensions["fieldscope_auth"]["sessions"]
    sessions._db.execute("UPDATE web_sessions SET last_seen = last_seen - 120")
    assert c.get("/api/status").status_code == 401


def test_patient_data_is_never_cacheable(daemon, blood_samples):  # noqa: F811
    pipeline, app = daemon()
    c = app.test_client()
    r = c.post("/api/classify", headers={"X-CSRFToken": csrf_of(c)},
               data={"image": (io.BytesIO(jpeg_of(blood_samples[0])), "x.jpg"),
                     "sample_code": "S-9"})
    assert r.status_code == 201
    doc = r.get_json()
    row = pipeline.results.get(doc["id"])
    for path in (f"/api/results/{doc['id']}", f"/api/results/{doc['id']}/snapshot",
                 f"/api/results/{doc['id']}/map.png", f"/snapshots/{row['snapshot']}",
                 "/api/results", "/api/samples/S-9", "/api/samples/S-9/export.csv",
                 "/api/samples/S-9/fhir", "/samples/S-9", "/samples/S-9/report", "/api/status"):
        r = c.get(path)
        assert r.status_code == 200, path
        assert r.headers["Cache-Control"] == "no-store", path
        assert "ETag" not in r.headers, path


def test_a_foreign_host_name_gets_400(daemon):  # noqa: F811
    _, app = daemon()
    c = app.test_client()
    assert c.get("/api/health", headers={"Host": "attacker.example"}).status_code == 400
    for ok in ("localhost:8080", "127.0.0.1:8080", "[::1]:8080", "fieldscope.local",
               "192.168.4.1"):
        assert c.get("/api/health", headers={"Host": ok}).status_code == 200, ok


def test_security_doc_lists_the_apps_open_routes(daemon):  # noqa: F811
    from edge.web.auth import OPEN_ENDPOINTS

    _, app = daemon()
    open_routes = {r.rule for r in app.url_map.iter_rules() if r.endpoint in OPEN_ENDPOINTS}
    text = (ROOT / "docs" / "security.md").read_text()
    line = text.split("The open routes, as the app has them")[1].split(".\n")[0]
    assert set(re.findall(r"`([^`]+)`", line)) == open_routes
