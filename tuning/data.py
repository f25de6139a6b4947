"""Training records: reading, format detection, validation, chat rendering, label masking, packing.

Record shapes (detected per file from its first row, or declared with ``data_format``):

- ``{"instruction", "input"?, "output"}``
- ``{"messages": [{"role": "system"|"user"|"assistant", "content"}...]}``
- ``{"question", "answer", "context"?, "system"?}`` (RAFT rows are this shape)
- ``{"text", "label"}`` for classification

Rendering uses the tokenizer's chat template. The template is rendered turn by turn and tokenized in
segments, so the trained tokens are exactly each assistant message plus the end-of-turn EOS (the
model must learn to stop), and the prompt is tokenized exactly as it is at inference time (prompt
rendered with ``add_generation_prompt=True``). Everything else has label -100.
"""

from __future__ import annotations

import itertools
import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from tuning.errors import DataError

FORMATS = ("instruction", "messages", "qa", "classification")
_REQUIRED = {
    "instruction": ("instruction", "output"),
    "messages": ("messages",),
    "qa": ("question", "answer"),
    "classification": ("text", "label"),
}
_FIX = {
    "instruction": 'each row needs {"instruction": "...", "output": "..."} (optional "input")',
    "messages": 'each row needs {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}',
    "qa": 'each row needs {"question": "...", "answer": "..."} (optional "context")',
    "classification": 'each row needs {"text": "...", "label": "..."}',
}
# Used only when a tokenizer has no chat template (base models): plain ChatML.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
MAX_ERRORS_SHOWN = 10


@dataclass
class Record:
    """One validated row: chat messages (sft) or text/label (classification), with where it came from."""

    task: str
    source: str  # "file:row"
    messages: list[dict[str, str]] | None = None
    text: str | None = None
    label: str | None = None


@dataclass
class TokenStats:
    rows: int = 0
    kept: int = 0
    dropped_overlong: int = 0
    truncated: int = 0
    dropped_no_target: int = 0
    tokens: int = 0
    target_tokens: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


# --------------------------------------------------------------------------------------------- reading

