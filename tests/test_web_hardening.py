"""Web faults: a broken session key, open redirects, the rate limit behind a proxy, what the
open health endpoint reveals, and the System page's cost per view."""

from __future__ import annotations

import pytest

from edge.web import KEY_BYTES, _secret_key
from edge.web.auth import safe_next
from tests.test_web import csrf_of, daemon  # noqa: F401  (the fixture)


def test_empty_or_short_secret_key_is_replaced(tmp_path):
    (tmp_path / "secret_key").write_bytes(b"")  # a crash between create and write
    key = _secret_key(tmp_path)
    assert len(key) == KEY_BYTES and (tmp_path / "secret_key").read_bytes() == key
    assert _secret_key(tmp_path) == key  # kept across restarts
    assert (tmp_path / "secret_key").stat().st_mode & 0o777 == 0o600
    (tmp_path / "secret_key").write_bytes(b"abc")
    assert len(_secret_key(tmp_path)) == KEY_BYTES
    assert not list(tmp_path.glob(".secret_key*"))  # no temp file left


@pytest.mark.parametrize(
    ("target", "safe"),
    [
        ("/samples/P-1", True),
        ("/model?x=1", True),
        ("//evil.com", False),
        ("/\\evil.com", False),
        ("/\\/evil.com", False),
        ("https://evil.com", False),
        ("evil.com", False),
        ("/\tevil", False),
        ("", False),
    ],
)
def test_post_login_redirect_stays_on_the_kit(target, safe):
    assert safe_next(target) == (target if safe else "/")


def test_login_redirect_refuses_a_backslash_target(daemon):  # noqa: F811
    _, app = daemon(**{"web.password": "pw"})
    c = app.test_client()
    r = c.post("/login?next=/%5Cevil.com", data={"password": "pw", "csrf_token": csrf_of(c)})
    assert r.status_code == 302 and r.headers["Location"] == "/"


def test_rate_limit_keys_on_the_client_behind_a_trusted_proxy(daemon):  # noqa: F811
    _, app = daemon(**{"web.password": "pw", "web.trusted_proxies": 1})
    c = app.test_client()
    token = csrf_of(c)

    def attempt(client_ip: str, password: str) -> int:
        return c.post(
            "/login",
            data={"password": password, "csrf_token": token},
            headers={"X-Forwarded-For": client_ip},
            environ_base={"REMOTE_ADDR": "127.0.0.1"},  # every request comes via the proxy
        ).status_code

    assert [attempt("10.0.0.5", f"guess{i}") for i in range(6)][-1] == 429
    # Another phone behind the same proxy is not locked out by the first one's guesses.
    assert attempt("10.0.0.6", "pw") == 302


def test_without_a_trusted_proxy_the_forwarded_header_is_ignored(daemon):  # noqa: F811
    _, app = daemon(**{"web.password": "pw"})
    c = app.test_client()
    token = csrf_of(c)
    codes = [
        c.post("/login", data={"password": f"g{i}", "csrf_token": token},
               headers={"X-Forwarded-For": f"10.0.0.{i}"}).status_code
        for i in range(6)
    ]
    assert codes[-1] == 429  # a forged header does not buy more guesses


def test_health_reveals_states_not_error_texts(daemon, tmp_path):  # noqa: F811
    pipeline, app = daemon(**{"source.path": str(tmp_path / "no-such-folder")})
    c = app.test_client()
    import time

    end = time.monotonic() + 20
    while pipeline.state.camera != "lost" and time.monotonic() < end:
        time.sleep(0.05)
    body = c.get("/api/health").get_data(as_text=True)
    assert '"lost"' in body and "no-such-folder" not in body and str(tmp_path) not in body
    assert "no-such-folder" in c.get("/api/status").get_data(as_text=True)


def test_system_page_hashes_each_bundle_once(daemon):  # noqa: F811
    from edge.inference import tflite_file

    _, app = daemon()
    c = app.test_client()
    assert c.get("/system").status_code == 200
    before = tflite_file.HASHED["files"]
    for _ in range(3):
        assert c.get("/system").status_code == 200
    assert tflite_file.HASHED["files"] == before


TOKEN = "a-long-random-token-for-scripts-0123456789"


def test_api_token_lets_a_script_post_without_cookies_or_csrf(daemon, blood_samples):  # noqa: F811
    import hashlib
    import io

    digest = "sha256:" + hashlib.sha256(TOKEN.encode()).hexdigest()
    _, app = daemon(**{"web.password": "pw", "web.api_tokens": [digest]})
    c = app.test_client()
    image = blood_samples[0].read_bytes()

    def upload(headers):
        return c.post("/api/classify", headers=headers,
                      data={"image": (io.BytesIO(image), "f.jpg"), "sample_code": "T-1"})

    good = upload({"Authorization": f"Bearer {TOKEN}"})
    assert good.status_code == 201 and good.get_json()["sample_code"] == "T-1"
    assert c.get("/api/status", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    bad = upload({"Authorization": "Bearer not-the-token-at-all-000000"})
    assert bad.status_code == 401 and "invalid API token" in bad.get_json()["error"]
    assert upload({}).status_code == 401  # no token, no session: login required
    # A cookie session still needs its CSRF token for every POST.
    token = csrf_of(c)
    assert c.post("/login", data={"password": "pw", "csrf_token": token}).status_code == 302
    assert upload({}).status_code == 400  # logged in, but no CSRF token
    assert upload({"X-CSRFToken": csrf_of(c)}).status_code == 201  # the new session's token


def test_api_token_from_the_environment_is_kept_hashed(monkeypatch, daemon):  # noqa: F811
    """What the running app keeps of a token is its digest, never the token."""
    from edge.web.auth import token_digest

    monkeypatch.setenv("FIELDSCOPE_API_TOKEN", TOKEN)
    _, app = daemon(**{"web.password": "correct horse"})
    kept = app.extensions["fieldscope_auth"]["tokens"]
    assert kept == [token_digest(TOKEN)] and TOKEN not in kept
    assert len(kept[0]) == 64 and TOKEN not in repr(app.extensions["fieldscope_auth"])
    c = app.test_client()
    assert c.get("/api/status", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200


def test_short_api_tokens_are_refused():
    from edge.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="16 characters"):
        load_config(None, {"source.path": "x", "web.api_tokens": ["short"]})
