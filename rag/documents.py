"""Loaders: a file on disk -> :class:`Document` (plain text + where each section/page starts).

Every loader returns the text that chunk spans refer to, so a citation can point at exact
characters. Structure that matters for citing (a Markdown heading path, a PDF page number) is kept
as *markers*: ``(offset, metadata)`` pairs that hold from ``offset`` until the next marker.

Bad files raise :class:`DocumentError` with a one-line reason that says what to do; the indexer
records it in the report's ``failed`` list and carries on with the rest. Any other exception a
parser raises on a damaged file (lxml, pypdf, zipfile internals) is turned into a DocumentError by
:func:`load_bytes`, so one file never stops a run.

Every loader works under a :class:`Budget`: the text it extracts may not pass ``max_chars`` and
extraction may not run past ``max_seconds``. Both are checked as the text grows (per page, per
paragraph, per row, per slice of HTML), so an archive or page that expands to far more text than
its file size suggests is stopped early. A .docx is a zip: its declared uncompressed sizes are
checked before anything is inflated (zipfile never inflates a member past its declared size).
"""

from __future__ import annotations

import contextlib
import html.parser
import json
import math
import re
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

SUPPORTED_SUFFIXES = (".txt", ".md", ".markdown", ".html", ".htm", ".pdf", ".docx", ".jsonl")
DEFAULT_MAX_CHARS = 5_000_000  # ~2,500 pages of prose; embedding more than that per file takes hours on a CPU
DEFAULT_MAX_SECONDS = 60.0
MARKUP_ALLOWANCE = 4  # bytes of .docx XML allowed per character of text (markup around each run)


class DocumentError(Exception):
    """A file that cannot be turned into text; the message is one line and says what to do."""


@dataclass
class Budget:
    """Limits for one file's extraction: characters of text and seconds (see the module docstring)."""

    max_chars: int = DEFAULT_MAX_CHARS
    max_seconds: float = DEFAULT_MAX_SECONDS
    started: float = field(default_factory=time.monotonic)

    def check(self, chars: int) -> None:
        if chars > self.max_chars:
            raise DocumentError(f"extracted text passes max_text_chars={self.max_chars:,} characters; split the file "
                                "or raise max_text_chars in the index config")
        if time.monotonic() - self.started > self.max_seconds:
            raise DocumentError(f"extraction took over max_seconds_per_file={self.max_seconds:g}s; split or simplify the "
                                "file, or raise max_seconds_per_file in the index config")


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


def load_text(path: Path, data: bytes, budget: Budget) -> Document:
    text = _decode_utf8(data, path)
    budget.check(len(text))
    return Document(text, str(path), {"format": "text"})


_HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t]*#*[ \t]*$", re.MULTILINE)
_FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)


def load_markdown(path: Path, data: bytes, budget: Budget) -> Document:
    """Markdown is kept verbatim (so spans point into the file); headings become markers."""
    text = _decode_utf8(data, path)
    budget.check(len(text))
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


HTML_SLICE = 1 << 18


def load_html(path: Path, data: bytes, budget: Budget) -> Document:
    parser = _HTMLText()
    source = _decode_utf8(data, path)
    for start in range(0, len(source), HTML_SLICE):  # fed in slices so the budget is checked as text grows
        parser.feed(source[start:start + HTML_SLICE])
        budget.check(parser.length)
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


def load_pdf(path: Path, data: bytes, budget: Budget) -> Document:
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
        pages: list[str] = []
        chars = 0
        for page in reader.pages:
            pages.append(page.extract_text() or "")
            chars += len(pages[-1])
            budget.check(chars)
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


def _check_docx_archive(data: bytes, budget: Budget) -> None:
    """Refuse a .docx whose parts would inflate past the budget, before inflating anything."""
    import io
    import zipfile

    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, ValueError, EOFError) as exc:
        raise DocumentError(f"broken .docx (not a zip archive: {exc}); re-save it from the word processor") from None
    xml = sum(m.file_size for m in members if m.filename.endswith((".xml", ".rels")))
    total = sum(m.file_size for m in members)
    xml_limit = MARKUP_ALLOWANCE * budget.max_chars
    if xml > xml_limit or total > xml_limit + 2 * len(data) + (1 << 20):
        raise DocumentError(
            f".docx expands to {max(xml, total) / 2**20:,.0f} MiB when unpacked ({len(data) / 2**10:,.0f} KiB packed), more "
            f"than max_text_chars={budget.max_chars:,} allows; split the document or raise max_text_chars")


def load_docx(path: Path, data: bytes, budget: Budget) -> Document:
    import io
    import zipfile

    try:
        import docx  # python-docx
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise DocumentError("python-docx is not installed: pip install python-docx") from exc
    _check_docx_archive(data, budget)
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
        budget.check(offset)
    if not parts:
        raise DocumentError("empty .docx: no paragraphs with text")
    return Document("\n\n".join(parts), str(path), {"format": "docx"}, markers)


