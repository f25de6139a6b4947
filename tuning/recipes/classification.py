"""Sequence classification ("sentiment analysis"-style standard fine-tuning), read top to bottom.

    ragtune tune tuning/configs/corvida-classify.yaml
    ragtune classify --adapter corvida-classify "My heat pump shows error E14 after the update"

Works on the packaged MiniLM encoder (a BERT: ``base_model: all-minilm-l6-v2``) or on the causal LM
(``LlamaForSequenceClassification``). ``method: lora``/``dora`` trains LoRA with peft's ``SEQ_CLS``
task type (the new head is trained in full via ``modules_to_save``); ``method: full`` trains every
weight. Reports accuracy and macro-F1 on the test split. Runs under ``accelerate launch`` unchanged.
"""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding, EarlyStoppingCallback, Trainer, set_seed

from core.workspace import ragtune_home
from tuning.adapters import adapter_dir, file_sha256, get_adapter, load_for_inference, write_manifest
from tuning.config import TuneConfig, resolved_dict
from tuning.data import load_records, split_records
from tuning.errors import DataError, ModelError
from tuning.models import load_tokenizer, pick_device, resolve_base_model, weights_hash
from tuning.training import (JsonlLog, ListDataset, LogCallback, apply_method, check_adapter_slot, parameter_counts,
                             prepare_run_dir, publish_folder, run_folder, write_run_info, set_threads, staging_dir, training_arguments,
                             without_dict_printer)


def accuracy_and_macro_f1(predictions: np.ndarray, labels: np.ndarray, num_labels: int) -> dict[str, float]:
    accuracy = float((predictions == labels).mean()) if len(labels) else 0.0
    f1s = []
    for c in range(num_labels):
        tp = int(((predictions == c) & (labels == c)).sum())
        fp = int(((predictions == c) & (labels != c)).sum())
        fn = int(((predictions != c) & (labels == c)).sum())
        if tp + fp + fn == 0:
            continue  # class absent from both: not counted (sklearn's zero_division aside)
        f1s.append(2 * tp / (2 * tp + fp + fn))
    return {"accuracy": round(accuracy, 4), "macro_f1": round(float(np.mean(f1s)) if f1s else 0.0, 4)}


