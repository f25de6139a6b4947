"""From what users say to training data: corrections, thumbs and arena votes -> rows.

    ragtune feedback export -c corvida --out data/feedback.jsonl [--thumbs-up] [--include-changed]

- A **correction** is stored with the answer it corrects (question, mode, adapter, collection version
  and the exact sources the answer saw, their text included) and each source document's content hash
  at that moment (:func:`record_correction`).
- The **export** turns corrections into SFT rows in the RAFT layout serving renders (``system`` +
  ``context`` = the numbered sources exactly as ``tuning.raft.format_context`` writes them + ``question``
  -> ``answer``; ``tuning.data`` trains the answer only). A correction that names the source holding
  the answer cites it (``... [n]``); "not in the sources" becomes the abstention target (the refusal
  sentence RAFT abstention rows use). Thumbs-up answers become rows too with ``thumbs_up=True``.
  Arena votes with a winner, and every correction (corrected vs original answer), become preference
  pairs ``{prompt, chosen, rejected}`` (``<out>.pairs.jsonl``) for ``task: dpo``.
- ``sources="whole"`` (the default) writes each source as the whole chunk that holds it, the layout
  ``rag+ft`` reads by default (``ragft_evidence_sentences=0``): an answer that saw one evidence sentence
  (the ``rag`` defaults) is trained with that sentence's chunk, so the candidate learns the layout it
  will be served with. ``sources="as_seen"`` keeps the exact extracts the answer saw.
- Rows are deduplicated on their prompt (system, context, question): the newest feedback wins, and
  the row lists every feedback id it stands for (``feedback``). Rows are sorted by feedback id and
  written with sorted keys and no timestamps: the same feedback gives the same file, byte for byte
  (``sha256`` in the report).
- Feedback on a document that changed since (its content hash differs, or the source text no longer
  sits at its span, or the document is gone) is **flagged** and left out unless ``include_changed``;
  the report lists it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from core.files import write_atomic
from tuning.raft import REFUSAL, SYSTEM_PLAIN, SYSTEM_RAG, format_context

CHANGED = "changed_document"


class FeedbackError(ValueError):
    """A correction or an export that cannot be done; the message says how to fix it."""


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _collection(workspace: Any, name: str | None):
    if not name:
        return None
    try:
        return workspace.get(name)
    except Exception:  # dropped since: every source then counts as changed
        return None


def document_hashes(workspace: Any, collection: str | None, sources: list[dict[str, Any]]) -> dict[str, str | None]:
    """Content hash of each source's document now (None when it is gone)."""
    col = _collection(workspace, collection)
    out: dict[str, str | None] = {}
    for s in sources:
        doc = s["doc"]
        if doc in out:
            continue
        try:
            out[doc] = text_hash(col.document_text(doc)) if col is not None else None
        except Exception:
            out[doc] = None
    return out


def record_correction(store: Any, workspace: Any, message_id: int, correction: str, source_n: int | None = None,
                      not_in_sources: bool = False) -> int:
    """Store the right answer for answer ``message_id``; returns the correction id.

    ``source_n``: the number of the source that holds the answer (as shown with the answer);
    ``not_in_sources``: none of the sources holds it (the export then trains the abstention sentence)."""
    correction = (correction or "").strip()
    if not correction and not not_in_sources:
        raise FeedbackError("empty correction: write the right answer (or mark it as not in the sources)")
    if len(correction) > 4000:
        raise FeedbackError(f"the correction is {len(correction)} characters; keep it under 4,000")
    answer = store.answer_row(message_id)
    if answer is None:
        raise FeedbackError(f"no answer with id {message_id} to correct")
    sources = answer["sources"]
    if source_n is not None and not_in_sources:
        raise FeedbackError("pick a source or 'not in the sources', not both")
    if source_n is not None and source_n not in {s["n"] for s in sources}:
        shown = ", ".join(str(s["n"]) for s in sources) or "none"
        raise FeedbackError(f"source [{source_n}] was not shown with this answer (sources: {shown})")
    hashes = document_hashes(workspace, answer.get("collection"), sources)
    return store.add_correction(message_id, correction, source_n, not_in_sources, hashes)


@dataclass
class ExportReport:
    out: str
    pairs_out: str
    rows: int = 0
    pairs: int = 0
    corrections: int = 0
    abstention_rows: int = 0
    thumbs_up_rows: int = 0
    arena_pairs: int = 0
    correction_pairs: int = 0
    duplicates_merged: int = 0
    flagged_changed: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    sha256: str = ""
    pairs_sha256: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _changed(workspace: Any, collection: str | None, sources: list[dict[str, Any]], hashes: dict[str, Any]) -> list[str]:
    """Documents of ``sources`` that differ from when the feedback was given."""
    col = _collection(workspace, collection)
    changed = []
    for s in sources:
        doc = s["doc"]
        if doc in changed:
            continue
        try:
            text = col.document_text(doc) if col is not None else None
        except Exception:
            text = None
        if text is None or text[s["start"]:s["end"]] != s["text"] or (doc in hashes and hashes[doc] != text_hash(text)):
            changed.append(doc)
    return changed


