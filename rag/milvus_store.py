"""A collection's chunks in Milvus: Milvus Lite (``milvus:///abs/path.db``) or a server (``http://host:19530``).

One Milvus collection per ragtune collection, named after its catalog id (``ragtune_c<ID>``, so a
rename in the catalog, as ``reindex`` does, needs nothing in Milvus). Each row is one chunk: the
text (English analyzer; a BM25 function fills a sparse vector with a sparse inverted index), the
dense vector (inner product on normalised embeddings = cosine), document path, content hash, span
offsets, the metadata as stored and a copy with every scalar as text, so ``--where`` filters compare
exactly as the SQLite store does (``CAST(json_extract(...) AS TEXT) = value``).

Chunk ids are deterministic: a 63-bit hash of (document path, content hash, chunk index). Writes
are journaled in the catalog (``store_journal``), so a kill at any point is repaired by the next
write or check:

1. journal ``(path, new hash, 'write')``;  2. upsert the new chunks (idempotent: same ids);
3. one catalog transaction: document rows replaced, journal phase ``clean``, version bumped;
4. delete the document's chunks whose hash is not the new one;  5. clear the journal.

Recovery: a ``write`` entry (the catalog still has the old state) deletes chunks with the new hash
unless the catalog holds that hash; a ``clean`` entry redoes step 4. Deleting a document journals
``(path, '', 'clean')`` in the same transaction that removes its row.

Filters: keys are checked by :func:`rag.search.check_filter` (a plain name) before they become
expression text; values become escaped string literals (:func:`literal`; Milvus Lite 2.5 refuses
expression templates), so a value can never end its literal. The analyzer is the standard
tokenizer, lowercase and ragtune's stop words (no stemmer; FTS5 uses Porter).
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import os
import threading
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from core import db
from rag import store
from rag.chunking import Chunk
from rag.errors import StoreError
from rag.search import STOPWORDS, Hit, check_filter

if TYPE_CHECKING:
    from rag.collection import Collection
    from rag.ingest import PendingDocument

TOKEN_ENV = "RAGTUNE_MILVUS_TOKEN"
CONNECT_TIMEOUT_S = 10.0
MAX_TEXT = 65535  # VARCHAR limit in bytes
MAX_PATH = 4096
OUTPUT = ["id", "doc", "hash", "ordinal", "start", "end", "text", "metadata"]
RRF_K = 60
_CLIENTS: dict[str, Any] = {}
_CLIENTS_LOCK = threading.Lock()


def chunk_id(path: str, content_hash: str, ordinal: int) -> int:
    """Deterministic id of chunk ``ordinal`` of document ``path`` with content ``content_hash``."""
    digest = hashlib.sha256(f"{path}\0{content_hash}\0{ordinal}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def _how_to_fix(uri: str) -> str:
    if uri.startswith("milvus://"):
        return ("check that the folder exists and is writable, and that no other program holds the file "
                "(Milvus Lite opens a file from one process at a time)")
    return (f"check that a Milvus server listens there (docker compose: see README 'Scaling out') and, if it needs "
            f"one, that {TOKEN_ENV} holds its token")


def connect(uri: str):
    """A MilvusClient for ``uri`` (shared per process), or StoreError with the URI and the fix."""
    with _CLIENTS_LOCK:
        client = _CLIENTS.get(uri)
        if client is not None:
            return client
        if uri.startswith("milvus://"):
            path = Path(uri[len("milvus://"):])
            if not path.parent.is_dir():
                raise StoreError(f"store {uri} cannot be opened: folder {path.parent} does not exist; create it "
                                 f"(mkdir -p {path.parent}) or choose another path")
            target, kwargs = str(path), {}
        else:
            target, kwargs = uri, {"token": os.environ.get(TOKEN_ENV, ""), "timeout": CONNECT_TIMEOUT_S}
        try:
            # milvus-lite 2.5 imports pkg_resources, whose deprecation warning would reach every CLI user
            warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
            from pymilvus import MilvusClient

            # pymilvus logs a failed connection as an ERROR line of its own before raising; the StoreError
            # below says the same with the URI and the fix, so that line would only be noise
            logging.getLogger("pymilvus.milvus_client._utils").setLevel(logging.CRITICAL)
            client = MilvusClient(uri=target, **kwargs)
            client.list_collections()
        except ImportError as exc:
            raise StoreError(f"store {uri} needs pymilvus and milvus-lite: pip install pymilvus==2.5.18 milvus-lite==2.5.1 "
                             f"({exc})") from None
        except Exception as exc:  # noqa: BLE001 - pymilvus raises several types for one cause: unreachable
            raise StoreError(f"store {uri} cannot be reached ({type(exc).__name__}: {str(exc)[:200]}); "
                             f"{_how_to_fix(uri)}") from None
        _CLIENTS[uri] = client
        return client


def release(uri: str) -> None:
    """Close this process's client for ``uri`` (tests and benches hand a Milvus Lite file to another process)."""
    with _CLIENTS_LOCK:
        client = _CLIENTS.pop(uri, None)
    if client is not None:
        try:
            client.close()
        except Exception:  # noqa: BLE001 - closing is best effort
            pass


