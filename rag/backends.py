"""The store seam: what a collection needs from the place its chunks live.

A collection's *catalog* is always the workspace's SQLite database: the collection row (config,
version, which store it uses), and every document with its full text, content hash, metadata and
chunk count. So sync decisions, ``reindex`` (re-chunking stored text) and document listings never
depend on the chunk store, and a collection whose store is gone can still be moved elsewhere.

The *chunks* (text, spans, metadata, dense vectors, the BM25 index) live in a :class:`ChunkStore`:

- :class:`SqliteStore` (the default, ``sqlite``): chunk rows and FTS5 in the same SQLite database,
  vectors copied into a FAISS file; a document and its chunks commit in one transaction.
- :class:`rag.milvus_store.MilvusStore` (``milvus:///abs/path.db`` for Milvus Lite, or
  ``http(s)://host:19530`` for a Milvus server, token from ``RAGTUNE_MILVUS_TOKEN``).

Search results are ``(chunk id, score)`` lists; fusion of dense and BM25 lists happens above the
seam (:mod:`rag.collection`), so every store ranks the same way unless a store offers its own fusion.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from core import db
from rag import store
from rag.chunking import Chunk
from rag.errors import StoreError
from rag.search import Hit, allowed_ids, bm25_search, dense_search, fetch_hits
from rag.vector_index import faiss_ids

if TYPE_CHECKING:
    from rag.collection import Collection
    from rag.ingest import PendingDocument

SQLITE = "sqlite"


class ChunkStore(Protocol):
    """What a collection needs from the place its chunks live."""

    uri: str
    native_fusion: bool  # True when hybrid(..., fusion="rrf") runs inside the store

    def replace_documents(self, pending: list["PendingDocument"], vectors: np.ndarray) -> int:
        """Store the documents (catalog rows) and their chunks, replacing older versions; returns chunks stored."""

    def delete_documents(self, paths: list[str]) -> int:
        """Delete documents and their chunks; returns how many existed."""

    def dense(self, query_vector: np.ndarray, k: int, where: dict[str, str]) -> list[tuple[int, float]]: ...

    def bm25(self, query: str, k: int, where: dict[str, str]) -> list[tuple[int, float]]: ...

    def hybrid_rrf(self, query: str, query_vector: np.ndarray, k: int, candidates: int,
                   where: dict[str, str]) -> list[tuple[int, float]]: ...

    def fetch(self, scored: list[tuple[int, float]]) -> list[Hit]: ...

    def vectors(self, ids: list[int]) -> dict[int, np.ndarray]: ...

    def chunks(self, path: str) -> list[Chunk]: ...

    def chunk_count(self) -> int: ...

    def check(self) -> dict[str, int]:
        """Catalog and store agree? ``mismatched`` counts chunk ids present on one side only."""

    def save(self) -> None:
        """Persist after a batch of changes (the FAISS file); a no-op where writes are durable."""

    def recover(self) -> None:
        """Finish or undo a write a crash interrupted (called before every write)."""

    def drop(self) -> None:
        """Remove the store's data of this collection (the catalog rows are dropped by the caller)."""


# --- URIs --------------------------------------------------------------------------------------

def normalise_uri(uri: str | None) -> str:
    """The canonical form of a ``--store`` value, or StoreError saying which forms exist."""
    if uri is None or uri == "" or uri == SQLITE:
        return SQLITE
    if not isinstance(uri, str):
        raise StoreError(f"store {uri!r} must be a string")
    if uri.startswith("milvus://"):
        path = uri[len("milvus://"):]
        if not path.startswith("/"):
            raise StoreError(f"store {uri!r}: a Milvus Lite file needs an absolute path, e.g. milvus:///data/ragtune/milvus.db")
        if not path.endswith(".db"):
            raise StoreError(f"store {uri!r}: a Milvus Lite file name ends in .db, e.g. milvus:///data/ragtune/milvus.db")
        if ".." in Path(path).parts:
            raise StoreError(f"store {uri!r}: '..' is not allowed in the path; give the absolute path")
        return "milvus://" + os.path.normpath(path)
    if uri.startswith(("http://", "https://")):
        return uri.rstrip("/")
    raise StoreError(f"unknown store {uri!r}; use sqlite (the default), milvus:///abs/path.db (Milvus Lite) "
                     "or http://host:19530 (a Milvus server; token from RAGTUNE_MILVUS_TOKEN)")


