"""The shipped demo configuration, run the way the README runs it (``make demo``: the working
directory is the checkout, the config's paths are relative): every page, the model card's plots,
a captured sample, its page and its report answer, and every image on them loads."""

from __future__ import annotations

import re
import signal
import urllib.error
import urllib.request
from pathlib import Path

from tests.daemon_helpers import Client, start_demo
from tests.test_serve_e2e import wait_http

ROOT = Path(__file__).resolve().parent.parent


def test_demo_config_paths_are_relative_to_the_config_file(tmp_path, monkeypatch):
    from edge.config import load_config

    monkeypatch.chdir(tmp_path)  # anywhere but the checkout
    cfg = load_config(ROOT / "scripts" / "demo.toml", {"storage.data_dir": "mine"})
    for pid, model in (("blood-smear", "blood-smear"), ("skin", "skin-lesion")):
        run = cfg.for_profile(pid)
        assert run.bundle_path == ROOT / "models" / model
        assert Path(run.source.path) == ROOT / "models" / model / "samples"
    assert cfg.data_dir == tmp_path / "mine"  # a command-line path: the working directory


def _get(url: str) -> tuple[int, bytes, str]:
    try:
        with urllib.request.urlopen(url, timeout=20) as r:
            return r.status, r.read(), r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), exc.headers.get("Content-Type", "")


def test_shipped_demo_has_no_broken_page_or_image(tmp_path):
    proc, base, work = start_demo(tmp_path)
    try:
        wait_http(base + "/api/health")
        client = Client(base)
        status, doc = client.upload(
            sorted((work / "models/blood-smear/samples").glob("*.jpg"))[0].read_bytes(),
            sample_code="DEMO-1",
        )
        assert status == 201, doc
        pages = ["/", "/samples", "/model", "/system", "/samples/DEMO-1",
                 "/samples/DEMO-1/report"]
        checked = 0
        for page in pages:
            status, body, _ = _get(base + page)
            assert status == 200, (page, status)
            for src in re.findall(r'<img[^>]*\ssrc="([^"]+)"', body.decode()):
                if src.endswith(".mjpg"):
                    continue  # the live stream: checked by its own tests
                status, data, ctype = _get(base + src.replace("&amp;", "&"))
                assert status == 200 and ctype.startswith("image/"), (page, src, status)
                assert data[:2] == b"\xff\xd8" or data[:4] == b"\x89PNG", (page, src)
                checked += 1
        assert checked >= 4  # the card's plots and the sample's field at least
        assert (work / "data" / "demo" / "fieldscope.db").is_file()
        status, health = client.get_json("/api/health")
        # The demo runs as shipped: everything up (its replay is the camera).
        assert status == 200 and health["status"] == "ok", health
        assert health["inference"]["ok"] and health["camera"]["state"] == "ok", health
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
