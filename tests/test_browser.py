"""End to end in a real browser: Debian's chromium, driven headless by Playwright, against `streamlit run`
on a free localhost port with a temp RAGTUNE_HOME. Asks a question in RAG mode, waits for the streamed
answer and its sources, checks a document's markup stays text, saves a screenshot under test-artifacts/."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = os.environ.get("RAGTUNE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser") or "/usr/bin/chromium"
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--no-first-run"]

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def streamlit_url(serving_home, tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no chromium at {CHROMIUM}: `make test` installs it with apt-get (Debian/Ubuntu, as root)")
    pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed (pip install playwright)")
    config = tmp_path / "serve.yaml"
    config.write_text("max_new_tokens: 16\nsource_tokens: 96\n", encoding="utf-8")
    port = _free_port()
    env = {**os.environ, "RAGTUNE_HOME": str(serving_home), "RAGTUNE_SERVE_CONFIG": str(config),
           "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false"}
    log = open(tmp_path / "streamlit.log", "wb")
    process = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(REPO / "streamlit_app.py"),
                                "--server.headless", "true", "--server.port", str(port), "--server.address", "127.0.0.1",
                                "--server.fileWatcherType", "none"],
                               cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                if urllib.request.urlopen(url + "/_stcore/health", timeout=2).status == 200:
                    break
            except OSError:
                if process.poll() is not None:
                    break
                time.sleep(0.5)
        else:
            pytest.fail("streamlit did not start in 90 s: " + (tmp_path / "streamlit.log").read_text()[-2000:])
        if process.poll() is not None:
            pytest.fail("streamlit exited: " + (tmp_path / "streamlit.log").read_text()[-2000:])
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def test_rag_question_in_a_real_browser(streamlit_url):
    from playwright.sync_api import expect, sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(streamlit_url)
            box = page.get_by_test_id("stChatInputTextArea")
            expect(box).to_be_visible(timeout=120_000)  # the model loads on the first visit
            box.fill("When is the Vexa-7 gasket replaced?")
            box.press("Enter")
            answer = page.get_by_test_id("stChatMessage").nth(1)
            expect(answer).to_be_visible(timeout=120_000)
            expect(page.get_by_text("first token", exact=False).first).to_be_visible(timeout=120_000)  # answer complete
            sources = page.get_by_test_id("stExpander").filter(has_text="Sources").first
            expect(sources).to_be_visible()
            assert answer.inner_text().strip()
            sources.get_by_text("Sources", exact=False).first.click()
            expect(page.get_by_text("markup-test.md", exact=False).first).to_be_visible()
            expect(page.get_by_text("INJECTED", exact=False).first).to_be_visible()
            # the document's markup is shown as text: no element from it, no script ran
            assert page.locator("#injected-bold").count() == 0
            assert page.evaluate("window.__ragtune_injected === undefined")
            page.screenshot(path=str(ARTIFACTS / "browser-rag-answer.png"), full_page=True)
        finally:
            browser.close()
    assert (ARTIFACTS / "browser-rag-answer.png").stat().st_size > 10_000
