"""Loaders and chunking on real files, including the bad ones."""

from __future__ import annotations

from pathlib import Path

import pytest

from pdf_fixture import make_pdf
from rag.chunking import TokenChunker
from rag.documents import DocumentError, load_bytes, load_document


def test_markdown_keeps_text_verbatim_and_heading_path(tmp_path):
    text = "# Manual\n\nIntro.\n\n## Install\n\n### Clearances\n\nKeep 300 mm free.\n\n```\n# not a heading\n```\n## Service\n\nYearly.\n"
    doc = load_bytes(Path("m.md"), text.encode())
    assert doc.text == text
    assert doc.metadata["title"] == "Manual"
    assert doc.metadata_at(text.index("Keep 300"))["section"] == "Manual > Install > Clearances"
    assert doc.metadata_at(text.index("Yearly"))["section"] == "Manual > Service"
    assert all("not a heading" not in m["section"] for _, m in doc.markers)


def test_html_drops_script_and_keeps_headings():
    html = "<html><head><title>T</title><style>p{}</style><script>evil()</script></head><body><h1>Prices</h1><p>HX-6 &amp; Lumo</p></body></html>"
    doc = load_bytes(Path("p.html"), html.encode())
    assert "evil" not in doc.text and "p{}" not in doc.text
    assert "HX-6 & Lumo" in doc.text
    assert doc.metadata["title"] == "T"
    assert doc.metadata_at(doc.text.index("HX-6"))["section"] == "Prices"


def test_pdf_pages_become_markers():
    doc = load_bytes(Path("s.pdf"), make_pdf(["first page text", "second page text"]))
    assert doc.metadata_at(doc.text.index("second"))["page"] == 2
    assert doc.metadata_at(doc.text.index("first"))["page"] == 1


def test_docx_paragraphs_and_headings(tmp_path):
    import docx

    d = docx.Document()
    d.add_heading("Policy", level=1)
    d.add_paragraph("Leave is 26 days.")
    path = tmp_path / "p.docx"
    d.save(path)
    doc = load_document(path)
    assert "Leave is 26 days." in doc.text
    assert doc.metadata_at(doc.text.index("Leave"))["section"] == "Policy"


def test_jsonl_rows_keep_line_numbers():
    doc = load_bytes(Path("f.jsonl"), b'{"text": "alpha", "id": "a"}\n\n{"text": "beta", "id": "b"}\n')
    assert doc.text == "alpha\n\nbeta"
    assert doc.metadata_at(doc.text.index("beta")) | {} == {"format": "jsonl", "row": 3, "id": "b"}


@pytest.mark.parametrize("name,data,reason", [
    ("empty.txt", b"", "empty file"),
    ("blank.md", b"   \n\n", "empty file"),
    ("bin.txt", b"\x00\x01\x02abc", "binary content"),
    ("latin.txt", "café".encode("latin-1"), "not valid UTF-8"),
    ("broken.pdf", b"%PDF-1.4\n1 0 obj << /Type /Catalog", "broken PDF"),
    ("scan.pdf", make_pdf([None, None]), "no text layer"),
    ("bad.jsonl", b'{"text": "ok"}\nnot json\n', "line 2"),
    ("notext.jsonl", b'{"body": "x"}\n', '"text" field'),
    ("broken.docx", b"PK\x03\x04garbage", "broken .docx"),
    ("file.xyz", b"hello", "unsupported file type"),
])
def test_bad_files_raise_one_line_reasons(name, data, reason):
    with pytest.raises(DocumentError) as info:
        load_bytes(Path(name), data)
    message = str(info.value)
    assert reason in message and "\n" not in message


def test_chunks_are_exact_spans_within_the_token_limit(embedder):
    paragraph = " ".join(f"Sentence {i} explains how the HX-{i % 3 * 5 + 6} unit handles defrost cycles." for i in range(120))
    text = "# Guide\n\n" + "\n\n".join([paragraph[:1500], paragraph[1500:4000], paragraph[4000:]])
    doc = load_bytes(Path("g.md"), text.encode())
    chunker = TokenChunker(embedder.tokenizer, chunk_tokens=64, overlap_tokens=8, max_model_tokens=embedder.max_tokens)
    chunks = chunker.split(doc)
    assert len(chunks) > 5
    for c in chunks:
        assert doc.text[c.start:c.end] == c.text
        assert embedder.count_tokens(c.text) <= 64
    covered = set()
    for c in chunks:
        covered.update(range(c.start, c.end))
    assert len(covered) >= len(text.strip()) * 0.95  # nothing of substance dropped
    starts = [c.start for c in chunks]
    assert starts == sorted(starts)


def test_chunk_size_is_clamped_to_the_embedder_limit(embedder):
    chunker = TokenChunker(embedder.tokenizer, chunk_tokens=10_000, overlap_tokens=32, max_model_tokens=embedder.max_tokens)
    assert chunker.chunk_tokens == embedder.max_tokens - 2
