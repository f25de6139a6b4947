"""RAFT examples from a real collection (real embedder, SQLite, FAISS)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import write_jsonl
from rag.collection import IndexConfig, Workspace
from tuning.errors import RaftError
from tuning.raft import SYSTEM_RAG, build_raft

FACTS = {
    "hx.md": ["The HX-9 heat pump delivers 9 kW of heating.", "The warranty on HX units lasts seven years.",
              "Error E07 means low water flow; check the strainer.", "The HX-9 uses R290 as its refrigerant."],
    "lumo.md": ["The Lumo 2 controller costs 189 EUR.", "Lumo pairs with the app over Bluetooth.",
                "Firmware updates for Lumo arrive every quarter.", "Lumo shows error E14 when the sensor is unplugged."],
    "company.md": ["Corvida was founded in 2011 in Aarhus.", "The Brenholt Works factory opened on 9 September 2016.",
                   "Support is open Saturday 09:00-13:00.", "Corvida employs 420 people."],
    "service.md": ["A yearly service costs 140 EUR.", "Service visits are booked through the app.",
                   "Technicians carry spare strainers.", "The service contract renews each January."],
}
FILLER = "This paragraph adds unrelated background so that documents span several chunks of text. " * 3
# a fact repeated in a second document (no question of its own): it must never be a distractor for that fact
REPEATED = ("faq.md", "The warranty on HX units lasts seven years.")


@pytest.fixture(scope="module")
def raft_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("raft-docs")
    home = tmp_path_factory.mktemp("raft-home")
    questions = []
    for name, facts in FACTS.items():
        text = "".join(f"{fact} {FILLER}\n\n" for fact in facts)
        (root / name).write_text(text, encoding="utf-8")
        for fact in facts:
            start = text.index(fact)
            questions.append({"id": f"{name}-{start}", "question": f"What is true here: {fact.split(' ', 3)[-1]}?",
                              "answer": fact, "doc": name, "span": [start, start + len(fact)]})
    questions.append({"id": "none", "question": "What colour is the CEO's car?", "answer": "The knowledge base does not say.",
                      "doc": None, "span": None})
    (root / REPEATED[0]).write_text(f"# Frequent questions\n\nHow long is the cover? {REPEATED[1]}\n", encoding="utf-8")
    ws = Workspace(home)
    ws.create("demo", IndexConfig(chunk_tokens=48, chunk_overlap=0))
    ws.index("demo", [root])
    return ws.get("demo"), questions, home


def test_rows_hold_oracle_and_hard_negatives_with_cited_answers(raft_setup):
    col, questions, _ = raft_setup
    train, test, report = build_raft(col, questions, distractors=2, no_oracle_share=0.25, seed=3)
    answerable = len(questions) - 1
    assert report.without_oracle == round(answerable * 0.25)  # the share is exact, not just expected
    assert report.unanswerable == 1 and report.rejected_quote == 0
    assert report.with_oracle + report.without_oracle + report.unanswerable == len(train) == len(questions)
    for row in train:
        numbered = re.findall(r"(?m)^\[(\d+)\] \(", row["context"])
        assert numbered == [str(i) for i in range(1, len(row["sources"]) + 1)]
        q = next(q for q in questions if q["id"] == row["id"])
        if row["oracle"]:
            assert len(row["sources"]) == 3
            oracle_docs = [i for i, s in enumerate(row["sources"], 1) if s["doc"] == q["doc"]]
            cited = int(row["answer"].split("Evidence [", 1)[1].split("]", 1)[0])
            assert cited in oracle_docs and f"[{cited}]" in row["answer"].split("\n")[0]
            quoted = row["answer"].split('"')[1]
            source_text = row["context"].split(f"[{cited}] ({q['doc']}", 1)[1].split("\n", 1)[1]
            assert quoted in source_text and quoted == q["answer"]
        else:
            assert row["answer"] == q["answer"]  # memorise when retrieval misses (RAFT); no citation
            if q["doc"]:
                chunk_texts = [c.text for c in col.chunks(q["doc"])]
                holder = next(c for c in chunk_texts if q["answer"] in c)
                assert holder.strip() not in row["context"]


def test_quote_check_and_doc_split(raft_setup):
    col, questions, _ = raft_setup
    whole = col.document_text("hx.md")
    spanning = {"id": "wide", "question": "Tell me everything about HX.", "answer": "Lots.", "doc": "hx.md", "span": [0, len(whole)]}
    train, test, report = build_raft(col, questions + [spanning], distractors=1, no_oracle_share=0.0, test_share=0.5, seed=1)
    assert report.rejected_quote == 1  # a quote that no single chunk holds is never written
    assert "wide" not in {r["id"] for r in train + test}
    train_docs = {r["doc"] for r in train if r["doc"]}
    test_docs = {r["doc"] for r in test if r["doc"]}
    assert train_docs and test_docs and not train_docs & test_docs
    assert test_docs == set(report.test_docs)
    with pytest.raises(RaftError, match="no-oracle-share"):
        build_raft(col, questions, no_oracle_share=1.5)


def test_cli_writes_train_and_test_files(raft_setup, tmp_path):
    from typer.testing import CliRunner

    from serving import cli

    _, questions, home = raft_setup
    qfile = write_jsonl(tmp_path / "q.jsonl", questions)
    out = tmp_path / "raft.jsonl"
    cli._register_plugins()
    result = CliRunner().invoke(cli.app, ["data", "raft", "--collection", "demo", "--questions", str(qfile), "--out", str(out),
                                          "--no-oracle-share", "0.5", "--distractors", "1", "--test-share", "0.25",
                                          "--json", "--home", str(home)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    test_rows = [json.loads(line) for line in (tmp_path / "raft.test.jsonl").read_text().splitlines()]
    assert len(rows) == report["written"] and len(test_rows) == report["test_written"] and test_rows
    assert report["without_oracle"] == round((len(questions) - 1) * 0.5)
    # the rows are the qa shape ragtune tune reads
    from tuning.data import load_records

    messages = load_records(out, "raft")[0].messages
    assert messages[0] == {"role": "system", "content": SYSTEM_RAG}  # the system prompt serving's rag modes use
    assert messages[1]["content"].startswith("Sources:\n[1]")


def test_excluded_documents_are_never_distractors(raft_setup):
    col, questions, _ = raft_setup
    answerable = [q for q in questions if q["doc"]]
    banned = {q["doc"] for q in answerable[:1]}
    others = [q for q in answerable if q["doc"] not in banned]
    train, _, _ = build_raft(col, others, distractors=3, no_oracle_share=0.0, seed=2, exclude_docs=banned)
    assert train and all(s["doc"] not in banned for row in train for s in row["sources"])


def test_abstention_rows_target_the_refusal_and_their_labels_cover_it(raft_setup, smol_tokenizer, tune_home, tmp_path):
    """Issue 11: rows without their oracle (a stated share) and unanswerable questions teach the refusal
    sentence; the label mask trains exactly that sentence (+ EOS), and such rows train."""
    from tuning.data import load_records, tokenize_example
    from tuning.run import tune

    col, questions, _ = raft_setup
    refusal = "The sources do not say."
    train, _, report = build_raft(col, questions, distractors=2, no_oracle_share=0.5, seed=4, abstain_share=0.5,
                                  refusal=refusal)
    answerable = len(questions) - 1
    no_oracle = round(answerable * 0.5)
    assert report.abstain == round(no_oracle * 0.5) + 1  # the share of no-oracle rows, and the unanswerable one
    assert report.without_oracle == no_oracle - round(no_oracle * 0.5)
    abstain_rows = [r for r in train if r["row_type"] == "abstain"]
    assert len(abstain_rows) == report.abstain and all(r["answer"] == refusal for r in abstain_rows)
    for row in abstain_rows:  # the sources shown never hold the answer of an abstention row
        q = next(q for q in questions if q["id"] == row["id"])
        if q["doc"]:
            assert all(s["doc"] != q["doc"] or q["answer"] not in row["context"] for s in row["sources"])
    assert {r["row_type"] for r in train} == {"oracle", "no_oracle", "abstain"}

    path = write_jsonl(tmp_path / "abstain.jsonl", abstain_rows)
    messages = load_records(path, "raft")[0].messages
    example = tokenize_example(smol_tokenizer, messages, 1024, "drop")
    trained = [t for t, label in zip(example["input_ids"], example["labels"]) if label != -100]
    assert smol_tokenizer.decode(trained).strip().startswith(refusal)  # the target, and nothing of the prompt
    assert smol_tokenizer.decode(trained).replace(refusal, "").strip() in ("<|im_end|>", "<|im_end|>\n")
    tune(None, [f"data={path}", "name=abstain", "max_steps=2", "batch_size=2", "max_seq_len=1024", "logging_steps=1",
                "val_share=0", "forgetting_probe=false", "progress=false", "threads=1"], home=tune_home, echo=lambda *_: None)
    assert (tune_home / "adapters" / "abstain" / "adapter_model.safetensors").exists()
    manifest = json.loads((tune_home / "adapters" / "abstain" / "ragtune.json").read_text())
    events = [json.loads(line) for line in (Path(manifest["run_dir"]) / "log.jsonl").read_text().splitlines()]
    losses = [e["loss"] for e in events if e["event"] == "train" and "loss" in e]
    assert losses and all(0 < x < 20 for x in losses)
    with pytest.raises(RaftError, match="abstain-share"):
        build_raft(col, questions, abstain_share=2.0)


def test_a_hit_that_holds_the_answer_is_never_a_distractor(raft_setup):
    """The warranty fact is also in faq.md: its chunk ranks high for the warranty question, but no row
    (with or without its oracle, abstention or not) shows it as a distractor; the report counts it."""
    from tuning.raft import holds_answer

    col, questions, _ = raft_setup
    warranty = [q for q in questions if q["answer"] == REPEATED[1]]
    top = col.search(warranty[0]["question"], k=4)
    assert REPEATED[0] in [h.doc for h in top]  # without the rule it would be picked as a hard negative
    for share in (0.0, 1.0):
        train, _, report = build_raft(col, warranty, distractors=3, no_oracle_share=share, abstain_share=share, seed=1)
        assert len(train) == 1 and report.distractors_with_answer >= 1
        assert REPEATED[0] not in [s["doc"] for s in train[0]["sources"]]
        assert train[0]["answer"] == ("The sources do not say." if share else train[0]["answer"])
        if share:  # the abstention row's sources really do not hold the answer
            assert not holds_answer(train[0]["context"], REPEATED[1])
    assert holds_answer("Cover: after 7 years,\nit ends.", "7 YEARS") and not holds_answer("16 months", "6")
