"""The ragtune command through its installed entry point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

RAGTUNE = str(Path(sys.executable).parent / "ragtune")


def run(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAGTUNE_HOME": str(home)}
    return subprocess.run([RAGTUNE, *args], capture_output=True, text=True, env=env, timeout=300)


def test_index_search_collections_json(home, small_docs):
    (small_docs / "bad.txt").write_bytes(b"\x00\x01")
    out = run("index", str(small_docs), "--collection", "demo", "--json", home=home)
    assert out.returncode == 3, out.stderr  # some files failed, the rest is indexed
    report = json.loads(out.stdout)
    assert set(report) >= {"added", "updated", "unchanged", "deleted", "chunks", "failed"}
    assert report["added"] == 4 and report["failed"][0]["path"] == "bad.txt"

    out = run("search", "What does E07 mean?", "--collection", "demo", "-k", "2", "--json", home=home)
    assert out.returncode == 0, out.stderr
    hits = json.loads(out.stdout)
    assert hits[0]["doc"] == "manuals/hx.md" and "E07" in hits[0]["text"]
    assert set(hits[0]) == {"doc", "chunk_id", "score", "text", "start", "end", "metadata"}

    out = run("collections", "--json", home=home)
    assert json.loads(out.stdout)[0]["documents"] == 4


def test_user_errors_are_one_line_without_traceback(home, small_docs):
    out = run("search", "x", "--collection", "missing", home=home)
    assert out.returncode == 1
    assert out.stderr.startswith("error: no collection named 'missing'") and "Traceback" not in out.stderr
    out = run("index", str(small_docs), "--collection", "demo", "--index-type", "ivf", home=home)
    assert out.returncode == 1 and "'flat', 'hnsw'" in out.stderr and "Traceback" not in out.stderr


def test_help_of_every_command_has_an_example(home):
    for command in ["index", "search", "collections", "rm-docs", "drop", "reindex"]:
        out = run(command, "--help", home=home)
        assert out.returncode == 0 and "Example: ragtune" in out.stdout, command