def load_jsonl(path: Path, data: bytes, budget: Budget) -> Document:
    """One document per file: each row's ``text`` field, rows separated by a blank line.

    Every row becomes a marker carrying its line number and its other scalar fields, so a hit
    can be traced back to its row.
    """
    text = _decode_utf8(data, path)
    budget.check(len(text))
    parts: list[str] = []
    markers: list[tuple[int, dict[str, Any]]] = []
    offset = 0
    for lineno, line in enumerate(text.split("\n"), start=1):
        if lineno % 1000 == 0:
            budget.check(offset)
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DocumentError(f"line {lineno}: not JSON ({exc.msg}); fix or remove that line") from None
        except RecursionError:
            raise DocumentError(f"line {lineno}: JSON nested too deeply; fix or remove that line") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise DocumentError(f'line {lineno}: needs a string "text" field, e.g. {{"text": "..."}}')
        # scalars only, and no NaN/Infinity: SQLite's JSON functions (used by --where filters) refuse them
        extra = {k: v for k, v in row.items() if k != "text" and isinstance(v, (str, int, float, bool))
                 and not (isinstance(v, float) and not math.isfinite(v)) and not (isinstance(v, int) and abs(v) >= 2**63)}
        markers.append((offset, {"row": lineno, **extra}))
        parts.append(row["text"])
        offset += len(row["text"]) + 2
    if not parts:
        raise DocumentError("no rows with text")
    return Document("\n\n".join(parts), str(path), {"format": "jsonl"}, markers)


LOADERS: dict[str, Callable[[Path, bytes, Budget], Document]] = {
    ".txt": load_text,
    ".md": load_markdown,
    ".markdown": load_markdown,
    ".html": load_html,
    ".htm": load_html,
    ".pdf": load_pdf,
    ".docx": load_docx,
    ".jsonl": load_jsonl,
}


def load_bytes(path: Path, data: bytes, source: str | None = None, budget: Budget | None = None) -> Document:
    """Turn ``data`` (the content of ``path``) into a Document; raises DocumentError, whatever went wrong
    inside the parser (a damaged file must never stop the files after it)."""
    loader = LOADERS.get(path.suffix.lower())
    if loader is None:
        raise DocumentError(
            f"unsupported file type {path.suffix or '(none)'}; supported: {', '.join(SUPPORTED_SUFFIXES)}"
        )
    budget = budget or Budget()
    try:
        with hard_deadline(budget):
            document = loader(path, data, budget)
    except DocumentError:
        raise
    except _Overtime:  # the timer fired between the loader's return and its own cancellation
        raise DocumentError(f"extraction took over max_seconds_per_file={budget.max_seconds:g}s") from None
    except MemoryError:
        raise DocumentError("ran out of memory extracting the text; split the file or lower max_text_chars") from None
    except Exception as exc:  # noqa: BLE001 - parsers raise many internal types on damaged input
        detail = " ".join(str(exc).split())[:160]
        raise DocumentError(f"cannot read this {path.suffix.lower()} file ({type(exc).__name__}: {detail}); "
                            "re-save or repair it") from None
    if not document.text.strip():
        raise DocumentError("no text after extraction")
    try:
        document.text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates from a broken PDF font map: SQLite cannot store them
        document.text = document.text.encode("utf-8", "replace").decode("utf-8")  # one '?' each: offsets hold
    document.source = source or path.name
    return document


class _Overtime(BaseException):
    """Raised by the interval timer inside a loader that overran its budget (BaseException: no parser's
    ``except Exception`` swallows it)."""


@contextlib.contextmanager
def hard_deadline(budget: Budget):
    """Interrupt the loader when ``budget.max_seconds`` passes, even inside one long parser call.

    Signals reach only the main thread, so this holds in the CLI; in other threads (the app's
    indexing) the budget's checks between pages, paragraphs and rows are the limit. A timer someone
    else set is restored afterwards."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return
    remaining = budget.max_seconds - (time.monotonic() - budget.started)

    def overtime(signum, frame):
        raise _Overtime()

    previous = signal.signal(signal.SIGALRM, overtime)
    old_delay, old_interval = signal.setitimer(signal.ITIMER_REAL, max(remaining, 0.001))
    try:
        yield
    except _Overtime:
        raise DocumentError(f"extraction took over max_seconds_per_file={budget.max_seconds:g}s; split or simplify the "
                            "file, or raise max_seconds_per_file in the index config") from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if old_delay:
            signal.setitimer(signal.ITIMER_REAL, old_delay, old_interval)


def load_document(path: str | Path, source: str | None = None) -> Document:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DocumentError(f"cannot read file ({exc.strerror or exc}); check permissions") from None
    return load_bytes(path, data, source)
