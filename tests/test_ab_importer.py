"""The SQuAD importer on a tiny file written here (with a wrong answer offset, as real files have)."""

from __future__ import annotations

import json

import pytest

from rag.collection import Workspace
from serving.ab.importer import SquadImportError, import_squad, locate


def squad_file(path):
    articles = []
    for n, (topic, fact, value) in enumerate([
        ("Harbour pumps", "The harbour pump moves", "40 litres per second"),
        ("Valley turbines", "Each valley turbine produces", "2.5 megawatts"),
        ("Orchard sensors", "An orchard sensor reports every", "15 minutes"),
        ("Bridge cables", "The bridge cable carries", "900 tonnes"),
    ]):
        context = f"{topic} are described here. {fact} {value} under normal load. Maintenance happens yearly."
        start = context.index(value)
        articles.append({"title": topic, "paragraphs": [{"context": context, "qas": [
            {"id": f"q{n}a", "question": f"How much does the {topic.lower()[:-1]} handle?",
             "answers": [{"text": value, "answer_start": start + (7 if n == 1 else 0)}]},  # one wrong offset
            {"id": f"q{n}b", "question": f"How often is {topic.lower()} maintenance?",
             "answers": [{"text": "yearly", "answer_start": context.index("yearly")}]},
        ]}]})
    path.write_text(json.dumps({"version": "test", "data": articles}), encoding="utf-8")
    return path


def test_locate_prefers_the_stated_offset_then_the_nearest_match():
    assert locate("a b a b", "b", 6) == 6
    assert locate("a b a b", "b", 5) == 6
    assert locate("a b a b", "b", 0) == 2
    assert locate("a b", "c", 0) is None


def test_import_builds_collection_split_by_document_and_raft(home, tmp_path):
    out = tmp_path / "out"
    report = import_squad(squad_file(tmp_path / "s.json"), "tiny", out, test_share=0.25)
    assert report.documents == 4 and report.questions == 8 and report.located_by_text == 1
    train = [json.loads(l) for l in (out / "train.jsonl").read_text().splitlines()]
    test = [json.loads(l) for l in (out / "test.jsonl").read_text().splitlines()]
    assert len(train) == 6 and len(test) == 2
    assert not {q["doc"] for q in train} & {q["doc"] for q in test}
    col = Workspace(home).get("tiny")
    for q in train + test:
        text = col.document_text(q["doc"])
        assert text[q["span"][0]:q["span"][1]] == q["answer"]
    raft = [json.loads(l) for l in (out / "raft_train.jsonl").read_text().splitlines()]
    assert raft and all("Sources:" in r["context"] and r["question"] for r in raft)
    assert any("[" in r["answer"] and "Evidence" in r["answer"] for r in raft)
    held_out = {q["doc"] for q in test}
    assert all(s["doc"] not in held_out for r in raft for s in r["sources"])  # not even as distractors


def test_a_file_that_is_not_squad_is_refused_with_the_shape(home, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"rows": []}')
    with pytest.raises(SquadImportError, match="not SQuAD format"):
        import_squad(bad, "x", tmp_path / "o")
