"""Which adapter answers for a collection, and the gate a new one must pass to replace it.

    ragtune promote corvida-fb -c corvida --questions corpora/corvida/qa/test.jsonl
    ragtune promote --rollback -c corvida

Each collection has a *current* adapter (none at first: the base model). It changes only through this
module, and every change is a row in the ``promotions`` table (append-only: who, when, forced or not,
and the evidence), so the history can be read back and a rollback restores the adapter that was
current before the last promotion.

The gate (:func:`gate`) runs the paired A/B of the candidate against the current adapter in the
``rag+ft`` arm (against the ``rag`` arm when no adapter is current yet) on a held-out question set,
through ``serving.ab.runner.run_ab`` (so answers are cached as in any A/B run), and promotes only when

1. the 95% paired-bootstrap CI of the difference in ``correct`` (candidate - current) lies above zero, and
2. the candidate's forgetting probe (general perplexity change and general QA accuracy change against
   the base, from its ``ragtune.json``) is no worse than the current adapter's by more than
   ``max_perplexity_increase_pct`` points / ``max_qa_accuracy_drop``; a candidate trained without the
   probe fails this rule (nothing measured is not "no regression").

``force=True`` promotes whatever the figures say and is recorded as forced.
"""

from __future__ import annotations

import getpass
import hashlib
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

MAX_PERPLEXITY_INCREASE_PCT = 5.0  # candidate's general-perplexity change may exceed the current one's by this much
MAX_QA_ACCURACY_DROP = 0.05  # candidate's general QA accuracy change may trail the current one's by this much


class PromotionError(ValueError):
    """A promotion that cannot be done; the message says how to fix it."""


def _store(home: str | os.PathLike | None):
    from core.workspace import Layout
    from serving.history import ChatStore

    return ChatStore(Layout.open(home).db)


def _actor() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no user name in some containers
        return ""


def history(home: str | os.PathLike | None, collection: str) -> list[dict[str, Any]]:
    """Every promotion and rollback of ``collection``, oldest first, each with ``current_after``."""
    stack: list[str | None] = []
    out = []
    for row in _store(home).promotions(collection):
        if row["action"] == "promote":
            stack.append(row["adapter"])
        elif stack:
            stack.pop()
        out.append({**row, "current_after": stack[-1] if stack else None,
                    "previous": stack[-2] if len(stack) > 1 else None})
    return out


def current_adapter(home: str | os.PathLike | None, collection: str | None) -> str | None:
    """The adapter promoted for ``collection`` (None: no promotion yet, or rolled back to none).

    Read from SQLite on every call, so a promotion made by another process is seen at once."""
    if not collection:
        return None
    rows = history(home, collection)
    return rows[-1]["current_after"] if rows else None


def default_adapter(home: str | os.PathLike | None, collection: str | None, mode: str | None) -> str | None:
    """The adapter to use when the user named none: the collection's promoted one, for a mode that uses
    an adapter or an unspecified mode (which then becomes rag+ft); None otherwise."""
    from serving.modes import uses_adapter

    if mode is not None and not uses_adapter(mode):
        return None
    return current_adapter(home, collection)


def previous_adapter(home: str | os.PathLike | None, collection: str) -> str | None:
    rows = history(home, collection)
    return rows[-1]["previous"] if rows else None


def record_promotion(home: str | os.PathLike | None, collection: str, adapter: str, evidence: dict[str, Any],
                     forced: bool = False) -> int:
    from core.names import check_name

    check_name(collection, "collection name")
    check_name(adapter, "adapter name")
    return _store(home).add_promotion(collection, "promote", adapter, forced, _actor(), evidence)


def rollback(home: str | os.PathLike | None, collection: str) -> str | None:
    """Restore the adapter that was current before the last promotion; returns it (None = the base)."""
    rows = history(home, collection)
    if not rows or rows[-1]["current_after"] is None:
        raise PromotionError(f"collection {collection!r} has no promoted adapter to roll back")
    restored = rows[-1]["previous"]
    _store(home).add_promotion(collection, "rollback", restored, False, _actor(),
                               {"rolled_back": rows[-1]["current_after"]})
    return restored


