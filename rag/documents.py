"""Loaders: a file on disk -> :class:`Document` (plain text + where each section/page starts).

Every loader returns the text that chunk spans refer to, so a citation can point at exact
characters. Structure that matters for citing (a Markdown heading path, a PDF page number) is kept
as *markers*: ``(offset, metadata)`` pairs that hold from ``offset`` until the next marker.

Bad files raise :class:`DocumentError` with a one-line reason that says what to do; the indexer
records it in the report's ``failed`` list and carries on with the rest.
"""

from __future__ import annotations

import html.parser
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

SUPPORTED_SUFFIXES = (".txt", ".md", ".markdown", ".html", ".htm", ".pdf", ".docx", ".jsonl")


class DocumentError(Exception):
    """A file that cannot be turned into text; the message is one line and says what to do."""


@dataclass
class Document:
    text: str
    source: str  # path within the collection (relative to the indexed root)
    metadata: dict[str, Any] = field(default_factory=dict)
    markers: list[tuple[int, dict[str, Any]]] = field(default_factory=list)

    def metadata_at(self, offset: int) -> dict[str, Any]:
        """Document metadata plus the metadata of the last marker at or before ``offset``."""
        meta = dict(self.metadata)
        for start, marker in self.markers:
            if start > offset:
                break
            meta.update(marker)
        return meta


def _decode_utf8(data: bytes, path: Path) -> str:
    if not data.strip():
        raise DocumentError("empty file: nothing to index")
    if b"\x00" in data[:8192]:
        raise DocumentError("binary content in a text file (NUL bytes); remove it or give it the right extension")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DocumentError(
            f"not valid UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
            f"convert it, e.g. iconv -f latin1 -t utf-8 '{path.name}'"
        ) from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def load_text(path: Path, data: bytes) -> Document:
    return Document(_decode_utf8(data, path), str(path), {"format": "text"})


_HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t]*#*[ \t]*$", re.MULTILINE)
_FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)


def load_markdown(path: Path, data: bytes) -> Document:
    """Markdown is kept verbatim (so spans point into the file); headings become markers."""
    text = _decode_utf8(data, path)
    fenced = [(m.start(), m.end()) for m in _FENCE.finditer(text)]
    stack: list[tuple[int, str]] = []
    markers: list[tuple[int, dict[str, Any]]] = []
    title = None
    for m in _HEADING.finditer(text):
        if any(a <= m.start() < b for a, b in fenced):
            continue
        level, heading = len(m.group(1)), m.group(2).strip()
        while stack and stack[-1][0] >= level:
            stack.pop()
        stack.append((level, heading))
        if title is None and level == 1:
            title = heading
        markers.append((m.start(), {"section": " > ".join(h for _, h in stack)}))
    meta: dict[str, Any] = {"format": "markdown"}
    if title:
        meta["title"] = title
    return Document(text, str(path), meta, markers)


