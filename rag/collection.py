"""Collections: add, sync, delete and search documents, keeping SQLite and FAISS in agreement.

A :class:`Workspace` is a ``RAGTUNE_HOME`` folder (its layout: :mod:`core.workspace`): the SQLite
database plus one FAISS folder per collection. A document is identified by its path within the
collection (relative to the folder that was indexed) and its content hash: unchanged files are
skipped, changed ones replace their chunks, and with ``sync`` files gone from the indexed folders
are deleted.

The work is split by concern: :mod:`rag.discovery` decides which files are read,
:mod:`rag.ingest` reads, chunks, embeds and commits them (one loop for ``index`` and ``reindex``),
:mod:`rag.vector_index` keeps the FAISS index in step, :mod:`rag.store` holds every SQL statement
and :mod:`rag.search` ranks. This module ties them to names and configs.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal

import numpy as np

from core import db
from core.config import ConfigError, build_config, config_to_dict, field as cfield
from core.names import InvalidName, check_name
from core.workspace import Layout
from rag import store
from rag.backends import SQLITE, ChunkStore, check_reachable, normalise_uri, open_store
from rag.chunking import Chunk
from rag.discovery import discover, selected
from rag.errors import CollectionError, StoreError
from rag.documents import DEFAULT_MAX_CHARS, DEFAULT_MAX_SECONDS
from rag.embeddings import get_embedder, resolve_embedding_model
from rag.ingest import ProgressCallback, index_files, reindex_documents
from rag.search import Hit, SearchMode, convex_fusion, parse_where, reciprocal_rank_fusion
from rag.vector_index import IndexCache

MAX_K = 1000  # hits (and fusion candidates) one search may ask for
REINDEX_SUFFIX = "~reindex"  # a collection being rebuilt; hidden from listings, never a user's name


@dataclass
class IndexConfig:
    embedding_model: str = cfield("default", help="sentence-transformers model: 'default' (the packaged all-MiniLM-L6-v2), a local folder or a hub id")
    chunk_tokens: int = cfield(256, help="maximum chunk length in embedder tokens (clamped to the model's limit)")
    chunk_overlap: int = cfield(32, help="tokens shared by consecutive chunks")
    index_type: Literal["flat", "hnsw"] = cfield("flat", help="FAISS index: exact 'flat' or approximate 'hnsw' for large collections")
    batch_size: int = cfield(32, help="texts per embedding forward pass")
    group_chunks: int = cfield(512, help="chunks embedded and committed per SQLite transaction")
    max_file_mb: float = cfield(64.0, help="files larger than this are reported as failed (never read)")
    max_text_chars: int = cfield(DEFAULT_MAX_CHARS, help="a file whose extracted text passes this many characters is reported as failed; checked while extracting, so a small archive that expands hugely stops early")
    max_seconds_per_file: float = cfield(DEFAULT_MAX_SECONDS, help="a file whose text extraction runs longer than this is reported as failed")

    def __post_init__(self) -> None:
        if self.chunk_tokens < 16:
            raise ConfigError(f"chunk_tokens={self.chunk_tokens} is too small; use 64-512")
        if not 0 <= self.chunk_overlap < self.chunk_tokens:
            raise ConfigError(f"chunk_overlap={self.chunk_overlap} must be >= 0 and < chunk_tokens ({self.chunk_tokens})")
        if self.batch_size < 1 or self.group_chunks < 1:
            raise ConfigError("batch_size and group_chunks must be >= 1")
        if self.max_file_mb <= 0:
            raise ConfigError("max_file_mb must be > 0")
        if self.max_text_chars < 1:
            raise ConfigError("max_text_chars must be >= 1 (default 5000000)")
        if self.max_seconds_per_file <= 0:
            raise ConfigError("max_seconds_per_file must be > 0 (default 60)")


@dataclass
class IndexReport:
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    deleted: int = 0
    chunks: int = 0  # chunks embedded and stored by this run
    failed: list[dict[str, str]] = field(default_factory=list)
    skipped: int = 0  # files in indexed folders with an unsupported type
    total_documents: int = 0
    total_chunks: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


RUN_TIME_FIELDS = frozenset({"max_file_mb", "max_text_chars", "max_seconds_per_file", "batch_size", "group_chunks"})


def collection_name(name: object) -> str:
    """``name`` if it is a valid collection name, else CollectionError saying what is allowed."""
    try:
        return check_name(name, "collection name")
    except InvalidName as exc:
        raise CollectionError(str(exc)) from None


class Collection:
    """One collection. Thread-safe: searches share the loaded FAISS index, writes take a lock. Its
    chunks live in :attr:`backend` (:mod:`rag.backends`), its catalog in the workspace database."""

    def __init__(self, workspace: "Workspace", row: Any) -> None:
        self.workspace = workspace
        self.id = int(row["id"])
        self.name = str(row["name"])
        self.embedding_model = str(row["embedding_model"])
        self.dimension = int(row["dimension"])
        self.index_type = str(row["index_type"])
        self.config: IndexConfig = build_config(IndexConfig, json.loads(row["config_json"]),
                                                source=f"collection {self.name}")
        self.folder = workspace.layout.collection_dir(self.id)
        self.store_uri = str(row["store"]) if "store" in row.keys() else SQLITE
        self._backend: ChunkStore | None = None
        self.vectors = IndexCache(self.id, self.folder, self.index_type, self.dimension, lambda: self.workspace.conn)
        self.write_lock = threading.RLock()

    # --- plumbing -----------------------------------------------------------------------------
    @property
    def conn(self):
        return self.workspace.conn

    @property
    def backend(self) -> ChunkStore:
        """The chunk store (opened on first use; a store that is gone raises StoreError with the fix)."""
        if self._backend is None:
            self._backend = open_store(self)
        return self._backend

    @property
    def embedder(self):
        return get_embedder(self.config.embedding_model)

    def version(self) -> int:
        current = store.version(self.conn, self.id)
        if current is None:
            raise CollectionError(f"collection {self.name!r} was dropped")
        return current

    def index(self):
        """The FAISS index for the current version: loaded, reused, or rebuilt from SQLite."""
        return self.vectors.get(self.version())

    def save_index(self) -> None:
        """Persist the store after a batch of changes (the FAISS file of the current version)."""
        self.backend.save()

    # --- writing ------------------------------------------------------------------------------
    def index_paths(self, paths: Iterable[str | os.PathLike], *, sync: bool = False, include: list[str] | None = None,
                    exclude: list[str] | None = None, progress: bool | ProgressCallback = False,
                    limits: dict[str, Any] | None = None) -> IndexReport:
        """Index ``paths``. ``limits`` overrides run-time fields of the stored config for this run only
        (:data:`RUN_TIME_FIELDS`: size and time limits, batch sizes); chunking and model stay as stored."""
        started = time.perf_counter()
        if limits:
            fixed = sorted(set(limits) - RUN_TIME_FIELDS)
            if fixed:
                raise CollectionError(f"{', '.join(fixed)} of collection {self.name!r} is fixed when it is created; change "
                                      f"it with: ragtune reindex {self.name} (run-time keys: {', '.join(sorted(RUN_TIME_FIELDS))})")
            stored = self.config
            self.config = build_config(IndexConfig, {**config_to_dict(stored), **limits}, source="limits")
            try:
                return self.index_paths(paths, sync=sync, include=include, exclude=exclude, progress=progress)
            finally:
                self.config = stored
        report = IndexReport()
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        self.backend.recover()  # before any file is read: a store that is gone fails here, with the fix
        candidates, failed, report.skipped, roots = discover(paths, include, exclude)
        report.failed.extend(failed)
        stored = store.stored_hashes(self.conn, self.id)
        seen = index_files(self, candidates, report, progress)
        if sync:
            gone = [path for path, (_, root) in stored.items()
                    if path not in seen and root in roots and selected(path, include, exclude)]
            report.deleted = self.delete_documents(gone) if gone else 0
        self.save_index()
        stats = self.stats()
        report.total_documents, report.total_chunks = stats["documents"], stats["chunks"]
        report.seconds = round(time.perf_counter() - started, 3)
        return report

    def delete_documents(self, paths: Iterable[str]) -> int:
        """Delete documents by their path within the collection; returns how many existed."""
        if isinstance(paths, str):
            paths = [paths]
        paths = [str(p) for p in paths]
        self.backend.recover()
        return self.backend.delete_documents(paths)

    # --- reading ------------------------------------------------------------------------------
    def search(self, query: str, k: int = 5, mode: SearchMode = "hybrid", where: list[str] | dict | None = None,
               candidates: int = 50, fusion: Literal["convex", "rrf"] = "convex", alpha: float = 0.4,
               query_vector: Any = None) -> list[Hit]:
        """Top-``k`` chunks for ``query``. Hybrid fuses ``candidates`` from each retriever; ``alpha`` is
        the dense share of a convex fusion (0.4: BM25 is the stronger signal on exact domain terms).
        ``rrf`` on a store with its own fusion (Milvus: ``hybrid_search`` + ``RRFRanker``) runs there.
        ``query_vector``: ``query`` already embedded with this collection's embedder (a caller that needs the
        vector too embeds once), else it is embedded here."""
        if mode not in ("hybrid", "dense", "bm25"):
            raise CollectionError(f"unknown search mode {mode!r}; use hybrid, dense or bm25")
        if not isinstance(query, str) or not query.strip():
            raise CollectionError("empty query; type what you are looking for")
        for label, value, low, high in (("k", k, 1, MAX_K), ("candidates", candidates, 1, MAX_K)):
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise CollectionError(f"{label}={value!r}: use a whole number from {low} to {high}")
        if fusion not in ("convex", "rrf"):
            raise CollectionError(f"unknown fusion {fusion!r}; use convex or rrf")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
            raise CollectionError(f"alpha={alpha!r}: use a number from 0 to 1 (the dense share of the fused score)")
        try:
            filters = parse_where(where)
        except ValueError as exc:
            raise CollectionError(str(exc)) from None
        pool = max(k, candidates) if mode == "hybrid" else k
        backend = self.backend
        native = mode == "hybrid" and fusion == "rrf" and backend.native_fusion
        lexical_job = None
        if mode in ("bm25", "hybrid"):
            # BM25 runs in a worker thread (SQLite: its own connection, and sqlite releases the GIL)
            # while the query is embedded and the dense index searched here: the two overlap on 2 cores.
            lexical_job = _search_pool().submit(backend.bm25, query, pool, filters)
        dense: list[tuple[int, float]] = []
        qvec = None
        if mode in ("dense", "hybrid"):
            qvec = self.embedder.embed_batch([query])[0] if query_vector is None else np.asarray(query_vector, dtype=np.float32)
            if qvec.shape != (self.dimension,):
                raise CollectionError(f"query_vector of shape {qvec.shape}: this collection's embedder gives {self.dimension} "
                                      f"numbers; pass a vector from {self.config.embedding_model} or none")
            dense = backend.dense(qvec, pool, filters)
        lexical = lexical_job.result() if lexical_job is not None else []
        if mode == "dense":
            scored = dense[:k]
        elif mode == "bm25":
            scored = lexical[:k]
        elif native:
            scored = backend.hybrid_rrf(query, qvec, k, pool, filters)
        elif fusion == "rrf":
            scored = reciprocal_rank_fusion([dense, lexical], [1.0, 1.0])[:k]
        else:
            scored = convex_fusion(dense, lexical, alpha)[:k]
        hits = backend.fetch(scored)
        dense_rank = {cid: r for r, (cid, _) in enumerate(dense, start=1)}
        dense_sim = dict(dense)
        bm25_rank = {cid: r for r, (cid, _) in enumerate(lexical, start=1)}
        missing = [h.chunk_id for h in hits if h.chunk_id not in dense_sim]
        if qvec is not None and missing:
            for cid, vector in self._vectors(missing).items():
                dense_sim[cid] = float(vector @ qvec)
        for h in hits:
            h.dense_rank, h.bm25_rank = dense_rank.get(h.chunk_id), bm25_rank.get(h.chunk_id)
            h.similarity = dense_sim.get(h.chunk_id) if qvec is not None else None
        return hits

    def _vectors(self, ids: list[int]) -> dict[int, np.ndarray]:
        return self.backend.vectors(ids)

    def documents(self) -> list[dict[str, Any]]:
        return store.document_summaries(self.conn, self.id)

    def document_text(self, doc: str) -> str:
        text = store.document_text(self.conn, self.id, str(doc))
        if text is None:
            raise CollectionError(f"no document {doc!r} in collection {self.name!r}")
        return text

    def chunks(self, doc: str) -> list[Chunk]:
        return self.backend.chunks(str(doc))

    def stats(self) -> dict[str, Any]:
        return {"name": self.name, "documents": store.document_count(self.conn, self.id),
                "chunks": self._chunk_count(), "embedding_model": self.embedding_model,
                "dimension": self.dimension, "index_type": self.index_type, "version": self.version(),
                "store": self.store_uri}

    def _chunk_count(self) -> int:
        """From the store for SQLite; from the catalog's per-document counts for an external store, so
        listing collections works (and says where they live) even while that store is unreachable."""
        if normalise_uri(self.store_uri) == SQLITE:
            return store.chunk_count(self.conn, self.id)
        return store.recorded_chunk_total(self.conn, self.id)

    def check(self) -> dict[str, int]:
        """Catalog and chunk store agree (counts and id sets)? (used by tests and benches)."""
        return self.backend.check()


_POOL = None
_POOL_LOCK = threading.Lock()


def _search_pool():
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            from concurrent.futures import ThreadPoolExecutor

            _POOL = ThreadPoolExecutor(max_workers=4, thread_name_prefix="ragtune-bm25")
        return _POOL


class Workspace:
    """A ragtune home folder: the SQLite database and the collections' FAISS folders."""

    def __init__(self, home: str | os.PathLike | None = None) -> None:
        self.layout = Layout.open(home)
        self.home = self.layout.home
        self.db_path = self.layout.db
        self._local = threading.local()
        self._collections: dict[int, Collection] = {}
        self._lock = threading.Lock()
        _ = self.conn  # create and migrate now, so errors surface at open

    @property
    def conn(self):
        """One SQLite connection per thread (Streamlit serves sessions from several threads)."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = store.open_db(self.db_path)
        return conn

    def names(self) -> list[str]:
        return store.collection_names(self.conn)

    def list(self) -> list[dict[str, Any]]:
        return [self.get(name).stats() for name in self.names()]

    def exists(self, name: str) -> bool:
        return isinstance(name, str) and store.collection_row(self.conn, name) is not None

    def get(self, name: str) -> Collection:
        if not (isinstance(name, str) and name.endswith(REINDEX_SUFFIX)):
            collection_name(name)
        row = store.collection_row(self.conn, name)
        if row is None:
            known = ", ".join(self.names()) or "none yet"
            raise CollectionError(f"no collection named {name!r} (known: {known}); create it with: ragtune index PATH --collection {name}")
        with self._lock:
            col = self._collections.get(int(row["id"]))
            if col is None or col.name != name:
                col = self._collections[int(row["id"])] = Collection(self, row)
            return col

    def create(self, name: str, config: IndexConfig | None = None, *, exist_ok: bool = False,
               store_uri: str | None = None) -> Collection:
        """Create collection ``name`` with its chunks in ``store_uri`` (:mod:`rag.backends`; default
        sqlite). When another process creates the same name at the same moment, the write lock orders
        the two: the second gets "exists already" (or, with ``exist_ok``, the collection the first one
        made), never a database error."""
        collection_name(name)
        return self._create(name, config, exist_ok=exist_ok, store_uri=store_uri)

    def _create(self, name: str, config: IndexConfig | None, *, exist_ok: bool, store_uri: str | None = None) -> Collection:
        if self.exists(name):
            if exist_ok:
                col = self.get(name)
                if store_uri is not None and normalise_uri(store_uri) != normalise_uri(col.store_uri):
                    raise CollectionError(
                        f"collection {name!r} lives on {col.store_uri}, not {normalise_uri(store_uri)}; move it with: "
                        f"ragtune reindex {name} --store {normalise_uri(store_uri)}")
                return col
            raise CollectionError(f"collection {name!r} exists already")
        uri = normalise_uri(store_uri)
        check_reachable(uri)  # before anything is written or parsed: the URI and the fix
        config = config or IndexConfig()
        model_id, _ = resolve_embedding_model(config.embedding_model)
        embedder = get_embedder(config.embedding_model)
        try:
            with db.transaction(self.conn) as conn:  # BEGIN IMMEDIATE: the name check and the insert are atomic
                cid = store.insert_collection(conn, name, model_id, embedder.dimension, config.index_type,
                                              config_to_dict(config), uri)
        except sqlite3.IntegrityError:  # a database written by an older ragtune without the check above
            cid = None
        if cid is None and not exist_ok:
            raise CollectionError(f"collection {name!r} exists already (another process created it just now)")
        return self.get(name)

    def index(self, name: str, paths: Iterable[str | os.PathLike], *, sync: bool = False, include: list[str] | None = None,
              exclude: list[str] | None = None, config: IndexConfig | None = None,
              progress: bool | ProgressCallback = False, limits: dict[str, Any] | None = None,
              store_uri: str | None = None) -> IndexReport:
        """Index ``paths`` into ``name`` (created with ``config`` on ``store_uri`` if missing; an existing
        collection keeps the store it was created on); ``limits``: see :meth:`Collection.index_paths`."""
        collection_name(name)
        col = self.create(name, config, exist_ok=True, store_uri=store_uri)
        if config is not None:
            wanted, _ = resolve_embedding_model(config.embedding_model)
            if wanted != col.embedding_model:
                raise CollectionError(
                    f"collection {name!r} was built with {col.embedding_model}; adding with {wanted} would mix "
                    f"incomparable vectors. Rebuild it with: ragtune reindex {name} --model {config.embedding_model}")
        return col.index_paths(paths, sync=sync, include=include, exclude=exclude, progress=progress, limits=limits)

    def drop(self, name: str) -> None:
        """Drop the collection: its store's data first (a crash leaves the catalog row, and dropping
        again finishes), then the catalog rows. A store that is gone is skipped (nothing to remove)."""
        col = self.get(name)
        try:
            col.backend.drop()
        except StoreError:
            pass
        with db.transaction(self.conn) as conn:
            store.delete_collection(conn, col.id)
        with self._lock:
            self._collections.pop(col.id, None)
        shutil.rmtree(col.folder, ignore_errors=True)

    def reindex(self, name: str, model: str | None = None, progress: bool | ProgressCallback = False,
                store_uri: str | None = None, **overrides: Any) -> IndexReport:
        """Re-chunk and re-embed every stored document (e.g. with another embedding model, or into
        another store: ``store_uri``) into a new collection, and swap it in only when complete; a crash
        leaves the old one untouched. The text comes from the catalog, so the old store may be gone."""
        old = self.get(name)
        target_uri = normalise_uri(store_uri) if store_uri is not None else old.store_uri
        values = config_to_dict(old.config)
        if model:
            values["embedding_model"] = model
        values.update(overrides)
        config = build_config(IndexConfig, values, source="reindex")
        tmp_name = f"{name}{REINDEX_SUFFIX}"
        if self.exists(tmp_name):
            self.drop(tmp_name)
        started = time.perf_counter()
        new = self._create(tmp_name, config, exist_ok=False, store_uri=target_uri)
        report = IndexReport()
        reindex_documents(old, new, report, progress)
        new.save_index()
        with db.transaction(self.conn) as conn:
            store.delete_collection(conn, old.id)
            store.rename_collection(conn, new.id, name)
        with self._lock:
            self._collections.pop(old.id, None)
            self._collections.pop(new.id, None)
        try:  # after the swap: a crash before this leaves unused old chunks, never a half-empty collection
            old.backend.drop()
        except StoreError:
            pass  # the old store is gone: nothing left to remove
        shutil.rmtree(old.folder, ignore_errors=True)
        stats = self.get(name).stats()
        report.total_documents, report.total_chunks = stats["documents"], stats["chunks"]
        report.seconds = round(time.perf_counter() - started, 3)
        return report
