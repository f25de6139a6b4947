"""A learned evidence ranker: which retrieved sentence holds the answer, learned from a collection's
own training questions.

    ragtune tune-ranker -c corvida --questions corpora/corvida/qa/train.jsonl

The evidence ranker (:func:`serving.evidence.rank_sentences`) mixes the MiniLM cosine and BM25 with fixed
weights, and the answer is copied from its best sentence, so its top-1 caps what ``rag`` can answer. A
collection's training questions say which sentences hold answers: each question is retrieved and
ranked exactly as the assistant does (same k and search mode), a sentence holding the reference answer
(``tuning.raft.holds_answer``, the rule "correct" uses) is a positive, the others negatives, and a
logistic regression (scikit-learn, class-balanced) learns how to weigh a few generic features of each
candidate (:data:`FEATURES`: the fixed mix, its two parts and the term coverage, the chunk's retrieval
rank, the sentence's place among its neighbours, whether it holds a number and the question asks for a
quantity, table row, heading, length). Nothing in it names the demo; a collection learns its own
weights, and one without a ranker keeps the fixed mix.

Saved as ``<collection folder>/evidence_ranker.json`` (plain JSON: the feature names, weights, scaling,
the embedding model it was learned with, the data hash and the top-1 before/after), written to a temp
file and renamed. The assistant uses it when ``ServeConfig.evidence_ranker`` is ``auto`` (the default)
and the file exists and matches the collection's embedding model and :data:`FEATURES`; otherwise the
fixed mix, with a warning when a file is there but does not match.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from serving.config import ServingError
from serving.evidence import Sentence, _minmax, rank_sentences, search_keeping_query, sentence_vectors, stored_vectors

FILE = "evidence_ranker.json"
FEATURES = ("mix", "cosine", "bm25", "coverage", "chunk_1", "chunk_2", "chunk_3", "chunk_4+", "has_number",
            "quantity_question_x_number", "table_row", "heading", "log_words", "inverse_rank", "previous_mix",
            "next_mix", "first_in_chunk")
# questions that ask for a quantity, a time or a place on a scale: their answer is almost always a number
QUANTITY = re.compile(
    r"^(how (many|much|long|far|old|big|large|often|high|low|fast|heavy|wide|tall|deep|soon|quickly|hot|cold)"
    r"|(at|to|from|by|in|on|for|until|up to|above|below|under|over|after|before|within) (what|which)\b"
    r"|what (is the )?(temperature|date|time|year|day|age|size|percentage|share|price|cost|number|voltage|pressure"
    r"|capacity|speed|weight|length|distance|frequency|deadline|minimum|maximum)|when\b"
    r"|which (day|date|year|month|band|frequency|temperature))", re.I)
DIGIT = re.compile(r"\d")
SENTENCE_END = re.compile(r"[.!?:;]['\")\]*_]*$")


class RankerError(ServingError):
    """A ranker that cannot be trained or loaded; the message names the input and the fix."""


def candidates(ranked: Sequence[Sentence]) -> list[Sentence]:
    """The sentences a ranker scores: all but the questions ``skip_questions`` moved below every other."""
    return [s for s in ranked if s.score > -1.0]


def features(question: str, ranked: Sequence[Sentence]) -> list[list[float]]:
    """One row of :data:`FEATURES` per sentence of :func:`candidates`, in that order."""
    cands = candidates(ranked)
    bm25 = _minmax([s.bm25 for s in cands])
    quantity = bool(QUANTITY.search(question.strip()))
    by_hit: dict[int, list[Sentence]] = {}
    for s in sorted(cands, key=lambda s: (s.hit_index, s.start)):
        by_hit.setdefault(s.hit_index, []).append(s)
    place = {id(s): i for siblings in by_hit.values() for i, s in enumerate(siblings)}
    rows = []
    for rank, (s, b) in enumerate(zip(cands, bm25)):
        siblings, i = by_hit[s.hit_index], place[id(s)]
        text = s.text.strip()
        words = len(text.split())
        number = bool(DIGIT.search(text))
        rows.append([s.score, s.cosine, b, s.coverage, *(float(min(s.hit_index, 3) == k) for k in range(4)),
                     float(number), float(quantity and number), float(text.startswith("|")),
                     float(text.startswith("#") or (words <= 6 and not SENTENCE_END.search(text))), math.log1p(words),
                     1.0 / (1 + rank), siblings[i - 1].score if i > 0 else 0.0,
                     siblings[i + 1].score if i + 1 < len(siblings) else 0.0, float(i == 0)])
    return rows


@dataclass
class LearnedRanker:
    weights: list[float]
    bias: float
    mean: list[float]
    scale: list[float]
    embedding_model: str
    features: list[str] = field(default_factory=lambda: list(FEATURES))
    manifest: dict[str, Any] = field(default_factory=dict)

    def probabilities(self, question: str, ranked: Sequence[Sentence]) -> list[float]:
        out = []
        for row in features(question, ranked):
            z = self.bias + sum(w * (x - m) / s for w, x, m, s in zip(self.weights, row, self.mean, self.scale))
            out.append(1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, z)))))
        return out

    def rerank(self, question: str, ranked: Sequence[Sentence]) -> list[Sentence]:
        """``ranked`` re-scored by the learned model (score = its probability that the sentence holds the
        answer), best first; demoted questions stay last, in their order."""
        cands = candidates(ranked)
        for s, p in zip(cands, self.probabilities(question, ranked)):
            s.score = p
        rest = [s for s in ranked if s.score <= -1.0]
        return sorted(cands, key=lambda s: (-s.score, s.hit_index, s.start)) + rest

    def to_json(self) -> dict[str, Any]:
        return {"features": self.features, "weights": self.weights, "bias": self.bias, "mean": self.mean,
                "scale": self.scale, "embedding_model": self.embedding_model, **self.manifest}

    @classmethod
    def from_json(cls, data: dict[str, Any], source: str) -> "LearnedRanker":
        try:
            names = [str(x) for x in data["features"]]
            weights, mean, scale = ([float(x) for x in data[k]] for k in ("weights", "mean", "scale"))
            bias, model = float(data["bias"]), str(data["embedding_model"])
        except (KeyError, TypeError, ValueError) as exc:
            raise RankerError(f"{source}: not a ragtune evidence ranker ({exc!r}); retrain it with ragtune tune-ranker") from None
        if names != list(FEATURES) or not len(weights) == len(mean) == len(scale) == len(FEATURES):
            raise RankerError(f"{source}: learned with other features ({len(names)}) than this ragtune computes "
                              f"({len(FEATURES)}); retrain it with ragtune tune-ranker")
        manifest = {k: v for k, v in data.items() if k not in ("features", "weights", "bias", "mean", "scale", "embedding_model")}
        return cls(weights, bias, mean, scale, model, names, manifest)


def ranker_path(col) -> Path:
    return Path(col.folder) / FILE


_cache: dict[str, tuple[float, LearnedRanker | None]] = {}


def load_ranker(col) -> LearnedRanker | None:
    """The collection's learned ranker, or None when it has none or it does not fit (then a warning says why).
    Re-read when the file changes (a retrain is picked up without a restart)."""
    path = ranker_path(col)
    try:
        mtime = path.stat().st_mtime_ns
    except OSError:
        return None
    cached = _cache.get(str(path))
    if cached and cached[0] == mtime:
        return cached[1]
    ranker = None
    try:
        ranker = LearnedRanker.from_json(json.loads(path.read_text(encoding="utf-8")), str(path))
        if ranker.embedding_model != col.config.embedding_model:
            warnings.warn(f"{path}: learned with embedder {ranker.embedding_model}, the collection now uses "
                          f"{col.config.embedding_model}; the fixed evidence mix is used until ragtune tune-ranker -c {col.name} "
                          f"is run again", stacklevel=2)
            ranker = None
    except (OSError, json.JSONDecodeError, RankerError) as exc:
        warnings.warn(f"{path}: {exc}; the fixed evidence mix is used", stacklevel=2)
    _cache[str(path)] = (mtime, ranker)
    return ranker


def why_no_span(row: dict) -> str | None:
    """Why a question row cannot teach or test reading a copied answer span: ``"unanswerable"`` (no answer,
    or marked so), ``"yes_no"`` (an answer a span of the sources cannot give), or None when it can."""
    answer = str(row.get("answer", "")).strip().lower()
    if row.get("kind") == "unanswerable" or not answer:
        return "unanswerable"
    return "yes_no" if answer.rstrip(".") in ("yes", "no") else None


def collection_vectors(col, question: str) -> Callable[[list[str]], Any]:
    """``embed`` for ranking ``col``'s sentences against ``question``: vectors kept in this process, then on the
    collection's disk (:class:`serving.evidence.StoredVectors`), then embedded; the question is not stored."""
    kept, store = sentence_vectors(col.embedder), stored_vectors(col)
    return lambda texts: kept(texts, store=store, transient=(question,))


