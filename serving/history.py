"""What outlives a session: chats, answers (with mode, collection version, adapter, timings), feedback
votes and tuning runs, in the workspace's ``ragtune.db`` under the ``serving`` migration namespace."""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from typing import Any

from core import db
from core.db import run_script


def _m001_chats(conn: sqlite3.Connection) -> None:
    run_script(conn, """
        CREATE TABLE chats (
            id INTEGER PRIMARY KEY,
            title TEXT NOT NULL,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL
        );
        CREATE TABLE messages (
            id INTEGER PRIMARY KEY,
            chat_id INTEGER NOT NULL REFERENCES chats(id) ON DELETE CASCADE,
            role TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
            content TEXT NOT NULL,
            mode TEXT,
            collection TEXT,
            collection_version INTEGER,
            adapter TEXT,
            base_model TEXT,
            retrieval_query TEXT,
            sources_json TEXT NOT NULL DEFAULT '[]',
            cited_json TEXT NOT NULL DEFAULT '[]',
            timings_json TEXT NOT NULL DEFAULT '{}',
            latency_s REAL,
            refused INTEGER NOT NULL DEFAULT 0,
            created_at REAL NOT NULL
        );
        CREATE INDEX messages_chat ON messages(chat_id, id);
        CREATE TABLE feedback (
            id INTEGER PRIMARY KEY,
            message_id INTEGER NOT NULL UNIQUE REFERENCES messages(id) ON DELETE CASCADE,
            vote INTEGER NOT NULL CHECK (vote IN (-1, 1)),
            comment TEXT NOT NULL DEFAULT '',
            created_at REAL NOT NULL
        )
    """)


def _m002_tuning_runs(conn: sqlite3.Connection) -> None:
    run_script(conn, """
        CREATE TABLE tuning_runs (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL,
            config_path TEXT,
            overrides_json TEXT NOT NULL DEFAULT '[]',
            pid INTEGER,
            status TEXT NOT NULL CHECK (status IN ('running', 'done', 'failed', 'stopped')),
            returncode INTEGER,
            output_path TEXT,
            started_at REAL NOT NULL,
            ended_at REAL
        )
    """)


MIGRATIONS = [
    ("chats, messages, feedback", _m001_chats),
    ("tuning runs started from the app", _m002_tuning_runs),
]
NAMESPACE = "serving"


