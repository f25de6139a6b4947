"""``ragtune import ...`` and ``ragtune ab ...`` commands."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

import_app = typer.Typer(help="Import public question sets as a collection plus question files.", no_args_is_help=True)


@import_app.command("squad")
def import_squad_cmd(
    file: Path = typer.Argument(..., help="SQuAD-format JSON file"),
    collection: str = typer.Option(..., "--collection", "-c", help="collection to create or update"),
    out: Path = typer.Option(..., "--out", help="folder for docs/, train.jsonl, test.jsonl, raft_train.jsonl"),
    test_share: float = typer.Option(0.3, "--test-share", help="share of documents held out for test.jsonl"),
    per: str = typer.Option("article", "--per", help="one document per 'article' or per 'context'"),
    raft: bool = typer.Option(True, "--raft/--no-raft", help="also build RAFT training examples from train.jsonl"),
    seed: int = typer.Option(13, "--seed", help="seed of the document split"),
    home: Optional[str] = typer.Option(None, "--home", help="workspace folder"),
) -> None:
    """Turn a SQuAD file into a collection, train/test question files split by document, and RAFT examples.

    Example: ragtune import squad ../shared/datasets/covid_qa/200423_covidQA.json --collection covidqa --out data/covidqa
    """
    from serving.ab.importer import SquadImportError, import_squad

    if per not in ("article", "context"):
        raise SquadImportError("--per must be 'article' or 'context'")
    report = import_squad(file, collection, out, test_share=test_share, seed=seed, per=per, raft=raft, home=home,  # type: ignore[arg-type]
                          progress=sys.stderr.isatty())
    typer.echo(json.dumps(report.to_dict(), indent=2))


ab_app = typer.Typer(help="A/B test base vs rag vs ft vs rag+ft on a question set.", no_args_is_help=True)


@ab_app.command("run")
def ab_run_cmd(
    questions: Path = typer.Option(..., "--questions", help="JSONL question file {id, question, answer, doc?, ...}"),
    collection: Optional[str] = typer.Option(None, "--collection", "-c", help="collection for the rag arms"),
    adapter: Optional[str] = typer.Option(None, "--adapter", help="adapter for the ft arms"),
    arms: str = typer.Option("base,rag,ft,rag+ft", "--arms", help="comma-separated arms"),
    limit: int = typer.Option(0, "--limit", help="only the first N questions (0 = all)"),
    name: str = typer.Option("", "--name", help="run name (default: from the file, collection and adapter)"),
    k: int = typer.Option(4, "-k", help="chunks retrieved into the prompt"),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="answer length limit"),
    concurrency: int = typer.Option(8, "--concurrency", help="answers computed at once (one batch in the engine; 1 = one by one)"),
    home: Optional[str] = typer.Option(None, "--home", help="workspace folder"),
) -> None:
    """Answer every question with every arm (greedy, cached: a re-run computes only what is missing).

    Example: ragtune ab run --questions corpora/corvida/qa/test.jsonl --collection corvida --adapter corvida-raft --limit 20
    """
    from core.config import build_config
    from serving.ab.runner import ABConfig, run_ab
    from serving.assistant import Assistant

    config = build_config(ABConfig, {"questions": str(questions), "collection": collection, "adapter": adapter,
                                     "arms": arms, "limit": limit, "name": name, "k": k,
                                     "max_new_tokens": max_new_tokens, "concurrency": concurrency}, source="options")
    assistant = Assistant.open(home, log=False)
    from tqdm import tqdm

    # in a log file (not a terminal) the bar still reports, once every 30 s
    bar = tqdm(total=0, desc=f"ab {config.name}", unit="answer", mininterval=0.1 if sys.stderr.isatty() else 30)

    def progress(done: int, total: int, message: str) -> None:
        bar.total = total
        bar.set_postfix_str(message, refresh=False)
        bar.update(done - bar.n)

    summary = run_ab(assistant, config, progress)
    bar.close()
    typer.echo(json.dumps(summary, indent=2))


@ab_app.command("report")
def ab_report_cmd(
    run: str = typer.Argument(..., help="run name (see `ragtune ab runs`)"),
    fmt: str = typer.Option("md", "--format", help="md (Markdown + PNG plots in --out) or json (printed)"),
    out: Optional[Path] = typer.Option(None, "--out", help="folder for report.md/report.json/plots (default: <home>/reports/<run>)"),
    home: Optional[str] = typer.Option(None, "--home", help="workspace folder"),
) -> None:
    """Report a run: per-arm means with 95% CIs, paired differences and tests, the 2x2 interaction, plots.

    Example: ragtune ab report test-corvida-corvida-raft --format json
    """
    from rag.collection import Workspace
    from serving.ab.report import build_report, write_report
    from serving.ab.runs import ABStore

    if fmt not in ("md", "json"):
        raise typer.BadParameter("--format must be md or json")
    ws = Workspace(home)
    store = ABStore(ws.db_path)
    try:
        if fmt == "json" and out is None:
            typer.echo(json.dumps(build_report(store, run), indent=2, default=float))
            return
        files = write_report(store, run, out or ws.layout.report_dir(run), fmt)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1)
    typer.echo(json.dumps(files, indent=2))


@ab_app.command("runs")
def ab_runs_cmd(home: Optional[str] = typer.Option(None, "--home", help="workspace folder")) -> None:
    """List A/B runs.

    Example: ragtune ab runs
    """
    from rag.collection import Workspace
    from serving.ab.runs import ABStore

    for r in ABStore(Workspace(home).db_path).runs():
        typer.echo(f"{r['name']}: {r['answers']} answers, arms {','.join(r['config'].get('arms', []))}")


def register(app: typer.Typer) -> None:
    app.add_typer(import_app, name="import")
    app.add_typer(ab_app, name="ab")