def read_rows(path: str | Path) -> list[tuple[int, Any]]:
    """(row number, row) pairs. JSONL is parsed here (errors name the line); other formats via ``datasets``."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{path}: file not found (check the path in `data`, relative paths resolve against the config file)")
    suffix = p.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        rows = []
        with open(p, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    rows.append((n, json.loads(line)))
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}, row {n}: not valid JSON ({exc.msg} at column {exc.colno}); each line must be one JSON object") from None
        return rows
    if suffix == ".json":
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno}); use a JSON list of objects or JSONL") from None
        if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
            data = next(iter(data.values()))
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of objects (or JSONL, one object per line)")
        return list(enumerate(data, 1))
    loaders = {".csv": "csv", ".tsv": "csv", ".parquet": "parquet", ".arrow": "arrow", ".txt": "text"}
    if suffix not in loaders:
        raise DataError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .json, .csv, .tsv or .parquet")
    import datasets

    kwargs = {"delimiter": "\t"} if suffix == ".tsv" else {}
    try:
        ds = datasets.load_dataset(loaders[suffix], data_files=str(p), split="train", **kwargs)
    except Exception as exc:  # datasets raises many types; the message is what the user needs
        raise DataError(f"{path}: could not be read ({exc}); check the file is valid {suffix[1:]}") from None
    return [(i + 2 if loaders[suffix] == "csv" else i + 1, row) for i, row in enumerate(ds)]


def detect_format(row: Any) -> str | None:
    if not isinstance(row, dict):
        return None
    if "messages" in row:
        return "messages"
    if "instruction" in row and "output" in row:
        return "instruction"
    if "question" in row and "answer" in row:
        return "qa"
    if "text" in row and "label" in row:
        return "classification"
    return None


def _check_str(where: str, row: dict, key: str, required: bool, errors: list[str], fix: str) -> None:
    if key not in row or row[key] is None:
        if required:
            errors.append(f"{where}, field '{key}': missing. Fix: {fix}")
        return
    if not isinstance(row[key], str):
        errors.append(f"{where}, field '{key}': expected a string, got {type(row[key]).__name__}. Fix: {fix}")
    elif required and not row[key].strip():
        errors.append(f"{where}, field '{key}': empty. Fix: give it text or remove the row")


def validate_row(row: Any, fmt: str, where: str, errors: list[str]) -> None:
    """Append one message per problem to ``errors`` (file, row, field, how to fix)."""
    fix = _FIX[fmt]
    if not isinstance(row, dict):
        errors.append(f"{where}: expected a JSON object, got {type(row).__name__}. Fix: {fix}")
        return
    if fmt == "instruction":
        _check_str(where, row, "instruction", True, errors, fix)
        _check_str(where, row, "input", False, errors, fix)
        _check_str(where, row, "output", True, errors, fix)
    elif fmt == "qa":
        _check_str(where, row, "question", True, errors, fix)
        _check_str(where, row, "answer", True, errors, fix)
        _check_str(where, row, "context", False, errors, fix)
        _check_str(where, row, "system", False, errors, fix)
    elif fmt == "classification":
        _check_str(where, row, "text", True, errors, fix)
        label = row.get("label")
        if label is None or isinstance(label, (bool, float, dict, list)) or (isinstance(label, str) and not label.strip()):
            errors.append(f"{where}, field 'label': expected a non-empty string or integer, got {label!r}. Fix: {fix}")
    elif fmt == "messages":
        msgs = row.get("messages")
        if not isinstance(msgs, list) or not msgs:
            errors.append(f"{where}, field 'messages': expected a non-empty list. Fix: {fix}")
            return
        for j, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") or not isinstance(m.get("content"), str):
                errors.append(f"{where}, field 'messages[{j}]': needs role system/user/assistant and string content. Fix: {fix}")
                return
        if msgs[-1]["role"] != "assistant":
            errors.append(f"{where}, field 'messages[{len(msgs) - 1}]': the last message must be the assistant's answer (it is what is trained)")
        elif not msgs[-1]["content"].strip():
            errors.append(f"{where}, field 'messages[{len(msgs) - 1}].content': empty assistant answer. Fix: give it text or remove the row")


def to_messages(row: dict, fmt: str, system_prompt: str | None = None) -> list[dict[str, str]]:
    if fmt == "messages":
        msgs = [{"role": m["role"], "content": m["content"].strip() if m["role"] == "assistant" else m["content"]}
                for m in row["messages"]]
    elif fmt == "instruction":
        user = row["instruction"].strip()
        if row.get("input") and row["input"].strip():
            user += "\n\n" + row["input"].strip()
        msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"].strip()}]
    elif fmt == "qa":
        user = row["question"].strip()
        if row.get("context") and row["context"].strip():
            user = f"{row['context'].strip()}\n\nQuestion: {user}"
        msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": row["answer"].strip()}]
        if row.get("system") and row["system"].strip():  # RAFT rows carry the RAG system prompt they are served with
            msgs.insert(0, {"role": "system", "content": row["system"].strip()})
    else:
        raise DataError(f"format {fmt!r} has no chat rendering; classification rows need task: classification")
    if system_prompt and msgs[0]["role"] != "system":
        msgs.insert(0, {"role": "system", "content": system_prompt})
    return msgs


def load_records(path: str | Path, task: str, data_format: str = "auto", system_prompt: str | None = None,
                 expect: str = "sft") -> list[Record]:
    """Read and validate one file; raise :class:`DataError` listing every bad row (nothing trains on bad data)."""
    rows = read_rows(path)
    if not rows:
        raise DataError(f"{path}: no rows; add at least one example")
    fmt = data_format
    if fmt == "auto":
        fmt = detect_format(rows[0][1])
        if fmt is None:
            keys = sorted(rows[0][1]) if isinstance(rows[0][1], dict) else type(rows[0][1]).__name__
            raise DataError(f"{path}, row {rows[0][0]}: cannot tell the record shape from keys {keys}. Fix: use one of "
                            "{instruction, input?, output}, {messages}, {question, answer, context?}, {text, label}, "
                            "or set data_format")
    if expect == "classification" and fmt != "classification":
        raise DataError(f"{path}: task=classification needs {{text, label}} rows, this file has {fmt} rows")
    if expect == "sft" and fmt == "classification":
        raise DataError(f"{path}: {{text, label}} rows are for classification; set task=classification")
    errors: list[str] = []
    for n, row in rows:
        validate_row(row, fmt, f"{path}, row {n}", errors)
    if errors:
        shown = "\n  ".join(errors[:MAX_ERRORS_SHOWN])
        more = f"\n  ... and {len(errors) - MAX_ERRORS_SHOWN} more" if len(errors) > MAX_ERRORS_SHOWN else ""
        raise DataError(f"{len(errors)} invalid row(s) in {path}; nothing was trained:\n  {shown}{more}")
    out = []
    for n, row in rows:
        where = f"{path}:{n}"
        if fmt == "classification":
            out.append(Record(task, where, text=row["text"], label=str(row["label"])))
        else:
            out.append(Record(task, where, messages=to_messages(row, fmt, system_prompt)))
    return out


def split_records(records: list[Record], share: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Hold out ``share`` of each task's rows (at least one when share > 0 and a task has 2+ rows)."""
    if share <= 0:
        return records, []
    by_task: dict[str, list[Record]] = {}
    for r in records:
        by_task.setdefault(r.task, []).append(r)
    train, val = [], []
    rng = random.Random(seed)
    for task in sorted(by_task):
        rows = list(by_task[task])
        rng.shuffle(rows)
        n_val = max(1, round(len(rows) * share)) if len(rows) > 1 else 0
        val += rows[:n_val]
        train += rows[n_val:]
    return train, val


# ------------------------------------------------------------------------------------ render and mask

def ensure_chat_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE


