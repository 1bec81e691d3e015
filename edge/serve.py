"""``python -m edge serve``: the daemon. Pipeline threads + the web app on waitress.

SIGTERM/SIGINT stop it cleanly (well within systemd's 5 s); under systemd it speaks the notify
protocol. A configuration or model error at start-up, when running as a service, serves a
minimal error page instead of crash-looping, so the person at the kit can read what is wrong.
"""

from __future__ import annotations

import html
import logging
import os
import signal
import sys
import threading
from typing import Any

from .config import Config
from .daemon import notify
from .errors import FieldScopeError

log = logging.getLogger("edge.serve")


def open_classifier(cfg: Config):
    """The configured bundle, or the previous good one (imported late: the error page must
    start even where the model runtime cannot be imported)."""
    from .daemon.profiles import open_classifier as opener

    return opener(cfg)


def build(cfg: Config, profile: str | None = None):
    """The store, the pipeline on its starting profile, and the web app.

    The starting profile: ``profile`` (the command line's --profile), else the one last chosen
    on the page (kept in the store), else the config's ``[profiles] default``, else the first."""
    from contextlib import ExitStack

    from .daemon.outbox import Outbox
    from .daemon.pipeline import Pipeline
    from .daemon.profiles import ProfileBundles, open_profile
    from .daemon.store import Store
    from .outbound import Delivery
    from .web import create_app

    # Everything opened here is closed again if a later step fails (a bad web option, a model
    # that loads and a camera that does not construct): nothing is left open behind an error.
    with ExitStack() as opened:
        store = Store(cfg.data_dir, cfg.storage.retention_days, cfg.storage.min_free_mb)
        opened.callback(store.close)
        # Before anything is saved: every result from now on queues its messages.
        outbox = Outbox(store, cfg.destinations, cfg.outbox.max_age_days,
                        cfg.outbox.max_messages)
        known = cfg.all_profiles()
        if profile is not None and profile not in known:
            cfg.for_profile(profile)  # raises the ConfigError naming the profiles
        remembered = store.setting("profile")
        start = profile or (remembered if remembered in known else cfg.first_profile())
        store.enforce_retention()
        # An export reads the data folder alone (no config): it finds the kit's id and each
        # profile's bundle here.
        store.set_setting("kit_id", cfg.kit_id)
        for pid in known:
            store.set_setting(f"bundle:{pid}", str(cfg.for_profile(pid).bundle_path))
        run_cfg = cfg.for_profile(start)
        classifier, source = open_profile(run_cfg)
        opened.callback(classifier.close)
        opened.callback(source.close)
        # In order, each handed what it needs: no part is patched into another afterwards.
        bundles = ProfileBundles(cfg)
        delivery = Delivery(cfg, store, outbox, bundles)
        pipeline = Pipeline(run_cfg, classifier, source, store, opener=open_profile,
                            delivery=delivery, bundles=bundles)
        app = create_app(pipeline, cfg)
        opened.pop_all()  # all built: the caller owns them now
    return pipeline, app, store


def make_server(app: Any, host: str, port: int, threads: int, limits: Any = None) -> Any:
    """A waitress server tuned for the kit, behind the connection guard (edge/web/guard.py).

    ``outbuf_high_watermark``: waitress keeps a streaming response's sent bytes in one buffer
    until it reaches this size (16 MB by default), so every MJPEG viewer would hold up to 16 MB;
    256 KB bounds that (measured: +7 MB per 90 s with two viewers before, flat after).
    ``cleanup_interval`` 1 s: the guard's header deadline is checked that often.
    ``max_request_body_size``: waitress spools a body to a temp file (on the SD card, with the
    unit's PrivateTmp) before the app sees it, up to 1 GB by default; the guard's body cap
    refuses more than an upload may be at once.
    """
    from waitress import create_server

    from .web.guard import Limits, guard

    limits = limits or Limits()
    server = create_server(app, host=host, port=port, threads=threads, ident="fieldscope",
                           channel_timeout=30, cleanup_interval=1,
                           connection_limit=limits.limit + 16,
                           max_request_body_size=limits.max_body_bytes,
                           outbuf_high_watermark=256 * 1024)
    return guard(server, limits)


