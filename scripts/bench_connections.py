#!/usr/bin/env python3
"""The kit under a connection flood on loopback: idle sockets and slowloris senders, while a
phone checks health, uploads and watches the live view.

Starts the shipped demo (``scripts/demo.toml``) as a process, then for ``--seconds`` holds
``--idle`` connections that send nothing and ``--slow`` that trickle one header byte a second,
from other loopback addresses (127.0.0.10 and up; each closed one is opened again), while from
127.0.0.1 it asks ``/api/health`` every 0.25 s, uploads a sample (with its session's CSRF
token) and keeps ``--viewers`` live views open. Prints the slowest health answer, the upload's
answer and the frames each viewer got; exits 1 when health took 1 s or more, the upload failed
or a viewer starved. Every address is on loopback and every loop is bounded in time.

Usage: python scripts/bench_connections.py [--idle 300] [--slow 100] [--viewers 20]
       [--seconds 60]
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _open(port: int, source: str) -> socket.socket | None:
    s = socket.socket()
    s.setblocking(False)
    try:
        s.bind((source, 0))
        s.connect_ex(("127.0.0.1", port))
    except OSError:
        s.close()
        return None
    return s


def flood(port: int, idle: int, slow: int, seconds: float, stats: dict) -> None:
    """Hold ``idle`` silent and ``slow`` trickling connections until ``seconds`` pass."""
    sel = selectors.DefaultSelector()
    sources = [f"127.0.0.{10 + i}" for i in range(max(1, (idle + slow) // 30 + 1))]
    want = [("idle", sources[i % len(sources)]) for i in range(idle)]
    want += [("slow", sources[-1 - i % len(sources)]) for i in range(slow)]
    socks: dict[socket.socket, tuple[str, str]] = {}
    header = b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-a: "
    sent: dict[socket.socket, int] = {}
    end = time.monotonic() + seconds
    last_trickle = 0.0
    while time.monotonic() < end:
        for kind, src in want[len(socks):]:  # (re)open up to the wanted count
            s = _open(port, src)
            if s is None:
                continue
            socks[s] = (kind, src)
            sent[s] = 0
            sel.register(s, selectors.EVENT_READ)
            stats["opened"] += 1
        for key, _ in sel.select(timeout=0.2):  # readable: the server closed it (or answered)
            s = key.fileobj
            try:
                data = s.recv(4096)
            except OSError:
                data = b""
            if not data:
                sel.unregister(s)
                s.close()
                socks.pop(s, None)
                stats["closed_by_server"] += 1
        now = time.monotonic()
        if now - last_trickle >= 1.0:  # one more header byte a second
            last_trickle = now
            for s, (kind, _) in list(socks.items()):
                if kind != "slow":
                    continue
                chunk = header[sent[s]:sent[s] + 1] if sent[s] < len(header) else b"x"
                try:
                    s.send(chunk)
                    sent[s] += 1
                except OSError:
                    pass
        stats["held_max"] = max(stats["held_max"], len(socks))
        want_total = len(want)
        if len(socks) > want_total:
            break
    for s in list(socks):
        sel.unregister(s)
        s.close()


def viewer(base: str, seconds: float, counts: list, i: int) -> None:
    """A live view: counts the JPEG parts it receives, per second of the run."""
    end = time.monotonic() + seconds
    try:
        with urllib.request.urlopen(base + "/stream.mjpg", timeout=10) as r:
            while time.monotonic() < end:
                chunk = r.read1(65536)
                if not chunk:
                    break
                counts[i].append((time.monotonic(), chunk.count(b"Content-Type: image/jpeg")))
    except OSError as exc:
        counts[i].append((time.monotonic(), -1))
        print(f"viewer {i}: {exc}")


def run(base: str, port: int, idle: int, slow: int, viewers: int, seconds: float) -> dict:
    import http.cookiejar

    stats = {"opened": 0, "closed_by_server": 0, "held_max": 0}
    counts: list[list] = [[] for _ in range(viewers)]
    views = [threading.Thread(target=viewer, args=(base, seconds + 4, counts, i))
             for i in range(viewers)]
    for t in views:
        t.start()
    time.sleep(2)
    attack = threading.Thread(target=flood, args=(port, idle, slow, seconds, stats))
    started = time.monotonic()
    attack.start()
    time.sleep(min(5.0, seconds / 3))  # let the flood fill up first
    opener = urllib.request.build_opener(
        urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
    health: list[float] = []
    upload_status = None
    sample = sorted((ROOT / "models" / "blood-smear" / "samples").glob("*.jpg"))[0].read_bytes()
    while attack.is_alive():
        t0 = time.monotonic()
        try:
            with opener.open(base + "/api/health", timeout=10) as r:
                r.read()
            health.append(time.monotonic() - t0)
        except OSError:
            health.append(float("inf"))
        if upload_status is None and time.monotonic() - started > seconds / 2:
            with opener.open(base + "/api/session", timeout=10) as r:
                token = json.loads(r.read())["csrf_token"]
            body = (b"--b\r\nContent-Disposition: form-data; name=\"image\"; filename=\"s.jpg\""
                    b"\r\nContent-Type: image/jpeg\r\n\r\n" + sample + b"\r\n--b--\r\n")
            req = urllib.request.Request(base + "/api/classify", data=body, method="POST",
                                         headers={"Content-Type": "multipart/form-data; "
                                                  "boundary=b", "X-CSRFToken": token})
            try:
                with opener.open(req, timeout=10) as r:
                    upload_status = r.status
            except OSError as exc:
                upload_status = getattr(exc, "code", -1)
        time.sleep(0.25)
    attack.join()
    for t in views:
        t.join()
    window = (started + 2, started + seconds)
    frames = [sum(n for at, n in c if window[0] <= at <= window[1] and n > 0) for c in counts]
    return {"health_max_s": max(health) if health else None, "health_n": len(health),
            "upload": upload_status, "viewer_frames_min": min(frames) if frames else None,
            "viewer_frames": frames, **stats}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--idle", type=int, default=300)
    p.add_argument("--slow", type=int, default=100)
    p.add_argument("--viewers", type=int, default=20)
    p.add_argument("--seconds", type=float, default=60)
    args = p.parse_args()
    from edge import hardware

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as data_dir:
        proc = subprocess.Popen(
            [sys.executable, "-m", "edge", "serve", "--config", str(ROOT / "scripts/demo.toml"),
             "--port", str(port), "--data-dir", data_dir],
            cwd=ROOT, env={**os.environ}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        base = f"http://127.0.0.1:{port}"
        try:
            for _ in range(300):
                try:
                    urllib.request.urlopen(base + "/api/health", timeout=2)
                    break
                except OSError:
                    time.sleep(0.2)
            r = run(base, port, args.idle, args.slow, args.viewers, args.seconds)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    print(hardware.machine_line())
    print(f"{args.idle} idle + {args.slow} slowloris connections for {args.seconds:.0f} s "
          f"(opened {r['opened']}, closed by the kit {r['closed_by_server']}, at most "
          f"{r['held_max']} held at once); /api/health slowest {r['health_max_s']:.3f} s over "
          f"{r['health_n']} asks; upload {r['upload']}; live views: fewest frames "
          f"{r['viewer_frames_min']} of {args.viewers} viewers")
    ok = r["health_max_s"] < 1.0 and r["upload"] == 201 and r["viewer_frames_min"] > 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
