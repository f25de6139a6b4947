"""SQLite for every layer: connections, explicit transactions and numbered, append-only migrations.

Each layer keeps its own list of migrations under its own namespace (``rag``: collections and
documents; ``serving``: chats and feedback; ``ab``: A/B runs and votes), all in one
``_migrations`` table, so nothing below has to know the tables of the layers above it. The
runner is tested on ``:memory:`` (tests/test_core_db.py).
"""

from __future__ import annotations

import os
import sqlite3
import time
from typing import Callable

Migration = Callable[[sqlite3.Connection], None]

BUSY_TIMEOUT_S = 60


def run_script(conn: sqlite3.Connection, sql: str) -> None:
    """Run ``;``-separated statements inside the current transaction (``executescript`` would
    commit it). Migrations must not use ``;`` inside a statement."""
    for statement in sql.split(";"):
        if statement.strip():
            conn.execute(statement)


def migrate(conn: sqlite3.Connection, migrations: list[tuple[str, Migration]], namespace: str) -> list[int]:
    """Apply the migrations of ``namespace`` not applied yet, each in its own transaction.

    Migration ``n`` is ``migrations[n - 1]``; the list is append-only. Returns the numbers applied
    now. Safe when several processes open the same database at once: each step re-checks under the
    write lock whether another process applied it meanwhile.
    """
    conn.execute("CREATE TABLE IF NOT EXISTS _migrations (namespace TEXT NOT NULL, id INTEGER NOT NULL, "
                 "name TEXT NOT NULL, applied_at REAL NOT NULL, PRIMARY KEY (namespace, id))")
    done = {row[0] for row in conn.execute("SELECT id FROM _migrations WHERE namespace = ?", (namespace,))}
    newer = [n for n in done if n > len(migrations)]
    if newer:
        raise sqlite3.DatabaseError(
            f"the database has {namespace} migration {max(newer)} but this ragtune knows only {len(migrations)}; "
            "upgrade ragtune (the database was written by a newer version)")
    applied = []
    for number, (name, step) in enumerate(migrations, start=1):
        if number in done:
            continue
        conn.execute("BEGIN IMMEDIATE")
        try:
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
    """A connection in autocommit mode (transactions are explicit), WAL, foreign keys on, rows as
    ``sqlite3.Row``, and a busy timeout so a second writer waits instead of failing."""
    conn = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_S * 1000}")
    if str(path) != ":memory:":
        _set_wal(conn)
        conn.execute("PRAGMA synchronous = NORMAL")
    return conn


def _set_wal(conn: sqlite3.Connection) -> None:
    """Switch a file database to WAL. The switch needs the exclusive lock, and when two processes
    open the same new file at once, SQLite answers one of them "database is locked" at once,
    without waiting on the busy timeout (it would otherwise deadlock on the lock upgrade), so the
    loser retries until the winner is done, within the busy timeout."""
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    delay = 0.005
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.2)


class transaction:
    """``with transaction(conn): ...`` -> BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any exception.

    IMMEDIATE takes the write lock at the start, so a check-then-insert inside the block cannot
    race another process (the other waits up to the busy timeout)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type, exc, tb) -> None:
        self.conn.execute("ROLLBACK" if exc_type else "COMMIT")