def check_reachable(uri: str) -> None:
    """Raise StoreError (with the URI and the fix) when ``uri`` cannot be used; cheap for sqlite."""
    uri = normalise_uri(uri)
    if uri == SQLITE:
        return
    from rag.milvus_store import connect

    connect(uri)


def open_store(collection: "Collection") -> ChunkStore:
    uri = normalise_uri(collection.store_uri)
    if uri == SQLITE:
        return SqliteStore(collection)
    from rag.milvus_store import MilvusStore

    return MilvusStore(collection, uri)


# --- the default store: SQLite rows + FTS5 + a FAISS file --------------------------------------

class SqliteStore:
    """Chunks in the workspace database (FTS5 for BM25) and a FAISS copy of their vectors."""

    uri = SQLITE
    native_fusion = False

    def __init__(self, collection: "Collection") -> None:
        self.col = collection

    @property
    def conn(self):
        return self.col.conn

    def replace_documents(self, pending: list["PendingDocument"], vectors: np.ndarray) -> int:
        col = self.col
        new_ids: list[int] = []
        removed: list[int] = []
        with col.write_lock, db.transaction(self.conn) as conn:
            for p in pending:
                removed += store.delete_document(conn, col.id, p.document.source) or []
                n = len(p.chunks)
                new_ids += store.insert_document(
                    conn, col.id, path=p.document.source, root=p.root, content_hash=p.content_hash, size=p.size,
                    text=p.document.text, metadata=p.document.metadata, markers=p.document.markers, chunks=p.chunks,
                    vectors=vectors[len(new_ids):len(new_ids) + n])
            new_version = store.bump_version(conn, col.id)
        col.vectors.apply(new_version, removed, new_ids, vectors)
        return len(new_ids)

    def delete_documents(self, paths: list[str]) -> int:
        col = self.col
        deleted = 0
        removed: list[int] = []
        with col.write_lock:
            with db.transaction(self.conn) as conn:
                for path in paths:
                    ids = store.delete_document(conn, col.id, path)
                    if ids is not None:
                        removed += ids
                        deleted += 1
                new_version = store.bump_version(conn, col.id) if deleted else None
            if new_version is not None:
                col.vectors.apply(new_version, removed, [], None)
                self.save()
        return deleted

    def dense(self, query_vector: np.ndarray, k: int, where: dict[str, str]) -> list[tuple[int, float]]:
        index = self.col.index()
        ids = allowed_ids(self.conn, self.col.id, where) if where else None
        return dense_search(index, query_vector, k, ids)

    def bm25(self, query: str, k: int, where: dict[str, str]) -> list[tuple[int, float]]:
        # a Workspace: bm25_search takes its per-thread connection (it runs in a worker thread)
        return bm25_search(self.col.workspace, self.col.id, query, k, where)

    def hybrid_rrf(self, query, query_vector, k, candidates, where):  # pragma: no cover - native_fusion is False
        raise NotImplementedError("SqliteStore fuses above the seam")

    def fetch(self, scored: list[tuple[int, float]]) -> list[Hit]:
        return fetch_hits(self.conn, scored)

    def vectors(self, ids: list[int]) -> dict[int, np.ndarray]:
        return store.vectors_by_id(self.conn, ids)

    def chunks(self, path: str) -> list[Chunk]:
        import json

        return [Chunk(r["text"], r["start"], r["end"], r["ordinal"], json.loads(r["metadata_json"]), id=r["id"], doc=path)
                for r in store.document_chunks(self.conn, self.col.id, path)]

    def chunk_count(self) -> int:
        return store.chunk_count(self.conn, self.col.id)

    def check(self) -> dict[str, int]:
        index = self.col.index()
        ids = store.chunk_ids(self.conn, self.col.id)
        in_faiss = set(int(i) for i in faiss_ids(index))
        return {"sqlite_chunks": len(ids), "faiss_vectors": int(index.ntotal), "mismatched": len(ids ^ in_faiss)}

    def save(self) -> None:
        self.col.vectors.save(self.col.version())

    def recover(self) -> None:
        """Nothing to do: a document and its chunks commit in one SQLite transaction, and the FAISS
        file is rebuilt from SQLite when it disagrees (:mod:`rag.vector_index`)."""

    def drop(self) -> None:
        import shutil

        shutil.rmtree(self.col.folder, ignore_errors=True)

