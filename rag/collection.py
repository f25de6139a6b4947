"""Collections: add, sync, delete and search documents, keeping SQLite and FAISS in agreement.

A :class:`Workspace` is a ``RAGTUNE_HOME`` folder: ``ragtune.db`` plus ``collections/<id>/`` with
the FAISS file of each collection. A document is identified by its path within the collection
(relative to the folder that was indexed) and its content hash: unchanged files are skipped,
changed ones replace their chunks, and with ``sync`` files gone from the indexed folders are
deleted. Work is committed in groups (one SQLite transaction each), so a killed run keeps what it
finished and a re-run completes the rest.
"""

from __future__ import annotations

import errno
import fnmatch
import hashlib
import json
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal

import numpy as np

from rag import store
from rag.chunking import Chunk, TokenChunker
from rag.config import ConfigError, build_config, config_to_dict, field as cfield, ragtune_home
from rag.documents import SUPPORTED_SUFFIXES, Document, DocumentError, load_bytes
from rag.embeddings import get_embedder, resolve_embedding_model
from rag.search import (Hit, SearchMode, allowed_ids, bm25_search, convex_fusion, dense_search, fetch_hits,
                        parse_where, reciprocal_rank_fusion)

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
ProgressCallback = Callable[[int, int, str], None]


class CollectionError(Exception):
    """A request about a collection that cannot be carried out; the message says what to do."""


@dataclass
class IndexConfig:
    embedding_model: str = cfield("default", help="sentence-transformers model: 'default' (the packaged all-MiniLM-L6-v2), a local folder or a hub id")
    chunk_tokens: int = cfield(256, help="maximum chunk length in embedder tokens (clamped to the model's limit)")
    chunk_overlap: int = cfield(32, help="tokens shared by consecutive chunks")
    index_type: Literal["flat", "hnsw"] = cfield("flat", help="FAISS index: exact 'flat' or approximate 'hnsw' for large collections")
    batch_size: int = cfield(32, help="texts per embedding forward pass")
    group_chunks: int = cfield(512, help="chunks embedded and committed per SQLite transaction")
    max_file_mb: float = cfield(64.0, help="files larger than this are reported as failed")

    def __post_init__(self) -> None:
        if self.chunk_tokens < 16:
            raise ConfigError(f"chunk_tokens={self.chunk_tokens} is too small; use 64-512")
        if not 0 <= self.chunk_overlap < self.chunk_tokens:
            raise ConfigError(f"chunk_overlap={self.chunk_overlap} must be >= 0 and < chunk_tokens ({self.chunk_tokens})")
        if self.batch_size < 1 or self.group_chunks < 1:
            raise ConfigError("batch_size and group_chunks must be >= 1")
        if self.max_file_mb <= 0:
            raise ConfigError("max_file_mb must be > 0")


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


@dataclass
class Candidate:
    path: Path  # absolute path on disk
    source: str  # path within the collection
    root: str  # the indexed folder (real path)


@dataclass
class PendingDocument:
    document: Document
    chunks: list[Chunk]
    content_hash: str
    size: int
    root: str | None


def _matches(rel: str, patterns: list[str]) -> bool:
    name = rel.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatch(rel, p) or fnmatch.fnmatch(name, p) for p in patterns)


def _selected(rel: str, include: list[str] | None, exclude: list[str] | None) -> bool:
    return (not include or _matches(rel, include)) and not (exclude and _matches(rel, exclude))