def train(config: TuneConfig, home: str | Path | None = None, echo=print) -> dict:
    started = time.time()
    home = ragtune_home(home)
    out_dir = adapter_dir(home, config.name)
    check_adapter_slot(out_dir, config)
    run_dir = run_folder(home, config.name, config.resume)  # runs/<name>/<run-id>/
    resume_from = prepare_run_dir(run_dir, config.resume)
    threads = set_threads(config.threads)
    set_seed(config.seed)
    runlog = JsonlLog(run_dir / "log.jsonl")
    device, dtype = pick_device(config.device)
    if config.quant != "none":
        raise ModelError("quant: classification trains in full precision here; set quant=none")

    # 1. data: {text, label} rows, validated; labels sorted so ids are stable
    sources = config.sources()
    records = [r for s in sources for r in load_records(s.path, s.task, "classification", expect="classification")]
    if config.eval_data:
        train_records, eval_records = records, load_records(config.eval_data, "eval", "classification", expect="classification")
    else:
        train_records, eval_records = split_records(records, config.val_share, config.seed)
    test_records = load_records(config.test_data, "test", "classification", expect="classification") if config.test_data else eval_records
    labels = sorted({r.label for r in train_records})
    if len(labels) < 2:
        raise DataError(f"classification needs at least 2 labels in the training data, found {labels}")
    unknown = sorted({r.label for r in eval_records + test_records} - set(labels))
    if unknown:
        raise DataError(f"labels {unknown} appear in validation/test data but not in training data; add training rows for them")
    label2id = {label: i for i, label in enumerate(labels)}

    # 2. tokenizer and encoded rows (truncated to max_seq_len: classification needs no answer tail)
    base = resolve_base_model(config.base_model, home)
    write_run_info(run_dir, config, base, resume_from)
    runlog.write("run", name=config.name, run_id=run_dir.name, resumed_from=Path(resume_from).name if resume_from else None)
    tokenizer = load_tokenizer(base)

    def encode(rs):
        enc = tokenizer([r.text for r in rs], truncation=True, max_length=config.max_seq_len)
        return [{"input_ids": ids, "attention_mask": am, "labels": label2id[r.label]}
                for ids, am, r in zip(enc["input_ids"], enc["attention_mask"], rs)]

    train_rows, eval_rows, test_rows = encode(train_records), encode(eval_records), encode(test_records)
    runlog.write("data", train=len(train_rows), eval=len(eval_rows), test=len(test_rows), labels=labels)
    echo(f"data: {len(train_rows)} training rows, {len(eval_rows)} validation, {len(test_rows)} test, labels {labels}")

    # 3. model: a fresh classification head on the encoder / causal LM, then LoRA (SEQ_CLS) or full
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            base.path, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id=label2id,
            dtype=dtype, use_safetensors=True, trust_remote_code=False)
    except OSError as exc:
        raise ModelError(f"cannot load {base.id} for classification: {exc}") from None
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model = apply_method(model, config, "SEQ_CLS")
    trainable, total = parameter_counts(model)
    echo(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")

    # 4. Trainer: standard padding collator, accuracy/macro-F1, eval every N steps, best checkpoint
    def compute_metrics(pred):
        logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
        return accuracy_and_macro_f1(np.argmax(logits, -1), pred.label_ids, len(labels))

    has_eval = bool(eval_rows)
    args = training_arguments(config, run_dir / "checkpoints", has_eval, device)
    args.remove_unused_columns = True
    callbacks = [LogCallback(runlog, echo=None if config.progress else echo)]
    if has_eval and config.early_stopping_patience > 0:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=config.early_stopping_patience))
    trainer = Trainer(model=model, args=args, train_dataset=ListDataset(train_rows),
                      eval_dataset=ListDataset(eval_rows) if has_eval else None,
                      data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=compute_metrics, callbacks=callbacks)
    without_dict_printer(trainer)
    train_start = time.time()
    result = trainer.train(resume_from_checkpoint=resume_from)
    train_seconds = time.time() - train_start
    metrics = {"train_loss": round(result.training_loss, 5), "steps": trainer.state.global_step}
    if test_rows:
        scored = trainer.evaluate(ListDataset(test_rows), metric_key_prefix="test")
        metrics.update({k: v for k, v in scored.items() if k in ("test_loss", "test_accuracy", "test_macro_f1")})
    if not trainer.is_world_process_zero():
        return {}

    # 5. adapter (+ head) and manifest, written to a temp folder and renamed
    tmp = staging_dir(out_dir.parent, config.name)
    trainer.model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    manifest = {
        "format": 1, "name": config.name, "task": "classification", "method": config.method, "quant": "none",
        "base_model": {"id": base.id, "kind": base.kind, "sha256": weights_hash(base)},
        "data": [{"path": str(Path(s.path).resolve()), "task": s.task, "weight": s.weight, "sha256": file_sha256(s.path)} for s in sources],
        "labels": labels, "config": resolved_dict(config), "metrics": metrics, "forgetting": None,
        "params": {"trainable": trainable, "total": total},
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "train_seconds": round(train_seconds, 2), "total_seconds": round(time.time() - started, 2),
        "device": device, "threads": threads, "resumed_from": Path(resume_from).name if resume_from else None, "run_dir": str(run_dir),
    }
    write_manifest(tmp, manifest)
    publish_folder(tmp, out_dir)
    runlog.write("done", metrics=metrics, adapter=str(out_dir))
    echo(f"adapter written to {out_dir}; test accuracy {metrics.get('test_accuracy')}, macro-F1 {metrics.get('test_macro_f1')}")
    return manifest


@torch.no_grad()
def classify(home: str | Path | None, adapter: str, texts: list[str]) -> list[dict]:
    """[{"label", "scores": {label: probability}}] for each text."""
    home = ragtune_home(home)
    _, manifest = get_adapter(home, adapter)
    if manifest.get("task") != "classification":
        raise ModelError(f"adapter {adapter!r} is a {manifest.get('task')} adapter; `ragtune classify` needs one trained with task=classification")
    model, tokenizer, manifest = load_for_inference(home, adapter)
    labels = manifest["labels"]
    enc = tokenizer(texts, truncation=True, max_length=manifest["config"]["max_seq_len"], padding=True, return_tensors="pt")
    probs = torch.softmax(model(**{k: v.to(model.device) for k, v in enc.items()}).logits.float(), -1)
    return [{"label": labels[int(p.argmax())], "scores": {labels[i]: round(float(p[i]), 4) for i in range(len(labels))}} for p in probs]