def _serve_app(app: Any, host: str, port: int, threads: int, on_ready=None,
               limits: Any = None, must_end: Any = None) -> None:
    """Serve until SIGTERM/SIGINT, or until `must_end()` is true (checked every second, so
    the answer that said why has gone out first)."""
    try:
        server = make_server(app, host, port, threads, limits)
    except OSError as exc:
        raise FieldScopeError(
            f"cannot listen on {host}:{port}: {exc.strerror}",
            "another FieldScope may be running; stop it or use --port",
        ) from exc
    stop = threading.Event()

    def handle(signum, _frame):
        log.info("signal %d: stopping", signum)
        notify.notify("STOPPING=1")
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    thread = threading.Thread(target=server.run, name="waitress", daemon=True)
    thread.start()
    log.info("serving on http://%s:%s", host, server.effective_port)
    print(f"FieldScope on http://{host}:{server.effective_port}", flush=True)
    if on_ready:
        on_ready()
    while not stop.wait(1.0):
        if must_end is not None and must_end():
            notify.notify("STOPPING=1")
            break
    server.close()


def error_page_app(message: str):
    """A minimal page and health endpoint saying why the kit could not start."""
    from flask import Flask, jsonify

    app = Flask(__name__)

    @app.get("/api/health")
    def health():
        return jsonify(status="error", error=message), 503

    @app.get("/", defaults={"path": ""})
    @app.get("/<path:path>")
    def page(path):
        body = (
            f"<!doctype html><meta charset=utf-8><title>FieldScope: not started</title>"
            f"<h1>FieldScope could not start</h1><pre>{html.escape(message)}</pre>"
            "<p>Fix /etc/fieldscope/fieldscope.toml (or the model), then "
            "<code>sudo systemctl restart fieldscope</code>.</p>"
        )
        return body, 503, {"Content-Type": "text/html; charset=utf-8"}

    return app


def return_freed_memory() -> bool:
    """Make glibc give freed image buffers back to the system (Linux; False elsewhere).

    A decoded upload is tens to hundreds of MB, freed a moment later. glibc raises its mmap
    threshold after each such free, so later buffers come from per-thread heaps that never
    shrink: eight uploads left the daemon at 2.2 GB though at most 256 MB of pixels existed at
    once (scripts/bench_upload_memory.py). A fixed threshold (128 KB) and two arenas keep
    large buffers mmapped, returned on free.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(name)
        m_mmap_threshold, m_arena_max = -3, -8
        return bool(libc.mallopt(m_mmap_threshold, 128 * 1024)) and bool(
            libc.mallopt(m_arena_max, 2))
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False


def serve(cfg: Config, profile: str | None = None) -> int:
    # A write limit (RLIMIT_FSIZE) must be an error we handle, not a fatal signal.
    if hasattr(signal, "SIGXFSZ"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    if not return_freed_memory():
        log.info("glibc's mallopt is not available: freed image memory may stay resident")
    pipeline, app, store = build(cfg, profile)
    pipeline.start()
    try:
        # Live views hold a thread each for their whole life: they get their own, on top of
        # the threads reserved for pages and the API (the stream's cap keeps them within).
        from .web.guard import FORM_ROOM_BYTES, Limits

        # The body cap: the largest upload plus room for the rest of its form (the app then
        # answers 413 itself, in JSON, for one just over the limit).
        limits = Limits(cfg.web.connection_limit, cfg.web.per_client_connections,
                        cfg.web.header_timeout_s,
                        max_body_bytes=cfg.web.max_upload_mb * 1024 * 1024 + FORM_ROOM_BYTES)
        _serve_app(app, cfg.web.host, cfg.web.port, cfg.web.threads + cfg.web.max_streams,
                   limits=limits, must_end=lambda: pipeline.fatal is not None)
    finally:
        pipeline.stop()
        store.close()
        log.info("stopped")
    if pipeline.fatal:
        log.critical("stopped with an error: %s", pipeline.fatal)
        return 1
    return 0


def serve_error(message: str, host: str, port: int) -> int:
    """Serve the error page until stopped; under a systemd watchdog, keep pinging it (the
    unit would otherwise be killed every WatchdogSec and end 'failed' after its restarts)."""
    log.error("%s", message)
    notify.notify(f"READY=1\nSTATUS=configuration error: {message[:200]}")
    stop = threading.Event()
    interval = notify.watchdog_interval()
    if interval:

        def ping() -> None:
            while not stop.wait(interval):
                notify.notify("WATCHDOG=1")

        threading.Thread(target=ping, name="watchdog", daemon=True).start()
    try:
        _serve_app(error_page_app(message), host, port, threads=2)
    finally:
        stop.set()
    return 1


def running_as_service() -> bool:
    return bool(os.environ.get("INVOCATION_ID") or os.environ.get("NOTIFY_SOCKET"))
