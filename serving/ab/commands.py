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


def register(app: typer.Typer) -> None:
    app.add_typer(import_app, name="import")
