"""Shared fixtures. Every path goes to a temp dir; the real packaged models are loaded once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CORPORA = REPO / "corpora"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may come from a model hub in tests


@pytest.fixture()
def home(tmp_path, monkeypatch) -> Path:
    """A fresh RAGTUNE_HOME for one test."""
    path = tmp_path / "home"
    monkeypatch.setenv("RAGTUNE_HOME", str(path))
    return path


@pytest.fixture(scope="session")
def embedder():
    from rag.embeddings import get_embedder

    return get_embedder("default")


# --- rag fixtures ---
@pytest.fixture()
def small_docs(tmp_path) -> Path:
    """A tiny folder with one file per loader, some good, some bad."""
    root = tmp_path / "docs"
    (root / "manuals").mkdir(parents=True)
    (root / "manuals" / "hx.md").write_text(
        "# HX manual\n\nThe HX-9 heat pump delivers 9 kW.\n\n## Warranty\n\nThe warranty on HX units lasts seven years.\n\n"
        "## Error codes\n\nE07 means low water flow; check the strainer.\n", encoding="utf-8")
    (root / "notes.txt").write_text("The Brenholt Works factory opened on 9 September 2016.\n", encoding="utf-8")
    (root / "prices.html").write_text(
        "<html><head><title>Prices</title><script>alert('x')</script></head><body><h1>Price list</h1>"
        "<p>The Lumo 2 controller costs 189 EUR.</p></body></html>", encoding="utf-8")
    (root / "faq.jsonl").write_text('{"text": "Support is open Saturday 09:00-13:00.", "topic": "support"}\n', encoding="utf-8")
    return root
