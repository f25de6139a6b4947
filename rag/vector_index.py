"""The FAISS side of a collection: files named by collection version, and the in-memory cache.

The FAISS file is written to a temp name and renamed, and named after the collection's
``version``. When the file for the current version is missing (a crash between commit and write,
or a newer write by another process) or damaged, it is rebuilt from the vectors in SQLite, so a
kill at any moment leaves a consistent store. :class:`IndexCache` keeps the loaded index of one
collection and mirrors committed changes into it without reloading.
"""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path
from typing import Callable

import numpy as np

from rag import store


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


def faiss_ids(index) -> np.ndarray:
    import faiss

    return faiss.vector_to_array(index.id_map)


class IndexCache:
    """The loaded FAISS index of one collection, kept in step with SQLite. Thread-safe."""

    def __init__(self, collection_id: int, folder: Path, index_type: str, dimension: int,
                 conn: Callable[[], object]) -> None:
        self.collection_id = collection_id
        self.folder = folder
        self.index_type = index_type
        self.dimension = dimension
        self._conn = conn  # returns this thread's connection
        self._index = None
        self._version: int | None = None
        self._lock = threading.RLock()

    def get(self, version: int):
        """The index for ``version`` (the current one): reused, loaded from its file, or rebuilt."""
        with self._lock:
            if self._index is not None and self._version == version:
                return self._index
            index = read_faiss(self.folder, version)
            if index is None or index.ntotal != store.chunk_count(self._conn(), self.collection_id):
                return self.rebuild()
            self._index, self._version = index, version
            return index

    def rebuild(self):
        version, rows = store.snapshot_vectors(self._conn(), self.collection_id)
        index = new_faiss_index(self.index_type, self.dimension)
        if rows:
            ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
            index.add_with_ids(store.blobs_to_matrix((r[1] for r in rows), self.dimension), ids)
        write_faiss(index, self.folder, version)
        with self._lock:
            self._index, self._version = index, version
        return index

    def apply(self, new_version: int, removed: list[int], ids: list[int], vectors: np.ndarray | None) -> None:
        """Mirror a committed change in the loaded index, or drop it so it is reloaded."""
        with self._lock:
            if self._index is None or self._version != new_version - 1:
                self._index = None
                return
            if removed:
                if self.index_type == "hnsw":  # HNSW cannot remove: rebuild lazily from SQLite
                    self._index = None
                    return
                self._index.remove_ids(np.array(removed, dtype=np.int64))
            if ids:
                self._index.add_with_ids(vectors, np.array(ids, dtype=np.int64))
            self._version = new_version

    def save(self, version: int) -> None:
        """Write the FAISS file for ``version`` if it is not on disk yet (after a batch of changes)."""
        with self._lock:
            index = self.get(version)
            if not faiss_path(self.folder, self._version).exists():
                write_faiss(index, self.folder, self._version)

    def forget(self) -> None:
        with self._lock:
            self._index, self._version = None, None
