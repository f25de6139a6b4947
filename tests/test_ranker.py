"""The learned evidence ranker (serving.ranker) on a real collection: real MiniLM, FAISS and SQLite FTS5.

Each product document has a sentence that repeats the question's words and holds no answer, and a
sentence that holds the figure in other words: the fixed MiniLM + BM25 mix prefers the first, a ranker
learned from training questions learns which kind holds answers, also for products it was not trained on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

RAGTUNE = str(Path(sys.executable).parent / "ragtune")
PRODUCTS = ["Aster", "Birch", "Cedar", "Dahlia", "Elm", "Fern", "Gorse", "Hazel", "Iris", "Juniper", "Kale",
            "Larch", "Maple", "Nettle"]
ATTRIBUTES = [("noise level", "dB"), ("weight", "kg"), ("flow rate", "L/min"), ("standby power", "W")]


def product_doc(i: int, name: str) -> tuple[str, list[dict]]:
    lines, questions = [f"# The {name} heat pump", ""], []
    for j, (attribute, unit) in enumerate(ATTRIBUTES):
        value = f"{10 + 7 * i + 3 * j}"
        lines.append(f"Customers often ask about the {attribute} of the {name} heat pump, and the {attribute} of the "
                     f"{name} heat pump matters when choosing one. Measured at the factory it comes to {value} {unit}. "
                     f"Installers like it.")
        lines.append("")
        questions.append({"question": f"What is the {attribute} of the {name} heat pump?", "answer": f"{value} {unit}"})
    return "\n".join(lines), questions


@pytest.fixture(scope="module")
def ranked_home(tmp_path_factory):
    from rag.collection import IndexConfig, Workspace

    home = tmp_path_factory.mktemp("ranker-home")
    docs = tmp_path_factory.mktemp("ranker-docs")
    questions = []
    for i, name in enumerate(PRODUCTS):
        text, qs = product_doc(i, name)
        (docs / f"{name.lower()}.md").write_text(text, encoding="utf-8")
        questions += qs
    Workspace(home).index("pumps", [docs], config=IndexConfig(chunk_tokens=64, chunk_overlap=0))
    return home, questions[:40], questions[40:]  # train: the first 10 products; held out: the last 4


def trained(home: Path, train: list[dict]):
    """The collection, with its ranker learned (when an earlier test in this module has not already)."""
    from rag.collection import Workspace
    from serving.ranker import ranker_path, train_ranker

    col = Workspace(home).get("pumps")
    if not ranker_path(col).exists():
        train_ranker(col, train, k=4, mode="hybrid", echo=lambda _: None)
    return col


def test_a_learned_ranker_beats_the_fixed_mix_on_held_out_questions_and_is_saved(ranked_home):
    from rag.collection import Workspace
    from serving.ranker import FILE, load_ranker, train_ranker

    home, train, held_out = ranked_home
    col = Workspace(home).get("pumps")
    lines = []
    manifest = train_ranker(col, train, k=4, mode="hybrid", dev_rows=held_out, echo=lines.append)
    assert manifest["questions_used"] == 40 and manifest["pairs"] > manifest["positives"] >= 40
    assert manifest["top1_fixed"] < 0.5, manifest  # the constructed case: the fixed mix picks the talkative sentence
    assert manifest["top1_learned"] >= 0.9 and manifest["dev_top1_learned"] >= 0.9, manifest
    assert manifest["dev_top1_learned"] > manifest["dev_top1_fixed"], manifest
    assert any("ETA" in line for line in lines) and any(line.startswith("saved ") for line in lines)
    saved = json.loads((Path(col.folder) / FILE).read_text(encoding="utf-8"))
    assert saved["embedding_model"] == col.config.embedding_model and len(saved["weights"]) == len(saved["features"])
    assert not list(Path(col.folder).glob("*.tmp"))  # written to a temp file and renamed
    ranker = load_ranker(col)
    assert ranker is not None and ranker.manifest["data_sha256"] == manifest["data_sha256"]


def test_the_assistant_orders_evidence_with_the_collections_ranker(ranked_home, serving_generator):
    from rag.collection import Workspace
    from serving.assistant import Assistant
    from serving.config import ConfigError, ServeConfig

    home, train, held_out = ranked_home
    ws = Workspace(home)
    trained(home, train)
    row = held_out[0]
    learned = Assistant(ws, serving_generator, ServeConfig(evidence_sentences=1, max_new_tokens=2))
    answer = learned.answer(row["question"], "rag", "pumps", log=False)
    assert answer.decoding["evidence_ranker"] == "learned"
    assert row["answer"] in answer.sources[0].text, answer.sources[0].text
    fixed = Assistant(ws, serving_generator, ServeConfig(evidence_sentences=1, max_new_tokens=2, evidence_ranker="fixed"))
    plain = fixed.answer(row["question"], "rag", "pumps", log=False)
    assert plain.decoding["evidence_ranker"] == "fixed"
    assert row["answer"] not in plain.sources[0].text  # the fixed mix takes the sentence that repeats the question
    with pytest.raises(ConfigError, match="evidence_ranker"):
        ServeConfig(evidence_ranker="off")


def test_a_ranker_file_that_does_not_fit_is_ignored_with_a_warning_and_bad_input_is_refused(ranked_home, tmp_path):
    from serving.ranker import FEATURES, RankerError, load_ranker, ranker_path, train_ranker

    home, train, _ = ranked_home
    col = trained(home, train)
    path = ranker_path(col)
    good = path.read_text(encoding="utf-8")
    try:
        for i, (broken, needle) in enumerate((("{not json", "fixed evidence mix"),
                               (json.dumps({**json.loads(good), "features": list(FEATURES[:-1])}), "other features"),
                               (json.dumps({**json.loads(good), "embedding_model": "/elsewhere/model"}), "tune-ranker -c pumps"))):
            path.write_text(broken, encoding="utf-8")
            os.utime(path, ns=(1, (i + 1) * 10**9))  # a new mtime, so the cache re-reads it
            with pytest.warns(UserWarning, match=needle.replace("-", r"\-")):
                assert load_ranker(col) is None
    finally:
        path.write_text(good, encoding="utf-8")
    with pytest.raises(RankerError, match="must be > 0"):
        train_ranker(col, train, k=4, mode="hybrid", c=0, echo=lambda _: None)
    with pytest.raises(RankerError, match="at least 5"):
        train_ranker(col, [{"question": "What is the colour of the moon?", "answer": "cheese"}], k=4, mode="hybrid",
                     echo=lambda _: None)


def test_tune_ranker_cli_names_a_bad_row_and_keeps_an_existing_ranker(ranked_home, tmp_path):
    from serving.ranker import ranker_path

    home, train, _ = ranked_home
    env = {**os.environ, "RAGTUNE_HOME": str(home)}
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(train[0]) + "\n{oops\n", encoding="utf-8")
    out = subprocess.run([RAGTUNE, "tune-ranker", "-c", "pumps", "--questions", str(bad)], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip().startswith("error: ") and "bad.jsonl, row 2: not valid JSON" in out.stderr, out.stderr
    (tmp_path / "latin1.jsonl").write_bytes('{"question": "Qu\u00e9?", "answer": "1"}\n'.encode("latin-1"))
    wrong = subprocess.run([RAGTUNE, "tune-ranker", "-c", "pumps", "--questions", str(tmp_path / "latin1.jsonl")],
                           capture_output=True, text=True, env=env, timeout=300)
    assert wrong.returncode == 1 and "latin1.jsonl: not UTF-8 text" in wrong.stderr, wrong.stderr
    col = trained(home, train)
    before = ranker_path(col).read_bytes()
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps(r) + "\n" for r in train), encoding="utf-8")
    kept = subprocess.run([RAGTUNE, "tune-ranker", "-c", "pumps", "--questions", str(good), "--if-missing"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert kept.returncode == 0 and "kept" in kept.stdout and ranker_path(col).read_bytes() == before
