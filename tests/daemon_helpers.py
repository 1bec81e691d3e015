"""Helpers for daemon tests: a config on a replay folder, a started pipeline, a free port."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

from edge.config import load_config


def stop_limit_s() -> float:
    """systemd's TimeoutStopSec from the shipped unit: a stop slower than this is killed."""
    unit = Path(__file__).resolve().parent.parent / "systemd" / "fieldscope.service"
    for line in unit.read_text().splitlines():
        if line.startswith("TimeoutStopSec="):
            return float(line.split("=", 1)[1])
    raise AssertionError("TimeoutStopSec is missing from the unit")


def start_demo(tmp_path: Path):
    """The shipped demo as the README runs it: a copy of the checkout's config and models, the
    daemon started there with ``--config scripts/demo.toml`` (relative paths, that working
    directory). Returns (process, base URL, the copy's folder)."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    work = tmp_path / "checkout"
    (work / "scripts").mkdir(parents=True)
    shutil.copy(root / "scripts" / "demo.toml", work / "scripts" / "demo.toml")
    shutil.copytree(root / "models", work / "models")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(root)}
    env.pop("NOTIFY_SOCKET", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge", "serve", "--config", "scripts/demo.toml", "--port",
         str(port)],
        cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    return proc, f"http://127.0.0.1:{port}", work


def eventually(check, timeout: float, what=None):
    """Poll ``check()`` until it returns something true (returned); fail after ``timeout``
    seconds with ``what()`` (what was seen) in the message."""
    import time

    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, what() if what else f"not within {timeout} s"
        time.sleep(0.05)
    return value


def poll(done, timeout: float, every: float = 0.02) -> bool:
    """Wait until ``done()`` is true or ``timeout`` seconds pass; returns whether it came true.
    Unlike :func:`eventually` it never raises, so a test can stop its threads before it
    asserts."""
    import time

    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() >= deadline:
            return False
        time.sleep(every)
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def replay_folder(dest: Path, images: list[Path]) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for img in images:
        shutil.copy(img, dest / img.name)
    return dest


def make_config(bundle: Path, replay: Path, data_dir: Path, **overrides):
    base = {
        "model.bundle": str(bundle),
        "model.threads": 1,
        "source.kind": "replay",
        "source.path": str(replay),
        "source.fps": 20.0,
        "storage.data_dir": str(data_dir),
        "pipeline.store_every_s": 0.0,
    }
    base.update(overrides)
    return load_config(None, base)


class Client:
    """A tiny HTTP client with a cookie jar and the CSRF token, for tests against a process."""

    def __init__(self, base: str) -> None:
        import http.cookiejar
        import json
        import urllib.request

        self.base = base
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar))
        with self.opener.open(base + "/api/session", timeout=10) as r:
            self.token = json.loads(r.read())["csrf_token"]

    def get_json(self, path: str):
        import json

        with self.opener.open(self.base + path, timeout=10) as r:
            return r.status, json.loads(r.read())

    def post_json(self, path: str, doc: dict, timeout: float = 30):
        """POST a JSON body with the session's CSRF token; returns (status, json)."""
        import json
        import urllib.error
        import urllib.request

        req = urllib.request.Request(
            self.base + path, data=json.dumps(doc).encode(), method="POST",
            headers={"Content-Type": "application/json", "X-CSRFToken": self.token},
        )
        try:
            with self.opener.open(req, timeout=timeout) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")

    def upload(self, data: bytes, sample_code: str | None = None, timeout: float = 30):
        """POST /api/classify; returns (status, json)."""
        import json
        import urllib.error
        import urllib.request
        import uuid

        boundary = uuid.uuid4().hex
        parts = [
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; '
            f'filename="f.jpg"\r\nContent-Type: image/jpeg\r\n\r\n'.encode()
            + data
        ]
        if sample_code:
            parts.append(
                f"--{boundary}\r\nContent-Disposition: form-data; "
                f'name="sample_code"\r\n\r\n{sample_code}'.encode()
            )
        body = b"\r\n".join(parts) + f"\r\n--{boundary}--\r\n".encode()
        req = urllib.request.Request(
            self.base + "/api/classify",
            data=body,
            method="POST",
            headers={
                "Content-Type": f"multipart/form-data; boundary={boundary}",
                "X-CSRFToken": self.token,
            },
        )
        try:
            with self.opener.open(req, timeout=timeout) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")
