"""Evidence first: the sentences of the retrieved chunks ranked against the question, best first.

A 135M model reads the first lines of its prompt far better than the rest, and four 128-token chunks
hold one answer sentence among ~25. :func:`rank_sentences` splits each retrieved chunk into sentences
(lines of tables and lists count as sentences), scores each by a convex mix of

- the cosine between the question and the sentence, with the collection's own embedder (the MiniLM
  already loaded for retrieval; each text embedded once per process, :class:`SentenceVectors`, and kept
  on the collection's disk for the next process, :class:`StoredVectors`), and
- BM25 of the sentence for the question, from SQLite FTS5 over the sentences (an in-memory table, the
  same scorer and query rule retrieval uses: :func:`rag.search.fts_query`),

each min-max normalised over the candidates (the fusion rule retrieval measured best). The
:func:`evidence_sources` that go into the prompt are the best ``n`` sentences, each widened to its
neighbours up to ``window_tokens``, as :class:`rag.search.Hit`-like objects with exact
``start``/``end`` offsets in their document, so citations and highlights stay exact.

:func:`support_score` is the abstain score: how well the best sentence supports the question, on an
absolute scale (raw cosine and the share of the question's terms the sentence holds), so that one
threshold, tuned on a dev split, applies to every question.
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
import warnings
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from core import db
from rag.chunking import split_sentences
from rag.search import Hit


@dataclass
class Sentence:
    hit_index: int  # which retrieved hit it comes from
    start: int  # offsets in the hit's text
    end: int
    text: str
    cosine: float = 0.0
    bm25: float = 0.0
    score: float = 0.0
    coverage: float = 0.0  # share of the question's terms found in the sentence


SENTENCE_BATCH = 8  # misses embedded in batches of 8, not sentence-transformers' 32 (see SentenceVectors)
SENTENCE_CACHE = 20_000  # vectors kept per embedder (~30 MB for MiniLM's 384 floats)
STORED_SENTENCES = 200_000  # vectors a collection keeps on disk (~330 MB for MiniLM), oldest dropped first
STORE_FILE = "sentence_vectors.sqlite"
STORE_BUSY_MS = 500  # a write that finds another process writing waits this long, then is skipped
# the store's schema, as core.db's append-only migrations (namespace "sentence_vectors")
_STORE_MIGRATIONS = [("vectors", lambda conn: db.run_script(conn, """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE vectors (digest BLOB NOT NULL UNIQUE, vector BLOB NOT NULL)"""))]


class SentenceVectors:
    """``embed`` for :func:`rank_sentences`: the embedder's normalised vectors, each text embedded once and
    kept (least recently used goes first past ``size``), so a sentence met again is not embedded again: the
    rag and rag+ft arms of one A/B question, the arena's two answers, the next question on the same chunks.
    Misses go in batches of :data:`SENTENCE_BATCH`: ~22 short sentences of four chunks, sorted by length, pad
    to their batch's longest, so smaller batches pad less (per question on a 2-core AVX2 EPYC: 462 ms at 32,
    367 ms at 8, ``serve_bench.py --only ttft``; the same order of sentences on 24 dev questions)."""

    def __init__(self, embedder: Any, size: int = SENTENCE_CACHE) -> None:
        self.embedder = embedder
        self.size = size
        self._vectors: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    def __call__(self, texts: Sequence[str], store: "StoredVectors | None" = None, transient: Sequence[str] = ()) -> Any:
        """Vectors of ``texts``: kept ones first, then ``store``'s (a collection's vectors on disk), then the
        embedder for the rest, which go into ``store`` too unless ``transient`` (a question: met once)."""
        found: dict[str, Any] = {}
        with self._lock:
            for text in texts:
                if text in self._vectors:
                    self._vectors.move_to_end(text)
                    found[text] = self._vectors[text]
        missing = [t for t in dict.fromkeys(texts) if t not in found]
        stored = store.get(missing) if store is not None and missing else {}
        missing = [t for t in missing if t not in stored]
        fresh = dict(zip(missing, self.embedder.embed_batch(missing, batch_size=SENTENCE_BATCH))) if missing else {}
        if store is not None and fresh:
            store.put({t: v for t, v in fresh.items() if t not in transient})
        if stored or fresh:
            with self._lock:
                for text, vector in (*stored.items(), *fresh.items()):
                    found[text] = self._vectors[text] = vector
                while len(self._vectors) > self.size:
                    self._vectors.popitem(last=False)
        return np.stack([found[t] for t in texts])


class StoredVectors:
    """A collection's sentence vectors on disk (``<collection folder>/sentence_vectors.sqlite``), so that a new
    process (the app after a restart, ``ragtune ask``, an A/B run) does not embed again the sentences of
    chunks an earlier one ranked: ``ragtune tune-ranker``, which ranks every training question's chunks,
    fills it for most of a collection. Keyed by the SHA-256 of the sentence's text, for one embedding model
    (a store written by another model is emptied when opened: the collection was reindexed). A cache, never
    a source of truth: a locked database skips the write, a damaged one is set aside with a warning naming
    the file, and the answer is ranked from fresh vectors either way. At most ``limit`` vectors (float32,
    1.5 kB each for MiniLM), the oldest dropped first."""

    def __init__(self, path: str | Path, model: str, dimension: int, limit: int = STORED_SENTENCES) -> None:
        self.path, self.model, self.dimension, self.limit = Path(path), model, int(dimension), limit
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._broken = False
        self._writes = 0

    def _open(self) -> sqlite3.Connection | None:
        if self._conn is None and not self._broken:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                conn = db.connect(self.path)
                conn.execute(f"PRAGMA busy_timeout = {STORE_BUSY_MS}")  # a cache: never hold an answer up for long
                db.migrate(conn, _STORE_MIGRATIONS, "sentence_vectors")
                meta = {row["key"]: row["value"] for row in conn.execute("SELECT key, value FROM meta")}
                if meta != {"model": self.model, "dimension": str(self.dimension)}:  # new, or another embedder
                    with db.transaction(conn):
                        conn.execute("DELETE FROM vectors")
                        conn.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                                         [("model", self.model), ("dimension", str(self.dimension))])
                self._conn = conn
            except sqlite3.OperationalError as exc:  # locked by another writer for now: try again next time
                if "locked" not in str(exc):
                    self._set_aside(exc)
            except sqlite3.DatabaseError as exc:
                self._set_aside(exc)
        return self._conn

    def _set_aside(self, exc: Exception) -> None:
        self._broken = True
        self._conn = None
        warnings.warn(f"{self.path}: sentence vector store unreadable ({exc}); sentences are embedded afresh. "
                      f"Delete the file to rebuild it (it is only a cache)", stacklevel=3)

    @staticmethod
    def _digest(text: str) -> bytes:
        return hashlib.sha256(text.encode("utf-8")).digest()

    def get(self, texts: Sequence[str]) -> dict[str, Any]:
        """The stored vectors of those of ``texts`` that have one."""
        with self._lock:
            conn = self._open()
            if conn is None:
                return {}
            by_digest = {self._digest(t): t for t in texts}
            digests = list(by_digest)
            found: dict[str, Any] = {}
            try:
                for start in range(0, len(digests), 500):
                    keys = digests[start:start + 500]
                    rows = conn.execute(f"SELECT digest, vector FROM vectors WHERE digest IN ({','.join('?' * len(keys))})", keys)
                    for digest, blob in rows:
                        if len(blob) == 4 * self.dimension:  # a row of another length is ignored (and re-embedded)
                            found[by_digest[bytes(digest)]] = np.frombuffer(blob, dtype=np.float32).copy()
            except sqlite3.OperationalError:
                return {}
            except sqlite3.DatabaseError as exc:
                self._set_aside(exc)
                return {}
            return found

    def put(self, vectors: dict[str, Any]) -> None:
        """Keep ``vectors`` (text -> vector); skipped when another process holds the write lock."""
        with self._lock:
            conn = self._open()
            if conn is None or not vectors:
                return
            rows = [(self._digest(t), np.asarray(v, dtype=np.float32).tobytes()) for t, v in vectors.items()]
            try:
                with db.transaction(conn):
                    conn.executemany("INSERT OR IGNORE INTO vectors (digest, vector) VALUES (?, ?)", rows)
                    self._writes += 1
                    if self._writes % 50 == 1:  # the bound, checked now and then (a count is a scan)
                        over = conn.execute("SELECT COUNT(*) FROM vectors").fetchone()[0] - self.limit
                        if over > 0:
                            conn.execute("DELETE FROM vectors WHERE rowid IN (SELECT rowid FROM vectors ORDER BY rowid LIMIT ?)",
                                         (over + self.limit // 10,))
            except sqlite3.OperationalError:
                pass  # locked: another process writes; this cache entry waits for the next miss
            except sqlite3.DatabaseError as exc:
                self._set_aside(exc)

    def count(self) -> int:
        with self._lock:
            conn = self._open()
            return conn.execute("SELECT COUNT(*) FROM vectors").fetchone()[0] if conn is not None else 0

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


_sentence_vectors: "weakref.WeakKeyDictionary[Any, SentenceVectors]" = weakref.WeakKeyDictionary()
_sentence_lock = threading.Lock()


def sentence_vectors(embedder: Any) -> SentenceVectors:
    """The one :class:`SentenceVectors` of ``embedder`` in this process (a tuned embedder has its own)."""
    with _sentence_lock:
        cached = _sentence_vectors.get(embedder)
        if cached is None:
            cached = _sentence_vectors[embedder] = SentenceVectors(embedder)
        return cached


def search_keeping_query(col, query: str, k: int, mode: str) -> list[Any]:
    """``col.search(query)`` with the query embedded through the embedder's :class:`SentenceVectors` (kept in
    memory, never stored), so the evidence step that next ranks sentences against the same text finds its
    vector instead of embedding it a second time."""
    vector = sentence_vectors(col.embedder)([query])[0] if mode != "bm25" else None
    return col.search(query, k=k, mode=mode, query_vector=vector)


_stores: dict[str, StoredVectors] = {}


def stored_vectors(col) -> StoredVectors:
    """The one :class:`StoredVectors` of collection ``col`` in this process."""
    path = str(Path(col.folder) / STORE_FILE)
    with _sentence_lock:
        store = _stores.get(path)
        if store is None or store.model != col.config.embedding_model:  # a reused folder, another embedder
            if store is not None:
                store.close()
            store = _stores[path] = StoredVectors(path, col.config.embedding_model, col.embedder.dimension)
        return store


def _bm25(question: str, texts: Sequence[str]) -> list[float]:
    """BM25 of each text for the question (higher = better; 0 when no term matches)."""
    from rag.search import fts_query

    query = fts_query(question)
    scores = [0.0] * len(texts)
    if not query or not texts:
        return scores
    conn = sqlite3.connect(":memory:")
    try:
        conn.execute("CREATE VIRTUAL TABLE s USING fts5(text, tokenize='porter unicode61')")
        conn.executemany("INSERT INTO s(rowid, text) VALUES (?, ?)", [(i + 1, t) for i, t in enumerate(texts)])
        for rowid, score in conn.execute("SELECT rowid, bm25(s) FROM s WHERE s MATCH ?", (query,)):
            scores[rowid - 1] = -float(score)  # FTS5's bm25() is lower-is-better
    finally:
        conn.close()
    return scores


def _terms(text: str) -> set[str]:
    from rag.search import query_terms

    return set(query_terms(text))


def _minmax(values: list[float]) -> list[float]:
    if not values:
        return []
    low, high = min(values), max(values)
    return [(v - low) / (high - low) if high > low else 1.0 for v in values]


def is_question(text: str) -> bool:
    return text.rstrip().rstrip("\"')»”").endswith("?")


def rank_sentences(question: str, hits: Sequence[Any], embed: Callable[[list[str]], Any],
                   dense_weight: float = 0.5, skip_questions: bool = False) -> list[Sentence]:
    """Every sentence of ``hits`` scored against ``question``, best first.

    ``embed`` maps a list of texts to normalised vectors (``embedder.embed_batch``); the question is
    embedded in the same batch. ``skip_questions``: a sentence that is itself a question (an FAQ heading)
    matches a question best and answers it never; it hands its score to the sentence right after it in its
    chunk when that one is not a question (the FAQ's answer), and ranks after every other sentence."""
    sentences = [Sentence(h_i, a, b, hit.text[a:b]) for h_i, hit in enumerate(hits) for a, b in split_sentences(hit.text)]
    if not sentences:
        return []
    vectors = embed([question] + [s.text for s in sentences])
    q = vectors[0]
    bm25 = _bm25(question, [s.text for s in sentences])
    q_terms = _terms(question)
    for s, v, b in zip(sentences, vectors[1:], bm25):
        s.cosine, s.bm25 = float(v @ q), b
        s.coverage = len(q_terms & _terms(s.text)) / len(q_terms) if q_terms else 0.0
    for s, d, b in zip(sentences, _minmax([s.cosine for s in sentences]), _minmax(bm25)):
        s.score = dense_weight * d + (1 - dense_weight) * b
    if skip_questions:
        for i, s in enumerate(sentences):
            if not is_question(s.text):
                continue
            after = sentences[i + 1] if i + 1 < len(sentences) else None
            if after is not None and after.hit_index == s.hit_index and not is_question(after.text):
                after.score = max(after.score, s.score)
            s.score -= 2.0  # below every non-question (scores are in [0, 1]); questions keep their order
    return sorted(sentences, key=lambda s: (-s.score, s.hit_index, s.start))


def support_score(ranked: Sequence[Sentence], hits: Sequence[Any] = ()) -> float | None:
    """The abstain score (higher = the sources support an answer): the mean of the best retrieved chunk's
    cosine similarity to the question and the largest share of the question's terms one sentence holds.

    Chosen on the dev split (corpora/corvida/qa/dev.jsonl, answerable rows against the same questions
    with their source document kept out of retrieval): ROC AUC 0.747, against 0.730 for the best
    sentence's cosine + coverage, 0.722 for chunk similarity alone, 0.709 for coverage alone.
    None when there are no sentences."""
    if not ranked:
        return None
    sims = [h.similarity for h in hits if getattr(h, "similarity", None) is not None]
    similarity = max(sims) if sims else max(s.cosine for s in ranked)
    return 0.5 * similarity + 0.5 * max(s.coverage for s in ranked)


def evidence_sources(hits: Sequence[Any], ranked: Sequence[Sentence], n: int, window_tokens: int,
                     count: Callable[[str], int]) -> list[Hit]:
    """The best ``n`` sentences (overlaps merged), each widened with the sentences around it in its chunk
    while it stays within ``window_tokens``; exact document offsets kept."""
    chosen: list[tuple[int, int, int, float]] = []  # hit index, start, end (in hit text), score
    by_hit: dict[int, list[Sentence]] = {}
    for s in sorted(ranked, key=lambda s: (s.hit_index, s.start)):
        by_hit.setdefault(s.hit_index, []).append(s)
    for s in ranked:
        if len(chosen) >= n:
            break
        if any(h == s.hit_index and a <= s.start < b for h, a, b, _ in chosen):
            continue  # already inside a chosen window
        text = hits[s.hit_index].text
        row = by_hit[s.hit_index]
        i = row.index(s)
        lo, hi = i, i
        while True:  # grow towards the sentence after first (definitions run on), then before
            grew = False
            for j in (hi + 1, lo - 1):
                if 0 <= j < len(row):
                    a, b = min(row[lo].start, row[j].start), max(row[hi].end, row[j].end)
                    if count(text[a:b]) <= window_tokens:
                        lo, hi = min(lo, j), max(hi, j)
                        grew = True
                        break
            if not grew:
                break
        chosen.append((s.hit_index, row[lo].start, row[hi].end, s.score))
    out = []
    for h, a, b, score in chosen:
        hit = hits[h]
        out.append(Hit(hit.chunk_id, hit.doc, hit.text[a:b], hit.start + a, hit.start + a + (b - a),
                               score, dict(hit.metadata or {}), getattr(hit, "similarity", None)))
    return out


__all__ = ["Sentence", "SentenceVectors", "sentence_vectors", "StoredVectors", "stored_vectors", "search_keeping_query", "split_sentences", "is_question", "rank_sentences", "support_score", "evidence_sources"]