def rank_evidence(col, question: str, hits: Sequence[Any], skip_questions: bool,
                  ranker: str = "auto") -> tuple[list[Sentence], str]:
    """The sentences of ``hits`` best first, as the assistant orders its evidence: the fixed mix
    (:func:`serving.evidence.rank_sentences`), re-ranked by the collection's learned ranker when ``ranker`` is
    ``auto`` and it has one that fits. Returns the sentences and which ranker ordered them (learned/fixed)."""
    ranked = rank_sentences(question, hits, collection_vectors(col, question), skip_questions=skip_questions)
    learned = load_ranker(col) if ranker == "auto" else None
    if learned is None:
        return ranked, "fixed"
    return learned.rerank(question, ranked), "learned"


def _labelled(col, rows: Sequence[dict], k: int, mode: str, echo: Callable[[str], None]) -> list[tuple[dict, list[Sentence], list[bool]]]:
    """Each usable row with its ranked sentences, as the assistant would rank them."""
    from tuning.raft import holds_answer

    out = []
    started = time.perf_counter()
    usable = [r for r in rows if str(r.get("question", "")).strip() and why_no_span(r) is None]
    for i, row in enumerate(usable, 1):
        hits = search_keeping_query(col, str(row["question"]), k, mode)
        ranked, _ = rank_evidence(col, str(row["question"]), hits, skip_questions=True, ranker="fixed")
        if candidates(ranked):
            out.append((row, ranked, [holds_answer(s.text, str(row["answer"])) for s in candidates(ranked)]))
        if i % 50 == 0 or i == len(usable):
            rate = (time.perf_counter() - started) / i
            echo(f"ranked {i}/{len(usable)} questions, ETA {rate * (len(usable) - i):.0f} s")
    return out