class ChatStore:
    """Chats, messages, feedback and tuning runs. One SQLite connection per thread (Streamlit serves
    sessions from several threads); safe to share through ``st.cache_resource``."""

    def __init__(self, db_path: str | os.PathLike) -> None:
        self.db_path = str(db_path)
        self._local = threading.local()
        _ = self.conn  # migrate now so errors surface at open

    @property
    def conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = db.connect(self.db_path)
            db.migrate(conn, MIGRATIONS, namespace=NAMESPACE)
            self._local.conn = conn
        return conn

    # --- chats --------------------------------------------------------------------------------
    def new_chat(self, title: str) -> int:
        now = time.time()
        with db.transaction(self.conn) as conn:
            return int(conn.execute("INSERT INTO chats (title, created_at, updated_at) VALUES (?, ?, ?)",
                                    (title.strip()[:80] or "chat", now, now)).lastrowid)

    def chats(self, limit: int = 50) -> list[dict[str, Any]]:
        rows = self.conn.execute(
            "SELECT c.id, c.title, c.created_at, c.updated_at, COUNT(m.id) AS messages FROM chats c "
            "LEFT JOIN messages m ON m.chat_id = c.id GROUP BY c.id ORDER BY c.updated_at DESC LIMIT ?", (limit,))
        return [dict(r) for r in rows]

    def delete_chat(self, chat_id: int) -> None:
        with db.transaction(self.conn) as conn:
            conn.execute("DELETE FROM chats WHERE id = ?", (chat_id,))

    def log_exchange(self, chat_id: int, question: str, answer: Any) -> tuple[int, int]:
        """Store a question and its :class:`serving.assistant.Answer`; returns (question id, answer id)."""
        now = time.time()
        timings = dict(answer.timings)
        with db.transaction(self.conn) as conn:
            if conn.execute("SELECT 1 FROM chats WHERE id = ?", (chat_id,)).fetchone() is None:
                raise ValueError(f"no chat {chat_id}; start a new chat")
            q_id = conn.execute(
                "INSERT INTO messages (chat_id, role, content, mode, collection, adapter, created_at) "
                "VALUES (?, 'user', ?, ?, ?, ?, ?)", (chat_id, question, answer.mode, answer.collection, answer.adapter, now)).lastrowid
            a_id = conn.execute(
                "INSERT INTO messages (chat_id, role, content, mode, collection, collection_version, adapter, base_model, "
                "retrieval_query, sources_json, cited_json, timings_json, latency_s, refused, created_at) "
                "VALUES (?, 'assistant', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (chat_id, answer.text, answer.mode, answer.collection, answer.collection_version, answer.adapter,
                 answer.base_model, answer.retrieval_query, json.dumps([s.to_dict() for s in answer.sources]),
                 json.dumps(answer.cited), json.dumps(timings), timings.get("total_s"), int(answer.refused), now)).lastrowid
            conn.execute("UPDATE chats SET updated_at = ? WHERE id = ?", (now, chat_id))
        return int(q_id), int(a_id)

    def messages(self, chat_id: int) -> list[dict[str, Any]]:
        rows = self.conn.execute(
            "SELECT m.*, f.vote FROM messages m LEFT JOIN feedback f ON f.message_id = m.id "
            "WHERE m.chat_id = ? ORDER BY m.id", (chat_id,)).fetchall()
        out = []
        for r in rows:
            d = dict(r)
            for key in ("sources_json", "cited_json", "timings_json"):
                d[key[:-5]] = json.loads(d.pop(key))
            out.append(d)
        return out

    # --- feedback -----------------------------------------------------------------------------
    def set_feedback(self, message_id: int, vote: int, comment: str = "") -> None:
        if vote not in (-1, 1):
            raise ValueError("vote must be 1 (thumbs up) or -1 (thumbs down)")
        with db.transaction(self.conn) as conn:
            row = conn.execute("SELECT role FROM messages WHERE id = ?", (message_id,)).fetchone()
            if row is None or row[0] != "assistant":
                raise ValueError(f"no answer with id {message_id} to vote on")
            conn.execute("INSERT INTO feedback (message_id, vote, comment, created_at) VALUES (?, ?, ?, ?) "
                         "ON CONFLICT(message_id) DO UPDATE SET vote = excluded.vote, comment = excluded.comment, "
                         "created_at = excluded.created_at", (message_id, vote, comment, time.time()))

    def feedback_summary(self) -> list[dict[str, Any]]:
        """Votes per (mode, adapter): the online signal next to offline A/B results."""
        rows = self.conn.execute(
            "SELECT m.mode, COALESCE(m.adapter, '') AS adapter, SUM(f.vote = 1) AS up, SUM(f.vote = -1) AS down "
            "FROM feedback f JOIN messages m ON m.id = f.message_id GROUP BY m.mode, m.adapter ORDER BY m.mode")
        return [dict(r) for r in rows]

    # --- tuning runs --------------------------------------------------------------------------
    def add_run(self, name: str, config_path: str | None, overrides: list[str], pid: int, output_path: str) -> int:
        with db.transaction(self.conn) as conn:
            return int(conn.execute(
                "INSERT INTO tuning_runs (name, config_path, overrides_json, pid, status, output_path, started_at) "
                "VALUES (?, ?, ?, ?, 'running', ?, ?)",
                (name, config_path, json.dumps(overrides), pid, output_path, time.time())).lastrowid)

    def finish_run(self, run_id: int, status: str, returncode: int | None) -> None:
        with db.transaction(self.conn) as conn:
            conn.execute("UPDATE tuning_runs SET status = ?, returncode = ?, ended_at = ? WHERE id = ? AND status = 'running'",
                         (status, returncode, time.time(), run_id))

    def runs(self, limit: int = 50) -> list[dict[str, Any]]:
        rows = self.conn.execute("SELECT * FROM tuning_runs ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
        return [dict(r) for r in rows]

    def run(self, run_id: int) -> dict[str, Any] | None:
        row = self.conn.execute("SELECT * FROM tuning_runs WHERE id = ?", (run_id,)).fetchone()
        return dict(row) if row else None


def open_store(home: str | os.PathLike | None = None) -> ChatStore:
    from core.workspace import Layout

    return ChatStore(Layout.open(home).db)
