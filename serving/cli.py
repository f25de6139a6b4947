"""The ``ragtune`` command.

User errors (a missing collection, a bad config key, an unreadable file) print one line on stderr
and exit 1, never a traceback. Indexing exits 3 when some files failed (the rest is indexed).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, List, Optional

import typer

app = typer.Typer(
    name="ragtune",
    help="Turn a folder of documents into a domain assistant (RAG, LoRA fine-tuning, or both) and measure which wins.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

EXIT_USER_ERROR = 1
EXIT_PARTIAL = 3

HomeOption = typer.Option(None, "--home", help="workspace folder (default: $RAGTUNE_HOME or ~/.local/share/ragtune)")
JsonOption = typer.Option(False, "--json", help="print machine-readable JSON")


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types whose message is meant for the user (each says how to fix it)."""
    from rag.collection import CollectionError
    from core.config import ConfigError
    from core.names import InvalidName
    from rag.documents import DocumentError
    from rag.embeddings import EmbeddingModelError

    from serving.ab.importer import SquadImportError
    from serving.config import ServingError
    from tuning.errors import TuningError

    from serving.feedback import FeedbackError
    from serving.promotion import PromotionError

    return (CollectionError, ConfigError, DocumentError, EmbeddingModelError, TuningError, SquadImportError, ServingError,
            InvalidName, FeedbackError, PromotionError)


def fail(message: str, code: int = EXIT_USER_ERROR) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def workspace(home: Optional[str]):
    from rag.collection import Workspace

    return Workspace(home)


def emit(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, ensure_ascii=False, default=str))


@app.command("index")
def index_cmd(
    paths: List[Path] = typer.Argument(..., help="files and folders to index"),
    collection: str = typer.Option(..., "--collection", "-c", help="collection name (created if missing)"),
    sync: bool = typer.Option(False, "--sync", help="delete documents whose files are gone from the given folders"),
    include: List[str] = typer.Option([], "--include", help="only files matching this glob (repeatable), e.g. '*.md'"),
    exclude: List[str] = typer.Option([], "--exclude", help="skip files matching this glob (repeatable)"),
    model: Optional[str] = typer.Option(None, "--model", help="embedding model for a new collection: 'default', a local folder or a hub id"),
    index_type: Optional[str] = typer.Option(None, "--index-type", help="FAISS index for a new collection: flat (exact) or hnsw"),
    chunk_tokens: Optional[int] = typer.Option(None, "--chunk-tokens", help="chunk size in tokens for a new collection (default 256)"),
    settings: List[str] = typer.Option([], "--set", help="index config KEY=VALUE (repeatable): any key for a new collection; "
                                       "for an existing one the run-time limits max_file_mb, max_text_chars, "
                                       "max_seconds_per_file, batch_size, group_chunks (this run only)"),
    store_uri: Optional[str] = typer.Option(None, "--store", help="where a new collection's chunks live: sqlite (default), "
                                            "milvus:///abs/path.db (Milvus Lite) or http://host:19530 (Milvus; token "
                                            "from RAGTUNE_MILVUS_TOKEN); recorded, later commands use it"),
    as_json: bool = JsonOption,
    home: Optional[str] = HomeOption,
) -> None:
    """Index files and folders (.txt .md .html .pdf .docx .jsonl) into a collection; re-runs only embed what changed.

    Example: ragtune index corpora/corvida/docs --collection corvida --sync --set max_text_chars=20000000

    Example: ragtune index docs/ --collection big --store milvus:///srv/ragtune/milvus.db
    """
    from core.config import build_config, parse_overrides
    from rag.collection import IndexConfig

    ws = workspace(home)
    values: dict[str, Any] = {}
    if model:
        values["embedding_model"] = model
    if index_type:
        values["index_type"] = index_type
    if chunk_tokens:
        values["chunk_tokens"] = chunk_tokens
    extra = parse_overrides(settings)
    limits = extra if extra and ws.exists(collection) else None
    if extra and limits is None:
        values.update(extra)
    config = build_config(IndexConfig, values, source="options") if values else None
    report = ws.index(collection, paths, sync=sync, include=include, exclude=exclude, config=config, limits=limits,
                      store_uri=store_uri, progress=not as_json and sys.stderr.isatty() or os.environ.get("RAGTUNE_PROGRESS") == "1")
    if as_json:
        emit(report.to_dict())
    else:
        typer.echo(f"{collection}: {report.added} added, {report.updated} updated, {report.unchanged} unchanged, "
                   f"{report.deleted} deleted, {report.chunks} chunks embedded in {report.seconds:.1f}s "
                   f"({report.total_documents} documents, {report.total_chunks} chunks in all)")
        for item in report.failed:
            typer.echo(f"failed: {item['path']}: {item['error']}", err=True)
    if report.failed:
        raise typer.Exit(EXIT_PARTIAL)


