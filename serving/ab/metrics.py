"""Per-question answer metrics: exact match and token F1 with SQuAD normalisation, ROUGE-L,
containment, choice scoring, and retrieval/citation checks for RAG arms."""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Any, Iterable, Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)
UNANSWERABLE = "The knowledge base does not say."
_DONT_KNOW = re.compile(r"((do|does) not say|(don't|doesn't) say|do not know|don't know|not (in|mentioned in) the (sources|documents|knowledge base)|"
                        r"no information|cannot find|can't find|not stated)", re.IGNORECASE)


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, drop punctuation and articles, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = Counter(pred) & Counter(ref)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure over normalised tokens (longest common subsequence)."""
    a, b = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not a or not b:
        return float(a == b)
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b, start=1):
            current.append(previous[j - 1] + 1 if x == y else max(previous[j], current[j - 1]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(a), lcs / len(b)
    return 2 * precision * recall / (precision + recall)


def contains(prediction: str, reference: str) -> float:
    ref = normalize_answer(reference)
    return float(bool(ref) and ref in normalize_answer(prediction))


def says_unknown(prediction: str) -> bool:
    return bool(_DONT_KNOW.search(prediction))


def choose(prediction: str, choices: Sequence[str]) -> str | None:
    """The choice a free-text answer picks: the earliest-mentioned choice (yes/no by first word)."""
    norm = normalize_answer(prediction)
    if not norm:
        return None
    lowered = [normalize_answer(c) for c in choices]
    if set(lowered) <= {"yes", "no"}:
        first = norm.split()[0]
        return next((c for c, n in zip(choices, lowered) if n == first), None)
    positions = [(norm.find(n), c) for c, n in zip(choices, lowered) if n and n in norm]
    return min(positions)[1] if positions else None


def score_answer(prediction: str, row: dict[str, Any]) -> dict[str, float]:
    """All answer metrics for one question row ({"answer", "choices"?, "kind"?})."""
    reference = str(row["answer"])
    if row.get("kind") == "unanswerable" or reference == UNANSWERABLE:
        ok = float(says_unknown(prediction))
        return {"exact_match": ok, "token_f1": ok, "rouge_l": ok, "contains": ok, "correct": ok}
    scores = {"exact_match": exact_match(prediction, reference), "token_f1": token_f1(prediction, reference),
              "rouge_l": rouge_l(prediction, reference), "contains": contains(prediction, reference)}
    if row.get("choices"):
        picked = choose(prediction, row["choices"])
        scores["correct"] = float(picked is not None and normalize_answer(picked) == normalize_answer(reference))
    else:
        scores["correct"] = scores["contains"]
    return scores


def retrieval_hit(hits: Iterable[dict[str, Any]], row: dict[str, Any], k: int) -> float:
    """1 if one of the top-``k`` hits contains the reference answer or comes from the source doc."""
    reference = normalize_answer(str(row["answer"]))
    docs = {row.get("doc")} | {a.get("doc") for a in row.get("also", []) if isinstance(a, dict)}
    docs.discard(None)
    for hit in list(hits)[:k]:
        if hit.get("doc") in docs or (reference and reference in normalize_answer(hit.get("text", ""))):
            return 1.0
    return 0.0


def citation_correct(cited: Iterable[dict[str, Any]], row: dict[str, Any]) -> float:
    """1 if a cited chunk contains the reference answer (or, for paraphrased kinds, is from its doc)."""
    reference = normalize_answer(str(row["answer"]))
    paraphrased = row.get("kind") in ("yesno", "choice", "multihop")
    docs = {row.get("doc")} | {a.get("doc") for a in row.get("also", []) if isinstance(a, dict)}
    for hit in cited:
        if reference and reference in normalize_answer(hit.get("text", "")):
            return 1.0
        if paraphrased and hit.get("doc") in docs:
            return 1.0
    return 0.0
