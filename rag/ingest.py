"""Ingestion: documents -> chunks -> embedded groups committed in one SQLite transaction each.

One loop (:class:`Ingestion`) serves both ``index`` (documents read from files) and ``reindex``
(documents re-read from the store): it chunks each document, gathers ``group_chunks`` chunks,
embeds them in one batch and commits them with their documents in one transaction, so a killed run
keeps what it finished and a re-run completes the rest.

Reading a file is where hostile input arrives, so :func:`read_file` is strict: only regular files
(checked on the open descriptor), at most ``max_file_mb`` bytes read, and the loader runs under a
:class:`rag.documents.Budget` (``max_text_chars``, ``max_seconds_per_file``). Any failure lands in
the report's ``failed`` list with a one-line reason; the run goes on with the next file.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from rag import store
from rag.chunking import Chunk, TokenChunker
from rag.discovery import Candidate, kind_of
from rag.documents import Budget, Document, DocumentError, load_bytes

if TYPE_CHECKING:
    from rag.collection import Collection, IndexReport

ProgressCallback = Callable[[int, int, str], None]


@dataclass
class PendingDocument:
    document: Document
    chunks: list[Chunk]
    content_hash: str
    size: int
    root: str | None


def read_file(path: Path, max_bytes: int) -> bytes:
    """The bytes of a regular file, refusing pipes, devices and sockets (checked on the open file, so
    a path swapped after discovery cannot block or stream forever) and files over ``max_bytes``."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise DocumentError(f"cannot read ({exc.strerror or exc}); check the file's permissions") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise DocumentError(f"not a regular file ({kind_of(info.st_mode)}); only plain files are read")
        if info.st_size > max_bytes:
            raise DocumentError(f"file is {info.st_size / 2**20:,.1f} MiB, over max_file_mb={max_bytes / 2**20:g}; "
                                "split it or raise max_file_mb")
        with os.fdopen(fd, "rb", closefd=True) as fh:
            fd = -1
            data = fh.read(max_bytes + 1)
        if len(data) > max_bytes:  # grew while we read it
            raise DocumentError(f"file grew past max_file_mb={max_bytes / 2**20:g} while being read; index it when it is complete")
        return data
    except OSError as exc:
        raise DocumentError(f"cannot read ({exc.strerror or exc})") from None
    finally:
        if fd >= 0:
            os.close(fd)


class Ingestion:
    """The shared loop: ``add`` documents, ``finish`` once; chunks are embedded and committed in groups."""

    def __init__(self, collection: "Collection", report: "IndexReport", total: int, label: str,
                 progress: bool | ProgressCallback = False) -> None:
        self.collection = collection
        self.report = report
        config = collection.config
        embedder = collection.embedder
        self.chunker = TokenChunker(embedder.tokenizer, config.chunk_tokens, config.chunk_overlap, embedder.max_tokens)
        self.group_chunks = config.group_chunks
        self.pending: list[PendingDocument] = []
        self.pending_chunks = 0
        self.bar = progress_reporter(progress, total, label)

    def add(self, document: Document, content_hash: str, size: int, root: str | None, *, keep_empty: bool = False) -> None:
        """Chunk ``document`` and queue it; raises DocumentError when it yields no chunk (unless ``keep_empty``)."""
        try:
            chunks = self.chunker.split(document)
        except Exception as exc:  # noqa: BLE001 - one odd text must not stop the run
            raise DocumentError(f"cannot split the text into chunks ({type(exc).__name__}: {str(exc)[:120]})") from None
        if not chunks and not keep_empty:
            raise DocumentError("no text to index after splitting")
        self.pending.append(PendingDocument(document, chunks, content_hash, size, root))
        self.pending_chunks += len(chunks)
        if self.pending_chunks >= self.group_chunks:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.report.chunks += store_documents(self.collection, self.pending)
        self.pending, self.pending_chunks = [], 0

    def tick(self, done: int, message: str) -> None:
        self.bar(done, message)

    def finish(self) -> None:
        self.flush()
        getattr(self.bar, "close", lambda: None)()


def store_documents(collection: "Collection", pending: list[PendingDocument]) -> int:
    """Embed the pending documents' chunks and hand them to the collection's store, which commits them
    (replacing older versions) crash-safely: one SQLite transaction, or a journaled Milvus write."""
    chunks = [c for p in pending for c in p.chunks]
    if not chunks:  # only documents without text (kept by reindex): nothing to embed
        vectors = np.zeros((0, collection.dimension), dtype=np.float32)
    else:
        vectors = collection.embedder.embed_batch([c.embedding_text() for c in chunks], batch_size=collection.config.batch_size)
    if vectors.shape[1] != collection.dimension:
        from rag.collection import CollectionError

        raise CollectionError(f"embedder returned {vectors.shape[1]}-d vectors but {collection.name!r} holds "
                              f"{collection.dimension}-d")
    return collection.backend.replace_documents(pending, vectors)


def index_files(collection: "Collection", candidates: list[Candidate], report: "IndexReport",
                progress: bool | ProgressCallback = False) -> set[str]:
    """Read, hash, load and queue every candidate; unchanged files are skipped. Returns the sources seen."""
    config = collection.config
    stored = store.stored_hashes(collection.conn, collection.id)
    max_bytes = int(config.max_file_mb * 1024 * 1024)
    seen: set[str] = set()
    ingestion = Ingestion(collection, report, len(candidates), f"indexing {collection.name}", progress)
    for done, cand in enumerate(candidates, start=1):
        seen.add(cand.source)
        try:
            data = read_file(cand.path, max_bytes)
            digest = hashlib.sha256(data).hexdigest()
            if cand.source in stored and stored[cand.source][0] == digest:
                report.unchanged += 1
                continue
            budget = Budget(config.max_text_chars, config.max_seconds_per_file)
            document = load_bytes(cand.path, data, cand.source, budget)
            ingestion.add(document, digest, len(data), cand.root)
        except DocumentError as exc:
            report.failed.append({"path": cand.source, "error": str(exc)})
            continue
        finally:
            ingestion.tick(done, cand.source)
        if cand.source in stored:
            report.updated += 1
        else:
            report.added += 1
    ingestion.finish()
    return seen


def reindex_documents(source: "Collection", target: "Collection", report: "IndexReport",
                      progress: bool | ProgressCallback = False) -> None:
    """Re-chunk and re-embed every stored document of ``source`` into ``target`` (same loop as indexing)."""
    rows = store.stored_documents(source.conn, source.id)
    ingestion = Ingestion(target, report, len(rows), f"reindexing {source.name}", progress)
    for done, r in enumerate(rows, start=1):
        document = Document(r["text"], r["path"], json.loads(r["metadata_json"]),
                            [(int(o), m) for o, m in json.loads(r["markers_json"])])
        ingestion.add(document, r["content_hash"], r["size"], r["root"], keep_empty=True)  # never drop a stored document
        report.added += 1
        ingestion.tick(done, r["path"])
    ingestion.finish()


def progress_reporter(progress: bool | ProgressCallback, total: int, label: str):
    """A callable(done, message) that feeds tqdm (bar with ETA) or a caller's callback (the Streamlit UI)."""
    if callable(progress):
        def report(done: int, message: str) -> None:
            progress(done, total, message)
        return report
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc=label, unit="file")

        def report(done: int, message: str) -> None:
            bar.n = done
            bar.set_postfix_str(message[-40:], refresh=False)
            bar.refresh()
        report.close = bar.close  # type: ignore[attr-defined]
        return report
    return lambda done, message: None