# --- the gate ---------------------------------------------------------------------------------
@dataclass
class GateDecision:
    candidate: str
    current: str | None
    collection: str
    questions: str
    promote: bool
    reasons: list[str]
    correct: dict[str, Any] = field(default_factory=dict)  # paired difference of `correct` (mean, CI, p, n)
    candidate_correct: float | None = None
    current_correct: float | None = None
    forgetting: dict[str, Any] = field(default_factory=dict)
    runs: dict[str, str] = field(default_factory=dict)  # the A/B runs the figures come from
    forced: bool = False
    promotion_id: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        c = self.correct
        if self.forced:
            head = "PROMOTED (forced)" if self.promotion_id else "WOULD PROMOTE (forced, dry run)"
        elif self.promote:
            head = "PROMOTED" if self.promotion_id else "WOULD PROMOTE (dry run)"
        else:
            head = "REFUSED"
        lines = [f"{head}: {self.candidate} vs {self.current or 'no adapter (rag)'} on {self.collection}, "
                 f"{c.get('n', 0)} held-out questions ({Path(self.questions).name})"]
        if c:
            lines.append(f"  correct: candidate {self.candidate_correct:.3f}, current {self.current_correct:.3f}, "
                         f"difference {c['mean']:+.3f} [95% CI {c['ci_low']:+.3f}, {c['ci_high']:+.3f}], "
                         f"{c['test']} p={c['p_value']:.3g}")
        f = self.forgetting
        if f:
            lines.append(f"  forgetting: perplexity change {f.get('candidate_ppl_pct')}% vs current {f.get('current_ppl_pct')}% "
                         f"(margin {f['max_perplexity_increase_pct']} points); QA accuracy change {f.get('candidate_qa')} vs "
                         f"{f.get('current_qa')} (margin {f['max_qa_accuracy_drop']})")
        lines += [f"  - {r}" for r in self.reasons]
        return "\n".join(lines)


def forgetting_check(candidate_manifest: dict[str, Any], current_manifest: dict[str, Any] | None,
                     max_ppl_pct: float = MAX_PERPLEXITY_INCREASE_PCT, max_qa_drop: float = MAX_QA_ACCURACY_DROP
                     ) -> tuple[bool, dict[str, Any], str]:
    """(passes, figures, reason) for the forgetting rule; the current adapter's figures default to the
    base's (0 change) when no adapter is current."""
    cand = candidate_manifest.get("forgetting") or {}
    cur = (current_manifest or {}).get("forgetting") or {} if current_manifest is not None else {
        "perplexity_change_pct": 0.0, "qa_accuracy_change": 0.0}
    figures = {"candidate_ppl_pct": cand.get("perplexity_change_pct"), "current_ppl_pct": cur.get("perplexity_change_pct"),
               "candidate_qa": cand.get("qa_accuracy_change"), "current_qa": cur.get("qa_accuracy_change"),
               "max_perplexity_increase_pct": max_ppl_pct, "max_qa_accuracy_drop": max_qa_drop}
    if cand.get("perplexity_change_pct") is None:
        return False, figures, ("the candidate has no forgetting probe in its manifest: retrain with forgetting_probe=true "
                                "(or --force)")
    ref_ppl = cur.get("perplexity_change_pct") or 0.0
    ref_qa = cur.get("qa_accuracy_change") or 0.0
    if cand["perplexity_change_pct"] > ref_ppl + max_ppl_pct:
        return False, figures, (f"forgetting: general perplexity {cand['perplexity_change_pct']:+.1f}% is more than "
                                f"{max_ppl_pct} points worse than the current {ref_ppl:+.1f}%")
    if (cand.get("qa_accuracy_change") or 0.0) < ref_qa - max_qa_drop:
        return False, figures, (f"forgetting: general QA accuracy change {cand.get('qa_accuracy_change'):+.3f} is more than "
                                f"{max_qa_drop} below the current {ref_qa:+.3f}")
    return True, figures, "forgetting within the margin"


def decide(candidate_scores: list[float], current_scores: list[float], forgetting_ok: bool,
           forgetting_reason: str) -> tuple[bool, dict[str, Any], list[str]]:
    """The rule: promote iff the 95% CI of mean(candidate - current) over paired questions is above zero
    AND the forgetting check passed. Returns (promote, paired statistics, reasons)."""
    from serving.ab.stats import paired_difference

    if not candidate_scores:
        return False, {}, ["no paired questions: the question file has no rows both arms answered"]
    diff = paired_difference(candidate_scores, current_scores, n_boot=2000, confidence=0.95, seed=0)
    reasons = []
    better = diff["ci_low"] > 0
    reasons.append(f"correct: the 95% CI [{diff['ci_low']:+.3f}, {diff['ci_high']:+.3f}] is "
                   + ("above zero" if better else "not above zero (no evidence the candidate is better)"))
    reasons.append(forgetting_reason)
    return better and forgetting_ok, diff, reasons


def default_questions(home: str | os.PathLike | None, collection: str) -> str:
    """The held-out set registered for ``collection``: ``<home>/data/eval/<collection>.jsonl`` (written by
    :func:`register_eval_set`); for the demo collection the demo's test questions."""
    from core.names import child_path
    from core.workspace import Layout

    path = child_path(Layout.open(home).data / "eval", collection, "collection name").with_suffix(".jsonl")
    if path.is_file():
        return str(path)
    demo = Path(__file__).resolve().parent.parent / "corpora" / collection / "qa" / "test.jsonl"
    if demo.is_file():
        return str(demo)
    raise PromotionError(f"collection {collection!r} has no registered held-out question set; pass --questions FILE "
                         "(held-out questions, never the rows the candidate was trained on)")


