"""Retriever tuning (issue 11) with sentence-transformers' own trainer on the packaged MiniLM and a real collection."""

from __future__ import annotations

import json

import pytest

from rag.collection import CollectionError, IndexConfig, Workspace
from tuning.errors import TuningError
from tuning.recipes.retriever import train_retriever, training_pairs

pytestmark = pytest.mark.slow

# Product codes the questions call by their nicknames: an untuned embedder cannot link the two.
PRODUCTS = {
    "kv1.md": ("KV-1", "the blue fan", "The KV-1 runs at 38 dB and draws 40 W."),
    "kv2.md": ("KV-2", "the quiet pump", "The KV-2 moves 12 litres per minute."),
    "kv3.md": ("KV-3", "the small valve", "The KV-3 closes within 2 seconds."),
    "kv4.md": ("KV-4", "the red sensor", "The KV-4 reads temperatures to 0.1 C."),
    "kv5.md": ("KV-5", "the long pipe", "The KV-5 is 14 metres long."),
    "kv6.md": ("KV-6", "the heavy tank", "The KV-6 holds 300 litres and weighs 80 kg."),
}


def test_tuned_retriever_improves_hit_at_1_and_needs_a_reindex(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    questions = []
    for name, (code, nickname, fact) in PRODUCTS.items():
        text = f"# {code}\n\n{fact} Part {code} ships in a carton.\n"
        (docs / name).write_text(text, encoding="utf-8")
        start = text.index(fact)
        for template in ("What should I know about {n}?", "Tell me the main figure for {n}.", "Which facts hold for {n}?"):
            questions.append({"question": template.format(n=nickname), "answer": fact, "doc": name,
                              "span": [start, start + len(fact)]})
    home = tmp_path / "home"
    ws = Workspace(home)
    ws.create("kv", IndexConfig(chunk_tokens=64))
    ws.index("kv", [docs])

    # positives: the oracle chunk, or the sentence of it holding the answer (what the evidence ranker scores)
    col = ws.get("kv")
    chunks = training_pairs(col, questions, "chunk")
    sentences = training_pairs(col, questions, "sentence")
    assert [p["text"] for p in sentences] == [q["answer"] for q in questions]
    assert all(s["text"] in c["text"] and s["text"] != c["text"] for s, c in zip(sentences, chunks))
    assert len(training_pairs(col, questions, "both")) == 2 * len(questions)
    with pytest.raises(TuningError, match="positives='chunks' is not one of chunk, sentence, both"):
        training_pairs(col, questions, "chunks")

    manifest = train_retriever(home, "kv", questions, "kv-minilm", epochs=8, batch_size=6, learning_rate=1e-4,
                               echo=lambda *_: None)
    before, after = manifest["metrics"]["before"], manifest["metrics"]["after"]
    assert after["hit_at_1"] > before["hit_at_1"]
    folder = home / "retrievers" / "kv-minilm"
    saved = json.loads((folder / "ragtune.json").read_text())
    assert saved["task"] == "retriever" and saved["metrics"]["after"] == after and (folder / "model.safetensors").exists()

    # the existing rule: a collection built with another model refuses the tuned one until reindexed
    with pytest.raises(CollectionError, match="reindex"):
        ws.index("kv", [docs], config=IndexConfig(embedding_model=str(folder), chunk_tokens=64))
    ws.reindex("kv", str(folder))
    col = Workspace(home).get("kv")
    assert col.embedding_model == str(folder.resolve())
    hits = col.search(questions[0]["question"], k=1, mode="dense")
    assert hits and hits[0].doc == "kv1.md"

    with pytest.raises(ValueError):  # names go through core.names.child_path
        train_retriever(home, "kv", questions, "../escape", echo=lambda *_: None)
    with pytest.raises(TuningError, match="at least 2"):
        train_retriever(home, "kv", questions[:1], "one", echo=lambda *_: None)
