"""The collection behaviours on both chunk stores (SQLite + FAISS, and Milvus Lite in a temp folder),
the Milvus-only parts (filter escaping, a kill -9 mid-run, moving between stores) and the refusals."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rag import milvus_store
from rag.collection import CollectionError, IndexConfig, Workspace
from rag.errors import StoreError
from tests.test_rag_crash import CHILD, write_corpus

RAGTUNE = str(Path(sys.executable).parent / "ragtune")


def release_all() -> None:
    """Close this process's Milvus Lite clients (another process opens the file next)."""
    for uri in list(milvus_store._CLIENTS):
        milvus_store.release(uri)


@pytest.fixture(autouse=True)
def _release_clients():
    yield
    release_all()


def test_sync_deletes_spans_and_filters_on_both_stores(home, small_docs, store_uri):
    ws = Workspace(home)
    report = ws.index("demo", [small_docs], store_uri=store_uri)
    assert (report.added, report.failed) == (4, []) and report.chunks == report.total_chunks > 0
    col = ws.get("demo")
    assert col.store_uri == store_uri and col.stats()["store"] == store_uri

    hit = col.search("how long does the warranty last", k=2)[0]
    assert hit.doc == "manuals/hx.md" and "seven years" in hit.text and hit.metadata["section"].startswith("HX manual")
    assert col.document_text(hit.doc)[hit.start:hit.end] == hit.text  # spans point into the stored text
    chunks = col.chunks("manuals/hx.md")
    assert chunks and all(col.document_text("manuals/hx.md")[c.start:c.end] == c.text for c in chunks)

    again = ws.index("demo", [small_docs])  # the recorded store is used without repeating it
    assert (again.unchanged, again.chunks) == (4, 0)

    (small_docs / "notes.txt").write_text("The Brenholt Works factory opened in 2017 after a delay.\n", encoding="utf-8")
    (small_docs / "new.md").write_text("# New\n\nThe Tessa 250 holds 250 litres.\n", encoding="utf-8")
    (small_docs / "faq.jsonl").unlink()
    changed = ws.index("demo", [small_docs], sync=True)
    assert (changed.added, changed.updated, changed.unchanged, changed.deleted) == (1, 1, 2, 1)
    col = ws.get("demo")
    assert {d["path"] for d in col.documents()} == {"manuals/hx.md", "notes.txt", "prices.html", "new.md"}
    top = col.search("when did the factory open", k=3, mode="bm25")
    assert "2017" in top[0].text and not any("2016" in h.text for h in top)  # the old version is gone
    assert col.delete_documents(["new.md", "missing.md"]) == 1
    assert not any(h.doc == "new.md" for h in col.search("Tessa 250 litres", k=5))
    state = col.check()
    assert state["mismatched"] == 0 and state["sqlite_chunks"] == col.stats()["chunks"] > 0

    only_md = col.search("price", k=5, where=["doc=manuals/*"])
    assert only_md and all(h.doc.startswith("manuals/") for h in only_md)
    ws.index("demo", [small_docs / ".." / "docs"], include=["*.html"])
    assert col.search("controller", k=5, where={"doc": "prices.htm?"})[0].doc == "prices.html"
    assert col.search("price", k=5, where=["section=nothing"]) == []


def test_hybrid_ranking_and_modes_on_both_stores(home, small_docs, store_uri):
    ws = Workspace(home)
    ws.index("demo", [small_docs], store_uri=store_uri)
    col = ws.get("demo")
    for query, doc in [("Lumo controller price", "prices.html"), ("What does E07 mean?", "manuals/hx.md"),
                       ("opening hours on Saturday", "faq.jsonl")]:
        for mode in ("dense", "bm25", "hybrid"):
            assert col.search(query, k=3, mode=mode)[0].doc == doc, (query, mode)
        rrf = col.search(query, k=3, fusion="rrf")  # Milvus: hybrid_search with its RRFRanker
        assert rrf[0].doc == doc, query
    hybrid = col.search("Lumo controller price", k=3)
    assert hybrid[0].dense_rank == 1 and hybrid[0].bm25_rank == 1 and -1.0 <= hybrid[0].similarity <= 1.0
    assert [h.doc for h in col.search("opening hours", k=5, where=["topic=support"])] == ["faq.jsonl"]