SOURCE_LAYOUTS = ("whole", "as_seen")


def whole_chunks(workspace: Any, collection: str | None, sources: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each source widened to the chunk of its document that holds its span (an evidence sentence becomes its
    chunk; a whole chunk stays as it is); numbering, document and metadata kept. A source whose chunk cannot
    be found (the collection or document is gone) stays as it was seen."""
    col = _collection(workspace, collection)
    if col is None:
        return sources
    out, chunks = [], {}
    for s in sources:
        doc = s.get("doc")
        if doc not in chunks:
            try:
                chunks[doc] = col.chunks(doc)
            except Exception:  # noqa: BLE001 - a document that is gone: the source stays as seen
                chunks[doc] = []
        holder = next((c for c in chunks[doc] if c.start <= s.get("start", -1) and s.get("end", -1) <= c.end), None)
        out.append({**s, "text": holder.text, "start": holder.start, "end": holder.end} if holder is not None else s)
    return out


def _prompt(mode: str, question: str, sources: list[dict[str, Any]]) -> dict[str, Any]:
    """system / context / question exactly as serving renders them for ``mode``."""
    if mode in ("rag", "rag+ft"):
        context = format_context([{"doc": s["doc"], "text": s["text"], "section": (s.get("metadata") or {}).get("section")}
                                  for s in sources]) if sources else ""
        return {"system": SYSTEM_RAG, "context": context, "question": question.strip()}
    return {"system": SYSTEM_PLAIN, "context": "", "question": question.strip()}


def _target(correction: dict[str, Any], refusal: str) -> str:
    if correction["not_in_sources"]:
        return refusal
    text = correction["correction"].strip()
    n = correction.get("source_n")
    if n is not None and f"[{n}]" not in text:
        text = f"{text} [{n}]"
    return text


def _key(prompt: dict[str, Any]) -> str:
    return text_hash(json.dumps([prompt["system"], prompt["context"], prompt["question"]]))


def build_rows(store: Any, ab_store: Any, workspace: Any, collection: str, *, thumbs_up: bool = False,
               include_changed: bool = False, refusal: str = REFUSAL,
               sources: str = "whole") -> tuple[list[dict], list[dict], ExportReport]:
    """(SFT rows, preference pairs, report) from the feedback on ``collection``; ``sources``: see the module."""
    if sources not in SOURCE_LAYOUTS:
        raise FeedbackError(f"sources={sources!r}: use 'whole' (the chunks, as rag+ft reads them) or 'as_seen'")

    def shown(row: dict[str, Any]) -> list[dict[str, Any]]:
        return whole_chunks(workspace, row.get("collection"), row["sources"]) if sources == "whole" else row["sources"]

    report = ExportReport(out="", pairs_out="")
    rows: dict[str, dict[str, Any]] = {}
    pairs: dict[str, dict[str, Any]] = {}

    def flag(kind: str, fid: int, question: str, changed: list[str]) -> bool:
        if not changed:
            return False
        report.flagged_changed.append({"feedback": f"{kind}:{fid}", "question": question, "documents": changed,
                                       "used": include_changed})
        return not include_changed

    def put_row(prompt: dict[str, Any], answer: str, fid: str, row_type: str, meta: dict[str, Any], changed: list[str]) -> None:
        key = _key(prompt)
        previous = rows.get(key)
        if previous is not None:
            report.duplicates_merged += 1
            if row_type == "thumbs_up" and previous["row_type"] != "thumbs_up":
                previous["feedback"].append(fid)  # a correction of the same prompt outranks a thumbs-up
                return
        row = {"id": f"feedback-{key[:12]}", **prompt, "answer": answer, "row_type": row_type,
               "feedback": (previous["feedback"] if previous else []) + [fid], **meta}
        if changed:
            row["flags"] = [CHANGED]
            row["changed_documents"] = changed
        if not row["context"]:
            del row["context"]
        rows[key] = row

    def put_pair(prompt: dict[str, Any], chosen: str, rejected: str, fid: str, meta: dict[str, Any]) -> bool:
        chosen, rejected = chosen.strip(), rejected.strip()
        if not chosen or not rejected or chosen == rejected:
            return False
        key = text_hash(json.dumps([prompt["system"], prompt["context"], prompt["question"], chosen, rejected]))
        if key in pairs:
            report.duplicates_merged += 1
            pairs[key]["feedback"].append(fid)
            return True
        pair = {"id": f"pair-{key[:12]}", **prompt, "prompt": prompt["question"], "chosen": chosen, "rejected": rejected,
                "feedback": [fid], **meta}
        if not pair["context"]:
            del pair["context"]
        pairs[key] = pair
        return True

    for c in store.corrections(collection):
        report.corrections += 1
        changed = _changed(workspace, c["collection"], c["sources"], c["doc_hashes"])
        if flag("correction", c["id"], c["question"], changed):
            continue
        prompt = _prompt(c["mode"], c["question"], shown(c))
        target = _target(c, refusal)
        meta = {"mode": c["mode"], "adapter": c["adapter"], "collection": c["collection"],
                "collection_version": c["collection_version"]}
        put_row(prompt, target, f"correction:{c['id']}", "abstain" if c["not_in_sources"] else "correction", meta, changed)
        if put_pair(prompt, target, c["answer"], f"correction:{c['id']}", {**meta, "source": "correction"}):
            report.correction_pairs += 1
    if thumbs_up:
        for a in store.thumbs_up(collection):
            changed = _changed(workspace, a["collection"], a["sources"], {})
            if flag("thumbs_up", a["feedback_id"], a["question"], changed):
                continue
            prompt = _prompt(a["mode"], a["question"], shown(a))
            put_row(prompt, a["content"], f"thumbs_up:{a['feedback_id']}", "thumbs_up",
                    {"mode": a["mode"], "adapter": a["adapter"], "collection": a["collection"],
                     "collection_version": a["collection_version"]}, changed)
    for v in ab_store.vote_rows(collection):
        if v["outcome"] not in ("a", "b"):
            continue  # a tie or "both bad" names no winner
        chosen, rejected = (v["answer_a"], v["answer_b"]) if v["outcome"] == "a" else (v["answer_b"], v["answer_a"])
        winner, loser = (v["arm_a"], v["arm_b"]) if v["outcome"] == "a" else (v["arm_b"], v["arm_a"])
        # the arena stores the answers, not the sources each arm saw: the pair's prompt is the question alone
        prompt = _prompt("base", v["question"], [])
        if put_pair(prompt, chosen, rejected, f"arena:{v['id']}", {"source": "arena", "winner": winner, "loser": loser,
                                                                    "collection": v["collection"], "adapter": v["adapter"]}):
            report.arena_pairs += 1
        else:
            report.skipped.append({"feedback": f"arena:{v['id']}", "why": "the two answers are the same text or empty"})

    def order(row: dict[str, Any]) -> tuple:
        kind, _, number = row["feedback"][0].partition(":")
        return (kind, int(number))

    out_rows = sorted(rows.values(), key=order)
    out_pairs = sorted(pairs.values(), key=order)
    report.rows, report.pairs = len(out_rows), len(out_pairs)
    report.abstention_rows = sum(r["row_type"] == "abstain" for r in out_rows)
    report.thumbs_up_rows = sum(r["row_type"] == "thumbs_up" for r in out_rows)
    return out_rows, out_pairs, report


def _write(path: Path, rows: list[dict[str, Any]]) -> str:
    data = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows).encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, data)
    return hashlib.sha256(data).hexdigest()


def pairs_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.stem + ".pairs" + (out.suffix or ".jsonl"))


def export_feedback(home: str | Path | None, collection: str, out: str | Path, *, thumbs_up: bool = False,
                    include_changed: bool = False, pairs_out: str | Path | None = None,
                    refusal: str = REFUSAL, sources: str = "whole") -> ExportReport:
    """Write the SFT rows to ``out`` and the preference pairs to ``pairs_out`` (default ``<out>.pairs.jsonl``)."""
    from rag.collection import Workspace
    from serving.ab.runs import ABStore
    from serving.history import ChatStore

    workspace = Workspace(home)
    workspace.get(collection)  # a missing collection says so (CollectionError) before anything is written
    store, ab_store = ChatStore(workspace.db_path), ABStore(workspace.db_path)
    rows, pairs, report = build_rows(store, ab_store, workspace, collection, thumbs_up=thumbs_up,
                                     include_changed=include_changed, refusal=refusal, sources=sources)
    out = Path(out)
    if out.is_dir():
        raise FeedbackError(f"--out {out} is a folder; give a file name such as {out / 'feedback.jsonl'}")
    pout = Path(pairs_out) if pairs_out else pairs_path(out)
    report.out, report.pairs_out = str(out), str(pout)
    report.sha256 = _write(out, rows)
    report.pairs_sha256 = _write(pout, pairs)
    return report


def pending(home: str | Path | None, collection: str) -> dict[str, int]:
    """What is waiting to become training data for ``collection`` (the Tuning page's "From feedback" panel)."""
    from rag.collection import Workspace
    from serving.ab.runs import ABStore
    from serving.history import ChatStore

    workspace = Workspace(home)
    store, ab_store = ChatStore(workspace.db_path), ABStore(workspace.db_path)
    votes = ab_store.vote_rows(collection)
    return {"corrections": len(store.corrections(collection)), "thumbs_up": len(store.thumbs_up(collection)),
            "arena_votes": sum(v["outcome"] in ("a", "b") for v in votes)}