def _render(tokenizer, messages, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def render_segments(tokenizer, messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, trained) segments; trained text is each assistant reply.

    The end-of-turn token after each reply is returned as its own trained segment (EOS is always trained).
    """
    ensure_chat_template(tokenizer)
    whole = _render(tokenizer, messages, False)
    eos = tokenizer.eos_token
    special = sorted((t for t in getattr(tokenizer, "all_special_tokens", []) if t), key=len, reverse=True)
    segments: list[tuple[str, bool]] = []
    pos = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = _render(tokenizer, messages[:i], True)
        content = message["content"]
        start = len(prefix)
        if not whole.startswith(prefix) or not whole[start:].startswith(content) or start < pos:
            raise DataError("the tokenizer's chat template changes earlier turns or the reply text when it renders a "
                            "conversation, so the answer tokens cannot be located; use a model whose template renders "
                            "turns verbatim (ChatML-style) or set its chat_template")
        segments.append((whole[pos:start], False))
        segments.append((content, True))
        pos = start + len(content)
        after = whole[pos:]
        end_marker = next((t for t in ([eos] + special) if t and after.startswith(t)), None)
        if end_marker is not None:
            segments.append((end_marker, True))
            pos += len(end_marker)
        else:
            segments.append((eos, True))  # the template has no end-of-turn token: append EOS so the model learns to stop
    segments.append((whole[pos:], False))
    return [(t, trained) for t, trained in segments if t]


def tokenize_example(tokenizer, messages: list[dict[str, str]], max_len: int, overlong: str,
                     stats: TokenStats | None = None) -> dict[str, list[int]] | None:
    """input_ids and labels (-100 outside the assistant replies + EOS); None if the row is dropped."""
    ids: list[int] = []
    labels: list[int] = []
    for text, trained in render_segments(tokenizer, messages):
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if trained else [-100] * len(piece)
    if stats is not None:
        stats.rows += 1
    if len(ids) > max_len:
        if overlong == "drop":
            if stats is not None:
                stats.dropped_overlong += 1
            return None
        ids, labels = ids[:max_len], labels[:max_len]
        if stats is not None:
            stats.truncated += 1
    if all(label == -100 for label in labels[1:]):
        if stats is not None:
            stats.dropped_no_target += 1
        return None
    if stats is not None:
        stats.kept += 1
        stats.tokens += len(ids)
        stats.target_tokens += sum(1 for label in labels[1:] if label != -100)
    return {"input_ids": ids, "labels": labels}


def tokenize_records(tokenizer, records: Iterable[Record], max_len: int, overlong: str) -> tuple[list[dict], TokenStats]:
    stats = TokenStats()
    out = []
    for r in records:
        ex = tokenize_example(tokenizer, r.messages or [], max_len, overlong, stats)
        if ex is not None:
            ex["task"] = r.task
            out.append(ex)
    return out, stats


# ---------------------------------------------------------------------------------------------- batches

@dataclass
class PackingCollator:
    """Batches for causal-LM SFT without padding waste.

    ``packing=True``: the batch's examples go end to end in one row of exactly their total length (no pad
    token at all), ``position_ids`` restart at 0 for each example, and ``cu_seqlens`` holds the example
    boundaries ``[0, l1, l1 + l2, ..., T]``. The trainer hands them to :mod:`tuning.attention`, which runs
    causal attention one example at a time; a model that cannot take them still never attends across
    examples, because transformers builds a block-diagonal mask from restarting ``position_ids``
    (``find_packed_sequence_indices``). ``packing=False``: one example per row, right padding and an
    attention mask.

    Also returns ``shift_labels`` (labels moved one left), which is what the loss and Trainer's token count
    use, and ``row_tokens`` (real tokens per row).
    """

    pad_token_id: int
    packing: bool = True

    def __call__(self, features: list[dict]) -> dict:
        import torch

        if self.packing:
            lengths = [len(f["input_ids"]) for f in features]
            input_ids = torch.tensor([t for f in features for t in f["input_ids"]], dtype=torch.long)[None]
            labels = torch.tensor([-100 if i == 0 else t for f in features for i, t in enumerate(f["labels"])],
                                  dtype=torch.long)[None]  # never predict an example's first token from the one before
            position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
            batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
                     "cu_seqlens": torch.tensor([0, *itertools.accumulate(lengths)]),
                     "row_tokens": torch.tensor([sum(lengths)])}
        else:
            width = max(len(f["input_ids"]) for f in features)
            n = len(features)
            input_ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
            labels = torch.full((n, width), -100, dtype=torch.long)
            attention = torch.zeros((n, width), dtype=torch.long)
            for r, f in enumerate(features):
                length = len(f["input_ids"])
                input_ids[r, :length] = torch.tensor(f["input_ids"])
                labels[r, 1:length] = torch.tensor(f["labels"][1:])
                attention[r, :length] = 1
            batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention,
                     "row_tokens": attention.sum(dim=1)}
        shift_labels = torch.full_like(batch["labels"], -100)
        shift_labels[:, :-1] = batch["labels"][:, 1:]
        batch["shift_labels"] = shift_labels
        return batch


def label_counts(records: list[Record]) -> Counter:
    return Counter(r.label for r in records)
