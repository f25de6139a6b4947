"""What outlives a session: chats, answers (with mode, collection version, adapter, timings), feedback
votes, corrections, promotions and tuning runs, in the workspace's ``ragtune.db`` under the ``serving`` migration namespace."""

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


def _m003_corrections(conn: sqlite3.Connection) -> None:
    # One correction per answer (a later one replaces it). The question, mode, adapter, collection and
    # its version are copied from the answer, and ``sources_json`` keeps the exact sources the answer saw
    # (text included) with each document's content hash then, so an export can rebuild the prompt and
    # flag feedback whose document has changed since.
    run_script(conn, """
        CREATE TABLE corrections (
            id INTEGER PRIMARY KEY,
            message_id INTEGER NOT NULL UNIQUE REFERENCES messages(id) ON DELETE CASCADE,
            question TEXT NOT NULL,
            mode TEXT NOT NULL,
            adapter TEXT,
            collection TEXT,
            collection_version INTEGER,
            answer TEXT NOT NULL,
            correction TEXT NOT NULL,
            source_n INTEGER,
            not_in_sources INTEGER NOT NULL DEFAULT 0,
            sources_json TEXT NOT NULL DEFAULT '[]',
            doc_hashes_json TEXT NOT NULL DEFAULT '{}',
            created_at REAL NOT NULL
        )
    """)


def _m004_promotions(conn: sqlite3.Connection) -> None:
    # Append-only history of each collection's current adapter (serving.promotion replays it).
    run_script(conn, """
        CREATE TABLE promotions (
            id INTEGER PRIMARY KEY,
            collection TEXT NOT NULL,
            action TEXT NOT NULL CHECK (action IN ('promote', 'rollback')),
            adapter TEXT,
            forced INTEGER NOT NULL DEFAULT 0,
            actor TEXT NOT NULL DEFAULT '',
            evidence_json TEXT NOT NULL DEFAULT '{}',
            created_at REAL NOT NULL
        );
        CREATE INDEX promotions_collection ON promotions(collection, id)
    """)


def _question_of(conn: sqlite3.Connection, chat_id: int, message_id: int) -> str:
    """The question an answer replies to: the user message before it in its chat."""
    q = conn.execute("SELECT content FROM messages WHERE chat_id = ? AND role = 'user' AND id < ? ORDER BY id DESC LIMIT 1",
                     (chat_id, message_id)).fetchone()
    return q[0] if q else ""


MIGRATIONS = [
    ("chats, messages, feedback", _m001_chats),
    ("tuning runs started from the app", _m002_tuning_runs),
    ("corrections of answers", _m003_corrections),
    ("promoted adapters per collection", _m004_promotions),
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

    # --- corrections (issue 13) --------------------------------------------------------------
    def answer_row(self, message_id: int) -> dict[str, Any] | None:
        """The stored answer ``message_id`` with its question (the user message before it in its chat)."""
        row = self.conn.execute("SELECT * FROM messages WHERE id = ? AND role = 'assistant'", (message_id,)).fetchone()
        if row is None:
            return None
        d = dict(row)
        d["question"] = _question_of(self.conn, d["chat_id"], message_id)
        for key in ("sources_json", "cited_json", "timings_json"):
            d[key[:-5]] = json.loads(d.pop(key))
        return d

    def add_correction(self, message_id: int, correction: str, source_n: int | None, not_in_sources: bool,
                       doc_hashes: dict[str, str | None]) -> int:
        """Store (or replace) the correction of answer ``message_id``; copies the question, mode, adapter,
        collection version and the sources the answer saw from the stored answer, in one transaction."""
        with db.transaction(self.conn) as conn:
            row = conn.execute("SELECT * FROM messages WHERE id = ? AND role = 'assistant'", (message_id,)).fetchone()
            if row is None:
                raise ValueError(f"no answer with id {message_id} to correct")
            question = _question_of(conn, row["chat_id"], message_id)
            conn.execute(
                "INSERT INTO corrections (message_id, question, mode, adapter, collection, collection_version, answer, "
                "correction, source_n, not_in_sources, sources_json, doc_hashes_json, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(message_id) DO UPDATE SET "
                "correction = excluded.correction, source_n = excluded.source_n, not_in_sources = excluded.not_in_sources, "
                "doc_hashes_json = excluded.doc_hashes_json, created_at = excluded.created_at",
                (message_id, question, row["mode"], row["adapter"], row["collection"], row["collection_version"],
                 row["content"], correction, source_n, int(not_in_sources), row["sources_json"], json.dumps(doc_hashes, sort_keys=True),
                 time.time()))
            return int(conn.execute("SELECT id FROM corrections WHERE message_id = ?", (message_id,)).fetchone()[0])

    def corrections(self, collection: str | None = None) -> list[dict[str, Any]]:
        """Corrections, oldest first; with ``collection``, those on answers from it (and closed-book answers
        have no collection: they are included only when ``collection`` is None)."""
        sql = "SELECT * FROM corrections" + (" WHERE collection = ?" if collection else "") + " ORDER BY id"
        out = []
        for r in self.conn.execute(sql, (collection,) if collection else ()).fetchall():
            d = dict(r)
            d["sources"] = json.loads(d.pop("sources_json"))
            d["doc_hashes"] = json.loads(d.pop("doc_hashes_json"))
            out.append(d)
        return out

    def thumbs_up(self, collection: str | None = None) -> list[dict[str, Any]]:
        """Answers voted up (with their question and sources), oldest vote first."""
        sql = ("SELECT f.id AS feedback_id, m.id AS message_id FROM feedback f JOIN messages m ON m.id = f.message_id "
               "WHERE f.vote = 1 AND m.refused = 0" + (" AND m.collection = ?" if collection else "") + " ORDER BY f.id")
        rows = self.conn.execute(sql, (collection,) if collection else ()).fetchall()
        out = []
        for r in rows:
            d = self.answer_row(r["message_id"])
            if d is not None:
                d["feedback_id"] = r["feedback_id"]
                out.append(d)
        return out

    # --- promotions (serving.promotion) -------------------------------------------------------
    def add_promotion(self, collection: str, action: str, adapter: str | None, forced: bool, actor: str,
                      evidence: dict[str, Any]) -> int:
        with db.transaction(self.conn) as conn:
            return int(conn.execute(
                "INSERT INTO promotions (collection, action, adapter, forced, actor, evidence_json, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)", (collection, action, adapter, int(forced), actor,
                                                 json.dumps(evidence, default=str), time.time())).lastrowid)

    def promotions(self, collection: str) -> list[dict[str, Any]]:
        rows = self.conn.execute("SELECT * FROM promotions WHERE collection = ? ORDER BY id", (collection,)).fetchall()
        out = []
        for r in rows:
            d = dict(r)
            d["evidence"] = json.loads(d.pop("evidence_json"))
            d["forced"] = bool(d["forced"])
            out.append(d)
        return out

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
