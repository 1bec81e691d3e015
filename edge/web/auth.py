"""Login for a kit bound to the network: one shared password, a session, a login rate limit.

On 127.0.0.1 without a password nothing asks for a login (only the Pi's own user can reach it).
"""

from __future__ import annotations

import hmac
import re
import threading
import time
from collections import defaultdict, deque
from pathlib import Path

from flask import (
    Blueprint,
    current_app,
    g,
    jsonify,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from werkzeug.security import check_password_hash, generate_password_hash

bp = Blueprint("auth", __name__)
OPEN_ENDPOINTS = {
    "auth.login",
    "auth.logout",
    "api.health",
    "api.session_info",
    "api.openapi",
    "static",
}
MAX_FAILURES = 5
WINDOW_S = 300.0


class LoginLimiter:
    """At most MAX_FAILURES failed logins per client address per WINDOW_S."""

    def __init__(self) -> None:
        self._fails: dict[str, deque[float]] = defaultdict(deque)
        self._lock = threading.Lock()

    def blocked(self, who: str) -> float:
        now = time.monotonic()
        with self._lock:
            q = self._fails[who]
            while q and now - q[0] > WINDOW_S:
                q.popleft()
            return WINDOW_S - (now - q[0]) if len(q) >= MAX_FAILURES else 0.0

    def fail(self, who: str) -> None:
        with self._lock:
            self._fails[who].append(time.monotonic())

    def clear(self, who: str) -> None:
        with self._lock:
            self._fails.pop(who, None)


def safe_next(target: str) -> str:
    """``target`` when it is a path on this kit, else "/". Browsers read a backslash as a
    slash, so "/\\evil.com" would leave the kit like "//evil.com" does."""
    from urllib.parse import urlsplit

    if (
        not target.startswith("/")
        or target.startswith("//")
        or "\\" in target
        or any(ord(c) < 32 or ord(c) == 127 for c in target)
    ):
        return "/"
    parts = urlsplit(target)
    return target if not parts.scheme and not parts.netloc else "/"


def _hash(password: str) -> str:
    if password.startswith(("scrypt:", "pbkdf2:")):
        return password
    return generate_password_hash(password)


def token_digest(token: str) -> str:
    """What the kit keeps of an API token: its SHA-256 (a token is long and random, so a plain
    digest is enough; the configured "sha256:<hex>" form is kept as given)."""
    import hashlib

    if token.startswith("sha256:"):
        return token.removeprefix("sha256:").lower()
    return hashlib.sha256(token.strip().encode()).hexdigest()


def _token_ok(presented: str, digests: list[str]) -> bool:
    import hashlib

    mine = hashlib.sha256(presented.strip().encode()).hexdigest()
    ok = False
    for d in digests:  # every digest compared, in constant time: no early exit
        ok |= hmac.compare_digest(mine, d)
    return ok


def init(app, cfg, csrf) -> None:
    from .sessions import Sessions

    password_hash = _hash(cfg.web.password) if cfg.web.password else None
    state = {
        "hash": password_hash,
        "limiter": LoginLimiter(),
        "tokens": [token_digest(t) for t in cfg.web.api_tokens],
        # Server-side sessions (edge/web/sessions.py): only where a login exists at all.
        "sessions": Sessions(
            Path(cfg.data_dir) / "fieldscope.db", password_hash,
            idle_s=cfg.web.session_idle_minutes * 60.0,
            max_age_s=cfg.web.session_max_days * 86400.0,
        ) if password_hash else None,
    }
    app.extensions["fieldscope_auth"] = state
    # CSRF is checked here rather than by default: a request with a valid bearer token is
    # exempt (a browser cannot send an Authorization header to another site on its own), a
    # cookie session never is.
    app.config["WTF_CSRF_CHECK_DEFAULT"] = False

    @app.before_request
    def bearer_token():
        g.via_token = False
        header = request.headers.get("Authorization", "")
        if header.startswith("Bearer "):
            if not _token_ok(header[7:], state["tokens"]):
                return jsonify(error="invalid API token"), 401
            g.via_token = True
        return None

    @app.before_request
    def require_login():
        if g.get("via_token"):
            return None
        denied = _login_needed()
        if denied is not None:
            return denied
        if request.method in ("POST", "PUT", "PATCH", "DELETE"):
            csrf.protect()  # after the login check: a stranger hears "log in", not "CSRF"
        return None

    def _login_needed():
        if state["hash"] is None or request.endpoint in OPEN_ENDPOINTS:
            return None
        if state["sessions"].valid(session.get("sid")):
            return None
        if request.path.startswith("/api/") or request.path in ("/metrics", "/stream.mjpg"):
            return jsonify(error="login required: POST /login"), 401
        return redirect(url_for("auth.login", next=request.path))


def login_required_enabled() -> bool:
    return current_app.extensions["fieldscope_auth"]["hash"] is not None


@bp.route("/login", methods=["GET", "POST"])
def login():
    state = current_app.extensions["fieldscope_auth"]
    if state["hash"] is None:
        return redirect(url_for("pages.live"))
    error = None
    status = 200
    if request.method == "POST":
        who = request.remote_addr or "?"
        wait = state["limiter"].blocked(who)
        if wait:
            error, status = f"Too many attempts. Try again in {int(wait) + 1} s.", 429
        elif hmac.compare_digest(
            str(check_password_hash(state["hash"], request.form.get("password", ""))), "True"
        ):
            state["limiter"].clear(who)
            session.clear()
            session["sid"] = state["sessions"].open(who, request.headers.get("User-Agent", ""))
            session["user"] = "operator"  # for the page's "Log out"; the sid is what counts
            return redirect(safe_next(request.args.get("next", "/")))
        else:
            state["limiter"].fail(who)
            current_app.logger.warning("failed login from %s", who)
            error, status = "Wrong password.", 401
    return render_template("login.html", error=error), status


@bp.route("/logout", methods=["POST"])
def logout():
    sessions = current_app.extensions["fieldscope_auth"]["sessions"]
    if sessions is not None:
        sessions.end(session.get("sid"))
    session.clear()
    return redirect(url_for("auth.login"))


def active_sessions() -> list[dict]:
    """The kit's live login sessions (the System page lists them); [] without a login."""
    sessions = current_app.extensions["fieldscope_auth"]["sessions"]
    return sessions.active(session.get("sid")) if sessions is not None else []


@bp.route("/sessions/end", methods=["POST"])
def end_session():
    """End one session from the System page (its phone is logged out at its next request)."""
    sessions = current_app.extensions["fieldscope_auth"]["sessions"]
    digest = request.form.get("id", "")
    if sessions is None or not re.fullmatch(r"[0-9a-f]{64}", digest):
        return jsonify(error="no such session"), 404
    if not sessions.end_digest(digest):
        return jsonify(error="no such session"), 404
    return redirect(url_for("pages.system"))
