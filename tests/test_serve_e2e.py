"""The daemon as a process: real sockets against waitress, systemd notify, SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.daemon_helpers import free_port, poll, replay_folder, stop_limit_s

ROOT = Path(__file__).resolve().parent.parent


def get(url: str, timeout: float = 5.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.headers, r.read()


def wait_http(url: str, timeout: float = 60.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            return get(url)
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"{url} did not answer")


@pytest.fixture
def notify_socket(tmp_path):
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(0.2)
    yield path, sock
    sock.close()


def start_daemon(tmp_path, bundle, samples, extra_env=None, args=(), source=None):
    """The daemon as a process on a free port; ``source`` defaults to a replay of ``samples``."""
    port = free_port()
    if source is None:
        source = f"replay:{replay_folder(tmp_path / 'replay', samples[:4])}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(extra_env or {})}
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge", "serve", "--model", str(bundle), "--source", source,
         "--port", str(port), "--data-dir", str(tmp_path / "data"), "--threads", "1", *args],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, f"http://127.0.0.1:{port}"


def drain(sock, limit_s: float = 30.0) -> list[str]:
    """What the socket holds now (it has a short timeout), read for at most ``limit_s``."""
    out = []
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        try:
            out.append(sock.recv(4096).decode())
        except TimeoutError:
            return out
    return out


def test_daemon_serves_notifies_and_stops_on_sigterm(
    tmp_path, blood_bundle, blood_samples, notify_socket
):
    path, sock = notify_socket
    proc, base = start_daemon(
        tmp_path, blood_bundle, blood_samples, {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000"}
    )
    try:
        status, headers, body = wait_http(base + "/api/health")
        assert status == 200 and json.loads(body)["status"] == "ok"
        # results arrive over a real socket
        end = time.monotonic() + 30
        while time.monotonic() < end:
            st = json.loads(get(base + "/api/status")[2])
            if st["frames_classified"] >= 3:
                break
            time.sleep(0.2)
        assert st["last_result"]["label"] in ("Benign", "Early", "Pre", "Pro")
        # the MJPEG stream yields JPEG frames
        with urllib.request.urlopen(base + "/stream.mjpg", timeout=10) as r:
            assert r.headers["Content-Type"].startswith("multipart/x-mixed-replace")
            chunk = r.read(4096)
            assert b"Content-Type: image/jpeg" in chunk and b"\xff\xd8" in chunk
        time.sleep(1.5)
        messages = drain(sock)
        assert any(m.startswith("READY=1") for m in messages), messages
        assert "WATCHDOG=1" in messages
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        assert time.monotonic() - t0 < stop_limit_s()  # before systemd would kill it
        assert proc.returncode == 0
        assert "STOPPING=1" in drain(sock)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_config_error_under_systemd_serves_an_error_page(tmp_path, notify_socket):
    """Under systemd with WatchdogSec (WATCHDOG_USEC) the error page keeps the watchdog fed:
    it is still up after three watchdog periods, with pings all along."""
    path, sock = notify_socket
    proc, base = start_daemon(tmp_path, tmp_path / "no-such-bundle", [],
                              {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000"},
                              source=f"replay:{tmp_path}")
    try:
        end = time.monotonic() + 60
        while True:
            try:
                get(base + "/")
            except urllib.error.HTTPError as exc:
                assert exc.code == 503
                page = exc.read().decode()
                break
            except OSError:
                assert time.monotonic() < end and proc.poll() is None
                time.sleep(0.2)
        assert "could not start" in page and "model bundle not found" in page
        first = drain(sock)
        assert any("STATUS=configuration error" in m for m in first)
        time.sleep(3.0)  # three watchdog periods of 1 s
        assert proc.poll() is None
        pings = [m for m in first + drain(sock) if m == "WATCHDOG=1"]
        # one every 0.5 s is due; a loaded machine may delay some, never all
        assert len(pings) >= 3, pings
        try:
            get(base + "/")
            raise AssertionError("the error page answered 200: it must say 503")
        except urllib.error.HTTPError as exc:
            assert exc.code == 503
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_error_page_flag_serves_the_reason_outside_systemd(tmp_path):
    """`--error-page` in a terminal (no systemd): a start-up error is served as a 503 page and
    health saying why, instead of a one-line exit; SIGTERM ends it cleanly."""
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "INVOCATION_ID")}
    env = {**env, "PYTHONPATH": str(ROOT)}
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge", "serve", "--model", str(tmp_path / "no-such-bundle"),
         "--source", f"replay:{tmp_path}", "--port", str(port), "--error-page"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        seen: list[tuple[int, dict]] = []

        def health() -> bool:
            try:
                get(base + "/api/health")
                seen.append((200, {}))
            except urllib.error.HTTPError as exc:
                seen.append((exc.code, json.loads(exc.read())))
            except OSError:
                return proc.poll() is not None  # not up yet, unless it has exited
            return True

        assert poll(health, 60, every=0.2) and seen, "the error page never answered"
        code, body = seen[-1]
        assert code == 503 and body["status"] == "error"
        assert "model bundle not found" in body["error"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 1  # still a failed start, for whoever runs it
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_error_page_binds_where_the_config_says(tmp_path):
    """A model error with a valid config: the page listens on [web] host and port."""
    from edge.cli import _where_to_serve, build_parser

    conf = tmp_path / "kit.toml"
    conf.write_text('[web]\nhost = "0.0.0.0"\nport = 8123\n[model]\nbundle = "/nope"\n')
    args = build_parser().parse_args(["serve", "--config", str(conf)])
    assert _where_to_serve(args, None) == ("0.0.0.0", 8123)
    bad = tmp_path / "bad.toml"
    bad.write_text('[web]\nhost = "0.0.0.0"\n[nonsense]\nx = 1\n')
    args = build_parser().parse_args(["serve", "--config", str(bad), "--port", "9000"])
    assert _where_to_serve(args, None) == ("0.0.0.0", 9000)
    args = build_parser().parse_args(["serve"])
    assert _where_to_serve(args, None) == ("127.0.0.1", 8080)


def test_config_error_in_a_terminal_is_one_line(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "edge",
            "serve",
            "--host",
            "0.0.0.0",
            "--source",
            f"replay:{tmp_path}",
        ],
        cwd=ROOT,
        env={
            k: v
            for k, v in os.environ.items()
            if k not in ("NOTIFY_SOCKET", "INVOCATION_ID", "FIELDSCOPE_PASSWORD")
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "needs a password" in proc.stderr and "Traceback" not in proc.stderr


def test_without_a_camera_the_kit_is_ready_and_says_so(tmp_path, blood_bundle, notify_socket):
    """A camera missing at boot must not keep systemd waiting for READY (a restart loop)."""
    path, sock = notify_socket
    proc, base = start_daemon(tmp_path, blood_bundle, [], {"NOTIFY_SOCKET": path},
                              source=f"replay:{tmp_path / 'unplugged'}")
    try:
        status, _, body = wait_http(base + "/api/health")
        health = json.loads(body)
        assert status == 200 and health["status"] == "degraded"
        assert health["camera"]["state"] == "lost"
        assert str(tmp_path) not in body.decode()  # no paths to an unauthenticated caller
        status = json.loads(get(base + "/api/status")[2])
        assert "does not exist" in status["camera"]["error"]
        time.sleep(0.5)
        assert any(m.startswith("READY=1") and "camera lost" in m for m in drain(sock))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)


def test_a_start_that_fails_late_closes_what_it_opened(tmp_path, blood_bundle, blood_samples,
                                                      monkeypatch):
    """The web app fails to build after the store, the model and the camera exist: the store
    and the model are closed again (no open database, no held Edge TPU behind the error)."""
    import edge.web
    from edge.daemon.store import Store
    from edge.inference.classifier import Classifier
    from edge.serve import build
    from tests.daemon_helpers import make_config

    cfg = make_config(blood_bundle, replay_folder(tmp_path / "r", blood_samples[:2]),
                      tmp_path / "data")
    closed: list[str] = []
    real_store_close, real_clf_close = Store.close, Classifier.close
    monkeypatch.setattr(Store, "close", lambda self: (closed.append("store"),
                                                      real_store_close(self)))
    monkeypatch.setattr(Classifier, "close", lambda self: (closed.append("model"),
                                                           real_clf_close(self)))

    def broken_app(*args, **kwargs):
        raise RuntimeError("web layer failed")

    monkeypatch.setattr(edge.web, "create_app", broken_app)
    with pytest.raises(RuntimeError, match="web layer failed"):
        build(cfg)
    assert sorted(closed) == ["model", "store"]