def register_eval_set(home: str | os.PathLike | None, collection: str, questions: str | Path) -> Path:
    """Copy ``questions`` as the held-out set the gate uses for ``collection`` by default."""
    import shutil

    from core.names import child_path
    from core.workspace import Layout
    from serving.ab.runner import load_questions

    load_questions(questions)  # validated before it is registered
    folder = Layout.open(home).data / "eval"
    folder.mkdir(parents=True, exist_ok=True)
    path = child_path(folder, collection, "collection name").with_suffix(".jsonl")
    shutil.copyfile(questions, path)
    return path


def _run_name(prefix: str, adapter: str | None, questions: str, limit: int) -> str:
    digest = hashlib.sha256(Path(questions).read_bytes()).hexdigest()[:8]
    return f"gate-{prefix}-{adapter or 'none'}-{digest}{f'-{limit}' if limit else ''}"[:64]


def gate(assistant: Any, candidate: str, collection: str, questions: str | None = None, against: str | None = None,
         *, force: bool = False, dry_run: bool = False, limit: int = 0, max_new_tokens: int = 64,
         max_perplexity_increase_pct: float = MAX_PERPLEXITY_INCREASE_PCT, max_qa_accuracy_drop: float = MAX_QA_ACCURACY_DROP,
         progress: Callable[[int, int, str], None] | None = None) -> GateDecision:
    """Run the paired A/B of ``candidate`` vs ``against`` (default: the collection's current adapter),
    decide by the rule in the module docstring, and record the promotion when it passes (or is forced)."""
    from core.names import check_name
    from serving.ab.runner import ABConfig, run_ab
    from serving.ab.runs import ABStore

    home = assistant.workspace.home
    check_name(candidate, "adapter name")
    assistant.workspace.get(collection)
    questions = questions or default_questions(home, collection)
    current = against if against is not None else current_adapter(home, collection)
    if current == candidate:
        raise PromotionError(f"{candidate!r} is already the current adapter of {collection!r}; compare it --against another")
    cand_manifest = assistant.generator.check_adapter(candidate)
    cur_manifest = assistant.generator.check_adapter(current) if current else None
    arm_cur = "rag+ft" if current else "rag"
    total = [0]

    def report(phase: int):
        def inner(done: int, n: int, message: str) -> None:
            if progress:
                total[0] = 2 * n
                progress(phase * n + done, 2 * n, message)
        return inner

    cand_cfg = ABConfig(questions=str(questions), collection=collection, adapter=candidate, arms=["rag+ft"], limit=limit,
                        name=_run_name("cand", candidate, str(questions), limit), max_new_tokens=max_new_tokens)
    cur_cfg = ABConfig(questions=str(questions), collection=collection, adapter=current, arms=[arm_cur], limit=limit,
                       name=_run_name("cur", current, str(questions), limit), max_new_tokens=max_new_tokens)
    run_ab(assistant, cand_cfg, report(0))
    run_ab(assistant, cur_cfg, report(1))
    store = ABStore(assistant.workspace.db_path)
    cand_rows = {r["question_id"]: r["row"]["scores"]["correct"] for r in store.results(store.run(cand_cfg.name)["id"])
                 if r["arm"] == "rag+ft"}
    cur_rows = {r["question_id"]: r["row"]["scores"]["correct"] for r in store.results(store.run(cur_cfg.name)["id"])
                if r["arm"] == arm_cur}
    ids = sorted(set(cand_rows) & set(cur_rows))
    a, b = [float(cand_rows[i]) for i in ids], [float(cur_rows[i]) for i in ids]
    ok, figures, reason = forgetting_check(cand_manifest, cur_manifest, max_perplexity_increase_pct, max_qa_accuracy_drop)
    promote, diff, reasons = decide(a, b, ok, reason)
    decision = GateDecision(candidate, current, collection, str(questions), promote, reasons, diff,
                            sum(a) / len(a) if a else None, sum(b) / len(b) if b else None, figures,
                            {"candidate": cand_cfg.name, "current": cur_cfg.name})
    if force and not promote:
        decision.forced = True
        decision.reasons.append("forced: promoted although the gate refused")
    if (promote or force) and not dry_run:
        evidence = {k: v for k, v in decision.to_dict().items() if k not in ("promotion_id",)}
        decision.promotion_id = record_promotion(home, collection, candidate, evidence, forced=decision.forced)
    return decision