def test_milvus_filter_values_cannot_change_the_expression(home, tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    evil = 'x" or id >= 0 or doc == "'
    rows = [{"text": "Alpha part ships in March.", "topic": evil}, {"text": "Beta part ships in May.", "topic": "plain"},
            {"text": "Gamma part ships in June.", "topic": 'back\\slash'}]
    for i, row in enumerate(rows):  # one file each: rows of one file may share a chunk
        (docs / f"row{i}.jsonl").write_text(json.dumps(row) + "\n", encoding="utf-8")
    (docs / "odd_100%.md").write_text("# Odd\n\nThe odd file ships in July.\n", encoding="utf-8")
    ws = Workspace(home)
    ws.index("f", [docs], store_uri=f"milvus://{tmp_path / 'm.db'}")
    col = ws.get("f")
    assert col.search("ships", k=10, where={"topic": 'plain" or id >= 0 or doc == "'}) == []
    assert [h.text for h in col.search("ships", k=10, where={"topic": evil})] == ["Alpha part ships in March."]
    assert [h.text for h in col.search("ships", k=10, where={"topic": "back\\slash"})] == ["Gamma part ships in June."]
    assert {h.doc for h in col.search("ships", k=10, where={"doc": "odd_100%.md"})} == {"odd_100%.md"}
    assert col.search("ships", k=10, where={"doc": "odd_1000.md"}) == []  # '%' and '_' are not wildcards
    for bad in ('topic"] == "x" or filters["a', "a b", "doc)or(id"):
        with pytest.raises(CollectionError, match="plain name"):
            col.search("ships", where={bad: "x"})
    assert milvus_store.literal('a"b\\c\nd') == '"a\\"b\\\\c\\nd"'


def test_refusals_unreachable_store_and_store_gone(home, small_docs, tmp_path, monkeypatch):
    ws = Workspace(home)
    started = time.perf_counter()
    with pytest.raises(StoreError) as err:
        ws.index("far", [small_docs], store_uri="http://127.0.0.1:9")
    message = str(err.value)
    assert "http://127.0.0.1:9" in message and "RAGTUNE_MILVUS_TOKEN" in message and "cannot be reached" in message
    assert not ws.exists("far") and time.perf_counter() - started < 30
    with pytest.raises(StoreError, match="does not exist; create it"):
        ws.index("far", [small_docs], store_uri=f"milvus://{tmp_path / 'nowhere' / 'm.db'}")
    for bad in ("milvus://relative.db", "milvus:///x/m.txt", "postgres://h/db"):
        with pytest.raises(StoreError, match="milvus:///"):
            ws.index("far", [small_docs], store_uri=bad)
    assert not ws.exists("far")

    lite = tmp_path / "lite.db"
    ws.index("c", [small_docs], store_uri=f"milvus://{lite}")
    expected = [h.doc for h in ws.get("c").search("Lumo controller price", k=3)]
    with pytest.raises(CollectionError, match="ragtune reindex c --store sqlite"):
        ws.index("c", [small_docs], store_uri="sqlite")  # a collection stays where it was created
    release_all()
    shutil.rmtree(lite) if lite.is_dir() else lite.unlink()  # Milvus Lite 2.5 keeps one file (3.x a folder)
    ws = Workspace(home)
    assert ws.list()[0]["store"] == f"milvus://{lite}"  # listing still works and says where it lives
    with pytest.raises(StoreError, match=r"is gone.*ragtune reindex c --store sqlite"):
        ws.get("c").search("price")
    ws.reindex("c", store_uri="sqlite")  # moved from the stored text: no source files needed
    col = Workspace(home).get("c")
    assert col.store_uri == "sqlite" and col.check()["mismatched"] == 0
    assert [h.doc for h in col.search("Lumo controller price", k=3)] == expected


def run_cli(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAGTUNE_HOME": str(home)}
    return subprocess.run([RAGTUNE, *args], capture_output=True, text=True, env=env, timeout=300)


def test_cli_store_option_collections_and_move(home, small_docs, tmp_path):
    uri = f"milvus://{tmp_path / 'cli.db'}"
    Workspace(home).index("m", [small_docs], store_uri=uri)  # in-process: the session's embedder is loaded
    release_all()
    out = run_cli("collections", home=home)
    assert out.returncode == 0 and "m: 4 documents" in out.stdout and f"store {uri}" in out.stdout, out.stdout
    out = run_cli("reindex", "m", "--store", "sqlite", home=home)
    assert out.returncode == 0 and "store sqlite" in out.stdout, out.stderr
    assert Workspace(home).get("m").search("What does E07 mean?", k=1)[0].doc == "manuals/hx.md"
    out = run_cli("index", str(small_docs), "--collection", "x", "--store", "http://127.0.0.1:9", home=home)
    assert out.returncode == 1 and out.stderr.startswith("error: store http://127.0.0.1:9 cannot be reached"), out.stderr
    assert "Traceback" not in out.stderr


def state_of(home: Path) -> dict:
    col = Workspace(home).get("c")
    check = col.check()
    assert check["mismatched"] == 0, check
    out = {d["path"]: (d["content_hash"], d["chunks"]) for d in col.documents()}
    release_all()
    return out


def test_kill9_during_a_milvus_run_then_rerun_completes_exactly(tmp_path):
    corpus = tmp_path / "corpus"
    write_corpus(corpus, 1, docs=12)
    base = tmp_path / "base"
    Workspace(base).index("c", [corpus], config=IndexConfig(group_chunks=2), store_uri=f"milvus://{base / 'm.db'}")
    release_all()
    write_corpus(corpus, 2, docs=12)  # every file changes and some are gone: updates and deletes are in flight

    def copy(name: str) -> Path:
        home = tmp_path / name
        shutil.copytree(base, home)
        with Workspace(home).conn as conn:  # the copy's Milvus Lite file is its own
            conn.execute("UPDATE collections SET store = ?", (f"milvus://{home / 'm.db'}",))
        return home

    clean = copy("clean")
    Workspace(clean).index("c", [corpus], sync=True)
    expected = state_of(clean)
    assert len(expected) == 9

    # kill -9 after the run's third catalog commit: some documents replaced, others not yet
    home = copy("killed")
    start = Workspace(home).get("c").version()
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(home), str(corpus)], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "ready"
    while child.poll() is None and version_of(home) < start + 3:
        time.sleep(0.005)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL  # killed mid-run, not finished
    assert state_of(home) != expected  # work was left undone (and the check in state_of found no mismatch)
    Workspace(home).index("c", [corpus], sync=True)  # the re-run repairs and finishes
    assert state_of(home) == expected


def version_of(home: Path) -> int:
    conn = sqlite3.connect(home / "ragtune.db", timeout=30)
    try:
        return int(conn.execute("SELECT version FROM collections WHERE name = 'c'").fetchone()[0])
    finally:
        conn.close()
