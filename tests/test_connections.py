"""Connections bounded, against the real server over sockets (loopback, bounded counts and
time): a trickle cannot extend the header deadline, one address cannot hold more than its
share, and a flood of idle and slowloris connections does not stop health, uploads or live
views."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.daemon_helpers import free_port, replay_folder

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from bench_connections import run  # noqa: E402


def _start(tmp_path, blood_bundle, blood_samples, web: str):
    replay = replay_folder(tmp_path / "replay", blood_samples[:4])
    port = free_port()
    cfg = tmp_path / "kit.toml"
    cfg.write_text(
        f'[model]\nbundle = "{blood_bundle}"\nthreads = 1\n'
        f'[source]\nkind = "replay"\npath = "{replay}"\nfps = 5\n'
        f'[storage]\ndata_dir = "{tmp_path / "data"}"\n'
        f"[web]\n{web}\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("NOTIFY_SOCKET", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge", "serve", "--config", str(cfg), "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(base + "/api/health", timeout=2)
            break
        except OSError:
            assert time.monotonic() < deadline, "the daemon did not start"
            time.sleep(0.2)
    return proc, base, port


@pytest.fixture
def kit(tmp_path, blood_bundle, blood_samples):
    """The daemon as a process with a small header deadline and per-client cap."""
    proc, base, port = _start(tmp_path, blood_bundle, blood_samples,
                              "header_timeout_s = 2\nper_client_connections = 4\n"
                              "connection_limit = 60")
    yield base, port
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture
def small_kit(tmp_path, blood_bundle, blood_samples):
    """A kit whose connection limit a flood fills several times over."""
    proc, base, port = _start(tmp_path, blood_bundle, blood_samples,
                              "header_timeout_s = 2\nconnection_limit = 60")
    yield base, port
    proc.terminate()
    proc.wait(timeout=30)


def _connect(port: int, source: str) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    return s


def _closed_within(s: socket.socket, seconds: float, trickle: bytes = b"") -> float | None:
    """Seconds until the server closed ``s`` (sending one byte of ``trickle`` every 0.5 s),
    or None if it stayed open."""
    t0 = time.monotonic()
    s.settimeout(0.5)
    i = 0
    while time.monotonic() - t0 < seconds:
        if trickle:
            try:
                s.send(trickle[i % len(trickle):i % len(trickle) + 1])
                i += 1
            except OSError:
                return time.monotonic() - t0
        try:
            if s.recv(4096) == b"":
                return time.monotonic() - t0
        except TimeoutError:
            continue
        except OSError:
            return time.monotonic() - t0
    return None


def test_a_trickled_request_is_closed_at_the_header_deadline(kit):
    _, port = kit
    s = _connect(port, "127.0.0.7")
    took = _closed_within(s, 8, trickle=b"GET /api/health HTTP/1.1\r\nX-slow: " + b"a" * 64)
    s.close()
    assert took is not None and took < 2 + 2.5, took  # deadline 2 s, checked every second
    silent = _connect(port, "127.0.0.8")
    took = _closed_within(silent, 8)
    silent.close()
    assert took is not None and took < 4.5, took


def _read_status(s: socket.socket, seconds: float = 5) -> bytes:
    """The status line of the server's answer on ``s`` (b"" if it closed first)."""
    s.settimeout(seconds)
    data = b""
    while b"\r\n" not in data:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    return data.split(b"\r\n", 1)[0]


def test_a_kept_alive_connection_that_asks_nothing_more_is_closed(kit):
    """After its answer, a connection that sends nothing more waits like a silent one: closed
    at the header deadline, not held (refreshing waitress's 30 s timeout) until the cap."""
    _, port = kit
    s = _connect(port, "127.0.0.10")
    s.sendall(b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert _read_status(s).startswith(b"HTTP/1.1 200")
    s.settimeout(0.2)
    with contextlib.suppress(TimeoutError):
        s.recv(65536)  # the rest of the answer, if it came apart (never waiting for a close)
    took = _closed_within(s, 8)
    assert took is None or took > 0.5, took  # open while it was answered, closed after
    s.close()
    assert took is not None and took < 2 + 2.5, took


def test_a_trickled_body_is_closed_and_one_on_pace_is_served(kit):
    _, port = kit
    head = b"POST /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n\r\n"
    slow = _connect(port, "127.0.0.11")
    slow.sendall(head)
    took = _closed_within(slow, 10, trickle=b"a")  # 2 bytes a second, past the deadline
    slow.close()
    assert took is not None and took < 2 + 2.5, took
    # 40 KB/s for 3 s, past the deadline: on pace, so the whole body arrives and is answered
    # (by the app: a 400, as the POST has no CSRF token).
    steady = _connect(port, "127.0.0.12")
    steady.sendall(head.replace(b"100000", b"120000"))
    for _ in range(30):
        steady.sendall(b"a" * 4000)
        time.sleep(0.1)
    assert _read_status(steady).startswith(b"HTTP/1.1 400")
    steady.close()


def test_a_body_over_the_upload_limit_is_refused_before_it_is_sent(kit):
    """waitress would spool up to 1 GB per request to a temp file before the app's 413; the
    cap answers 413 from the Content-Length alone."""
    _, port = kit
    s = _connect(port, "127.0.0.13")
    s.sendall(b"POST /api/upload HTTP/1.1\r\nHost: 127.0.0.1\r\n"
              b"Content-Length: 300000000\r\n\r\n")
    assert _read_status(s, 3).startswith(b"HTTP/1.1 413")
    s.close()


def test_one_address_holds_at_most_its_share(kit):
    base, port = kit
    held = [_connect(port, "127.0.0.9") for _ in range(4)]
    extra = _connect(port, "127.0.0.9")
    took = _closed_within(extra, 1.5)
    assert took is not None and took < 1.0
    # Another address is unaffected.
    with urllib.request.urlopen(base + "/api/health", timeout=5) as r:
        assert r.status == 200
    for s in held + [extra]:
        s.close()


def test_a_flood_of_idle_and_slowloris_connections_does_not_stop_the_kit(small_kit):
    base, port = small_kit
    r = run(base, port, idle=300, slow=100, viewers=5, seconds=12)
    assert r["held_max"] >= 60, r  # the flood really filled the kit
    assert r["health_max_s"] < 1.0, r
    assert r["upload"] == 201, r
    assert r["viewer_frames_min"] > 0, r
