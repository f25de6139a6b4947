"""Tuning commands for the ``ragtune`` CLI: tune, adapters (list / rm / merge / reading), data raft, classify, tune-retriever, tune-ranker.

``register(app)`` adds them to the lead's typer app in ``serving/cli.py``. Heavy imports happen inside
the commands so ``ragtune --help`` stays fast. User-fixable problems raise ``tuning.errors.TuningError``
(or ``core.config.ConfigError``), which the CLI prints as one line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

_HOME = typer.Option(None, "--home", help="workspace folder (default: $RAGTUNE_HOME or ~/.local/share/ragtune)")


def _emit(data) -> None:
    typer.echo(json.dumps(data, indent=2, ensure_ascii=False, default=str))


def tune_cmd(
    config: Optional[Path] = typer.Argument(None, help="YAML config (see tuning/configs/); omit to use defaults + key=value"),
    overrides: Optional[List[str]] = typer.Argument(None, help="key=value overrides, e.g. max_steps=20 learning_rate=1e-4"),
    show_config: bool = typer.Option(False, "--show-config", help="print every config key with its help as YAML and exit"),
    as_json: bool = typer.Option(False, "--json", help="print the adapter manifest as JSON when done"),
    home: Optional[str] = _HOME,
) -> None:
    """Fine-tune a model (LoRA / DoRA / QLoRA / full, or a classifier) from a YAML config.

    Example: ragtune tune tuning/configs/corvida-lora.yaml max_steps=20 name=corvida-try

    Resume after an interruption: ragtune tune tuning/configs/corvida-lora.yaml resume=true
    """
    from tuning.config import load_tune_config, yaml_template

    if show_config:
        typer.echo(yaml_template(f"ragtune tune {config or 'tune.yaml'}"))
        return
    if config is not None and "=" in str(config) and not Path(config).exists():
        overrides = [str(config), *(overrides or [])]
        config = None
    from tuning.run import tune

    cfg = load_tune_config(config, overrides or [])
    manifest = tune(cfg, home=home, echo=(lambda *_: None) if as_json else typer.echo)
    if as_json:
        _emit(manifest)


adapters_app = typer.Typer(help="List, remove and merge trained adapters.", invoke_without_command=True,
                           no_args_is_help=False)


@adapters_app.callback()
def adapters_list(
    ctx: typer.Context,
    as_json: bool = typer.Option(False, "--json", help="print machine-readable JSON"),
    home: Optional[str] = _HOME,
) -> None:
    """List adapters (newest first) with task, method, base model and metrics.

    Example: ragtune adapters --json
    """
    if ctx.invoked_subcommand is not None:
        ctx.obj = {"home": home}
        return
    from core.workspace import ragtune_home
    from tuning.adapters import list_adapters

    items = list_adapters(ragtune_home(home))
    if as_json:
        _emit(items)
        return
    if not items:
        typer.echo("no adapters yet; train one with: ragtune tune tuning/configs/corvida-lora.yaml")
        return
    for a in items:
        m = a.get("metrics") or {}
        score = m.get("eval_loss", m.get("test_accuracy"))
        extra = f" eval_loss={score}" if "eval_loss" in m else (f" accuracy={score}" if score is not None else "")
        forgot = f" general_ppl={a['forgetting']:+.1f}%" if isinstance(a.get("forgetting"), (int, float)) else ""
        reads = f" reading={a['reading']}" if a.get("reading") else ""
        typer.echo(f"{a['name']}\t{a.get('task')}/{a.get('method')}\t{a.get('base_model')}\t{a.get('created')}{extra}{forgot}{reads}")


def _home_from(ctx: typer.Context, home: Optional[str]) -> Optional[str]:
    return home or (ctx.obj or {}).get("home")


@adapters_app.command("rm")
def adapters_rm(ctx: typer.Context, name: str = typer.Argument(..., help="adapter name"), home: Optional[str] = _HOME) -> None:
    """Delete an adapter folder.

    Example: ragtune adapters rm corvida-try
    """
    from core.workspace import ragtune_home
    from tuning.adapters import remove_adapter

    path = remove_adapter(ragtune_home(_home_from(ctx, home)), name)
    typer.echo(f"removed {name} ({path})")


@adapters_app.command("merge")
def adapters_merge(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="adapter name"),
    out: Path = typer.Option(..., "--out", help="new folder for the merged HF model"),
    home: Optional[str] = _HOME,
) -> None:
    """Merge an adapter into its base model and save a plain HF model folder (safetensors + tokenizer).

    Example: ragtune adapters merge corvida-lora --out merged/corvida
    """
    from core.workspace import ragtune_home
    from tuning.adapters import merge_adapter

    path = merge_adapter(ragtune_home(_home_from(ctx, home)), name, out)
    typer.echo(f"merged model written to {path}")


@adapters_app.command("reading")
def adapters_reading(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="adapter name"),
    collection: Optional[str] = typer.Option(None, "--collection", "-c", help="collection the dev questions are asked of"),
    questions: Optional[Path] = typer.Option(None, "--questions", help="dev questions (JSONL {question, answer}; never the test set)"),
    limit: int = typer.Option(0, "--limit", help="only the first N dev questions (0 = all)"),
    layout: Optional[str] = typer.Option(None, "--layout", help="set by hand instead of measuring: chunks, sentences or sentences+chunks"),
    clear: bool = typer.Option(False, "--clear", help="forget the recorded layout (rag+ft then reads with the ragft_* options)"),
    overrides: Optional[List[str]] = typer.Option(None, "--set", help="serving option for the measurement, e.g. --set k=4"),
    as_json: bool = typer.Option(False, "--json", help="print the reading record as JSON"),
    home: Optional[str] = _HOME,
) -> None:
    """Choose the layout the adapter reads its sources in (whole chunks; the best sentence copied with grounded
    decoding; or that with a second look at the whole chunks after a refusal) on dev questions, and record it
    with the adapter; rag+ft answers then use it.

    Example: ragtune adapters reading covidqa-raft -c covidqa --questions data/covidqa/train.jsonl --limit 100
    """
    from core.config import load_config
    from core.workspace import ragtune_home
    from serving.ab.reading import choose_reading, layout_record
    from serving.config import ServeConfig, ServingError, check_reading
    from tuning.adapters import get_adapter, set_reading

    root = ragtune_home(_home_from(ctx, home))
    if sum(bool(x) for x in (questions, layout, clear)) > 1:
        raise ServingError("use one of --questions (measure), --layout (set by hand) or --clear")
    if clear or layout:
        record = None if clear else layout_record(layout)
        set_reading(root, name, record)
    elif questions:
        if not collection:
            raise ServingError("--questions needs --collection, the collection the dev questions are asked of")
        from serving.assistant import Assistant
        from tqdm import tqdm

        assistant = Assistant.open(root, load_config(ServeConfig, None, overrides or []), log=False)
        bar = tqdm(total=0, desc=f"reading {name}", unit="answer")

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        record = choose_reading(assistant, name, collection, questions, limit, progress)
        bar.close()
        set_reading(root, name, record)
    else:
        record = get_adapter(root, name)[1].get("reading")
        check_reading(record, name)
    if as_json:
        _emit(record)
    elif record is None:
        typer.echo(f"{name}: no reading layout recorded; rag+ft reads with the ragft_* options")
    else:
        figures = record.get("chosen_on")
        how = str(figures)
        if isinstance(figures, dict):
            versus = "; ".join(f"{layout} {figures['token_f1'][layout]} ({d:+.1f} [{lo:+.1f}, {hi:+.1f}])"
                               for layout, (d, lo, hi) in figures["f1_minus_chunks"].items())
            how = f"token F1 chunks {figures['token_f1']['chunks']}; {versus}; on {figures['n']} questions of {figures['questions']}"
        typer.echo(f"{name}: reads {record['layout']} in rag+ft; {how}")


data_app = typer.Typer(help="Build training data.", no_args_is_help=True)


@data_app.command("raft")
def data_raft(
    collection: str = typer.Option(..., "--collection", "-c", help="indexed collection the questions' documents are in"),
    questions: Path = typer.Option(..., "--questions", help="JSONL with question, answer, doc, span (corpora/corvida/qa format)"),
    out: Path = typer.Option(..., "--out", help="output JSONL (qa rows with context); the test split goes to OUT.test.jsonl"),
    no_oracle_share: float = typer.Option(0.2, "--no-oracle-share", help="share of rows whose context omits the oracle chunk"),
    distractors: int = typer.Option(3, "--distractors", help="distractor chunks per row (top hits that are not the oracle)"),
    test_share: float = typer.Option(0.0, "--test-share", help="share of source documents held out as the test split"),
    seed: int = typer.Option(42, "--seed", help="seed for shuffling and splits"),
    abstain_share: float = typer.Option(0.0, "--abstain-share", help="share of the no-oracle rows whose target is the refusal sentence (unanswerable questions too); 0 = off"),
    refusal: str = typer.Option("The sources do not say.", "--refusal", help="the collection's 'not in the sources' sentence (serving's refusal_text)"),
    exclude_docs_from: List[Path] = typer.Option([], "--exclude-docs-from", help="question file whose documents are never used as distractors (e.g. a held-out unseen set); repeatable"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
    home: Optional[str] = _HOME,
) -> None:
    """Build RAFT examples: question + oracle chunk + hard-negative distractors -> answer citing the oracle.

    Example: ragtune data raft --collection corvida --questions corpora/corvida/qa/train.jsonl --out raft.jsonl --test-share 0.2
    """
    from tuning.raft import write_raft

    report = write_raft(home, collection, questions, out, distractors, no_oracle_share, test_share, seed,
                        exclude_docs_from=exclude_docs_from, abstain_share=abstain_share, refusal=refusal)
    if as_json:
        _emit(report.to_dict())
        return
    typer.echo(f"{report.written} rows -> {report.out}" + (f", {report.test_written} test rows -> {report.test_out}" if report.test_out else ""))
    typer.echo(f"with oracle {report.with_oracle}, without oracle {report.without_oracle}, abstain {report.abstain}, "
               f"unanswerable {report.unanswerable}, "
               f"rejected (quote not in oracle) {report.rejected_quote}, unknown documents {report.skipped_unknown_doc}")


@data_app.command("evidence")
def data_evidence(
    collection: str = typer.Option(..., "--collection", "-c", help="indexed collection the questions are answered from"),
    questions: Path = typer.Option(..., "--questions", help="JSONL with question and answer (corpora/corvida/qa format)"),
    out: Path = typer.Option(..., "--out", help="output JSONL (qa rows with context, the layout rag serves)"),
    sentences: str = typer.Option("1", "--sentences", help="evidence sentences per prompt, one layout or several: 1 or 1,2,3"),
    settings: List[str] = typer.Option([], "--set", help="serving option key=value the rows follow (k, search_mode, "
                                                          "evidence_ranker, evidence_window_tokens, ...), repeatable"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
    home: Optional[str] = _HOME,
) -> None:
    """Build reader rows in the evidence layout: the best sentences of the retrieved chunks, exactly as rag
    serves them, -> the short answer; only rows whose evidence holds the answer.

    Example: ragtune data evidence -c corvida --questions corpora/corvida/qa/train_nodev.jsonl --out evidence.jsonl --sentences 1,2,3
    """
    from core.config import load_config
    from serving.config import ServeConfig
    from serving.evidence_rows import write_evidence_rows

    try:
        counts = [int(x) for x in sentences.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"--sentences {sentences!r}: give counts like 1 or 1,2,3") from None
    config = load_config(ServeConfig, None, list(settings))
    report = write_evidence_rows(home, collection, questions, out, counts, config,
                                 echo=lambda m: typer.echo(m, err=True))
    if as_json:
        _emit(report.to_dict())
        return
    typer.echo(f"{report.written} rows -> {report.out} (per layout {report.per_layout}, ranker {report.ranker}); skipped: "
               f"answer not in the evidence {report.skipped_answer_not_shown}, unanswerable {report.skipped_unanswerable}, "
               f"yes/no {report.skipped_yes_no}")


def classify_cmd(
    text: List[str] = typer.Argument(..., help="text(s) to classify"),
    adapter: str = typer.Option(..., "--adapter", help="a classification adapter (task=classification)"),
    as_json: bool = typer.Option(False, "--json", help="print labels and scores as JSON"),
    home: Optional[str] = _HOME,
) -> None:
    """Classify text with a trained classification adapter.

    Example: ragtune classify --adapter corvida-classify "The app will not pair with my heat pump"
    """
    from tuning.recipes.classification import classify

    results = classify(home, adapter, list(text))
    if as_json:
        _emit(results)
        return
    for t, r in zip(text, results):
        typer.echo(f"{r['label']}\t{r['scores'][r['label']]:.2f}\t{t}")


def tune_retriever_cmd(
    collection: str = typer.Option(..., "--collection", "-c", help="collection whose embedder is tuned (its documents hold the answers)"),
    questions: Path = typer.Option(..., "--questions", help="JSONL with question, answer, doc, span (corpora/corvida/qa format)"),
    name: str = typer.Option(..., "--name", help="saved as <home>/retrievers/NAME (a sentence-transformers folder + ragtune.json)"),
    epochs: float = typer.Option(1.0, "--epochs", help="passes over the (question, chunk) pairs"),
    batch_size: int = typer.Option(16, "--batch-size", help="pairs per batch: the other rows' chunks are each row's negatives"),
    learning_rate: float = typer.Option(2e-5, "--learning-rate", help="AdamW learning rate"),
    max_steps: int = typer.Option(-1, "--max-steps", help="stop after N steps (-1: use --epochs)"),
    positives: str = typer.Option("chunk", "--positives",
                                  help="what each question is paired with: its oracle chunk, the sentence of it holding "
                                       "the answer (what the answer-time evidence ranker scores), or both"),
    as_json: bool = typer.Option(False, "--json", help="print the manifest as JSON"),
    home: Optional[str] = _HOME,
) -> None:
    """Fine-tune the collection's embedder on its training questions (MultipleNegativesRankingLoss).

    Example: ragtune tune-retriever -c corvida --questions corpora/corvida/qa/train.jsonl --name corvida-minilm
    then use it: ragtune reindex corvida --model <home>/retrievers/corvida-minilm
    """
    from core.workspace import ragtune_home
    from serving.ab.runner import load_questions
    from tuning.recipes.retriever import train_retriever

    rows = load_questions(questions)
    manifest = train_retriever(ragtune_home(home), collection, rows, name, epochs, batch_size, learning_rate, max_steps,
                               positives=positives, echo=(lambda *_: None) if as_json else typer.echo)
    if as_json:
        _emit(manifest)


def tune_ranker_cmd(
    collection: str = typer.Option(..., "--collection", "-c", help="collection whose evidence ranker is learned"),
    questions: Path = typer.Option(..., "--questions", help="JSONL with question and answer (corpora/corvida/qa format)"),
    dev: Optional[Path] = typer.Option(None, "--dev", help="held-out JSONL (same format): its top-1 is reported, not trained on"),
    c: float = typer.Option(1.0, "--c", help="inverse regularisation strength of the logistic regression"),
    if_missing: bool = typer.Option(False, "--if-missing", help="do nothing when the collection already has a ranker"),
    as_json: bool = typer.Option(False, "--json", help="print the manifest as JSON"),
    home: Optional[str] = _HOME,
) -> None:
    """Learn which retrieved sentence holds the answer from the collection's training questions (seconds to minutes).

    The assistant then orders evidence sentences with it (ServeConfig evidence_ranker=auto, the default).
    Example: ragtune tune-ranker -c corvida --questions corpora/corvida/qa/train.jsonl
    """
    from core.workspace import ragtune_home
    from rag.collection import Workspace
    from serving.ab.runner import load_questions
    from serving.config import ServeConfig
    from serving.ranker import ranker_path, train_ranker

    col = Workspace(ragtune_home(home)).get(collection)
    if if_missing and ranker_path(col).exists():
        typer.echo(f"{ranker_path(col)} exists; kept (drop --if-missing to retrain)")
        return
    cfg = ServeConfig()
    manifest = train_ranker(col, load_questions(questions), k=cfg.k, mode=cfg.search_mode, c=c,
                            dev_rows=load_questions(dev) if dev else (), echo=(lambda *_: None) if as_json else typer.echo)
    if as_json:
        _emit(manifest)


def register(app: typer.Typer) -> None:
    app.command("tune", context_settings={"allow_extra_args": False})(tune_cmd)
    app.add_typer(adapters_app, name="adapters")
    app.add_typer(data_app, name="data")
    app.command("classify")(classify_cmd)
    app.command("tune-retriever")(tune_retriever_cmd)
    app.command("tune-ranker")(tune_ranker_cmd)
