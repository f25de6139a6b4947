"""Consistency checks for the bundled corpora (corpora/corvida and corpora/general).

Standard library + pypdf only, and fast: every file is read once and cached.
Each test collects all problems it finds and reports them together, naming the file and row id.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from functools import lru_cache
from pathlib import Path

import pypdf
import pytest

CORPORA = Path(__file__).resolve().parents[1] / "corpora"
CORVIDA = CORPORA / "corvida"
DOCS = CORVIDA / "docs"
QA = CORVIDA / "qa"
INSTRUCTIONS = CORVIDA / "instructions"
CLASSIFICATION = CORVIDA / "classification"
GENERAL = CORPORA / "general"

QA_SPLITS = ("train", "test", "unseen")
KINDS = {"fact", "revised", "yesno", "choice", "multihop", "unanswerable"}
UNANSWERABLE = "The knowledge base does not say."
TASKS = {"summarise", "extract", "rewrite"}
LABELS = {"fault_report", "billing", "booking", "warranty", "app_help", "praise"}
DOC_SUFFIXES = {".md", ".txt", ".html", ".pdf"}

MAX_REPORTED = 40  # problems listed in one assertion message


# --------------------------------------------------------------------------- helpers


def _rel(path: Path) -> str:
    try:
        return str(path.relative_to(CORPORA.parent))
    except ValueError:
        return str(path)


def _check(problems: list[str], what: str) -> None:
    if problems:
        shown = problems[:MAX_REPORTED]
        more = f"\n... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
        pytest.fail(f"{what}: {len(problems)} problem(s)\n" + "\n".join(shown) + more, pytrace=False)


@lru_cache(maxsize=None)
def load_jsonl(path: Path) -> tuple[tuple[int, object], ...]:
    """(line number, parsed object) for every non-blank line; raises on missing file or bad JSON."""
    if not path.is_file():
        hint = f" (concatenate qa/parts/*.{path.stem}.jsonl into it)" if path.parent == QA else ""
        pytest.fail(f"{_rel(path)} is missing{hint}", pytrace=False)
    parsed: list[tuple[int, object]] = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            parsed.append((lineno, json.loads(line)))
        except json.JSONDecodeError as exc:
            error = f"{_rel(path)}:{lineno}: invalid JSON ({exc})"
            break
    else:
        return tuple(parsed)
    pytest.fail(error, pytrace=False)


def rows(path: Path) -> list[dict]:
    return [obj for _, obj in load_jsonl(path)]


def row_name(path: Path, lineno: int, obj: object) -> str:
    rid = obj.get("id") if isinstance(obj, dict) else None
    return f"{_rel(path)}:{lineno}" + (f" [{rid}]" if rid is not None else "")


def qa_path(split: str) -> Path:
    return QA / f"{split}.jsonl"


def qa_rows(split: str) -> list[dict]:
    return rows(qa_path(split))


def all_qa() -> list[tuple[str, int, dict]]:
    """(split, line number, row) for every question row in train/test/unseen."""
    out = []
    for split in QA_SPLITS:
        for lineno, obj in load_jsonl(qa_path(split)):
            out.append((split, lineno, obj))
    return out


def instruction_files() -> list[Path]:
    files = sorted(INSTRUCTIONS.glob("*.jsonl"))
    if not files:
        pytest.fail(f"no instruction files in {_rel(INSTRUCTIONS)}", pytrace=False)
    return files


def doc_files() -> list[Path]:
    return sorted(p for p in DOCS.rglob("*") if p.is_file())


@lru_cache(maxsize=None)
def doc_text(rel: str) -> str:
    """Document text as WRITERS.md defines it: UTF-8 file text, or pypdf pages joined by blank lines."""
    path = DOCS / rel
    if path.suffix == ".pdf":
        reader = pypdf.PdfReader(str(path))
        return "\n\n".join(page.extract_text() for page in reader.pages)
    return path.read_text(encoding="utf-8")


def doc_exists(rel: object) -> bool:
    return isinstance(rel, str) and not rel.startswith("/") and ".." not in rel and (DOCS / rel).is_file()


def is_span(span: object) -> bool:
    return (
        isinstance(span, list)
        and len(span) == 2
        and all(isinstance(x, int) and not isinstance(x, bool) for x in span)
    )


def cited(row: dict) -> list[tuple[str, object]]:
    """(doc, span) pairs a question row cites: its own plus any multihop 'also' entries."""
    out = []
    if row.get("doc") is not None:
        out.append((row.get("doc"), row.get("span")))
    for extra in row.get("also") or []:
        if isinstance(extra, dict):
            out.append((extra.get("doc"), extra.get("span")))
    return out


def span_text(doc: str, span: list[int]) -> str | None:
    """The cited text, or None when the doc is missing or the span is malformed / out of range."""
    if not doc_exists(doc) or not is_span(span):
        return None
    text = doc_text(doc)
    start, end = span
    if not 0 <= start < end <= len(text):
        return None
    return text[start:end]


def bigrams(question: str) -> set[tuple[str, str]]:
    words = re.findall(r"[a-z0-9]+", question.lower())
    return set(zip(words, words[1:]))


def jaccard(a: set, b: set) -> float:
    union = a | b
    return len(a & b) / len(union) if union else 0.0


def cited_docs(split: str) -> set[str]:
    return {d for row in qa_rows(split) if isinstance(row, dict) for d, _ in cited(row) if isinstance(d, str)}


def instruction_docs() -> set[str]:
    docs = set()
    for path in instruction_files():
        for row in rows(path):
            if isinstance(row, dict) and isinstance(row.get("doc"), str):
                docs.add(row["doc"])
    return docs


# --------------------------------------------------------------------------- JSONL basics


def all_jsonl_files() -> list[Path]:
    return (
        [qa_path(s) for s in QA_SPLITS]
        + sorted(INSTRUCTIONS.glob("*.jsonl"))
        + [CLASSIFICATION / "train.jsonl", CLASSIFICATION / "test.jsonl", GENERAL / "questions.jsonl"]
    )


def test_every_jsonl_row_parses_as_an_object():
    problems = []
    if not any(INSTRUCTIONS.glob("*.jsonl")):
        problems.append(f"{_rel(INSTRUCTIONS)}: no instruction files")
    for path in all_jsonl_files():
        try:
            parsed = load_jsonl(path)  # fails on missing files and invalid JSON
        except pytest.fail.Exception as exc:
            problems.append(str(exc.msg))
            continue
        if not parsed:
            problems.append(f"{_rel(path)}: file has no rows")
        for lineno, obj in parsed:
            if not isinstance(obj, dict):
                problems.append(f"{_rel(path)}:{lineno}: row is {type(obj).__name__}, not an object")
    _check(problems, "JSONL files")


# --------------------------------------------------------------------------- Corvida documents


def test_docs_counts_and_formats():
    files = doc_files()
    problems = []
    odd = [p for p in files if p.suffix not in DOC_SUFFIXES]
    problems += [f"{_rel(p)}: unexpected document type" for p in odd]
    by_suffix = Counter(p.suffix for p in files)
    if len(files) < 40:
        problems.append(f"{_rel(DOCS)}: {len(files)} documents, need >= 40")
    if by_suffix[".md"] * 2 <= len(files):
        problems.append(f"{_rel(DOCS)}: only {by_suffix['.md']} of {len(files)} documents are .md (need most)")
    for suffix in (".txt", ".html", ".pdf"):
        if by_suffix[suffix] < 1:
            problems.append(f"{_rel(DOCS)}: no {suffix} document")
    words = 0
    for p in files:
        if p.suffix not in DOC_SUFFIXES:
            continue
        rel = p.relative_to(DOCS).as_posix()
        text = doc_text(rel)
        if not text.strip():
            problems.append(f"{_rel(p)}: document text is empty")
        words += len(text.split())
    if words < 25_000:
        problems.append(f"{_rel(DOCS)}: {words} words in all documents, need >= 25,000")
    _check(problems, "Corvida documents")


# --------------------------------------------------------------------------- question rows


def test_question_rows_have_required_fields_and_types():
    problems = []
    for split, lineno, row in all_qa():
        name = row_name(qa_path(split), lineno, row)
        if not isinstance(row, dict):
            continue  # reported by test_every_jsonl_row_parses_as_an_object
        for field in ("id", "question", "answer", "kind"):
            if not isinstance(row.get(field), str) or not row[field].strip():
                problems.append(f"{name}: '{field}' must be a non-empty string")
        kind = row.get("kind")
        if kind not in KINDS:
            problems.append(f"{name}: kind {kind!r} not in {sorted(KINDS)}")
            continue
        if kind == "unanswerable":
            if row.get("doc") is not None or row.get("span") is not None:
                problems.append(f"{name}: unanswerable row must have doc null and span null")
            if row.get("answer") != UNANSWERABLE:
                problems.append(f"{name}: unanswerable answer must be exactly {UNANSWERABLE!r}")
            if "fact" in row and not isinstance(row["fact"], str):
                problems.append(f"{name}: 'fact' must be a string when present")
            continue
        if not isinstance(row.get("doc"), str):
            problems.append(f"{name}: 'doc' must be a path string")
        if not is_span(row.get("span")):
            problems.append(f"{name}: 'span' must be [start, end] integers, got {row.get('span')!r}")
        if not isinstance(row.get("fact"), str) or not row["fact"].strip():
            problems.append(f"{name}: 'fact' must be a non-empty string")
        if kind == "multihop":
            also = row.get("also")
            if not isinstance(also, list) or not also:
                problems.append(f"{name}: multihop row needs a non-empty 'also' list")
            else:
                for extra in also:
                    if not (isinstance(extra, dict) and isinstance(extra.get("doc"), str) and is_span(extra.get("span"))):
                        problems.append(f"{name}: bad 'also' entry {extra!r}")
    _check(problems, "question row fields")


def test_question_ids_unique_across_files():
    seen: dict[str, str] = {}
    problems = []
    for split, lineno, row in all_qa():
        if not isinstance(row, dict):
            continue
        rid = row.get("id")
        where = f"{_rel(qa_path(split))}:{lineno}"
        if rid in seen:
            problems.append(f"{where}: id {rid!r} already used at {seen[rid]}")
        else:
            seen[rid] = where
    _check(problems, "question ids")


def test_cited_docs_exist_and_spans_in_range():
    problems = []
    for split, lineno, row in all_qa():
        if not isinstance(row, dict):
            continue
        name = row_name(qa_path(split), lineno, row)
        for doc, span in cited(row):
            if not doc_exists(doc):
                problems.append(f"{name}: doc {doc!r} does not exist under {_rel(DOCS)}")
            elif is_span(span) and span_text(doc, span) is None:
                problems.append(f"{name}: span {span} out of range for {doc} (text length {len(doc_text(doc))})")
    _check(problems, "question docs and spans")


def test_answers_supported_by_span():
    problems = []
    for split, lineno, row in all_qa():
        if not isinstance(row, dict) or row.get("kind") not in KINDS - {"unanswerable"}:
            continue
        name = row_name(qa_path(split), lineno, row)
        text = span_text(row.get("doc"), row.get("span"))
        if text is None:
            continue  # reported by test_cited_docs_exist_and_spans_in_range
        answer = row.get("answer")
        if row["kind"] in ("fact", "revised"):
            if isinstance(answer, str) and answer.lower() not in text.lower():
                problems.append(f"{name}: answer {answer!r} not found in span text {text[:120]!r}")
        elif not text.strip():
            problems.append(f"{name}: span text is blank")
        for extra in row.get("also") or []:
            if isinstance(extra, dict):
                extra_text = span_text(extra.get("doc"), extra.get("span"))
                if extra_text is not None and not extra_text.strip():
                    problems.append(f"{name}: 'also' span text in {extra.get('doc')} is blank")
    _check(problems, "answer support")


def test_choices_contain_answer():
    problems = []
    for split, lineno, row in all_qa():
        if not isinstance(row, dict):
            continue
        name = row_name(qa_path(split), lineno, row)
        kind, choices, answer = row.get("kind"), row.get("choices"), row.get("answer")
        if kind == "yesno":
            if not isinstance(choices, list) or sorted(choices) != ["no", "yes"]:
                problems.append(f"{name}: yesno choices must be ['yes', 'no'], got {choices!r}")
            if answer not in ("yes", "no"):
                problems.append(f"{name}: yesno answer must be 'yes' or 'no', got {answer!r}")
        elif kind == "choice":
            if not isinstance(choices, list) or not 3 <= len(choices) <= 4:
                problems.append(f"{name}: choice row needs 3-4 choices, got {choices!r}")
            elif len(set(choices)) != len(choices):
                problems.append(f"{name}: duplicate choices {choices!r}")
        if choices is not None and (not isinstance(choices, list) or answer not in choices):
            problems.append(f"{name}: answer {answer!r} is not one of the choices {choices!r}")
    _check(problems, "question choices")


def test_test_questions_do_not_copy_train_questions():
    train = [(r.get("id"), r.get("question", "")) for r in qa_rows("train") if isinstance(r, dict)]
    train_exact = {q.strip().lower(): rid for rid, q in train}
    train_bigrams = [(rid, bigrams(q)) for rid, q in train]
    problems = []
    for lineno, row in load_jsonl(qa_path("test")):
        if not isinstance(row, dict) or not isinstance(row.get("question"), str):
            continue
        name = row_name(qa_path("test"), lineno, row)
        q = row["question"]
        if q.strip().lower() in train_exact:
            problems.append(f"{name}: question identical to train row {train_exact[q.strip().lower()]}")
            continue
        mine = bigrams(q)
        worst_id, worst = None, 0.0
        for rid, theirs in train_bigrams:
            score = jaccard(mine, theirs)
            if score > worst:
                worst_id, worst = rid, score
        if worst >= 0.5:
            problems.append(f"{name}: word-bigram Jaccard {worst:.2f} >= 0.5 with train row {worst_id}")
    _check(problems, "test/train question overlap")


def test_unseen_documents_are_isolated():
    unseen_docs = cited_docs("unseen")
    problems = []
    train_docs = cited_docs("train")
    ins_docs = instruction_docs()
    for doc in sorted(unseen_docs & train_docs):
        problems.append(f"{_rel(qa_path('unseen'))}: unseen document {doc} is also cited by train rows")
    for doc in sorted(unseen_docs & ins_docs):
        problems.append(f"{_rel(qa_path('unseen'))}: unseen document {doc} is also used by instruction rows")
    for lineno, row in load_jsonl(qa_path("test")):
        if not isinstance(row, dict):
            continue
        for doc, _ in cited(row):
            if doc in unseen_docs:
                problems.append(f"{row_name(qa_path('test'), lineno, row)}: cites unseen document {doc}")
    _check(problems, "unseen document isolation")


def test_question_counts():
    problems = []
    minimum = {"train": 300, "test": 120, "unseen": 60}
    for split, need in minimum.items():
        n = len(qa_rows(split))
        if n < need:
            problems.append(f"{_rel(qa_path(split))}: {n} rows, need >= {need}")
    kinds = Counter(row.get("kind") for _, _, row in all_qa() if isinstance(row, dict))
    for kind, need in {"yesno": 8, "choice": 8, "multihop": 6, "unanswerable": 6, "revised": 6}.items():
        if kinds[kind] < need:
            problems.append(f"{_rel(QA)}: {kinds[kind]} rows of kind {kind!r} across train/test/unseen, need >= {need}")
    _check(problems, "question counts")


def test_paraphrased_dev_split():
    """qa/dev_paraphrased.jsonl: each answerable row re-words one dev.jsonl row (same answer, document and
    span; another question, found in no other split), each other row is a hand-written unanswerable one."""
    dev = {row["id"]: row for _, row in load_jsonl(QA / "dev.jsonl")}
    others = {row.get("question", "").strip().lower() for _, _, row in all_qa() if isinstance(row, dict)}
    others |= {row["question"].strip().lower() for row in dev.values()}
    used = {row.get("id") for _, _, row in all_qa() if isinstance(row, dict)}
    problems, ids, paraphrased, unanswerable = [], set(), 0, 0
    path = QA / "dev_paraphrased.jsonl"
    for lineno, row in load_jsonl(path):
        name = row_name(path, lineno, row)
        if row.get("id") in ids or row.get("id") in used:
            problems.append(f"{name}: id {row.get('id')!r} is not unique")
        ids.add(row.get("id"))
        if not isinstance(row.get("question"), str) or not row["question"].strip():
            problems.append(f"{name}: 'question' must be a non-empty string")
            continue
        if row["question"].strip().lower() in others:
            problems.append(f"{name}: the question is copied from another split")
        if row.get("kind") == "unanswerable":
            unanswerable += 1
            if row.get("answer") != UNANSWERABLE or row.get("doc") is not None or row.get("span") is not None:
                problems.append(f"{name}: an unanswerable row has answer {UNANSWERABLE!r}, doc and span null")
            continue
        source = dev.get(row.get("paraphrase_of"))
        if source is None:
            problems.append(f"{name}: paraphrase_of {row.get('paraphrase_of')!r} is not a dev.jsonl id")
            continue
        paraphrased += 1
        for field in ("answer", "doc", "span", "kind"):
            if row.get(field) != source.get(field):
                problems.append(f"{name}: {field} {row.get(field)!r} differs from {source['id']}'s {source.get(field)!r}")
    if paraphrased < 30 or unanswerable < 10:
        problems.append(f"{_rel(path)}: {paraphrased} paraphrases and {unanswerable} unanswerable rows, need >= 30 and >= 10")
    _check(problems, "paraphrased dev split")


# --------------------------------------------------------------------------- instructions


def test_instruction_rows():
    problems = []
    seen: dict[str, str] = {}
    total = 0
    tasks = Counter()
    for path in instruction_files():
        for lineno, row in load_jsonl(path):
            total += 1
            if not isinstance(row, dict):
                continue
            name = row_name(path, lineno, row)
            for field in ("id", "task", "instruction", "input", "output", "doc"):
                if not isinstance(row.get(field), str) or not row[field].strip():
                    problems.append(f"{name}: '{field}' must be a non-empty string")
            rid = row.get("id")
            if rid in seen:
                problems.append(f"{name}: id {rid!r} already used at {seen[rid]}")
            elif isinstance(rid, str):
                seen[rid] = name
            task = row.get("task")
            tasks[task] += 1
            if task not in TASKS:
                problems.append(f"{name}: task {task!r} not in {sorted(TASKS)}")
            if isinstance(row.get("doc"), str) and not doc_exists(row["doc"]):
                problems.append(f"{name}: doc {row['doc']!r} does not exist under {_rel(DOCS)}")
            if task == "extract" and isinstance(row.get("output"), str):
                try:
                    parsed = json.loads(row["output"])
                except json.JSONDecodeError as exc:
                    problems.append(f"{name}: extract output is not valid JSON ({exc})")
                else:
                    if not isinstance(parsed, dict):
                        problems.append(f"{name}: extract output is JSON but not an object")
    if total < 150:
        problems.append(f"{_rel(INSTRUCTIONS)}: {total} instruction rows, need >= 150")
    for task in sorted(TASKS):
        if tasks[task] == 0:
            problems.append(f"{_rel(INSTRUCTIONS)}: no rows with task {task!r}")
    _check(problems, "instruction rows")


# --------------------------------------------------------------------------- classification


def test_classification_sets():
    problems = []
    texts: dict[str, set[str]] = {}
    for split, need in (("train", 320), ("test", 110)):
        path = CLASSIFICATION / f"{split}.jsonl"
        seen: set[str] = set()
        labels = Counter()
        for lineno, row in load_jsonl(path):
            if not isinstance(row, dict):
                continue
            name = f"{_rel(path)}:{lineno}"
            text, label = row.get("text"), row.get("label")
            if not isinstance(text, str) or not text.strip():
                problems.append(f"{name}: 'text' must be a non-empty string")
                continue
            if label not in LABELS:
                problems.append(f"{name}: label {label!r} not in {sorted(LABELS)}")
            key = " ".join(text.lower().split())
            if key in seen:
                problems.append(f"{name}: duplicate text {text[:60]!r}")
            seen.add(key)
            labels[label] += 1
        texts[split] = seen
        n = sum(labels.values())
        if n < need:
            problems.append(f"{_rel(path)}: {n} rows, need >= {need}")
        for label in sorted(LABELS):
            share = labels[label] / n if n else 0.0
            if not 0.15 <= share <= 0.20:
                problems.append(f"{_rel(path)}: label {label!r} is {share:.1%} of rows, need 15-20%")
    for text in sorted(texts.get("test", set()) & texts.get("train", set())):
        problems.append(f"{_rel(CLASSIFICATION / 'test.jsonl')}: text also in train: {text[:60]!r}")
    _check(problems, "classification sets")


# --------------------------------------------------------------------------- general probe


def test_general_probe():
    problems = []
    essays = sorted((GENERAL / "prose").glob("*.md"))
    words = sum(len(p.read_text(encoding="utf-8").split()) for p in essays)
    if words < 5_000:
        problems.append(f"{_rel(GENERAL / 'prose')}: {words} words in {len(essays)} essays, need >= 5,000")
    path = GENERAL / "questions.jsonl"
    ids: set[str] = set()
    n = 0
    for lineno, row in load_jsonl(path):
        n += 1
        if not isinstance(row, dict):
            continue
        name = row_name(path, lineno, row)
        for field in ("id", "question", "answer"):
            if not isinstance(row.get(field), str) or not row[field].strip():
                problems.append(f"{name}: '{field}' must be a non-empty string")
        if row.get("id") in ids:
            problems.append(f"{name}: duplicate id")
        ids.add(row.get("id"))
        choices = row.get("choices")
        if not isinstance(choices, list) or len(choices) != 4 or len(set(choices)) != 4:
            problems.append(f"{name}: need 4 distinct choices, got {choices!r}")
        elif row.get("answer") not in choices:
            problems.append(f"{name}: answer {row.get('answer')!r} is not one of the choices")
    if n < 100:
        problems.append(f"{_rel(path)}: {n} questions, need >= 100")
    _check(problems, "general probe")
