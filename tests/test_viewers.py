"""Many phones on the Live page: live views never take the threads the API needs.

Against the daemon as a process over real sockets (loopback): 20 MJPEG viewers attached and
receiving frames, while /api/health answers and an upload is stored; one viewer past the cap
is turned away with 503; viewers that leave give their slots back."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import threading
import time
import urllib.error
import urllib.request

from tests.daemon_helpers import Client
from tests.test_serve_e2e import start_daemon, wait_http

VIEWERS = 20


class Viewer(threading.Thread):
    """A raw-socket MJPEG client that counts the JPEG frames it receives until told to stop."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__(daemon=True)
        self.sock = socket.create_connection((host, port), timeout=30)
        self.sock.sendall(b"GET /stream.mjpg HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        self.frames = 0
        self.status = None
        self.stop = threading.Event()

    def run(self) -> None:
        buf = b""
        try:
            while not self.stop.is_set():
                chunk = self.sock.recv(65536)
                if not chunk:
                    return
                buf += chunk
                if self.status is None and b"\r\n" in buf:
                    self.status = int(buf.split(b" ", 2)[1])
                self.frames += buf.count(b"Content-Type: image/jpeg")
                buf = buf[-64:]
        except OSError:
            return

    def close(self) -> None:
        self.stop.set()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


def _wait(predicate, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_twenty_viewers_leave_the_api_and_uploads_working(tmp_path, blood_bundle, blood_samples):
    conf = tmp_path / "kit.toml"
    conf.write_text(f"[web]\nmax_streams = {VIEWERS}\nstream_fps = 10.0\n")
    proc, base = start_daemon(tmp_path, blood_bundle, blood_samples, args=("--config", str(conf)))
    port = int(base.rsplit(":", 1)[1])
    viewers: list[Viewer] = []
    try:
        wait_http(base + "/api/health")
        for _ in range(VIEWERS):
            v = Viewer("127.0.0.1", port)
            v.start()
            viewers.append(v)
        assert _wait(lambda: all(v.frames >= 1 for v in viewers), 60), [
            (v.status, v.frames) for v in viewers
        ]
        assert {v.status for v in viewers} == {200}

        t0 = time.monotonic()
        with urllib.request.urlopen(base + "/api/health", timeout=10) as r:
            health = json.loads(r.read())
        took = time.monotonic() - t0
        print(f"\n/api/health with {VIEWERS} viewers attached: {1000 * took:.0f} ms")
        assert health["inference"]["ok"] is True
        status, doc = Client(base).upload(blood_samples[0].read_bytes(), timeout=20)
        assert status == 201 and doc["id"] > 0

        # One more viewer than the cap: turned away, told when to retry.
        with urllib.request.urlopen(base + "/api/health", timeout=10):
            pass
        try:
            urllib.request.urlopen(base + "/stream.mjpg", timeout=10)
            raise AssertionError("a viewer past the cap was let in")
        except urllib.error.HTTPError as exc:
            assert exc.code == 503 and exc.headers["Retry-After"]
        # All viewers still receive frames.
        counts = [v.frames for v in viewers]
        assert _wait(lambda: all(v.frames > c for v, c in zip(viewers, counts, strict=True)), 30)

        # Viewers that leave give their slots back: a new one gets in.
        for v in viewers[:5]:
            v.close()
        late = None
        end = time.monotonic() + 30
        while late is None and time.monotonic() < end:
            try:
                late = urllib.request.urlopen(base + "/stream.mjpg", timeout=10)
            except urllib.error.HTTPError:
                time.sleep(0.5)
        assert late is not None and late.status == 200
        assert b"\xff\xd8" in late.read(65536)
        late.close()
    finally:
        for v in viewers:
            v.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def test_viewers_that_leave_during_a_camera_outage_give_their_slots_back(
    tmp_path, blood_bundle, blood_samples
):
    """The camera is out (a USB camera that is not there): two viewers, the cap, connect and
    leave; the keep-alive part reveals they are gone, so the third gets 200, and it receives
    a (placeholder) frame although the camera has none."""
    conf = tmp_path / "kit.toml"
    conf.write_text("[web]\nmax_streams = 2\nstream_fps = 10.0\n")
    proc, base = start_daemon(tmp_path, blood_bundle, blood_samples,
                              args=("--config", str(conf)), source="v4l2:/dev/video-none")
    port = int(base.rsplit(":", 1)[1])
    try:
        wait_http(base + "/api/session")
        first = [Viewer("127.0.0.1", port) for _ in range(2)]
        for v in first:
            v.start()
        assert _wait(lambda: all(v.status == 200 for v in first), 20)
        for v in first:
            v.close()
        late = None
        end = time.monotonic() + 20
        while late is None and time.monotonic() < end:
            try:
                late = urllib.request.urlopen(base + "/stream.mjpg", timeout=10)
            except urllib.error.HTTPError as exc:
                assert exc.code == 503
                time.sleep(0.5)
        assert late is not None and late.status == 200
        assert b"\xff\xd8" in late.read(4096)
        late.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
