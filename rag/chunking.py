"""Token-aware chunking that keeps every chunk's exact character span in its document.

Splitting is langchain-text-splitters' recursive splitter with the embedder's own tokenizer as
the length function, so a chunk never exceeds what the embedder reads (all-MiniLM-L6-v2 truncates
at 256 word pieces, special tokens included). Markdown splits prefer heading boundaries. Each chunk
is an exact substring of the document text: ``document.text[start:end] == chunk.text``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from langchain_text_splitters import Language, RecursiveCharacterTextSplitter

from rag.documents import Document


@dataclass
class Chunk:
    text: str
    start: int
    end: int
    ordinal: int
    metadata: dict[str, Any] = field(default_factory=dict)
    id: int | None = None
    doc: str | None = None

    def embedding_text(self) -> str:
        """What is embedded: the chunk, prefixed by its title/section so short chunks keep context."""
        context = " > ".join(str(v) for v in (self.metadata.get("title"), self.metadata.get("section")) if v)
        if context and not self.text.lstrip().startswith("#"):
            return f"{context}\n{self.text}"
        return self.text


class TokenChunker:
    def __init__(self, tokenizer: Any, chunk_tokens: int = 256, overlap_tokens: int = 32,
                 max_model_tokens: int | None = None) -> None:
        if max_model_tokens:
            # leave room for [CLS]/[SEP] so nothing is silently truncated by the embedder
            chunk_tokens = min(chunk_tokens, max_model_tokens - 2)
        if overlap_tokens >= chunk_tokens:
            raise ValueError(f"chunk overlap ({overlap_tokens}) must be smaller than chunk size ({chunk_tokens})")
        self.chunk_tokens = chunk_tokens
        self.overlap_tokens = overlap_tokens
        self.tokenizer = tokenizer

        def length(text: str) -> int:
            return len(tokenizer(text, add_special_tokens=False, truncation=False, verbose=False)["input_ids"])

        common = dict(chunk_size=chunk_tokens, chunk_overlap=overlap_tokens, length_function=length,
                      strip_whitespace=True)
        self._plain = RecursiveCharacterTextSplitter(separators=["\n\n", "\n", ". ", "; ", ", ", " ", ""],
                                                     keep_separator=True, **common)
        self._markdown = RecursiveCharacterTextSplitter(
            separators=RecursiveCharacterTextSplitter.get_separators_for_language(Language.MARKDOWN),
            is_separator_regex=True, keep_separator=True, **common)

    def split(self, document: Document) -> list[Chunk]:
        splitter = self._markdown if document.metadata.get("format") == "markdown" else self._plain
        chunks: list[Chunk] = []
        cursor = 0
        for piece in splitter.split_text(document.text):
            if not piece.strip():
                continue
            start = document.text.find(piece, cursor)
            if start < 0:  # defensive: the splitter only returns substrings, but never lose a chunk
                start = document.text.find(piece)
            if start < 0:
                raise ValueError(f"chunker produced text not found in {document.source}")
            end = start + len(piece)
            meta = document.metadata_at(start)
            last_page = document.metadata_at(end - 1).get("page")
            if last_page is not None and last_page != meta.get("page"):
                meta["page_end"] = last_page  # a chunk across a page break cites both pages
            chunks.append(Chunk(piece, start, end, len(chunks), meta))
            cursor = start + 1
        return chunks


# Sentence ends, and line breaks (lines of tables and lists count as sentences).
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9])|\n+")


def split_sentences(text: str) -> list[tuple[int, int]]:
    """(start, end) of each sentence or line of ``text``, whitespace trimmed, empty ones dropped."""
    spans, pos = [], 0
    for m in _SENTENCE_END.finditer(text):
        spans.append((pos, m.start()))
        pos = m.end()
    spans.append((pos, len(text)))
    out = []
    for a, b in spans:
        while a < b and text[a].isspace():
            a += 1
        while b > a and text[b - 1].isspace():
            b -= 1
        if b - a >= 3:
            out.append((a, b))
    return out
