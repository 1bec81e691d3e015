"""The kit's local web app: status pages, JSON API, MJPEG live view, Prometheus metrics.

Built by an app factory; served by waitress (see ``edge.serve``), never Flask's dev server.
"""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path
from typing import Any

from flask import Flask, jsonify, request
from flask_wtf.csrf import CSRFError, CSRFProtect

from .. import __version__

csrf = CSRFProtect()


KEY_BYTES = 32


def _secret_key(data_dir: Path) -> bytes:
    """A per-kit key kept in the data folder (0600), so sessions survive restarts.

    Written to a temp file, synced and renamed, so a crash leaves the old key or the new one,
    never an empty file; a key file that is empty or short anyway (an older kit, a damaged
    card) is replaced, which only logs the current users out."""
    path = data_dir / "secret_key"
    if path.is_file():
        key = path.read_bytes()
        if len(key) >= KEY_BYTES:
            return key
        logging.getLogger(__name__).warning(
            "%s holds %d bytes, not a key: making a new one (sessions restart)", path, len(key)
        )
    data_dir.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(KEY_BYTES)
    tmp = data_dir / f".secret_key.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return key


def create_app(pipeline: Any, cfg: Any, doctor: Any = None) -> Flask:
    """``pipeline``: a running :class:`edge.daemon.pipeline.Pipeline`; ``cfg``: its Config."""
    from . import api, auth, pages, stream
    from .metrics import metrics_view

    app = Flask(__name__)
    if cfg.web.trusted_proxies:
        # Behind a reverse proxy the client is in X-Forwarded-For (trusted only from the
        # configured number of proxies): the login rate limit must key on it, not on the proxy.
        from werkzeug.middleware.proxy_fix import ProxyFix

        # Flask's documented way to wrap the WSGI app.
        app.wsgi_app = ProxyFix(  # type: ignore[method-assign]
            app.wsgi_app, x_for=cfg.web.trusted_proxies)
    app.config.update(
        SECRET_KEY=_secret_key(cfg.data_dir),
        MAX_CONTENT_LENGTH=cfg.web.max_upload_mb * 1024 * 1024,
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Strict",
        WTF_CSRF_TIME_LIMIT=None,  # tied to the session instead
        JSON_SORT_KEYS=False,
    )
    app.extensions["fieldscope"] = {
        "pipeline": pipeline,
        "cfg": cfg,
        "doctor": doctor,
        "version": __version__,
    }
    from .hosts import allowed_names, host_allowed

    names = allowed_names(cfg.kit_id, cfg.web.allowed_hosts)

    @app.before_request
    def only_the_kits_names():
        if not host_allowed(request.host, names):
            return jsonify(error="this host name is not the kit's (see [web] allowed_hosts)"), 400
        return None

    csrf.init_app(app)
    auth.init(app, cfg, csrf)
    app.register_blueprint(auth.bp)
    app.register_blueprint(api.bp)
    app.register_blueprint(pages.bp)
    app.register_blueprint(stream.bp)
    app.add_url_rule("/metrics", "metrics", metrics_view)

    @app.after_request
    def security_headers(resp):
        resp.headers.setdefault(
            "Content-Security-Policy",
            "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; "
            "script-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
        )
        resp.headers.setdefault("X-Content-Type-Options", "nosniff")
        resp.headers.setdefault("X-Frame-Options", "DENY")
        resp.headers.setdefault("Referrer-Policy", "no-referrer")
        if request.endpoint != "static":
            # Patient images and results: never kept by a browser or a proxy (send_file's own
            # no-cache and ETag would let them be).
            resp.headers["Cache-Control"] = "no-store"
            resp.headers.pop("ETag", None)
            resp.headers.pop("Last-Modified", None)
        return resp

    def wants_json() -> bool:
        return (
            request.path.startswith("/api/") or request.accept_mimetypes.best == "application/json"
        )

    @app.errorhandler(CSRFError)
    def csrf_error(exc):
        msg = f"CSRF check failed: {exc.description}; GET /api/session for a token and send it "
        msg += "as the X-CSRFToken header"
        return (jsonify(error=msg), 400) if wants_json() else (msg, 400)

    @app.errorhandler(413)
    def too_large(exc):
        msg = f"upload larger than {cfg.web.max_upload_mb} MB"
        return (jsonify(error=msg), 413) if wants_json() else (msg, 413)

    @app.errorhandler(404)
    def not_found(exc):
        return (jsonify(error="not found"), 404) if wants_json() else ("not found", 404)

    @app.errorhandler(405)
    def not_allowed(exc):
        return jsonify(error="method not allowed"), 405

    @app.errorhandler(500)
    def server_error(exc):
        return jsonify(error="internal error; see the kit's log"), 500

    return app
