"""User-facing errors of the rag layer (each message says what to do)."""

from __future__ import annotations


class CollectionError(Exception):
    """A request about a collection that cannot be carried out; the message says what to do."""


class StoreError(CollectionError):
    """A chunk store that cannot be used (unreachable, gone, refused); the message names the URI and the fix."""
