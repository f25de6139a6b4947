"""Reader rows in the evidence layout: training data for an adapter that reads the way ``rag`` serves.

    ragtune data evidence -c corvida --questions corpora/corvida/qa/train_nodev.jsonl --out evidence.jsonl

RAFT rows (``tuning.raft``) hold whole chunks and a cited, quoted target: the layout of ``rag+ft`` with
whole chunks. With the evidence-first defaults the assistant puts the best N *sentences* of the retrieved
chunks into the prompt (``serving.evidence``, ordered by the collection's learned ranker when it has one)
and copies one span of them (grounded decoding). An adapter answers best in the layout it was trained on,
so these rows are built by the assistant's own steps: the same retrieval (``k``, search mode), the same
sentence ranking and evidence window, the same prompt builder (``serving.prompts.build_messages``), with
the short reference answer as the target. Rows are written in the ``qa`` shape ``ragtune tune`` reads
(``system``, ``question``, ``context``, ``answer``), each with ``evidence_sentences`` = N.

A question is kept only when the evidence shown holds its answer (``tuning.raft.holds_answer``, the rule
"correct" uses): the adapter learns to find and copy the answer in what it is shown, not to answer from
memory. Unanswerable questions and yes/no answers (which a copied span cannot give) are skipped and
counted. Serve such an adapter with the same layout: ``ragft_evidence_sentences=N ragft_grounded=true
ragft_grounded_spans=1`` (docs/answering-from-sources.md).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

from serving.config import ServeConfig, ServingError
from serving.evidence import evidence_sources
from serving.prompts import build_messages, count_tokens, truncate_tokens


@dataclass
class EvidenceReport:
    questions: int = 0
    written: int = 0
    per_layout: dict[int, int] = field(default_factory=dict)  # evidence sentences -> rows written
    skipped_answer_not_shown: int = 0  # (question, layout) pairs whose evidence did not hold the answer
    skipped_unanswerable: int = 0
    skipped_yes_no: int = 0
    ranker: str = "fixed"
    out: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def build_evidence_rows(col, questions: Sequence[dict], sentences: Sequence[int], config: ServeConfig,
                        count: Callable[[str], int], truncate: Callable[[str, int], str],
                        echo: Callable[[str], None] = print) -> tuple[list[dict], EvidenceReport]:
    """Rows for every question and every N in ``sentences`` whose evidence holds the answer."""
    from serving.evidence import search_keeping_query
    from serving.ranker import rank_evidence, why_no_span
    from tuning.raft import holds_answer

    if not sentences or any(not 1 <= n <= 40 for n in sentences):
        raise ServingError(f"sentences: {list(sentences)}; give one or more counts from 1 to 40 (example: --sentences 1,2)")
    report = EvidenceReport()
    rows: list[dict] = []
    started = time.perf_counter()
    for i, q in enumerate(questions, 1):
        report.questions += 1
        question, answer = str(q.get("question", "")).strip(), str(q.get("answer", "")).strip()
        why = why_no_span(q)
        if why is not None:
            if why == "yes_no":
                report.skipped_yes_no += 1
            else:
                report.skipped_unanswerable += 1
            continue
        hits = search_keeping_query(col, question, config.k, config.search_mode)
        ranked, report.ranker = rank_evidence(col, question, hits, config.evidence_skip_questions, config.evidence_ranker)
        for n in sentences:
            shown = evidence_sources(hits, ranked, n, config.evidence_window_tokens, count)
            if not any(holds_answer(h.text, answer) for h in shown):
                report.skipped_answer_not_shown += 1
                continue
            plan = build_messages(question, sources=shown, rag=True, count=count, truncate=truncate,
                                  budget=config.context_tokens - config.max_new_tokens, source_tokens=config.source_tokens,
                                  history_turns=0)
            rows.append({"id": f"{q.get('id', f'q{i}')}-e{n}", "system": plan.messages[0]["content"], "question": question,
                         "context": plan.context, "answer": answer, "doc": q.get("doc"),
                         "row_type": "evidence", "evidence_sentences": n})
            report.per_layout[n] = report.per_layout.get(n, 0) + 1
        if i % 50 == 0 or i == len(questions):
            rate = (time.perf_counter() - started) / i
            echo(f"built {i}/{len(questions)} questions, {len(rows)} rows, ETA {rate * (len(questions) - i):.0f} s")
    report.written = len(rows)
    if not rows:
        raise ServingError("no row could be built: no question's evidence held its answer (check that the questions' "
                           "documents are indexed in the collection, and that the answers are written as in the documents)")
    return rows, report


def write_evidence_rows(home, collection: str, questions_file: str | Path, out: str | Path, sentences: Sequence[int],
                        config: ServeConfig | None = None, echo: Callable[[str], None] = print) -> EvidenceReport:
    """Build the rows for ``collection`` from ``questions_file`` and write them to ``out`` (atomically)."""
    import json

    from core.files import write_atomic
    from rag.collection import Workspace
    from serving.ab.runner import load_questions
    from tuning.models import load_tokenizer, resolve_base_model

    config = config or ServeConfig()
    questions = load_questions(questions_file)
    workspace = Workspace(home)
    col = workspace.get(collection)
    tokenizer = load_tokenizer(resolve_base_model(config.base_model, workspace.home))
    rows, report = build_evidence_rows(col, questions, sentences, config, partial(count_tokens, tokenizer),
                                       partial(truncate_tokens, tokenizer), echo)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    report.out = str(out)
    return report


__all__ = ["EvidenceReport", "build_evidence_rows", "write_evidence_rows"]
