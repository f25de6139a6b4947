"""Build a simple one-column A4 PDF (with a real text layer) from a plain-text source.

This is a corpus-building tool, not a runtime dependency of ragtune. It needs fpdf2:

    pip install fpdf2

(for example in a throwaway virtual environment:
``python3 -m venv /tmp/pdfvenv && /tmp/pdfvenv/bin/pip install fpdf2 pypdf``).

Usage:

    python make_pdf.py SRC.txt OUT.pdf

Source format (UTF-8 plain text):

- a line starting with ``# `` is a title (large heading);
- a line starting with ``## `` is a section heading;
- a line starting with ``- `` is a bullet item;
- other consecutive non-blank lines are joined into one paragraph;
- blank lines separate paragraphs.

The PDF uses the core Helvetica font, which only covers latin-1. Common typographic characters
(curly quotes, dashes, ellipsis, non-breaking space, ...) are mapped to ASCII equivalents and
anything else outside latin-1 becomes ``?``. Write sources in plain ASCII where you can, so that
the text pypdf extracts from the PDF matches what you wrote.
"""

from __future__ import annotations

import sys
from pathlib import Path

from fpdf import FPDF

_REPLACEMENTS = {
    "\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'",
    "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u201f": '"',
    "\u2013": "-", "\u2014": "-", "\u2015": "-", "\u2212": "-", "\u2010": "-", "\u2011": "-",
    "\u2026": "...", "\u00a0": " ", "\u2009": " ", "\u202f": " ", "\u2002": " ", "\u2003": " ",
    "\u2022": "-", "\u2192": "->", "\u2190": "<-", "\u2264": "<=", "\u2265": ">=",
    "\u2122": "(TM)", "\u20ac": "EUR",
}


def to_latin1(text: str) -> str:
    """Map text onto latin-1 so the core fonts can render it."""
    out = []
    for ch in text:
        ch = _REPLACEMENTS.get(ch, ch)
        try:
            ch.encode("latin-1")
        except UnicodeEncodeError:
            ch = "?"
        out.append(ch)
    return "".join(out)


def parse(source: str) -> list[tuple[str, str]]:
    """Split the source into blocks: ("h1"|"h2"|"bullet"|"para", text)."""
    blocks: list[tuple[str, str]] = []
    para: list[str] = []

    def flush() -> None:
        if para:
            blocks.append(("para", " ".join(s.strip() for s in para)))
            para.clear()

    for raw in source.splitlines():
        line = raw.rstrip()
        if not line.strip():
            flush()
        elif line.startswith("## "):
            flush()
            blocks.append(("h2", line[3:].strip()))
        elif line.startswith("# "):
            flush()
            blocks.append(("h1", line[2:].strip()))
        elif line.startswith("- "):
            flush()
            blocks.append(("bullet", line[2:].strip()))
        elif blocks and blocks[-1][0] == "bullet" and not para and raw[:1] in (" ", "\t"):
            # indented continuation of a bullet item
            kind, text = blocks[-1]
            blocks[-1] = (kind, text + " " + line.strip())
        else:
            para.append(line)
    flush()
    return blocks


class _Doc(FPDF):
    def footer(self) -> None:
        self.set_y(-15)
        self.set_font("Helvetica", size=8)
        self.set_text_color(110, 110, 110)
        self.cell(0, 10, f"Page {self.page_no()}", align="C")
        self.set_text_color(0, 0, 0)


def build(src: Path, out: Path) -> None:
    blocks = parse(src.read_text(encoding="utf-8"))
    pdf = _Doc(orientation="P", unit="mm", format="A4")
    pdf.set_margins(20, 20, 20)
    pdf.set_auto_page_break(auto=True, margin=20)
    title = next((t for k, t in blocks if k == "h1"), src.stem)
    pdf.set_title(to_latin1(title))
    pdf.set_creator("ragtune corpora/corvida/tools/make_pdf.py")
    pdf.add_page()
    width = pdf.w - pdf.l_margin - pdf.r_margin
    prev = None
    for kind, text in blocks:
        text = to_latin1(text)
        pdf.set_x(pdf.l_margin)
        if kind == "h1":
            if prev is not None:
                pdf.ln(4)
            pdf.set_font("Helvetica", style="B", size=16)
            pdf.multi_cell(width, 8, text)
            pdf.ln(3)
        elif kind == "h2":
            pdf.ln(3)
            pdf.set_font("Helvetica", style="B", size=12.5)
            pdf.multi_cell(width, 6.5, text)
            pdf.ln(1.5)
        elif kind == "bullet":
            pdf.set_font("Helvetica", size=10.5)
            pdf.set_x(pdf.l_margin + 4)
            pdf.multi_cell(width - 4, 5.2, "- " + text)
            pdf.ln(0.8)
        else:
            if prev == "bullet":
                pdf.ln(1.5)
            pdf.set_font("Helvetica", size=10.5)
            pdf.multi_cell(width, 5.2, text)
            pdf.ln(2.5)
        prev = kind
    out.parent.mkdir(parents=True, exist_ok=True)
    pdf.output(str(out))


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: python make_pdf.py SRC.txt OUT.pdf", file=sys.stderr)
        return 2
    build(Path(argv[1]), Path(argv[2]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
