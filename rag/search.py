"""Search over one collection: dense (FAISS inner product), BM25 (SQLite FTS5) and their fusion.

Hybrid search fuses the two ranked lists. The default is a convex combination of min-max
normalised scores, ``alpha * dense + (1 - alpha) * bm25``, which Bruch et al. (2023, "An Analysis
of Fusion Functions for Hybrid Retrieval") found more accurate than reciprocal-rank fusion; RRF
(Cormack et al. 2009) stays available. On COVID-QA it is what makes hybrid at least as good as the
better single retriever (bench/index_bench.py), where plain RRF fell between the two.
Filters (``--where KEY=VALUE``) become a SQL condition over chunk metadata (``doc=GLOB`` matches
the document path); dense search applies them inside FAISS with an id selector.
"""

from __future__ import annotations

import json
import re
import sqlite3
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

SearchMode = Literal["hybrid", "dense", "bm25"]

# Words too common to carry BM25 signal; dropping them keeps FTS5 from ranking huge match sets.
STOPWORDS = frozenset(
    "a about above after again all am an and any are as at be because been before being below between both but by "
    "can could did do does doing down during each few for from further had has have having he her here hers him his "
    "how i if in into is it its itself just me more most my no nor not of off on once only or other our ours out "
    "over own same she should so some such than that the their theirs them then there these they this those through "
    "to too under until up very was we were what when where which while who whom why will with would you your yours".split()
)


@dataclass
class Hit:
    chunk_id: int
    doc: str
    text: str
    start: int
    end: int
    score: float
    metadata: dict[str, Any] = field(default_factory=dict)
    similarity: float | None = None  # cosine between query and chunk, when the query was embedded
    dense_rank: int | None = None
    bm25_rank: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


FILTER_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
MAX_FILTER_VALUE = 1000


def check_filter(key: object, value: object) -> tuple[str, str]:
    """One ``KEY=VALUE`` filter, the same rule whether it came as a string or a dict entry: the key is
    a plain metadata name (it becomes a JSON path), the value a string, number or boolean."""
    if not isinstance(key, str) or not FILTER_KEY_RE.fullmatch(key):
        raise ValueError(f"filter key {key!r} must be a plain name (letters, digits, underscore; at most 64), "
                         "for example section or doc")
    if isinstance(value, bool):
        value = "1" if value else "0"  # json_extract of a JSON true/false, cast to text, reads 1/0
    if not isinstance(value, (str, int, float)) or (isinstance(value, float) and value != value):
        raise ValueError(f"filter {key}: value {value!r} must be a string or a number")
    value = str(value)
    if len(value) > MAX_FILTER_VALUE:
        raise ValueError(f"filter {key}: value is {len(value)} characters long; at most {MAX_FILTER_VALUE}")
    return key, value


def parse_where(where: list[str] | tuple[str, ...] | str | dict[str, str] | None) -> dict[str, str]:
    """Filters from ``["KEY=VALUE", ...]`` (CLI), one ``"KEY=VALUE"`` string or a ``{key: value}`` dict
    (Python API, LangChain). Every key is checked by :func:`check_filter` whatever the form."""
    if not where:
        return {}
    if isinstance(where, dict):
        return dict(check_filter(k, v) for k, v in where.items())
    if isinstance(where, str):
        where = [where]
    if not isinstance(where, (list, tuple)):
        raise ValueError(f"filters must be a list of KEY=VALUE strings or a dict, got {type(where).__name__}")
    out = {}
    for item in where:
        if not isinstance(item, str) or "=" not in item:
            raise ValueError(f"filter {item!r} is not KEY=VALUE (example: --where section=Warranty or --where doc='policies/*')")
        key, value = item.split("=", 1)
        key, value = check_filter(key.strip(), value)
        out[key] = value
    return out


def where_sql(where: dict[str, str]) -> tuple[str, list[Any]]:
    """SQL condition over ``chunks c JOIN documents d`` for the filters. Keys are checked again here and
    travel as parameters (a JSON path), so no caller can put a key into the SQL text."""
    clauses, params = [], []
    for key, value in where.items():
        key, value = check_filter(key, value)
        if key == "doc":
            clauses.append("d.path GLOB ?")
            params.append(value)
        else:
            clauses.append("CAST(json_extract(c.metadata_json, ?) AS TEXT) = ?")
            params += [f"$.{key}", value]
    return (" AND ".join(clauses) or "1"), params


def query_terms(text: str) -> list[str]:
    terms = re.findall(r"\w+", text.lower())
    kept = [t for t in terms if t not in STOPWORDS] or terms
    return list(dict.fromkeys(kept))


def fts_query(text: str) -> str | None:
    unique = query_terms(text)
    return " OR ".join(f'"{t}"' for t in unique) if unique else None


_DF_CACHE: dict[tuple[str, int, str], int] = {}
_TOTAL_CACHE: dict[tuple[str, int], int] = {}
COMMON_TERM_SHARE = 0.05