def _top1(data, score: Callable[[str, list[Sentence]], list[float]]) -> float:
    if not data:
        return 0.0
    hits = 0
    for row, ranked, labels in data:
        scores = score(str(row["question"]), ranked)
        hits += labels[max(range(len(scores)), key=lambda i: (scores[i], -i))]
    return hits / len(data)


def train_ranker(col, rows: Sequence[dict], *, k: int, mode: str, c: float = 1.0, dev_rows: Sequence[dict] = (),
                 echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Learn the collection's evidence ranker from ``rows`` (question + answer) and save it; returns its
    manifest (top-1 before/after on the rows, and on ``dev_rows`` when given)."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    if c <= 0:
        raise RankerError(f"c={c}: the inverse regularisation strength must be > 0 (example: --c 1.0)")
    data = _labelled(col, rows, k, mode, echo)
    with_positive = [d for d in data if any(d[2])]
    if len(with_positive) < 5:
        raise RankerError(f"only {len(with_positive)} of {len(rows)} questions have a retrieved sentence holding their answer; "
                          "a ranker needs at least 5 (rows need question and answer, and their documents indexed in the collection)")
    x = np.array([f for row, ranked, _ in with_positive for f in features(str(row["question"]), ranked)], dtype=float)
    y = np.array([label for *_, labels in with_positive for label in labels], dtype=float)
    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale[scale < 1e-9] = 1.0
    model = LogisticRegression(C=c, class_weight="balanced", max_iter=5000).fit((x - mean) / scale, y)
    digest = hashlib.sha256("".join(json.dumps({"q": r.get("question"), "a": r.get("answer")}, sort_keys=True)
                                    for r in rows).encode()).hexdigest()
    ranker = LearnedRanker([float(w) for w in model.coef_[0]], float(model.intercept_[0]), mean.tolist(), scale.tolist(),
                           col.config.embedding_model)

    def fixed(question: str, ranked: list[Sentence]) -> list[float]:  # the fixed mix, as ranked
        return [s.score for s in candidates(ranked)]

    manifest = {"collection": col.name, "rows": len(rows), "questions_used": len(with_positive), "pairs": int(len(y)),
                "positives": int(y.sum()), "c": c, "k": k, "search_mode": mode, "data_sha256": digest,
                "top1_fixed": round(_top1(with_positive, fixed), 4),
                "top1_learned": round(_top1(with_positive, ranker.probabilities), 4),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    echo(f"top-1 sentence holds the answer, training questions: fixed mix {manifest['top1_fixed']:.1%} -> "
         f"learned {manifest['top1_learned']:.1%} ({len(with_positive)} questions)")
    if dev_rows:
        dev = [d for d in _labelled(col, dev_rows, k, mode, echo) if any(d[2])]
        manifest.update(dev_questions=len(dev), dev_top1_fixed=round(_top1(dev, fixed), 4),
                        dev_top1_learned=round(_top1(dev, ranker.probabilities), 4))
        echo(f"top-1, dev questions: fixed mix {manifest['dev_top1_fixed']:.1%} -> learned {manifest['dev_top1_learned']:.1%} "
             f"({len(dev)} questions)")
    ranker.manifest = manifest
    path = ranker_path(col)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(ranker.to_json(), indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    echo(f"saved {path}")
    return manifest