def literal(value: str) -> str:
    """``value`` as a Milvus string literal: quoted, with backslash, quote and line breaks escaped, so
    no value can end the literal and become expression text (Milvus Lite refuses expression templates)."""
    escaped = (value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
               .replace("\r", "\\r").replace("\t", "\\t"))
    return f'"{escaped}"'


def filter_expression(where: dict[str, str]) -> str:
    """A Milvus boolean expression for ``where``: keys checked to be plain names, values as escaped
    literals. ``doc`` globs become a LIKE pattern that matches a superset (see :func:`glob_to_like`);
    :func:`doc_matches` then applies the exact GLOB to the hits."""
    clauses = []
    for key, value in where.items():
        key, value = check_filter(key, value)  # the key becomes expression text: a plain name only
        if key == "doc":
            clauses.append(f"doc like {literal(glob_to_like(value))}")
        else:
            clauses.append(f'filters["{key}"] == {literal(value)}')
    return " and ".join(clauses)


def glob_to_like(pattern: str) -> str:
    """SQLite GLOB as a LIKE pattern matching a superset: ``*`` -> ``%``, ``?`` -> ``_``, and characters
    LIKE cannot express portably (``%``, ``_``, ``\\``, a ``[...]`` class) -> ``_`` (one character)."""
    out, i = [], 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "*":
            out.append("%")
        elif ch == "[" and "]" in pattern[i + 2:]:
            out.append("_")
            i = pattern.index("]", i + 2)
        elif ch in "?%_\\":
            out.append("_")
        else:
            out.append(ch)
        i += 1
    return "".join(out)


def doc_matches(where: dict[str, str], path: str) -> bool:
    """The exact ``doc`` GLOB (case-sensitive, as SQLite's) on a hit's path."""
    pattern = where.get("doc")
    return pattern is None or fnmatch.fnmatchcase(path, pattern)


def filter_values(metadata: dict[str, Any]) -> dict[str, str]:
    """Scalars as the text SQLite's ``CAST(json_extract(...) AS TEXT)`` gives (true -> '1')."""
    out = {}
    for key, value in metadata.items():
        if isinstance(value, bool):
            out[key] = "1" if value else "0"
        elif isinstance(value, (str, int, float)):
            out[key] = str(value)
    return out


