"""A/B storage: runs, cached answers and arena votes in the workspace's ``ragtune.db``.

An answer is cached under a key made of everything that decides it: the question, the arm, the
adapter (name + manifest hash), the collection version, the base model and a hash of the prompt
templates and serving config. A run links question x arm to cached answers, so re-running a run (or
another run with the same settings) only computes what is missing.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from typing import Any

from core import db
from core.names import check_name

NAMESPACE = "ab"


def _m001_ab(conn: sqlite3.Connection) -> None:
    db.run_script(conn, """
        CREATE TABLE ab_cache (
            key TEXT PRIMARY KEY,
            arm TEXT NOT NULL,
            question TEXT NOT NULL,
            answer TEXT NOT NULL,
            payload_json TEXT NOT NULL,
            created_at REAL NOT NULL
        );
        CREATE TABLE ab_runs (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            config_json TEXT NOT NULL,
            created_at REAL NOT NULL,
            finished_at REAL
        );
        CREATE TABLE ab_results (
            run_id INTEGER NOT NULL REFERENCES ab_runs(id) ON DELETE CASCADE,
            question_id TEXT NOT NULL,
            arm TEXT NOT NULL,
            cache_key TEXT NOT NULL REFERENCES ab_cache(key),
            row_json TEXT NOT NULL,
            PRIMARY KEY (run_id, question_id, arm)
        );
        CREATE TABLE arena_votes (
            id INTEGER PRIMARY KEY,
            question TEXT NOT NULL,
            arm_a TEXT NOT NULL,
            arm_b TEXT NOT NULL,
            answer_a TEXT NOT NULL,
            answer_b TEXT NOT NULL,
            outcome TEXT NOT NULL CHECK (outcome IN ('a', 'b', 'tie', 'both_bad')),
            collection TEXT,
            adapter TEXT,
            created_at REAL NOT NULL
        )
    """)


MIGRATIONS = [("ab runs, answer cache, arena votes", _m001_ab)]


def cache_key(**parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


class ABStore:
    def __init__(self, db_path: str | os.PathLike) -> None:
        self.db_path = str(db_path)
        self._local = threading.local()

    @property
    def conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = db.connect(self.db_path)
            db.migrate(conn, MIGRATIONS, namespace=NAMESPACE)
        return conn

    # --- runs ---------------------------------------------------------------------------------
    def open_run(self, name: str, config: dict[str, Any]) -> int:
        """The id of run ``name``, created if new. Two processes opening the same new name at once are
        ordered by the write lock (BEGIN IMMEDIATE): the second waits and gets the run the first made."""
        check_name(name, "A/B run name")
        with db.transaction(self.conn) as conn:
            row = conn.execute("SELECT id FROM ab_runs WHERE name = ?", (name,)).fetchone()
            if row is not None:
                return int(row["id"])
            return int(conn.execute("INSERT INTO ab_runs (name, config_json, created_at) VALUES (?, ?, ?)",
                                    (name, json.dumps(config), time.time())).lastrowid)

    def finish_run(self, run_id: int) -> None:
        with db.transaction(self.conn) as conn:
            conn.execute("UPDATE ab_runs SET finished_at = ? WHERE id = ?", (time.time(), run_id))

    def runs(self) -> list[dict[str, Any]]:
        rows = self.conn.execute(
            "SELECT r.id, r.name, r.config_json, r.created_at, r.finished_at, COUNT(x.question_id) AS answers "
            "FROM ab_runs r LEFT JOIN ab_results x ON x.run_id = r.id GROUP BY r.id ORDER BY r.created_at DESC").fetchall()
        return [{"id": r["id"], "name": r["name"], "config": json.loads(r["config_json"]), "created_at": r["created_at"],
                 "finished_at": r["finished_at"], "answers": r["answers"]} for r in rows]

    def run(self, name: str) -> dict[str, Any] | None:
        return next((r for r in self.runs() if r["name"] == name), None)

    def cached(self, key: str) -> dict[str, Any] | None:
        row = self.conn.execute("SELECT payload_json FROM ab_cache WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def put(self, run_id: int, question_id: str, arm: str, key: str, payload: dict[str, Any] | None,
            row: dict[str, Any]) -> None:
        """Store a fresh answer (``payload``) in the cache and link it to the run, in one transaction."""
        with db.transaction(self.conn) as conn:
            if payload is not None:
                conn.execute("INSERT OR REPLACE INTO ab_cache (key, arm, question, answer, payload_json, created_at) "
                             "VALUES (?, ?, ?, ?, ?, ?)", (key, arm, row["question"], payload["text"],
                                                           json.dumps(payload), time.time()))
            conn.execute("INSERT OR REPLACE INTO ab_results (run_id, question_id, arm, cache_key, row_json) VALUES (?, ?, ?, ?, ?)",
                         (run_id, question_id, arm, key, json.dumps(row)))

    def results(self, run_id: int) -> list[dict[str, Any]]:
        rows = self.conn.execute(
            "SELECT x.question_id, x.arm, x.row_json, c.payload_json FROM ab_results x JOIN ab_cache c ON c.key = x.cache_key "
            "WHERE x.run_id = ? ORDER BY x.question_id, x.arm", (run_id,)).fetchall()
        return [{"question_id": r[0], "arm": r[1], "row": json.loads(r[2]), "answer": json.loads(r[3])} for r in rows]

    # --- arena --------------------------------------------------------------------------------
    def add_vote(self, question: str, arm_a: str, arm_b: str, answer_a: str, answer_b: str, outcome: str,
                 collection: str | None = None, adapter: str | None = None) -> int:
        if outcome not in ("a", "b", "tie", "both_bad"):
            raise ValueError(f"vote {outcome!r}: use a, b, tie or both_bad")
        with db.transaction(self.conn) as conn:
            return int(conn.execute(
                "INSERT INTO arena_votes (question, arm_a, arm_b, answer_a, answer_b, outcome, collection, adapter, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (question, arm_a, arm_b, answer_a, answer_b, outcome, collection, adapter, time.time())).lastrowid)

    def votes(self) -> list[tuple[str, str, str]]:
        return [(r[0], r[1], r[2]) for r in self.conn.execute("SELECT arm_a, arm_b, outcome FROM arena_votes ORDER BY id")]

    def vote_rows(self, collection: str | None = None) -> list[dict[str, Any]]:
        """Every arena vote with its question and both answers, oldest first (serving.feedback turns the
        ones with a winner into preference pairs)."""
        sql = "SELECT * FROM arena_votes" + (" WHERE collection = ?" if collection else "") + " ORDER BY id"
        return [dict(r) for r in self.conn.execute(sql, (collection,) if collection else ()).fetchall()]
