"""Storage: one SQLite database per workspace, FAISS files per collection.

SQLite is the source of truth: documents (with their full text, so spans can be shown and a
collection re-embedded without the original files), chunks with their vectors, and one FTS5 table
per collection for BM25. The FAISS file is a fast copy of the stored vectors, named after the
collection's ``version`` (bumped in the same transaction as every change): it is written to a temp
name and renamed, and when the file for the current version is missing (a crash between commit and
write, or a newer write by another process) it is rebuilt from SQLite. So a kill at any moment
leaves a consistent store.

Schema changes are numbered, append-only migrations (tested on ``:memory:``).
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

Migration = Callable[[sqlite3.Connection], None]


def run_script(conn: sqlite3.Connection, sql: str) -> None:
    """Run ``;``-separated statements inside the current transaction (``executescript`` would
    commit it). Migrations must not use ``;`` inside a statement."""
    for statement in sql.split(";"):
        if statement.strip():
            conn.execute(statement)


def _m001_collections(conn: sqlite3.Connection) -> None:
    run_script(conn, 
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


MIGRATIONS: list[tuple[str, Migration]] = [
    ("collections, documents, chunks", _m001_collections),
]


def migrate(conn: sqlite3.Connection, migrations: list[tuple[str, Migration]] | None = None,
            namespace: str = "rag") -> list[int]:
    """Apply the migrations of ``namespace`` not applied yet, each in its own transaction.

    Each layer keeps its own numbered list (``rag`` here; ``serving`` adds chats, feedback and
    evaluation runs) so nothing below has to know the tables of the layers above it.
    Returns the numbers applied now.
    """
    migrations = MIGRATIONS if migrations is None else migrations
    conn.execute("CREATE TABLE IF NOT EXISTS _migrations (namespace TEXT NOT NULL, id INTEGER NOT NULL, "
                 "name TEXT NOT NULL, applied_at REAL NOT NULL, PRIMARY KEY (namespace, id))")
    done = {row[0] for row in conn.execute("SELECT id FROM _migrations WHERE namespace = ?", (namespace,))}
    applied = []
    for number, (name, step) in enumerate(migrations, start=1):
        if number in done:
            continue
        conn.execute("BEGIN IMMEDIATE")
        try:
            # another process may have migrated while we waited for the write lock
            if conn.execute("SELECT 1 FROM _migrations WHERE namespace = ? AND id = ?", (namespace, number)).fetchone():
                conn.execute("COMMIT")
                continue
            step(conn)
            conn.execute("INSERT INTO _migrations (namespace, id, name, applied_at) VALUES (?, ?, ?, ?)",
                         (namespace, number, name, time.time()))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        applied.append(number)
    return applied


def connect(path: str | os.PathLike) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit), WAL, foreign keys on."""
    conn = sqlite3.connect(str(path), timeout=60, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("PRAGMA busy_timeout = 60000")
    if str(path) != ":memory:":
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
    migrate(conn)
    return conn


class transaction:
    """``with transaction(conn): ...`` -> BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any exception."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type, exc, tb) -> None:
        self.conn.execute("ROLLBACK" if exc_type else "COMMIT")


def fts_table(collection_id: int) -> str:
    return f"fts_{int(collection_id)}"


def create_fts(conn: sqlite3.Connection, collection_id: int) -> None:
    conn.execute(
        f"CREATE VIRTUAL TABLE IF NOT EXISTS {fts_table(collection_id)} USING fts5("
        "text, content='chunks', content_rowid='id', tokenize='porter unicode61')"
    )


def drop_fts(conn: sqlite3.Connection, collection_id: int) -> None:
    conn.execute(f"DROP TABLE IF EXISTS {fts_table(collection_id)}")


def vector_to_blob(vector: np.ndarray) -> bytes:
    return np.ascontiguousarray(vector, dtype=np.float32).tobytes()


def blobs_to_matrix(blobs: Iterable[bytes], dimension: int) -> np.ndarray:
    data = b"".join(blobs)
    return np.frombuffer(data, dtype=np.float32).reshape(-1, dimension) if data else np.zeros((0, dimension), np.float32)


# --- FAISS files -----------------------------------------------------------------------------

def new_faiss_index(index_type: str, dimension: int):
    import faiss

    if index_type == "flat":
        base = faiss.IndexFlatIP(dimension)
    elif index_type == "hnsw":
        base = faiss.IndexHNSWFlat(dimension, 32, faiss.METRIC_INNER_PRODUCT)
        base.hnsw.efConstruction = 80
        base.hnsw.efSearch = 64
    else:
        raise ValueError(f"unknown index type {index_type!r}; use flat or hnsw")
    return faiss.IndexIDMap2(base)


def faiss_path(folder: Path, version: int) -> Path:
    return folder / f"index-v{version}.faiss"


def write_faiss(index, folder: Path, version: int) -> Path:
    """Write atomically (temp file + rename), then remove files of older versions."""
    import faiss

    folder.mkdir(parents=True, exist_ok=True)
    target = faiss_path(folder, version)
    fd, tmp = tempfile.mkstemp(prefix=".index-", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        faiss.write_index(index, tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    for old in folder.glob("index-v*.faiss"):
        if old != target:
            try:
                if int(old.stem.split("-v")[1]) < version:
                    old.unlink()
            except (ValueError, IndexError, FileNotFoundError):
                pass
    return target


def read_faiss(folder: Path, version: int):
    import faiss

    path = faiss_path(folder, version)
    if not path.exists():
        return None
    try:
        return faiss.read_index(str(path))
    except RuntimeError:
        return None  # a damaged file is rebuilt from SQLite