class MilvusStore:
    """The chunks of one collection in one Milvus collection (see the module docstring)."""

    native_fusion = True

    def __init__(self, collection: "Collection", uri: str) -> None:
        self.col = collection
        self.uri = uri
        self.name = f"ragtune_c{collection.id}"
        self._client = None
        self._ready = False

    # --- plumbing -----------------------------------------------------------------------------
    @property
    def conn(self):
        return self.col.conn

    def _gone(self, why: str) -> StoreError:
        return StoreError(f"collection {self.col.name!r} lives on {self.uri}, which {why}. Bring the store back, or "
                          f"move the collection there from its stored text (no source files needed): "
                          f"ragtune reindex {self.col.name} --store sqlite   (or --store ANOTHER_URI)")

    @property
    def client(self):
        if self._client is None:
            written = (store.version(self.conn, self.col.id) or 0) > 0
            if written and self.uri.startswith("milvus://") and not Path(self.uri[len("milvus://"):]).exists():
                raise self._gone("is gone (the Milvus Lite file does not exist)")  # opening would make an empty one
            try:
                self._client = connect(self.uri)
            except StoreError as exc:
                raise self._gone(f"cannot be reached ({exc})") from None
        if not self._ready:
            self._ensure_collection(self._client)
            self._ready = True
        return self._client

    def _ensure_collection(self, client) -> None:
        if client.has_collection(self.name):
            client.load_collection(self.name)
            return
        if (store.version(self.conn, self.col.id) or 0) > 0:
            raise self._gone(f"no longer holds its Milvus collection {self.name}")
        from pymilvus import DataType, Function, FunctionType, MilvusClient

        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("text", DataType.VARCHAR, max_length=MAX_TEXT, enable_analyzer=True,
                         analyzer_params={"tokenizer": "standard", "filter": [
                             "lowercase", {"type": "stop", "stop_words": sorted(STOPWORDS)}]})
        schema.add_field("sparse", DataType.SPARSE_FLOAT_VECTOR)
        schema.add_field("dense", DataType.FLOAT_VECTOR, dim=self.col.dimension)
        schema.add_field("doc", DataType.VARCHAR, max_length=MAX_PATH)
        schema.add_field("hash", DataType.VARCHAR, max_length=64)
        schema.add_field("ordinal", DataType.INT64)
        schema.add_field("start", DataType.INT64)
        schema.add_field("end", DataType.INT64)
        schema.add_field("metadata", DataType.JSON)
        schema.add_field("filters", DataType.JSON)
        schema.add_function(Function(name="text_bm25", function_type=FunctionType.BM25,
                                     input_field_names=["text"], output_field_names=["sparse"]))
        index = client.prepare_index_params()
        index.add_index(field_name="sparse", index_type="SPARSE_INVERTED_INDEX", metric_type="BM25")
        # Milvus Lite builds FLAT and IVF indexes only: an 'hnsw' collection is searched exactly there
        # (FLAT: ~19 ms a dense query at 100k chunks on 2 cores), with HNSW on a server
        lite = self.uri.startswith("milvus://")
        dense_index = "HNSW" if self.col.index_type == "hnsw" and not lite else "FLAT"
        index.add_index(field_name="dense", index_type=dense_index, metric_type="IP",
                        **({"params": {"M": 32, "efConstruction": 80}} if dense_index == "HNSW" else {}))
        client.create_collection(self.name, schema=schema, index_params=index, consistency_level="Strong")

    # --- writing ------------------------------------------------------------------------------
    def _rows(self, pending: list["PendingDocument"], vectors: np.ndarray) -> list[dict[str, Any]]:
        rows, i = [], 0
        for p in pending:
            path = p.document.source
            if len(path.encode("utf-8")) > MAX_PATH:
                raise StoreError(f"document path {path[:80]!r}... is over {MAX_PATH} bytes, the Milvus store's limit; shorten it")
            for chunk in p.chunks:
                if len(chunk.text.encode("utf-8")) > MAX_TEXT:
                    raise StoreError(f"a chunk of {path!r} is over {MAX_TEXT} bytes (Milvus VARCHAR limit); "
                                     "lower chunk_tokens for this collection")
                rows.append({"id": chunk_id(path, p.content_hash, chunk.ordinal), "text": chunk.text,
                             "dense": vectors[i].astype(np.float32).tolist(), "doc": path, "hash": p.content_hash,
                             "ordinal": int(chunk.ordinal), "start": int(chunk.start), "end": int(chunk.end),
                             "metadata": chunk.metadata, "filters": filter_values(chunk.metadata)})
                i += 1
        return rows

    def _delete_versions(self, entries: list[tuple[str, str]], keep: bool) -> None:
        """For each ``(path, hash)``: delete the document's chunks with another hash (``keep``) or with
        that hash (not ``keep``); 64 documents per call, so expressions stay small."""
        op = "!=" if keep else "=="
        for start in range(0, len(entries), 64):
            part = entries[start:start + 64]
            expr = " or ".join(f"(doc == {literal(p)} and hash {op} {literal(h)})" for p, h in part)
            self.client.delete(self.name, filter=expr)

    def replace_documents(self, pending: list["PendingDocument"], vectors: np.ndarray) -> int:
        col = self.col
        rows = self._rows(pending, vectors)
        entries = [(p.document.source, p.content_hash) for p in pending]
        with col.write_lock:
            with db.transaction(self.conn) as conn:  # 1. journal
                store.journal_write(conn, col.id, entries, "write")
            for start in range(0, len(rows), 1000):  # 2. upsert (idempotent)
                self.client.upsert(self.name, rows[start:start + 1000])
            with db.transaction(self.conn) as conn:  # 3. catalog
                for p in pending:
                    store.delete_document(conn, col.id, p.document.source)
                    store.insert_document(
                        conn, col.id, path=p.document.source, root=p.root, content_hash=p.content_hash, size=p.size,
                        text=p.document.text, metadata=p.document.metadata, markers=p.document.markers,
                        chunks=p.chunks, vectors=vectors, chunk_rows=False)
                store.journal_write(conn, col.id, entries, "clean")
                store.bump_version(conn, col.id)
            self._clean(entries)  # 4. + 5.
        return len(rows)

    def _clean(self, entries: list[tuple[str, str]]) -> None:
        self._delete_versions(entries, keep=True)
        with db.transaction(self.conn) as conn:
            store.journal_clear(conn, self.col.id, [path for path, _ in entries])

    def delete_documents(self, paths: list[str]) -> int:
        col = self.col
        deleted = []
        with col.write_lock:
            with db.transaction(self.conn) as conn:
                for path in paths:
                    if store.delete_document(conn, col.id, path) is not None:
                        deleted.append(path)
                store.journal_write(conn, col.id, [(p, "") for p in deleted], "clean")
                if deleted:
                    store.bump_version(conn, col.id)
            if deleted:
                self._clean([(p, "") for p in deleted])
        return len(deleted)

    def recover(self) -> None:
        """Repair what a killed write left (see the module docstring); idempotent."""
        col = self.col
        client = self.client  # connects (and fails with the fix) before anything else happens
        del client
        with col.write_lock:
            entries = store.journal_entries(self.conn, col.id)
            if not entries:
                return
            catalog = store.stored_hashes(self.conn, col.id)
            undo = [(p, h) for p, h, phase in entries if phase == "write" and catalog.get(p, ("",))[0] != h]
            self._delete_versions(undo, keep=False)
            self._delete_versions([(p, h) for p, h, phase in entries if phase == "clean"], keep=True)
            with db.transaction(self.conn) as conn:
                store.journal_clear(conn, col.id, [p for p, _, _ in entries])

    def save(self) -> None:
        """After a batch of changes: flush, so the rows leave the write buffer for sealed, indexed
        segments (an unflushed buffer is searched without its index). Durability does not depend on it."""
        self.client.flush(self.name)

    def drop(self) -> None:
        if self.uri.startswith("milvus://") and not Path(self.uri[len("milvus://"):]).exists():
            return  # the Lite file is gone: nothing to remove (opening it would create an empty one)
        client = connect(self.uri)
        if client.has_collection(self.name):
            client.drop_collection(self.name)
        self._ready = False

    # --- reading ------------------------------------------------------------------------------
    def _search(self, data, field: str, metric: str, k: int, where: dict[str, str]) -> list[tuple[int, float]]:
        expr = filter_expression(where) if where else ""
        result = self.client.search(self.name, data=[data], anns_field=field, limit=k, output_fields=["id", "doc"],
                                     search_params={"metric_type": metric}, filter=expr)
        return [(int(h["id"]), float(h["distance"])) for h in result[0] if doc_matches(where, h["entity"]["doc"])]

    def dense(self, query_vector: np.ndarray, k: int, where: dict[str, str]) -> list[tuple[int, float]]:
        return self._search(np.asarray(query_vector, dtype=np.float32).tolist(), "dense", "IP", k, where)

    def bm25(self, query: str, k: int, where: dict[str, str]) -> list[tuple[int, float]]:
        if not query.strip():
            return []
        # BM25 scores are >= 0; Milvus Lite 3.x reported them negated (its smaller-is-better distance),
        # 2.5 and a server as they are: abs() gives the score either way (convex fusion min-max scales it)
        return [(cid, abs(score)) for cid, score in self._search(query, "sparse", "BM25", k, where)]

    def hybrid_rrf(self, query: str, query_vector: np.ndarray, k: int, candidates: int,
                   where: dict[str, str]) -> list[tuple[int, float]]:
        """Milvus' own fusion: ``hybrid_search`` of the two requests (each with the filter) + RRFRanker."""
        from pymilvus import AnnSearchRequest, RRFRanker

        expr = filter_expression(where) if where else None
        reqs = [AnnSearchRequest([np.asarray(query_vector, dtype=np.float32).tolist()], "dense",
                                 {"metric_type": "IP"}, candidates, expr=expr),
                AnnSearchRequest([query], "sparse", {"metric_type": "BM25"}, candidates, expr=expr)]
        result = self.client.hybrid_search(self.name, reqs, RRFRanker(RRF_K), limit=k, output_fields=["id", "doc"])
        return [(int(h["id"]), float(h["distance"])) for h in result[0] if doc_matches(where, h["entity"]["doc"])]

    def _get(self, ids: list[int], fields: list[str]) -> list[dict[str, Any]]:
        if not ids:
            return []
        return self.client.get(self.name, ids=[int(i) for i in ids], output_fields=fields)

    def fetch(self, scored: list[tuple[int, float]]) -> list[Hit]:
        rows = {int(r["id"]): r for r in self._get([cid for cid, _ in scored], OUTPUT)}
        hits = []
        for cid, score in scored:
            r = rows.get(cid)
            if r is None:  # deleted between the search and this read
                continue
            hits.append(Hit(cid, r["doc"], r["text"], int(r["start"]), int(r["end"]), float(score), dict(r["metadata"] or {})))
        return hits

    def vectors(self, ids: list[int]) -> dict[int, np.ndarray]:
        return {int(r["id"]): np.asarray(r["dense"], dtype=np.float32) for r in self._get(ids, ["id", "dense"])}

    def _all_ids(self) -> set[int]:
        """Every stored chunk id. Ids are uniform 63-bit hashes, so equal id ranges of ~4000 expected rows
        each stay far below a query's 16384-row limit (query_iterator needs a server timestamp that
        Milvus Lite does not offer)."""
        slices = self.chunk_count() // 4000 + 1
        width = -(-2**63 // slices)
        out: set[int] = set()
        for n in range(slices):
            upper = f" and id < {(n + 1) * width}" if n + 1 < slices else ""  # 2**63 itself is not an int64
            rows = self.client.query(self.name, filter=f"id >= {n * width}{upper}",
                                     output_fields=["id"], limit=16384)
            if len(rows) >= 16384:
                raise StoreError(f"{self.uri}: too many chunks in one id range; report this")
            out.update(int(r["id"]) for r in rows)
        return out

    def chunks(self, path: str) -> list[Chunk]:
        digest = store.stored_hashes(self.conn, self.col.id).get(path, ("",))[0]
        rows = self.client.query(self.name, filter=f"doc == {literal(path)} and hash == {literal(digest)}",
                                 output_fields=OUTPUT, limit=16384)
        rows.sort(key=lambda r: (int(r["start"]), int(r["ordinal"])))
        return [Chunk(r["text"], int(r["start"]), int(r["end"]), int(r["ordinal"]), dict(r["metadata"] or {}),
                      id=int(r["id"]), doc=path) for r in rows]

    def chunk_count(self) -> int:
        res = self.client.query(self.name, filter="", output_fields=["count(*)"])
        return int(res[0]["count(*)"])

    def check(self) -> dict[str, int]:
        """Ids the catalog implies (path, hash, chunk count -> deterministic ids) against the ids stored,
        after repairing what a killed write left (the journal; what any next write would do first)."""
        self.recover()
        expected = {chunk_id(path, digest, i)
                    for path, (digest, n) in store.document_chunk_counts(self.conn, self.col.id).items() for i in range(n)}
        stored = self._all_ids()
        return {"sqlite_chunks": len(expected), "store_chunks": len(stored), "mismatched": len(expected ^ stored)}