@app.command("search")
def search_cmd(
    query: str = typer.Argument(..., help="what to look for"),
    collection: str = typer.Option(..., "--collection", "-c", help="collection to search"),
    k: int = typer.Option(5, "-k", help="number of hits"),
    mode: str = typer.Option("hybrid", "--mode", help="hybrid (dense + BM25 fused), dense or bm25"),
    where: List[str] = typer.Option([], "--where", help="filter KEY=VALUE on chunk metadata (repeatable); doc=GLOB filters paths"),
    as_json: bool = JsonOption,
    home: Optional[str] = HomeOption,
) -> None:
    """Search a collection.

    Example: ragtune search "How long is the HX warranty?" --collection corvida -k 3
    """
    try:
        hits = workspace(home).get(collection).search(query, k=k, mode=mode, where=where)  # type: ignore[arg-type]
    except ValueError as exc:
        fail(str(exc))
    if as_json:
        emit([{"doc": h.doc, "chunk_id": h.chunk_id, "score": h.score, "text": h.text, "start": h.start,
               "end": h.end, "metadata": h.metadata} for h in hits])
        return
    if not hits:
        typer.echo("no hits")
    for rank, h in enumerate(hits, start=1):
        where_in = h.metadata.get("section") or (f"page {h.metadata['page']}" if "page" in h.metadata else "")
        typer.echo(f"[{rank}] {h.doc} {h.start}-{h.end} {where_in}  score={h.score:.4f}")
        typer.echo("    " + " ".join(h.text.split())[:300])


@app.command("collections")
def collections_cmd(as_json: bool = JsonOption, home: Optional[str] = HomeOption) -> None:
    """List collections with their document and chunk counts and the store their chunks live in.

    Example: ragtune collections --json
    """
    rows = workspace(home).list()
    if as_json:
        emit(rows)
        return
    if not rows:
        typer.echo("no collections yet; create one with: ragtune index PATH --collection NAME")
    for r in rows:
        typer.echo(f"{r['name']}: {r['documents']} documents, {r['chunks']} chunks, {r['embedding_model']} "
                   f"({r['dimension']}-d, {r['index_type']}), store {r['store']}")


@app.command("rm-docs")
def rm_docs_cmd(
    collection: str = typer.Argument(..., help="collection name"),
    paths: List[str] = typer.Argument(..., help="document paths within the collection (as `search` shows them)"),
    home: Optional[str] = HomeOption,
) -> None:
    """Delete documents from a collection (SQLite rows, FTS rows and FAISS vectors).

    Example: ragtune rm-docs corvida policies/travel-policy-2021.md
    """
    n = workspace(home).get(collection).delete_documents(paths)
    typer.echo(f"{collection}: {n} of {len(paths)} documents deleted")
    if n < len(paths):
        raise typer.Exit(EXIT_PARTIAL)


@app.command("drop")
def drop_cmd(collection: str = typer.Argument(..., help="collection name"), home: Optional[str] = HomeOption) -> None:
    """Delete a whole collection.

    Example: ragtune drop scratch
    """
    workspace(home).drop(collection)
    typer.echo(f"dropped {collection}")


