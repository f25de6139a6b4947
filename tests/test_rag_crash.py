"""kill -9 an indexing process at many points: the store stays consistent and a re-run finishes."""

from __future__ import annotations

import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from rag.collection import IndexConfig, Workspace

CHILD = r"""
import sys
from rag.collection import Workspace
from rag.embeddings import get_embedder
get_embedder("default")
print("ready", flush=True)
Workspace(sys.argv[1]).index("c", [sys.argv[2]], sync=True)
print("done", flush=True)
"""


def write_corpus(root: Path, version: int, docs: int = 24) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(docs):
        path = root / f"doc{i:02d}.md"
        if version == 2 and i % 5 == 0:
            path.unlink(missing_ok=True)  # removed in v2: sync deletes it
            continue
        body = "\n\n".join(f"Paragraph {j} of document {i}, revision {version}: the HX-{i} unit "
                           f"needs {i * j} litres and a {j}-step check." for j in range(8))
        path.write_text(f"# Document {i}\n\n{body}\n", encoding="utf-8")


def consistent(home: Path) -> dict:
    ws = Workspace(home)
    col = ws.get("c")
    state = col.check()
    assert state["mismatched"] == 0 and state["sqlite_chunks"] == state["faiss_vectors"], state
    ws.conn.execute(f"INSERT INTO fts_{col.id}(fts_{col.id}) VALUES('integrity-check')")
    orphans = ws.conn.execute("SELECT COUNT(*) FROM chunks c LEFT JOIN documents d ON d.id = c.document_id WHERE d.id IS NULL").fetchone()[0]
    assert orphans == 0
    return state


def version_of(home: Path) -> int:
    conn = sqlite3.connect(home / "ragtune.db", timeout=30)
    try:
        return int(conn.execute("SELECT version FROM collections WHERE name = 'c'").fetchone()[0])
    finally:
        conn.close()


def test_kill_at_many_points_leaves_a_consistent_store(tmp_path):
    corpus = tmp_path / "corpus"
    write_corpus(corpus, 1)
    base = tmp_path / "base"
    Workspace(base).index("c", [corpus], config=IndexConfig(group_chunks=2))
    write_corpus(corpus, 2)  # every file changes and some are gone: updates and deletes are in flight
    start_version = version_of(base)

    clean = tmp_path / "clean"
    shutil.copytree(base, clean)
    Workspace(clean).index("c", [corpus], sync=True)
    expected = {d["path"]: d["content_hash"] for d in Workspace(clean).get("c").documents()}
    commits = version_of(clean) - start_version
    assert len(expected) == 19 and commits >= 8

    # kill right after the n-th commit of the run (plus a little, to land inside the next group)
    outcomes = []
    trials = 6  # kill points spread over the run: first commit, the middle groups, the last commit
    for n in range(trials):
        home = tmp_path / f"trial{n}"
        shutil.copytree(base, home)
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(home), str(corpus)], stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "ready"
        target = start_version + n * commits // (trials - 1)
        while child.poll() is None and version_of(home) < target:
            time.sleep(0.005)
        time.sleep((n % 3) * 0.03)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
        consistent(home)
        outcomes.append(version_of(home))
        Workspace(home).index("c", [corpus], sync=True)  # a re-run finishes the job
        consistent(home)
        assert {d["path"]: d["content_hash"] for d in Workspace(home).get("c").documents()} == expected
        shutil.rmtree(home)
    assert len(set(outcomes)) >= trials - 2, f"kills landed at too few distinct points: {outcomes}"