def prune_common_terms(conn, table: str, terms: list[str], total: int, cache_key: tuple[str, int]) -> list[str]:
    """Drop terms found in more than ``COMMON_TERM_SHARE`` of the chunks (their BM25 weight is small,
    and ranking their huge match sets is what makes FTS5 slow on large collections); the two rarest
    terms always stay. Document frequencies are counted once per collection version (~1 ms a term)."""
    if total < 20_000 or len(terms) <= 2:  # small collections: FTS5 is fast, keep every term
        return terms
    df = {}
    for term in terms:
        key = (*cache_key, term)
        if key not in _DF_CACHE:
            if len(_DF_CACHE) > 100_000:
                _DF_CACHE.clear()
            _DF_CACHE[key] = int(conn.execute(f"SELECT COUNT(*) FROM {table} WHERE {table} MATCH ?", (f'"{term}"',)).fetchone()[0])
        df[term] = _DF_CACHE[key]
    rarest = sorted(terms, key=lambda t: df[t])[:2]
    return [t for t in terms if df[t] <= COMMON_TERM_SHARE * total or t in rarest]


def bm25_search(conn, collection_id: int, query: str, k: int,
                where: dict[str, str] | None = None) -> list[tuple[int, float]]:
    """``conn``: a SQLite connection, or anything with a per-thread ``.conn`` (a Workspace)."""
    conn = getattr(conn, "conn", conn)
    table = f"fts_{int(collection_id)}"
    terms = query_terms(query)
    if not terms:
        return []
    row = conn.execute("SELECT version FROM collections WHERE id = ?", (collection_id,)).fetchone()
    if row is not None:
        key = (table, int(row[0]))
        if key not in _TOTAL_CACHE:
            _TOTAL_CACHE[key] = int(conn.execute("SELECT COUNT(*) FROM chunks WHERE collection_id = ?", (collection_id,)).fetchone()[0])
        terms = prune_common_terms(conn, table, terms, _TOTAL_CACHE[key], key)
    match = " OR ".join(f'"{t}"' for t in terms)
    sql = f"SELECT rowid, bm25({table}) AS s FROM {table} WHERE {table} MATCH ?"
    params: list[Any] = [match]
    if where:
        cond, extra = where_sql(where)
        sql += (f" AND rowid IN (SELECT c.id FROM chunks c JOIN documents d ON d.id = c.document_id "
                f"WHERE c.collection_id = ? AND {cond})")
        params += [collection_id, *extra]
    sql += " ORDER BY s LIMIT ?"
    params.append(k)
    return [(int(r[0]), -float(r[1])) for r in conn.execute(sql, params)]


def allowed_ids(conn: sqlite3.Connection, collection_id: int, where: dict[str, str]) -> np.ndarray:
    cond, params = where_sql(where)
    rows = conn.execute(
        f"SELECT c.id FROM chunks c JOIN documents d ON d.id = c.document_id WHERE c.collection_id = ? AND {cond}",
        [collection_id, *params]).fetchall()
    return np.array([r[0] for r in rows], dtype=np.int64)


def dense_search(index, query_vector: np.ndarray, k: int, ids: np.ndarray | None = None) -> list[tuple[int, float]]:
    import faiss

    if index.ntotal == 0 or (ids is not None and len(ids) == 0):
        return []
    params = None
    if ids is not None:
        params = faiss.SearchParameters(sel=faiss.IDSelectorBatch(ids))
    scores, labels = index.search(query_vector.reshape(1, -1).astype(np.float32), min(k, index.ntotal), params=params)
    return [(int(i), float(s)) for i, s in zip(labels[0], scores[0]) if i >= 0]


def reciprocal_rank_fusion(lists: list[list[tuple[int, float]]], weights: list[float], rrf_k: int = 60) -> list[tuple[int, float]]:
    fused: dict[int, float] = {}
    for ranked, weight in zip(lists, weights):
        for rank, (chunk_id, _) in enumerate(ranked, start=1):
            fused[chunk_id] = fused.get(chunk_id, 0.0) + weight / (rrf_k + rank)
    return sorted(fused.items(), key=lambda item: (-item[1], item[0]))


def convex_fusion(dense: list[tuple[int, float]], lexical: list[tuple[int, float]], alpha: float) -> list[tuple[int, float]]:
    """``alpha`` * min-max(dense) + (1 - ``alpha``) * min-max(bm25); a chunk missing from a list gets 0 there."""
    def normalised(ranked: list[tuple[int, float]]) -> dict[int, float]:
        if not ranked:
            return {}
        scores = [s for _, s in ranked]
        low, high = min(scores), max(scores)
        span = high - low
        return {cid: ((s - low) / span if span > 0 else 1.0) for cid, s in ranked}

    d, b = normalised(dense), normalised(lexical)
    fused = {cid: alpha * d.get(cid, 0.0) + (1 - alpha) * b.get(cid, 0.0) for cid in d.keys() | b.keys()}
    return sorted(fused.items(), key=lambda item: (-item[1], item[0]))


def fetch_hits(conn: sqlite3.Connection, scored: list[tuple[int, float]]) -> list[Hit]:
    if not scored:
        return []
    ids = [cid for cid, _ in scored]
    marks = ",".join("?" * len(ids))
    rows = {r["id"]: r for r in conn.execute(
        f"SELECT c.id, c.text, c.start, c.end, c.metadata_json, d.path FROM chunks c "
        f"JOIN documents d ON d.id = c.document_id WHERE c.id IN ({marks})", ids)}
    hits = []
    for cid, score in scored:
        row = rows.get(cid)
        if row is None:  # deleted between the index lookup and this read
            continue
        hits.append(Hit(cid, row["path"], row["text"], row["start"], row["end"], float(score),
                        json.loads(row["metadata_json"])))
    return hits
