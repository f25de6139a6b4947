"""A LangChain retriever over a ragtune collection, so ragtune plugs into LangChain chains.

    from rag.langchain import CollectionRetriever
    retriever = CollectionRetriever.from_workspace("corvida", k=4)
    docs = retriever.invoke("How long is the HX warranty?")

Each ``langchain_core.documents.Document`` carries the hit's text as ``page_content`` and its
``doc``, ``chunk_id``, ``score``, ``start``, ``end`` and chunk metadata in ``metadata``.
"""

from __future__ import annotations

from typing import Any

from langchain_core.callbacks import CallbackManagerForRetrieverRun
from langchain_core.documents import Document as LCDocument
from langchain_core.retrievers import BaseRetriever
from pydantic import ConfigDict, field_validator

from rag.collection import Collection, Workspace
from rag.search import parse_where


class CollectionRetriever(BaseRetriever):
    collection: Any  # rag.collection.Collection (arbitrary type: pydantic need not validate it)
    k: int = 5
    mode: str = "hybrid"
    where: dict[str, str] | None = None

    model_config = ConfigDict(arbitrary_types_allowed=True)

    @field_validator("where", mode="before")
    @classmethod
    def _check_where(cls, value: Any) -> Any:
        """The same key rule as ``--where`` (checked again on every search)."""
        return parse_where(value) or None

    @classmethod
    def from_workspace(cls, name: str, home: str | None = None, **kwargs: Any) -> "CollectionRetriever":
        return cls(collection=Workspace(home).get(name), **kwargs)

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun) -> list[LCDocument]:
        collection: Collection = self.collection
        hits = collection.search(query, k=self.k, mode=self.mode, where=self.where)  # type: ignore[arg-type]
        return [
            LCDocument(
                page_content=h.text,
                metadata={**h.metadata, "doc": h.doc, "chunk_id": h.chunk_id, "score": h.score,
                          "start": h.start, "end": h.end, "collection": collection.name},
            )
            for h in hits
        ]