def discover(paths: Iterable[str | os.PathLike], include: list[str] | None = None,
             exclude: list[str] | None = None) -> tuple[list[Candidate], list[dict[str, str]], int, list[str]]:
    """Files to index under ``paths`` -> (candidates, failed, skipped count, folder roots walked).

    Symlinks are followed only when they resolve inside the indexed folder; loops and links that
    escape it are reported as failed, never read.
    """
    include, exclude = include or [], exclude or []
    candidates: list[Candidate] = []
    failed: list[dict[str, str]] = []
    roots: list[str] = []
    skipped = 0
    for given in paths:
        given_path = Path(given).expanduser()
        try:
            real = given_path.resolve(strict=True)
        except FileNotFoundError:
            failed.append({"path": str(given), "error": "no such file or folder"})
            continue
        except (RuntimeError, OSError) as exc:
            failed.append({"path": str(given), "error": f"cannot resolve ({_loop_or(exc)})"})
            continue
        if real.is_file():
            if real.suffix.lower() not in SUPPORTED_SUFFIXES:
                failed.append({"path": str(given), "error": f"unsupported file type {real.suffix or '(none)'}; "
                               f"supported: {', '.join(SUPPORTED_SUFFIXES)}"})
                continue
            candidates.append(Candidate(real, given_path.name, str(real.parent)))
            continue
        root = str(real)
        roots.append(root)
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            dirnames.sort()
            for d in list(dirnames):
                full = os.path.join(dirpath, d)
                if d.startswith("."):
                    dirnames.remove(d)
                elif os.path.islink(full):
                    dirnames.remove(d)  # never walk through directory links (loops, escapes)
                    problem = _link_problem(full, root)
                    if problem:
                        failed.append({"path": os.path.relpath(full, root), "error": problem})
            for name in sorted(filenames):
                if name.startswith("."):
                    continue
                full = os.path.join(dirpath, name)
                rel = Path(os.path.relpath(full, root)).as_posix()
                if not _selected(rel, include, exclude):
                    continue
                if Path(name).suffix.lower() not in SUPPORTED_SUFFIXES:
                    skipped += 1
                    continue
                if os.path.islink(full):
                    problem = _link_problem(full, root)
                    if problem:
                        failed.append({"path": rel, "error": problem})
                        continue
                candidates.append(Candidate(Path(full), rel, root))
    return candidates, failed, skipped, roots


def _loop_or(exc: BaseException) -> str:
    if isinstance(exc, RuntimeError) or getattr(exc, "errno", None) == errno.ELOOP:
        return "symlink loop"
    return str(exc)


def _link_problem(link: str, root: str) -> str | None:
    try:
        target = Path(link).resolve(strict=True)
    except (RuntimeError, OSError) as exc:
        if isinstance(exc, FileNotFoundError):
            return "broken symlink (its target does not exist)"
        return "symlink loop; remove or fix the link"
    if os.path.commonpath([str(target), root]) != root:
        return f"path escapes the indexed root (symlink to {target}); index that folder itself instead"
    return None


