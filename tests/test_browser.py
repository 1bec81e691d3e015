"""A real browser (Debian's Chromium driven by Playwright) against the daemon on waitress."""

from __future__ import annotations

import os
import shutil
import signal
import time

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


def until(page, expression: str, timeout: float = 30.0) -> None:
    """Wait until ``expression`` is true in the page, polled from here: the kit's CSP
    (script-src 'self') forbids the in-page polling of Playwright's wait_for_function."""
    deadline = time.monotonic() + timeout
    while not page.evaluate(expression):
        assert time.monotonic() < deadline, f"not true within {timeout:.0f} s: {expression}"
        page.wait_for_timeout(100)


def test_shipped_demo_in_a_phone_sized_browser(browser, tmp_path):
    """The demo as the README runs it (its config, relative paths, the checkout as working
    directory), in Chromium at 390x844: every page, a captured sample and its report, with no
    4xx/5xx answer and no broken image. FIELDSCOPE_SCREENSHOTS=DIR saves each page there (the
    README's screenshots come from this walk)."""
    from pathlib import Path

    from tests.daemon_helpers import start_demo

    proc, base, _ = start_demo(tmp_path)
    shots = os.environ.get("FIELDSCOPE_SCREENSHOTS")
    try:
        wait_http(base + "/api/health")
        ctx = browser.new_context(viewport={"width": 390, "height": 844}, device_scale_factor=1)
        page = ctx.new_page()
        bad: list[str] = []
        page.on("response", lambda r: bad.append(f"{r.status} {r.url}") if r.status >= 400
                else None)
        page.goto(base + "/")
        page.wait_for_selector("#decision:not(:has-text('waiting'))", timeout=30000)
        page.fill("#sample-code", "DEMO-7")
        for _ in range(2):
            page.click("#capture-form button")
            page.wait_for_selector("#action-result:has-text('Stored #')", timeout=30000)
            page.evaluate("document.querySelector('#action-result').textContent = ''")

        def visit(path: str, name: str) -> None:
            page.goto(base + path)
            page.wait_for_load_state("networkidle") if path != "/" else page.wait_for_timeout(
                1500
            )
            # Lazy images load when seen: bring each into view, then wait for them.
            for i in range(page.evaluate("document.images.length")):
                page.evaluate(f"document.images[{i}].scrollIntoView()")
                page.wait_for_timeout(50)
            page.wait_for_timeout(300)
            until(page, "Array.from(document.images).every(i => i.src.endsWith('.mjpg') || "
                        "i.complete)")
            page.evaluate("window.scrollTo(0, 0)")
            broken = page.evaluate(
                "Array.from(document.images).filter(i => !i.src.endsWith('.mjpg') && "
                "(!i.complete || i.naturalWidth === 0)).map(i => i.src)"
            )
            assert not broken, (path, broken)
            if shots:
                Path(shots).mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(Path(shots) / f"{name}.png"), full_page=False)

        for path, name in (("/", "live"), ("/samples", "samples"), ("/samples/DEMO-7", "sample"),
                           ("/samples/DEMO-7/report", "report"), ("/model", "model"),
                           ("/system", "system")):
            visit(path, name)
        assert "DEMO-7" in page.goto(base + "/samples").text()
        # The demo's other use, one tap away: the skin profile on its own bundled samples.
        page.goto(base + "/")
        page.click("#profiles button:has-text('Skin')")
        page.wait_for_selector("#model-name:has-text('skin-lesion')", timeout=30000)
        page.wait_for_selector("#decision:not(:has-text('waiting'))", timeout=30000)
        page.fill("#sample-code", "DEMO-8")
        page.click("#capture-form button")
        page.wait_for_selector("#action-result:has-text('Stored #')", timeout=30000)
        for path, name in (("/", "live-skin"), ("/samples/DEMO-8", "sample-skin"),
                           ("/samples/DEMO-8/report", "report-skin"), ("/model", "model-skin")):
            visit(path, name)
        assert "skin-lesion" in page.goto(base + "/model").text()
        # Where the model looked: the toggle lays the map over every field, on the phone.
        page.goto(base + "/samples/DEMO-8")
        page.select_option("#map-kind", "group")
        shown = "Array.from(document.querySelectorAll('img[data-map]'))"
        until(page, shown + ".every(i => i.src.includes('/map.png?kind=group') && i.complete "
                            "&& i.naturalWidth > 0)")
        assert page.evaluate(shown + ".length") >= 1
        assert page.evaluate(shown + ".every(i => i.complete && i.naturalWidth > 0 && "
                             "i.src.includes('/map.png'))")
        if shots:
            page.screenshot(path=str(Path(shots) / "sample-skin-map.png"), full_page=False)
        page.select_option("#map-kind", "")
        assert "/map.png" not in page.evaluate("document.querySelector('img[data-map]').src")
        report = page.goto(base + "/samples/DEMO-8/report").text()
        assert "where the model looked" in report.lower()
        listing = page.goto(base + "/samples").text()
        assert "Skin — dermatoscope" in listing and "Blood smear — microscope" in listing
        assert not bad, bad
        ctx.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def test_profile_switch_in_one_tap_reaches_every_browser(browser, tmp_path):
    """One tap on one phone switches the kit; that page and another browser's Live page show
    the new model within 2 s, and the sample code typed before the tap is still there."""
    from tests.test_profiles import start, stop, write_config

    proc, base = start(tmp_path, write_config(tmp_path))
    try:
        pages = []
        for _ in range(2):
            ctx = browser.new_context(viewport={"width": 390, "height": 844})
            page = ctx.new_page()
            page.goto(base + "/")
            page.wait_for_selector("#model-name:has-text('blood-smear')")
            pages.append(page)
        tapper, other = pages
        tapper.fill("#sample-code", "P-17")
        tapper.click("#profiles button:has-text('Skin')")
        for page in pages:
            # Generous deadlines (a loaded 2-core machine); the test_profiles tests time the
            # switch itself.
            page.wait_for_selector("#model-name:has-text('skin-lesion')", timeout=30000)
            page.wait_for_selector("#profiles button.active:has-text('Skin')", timeout=30000)
            page.wait_for_selector("#decision:not(:has-text('waiting'))", timeout=10000)
        assert tapper.input_value("#sample-code") == "P-17"
        # The bars are the skin model's classes now.
        labels = other.eval_on_selector_all(".bar", "bs => bs.map(b => b.dataset.label)")
        assert "mel" in labels and "Benign" not in labels
    finally:
        stop(proc)
