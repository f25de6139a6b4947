"""The feedback loop in the ``ragtune`` CLI: ``feedback correct|export|status`` and ``promote``.

``register(app)`` adds them to the typer app in ``serving/cli.py``. User-fixable problems raise
``FeedbackError`` / ``PromotionError`` (ValueErrors), printed as one line with exit code 1.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

_HOME = typer.Option(None, "--home", help="workspace folder (default: $RAGTUNE_HOME or ~/.local/share/ragtune)")

feedback_app = typer.Typer(help="Corrections, thumbs and arena votes -> training data.", no_args_is_help=True)


def _emit(data) -> None:
    typer.echo(json.dumps(data, indent=2, ensure_ascii=False, default=str))


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


@feedback_app.command("correct")
def correct_cmd(
    message_id: int = typer.Argument(..., help="the answer's id (`ragtune ask --json` prints it as message_id)"),
    correction: str = typer.Argument("", help="the right answer"),
    source: Optional[int] = typer.Option(None, "--source", help="number of the source that holds the answer"),
    not_in_sources: bool = typer.Option(False, "--not-in-sources", help="none of the sources holds the answer"),
    home: Optional[str] = _HOME,
) -> None:
    """Store the right answer for a logged answer (the chat's correction form does the same).

    Example: ragtune feedback correct 42 "Seven years from installation." --source 2
    """
    from rag.collection import Workspace
    from serving.feedback import FeedbackError, record_correction
    from serving.history import ChatStore

    ws = Workspace(home)
    try:
        cid = record_correction(ChatStore(ws.db_path), ws, message_id, correction, source, not_in_sources)
    except FeedbackError as exc:
        _fail(str(exc))
    typer.echo(f"correction {cid} stored for answer {message_id}")


@feedback_app.command("export")
def export_cmd(
    collection: str = typer.Option(..., "--collection", "-c", help="collection whose feedback to export"),
    out: Path = typer.Option(..., "--out", help="SFT rows (JSONL); preference pairs go to <out>.pairs.jsonl"),
    pairs_out: Optional[Path] = typer.Option(None, "--pairs-out", help="where to write the preference pairs"),
    thumbs_up: bool = typer.Option(False, "--thumbs-up", help="also keep thumbs-up answers as positive rows"),
    include_changed: bool = typer.Option(False, "--include-changed",
                                         help="also use feedback whose documents changed since (flagged in the rows)"),
    sources: str = typer.Option("whole", "--sources",
                                help="whole: each source as its whole chunk (the layout rag+ft reads by default); "
                                     "as_seen: the exact extracts the answer saw"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
    home: Optional[str] = _HOME,
) -> None:
    """Write corrections (and optionally thumbs-up answers) as RAFT-layout training rows, and arena
    votes + corrections as preference pairs; same feedback -> same file hash.

    Example: ragtune feedback export -c corvida --out data/feedback.jsonl && ragtune tune name=corvida-fb data=data/feedback.jsonl
    """
    from core.names import check_name
    from serving.feedback import export_feedback

    check_name(collection, "collection name")
    report = export_feedback(home, collection, out, thumbs_up=thumbs_up, include_changed=include_changed, pairs_out=pairs_out,
                             sources=sources)
    if as_json:
        _emit(report.to_dict())
        return
    typer.echo(f"{report.rows} rows -> {report.out} (sha256 {report.sha256[:16]}); {report.pairs} pairs -> {report.pairs_out}")
    typer.echo(f"  from {report.corrections} corrections ({report.abstention_rows} abstention rows), "
               f"{report.thumbs_up_rows} thumbs-up rows, {report.arena_pairs} arena pairs, "
               f"{report.duplicates_merged} duplicates merged")
    for f in report.flagged_changed:
        typer.echo(f"  flagged {f['feedback']}: document(s) changed since: {', '.join(f['documents'])}"
                   + (" (used)" if f["used"] else " (left out; --include-changed to use it)"))


@feedback_app.command("status")
def status_cmd(collection: str = typer.Option(..., "--collection", "-c", help="collection"),
               home: Optional[str] = _HOME) -> None:
    """How many corrections, thumbs-up and arena votes are waiting, and the current adapter.

    Example: ragtune feedback status -c corvida
    """
    from serving.feedback import pending
    from serving.promotion import current_adapter

    _emit({**pending(home, collection), "current_adapter": current_adapter(home, collection)})


def promote_cmd(
    candidate: Optional[str] = typer.Argument(None, help="adapter to promote"),
    collection: str = typer.Option(..., "--collection", "-c", help="collection whose default adapter changes"),
    questions: Optional[Path] = typer.Option(None, "--questions", help="held-out questions (default: the collection's "
                                             "registered eval set); never the rows the candidate was trained on"),
    against: Optional[str] = typer.Option(None, "--against", help="compare with this adapter (default: the current one)"),
    force: bool = typer.Option(False, "--force", help="promote even if the gate refuses (recorded as forced)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="run the gate and print the decision; change nothing"),
    do_rollback: bool = typer.Option(False, "--rollback", help="restore the adapter that was current before the last promotion"),
    show_history: bool = typer.Option(False, "--history", help="print the collection's promotions and rollbacks"),
    register_questions: bool = typer.Option(False, "--register", help="store --questions as the collection's default held-out set"),
    limit: int = typer.Option(0, "--limit", help="only the first N questions (0 = all)"),
    max_ppl: float = typer.Option(5.0, "--max-perplexity-increase", help="forgetting margin: general perplexity change "
                                  "may exceed the current adapter's by this many points"),
    max_qa_drop: float = typer.Option(0.05, "--max-qa-drop", help="forgetting margin: general QA accuracy change may "
                                      "trail the current adapter's by this much"),
    as_json: bool = typer.Option(False, "--json", help="print the decision as JSON"),
    config: Optional[Path] = typer.Option(None, "--config", help="serving config YAML"),
    overrides: List[str] = typer.Option([], "--set", help="serving config key=value (repeatable)"),
    home: Optional[str] = _HOME,
) -> None:
    """Make CANDIDATE the collection's default adapter if a paired A/B on held-out questions (rag+ft,
    candidate vs current) gives a 95% CI of the `correct` difference above zero and forgetting stays
    within the margin. The decision and its figures are printed and recorded.

    Example: ragtune promote corvida-fb -c corvida --questions corpora/corvida/qa/test.jsonl

    Rollback: ragtune promote --rollback -c corvida
    """
    from core.names import check_name
    from serving import promotion

    check_name(collection, "collection name")
    if show_history:
        _emit(promotion.history(home, collection))
        return
    if do_rollback:
        try:
            restored = promotion.rollback(home, collection)
        except promotion.PromotionError as exc:
            _fail(str(exc))
        typer.echo(f"rolled back: the current adapter of {collection} is now {restored or 'none (the base model)'}")
        return
    if register_questions:
        if questions is None:
            _fail("--register needs --questions FILE")
        typer.echo(f"registered {promotion.register_eval_set(home, collection, questions)} as the held-out set of {collection}")
        if candidate is None:
            return
    if candidate is None:
        _fail("name the CANDIDATE adapter to promote (or use --rollback / --history)")
    check_name(candidate, "adapter name")
    if against:
        check_name(against, "adapter name")
    from serving.cli import _assistant

    assistant = _assistant(home, config, overrides, log=False)

    def progress(done: int, total: int, message: str) -> None:
        typer.echo(f"\r  gate {done}/{total} {message[:40]:<40}", nl=False, err=True)

    try:
        decision = promotion.gate(assistant, candidate, collection, str(questions) if questions else None, against,
                                  force=force, dry_run=dry_run, limit=limit, max_perplexity_increase_pct=max_ppl,
                                  max_qa_accuracy_drop=max_qa_drop, progress=None if as_json else progress)
    except promotion.PromotionError as exc:
        _fail(str(exc))
    if not as_json:
        typer.echo("", err=True)
        typer.echo(decision.summary())
    else:
        _emit(decision.to_dict())
    if not (decision.promote or decision.forced):
        raise typer.Exit(2)  # refused: a script can tell it apart from an error (1)


def register(app: typer.Typer) -> None:
    app.add_typer(feedback_app, name="feedback")
    app.command("promote")(promote_cmd)
