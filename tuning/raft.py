"""RAFT examples (retrieval-augmented fine-tuning) built from an indexed collection.

    ragtune data raft --collection corvida --questions corpora/corvida/qa/train.jsonl --out raft.jsonl

For each question with its source document (``doc`` and the supporting ``span`` in the document text):

- the **oracle** is the chunk of that document that holds the span (the chunk with the largest overlap);
- the **distractors** are the collection's own top hits for the question that are not the oracle
  (hard negatives: they look relevant to the retriever but do not hold the answer);
- sources are shuffled and numbered ``[1]..[n]``; the target answer cites the oracle by its number and
  quotes the supporting text, ``{answer} [n]`` then ``Evidence [n]: "{quote}"``;
- a check rejects a row whose quoted text is not verbatim in the oracle chunk (counted, never written);
- a share of the rows (``no_oracle_share``, default 20%) gets distractors only: as in the RAFT paper the
  target is then the plain answer, which teaches the model to answer from memory when retrieval misses;
  questions with no source (``doc: null``, "unanswerable") also get distractors only and keep their answer;
- **abstention rows** (``abstain_share`` of the no-oracle rows, default 0 = off): the target is the
  collection's "not in the sources" sentence (``refusal``) instead of the answer, and every
  unanswerable question gets that target too. Without them, rows without their oracle teach a small
  model to answer from memory even when the sources do not hold the answer (issue 11);
- a distractor never holds the answer: a hit whose text contains the answer (as whole words, case and
  spacing ignored) is dropped, so the same fact repeated in another document cannot turn an abstention
  row into "refuse although the sources say it" (28 of the demo's 79 abstention rows did before);
- train and test are split by source document (``test_share``), so no test document is seen in training.

Output rows are ``{"question", "context", "answer", ...}``: the ``qa`` record shape ``ragtune tune`` reads.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.files import write_atomic
from tuning.errors import RaftError


@dataclass
class RaftReport:
    questions: int = 0
    written: int = 0
    test_written: int = 0
    with_oracle: int = 0
    without_oracle: int = 0
    abstain: int = 0
    unanswerable: int = 0
    rejected_quote: int = 0
    skipped_unknown_doc: int = 0
    skipped_no_span: int = 0
    distractors_with_answer: int = 0  # top hits that held the answer, replaced by the next ones
    test_docs: list[str] = field(default_factory=list)
    out: str = ""
    test_out: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _find_doc(col, doc: str, known: list[str]) -> str | None:
    if doc in known:
        return doc
    matches = [d for d in known if d.endswith("/" + doc.lstrip("/"))]
    return matches[0] if len(matches) == 1 else None


def find_answer(text: str, answer: str) -> tuple[int, int] | None:
    """Where ``answer`` occurs in ``text`` as whole words, case and spacing ignored ("7 years" is in "after 7
    years," but "6" is not in "16"), as offsets into ``text``; None when it does not or ``answer`` is empty."""
    words = answer.split()
    if not words:
        return None
    m = re.search(r"(?<!\w)" + r"\s+".join(map(re.escape, words)) + r"(?!\w)", text, re.IGNORECASE)
    return m.span() if m else None


def holds_answer(text: str, answer: str) -> bool:
    return find_answer(text, answer) is not None


def _oracle_chunk(col, doc: str, span: tuple[int, int]):
    best, best_overlap = None, 0
    for chunk in col.chunks(doc):
        overlap = min(chunk.end, span[1]) - max(chunk.start, span[0])
        if overlap > best_overlap:
            best, best_overlap = chunk, overlap
    return best


# The prompt layout RAFT rows are trained on and serving's rag modes answer with (serving.prompts
# imports these), so an adapter sees at serving time exactly the layout it learned.
SYSTEM_PLAIN = "You are a helpful assistant. Answer the user's question briefly and accurately."
SYSTEM_RAG = ("You are a helpful assistant. Answer the question using only the numbered sources. "
              "Cite the sources you use like [1]. If the sources do not contain the answer, say you do not know.")


REFUSAL = "The sources do not say."  # the default "not in the sources" sentence (serving's refusal_text)


def format_source(n: int, doc: str, text: str, section: str | None = None) -> str:
    where = f"{doc} - {section}" if section else doc
    return f"[{n}] ({where})\n{' '.join(text.split())}"


def format_context(sources: list[dict]) -> str:
    return "Sources:\n" + "\n\n".join(format_source(i, s["doc"], s["text"], s.get("section"))
                                         for i, s in enumerate(sources, 1))


def build_raft(col, questions: list[dict], distractors: int = 3, no_oracle_share: float = 0.2,
               test_share: float = 0.0, seed: int = 42, search_mode: str = "hybrid",
               exclude_docs: set[str] | frozenset[str] = frozenset(), abstain_share: float = 0.0,
               refusal: str = REFUSAL) -> tuple[list[dict], list[dict], RaftReport]:
    """(train rows, test rows, report) for ``questions`` over collection ``col``.

    ``exclude_docs``: documents never used as distractors (e.g. those of a held-out "unseen" set, so
    no training row shows their text)."""
    exclude = set(exclude_docs)
    if not 0.0 <= no_oracle_share <= 1.0:
        raise RaftError("--no-oracle-share must be between 0 and 1 (example: --no-oracle-share 0.2)")
    if not 0.0 <= test_share < 1.0:
        raise RaftError("--test-share must be in [0, 1) (example: --test-share 0.2)")
    if not 0.0 <= abstain_share <= 1.0:
        raise RaftError("--abstain-share must be between 0 and 1 (example: --abstain-share 0.5)")
    if abstain_share > 0 and not refusal.strip():
        raise RaftError("--refusal must not be empty (example: --refusal 'The sources do not say.')")
    if distractors < 0:
        raise RaftError("--distractors must be >= 0 (example: --distractors 3)")
    rng = random.Random(seed)
    report = RaftReport(questions=len(questions))
    known = [d["path"] for d in col.documents()]
    if not known:
        raise RaftError(f"collection {col.name!r} holds no documents; index some with `ragtune index PATH --collection {col.name}`")

    # documents for the test split (by source document, never by row)
    docs = sorted({q["doc"] for q in questions if q.get("doc")})
    n_test = int(round(len(docs) * test_share))
    test_docs = set(rng.sample(docs, n_test)) if n_test else set()
    report.test_docs = sorted(test_docs)
    # exactly round(share * n) answerable rows go without their oracle
    answerable = [i for i, q in enumerate(questions) if q.get("doc")]
    no_oracle = set(rng.sample(answerable, int(round(len(answerable) * no_oracle_share))))
    abstain = set(rng.sample(sorted(no_oracle), int(round(len(no_oracle) * abstain_share))))

    train, test = [], []
    for i, q in enumerate(questions):
        question, answer = str(q.get("question", "")).strip(), str(q.get("answer", "")).strip()
        if not question or not answer:
            raise RaftError(f"questions row {i + 1}: needs non-empty 'question' and 'answer' fields")
        oracles = []
        quote = None
        if q.get("doc"):
            doc = _find_doc(col, q["doc"], known)
            if doc is None:
                report.skipped_unknown_doc += 1
                continue
            span = q.get("span")
            if not span or len(span) != 2:
                report.skipped_no_span += 1
                continue
            oracle = _oracle_chunk(col, doc, (int(span[0]), int(span[1])))
            text = col.document_text(doc)
            quote = text[int(span[0]):int(span[1])].strip()
            if oracle is None or not quote or quote not in oracle.text:
                report.rejected_quote += 1  # the cited evidence must be verbatim in the oracle
                continue
            oracles.append({"chunk_id": oracle.id, "doc": doc, "text": oracle.text,
                            "section": oracle.metadata.get("section")})
            for extra in q.get("also") or []:  # multihop: the second document's chunk is an oracle too
                d2 = _find_doc(col, extra.get("doc") or "", known)
                if d2 and extra.get("span"):
                    c2 = _oracle_chunk(col, d2, tuple(extra["span"]))
                    if c2 is not None and c2.id != oracle.id:
                        oracles.append({"chunk_id": c2.id, "doc": d2, "text": c2.text, "section": c2.metadata.get("section")})
        oracle_ids = {o["chunk_id"] for o in oracles}
        use_oracle = bool(oracles) and i not in no_oracle
        wanted = distractors + (0 if use_oracle else len(oracles) or 1)
        hits = col.search(question, k=wanted + len(oracle_ids) + 10 + (8 if exclude else 0), mode=search_mode)
        candidates = [h for h in hits if h.chunk_id not in oracle_ids and h.doc not in exclude]
        if oracles:  # a hit that holds the answer is no distractor (an unanswerable row has no answer to find)
            holding = [holds_answer(h.text, answer) for h in candidates]
            report.distractors_with_answer += sum(holding[:wanted])
            candidates = [h for h, held in zip(candidates, holding) if not held]
        negatives = [{"chunk_id": h.chunk_id, "doc": h.doc, "text": h.text, "section": h.metadata.get("section")}
                     for h in candidates][:wanted]
        sources = (oracles if use_oracle else []) + negatives
        rng.shuffle(sources)
        if use_oracle:
            numbers = sorted(sources.index(o) + 1 for o in oracles)
            primary = sources.index(oracles[0]) + 1
            cites = "".join(f"[{n}]" for n in numbers)
            # the quote as it reads in the prompt (format_source flattens whitespace)
            target = f"{answer} {cites}\n\nEvidence [{primary}]: \"{' '.join(quote.split())}\""
            if quote not in sources[primary - 1]["text"]:  # the check, on the final numbering
                report.rejected_quote += 1
                continue
            report.with_oracle += 1
        elif abstain_share > 0 and (i in abstain or not oracles):
            target = refusal.strip()  # the sources shown do not hold the answer: say so
            report.abstain += 1
            if not oracles:
                report.unanswerable += 1
        else:
            target = answer
            if oracles:
                report.without_oracle += 1
            else:
                report.unanswerable += 1
        row = {"id": q.get("id", f"q{i + 1}"), "system": SYSTEM_RAG, "question": question,
               "context": format_context(sources), "answer": target,
               "doc": q.get("doc"), "oracle": use_oracle,
               "row_type": "oracle" if use_oracle else ("abstain" if target == refusal.strip() and abstain_share > 0 else "no_oracle"),
               "sources": [{"doc": s["doc"], "chunk_id": s["chunk_id"]} for s in sources]}
        doc_key = q.get("doc")
        is_test = doc_key in test_docs if doc_key else (test_share > 0 and rng.random() < test_share)
        (test if is_test else train).append(row)
    report.written, report.test_written = len(train), len(test)
    if not train and not test:
        raise RaftError("no RAFT rows could be built: check that the questions' 'doc' paths match the collection's "
                        "documents (`ragtune collections`) and that their spans point into the document text")
    return train, test, report


def write_raft(home, collection: str, questions_file: str | Path, out: str | Path, distractors: int = 3,
               no_oracle_share: float = 0.2, test_share: float = 0.0, seed: int = 42,
               exclude_docs_from: list[str | Path] = (), abstain_share: float = 0.0, refusal: str = "") -> RaftReport:
    """Read questions (JSONL), build rows from ``collection``, write ``out`` (+ ``<out>.test.jsonl``)."""
    from rag.collection import Workspace

    qpath = Path(questions_file)
    if not qpath.exists():
        raise RaftError(f"{questions_file}: file not found (questions JSONL with question, answer, doc, span)")
    questions = []
    for n, line in enumerate(qpath.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                questions.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise RaftError(f"{questions_file}, row {n}: not valid JSON ({exc.msg})") from None
    exclude: set[str] = set()
    for path in exclude_docs_from:
        for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    doc = json.loads(line).get("doc")
                except (json.JSONDecodeError, AttributeError):
                    raise RaftError(f"{path}, row {n}: not a JSON object with a 'doc' field") from None
                if doc:
                    exclude.add(doc)
    col = Workspace(home).get(collection)
    train, test, report = build_raft(col, questions, distractors, no_oracle_share, test_share, seed, exclude_docs=exclude,
                                     abstain_share=abstain_share, refusal=refusal or REFUSAL)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(out, train)
    report.out = str(out)
    if test_share > 0:
        test_out = out.with_name(out.stem + ".test" + (out.suffix or ".jsonl"))
        write_jsonl(test_out, test)
        report.test_out = str(test_out)
    return report


def write_jsonl(path: Path, rows: list[dict]) -> None:
    write_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
