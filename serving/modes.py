"""The rules of the four answer modes, in one place: which modes retrieve and which use an adapter.

``base`` (the model alone), ``rag`` (retrieved sources in the prompt), ``ft`` (a fine-tuned
adapter), ``rag+ft`` (both). Every layer that branches on a mode asks these functions instead of
spelling out mode names.
"""

from __future__ import annotations

from serving.config import MODES

RETRIEVAL_MODES = frozenset({"rag", "rag+ft"})
ADAPTER_MODES = frozenset({"ft", "rag+ft"})
assert RETRIEVAL_MODES | ADAPTER_MODES | {"base"} == set(MODES)


def uses_retrieval(mode: str) -> bool:
    """Does ``mode`` put retrieved sources into the prompt?"""
    return mode in RETRIEVAL_MODES


def uses_adapter(mode: str) -> bool:
    """Does ``mode`` answer with a fine-tuned adapter?"""
    return mode in ADAPTER_MODES


def infer_mode(collection: str | None, adapter: str | None) -> str:
    """The mode a request means when it names a collection and/or an adapter but no mode."""
    if collection:
        return "rag+ft" if adapter else "rag"
    return "ft" if adapter else "base"
