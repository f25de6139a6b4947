"""Feedback-loop benchmark (issue 13): simulated users correct the current assistant, a candidate is
retrained on their corrections, and the promotion gate decides on held-out questions.

    python bench/loop_bench.py --quick                      # fresh workspace in a temp dir
    python bench/loop_bench.py --home .ragtune --current corvida-raft
    python bench/loop_bench.py --quick --dpo-steps 8        # then DPO on the pairs, and its arena win rate

The loop, timed end to end (``loop_wall_s``, setup excluded):

1. the *current* assistant (``--current`` adapter in rag+ft, or the base model in rag when none is
   given) answers the demo **train** questions, four users asking at once, logged like chat answers;
2. simulated users: a wrong answer (the A/B runner's ``correct`` = 0) gets a correction with the
   question's reference answer and the number of the source from its document when that source was
   shown ("not in the sources" for unanswerable rows); a right answer gets a thumbs-up;
3. ``ragtune feedback export`` (corrections + thumbs-up rows, RAFT layout);
4. the candidate: a LoRA (SFT recipe, forgetting probe on) trained on the exported rows;
5. the gate (``serving.promotion.gate``) on the demo **test** questions: paired A/B, candidate in
   rag+ft vs the current assistant, promote iff the 95% CI of the ``correct`` difference is above
   zero and forgetting is within the margin.

Baseline = the current assistant's test ``correct``, ragtune = the candidate's; ``loop_correct_gain``
is their paired difference with its 95% bootstrap CI. ``gate_follows_rule`` checks the decision against
the rule recomputed from the printed figures. ``--quick``: 30 train questions, 20 steps, 30 test questions.
JSON lines: ``{"bench": "loop", "metric", "value", "baseline", "ragtune", "unit", "goal", ...}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
QA = REPO / "corpora" / "corvida" / "qa"
DOCS = REPO / "corpora" / "corvida" / "docs"
COLLECTION = "corvida"
USERS = 4  # simulated users asking at once


def line(metric: str, value, unit: str, goal: str | None = None, baseline=None, ragtune=None, **extra) -> dict:
    row = {"bench": "loop", "metric": metric, "value": None if value is None else round(float(value), 4),
           "baseline": baseline, "ragtune": ragtune, "unit": unit, "goal": goal, **extra}
    print(json.dumps(row), flush=True)
    return row


def log(message: str) -> None:
    print(f"[loop_bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def load(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def setup(home: Path) -> None:
    from rag.collection import IndexConfig, Workspace
    from tuning.models import ensure_packaged_causal_lm

    ensure_packaged_causal_lm(home)
    ws = Workspace(home)
    if COLLECTION not in ws.names():
        ws.index(COLLECTION, [DOCS], config=IndexConfig(chunk_tokens=128))


def simulate_users(assistant, questions: list[dict], current: str | None) -> dict:
    """Answer each train question with the current assistant; correct the wrong ones, like the right ones."""
    from serving.ab import metrics
    from serving.ab.runner import answer_for_scoring
    from serving.feedback import record_correction

    store, ws = assistant.store, assistant.workspace
    mode = "rag+ft" if current else "rag"
    chat = store.new_chat("loop bench: simulated users")
    counts = {"answered": 0, "corrected": 0, "with_source": 0, "not_in_sources": 0, "thumbs_up": 0}
    started = time.perf_counter()

    def ask(row: dict):
        return assistant.answer(row["question"], mode=mode, collection=COLLECTION, adapter=current, chat_id=chat,
                                max_new_tokens=64)

    # users ask at the same time (the engine decodes their answers in one batch); feedback is written in order
    with ThreadPoolExecutor(max_workers=USERS) as pool:
        answers = pool.map(ask, questions)
        for i, (row, answer) in enumerate(zip(questions, answers), 1):
            counts["answered"] += 1
            right = metrics.score_answer(answer_for_scoring(answer.text), row)["correct"] >= 1.0
            if right:
                store.set_feedback(answer.message_id, 1)
                counts["thumbs_up"] += 1
            elif row.get("kind") == "unanswerable" or not row.get("doc"):
                record_correction(store, ws, answer.message_id, "", not_in_sources=True)
                counts["corrected"] += 1
                counts["not_in_sources"] += 1
            else:
                shown = [s.n for s in answer.sources if s.doc == row["doc"] or s.doc.endswith("/" + row["doc"])]
                record_correction(store, ws, answer.message_id, str(row["answer"]), source_n=shown[0] if shown else None)
                counts["corrected"] += 1
                counts["with_source"] += bool(shown)
            if i % 10 == 0 or i == len(questions):
                rate = (time.perf_counter() - started) / i
                log(f"users: {i}/{len(questions)} answered, {counts['corrected']} corrected, ETA {rate * (len(questions) - i):.0f} s")
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="30 train questions, 20 training steps, 30 test questions")
    parser.add_argument("--home", default=None, help="workspace (default: a fresh temp dir, the demo corpus indexed)")
    parser.add_argument("--current", default=None, help="the current adapter (default: none, the base model in rag)")
    parser.add_argument("--train-questions", type=int, default=0, help="train questions the users ask (0 = by --quick)")
    parser.add_argument("--test-questions", type=int, default=0, help="test questions for the gate (0 = by --quick)")
    parser.add_argument("--steps", type=int, default=0, help="candidate training steps (0 = by --quick)")
    parser.add_argument("--dpo-steps", type=int, default=0,
                        help="after the gate: DPO on the exported pairs for this many steps, starting from the candidate "
                             "(its reference), and its win rate against the candidate on the test questions (0 = off)")
    args = parser.parse_args()
    n_train = args.train_questions or (30 if args.quick else 240)
    n_test = args.test_questions or (30 if args.quick else 0)
    steps = args.steps or (20 if args.quick else 80)

    home = Path(args.home) if args.home else Path(tempfile.mkdtemp(prefix="loop-bench-"))
    t0 = time.perf_counter()
    setup(home)
    log(f"setup (model conversion + demo index) {time.perf_counter() - t0:.0f} s in {home}")

    from rag.collection import Workspace
    from serving.assistant import Assistant
    from serving.config import ServeConfig
    from serving.feedback import export_feedback
    from serving import promotion
    from tuning.run import tune

    assistant = Assistant.open(home, ServeConfig())
    loop_started = time.perf_counter()
    counts = simulate_users(assistant, load(QA / "train.jsonl")[:n_train], args.current)
    log(f"users done: {counts}")
    out = home / "data" / "loop-feedback.jsonl"
    report = export_feedback(home, COLLECTION, out, thumbs_up=True)
    log(f"export: {report.rows} rows ({report.abstention_rows} abstention, {report.thumbs_up_rows} thumbs-up), "
        f"{report.pairs} pairs, sha256 {report.sha256[:16]}")
    name = "loop-candidate"
    t_train = time.perf_counter()
    manifest = tune(None, [f"data={out}", f"name={name}", f"max_steps={steps}", "batch_size=8", "learning_rate=4e-4",
                           "max_seq_len=1024", "val_share=0", "forgetting_probe=true", "probe_limit=10", "overwrite=true",
                           "progress=false", "threads=0", "lora_r=16", "lora_alpha=32"],
                    home=home, echo=lambda m: log(f"tune: {m}"))
    train_s = time.perf_counter() - t_train
    test_file = home / "data" / "loop-test.jsonl"
    rows = load(QA / "test.jsonl")
    test_file.write_text("".join(json.dumps(r) + "\n" for r in (rows[:n_test] if n_test else rows)), encoding="utf-8")
    last = [0.0]

    def progress(done: int, total: int, message: str) -> None:
        if done == total or time.perf_counter() - last[0] > 20:
            last[0] = time.perf_counter()
            log(f"gate: {done}/{total} {message}")

    decision = promotion.gate(assistant, name, COLLECTION, str(test_file), against=args.current, progress=progress)
    wall = time.perf_counter() - loop_started
    log("\n" + decision.summary())
    c = decision.correct
    line("loop_correct_gain", c["mean"], "correct (share of test questions)", "> 0, CI above 0",
         baseline=round(decision.current_correct, 4), ragtune=round(decision.candidate_correct, 4),
         ci_low=round(c["ci_low"], 4), ci_high=round(c["ci_high"], 4), p_value=c["p_value"], n=c["n"],
         current=args.current or "base (rag)", train_questions=n_train, corrections=counts["corrected"],
         thumbs_up=counts["thumbs_up"], rows=report.rows, steps=manifest["metrics"]["steps"])
    line("loop_wall_s", wall, "s", "< 900 (--quick)", train_s=round(train_s, 1))
    rule = c["ci_low"] > 0 and not any(r.startswith("forgetting:") or "no forgetting probe" in r for r in decision.reasons)
    line("gate_follows_rule", float(rule == decision.promote), "bool", "1", decision="promote" if decision.promote else "refuse",
         forgetting=decision.forgetting)
    if args.dpo_steps:
        dpo_win_rate(assistant, name, report.pairs_out, str(test_file), args.dpo_steps, home)


def dpo_win_rate(assistant, reference: str, pairs: str, test_file: str, steps: int, home: Path) -> None:
    """A DPO adapter trained on the exported preference pairs, starting from ``reference`` (TRL keeps a frozen
    copy of it as DPO's reference), against that reference in a blind arena on the test questions: both
    answer in rag+ft, the answer with the higher token F1 against the reference answer wins the vote (a
    tie is half a win). Win rate with its 95% bootstrap CI over questions."""
    from serving import promotion
    from serving.ab.runs import ABStore
    from serving.ab.stats import bootstrap_mean_ci
    from tuning.run import tune

    name = "loop-dpo"
    started = time.perf_counter()
    manifest = tune(None, ["task=dpo", f"data={pairs}", f"name={name}", f"start_adapter={reference}", f"max_steps={steps}",
                           "batch_size=4", "learning_rate=5e-5", "max_seq_len=1024", "val_share=0", "forgetting_probe=false",
                           "overwrite=true", "progress=false", "threads=0"],
                    home=home, echo=lambda m: log(f"dpo: {m}"))
    train_s = time.perf_counter() - started
    # the paired answers: the gate's A/B runs (dry run: nothing is promoted), the reference's from the A/B cache
    decision = promotion.gate(assistant, name, COLLECTION, test_file, against=reference, dry_run=True)
    store = ABStore(assistant.workspace.db_path)

    def f1s(run: str) -> dict:
        return {r["question_id"]: r["row"]["scores"]["token_f1"] for r in store.results(store.run(run)["id"])
                if r["arm"] == "rag+ft"}

    dpo, ref = f1s(decision.runs["candidate"]), f1s(decision.runs["current"])
    ids = sorted(set(dpo) & set(ref))
    votes = [1.0 if dpo[i] > ref[i] else 0.0 if dpo[i] < ref[i] else 0.5 for i in ids]
    rate, low, high = bootstrap_mean_ci(votes)
    line("dpo_win_rate", rate, "share of arena votes won (ties half)", "> 0.5, CI above 0.5",
         baseline=reference, ragtune=name, ci_low=round(low, 4), ci_high=round(high, 4), n=len(votes),
         wins=votes.count(1.0), ties=votes.count(0.5), losses=votes.count(0.0), steps=manifest["metrics"].get("steps"),
         train_loss=manifest["metrics"].get("train_loss"), train_s=round(train_s, 1),
         dpo_correct=decision.candidate_correct, reference_correct=decision.current_correct)


if __name__ == "__main__":
    main()