@app.command("reindex")
def reindex_cmd(
    collection: str = typer.Argument(..., help="collection name"),
    model: Optional[str] = typer.Option(None, "--model", help="new embedding model: 'default', a local folder or a hub id"),
    chunk_tokens: Optional[int] = typer.Option(None, "--chunk-tokens", help="new chunk size in tokens"),
    store_uri: Optional[str] = typer.Option(None, "--store", help="move the collection to this store: sqlite, "
                                            "milvus:///abs/path.db or http://host:19530 (re-uses the stored text)"),
    as_json: bool = JsonOption,
    home: Optional[str] = HomeOption,
) -> None:
    """Rebuild a collection from its stored documents (new model, chunking or store); swapped in only when complete.

    Example: ragtune reindex corvida --model /models/bge-small-en

    Example: ragtune reindex corvida --store milvus:///srv/ragtune/milvus.db
    """
    overrides = {"chunk_tokens": chunk_tokens} if chunk_tokens else {}
    report = workspace(home).reindex(collection, model, progress=not as_json and sys.stderr.isatty(),
                                     store_uri=store_uri, **overrides)
    if as_json:
        emit(report.to_dict())
    else:
        typer.echo(f"{collection}: re-embedded {report.total_documents} documents into {report.total_chunks} chunks "
                   f"in {report.seconds:.1f}s (store {workspace(home).get(collection).store_uri})")


# --- serving commands: ask, chat, serve (serving/assistant.py, serving/openai_server.py) ---------------
ServeConfigOption = typer.Option(None, "--config", help="serving config YAML (keys: see serving/config.py ServeConfig)")
ServeSetOption = typer.Option([], "--set", help="override a serving config key, e.g. --set k=6 (repeatable)")


def _check_names(collection: Optional[str], adapter: Optional[str]) -> None:
    """Refuse a collection or adapter name that is a path before the model loads (seconds saved, and
    the same rule the workspace applies: core.names)."""
    from core.names import check_name

    if collection is not None:
        check_name(collection, "collection name")
    if adapter is not None:
        check_name(adapter, "adapter name")


def _assistant(home: Optional[str], config: Optional[Path], overrides: List[str], log: bool = True):
    from core.config import load_config
    from serving.assistant import Assistant
    from serving.config import ServeConfig, ServingError

    try:
        return Assistant.open(home, load_config(ServeConfig, config, overrides), log=log)
    except ServingError as exc:
        fail(str(exc))


def _promoted(home: Optional[str], collection: Optional[str], mode: Optional[str]) -> Optional[str]:
    """The collection's promoted adapter when the user named none (issue 13: serving.promotion)."""
    from serving.promotion import default_adapter

    return default_adapter(home, collection, mode)


def _infer_mode(mode: Optional[str], collection: Optional[str], adapter: Optional[str]) -> str:
    from serving.modes import infer_mode

    return mode or infer_mode(collection, adapter)


def _print_sources(answer: Any) -> None:
    for s in answer.sources:
        mark = "*" if s.cited else " "
        sim = f" sim={s.similarity:.2f}" if s.similarity is not None else ""
        typer.echo(f" {mark}[{s.n}] {s.doc} {s.start}-{s.end}{sim}", err=True)
    t = answer.timings
    parts = [f"{k}={t[k]}" for k in ("retrieval_ms", "ttft_s", "tokens_per_s", "total_s") if t.get(k) is not None]
    typer.echo("    " + " ".join(parts), err=True)