class Collection:
    """One collection. Thread-safe: searches share the loaded FAISS index, writes take a lock."""

    def __init__(self, workspace: "Workspace", row: Any) -> None:
        self.workspace = workspace
        self.id = int(row["id"])
        self.name = str(row["name"])
        self.embedding_model = str(row["embedding_model"])
        self.dimension = int(row["dimension"])
        self.index_type = str(row["index_type"])
        self.config: IndexConfig = build_config(IndexConfig, json.loads(row["config_json"]), source=f"collection {self.name}")
        self.folder = workspace.home / "collections" / str(self.id)
        self._index = None
        self._index_version: int | None = None
        self._lock = threading.RLock()

    # --- plumbing -----------------------------------------------------------------------------
    @property
    def conn(self):
        return self.workspace.conn

    @property
    def embedder(self):
        return get_embedder(self.config.embedding_model)

    def version(self) -> int:
        row = self.conn.execute("SELECT version FROM collections WHERE id = ?", (self.id,)).fetchone()
        if row is None:
            raise CollectionError(f"collection {self.name!r} was dropped")
        return int(row[0])

    def index(self):
        """The FAISS index for the current version: loaded, reused, or rebuilt from SQLite."""
        with self._lock:
            version = self.version()
            if self._index is not None and self._index_version == version:
                return self._index
            count = self.conn.execute("SELECT COUNT(*) FROM chunks WHERE collection_id = ?", (self.id,)).fetchone()[0]
            index = store.read_faiss(self.folder, version)
            if index is None or index.ntotal != count:
                index = self._rebuild_index()
            else:
                self._index, self._index_version = index, version
            return self._index

    def _rebuild_index(self):
        conn = self.conn
        conn.execute("BEGIN")  # one snapshot: version and vectors agree
        try:
            version = int(conn.execute("SELECT version FROM collections WHERE id = ?", (self.id,)).fetchone()[0])
            rows = conn.execute("SELECT id, vector FROM chunks WHERE collection_id = ? ORDER BY id", (self.id,)).fetchall()
        finally:
            conn.execute("COMMIT")
        index = store.new_faiss_index(self.index_type, self.dimension)
        if rows:
            ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
            index.add_with_ids(store.blobs_to_matrix((r[1] for r in rows), self.dimension), ids)
        store.write_faiss(index, self.folder, version)
        self._index, self._index_version = index, version
        return index

    def _apply_to_index(self, new_version: int, removed: list[int], ids: list[int], vectors: np.ndarray | None) -> None:
        """Mirror a committed change in the loaded index, or drop it so it is reloaded."""
        with self._lock:
            if self._index is None or self._index_version != new_version - 1:
                self._index = None
                return
            if removed:
                if self.index_type == "hnsw":  # HNSW cannot remove: rebuild lazily from SQLite
                    self._index = None
                    return
                self._index.remove_ids(np.array(removed, dtype=np.int64))
            if ids:
                self._index.add_with_ids(vectors, np.array(ids, dtype=np.int64))
            self._index_version = new_version

    def save_index(self) -> None:
        """Write the FAISS file for the current version (after a batch of changes)."""
        with self._lock:
            index = self.index()
            if not store.faiss_path(self.folder, self._index_version).exists():
                store.write_faiss(index, self.folder, self._index_version)

    # --- writing ------------------------------------------------------------------------------
    def index_paths(self, paths: Iterable[str | os.PathLike], *, sync: bool = False, include: list[str] | None = None,
                    exclude: list[str] | None = None, progress: bool | ProgressCallback = False) -> IndexReport:
        started = time.perf_counter()
        report = IndexReport()
        candidates, failed, report.skipped, roots = discover(paths, include, exclude)
        report.failed.extend(failed)
        stored = {r["path"]: (r["content_hash"], r["root"]) for r in self.conn.execute(
            "SELECT path, content_hash, root FROM documents WHERE collection_id = ?", (self.id,))}
        embedder = self.embedder
        chunker = TokenChunker(embedder.tokenizer, self.config.chunk_tokens, self.config.chunk_overlap, embedder.max_tokens)
        max_bytes = int(self.config.max_file_mb * 1024 * 1024)
        seen: set[str] = set()
        pending: list[PendingDocument] = []
        pending_chunks = 0
        bar = _progress(progress, len(candidates), f"indexing {self.name}")
        for done, cand in enumerate(candidates, start=1):
            seen.add(cand.source)
            try:
                size = cand.path.stat().st_size
                if size > max_bytes:
                    raise DocumentError(f"file is {size / 2**20:.0f} MiB, over max_file_mb={self.config.max_file_mb:g}; "
                                        "split it or raise max_file_mb")
                data = cand.path.read_bytes()
                digest = hashlib.sha256(data).hexdigest()
                if cand.source in stored and stored[cand.source][0] == digest:
                    report.unchanged += 1
                    continue
                document = load_bytes(cand.path, data, cand.source)
                chunks = chunker.split(document)
                if not chunks:
                    raise DocumentError("no text to index after splitting")
            except DocumentError as exc:
                report.failed.append({"path": cand.source, "error": str(exc)})
                continue
            except OSError as exc:
                report.failed.append({"path": cand.source, "error": f"cannot read ({exc.strerror or exc})"})
                continue
            finally:
                bar(done, cand.source)
            pending.append(PendingDocument(document, chunks, digest, size, cand.root))
            if cand.source in stored:
                report.updated += 1
            else:
                report.added += 1
            pending_chunks += len(chunks)
            if pending_chunks >= self.config.group_chunks:
                report.chunks += self._store(pending)
                pending, pending_chunks = [], 0
        if pending:
            report.chunks += self._store(pending)
        if sync:
            gone = [path for path, (_, root) in stored.items()
                    if path not in seen and root in roots and _selected(path, include, exclude)]
            report.deleted = self.delete_documents(gone) if gone else 0
        getattr(bar, "close", lambda: None)()
        self.save_index()
        stats = self.stats()
        report.total_documents, report.total_chunks = stats["documents"], stats["chunks"]
        report.seconds = round(time.perf_counter() - started, 3)
        return report

    def _store(self, pending: list[PendingDocument]) -> int:
        """Embed the pending documents' chunks and commit them in one transaction."""
        chunks = [c for p in pending for c in p.chunks]
        vectors = self.embedder.embed_batch([c.embedding_text() for c in chunks], batch_size=self.config.batch_size)
        if vectors.shape[1] != self.dimension:
            raise CollectionError(f"embedder returned {vectors.shape[1]}-d vectors but {self.name!r} holds {self.dimension}-d")
        fts = store.fts_table(self.id)
        now = time.time()
        new_ids: list[int] = []
        with self._lock, store.transaction(self.conn) as conn:
            removed: list[int] = []
            for p in pending:
                old = conn.execute("SELECT id FROM documents WHERE collection_id = ? AND path = ?", (self.id, p.document.source)).fetchone()
                if old is not None:
                    removed += self._delete_document_rows(conn, int(old[0]))
                doc_id = conn.execute(
                    "INSERT INTO documents (collection_id, path, root, content_hash, size, text, metadata_json, markers_json, indexed_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (self.id, p.document.source, p.root, p.content_hash, p.size, p.document.text,
                     json.dumps(p.document.metadata), json.dumps(p.document.markers), now)).lastrowid
                for chunk in p.chunks:
                    vector = vectors[len(new_ids)]
                    chunk_id = conn.execute(
                        "INSERT INTO chunks (document_id, collection_id, ordinal, start, end, text, metadata_json, vector) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (doc_id, self.id, chunk.ordinal, chunk.start, chunk.end, chunk.text, json.dumps(chunk.metadata),
                         store.vector_to_blob(vector))).lastrowid
                    conn.execute(f"INSERT INTO {fts} (rowid, text) VALUES (?, ?)", (chunk_id, chunk.text))
                    new_ids.append(int(chunk_id))
            new_version = self._bump(conn)
        self._apply_to_index(new_version, removed, new_ids, vectors)
        return len(new_ids)

    def _bump(self, conn) -> int:
        conn.execute("UPDATE collections SET version = version + 1, updated_at = ? WHERE id = ?", (time.time(), self.id))
        return int(conn.execute("SELECT version FROM collections WHERE id = ?", (self.id,)).fetchone()[0])

    def _delete_document_rows(self, conn, doc_id: int) -> list[int]:
        fts = store.fts_table(self.id)
        rows = conn.execute("SELECT id, text FROM chunks WHERE document_id = ?", (doc_id,)).fetchall()
        conn.executemany(f"INSERT INTO {fts} ({fts}, rowid, text) VALUES ('delete', ?, ?)", [(r[0], r[1]) for r in rows])
        conn.execute("DELETE FROM documents WHERE id = ?", (doc_id,))
        return [int(r[0]) for r in rows]

    def delete_documents(self, paths: Iterable[str]) -> int:
        """Delete documents by their path within the collection; returns how many existed."""
        paths = list(paths)
        deleted = 0
        with self._lock:
            with store.transaction(self.conn) as conn:
                removed: list[int] = []
                for path in paths:
                    row = conn.execute("SELECT id FROM documents WHERE collection_id = ? AND path = ?", (self.id, path)).fetchone()
                    if row is not None:
                        removed += self._delete_document_rows(conn, int(row[0]))
                        deleted += 1
                new_version = self._bump(conn) if deleted else None
            if new_version is not None:
                self._apply_to_index(new_version, removed, [], None)
                self.save_index()
        return deleted

    # --- reading ------------------------------------------------------------------------------
    def search(self, query: str, k: int = 5, mode: SearchMode = "hybrid", where: list[str] | dict | None = None,
               candidates: int = 50, fusion: Literal["convex", "rrf"] = "convex", alpha: float = 0.4) -> list[Hit]:
        """Top-``k`` chunks for ``query``. Hybrid fuses ``candidates`` from each retriever; ``alpha`` is
        the dense share of a convex fusion (0.4: BM25 is the stronger signal on exact domain terms)."""
        if mode not in ("hybrid", "dense", "bm25"):
            raise CollectionError(f"unknown search mode {mode!r}; use hybrid, dense or bm25")
        if not query or not query.strip():
            raise CollectionError("empty query; type what you are looking for")
        filters = parse_where(where)
        pool = max(k, candidates) if mode == "hybrid" else k
        lexical_job = None
        if mode in ("bm25", "hybrid"):
            # BM25 runs in a worker thread (its own SQLite connection; sqlite releases the GIL)
            # while the query is embedded and FAISS searched here: the two overlap on 2 cores.
            lexical_job = _search_pool().submit(bm25_search, self.workspace, self.id, query, pool, filters)
        dense: list[tuple[int, float]] = []
        qvec = None
        if mode in ("dense", "hybrid"):
            qvec = self.embedder.embed_batch([query])[0]
            index = self.index()
            ids = allowed_ids(self.conn, self.id, filters) if filters else None
            dense = dense_search(index, qvec, pool, ids)
        lexical = lexical_job.result() if lexical_job is not None else []
        if mode == "dense":
            scored = dense[:k]
        elif mode == "bm25":
            scored = lexical[:k]
        elif fusion == "rrf":
            scored = reciprocal_rank_fusion([dense, lexical], [1.0, 1.0])[:k]
        else:
            scored = convex_fusion(dense, lexical, alpha)[:k]
        hits = fetch_hits(self.conn, scored)
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
        marks = ",".join("?" * len(ids))
        rows = self.conn.execute(f"SELECT id, vector FROM chunks WHERE id IN ({marks})", ids).fetchall()
        return {int(r[0]): np.frombuffer(r[1], dtype=np.float32) for r in rows}

    def documents(self) -> list[dict[str, Any]]:
        rows = self.conn.execute(
            "SELECT d.path, d.content_hash, d.size, d.indexed_at, d.metadata_json, COUNT(c.id) AS chunks "
            "FROM documents d LEFT JOIN chunks c ON c.document_id = d.id WHERE d.collection_id = ? "
            "GROUP BY d.id ORDER BY d.path", (self.id,)).fetchall()
        return [{"path": r["path"], "content_hash": r["content_hash"], "size": r["size"], "chunks": r["chunks"],
                 "indexed_at": r["indexed_at"], "metadata": json.loads(r["metadata_json"])} for r in rows]

    def document_text(self, doc: str) -> str:
        row = self.conn.execute("SELECT text FROM documents WHERE collection_id = ? AND path = ?", (self.id, doc)).fetchone()
        if row is None:
            raise CollectionError(f"no document {doc!r} in collection {self.name!r}")
        return str(row[0])

    def chunks(self, doc: str) -> list[Chunk]:
        rows = self.conn.execute(
            "SELECT c.id, c.text, c.start, c.end, c.ordinal, c.metadata_json FROM chunks c JOIN documents d ON d.id = c.document_id "
            "WHERE d.collection_id = ? AND d.path = ? ORDER BY c.start", (self.id, doc)).fetchall()
        return [Chunk(r["text"], r["start"], r["end"], r["ordinal"], json.loads(r["metadata_json"]), id=r["id"], doc=doc) for r in rows]

    def stats(self) -> dict[str, Any]:
        docs = self.conn.execute("SELECT COUNT(*) FROM documents WHERE collection_id = ?", (self.id,)).fetchone()[0]
        chunks = self.conn.execute("SELECT COUNT(*) FROM chunks WHERE collection_id = ?", (self.id,)).fetchone()[0]
        return {"name": self.name, "documents": int(docs), "chunks": int(chunks), "embedding_model": self.embedding_model,
                "dimension": self.dimension, "index_type": self.index_type, "version": self.version()}

    def check(self) -> dict[str, int]:
        """FAISS and SQLite counts and id sets agree? (used by tests and ``ragtune collections``)."""
        index = self.index()
        ids = {int(r[0]) for r in self.conn.execute("SELECT id FROM chunks WHERE collection_id = ?", (self.id,))}
        faiss_ids = set(int(i) for i in _faiss_ids(index))
        return {"sqlite_chunks": len(ids), "faiss_vectors": int(index.ntotal), "mismatched": len(ids ^ faiss_ids)}


