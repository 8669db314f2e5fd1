"""The dashboard at / in headless Chromium (Debian's chromium + chromium-driver, driven by selenium).

A real server, Redis and echo worker: the batch's row and progress bar appear and move, the worker's row
appears with its charts, and a screenshot is left in the test's temp dir.
"""

import shutil
import subprocess

import pytest

from tests.cli import eventually, start_worker
from tests.test_serve import Server, completion_lines, upload_and_create, write_jsonl

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"

pytestmark = pytest.mark.skipif(not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)),
                                reason="needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver)")


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,700"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def read(browser, selector: str, attribute: str | None = None) -> str | None:
    """An element's text or attribute, read in one script call: the page redraws its rows on every refresh."""
    return browser.execute_script(
        "const e = document.querySelector(arguments[0]);"
        "return e ? (arguments[1] ? e.getAttribute(arguments[1]) : e.textContent) : null;", selector, attribute)


def test_the_dashboard_shows_a_running_batch_and_its_worker(server, browser, redis_url, tmp_path):  # noqa: F811
    rows = completion_lines("demo", [f"prompt number {i}" for i in range(40)])
    batch = upload_and_create(server.sdk(), write_jsonl(tmp_path / "b.jsonl", rows))
    browser.get(server.base + "/")
    row = f'tr.batch[data-id="{batch.id}"]'
    eventually(lambda: read(browser, row), "the batch row", timeout_s=30, poll_s=0.2)
    assert read(browser, f"{row} .status") == "in_progress"
    assert read(browser, f"{row} [role=progressbar]", "aria-valuenow") == "0"
    assert read(browser, "#workers tbody") == "no live workers"

    worker = start_worker("--engine", "echo", "--model", "demo", "--max-batch", "2", "--echo-step-delay", "0.5",
                          "--heartbeat-interval", "1", "--worker-ttl", "10", redis_url=redis_url,
                          log=tmp_path / "worker.log")
    try:
        def progress() -> float:
            return float(read(browser, f"{row} [role=progressbar]", "aria-valuenow") or 0)

        eventually(lambda: 0 < progress() < 100, "the progress bar moving", timeout_s=120, poll_s=0.1)
        eventually(lambda: read(browser, "tr.worker"), "the worker row", timeout_s=60)
        eventually(lambda: progress() == 100, "the batch finishing", timeout_s=120, poll_s=0.2)
        eventually(lambda: read(browser, f"{row} .status") == "completed", "completed status", timeout_s=30)
        eventually(lambda: read(browser, "tr.worker svg.spark polyline", "points"), "a chart with two samples",
                   timeout_s=30)
        assert read(browser, f"{row} a.file-link", "href") == f"/v1/files/file-output-{batch.id}/content"
        assert "demo" in read(browser, "tr.worker")
        shot = tmp_path / "dashboard.png"
        assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 1000
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=60)
        except subprocess.TimeoutExpired:
            worker.kill()


def test_with_api_keys_the_page_asks_for_one_and_uses_the_one_in_its_address(browser, redis_url, redis_conn, tmp_path):
    srv = Server(redis_url, tmp_path / "files", tmp_path / "serve.log", "--api-key", "k1").start()
    try:
        batch = upload_and_create(srv.sdk("k1"), write_jsonl(tmp_path / "b.jsonl", completion_lines("demo")))
        browser.get(srv.base + "/")
        eventually(lambda: "API key" in (read(browser, "#problem") or ""), "the key prompt", timeout_s=30)
        assert read(browser, f'tr.batch[data-id="{batch.id}"]') is None
        browser.get(srv.base + "/#key=k1")
        browser.refresh()
        eventually(lambda: read(browser, f'tr.batch[data-id="{batch.id}"]'), "the batch row", timeout_s=30)
        assert browser.execute_script("return document.getElementById('problem').hidden")
    finally:
        srv.stop()
