"""General-ability probe, run before and after training to measure catastrophic forgetting.

- perplexity of the model on ``corpora/general/prose/*.md`` (plain text, 512-token windows);
- accuracy on ``corpora/general/questions.jsonl``: each choice is scored by the mean log-probability of
  its tokens after ``Question: ...\\nAnswer:`` and the top-ranked choice is the model's answer
  (random guessing scores 25%).

Nothing in these files mentions the demo domain, so a drop after tuning is forgetting, not a shift in
topic. Replay mixing (``new_task`` with ``p0``/``p1``) is the knob that reduces it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

WINDOW = 512


def general_corpus_dir() -> Path | None:
    here = Path(__file__).resolve().parent.parent / "corpora" / "general"
    return here if here.exists() else None


@torch.no_grad()
def prose_perplexity(model, tokenizer, files: list[Path], device) -> tuple[float, int]:
    total, count = 0.0, 0
    for f in files:
        ids = tokenizer(f.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
        for start in range(0, max(len(ids) - 1, 1), WINDOW):
            window = torch.tensor(ids[start:start + WINDOW + 1], device=device)[None]
            if window.shape[1] < 2:
                continue
            logits = model(input_ids=window[:, :-1], use_cache=False).logits.float()
            total += float(torch.nn.functional.cross_entropy(logits[0], window[0, 1:], reduction="sum"))
            count += window.shape[1] - 1
    return math.exp(total / max(count, 1)), count


@torch.no_grad()
def choice_accuracy(model, tokenizer, rows: list[dict], device) -> float:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    correct = 0
    for row in rows:
        prompt = tokenizer(f"Question: {row['question']}\nAnswer:", add_special_tokens=False)["input_ids"]
        seqs, spans = [], []
        for choice in row["choices"]:
            c = tokenizer(" " + str(choice), add_special_tokens=False)["input_ids"]
            seqs.append(prompt + c)
            spans.append((len(prompt), len(prompt) + len(c)))
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = torch.tensor(s)
            mask[i, :len(s)] = 1
        logp = torch.log_softmax(model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits.float(), -1)
        scores = []
        for i, (a, b) in enumerate(spans):
            targets = ids[i, a:b].to(device)
            scores.append(float(logp[i, a - 1:b - 1].gather(-1, targets[:, None]).mean()))
        answer = row["answer"]
        best = row["choices"][max(range(len(scores)), key=scores.__getitem__)]
        correct += int(best == answer or (isinstance(answer, int) and row["choices"][answer] == best))
    return correct / max(len(rows), 1)


def run_probe(model, tokenizer, device, limit: int = 0, corpus: Path | None = None) -> dict | None:
    """{"perplexity", "qa_accuracy", "prose_tokens", "questions"} or None when the corpus is absent."""
    corpus = corpus or general_corpus_dir()
    if corpus is None:
        return None
    files = sorted((corpus / "prose").glob("*.md"))
    qfile = corpus / "questions.jsonl"
    rows = [json.loads(line) for line in qfile.read_text(encoding="utf-8").splitlines() if line.strip()] if qfile.exists() else []
    if limit > 0:
        files, rows = files[:limit], rows[:limit]
    was_training = model.training
    model.eval()
    try:
        ppl, tokens = prose_perplexity(model, tokenizer, files, device) if files else (float("nan"), 0)
        acc = choice_accuracy(model, tokenizer, rows, device) if rows else float("nan")
    finally:
        if was_training:
            model.train()
    return {"perplexity": round(ppl, 4), "qa_accuracy": round(acc, 4), "prose_tokens": tokens, "questions": len(rows)}


def compare(before: dict | None, after: dict | None) -> dict | None:
    if not before or not after:
        return None
    change = (after["perplexity"] / before["perplexity"] - 1.0) * 100 if before["perplexity"] else float("nan")
    return {"before": before, "after": after, "perplexity_change_pct": round(change, 2),
            "qa_accuracy_change": round(after["qa_accuracy"] - before["qa_accuracy"], 4)}


def describe(result: dict | None) -> str:
    if not result:
        return "forgetting probe: skipped (corpora/general not found)"
    return (f"general perplexity {result['perplexity_change_pct']:+.1f}% "
            f"({result['before']['perplexity']:.2f} -> {result['after']['perplexity']:.2f}), "
            f"general QA accuracy {result['before']['qa_accuracy']:.0%} -> {result['after']['qa_accuracy']:.0%}")
