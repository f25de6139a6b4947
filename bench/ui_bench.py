"""UI bench (issue 15): the Streamlit server's CPU while files are written into the checkout, with a
browser session open — before (Streamlit's default file watcher) and after (the repo's
.streamlit/config.toml: no watcher), in the same run.

    .venv/bin/python bench/ui_bench.py [--quick]

Each arm starts the app as `make demo` does (``python -m serving.app_launch``, one temp RAGTUNE_HOME
with the packaged model converted once and nothing indexed). A headless Chromium opens the chat and
waits until the model is loaded and the page idle, keeping the session open. Then files are written
into a temp folder inside the checkout (as a workspace inside the checkout is written while answering,
training or running A/B) for a fixed time, and the server process's CPU time (user + system, from
/proc) over that window is divided by the window. Prints JSON lines; the goal is < 0.20 of a core.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("RAGTUNE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--no-first-run"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and its threads (from /proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def _write_files(folder: Path, seconds: float, files_per_s: float) -> int:
    """Create, rewrite and delete small files under ``folder`` for ``seconds``; returns files written."""
    folder.mkdir(parents=True, exist_ok=True)
    deadline, n = time.time() + seconds, 0
    interval = 1.0 / files_per_s
    while time.time() < deadline:
        sub = folder / f"d{n % 20}"
        sub.mkdir(exist_ok=True)
        path = sub / f"f{n % 200}.json"
        path.write_text(json.dumps({"n": n, "pad": "x" * 2000}))
        if n % 3 == 0:
            (sub / f"f{(n + 100) % 200}.json").unlink(missing_ok=True)
        n += 1
        time.sleep(interval)
    return n


def measure(home: Path, arm: str, extra_flags: list[str], seconds: float, files_per_s: float) -> dict:
    from playwright.sync_api import sync_playwright

    port = _free_port()
    env = {**os.environ, "RAGTUNE_HOME": str(home)}
    log = open(home / "streamlit.log", "wb")
    process = subprocess.Popen([sys.executable, "-m", "serving.app_launch", "--server.port", str(port), *extra_flags],
                               cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    scratch = REPO / f".ui-bench-writes-{os.getpid()}-{arm}"
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if urllib.request.urlopen(url + "/_stcore/health", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(0.5)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
            page = browser.new_page()
            page.goto(url)
            page.get_by_test_id("stChatInputTextArea").wait_for(timeout=300_000)  # the model is loaded
            time.sleep(5)  # the session is open and idle
            before = _cpu_seconds(process.pid)
            started = time.time()
            written = _write_files(scratch, seconds, files_per_s)
            window = time.time() - started
            used = _cpu_seconds(process.pid) - before
            browser.close()
        return {"arm": arm, "cores": used / window, "window_s": round(window, 1), "files_written": written}
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()
        shutil.rmtree(scratch, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a 20 s write window per arm instead of 60 s")
    parser.add_argument("--files-per-s", type=float, default=50.0, help="file writes per second into the checkout")
    args = parser.parse_args()
    seconds = 20.0 if args.quick else 60.0
    if not Path(CHROMIUM).exists():
        print(json.dumps({"bench": "ui", "skipped": f"no chromium at {CHROMIUM}; install it (make browser) to run this bench"}))
        return
    from tuning.models import ensure_packaged_causal_lm

    home = Path(tempfile.mkdtemp(prefix="ui-bench-home-"))
    try:
        ensure_packaged_causal_lm(home)  # once, so neither arm's window includes the GGUF conversion
        # before: Streamlit's default watcher (what the repo had: no config, `streamlit run`)
        baseline = measure(home, "default-watcher", ["--server.fileWatcherType", "auto", "--server.runOnSave", "false"],
                           seconds, args.files_per_s)
        ragtune = measure(home, "repo-config", [], seconds, args.files_per_s)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    for arm in (baseline, ragtune):
        print(json.dumps({"bench": "ui", "metric": f"server_cpu_cores_{arm['arm'].replace('-', '_')}",
                          "value": round(arm["cores"], 3), "unit": "cores", "window_s": arm["window_s"],
                          "files_written": arm["files_written"]}), flush=True)
    ratio = baseline["cores"] / max(ragtune["cores"], 1e-3)
    print(json.dumps({"bench": "ui", "metric": "server_cpu_during_writes", "value": round(ragtune["cores"], 3),
                      "baseline": round(baseline["cores"], 3), "ragtune": round(ragtune["cores"], 3),
                      "ratio": round(ratio, 1), "unit": "cores", "goal": "< 0.20"}), flush=True)


if __name__ == "__main__":
    main()