_POOL = None
_POOL_LOCK = threading.Lock()


def _search_pool():
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            from concurrent.futures import ThreadPoolExecutor

            _POOL = ThreadPoolExecutor(max_workers=4, thread_name_prefix="ragtune-bm25")
        return _POOL


def _faiss_ids(index) -> np.ndarray:
    import faiss

    return faiss.vector_to_array(index.id_map)


def _progress(progress: bool | ProgressCallback, total: int, label: str):
    """A callable(done, message) that feeds tqdm or a caller's callback (the Streamlit UI)."""
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


class Workspace:
    """A ragtune home folder: the SQLite database and the collections' FAISS folders."""

    def __init__(self, home: str | os.PathLike | None = None) -> None:
        self.home = ragtune_home(home)
        self.db_path = self.home / "ragtune.db"
        self._local = threading.local()
        self._collections: dict[int, Collection] = {}
        self._lock = threading.Lock()
        _ = self.conn  # create and migrate now, so errors surface at open

    @property
    def conn(self):
        """One SQLite connection per thread (Streamlit serves sessions from several threads)."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = store.connect(self.db_path)
        return conn

    def names(self) -> list[str]:
        return [r[0] for r in self.conn.execute("SELECT name FROM collections WHERE name NOT LIKE '%~%' ORDER BY name")]

    def list(self) -> list[dict[str, Any]]:
        return [self.get(name).stats() for name in self.names()]

    def exists(self, name: str) -> bool:
        return self.conn.execute("SELECT 1 FROM collections WHERE name = ?", (name,)).fetchone() is not None

    def get(self, name: str) -> Collection:
        row = self.conn.execute("SELECT * FROM collections WHERE name = ?", (name,)).fetchone()
        if row is None:
            known = ", ".join(self.names()) or "none yet"
            raise CollectionError(f"no collection named {name!r} (known: {known}); create it with: ragtune index PATH --collection {name}")
        with self._lock:
            col = self._collections.get(int(row["id"]))
            if col is None or col.name != name:
                col = self._collections[int(row["id"])] = Collection(self, row)
            return col

    def create(self, name: str, config: IndexConfig | None = None) -> Collection:
        if not NAME_RE.fullmatch(name.replace("~", "")) or (name.count("~") > 1):
            raise CollectionError(f"invalid collection name {name!r}: use letters, digits, '.', '_' or '-' (max 64)")
        if self.exists(name):
            raise CollectionError(f"collection {name!r} exists already")
        config = config or IndexConfig()
        model_id, _ = resolve_embedding_model(config.embedding_model)
        embedder = get_embedder(config.embedding_model)
        now = time.time()
        with store.transaction(self.conn) as conn:
            cid = conn.execute(
                "INSERT INTO collections (name, embedding_model, dimension, index_type, config_json, version, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?, 0, ?, ?)",
                (name, model_id, embedder.dimension, config.index_type, json.dumps(config_to_dict(config)), now, now)).lastrowid
            store.create_fts(conn, cid)
        return self.get(name)

    def index(self, name: str, paths: Iterable[str | os.PathLike], *, sync: bool = False, include: list[str] | None = None,
              exclude: list[str] | None = None, config: IndexConfig | None = None,
              progress: bool | ProgressCallback = False) -> IndexReport:
        """Index ``paths`` into ``name`` (created with ``config`` if missing)."""
        if not NAME_RE.fullmatch(name):
            raise CollectionError(f"invalid collection name {name!r}: use letters, digits, '.', '_' or '-' (max 64)")
        if self.exists(name):
            col = self.get(name)
            if config is not None:
                wanted, _ = resolve_embedding_model(config.embedding_model)
                if wanted != col.embedding_model:
                    raise CollectionError(
                        f"collection {name!r} was built with {col.embedding_model}; adding with {wanted} would mix "
                        f"incomparable vectors. Rebuild it with: ragtune reindex {name} --model {config.embedding_model}")
        else:
            col = self.create(name, config)
        return col.index_paths(paths, sync=sync, include=include, exclude=exclude, progress=progress)

    def drop(self, name: str) -> None:
        col = self.get(name)
        with store.transaction(self.conn) as conn:
            store.drop_fts(conn, col.id)
            conn.execute("DELETE FROM collections WHERE id = ?", (col.id,))
        with self._lock:
            self._collections.pop(col.id, None)
        shutil.rmtree(col.folder, ignore_errors=True)

    def reindex(self, name: str, model: str | None = None, progress: bool | ProgressCallback = False,
                **overrides: Any) -> IndexReport:
        """Re-chunk and re-embed every stored document (e.g. with another embedding model) into a
        new collection, and swap it in only when complete; a crash leaves the old one untouched."""
        old = self.get(name)
        values = config_to_dict(old.config)
        if model:
            values["embedding_model"] = model
        values.update(overrides)
        config = build_config(IndexConfig, values, source="reindex")
        tmp_name = f"{name}~reindex"
        if self.exists(tmp_name):
            self.drop(tmp_name)
        started = time.perf_counter()
        new = self.create(tmp_name, config)
        embedder = new.embedder
        chunker = TokenChunker(embedder.tokenizer, config.chunk_tokens, config.chunk_overlap, embedder.max_tokens)
        rows = self.conn.execute(
            "SELECT path, root, content_hash, size, text, metadata_json, markers_json FROM documents "
            "WHERE collection_id = ? ORDER BY path", (old.id,)).fetchall()
        report = IndexReport()
        bar = _progress(progress, len(rows), f"reindexing {name}")
        pending, pending_chunks = [], 0
        for done, r in enumerate(rows, start=1):
            document = Document(r["text"], r["path"], json.loads(r["metadata_json"]),
                                [(int(o), m) for o, m in json.loads(r["markers_json"])])
            chunks = chunker.split(document)
            pending.append(PendingDocument(document, chunks, r["content_hash"], r["size"], r["root"]))
            pending_chunks += len(chunks)
            report.added += 1
            bar(done, r["path"])
            if pending_chunks >= config.group_chunks:
                report.chunks += new._store(pending)
                pending, pending_chunks = [], 0
        if pending:
            report.chunks += new._store(pending)
        new.save_index()
        with store.transaction(self.conn) as conn:
            store.drop_fts(conn, old.id)
            conn.execute("DELETE FROM collections WHERE id = ?", (old.id,))
            conn.execute("UPDATE collections SET name = ? WHERE id = ?", (name, new.id))
        with self._lock:
            self._collections.pop(old.id, None)
            self._collections.pop(new.id, None)
        shutil.rmtree(old.folder, ignore_errors=True)
        stats = self.get(name).stats()
        report.total_documents, report.total_chunks = stats["documents"], stats["chunks"]
        report.seconds = round(time.perf_counter() - started, 3)
        return report
