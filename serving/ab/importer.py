"""Import a SQuAD-format file as a collection plus question files split by document.

    ragtune import squad ../shared/datasets/covid_qa/200423_covidQA.json --collection covidqa --out data/covidqa

One document per article (its paragraphs joined by a blank line; ``--per context`` makes one per
paragraph), written as UTF-8 text files under ``<out>/docs/`` and indexed like any folder. Answers
are located by their text, since real files carry wrong ``answer_start`` offsets (234 of 1,380 in
COVID-QA): the occurrence nearest the stated offset wins. Questions are split into ``train.jsonl``
and ``test.jsonl`` by document, so no test document is seen in training, and RAFT training examples
are built from the train questions over the new collection (``raft_train.jsonl``).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


class SquadImportError(ValueError):
    """A SQuAD file that cannot be imported; the message says which entry and what to do."""


@dataclass
class ImportReport:
    documents: int = 0
    questions: int = 0
    train: int = 0
    test: int = 0
    located_by_text: int = 0  # answer_start was wrong; the answer was found by its text
    unlocated: int = 0  # answer text not in its context: question dropped
    unanswerable: int = 0  # SQuAD 2.0 rows with no answer: kept as "does not say"
    raft: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _slug(text: str, n: int) -> str:
    words = re.findall(r"[a-z0-9]+", text.lower())[:8]
    return f"{n:04d}-" + ("-".join(words) or "doc")


def locate(context: str, answer: str, start: int | None) -> int | None:
    """Offset of ``answer`` in ``context``: the given start if right, else the nearest occurrence."""
    if start is not None and 0 <= start and context[start:start + len(answer)] == answer:
        return start
    found = [m.start() for m in re.finditer(re.escape(answer), context)]
    if not found:
        return None
    return min(found, key=lambda o: abs(o - (start or 0)))


def parse_squad(path: Path, per: Literal["article", "context"] = "article") -> tuple[dict[str, str], list[dict], ImportReport]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SquadImportError(f"{path}: file not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SquadImportError(f"{path}: not a UTF-8 JSON file ({exc})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("data"), list):
        raise SquadImportError(f'{path}: not SQuAD format: expected {{"data": [{{"title", "paragraphs": [...]}}]}}')
    report = ImportReport()
    docs: dict[str, str] = {}
    questions: list[dict] = []
    for a_index, article in enumerate(raw["data"]):
        paragraphs = article.get("paragraphs") if isinstance(article, dict) else None
        if not isinstance(paragraphs, list):
            raise SquadImportError(f"{path}: data[{a_index}] has no 'paragraphs' list")
        title = str(article.get("title") or (paragraphs[0].get("context", "")[:80] if paragraphs else f"article {a_index}"))
        groups = [[p] for p in paragraphs] if per == "context" else [paragraphs]
        for g_index, group in enumerate(groups):
            name = _slug(title, len(docs)) + ".txt"
            parts, offsets, length = [], [], 0
            for p in group:
                context = str(p.get("context", ""))
                offsets.append(length)
                parts.append(context)
                length += len(context) + 2
            text = "\n\n".join(parts)
            if not text.strip():
                continue
            docs[name] = text
            for p, base in zip(group, offsets):
                context = str(p.get("context", ""))
                for qa in p.get("qas", []):
                    qid = str(qa.get("id", f"{a_index}-{len(questions)}"))
                    question = str(qa.get("question", "")).strip()
                    answers = qa.get("answers") or []
                    if not question:
                        continue
                    if not answers or qa.get("is_impossible"):
                        report.unanswerable += 1
                        questions.append({"id": qid, "question": question, "answer": "The knowledge base does not say.",
                                          "doc": None, "span": None, "kind": "unanswerable"})
                        continue
                    answer = str(answers[0].get("text", ""))
                    start = answers[0].get("answer_start")
                    found = locate(context, answer, start if isinstance(start, int) else None)
                    if found is None or not answer.strip():
                        report.unlocated += 1
                        continue
                    if found != start:
                        report.located_by_text += 1
                    questions.append({"id": qid, "question": question, "answer": answer, "doc": name,
                                      "span": [base + found, base + found + len(answer)], "kind": "fact"})
    report.documents, report.questions = len(docs), len(questions)
    return docs, questions, report


def import_squad(path: str | Path, collection: str, out: str | Path, *, test_share: float = 0.3, seed: int = 13,
                 per: Literal["article", "context"] = "article", raft: bool = True, home: str | None = None,
                 progress: bool = False) -> ImportReport:
    from rag.collection import Workspace
    from tuning.raft import write_jsonl

    if not 0 < test_share < 1:
        raise SquadImportError("--test-share must be between 0 and 1 (example: --test-share 0.3)")
    docs, questions, report = parse_squad(Path(path), per)
    if not docs:
        raise SquadImportError(f"{path}: no contexts with text")
    out = Path(out)
    folder = out / "docs"
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in docs.items():
        target = folder / name
        if not target.exists() or target.read_text(encoding="utf-8") != text:
            target.write_text(text, encoding="utf-8")
    names = sorted(docs)
    rng = random.Random(seed)
    test_docs = set(rng.sample(names, max(1, round(len(names) * test_share))))
    train = [q for q in questions if q["doc"] and q["doc"] not in test_docs]
    test = [q for q in questions if q["doc"] in test_docs]
    unanswerable = [q for q in questions if not q["doc"]]
    rng.shuffle(unanswerable)
    cut = round(len(unanswerable) * test_share)
    test += unanswerable[:cut]
    train += unanswerable[cut:]
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "test.jsonl", test)
    report.train, report.test = len(train), len(test)
    ws = Workspace(home)
    ws.index(collection, [folder], sync=True, progress=progress)
    report.files = {"docs": str(folder), "train": str(out / "train.jsonl"), "test": str(out / "test.jsonl")}
    if raft:
        from tuning.raft import build_raft

        # test documents never appear, not even as distractors, so the test split stays unseen
        rows, _, raft_report = build_raft(ws.get(collection), train, seed=seed, exclude_docs=test_docs)
        write_jsonl(out / "raft_train.jsonl", rows)
        report.raft = {k: v for k, v in raft_report.to_dict().items() if k not in ("test_docs", "out", "test_out")}
        report.files["raft_train"] = str(out / "raft_train.jsonl")
    return report
