"""Storage: every SQL statement about collections, documents and chunks (one SQLite database per
workspace; the connection, transaction and migration machinery is :mod:`core.db`).

SQLite is the source of truth: documents (with their full text, so spans can be shown and a
collection re-embedded without the original files), chunks with their vectors, and one FTS5 table
per collection for BM25. The FAISS file (:mod:`rag.vector_index`) is a fast copy of the stored
vectors, named after the collection's ``version``, which every change bumps in its own
transaction. Schema changes are numbered, append-only migrations (tested on ``:memory:``).
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from typing import Any, Iterable

import numpy as np

from core import db

NAMESPACE = "rag"


def _m001_collections(conn: sqlite3.Connection) -> None:
    db.run_script(conn,
        """
        CREATE TABLE collections (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            embedding_model TEXT NOT NULL,
            dimension INTEGER NOT NULL,
            index_type TEXT NOT NULL DEFAULT 'flat',
            config_json TEXT NOT NULL DEFAULT '{}',
            version INTEGER NOT NULL DEFAULT 0,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL
        );
        CREATE TABLE documents (
            id INTEGER PRIMARY KEY,
            collection_id INTEGER NOT NULL REFERENCES collections(id) ON DELETE CASCADE,
            path TEXT NOT NULL,
            root TEXT,
            content_hash TEXT NOT NULL,
            size INTEGER NOT NULL,
            text TEXT NOT NULL,
            metadata_json TEXT NOT NULL DEFAULT '{}',
            markers_json TEXT NOT NULL DEFAULT '[]',
            indexed_at REAL NOT NULL,
            UNIQUE (collection_id, path)
        );
        CREATE TABLE chunks (
            id INTEGER PRIMARY KEY,
            document_id INTEGER NOT NULL REFERENCES documents(id) ON DELETE CASCADE,
            collection_id INTEGER NOT NULL REFERENCES collections(id) ON DELETE CASCADE,
            ordinal INTEGER NOT NULL,
            start INTEGER NOT NULL,
            end INTEGER NOT NULL,
            text TEXT NOT NULL,
            metadata_json TEXT NOT NULL DEFAULT '{}',
            vector BLOB NOT NULL
        );
        CREATE INDEX chunks_document ON chunks(document_id);
        CREATE INDEX chunks_collection ON chunks(collection_id);
        """
    )


def _m002_store_backends(conn: sqlite3.Connection) -> None:
    """Where each collection's chunks live (``sqlite`` or a Milvus URI), per-document chunk counts (a
    Milvus collection has no chunk rows here) and the journal that makes a Milvus write crash-safe."""
    db.run_script(conn,
        """
        ALTER TABLE collections ADD COLUMN store TEXT NOT NULL DEFAULT 'sqlite';
        ALTER TABLE documents ADD COLUMN chunk_count INTEGER;
        CREATE TABLE store_journal (
            collection_id INTEGER NOT NULL REFERENCES collections(id) ON DELETE CASCADE,
            path TEXT NOT NULL,
            content_hash TEXT NOT NULL,
            phase TEXT NOT NULL CHECK (phase IN ('write', 'clean')),
            PRIMARY KEY (collection_id, path)
        );
        """
    )


MIGRATIONS: list[tuple[str, db.Migration]] = [
    ("collections, documents, chunks", _m001_collections),
    ("store backends: collections.store, documents.chunk_count, store_journal", _m002_store_backends),
]


def open_db(path: str | os.PathLike) -> sqlite3.Connection:
    """A connection to the workspace database with the rag tables migrated."""
    conn = db.connect(path)
    db.migrate(conn, MIGRATIONS, NAMESPACE)
    return conn


# --- vectors ---------------------------------------------------------------------------------

def vector_to_blob(vector: np.ndarray) -> bytes:
    return np.ascontiguousarray(vector, dtype=np.float32).tobytes()


def blobs_to_matrix(blobs: Iterable[bytes], dimension: int) -> np.ndarray:
    data = b"".join(blobs)
    return np.frombuffer(data, dtype=np.float32).reshape(-1, dimension) if data else np.zeros((0, dimension), np.float32)


# --- FTS5 ------------------------------------------------------------------------------------

def fts_table(collection_id: int) -> str:
    return f"fts_{int(collection_id)}"


def create_fts(conn: sqlite3.Connection, collection_id: int) -> None:
    conn.execute(
        f"CREATE VIRTUAL TABLE IF NOT EXISTS {fts_table(collection_id)} USING fts5("
        "text, content='chunks', content_rowid='id', tokenize='porter unicode61')"
    )


def drop_fts(conn: sqlite3.Connection, collection_id: int) -> None:
    conn.execute(f"DROP TABLE IF EXISTS {fts_table(collection_id)}")


# --- collections -----------------------------------------------------------------------------

def collection_row(conn: sqlite3.Connection, name: str) -> sqlite3.Row | None:
    return conn.execute("SELECT * FROM collections WHERE name = ?", (name,)).fetchone()


def collection_names(conn: sqlite3.Connection) -> list[str]:
    """Names of the finished collections (a ``name~reindex`` being rebuilt is hidden)."""
    return [r[0] for r in conn.execute("SELECT name FROM collections WHERE name NOT LIKE '%~%' ORDER BY name")]


def insert_collection(conn: sqlite3.Connection, name: str, embedding_model: str, dimension: int, index_type: str,
                      config: dict[str, Any], store_uri: str = "sqlite") -> int | None:
    """Insert a collection and its FTS table inside the caller's (IMMEDIATE) transaction; returns its
    id, or None when another process created ``name`` first (the caller decides what that means)."""
    if conn.execute("SELECT 1 FROM collections WHERE name = ?", (name,)).fetchone() is not None:
        return None
    now = time.time()
    cid = conn.execute(
        "INSERT INTO collections (name, embedding_model, dimension, index_type, config_json, version, created_at, updated_at, store) "
        "VALUES (?, ?, ?, ?, ?, 0, ?, ?, ?)",
        (name, embedding_model, dimension, index_type, json.dumps(config), now, now, store_uri)).lastrowid
    create_fts(conn, int(cid))
    return int(cid)


def delete_collection(conn: sqlite3.Connection, collection_id: int) -> None:
    drop_fts(conn, collection_id)
    conn.execute("DELETE FROM collections WHERE id = ?", (collection_id,))


def rename_collection(conn: sqlite3.Connection, collection_id: int, name: str) -> None:
    conn.execute("UPDATE collections SET name = ? WHERE id = ?", (name, collection_id))


def version(conn: sqlite3.Connection, collection_id: int) -> int | None:
    row = conn.execute("SELECT version FROM collections WHERE id = ?", (collection_id,)).fetchone()
    return None if row is None else int(row[0])


def bump_version(conn: sqlite3.Connection, collection_id: int) -> int:
    conn.execute("UPDATE collections SET version = version + 1, updated_at = ? WHERE id = ?", (time.time(), collection_id))
    return int(conn.execute("SELECT version FROM collections WHERE id = ?", (collection_id,)).fetchone()[0])


# --- documents and chunks ----------------------------------------------------------------------

def stored_hashes(conn: sqlite3.Connection, collection_id: int) -> dict[str, tuple[str, str | None]]:
    """path -> (content hash, indexed root) of every document in the collection."""
    return {r["path"]: (r["content_hash"], r["root"]) for r in conn.execute(
        "SELECT path, content_hash, root FROM documents WHERE collection_id = ?", (collection_id,))}


def stored_documents(conn: sqlite3.Connection, collection_id: int) -> list[sqlite3.Row]:
    """Everything needed to re-chunk each document without its file (for reindex)."""
    return conn.execute(
        "SELECT path, root, content_hash, size, text, metadata_json, markers_json FROM documents "
        "WHERE collection_id = ? ORDER BY path", (collection_id,)).fetchall()


def delete_document(conn: sqlite3.Connection, collection_id: int, path: str) -> list[int] | None:
    """Delete one document, its chunks and their FTS rows; returns the removed chunk ids (None if absent)."""
    row = conn.execute("SELECT id FROM documents WHERE collection_id = ? AND path = ?", (collection_id, path)).fetchone()
    if row is None:
        return None
    fts = fts_table(collection_id)
    rows = conn.execute("SELECT id, text FROM chunks WHERE document_id = ?", (int(row[0]),)).fetchall()
    conn.executemany(f"INSERT INTO {fts} ({fts}, rowid, text) VALUES ('delete', ?, ?)", [(r[0], r[1]) for r in rows])
    conn.execute("DELETE FROM documents WHERE id = ?", (int(row[0]),))
    return [int(r[0]) for r in rows]


def insert_document(conn: sqlite3.Connection, collection_id: int, *, path: str, root: str | None, content_hash: str,
                    size: int, text: str, metadata: dict, markers: list, chunks: list, vectors: np.ndarray,
                    chunk_rows: bool = True) -> list[int]:
    """Insert a document with its chunks (and their FTS rows); returns the new chunk ids. With
    ``chunk_rows=False`` (a collection whose chunks live in another store) only the document row and
    its chunk count are written."""
    fts = fts_table(collection_id)
    doc_id = conn.execute(
        "INSERT INTO documents (collection_id, path, root, content_hash, size, text, metadata_json, markers_json, indexed_at, chunk_count) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (collection_id, path, root, content_hash, size, text, json.dumps(metadata), json.dumps(markers), time.time(),
         len(chunks))).lastrowid
    ids: list[int] = []
    if not chunk_rows:
        return ids
    for chunk, vector in zip(chunks, vectors):
        chunk_id = conn.execute(
            "INSERT INTO chunks (document_id, collection_id, ordinal, start, end, text, metadata_json, vector) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (doc_id, collection_id, chunk.ordinal, chunk.start, chunk.end, chunk.text, json.dumps(chunk.metadata),
             vector_to_blob(vector))).lastrowid
        conn.execute(f"INSERT INTO {fts} (rowid, text) VALUES (?, ?)", (chunk_id, chunk.text))
        ids.append(int(chunk_id))
    return ids


def chunk_count(conn: sqlite3.Connection, collection_id: int) -> int:
    return int(conn.execute("SELECT COUNT(*) FROM chunks WHERE collection_id = ?", (collection_id,)).fetchone()[0])


def document_count(conn: sqlite3.Connection, collection_id: int) -> int:
    return int(conn.execute("SELECT COUNT(*) FROM documents WHERE collection_id = ?", (collection_id,)).fetchone()[0])


def chunk_ids(conn: sqlite3.Connection, collection_id: int) -> set[int]:
    return {int(r[0]) for r in conn.execute("SELECT id FROM chunks WHERE collection_id = ?", (collection_id,))}


def snapshot_vectors(conn: sqlite3.Connection, collection_id: int) -> tuple[int, list[sqlite3.Row]]:
    """(version, [(chunk id, vector blob)]) read in one snapshot, so the two agree."""
    conn.execute("BEGIN")
    try:
        current = version(conn, collection_id)
        rows = conn.execute("SELECT id, vector FROM chunks WHERE collection_id = ? ORDER BY id", (collection_id,)).fetchall()
    finally:
        conn.execute("COMMIT")
    if current is None:
        raise LookupError(f"collection {collection_id} was dropped")
    return current, rows


def vectors_by_id(conn: sqlite3.Connection, ids: list[int]) -> dict[int, np.ndarray]:
    if not ids:
        return {}
    marks = ",".join("?" * len(ids))
    rows = conn.execute(f"SELECT id, vector FROM chunks WHERE id IN ({marks})", ids).fetchall()
    return {int(r[0]): np.frombuffer(r[1], dtype=np.float32) for r in rows}


def document_summaries(conn: sqlite3.Connection, collection_id: int) -> list[dict[str, Any]]:
    rows = conn.execute(
        "SELECT d.path, d.content_hash, d.size, d.indexed_at, d.metadata_json, "
        "CASE WHEN COUNT(c.id) > 0 THEN COUNT(c.id) ELSE COALESCE(d.chunk_count, 0) END AS chunks "
        "FROM documents d LEFT JOIN chunks c ON c.document_id = d.id WHERE d.collection_id = ? "
        "GROUP BY d.id ORDER BY d.path", (collection_id,)).fetchall()
    return [{"path": r["path"], "content_hash": r["content_hash"], "size": r["size"], "chunks": r["chunks"],
             "indexed_at": r["indexed_at"], "metadata": json.loads(r["metadata_json"])} for r in rows]


def document_text(conn: sqlite3.Connection, collection_id: int, path: str) -> str | None:
    row = conn.execute("SELECT text FROM documents WHERE collection_id = ? AND path = ?", (collection_id, path)).fetchone()
    return None if row is None else str(row[0])


def document_chunks(conn: sqlite3.Connection, collection_id: int, path: str) -> list[sqlite3.Row]:
    return conn.execute(
        "SELECT c.id, c.text, c.start, c.end, c.ordinal, c.metadata_json FROM chunks c JOIN documents d ON d.id = c.document_id "
        "WHERE d.collection_id = ? AND d.path = ? ORDER BY c.start", (collection_id, path)).fetchall()


def set_store(conn: sqlite3.Connection, collection_id: int, store_uri: str) -> None:
    conn.execute("UPDATE collections SET store = ? WHERE id = ?", (store_uri, collection_id))


def document_chunk_counts(conn: sqlite3.Connection, collection_id: int) -> dict[str, tuple[str, int]]:
    """path -> (content hash, chunk count recorded with the document) (a Milvus collection's catalog)."""
    return {r[0]: (r[1], int(r[2] or 0)) for r in conn.execute(
        "SELECT path, content_hash, chunk_count FROM documents WHERE collection_id = ?", (collection_id,))}


def recorded_chunk_total(conn: sqlite3.Connection, collection_id: int) -> int:
    return int(conn.execute("SELECT COALESCE(SUM(chunk_count), 0) FROM documents WHERE collection_id = ?",
                            (collection_id,)).fetchone()[0])


# --- the journal of writes to an external store (rag/milvus_store.py) ---------------------------

def journal_write(conn: sqlite3.Connection, collection_id: int, entries: list[tuple[str, str]], phase: str) -> None:
    conn.executemany("INSERT OR REPLACE INTO store_journal (collection_id, path, content_hash, phase) VALUES (?, ?, ?, ?)",
                     [(collection_id, path, digest, phase) for path, digest in entries])


def journal_entries(conn: sqlite3.Connection, collection_id: int) -> list[tuple[str, str, str]]:
    return [(r[0], r[1], r[2]) for r in conn.execute(
        "SELECT path, content_hash, phase FROM store_journal WHERE collection_id = ? ORDER BY path", (collection_id,))]


def journal_clear(conn: sqlite3.Connection, collection_id: int, paths: list[str]) -> None:
    conn.executemany("DELETE FROM store_journal WHERE collection_id = ? AND path = ?", [(collection_id, p) for p in paths])
