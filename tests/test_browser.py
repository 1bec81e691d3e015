"""A real browser (Debian's Chromium driven by Playwright) against the daemon on waitress."""

from __future__ import annotations

import os
import shutil
import signal

import pytest

from tests.conftest import CI
from tests.test_serve_e2e import start_daemon, wait_http

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if CI:
            pytest.fail("playwright is part of the dev extra")
        pytest.skip("playwright not installed")
    if not os.path.exists(CHROMIUM):
        if CI:
            pytest.fail("chromium missing: .ci/run installs Debian's chromium")
        pytest.skip("chromium not installed (apt install chromium)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


def test_live_page_login_upload_and_sample(browser, tmp_path, blood_bundle, blood_samples):
    from playwright.sync_api import expect

    proc, base = start_daemon(
        tmp_path,
        blood_bundle,
        blood_samples,
        {"FIELDSCOPE_PASSWORD": "field kit"},
        args=("--host", "127.0.0.1"),
    )
    try:
        wait_http(base + "/api/health")
        page = browser.new_page()
        requests = []
        page.on("request", lambda r: requests.append(r.url))
        page.goto(base + "/")
        assert "/login" in page.url
        page.fill("input[name=password]", "wrong")
        page.click("button[type=submit]")
        assert page.locator("text=Wrong password").is_visible()
        page.fill("input[name=password]", "field kit")
        page.click("button[type=submit]")
        page.wait_for_url(base + "/")
        # the live result updates from "waiting" to the model's decision
        expect(page.locator("#decision")).to_contain_text("ALL: ", timeout=30000)
        bar = page.locator(".bar .value").first.text_content()
        assert bar.endswith("%")
        page.fill("#sample-code", "SLIDE-42")
        page.set_input_files("#upload-file", str(blood_samples[0]))
        page.click("#upload-form button")
        expect(page.locator("#action-result")).to_contain_text("Stored #", timeout=30000)
        assert "SLIDE-42" in page.text_content("#action-result")
        page.click("text=Samples")
        page.click("text=SLIDE-42")
        assert "1 fields" in page.text_content(".summary")
        assert page.locator("figure.field img").count() == 1
        page.screenshot(path=str(tmp_path / "sample.png"))
        assert all(u.startswith(base) for u in requests), "the page loaded something remote"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