class _HTMLText(html.parser.HTMLParser):
    """Visible text of an HTML page with block structure as newlines, headings as markers."""

    BLOCK = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "table", "ul", "ol",
             "section", "article", "header", "footer", "blockquote", "pre", "hr", "dd", "dt"}
    SKIP = {"script", "style", "noscript", "template", "head"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.length = 0
        self.skip_depth = 0
        self.heading: list[str] | None = None
        self.heading_level = 0
        self.stack: list[tuple[int, str]] = []
        self.markers: list[tuple[int, dict[str, Any]]] = []
        self.title: str | None = None
        self.in_title = False
        self.heading_start = 0

    def _emit(self, s: str) -> None:
        self.parts.append(s)
        self.length += len(s)

    def _newline(self, n: int = 1) -> None:
        tail = "".join(self.parts[-2:])
        have = len(tail) - len(tail.rstrip("\n")) if tail else n
        if self.length and have < n:
            self._emit("\n" * (n - have))

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in self.SKIP:
            self.skip_depth += 1
            if tag == "head":
                self.skip_depth -= 1  # <head> itself is transparent; its <title> is read below
        if tag == "title":
            self.in_title = True
        if tag in self.BLOCK:
            self._newline(2 if tag in ("p", "h1", "h2", "h3", "h4", "h5", "h6", "table", "ul", "ol") else 1)
        if tag in ("td", "th") and self.parts and not self.parts[-1].endswith(("\n", " | ")):
            self._emit(" | ")
        if re.fullmatch(r"h[1-6]", tag):
            self.heading, self.heading_level, self.heading_start = [], int(tag[1]), self.length

    def handle_endtag(self, tag: str) -> None:
        if tag in self.SKIP and tag != "head":
            self.skip_depth = max(0, self.skip_depth - 1)
        if tag == "title":
            self.in_title = False
        if re.fullmatch(r"h[1-6]", tag) and self.heading is not None:
            text = " ".join("".join(self.heading).split())
            while self.stack and self.stack[-1][0] >= self.heading_level:
                self.stack.pop()
            self.stack.append((self.heading_level, text))
            self.markers.append((self.heading_start, {"section": " > ".join(h for _, h in self.stack)}))
            self.heading = None
        if tag in self.BLOCK:
            self._newline(1)

    def handle_data(self, data: str) -> None:
        if self.in_title:
            self.title = (self.title or "") + data.strip()
            return
        if self.skip_depth:
            return
        text = re.sub(r"\s+", " ", data)
        if not text.strip():
            if self.parts and not self.parts[-1].endswith((" ", "\n")):
                self._emit(" ")
            return
        if not self.parts or self.parts[-1].endswith("\n"):
            text = text.lstrip()
        self._emit(text)
        if self.heading is not None:
            self.heading.append(text)


def load_html(path: Path, data: bytes) -> Document:
    parser = _HTMLText()
    parser.feed(_decode_utf8(data, path))
    parser.close()
    raw = "".join(parser.parts)
    text = raw.strip()
    shift = len(raw) - len(raw.lstrip())  # markers were recorded against the unstripped text
    if not text:
        raise DocumentError("HTML page has no visible text")
    markers = [(max(0, o - shift), m) for o, m in parser.markers]
    meta: dict[str, Any] = {"format": "html"}
    if parser.title:
        meta["title"] = parser.title
    return Document(text, str(path), meta, markers)


def load_pdf(path: Path, data: bytes) -> Document:
    """Pages joined by a blank line; every page starts a marker with its 1-based number."""
    import io

    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    if not data.strip():
        raise DocumentError("empty file: nothing to index")
    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            raise DocumentError("encrypted PDF; decrypt it first (e.g. qpdf --decrypt in.pdf out.pdf)")
        pages = [page.extract_text() or "" for page in reader.pages]
    except DocumentError:
        raise
    except (PdfReadError, ValueError, KeyError, TypeError, AttributeError, OSError) as exc:
        raise DocumentError(f"broken PDF ({type(exc).__name__}: {str(exc)[:120]}); re-export or repair it") from None
    except Exception as exc:  # pypdf raises many internal types on damaged files
        raise DocumentError(f"broken PDF ({type(exc).__name__}); re-export or repair it") from None
    if not any(p.strip() for p in pages):
        raise DocumentError("PDF has no text layer (scanned?); run OCR first, e.g. ocrmypdf in.pdf out.pdf")
    markers, offset, parts = [], 0, []
    for number, page in enumerate(pages, start=1):
        markers.append((offset, {"page": number}))
        parts.append(page)
        offset += len(page) + 2
    meta: dict[str, Any] = {"format": "pdf", "pages": len(pages)}
    title = (reader.metadata or {}).get("/Title") if reader.metadata else None
    if title:
        meta["title"] = str(title)
    return Document("\n\n".join(parts), str(path), meta, markers)


def load_docx(path: Path, data: bytes) -> Document:
    import io
    import zipfile

    try:
        import docx  # python-docx
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise DocumentError("python-docx is not installed: pip install python-docx") from exc
    try:
        document = docx.Document(io.BytesIO(data))
    except (zipfile.BadZipFile, KeyError, ValueError) as exc:
        raise DocumentError(f"broken .docx ({type(exc).__name__}); re-save it from the word processor") from None
    parts: list[str] = []
    markers: list[tuple[int, dict[str, Any]]] = []
    stack: list[tuple[int, str]] = []
    offset = 0
    for para in document.paragraphs:
        text = para.text.strip()
        if not text:
            continue
        style = (para.style.name or "") if para.style is not None else ""
        m = re.match(r"Heading (\d)", style)
        if m:
            level = int(m.group(1))
            while stack and stack[-1][0] >= level:
                stack.pop()
            stack.append((level, text))
            markers.append((offset, {"section": " > ".join(h for _, h in stack)}))
        parts.append(text)
        offset += len(text) + 2
    if not parts:
        raise DocumentError("empty .docx: no paragraphs with text")
    return Document("\n\n".join(parts), str(path), {"format": "docx"}, markers)


def load_jsonl(path: Path, data: bytes) -> Document:
    """One document per file: each row's ``text`` field, rows separated by a blank line.

    Every row becomes a marker carrying its line number and its other scalar fields, so a hit
    can be traced back to its row.
    """
    text = _decode_utf8(data, path)
    parts: list[str] = []
    markers: list[tuple[int, dict[str, Any]]] = []
    offset = 0
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DocumentError(f"line {lineno}: not JSON ({exc.msg}); fix or remove that line") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise DocumentError(f'line {lineno}: needs a string "text" field, e.g. {{"text": "..."}}')
        extra = {k: v for k, v in row.items() if k != "text" and isinstance(v, (str, int, float, bool))}
        markers.append((offset, {"row": lineno, **extra}))
        parts.append(row["text"])
        offset += len(row["text"]) + 2
    if not parts:
        raise DocumentError("no rows with text")
    return Document("\n\n".join(parts), str(path), {"format": "jsonl"}, markers)


LOADERS: dict[str, Callable[[Path, bytes], Document]] = {
    ".txt": load_text,
    ".md": load_markdown,
    ".markdown": load_markdown,
    ".html": load_html,
    ".htm": load_html,
    ".pdf": load_pdf,
    ".docx": load_docx,
    ".jsonl": load_jsonl,
}


def load_bytes(path: Path, data: bytes, source: str | None = None) -> Document:
    """Turn ``data`` (the content of ``path``) into a Document; raises DocumentError."""
    loader = LOADERS.get(path.suffix.lower())
    if loader is None:
        raise DocumentError(
            f"unsupported file type {path.suffix or '(none)'}; supported: {', '.join(SUPPORTED_SUFFIXES)}"
        )
    document = loader(path, data)
    if not document.text.strip():
        raise DocumentError("no text after extraction")
    document.source = source or path.name
    return document


def load_document(path: str | Path, source: str | None = None) -> Document:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DocumentError(f"cannot read file ({exc.strerror or exc}); check permissions") from None
    return load_bytes(path, data, source)
