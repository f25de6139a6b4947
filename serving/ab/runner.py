"""The offline A/B run: every question answered by every arm, scored, stored, resumable.

    ragtune ab run --questions corpora/corvida/qa/test.jsonl --collection corvida --adapter corvida-raft

Arms are the 2x2 of retrieval (off/on) x fine-tuning (off/on): ``base``, ``rag``, ``ft``, ``rag+ft``.
All arms decode greedily with the same settings. Answers are cached (see :mod:`serving.ab.runs`), so a
re-run computes only what is missing; an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from core.config import ConfigError, field
from core.names import InvalidName, check_name
from serving.ab import metrics
from serving.ab.runs import ABStore, cache_key
from serving.modes import uses_adapter, uses_retrieval
from serving.prompts import answer_for_scoring

ARMS = ("base", "rag", "ft", "rag+ft")
HIT_DEPTH = 10  # retrieval depth stored for the hit@k curve


@dataclass
class ABConfig:
    questions: str = field(help="question file: JSONL rows {id, question, answer, doc?, span?, kind?, choices?}")
    collection: str | None = field(None, help="collection for the rag arms")
    adapter: str | None = field(None, help="adapter for the ft arms")
    arms: list[str] = field(default_factory=lambda: list(ARMS), help="arms to run: base, rag, ft, rag+ft")
    limit: int = field(0, help="only the first N questions (0 = all)")
    name: str = field("", help="run name ('' = derived from the question file, adapter and collection)")
    k: int = field(4, help="chunks retrieved into the prompt in the rag arms")
    max_new_tokens: int = field(64, help="answer length limit (short answers: the references are short)")
    concurrency: int = field(8, help="answers computed at once (the local engine decodes them in one batch; greedy "
                                     "answers are the same as one at a time)")

    def __post_init__(self) -> None:
        unknown = [a for a in self.arms if a not in ARMS]
        if unknown:
            raise ConfigError(f"unknown arm(s) {', '.join(unknown)}; use base, rag, ft, rag+ft")
        if any(uses_retrieval(a) for a in self.arms) and not self.collection:
            raise ConfigError("the rag arms need --collection (or drop them with --arms base,ft)")
        if any(uses_adapter(a) for a in self.arms) and not self.adapter:
            raise ConfigError("the ft arms need --adapter (train one with `ragtune tune`, or use --arms base,rag)")
        if not 1 <= self.concurrency <= 64:
            raise ConfigError("concurrency: use 1-64 (example: concurrency=8)")
        if not self.name:
            stem = Path(self.questions).stem
            derived = "-".join(x for x in (stem, self.collection, self.adapter) if x)
            # a file name may hold spaces or dots in a row: keep what a run name allows
            self.name = re.sub(r"\.{2,}", ".", re.sub(r"[^A-Za-z0-9_.-]+", "-", derived)).strip("-._")[:64] or "run"
        try:
            check_name(self.name, "A/B run name")
        except InvalidName as exc:
            raise ConfigError(str(exc)) from None


def load_questions(path: str | Path) -> list[dict[str, Any]]:
    rows = []
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{path}: question file not found")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); save it as UTF-8 JSONL") from None
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}, row {n}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict) or not str(row.get("question", "")).strip() or "answer" not in row:
            raise ConfigError(f'{path}, row {n}: needs "question" and "answer" (example: {{"id": "q1", "question": "...", "answer": "..."}})')
        row.setdefault("id", f"row{n}")
        rows.append(row)
    if not rows:
        raise ConfigError(f"{path}: no questions")
    return rows


def prompt_hash(assistant: Any) -> str:
    from serving import prompts

    cfg = dataclasses.asdict(assistant.config)
    parts = {"config": cfg, "system_rag": prompts.SYSTEM_RAG, "system_plain": prompts.SYSTEM_PLAIN}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def adapter_identity(assistant: Any, adapter: str | None) -> str | None:
    if not adapter:
        return None
    manifest = assistant.generator.check_adapter(adapter)
    return f"{adapter}:{hashlib.sha256(json.dumps(manifest, sort_keys=True, default=str).encode()).hexdigest()[:16]}"


def score(row: dict[str, Any], payload: dict[str, Any], arm: str) -> dict[str, Any]:
    scores = metrics.score_answer(answer_for_scoring(payload["text"]), row)
    if uses_retrieval(arm):
        deep = payload.get("deep_hits") or []
        for k in (1, 4, HIT_DEPTH):
            scores[f"hit_at_{k}"] = metrics.retrieval_hit(deep, row, k)
        cited = [s for s in payload.get("sources", []) if s["n"] in payload.get("cited", [])]
        scores["citation_correct"] = metrics.citation_correct(cited, row) if row.get("kind") != "unanswerable" else float(not cited)
    # issue 11: an abstention (refused, or the model said the sources do not say) is counted per arm
    scores["abstained"] = float(bool(payload.get("refused")) or metrics.says_unknown(payload["text"]))
    scores["latency_s"] = payload.get("timings", {}).get("total_s", 0.0)
    return scores


def run_ab(assistant: Any, config: ABConfig, progress: Callable[[int, int, str], None] | None = None) -> dict[str, Any]:
    """Answer every question with every arm (cached), store per-question scores; returns a summary."""
    store = ABStore(assistant.workspace.db_path)
    questions = load_questions(config.questions)
    if config.limit:
        questions = questions[:config.limit]
    run_id = store.open_run(config.name, dataclasses.asdict(config))
    col = assistant.workspace.get(config.collection) if config.collection else None
    base_id = getattr(assistant.generator, "base_id", None)
    adapter_id = adapter_identity(assistant, config.adapter) if any(uses_adapter(a) for a in config.arms) else None
    p_hash = prompt_hash(assistant)
    computed = reused = 0
    total = len(questions) * len(config.arms)
    started = time.perf_counter()
    cells = []  # (row, arm, cache key, cached payload or None), in question order
    for row in questions:
        for arm in config.arms:
            uses_rag, uses_ft = uses_retrieval(arm), uses_adapter(arm)
            key = cache_key(question=row["question"], arm=arm, base=base_id, adapter=adapter_id if uses_ft else None,
                            collection=(config.collection, col.version()) if uses_rag else None, prompt=p_hash,
                            k=config.k if uses_rag else None, max_new_tokens=config.max_new_tokens)
            cells.append((row, arm, key, store.cached(key)))

    def compute(row: dict[str, Any], arm: str) -> dict[str, Any]:
        uses_rag, uses_ft = uses_retrieval(arm), uses_adapter(arm)
        answer = assistant.answer(row["question"], mode=arm, collection=config.collection if uses_rag else None,
                                  adapter=config.adapter if uses_ft else None, k=config.k, log=False,
                                  max_new_tokens=config.max_new_tokens)
        payload = {"text": answer.text, "cited": answer.cited, "refused": answer.refused,
                   "refusal_reason": answer.refusal_reason, "decoding": answer.decoding,
                   "sources": [{"n": s.n, "doc": s.doc, "chunk_id": s.chunk_id, "text": s.text} for s in answer.sources],
                   "timings": answer.timings}
        if uses_rag:
            deep = col.search(answer.retrieval_query or row["question"], k=HIT_DEPTH, mode=assistant.config.search_mode)
            payload["deep_hits"] = [{"doc": h.doc, "chunk_id": h.chunk_id, "text": h.text} for h in deep]
        return payload

    done = 0

    def record(row: dict[str, Any], arm: str, key: str, payload: dict[str, Any], fresh: bool) -> None:
        nonlocal done
        store.put(run_id, str(row["id"]), arm, key, payload if fresh else None, {**row, "scores": score(row, payload, arm)})
        done += 1
        if progress:
            progress(done, total, f"{row['id']} {arm}")

    for row, arm, key, payload in cells:
        if payload is not None:
            reused += 1
            record(row, arm, key, payload, False)
    # the missing answers are asked concurrently: the local engine batches them (one read of the weights for
    # all rows per token); each is stored as soon as it is done, so an interrupted run keeps what it computed
    missing = [(row, arm, key) for row, arm, key, payload in cells if payload is None]
    with ThreadPoolExecutor(max_workers=config.concurrency, thread_name_prefix="ab") as pool:
        futures = {pool.submit(compute, row, arm): (row, arm, key) for row, arm, key in missing}
        try:
            for future in as_completed(futures):
                row, arm, key = futures[future]
                record(row, arm, key, future.result(), True)
                computed += 1
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    store.finish_run(run_id)
    return {"run": config.name, "questions": len(questions), "arms": config.arms, "computed": computed,
            "reused": reused, "seconds": round(time.perf_counter() - started, 1)}
