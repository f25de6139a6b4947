"""Numbered, append-only migrations on an in-memory database."""

from __future__ import annotations

from rag import store


def test_migrations_apply_once_and_in_order():
    conn = store.connect(":memory:")
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"collections", "documents", "chunks", "_migrations"} <= tables
    assert store.migrate(conn) == []  # idempotent
    applied = [r[0] for r in conn.execute("SELECT id FROM _migrations WHERE namespace = 'rag' ORDER BY id")]
    assert applied == list(range(1, len(store.MIGRATIONS) + 1))


def test_an_appended_migration_runs_on_an_existing_database():
    conn = store.connect(":memory:")
    extra = store.MIGRATIONS + [("notes", lambda c: c.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY)"))]
    assert store.migrate(conn, extra) == [len(extra)]
    assert conn.execute("SELECT name FROM sqlite_master WHERE name='notes'").fetchone()


def test_a_failing_migration_leaves_nothing_half_done():
    conn = store.connect(":memory:")

    def broken(c):
        c.execute("CREATE TABLE half (id INTEGER)")
        raise RuntimeError("boom")

    try:
        store.migrate(conn, store.MIGRATIONS + [("broken", broken)])
    except RuntimeError:
        pass
    assert conn.execute("SELECT name FROM sqlite_master WHERE name='half'").fetchone() is None
    assert conn.execute("SELECT COUNT(*) FROM _migrations").fetchone()[0] == len(store.MIGRATIONS)


def test_layers_number_their_migrations_independently():
    conn = store.connect(":memory:")
    upper = [("chats", lambda c: c.execute("CREATE TABLE chats (id INTEGER PRIMARY KEY)"))]
    assert store.migrate(conn, upper, namespace="serving") == [1]
    assert store.migrate(conn, upper, namespace="serving") == []
    assert store.migrate(conn) == []
