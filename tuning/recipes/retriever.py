"""Retriever tuning: fine-tune a collection's sentence-transformers embedder on its training questions.

    ragtune tune-retriever -c corvida --questions corpora/corvida/qa/train.jsonl --name corvida-minilm
    ragtune reindex corvida --model ~/.local/share/ragtune/retrievers/corvida-minilm

Reads top to bottom: (question, oracle chunk) pairs from the collection (the chunk holding the
answer's span, as RAFT rows pick it; with ``positives="sentence"`` the sentence of that chunk holding
the span, which is what the answer-time evidence ranker, ``serving.evidence``, scores with the same
embedder; ``"both"`` trains on the two) -> hit@1/hit@4 of the current embedder on those questions
(dense search over every chunk of the collection) -> sentence-transformers' own trainer with
``MultipleNegativesRankingLoss`` (in-batch negatives; a batch sampler that keeps duplicates of one
chunk out of a batch, so no positive is another row's negative) -> hit@1/hit@4 again -> the model
folder (``SentenceTransformer.save``, safetensors) + ``ragtune.json`` under ``<home>/retrievers/<name>/``,
written to a temp folder and renamed, like an adapter. A collection uses it only after
``ragtune reindex C --model FOLDER`` (adding documents embedded by another model is refused).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from tuning.errors import TuningError

MANIFEST = "ragtune.json"


POSITIVES = ("chunk", "sentence", "both")


def answer_sentence(chunk, span: tuple[int, int]) -> str | None:
    """The sentence (as the evidence ranker splits them) of ``chunk`` that overlaps the answer span most."""
    from rag.chunking import split_sentences

    best, best_overlap = None, 0
    for a, b in split_sentences(chunk.text):
        overlap = min(chunk.start + b, span[1]) - max(chunk.start + a, span[0])
        if overlap > best_overlap:
            best, best_overlap = chunk.text[a:b], overlap
    return best


def training_pairs(col, questions: list[dict], positives: str = "chunk") -> list[dict]:
    """(question, oracle chunk id, positive text) for each question whose span lies in a collection
    document; the positive is the oracle chunk, the sentence of it holding the span, or one pair of each."""
    from tuning.raft import _find_doc, _oracle_chunk

    if positives not in POSITIVES:
        raise TuningError(f"positives={positives!r} is not one of {', '.join(POSITIVES)}")
    known = [d["path"] for d in col.documents()]
    pairs = []
    for q in questions:
        doc = _find_doc(col, q.get("doc") or "", known) if q.get("doc") else None
        span = q.get("span")
        if not doc or not span or len(span) != 2 or not str(q.get("question", "")).strip():
            continue
        span = (int(span[0]), int(span[1]))
        chunk = _oracle_chunk(col, doc, span)
        if chunk is None:
            continue
        question = str(q["question"]).strip()
        if positives in ("chunk", "both"):
            pairs.append({"question": question, "chunk_id": chunk.id, "text": chunk.text})
        sentence = answer_sentence(chunk, span) if positives in ("sentence", "both") else None
        if sentence:
            pairs.append({"question": question, "chunk_id": chunk.id, "text": sentence})
    return pairs


def hit_at_k(model, col, pairs: list[dict], ks=(1, 4)) -> dict[str, float]:
    """Dense hit@k of ``model`` over every chunk of ``col`` for the pairs' questions (their oracle chunk)."""
    import numpy as np

    chunks = [c for d in col.documents() for c in col.chunks(d["path"])]
    ids = np.array([c.id for c in chunks])
    corpus = model.encode([c.text for c in chunks], batch_size=32, normalize_embeddings=True, convert_to_numpy=True)
    queries = model.encode([p["question"] for p in pairs], batch_size=32, normalize_embeddings=True, convert_to_numpy=True)
    order = np.argsort(-(queries @ corpus.T), axis=1)
    out = {}
    for k in ks:
        out[f"hit_at_{k}"] = float(np.mean([p["chunk_id"] in set(ids[order[i, :k]]) for i, p in enumerate(pairs)]))
    return out


def train_retriever(home: str | Path, collection: str, questions: list[dict], name: str, epochs: float = 1.0,
                    batch_size: int = 16, learning_rate: float = 2e-5, max_steps: int = -1, seed: int = 42,
                    positives: str = "chunk", echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Train, measure and save; returns the manifest."""
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer.training_args import BatchSamplers

    from core.workspace import Layout
    from rag.collection import Workspace
    from rag.embeddings import resolve_embedding_model
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    # setup: where it goes (the one name -> path rule), the collection, the pairs
    home = Path(home)
    folder = Layout(home).retriever_dir(name)
    col = Workspace(home).get(collection)
    pairs = training_pairs(col, questions, positives)
    measured = list({p["question"]: p for p in pairs}.values())  # hit@k once per question
    if len(pairs) < 2:
        raise TuningError(f"only {len(pairs)} question(s) have a 'doc' and 'span' inside collection {collection!r}; "
                          "retriever tuning needs at least 2 (questions JSONL: question, answer, doc, span)")
    base_id, location = resolve_embedding_model(col.config.embedding_model)
    model = SentenceTransformer(location, device="cpu", trust_remote_code=False)
    echo(f"{len(pairs)} (question, {positives}) pairs from {collection!r}; base {base_id}")

    before = hit_at_k(model, col, measured)
    echo(f"before: hit@1 {before['hit_at_1']:.3f}, hit@4 {before['hit_at_4']:.3f}")

    # the library's trainer and loss: in-batch negatives, no duplicate chunk within a batch
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ragtune-retriever-") as scratch:
        args = SentenceTransformerTrainingArguments(
            output_dir=scratch, num_train_epochs=epochs, max_steps=max_steps, per_device_train_batch_size=batch_size,
            learning_rate=learning_rate, warmup_ratio=0.1, seed=seed, save_strategy="no", report_to=[],
            batch_sampler=BatchSamplers.NO_DUPLICATES, use_cpu=True, logging_steps=10, disable_tqdm=True)
        dataset = Dataset.from_dict({"anchor": [p["question"] for p in pairs], "positive": [p["text"] for p in pairs]})
        trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=dataset,
                                             loss=MultipleNegativesRankingLoss(model))
        result = trainer.train()
    seconds = time.perf_counter() - started

    after = hit_at_k(model, col, measured)
    echo(f"after: hit@1 {after['hit_at_1']:.3f}, hit@4 {after['hit_at_4']:.3f} ({seconds:.0f} s)")

    # save like an adapter: a complete folder appears at once, with its manifest
    from tuning.training import publish_folder, staging_dir

    tmp = staging_dir(folder.parent, name)
    model.save(str(tmp), safe_serialization=True)
    manifest = {"format": 1, "name": name, "task": "retriever", "base_model": base_id, "collection": collection,
                "pairs": len(pairs), "config": {"epochs": epochs, "batch_size": batch_size, "learning_rate": learning_rate,
                                                "max_steps": max_steps, "seed": seed, "positives": positives,
                                                "loss": "MultipleNegativesRankingLoss"},
                "metrics": {"before": before, "after": after, "train_loss": float(result.training_loss),
                            "steps": int(result.global_step), "seconds": round(seconds, 1),
                            "measured_on": "the training questions (dense search over every chunk)"},
                "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    publish_folder(tmp, folder)
    return manifest