@app.command("ask")
def ask_cmd(
    question: str = typer.Argument(..., help="the question"),
    collection: Optional[str] = typer.Option(None, "--collection", "-c", help="collection to retrieve from (rag modes)"),
    adapter: Optional[str] = typer.Option(None, "--adapter", "-a", help="LoRA adapter from `ragtune adapters` (ft modes)"),
    mode: Optional[str] = typer.Option(None, "--mode", "-m", help="base, rag, ft or rag+ft (default: from --collection/--adapter)"),
    k: Optional[int] = typer.Option(None, "-k", help="retrieved chunks in the prompt (default 4)"),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", help="longest answer in tokens"),
    as_json: bool = JsonOption,
    config: Optional[Path] = ServeConfigOption,
    overrides: List[str] = ServeSetOption,
    home: Optional[str] = HomeOption,
) -> None:
    """Answer one question, streamed (sources and timings on stderr), or as JSON with --json.

    Example: ragtune ask "How long is the HX warranty?" --collection corvida --mode rag
    """
    from serving.config import MODES, ServingError

    if not question.strip():  # checked again by the assistant; here before the model loads
        fail("empty question: type a question")
    if mode and mode not in MODES:
        fail(f"unknown mode {mode!r}; use one of: {', '.join(MODES)}")
    _check_names(collection, adapter)
    adapter = adapter or _promoted(home, collection, mode)
    assistant = _assistant(home, config, overrides)
    try:
        stream = assistant.stream(question, _infer_mode(mode, collection, adapter), collection, adapter, k=k,
                                  max_new_tokens=max_new_tokens)
        if as_json:
            emit(stream.result().to_dict())
            return
        for piece in stream:
            typer.echo(piece, nl=False)
        typer.echo("")
    except ServingError as exc:
        fail(str(exc))
    _print_sources(stream.answer)


@app.command("chat")
def chat_cmd(
    collection: Optional[str] = typer.Option(None, "--collection", "-c", help="collection to retrieve from (rag modes)"),
    adapter: Optional[str] = typer.Option(None, "--adapter", "-a", help="LoRA adapter (ft modes)"),
    mode: Optional[str] = typer.Option(None, "--mode", "-m", help="base, rag, ft or rag+ft (default: from --collection/--adapter)"),
    config: Optional[Path] = ServeConfigOption,
    overrides: List[str] = ServeSetOption,
    home: Optional[str] = HomeOption,
) -> None:
    """Chat in the terminal: streamed answers, follow-up questions use the conversation. /reset, /quit.

    Example: ragtune chat --collection corvida --adapter corvida-lora --mode rag+ft
    """
    from serving.config import ServingError
    from serving.prompts import Turn

    _check_names(collection, adapter)
    adapter = adapter or _promoted(home, collection, mode)
    assistant = _assistant(home, config, overrides)
    mode = _infer_mode(mode, collection, adapter)
    history: list[Any] = []
    chat_id = assistant.store.new_chat(f"terminal chat ({mode})") if assistant.store else None
    typer.echo(f"mode {mode}; type a question, /reset to forget the conversation, /quit to leave", err=True)
    while True:
        try:
            question = input("> ").strip()
        except EOFError:
            break
        if question in ("/quit", "/exit"):
            break
        if question == "/reset":
            history.clear()
            continue
        if not question:
            continue
        try:
            stream = assistant.stream(question, mode, collection, adapter, history, chat_id=chat_id)
            for piece in stream:
                typer.echo(piece, nl=False)
            typer.echo("")
        except ServingError as exc:
            typer.echo(f"error: {exc}", err=True)
            continue
        _print_sources(stream.answer)
        history.append(Turn(question, stream.answer.text))


@app.command("serve")
def serve_cmd(
    host: str = typer.Option("127.0.0.1", "--host", help="address to listen on; beyond loopback (0.0.0.0 = every "
                             "interface) set an API key and put a TLS proxy in front"),
    port: int = typer.Option(8000, "--port", help="TCP port (0 = a free one)"),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="RAGTUNE_API_KEY", show_envvar=True,
                                          help="require 'Authorization: Bearer KEY' on every /v1 request (prefer the "
                                               "environment variable: a command line is visible to other users)"),
    limits: List[str] = typer.Option([], "--limit", help="server limit key=value, e.g. --limit max_concurrent=4 "
                                     "(keys: see serving/http_guard.py ServerLimits; repeatable)"),
    verbose: bool = typer.Option(False, "--verbose", help="log one line per request"),
    collection: Optional[str] = typer.Option(None, "--collection", "-c",
                                             help="serve this collection's promoted adapter as the model 'default' "
                                                  "(and for requests that name no model); read on every request"),
    config: Optional[Path] = ServeConfigOption,
    overrides: List[str] = ServeSetOption,
    home: Optional[str] = HomeOption,
) -> None:
    """Serve the base model and every adapter over an OpenAI-compatible API (/v1/chat/completions, streamed).

    Binds 127.0.0.1 unless --host says otherwise. Requests beyond --limit max_concurrent (default 8) get
    429 at once; bodies over max_body_bytes (default 1 MiB) get 413 before they are read.

    Example: RAGTUNE_API_KEY=change-me ragtune serve --port 8000 --limit max_concurrent=4 --set quantize=int8
    With -c corvida, {"model": "default"} is whatever `ragtune promote` last made corvida's adapter.
    """
    from core.config import build_config, load_config, parse_overrides
    from core.workspace import ragtune_home
    from serving.config import ServeConfig, ServingError
    from serving.generation import LocalGenerator
    from serving.openai_server import ServerLimits, exposure_warning, make_server

    if verbose:  # uvicorn's access log then prints one line per request
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = load_config(ServeConfig, config, overrides)
    server_limits = build_config(ServerLimits, parse_overrides(limits), source="--limit")
    if api_key is not None and not api_key.strip():
        fail("--api-key / RAGTUNE_API_KEY is set but empty; give a key or unset it")
    if collection is not None and not workspace(home).exists(collection):
        fail(f"collection {collection!r} does not exist (ragtune collections lists them); "
             "index it first, or drop --collection")
    warning = exposure_warning(host, api_key)
    if warning:  # before the model loads, so it is the first thing an operator sees
        typer.echo(warning, err=True)
    try:
        generator = LocalGenerator(cfg.base_model, ragtune_home(home), quantize=cfg.quantize, device=cfg.device,
                                   threads=cfg.threads, max_batch_rows=cfg.max_batch_rows, kv_cache_tokens=cfg.kv_cache_tokens)
    except ServingError as exc:
        fail(str(exc))
    try:
        server = make_server(generator, host, port, default_max_tokens=cfg.max_new_tokens, verbose=verbose,
                             limits=server_limits, api_key=api_key, warn=False, collection=collection)
    except OSError as exc:
        fail(f"cannot listen on {host}:{port} ({exc.strerror or exc}); pick another --port or --host")
    models = [generator.base_id] + [a["name"] for a in generator.available_adapters() if a["usable"]]
    if collection is not None:
        models.append(f"default (the adapter promoted for {collection!r})")
    typer.echo(f"serving {', '.join(models)} at {server.url} ({'API key required' if api_key else 'no API key'}; "
               f"Ctrl-C to stop)", err=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()


def _register_plugins() -> None:
    from serving import loop_commands, tune_commands
    from serving.ab import commands as ab_commands

    tune_commands.register(app)
    ab_commands.register(app)
    loop_commands.register(app)


def _quiet_libraries() -> None:
    """Keep library chatter (weight-loading bars, optional-kernel notices) off the user's terminal."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for name in ("bitsandbytes", "transformers", "sentence_transformers", "huggingface_hub", "faiss"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


def main(argv: list[str] | None = None) -> None:
    _quiet_libraries()
    _register_plugins()
    errors = user_errors()
    try:
        code = app(args=argv, standalone_mode=False)
    except errors as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_USER_ERROR)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (KeyboardInterrupt, typer.Abort):
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as exc:  # click usage errors, and typer.BadParameter raised by a command
        import click

        # typer >= 0.26 vendors click: its BadParameter derives from its own copy of ClickException
        click_errors = (click.ClickException, *(c for c in type(exc).__mro__ if c.__name__ == "ClickException"))
        if isinstance(exc, click_errors):
            exc.show()
            sys.exit(exc.exit_code)
        raise
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
