"""Causal-LM SFT with LoRA / DoRA / QLoRA / full fine-tuning, read top to bottom.

    ragtune tune tuning/configs/corvida-lora.yaml max_steps=20

Steps: resolve paths -> load and validate data -> tokenizer (chat template, answer-only labels) ->
base model (fp32 CPU / bf16 GPU / 8-bit / 4-bit) -> forgetting probe on the base -> PEFT wrap ->
Trainer (packing collator, labelled-logits loss, mixture sampler, eval every N steps, early stopping,
best checkpoint, resumable checkpoints) -> save adapter + ``ragtune.json`` atomically -> probe again.

``start_adapter=NAME`` continues training a registered LoRA/DoRA adapter instead of a new one (its own
rank and target modules; its base model): the reader recipe, one "reading" adapter trained on public
question sets (``ragtune import squad`` + ``ragtune data raft``) as the starting point of domain adapters.

Multi-GPU: the same code runs unchanged under ``accelerate launch`` (DDP, or FSDP via an accelerate
config), because the loop is transformers' Trainer::

    accelerate launch --num_processes 4 -m serving.cli tune tuning/configs/corvida-lora.yaml

Each rank draws its own shard of the mixture batches; the manifest, probe and adapter are written by
rank 0 only. (With ``accelerate launch`` use the ``ragtune`` module entry point as shown.)
"""

from __future__ import annotations

import datetime as dt
import logging
import time
import warnings
from pathlib import Path

from transformers import EarlyStoppingCallback

from tuning import attention, forgetting
from tuning.adapters import file_sha256, write_manifest
from tuning.config import TuneConfig, resolved_dict
from tuning.data import PackingCollator, ensure_chat_template, load_records, split_records, tokenize_records
from tuning.errors import DataError
from tuning.mixing import MixtureSampler, Schedule
from tuning.models import load_causal_lm, load_tokenizer, resolve_base_model, training_precision, weights_hash
from tuning.training import (ListDataset, LogCallback, SFTTrainer, adapt, parameter_counts, publish_folder, staging_dir,
                             start_adapter, start_run, total_draws, training_arguments, without_dict_printer, write_run_info)

log = logging.getLogger("ragtune.tuning")


def train(config: TuneConfig, home: str | Path | None = None, echo=print) -> dict:
    """Run ``config``; return the manifest written to ``<home>/adapters/<name>/ragtune.json``."""
    warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")
    started = time.time()
    start = start_adapter(config, home)
    run = start_run(config, home, config.resume)
    home, out_dir, device, run_dir, resume_from, threads, runlog = (
        run.home, run.out_dir, run.device, run.run_dir, run.resume_from, run.threads, run.runlog)
    precision = training_precision(config.precision, device)

    # 1. data: every file validated before anything loads (errors name file, row, field)
    sources = config.sources()
    records = [r for s in sources for r in load_records(s.path, s.task, config.data_format, config.system_prompt, expect="sft")]
    if config.eval_data:
        train_records = records
        eval_records = load_records(config.eval_data, "eval", config.data_format, config.system_prompt, expect="sft")
    else:
        train_records, eval_records = split_records(records, config.val_share, config.seed)

    # 2. tokenizer: chat template rendering, loss only on replies + EOS, over-long policy counted
    base = resolve_base_model(start[1]["base_model"]["id"] if start else config.base_model, home)
    write_run_info(run_dir, config, base, resume_from)
    runlog.write("run", name=config.name, run_id=run_dir.name, resumed_from=Path(resume_from).name if resume_from else None)
    tokenizer = load_tokenizer(base)
    ensure_chat_template(tokenizer)
    train_rows, train_stats = tokenize_records(tokenizer, train_records, config.max_seq_len, config.overlong)
    eval_rows, eval_stats = tokenize_records(tokenizer, eval_records, config.max_seq_len, config.overlong)
    if not train_rows:
        raise DataError(f"no training rows left after the over-long policy ({train_stats.as_dict()}); raise max_seq_len or use overlong=truncate")
    runlog.write("data", train=train_stats.as_dict(), eval=eval_stats.as_dict(),
                 tasks={t: sum(1 for r in train_rows if r["task"] == t) for t in sorted({r["task"] for r in train_rows})})
    echo(f"data: {train_stats.kept} training rows ({train_stats.dropped_overlong} dropped over {config.max_seq_len} tokens, "
         f"{train_stats.truncated} truncated), {eval_stats.kept} validation rows")

    # 3. base model (+ k-bit preparation) and the probe on the untouched base
    model = load_causal_lm(base, quant=config.quant, device=config.device,
                           gradient_checkpointing=config.gradient_checkpointing)
    probe_before = None
    if config.forgetting_probe and config.resume:
        probe_before = runlog.last("probe_before")  # measured on the base before the interrupted run
    elif config.forgetting_probe:
        probe_before = forgetting.run_probe(model, tokenizer, device, config.probe_limit)
        if probe_before:
            runlog.write("probe_before", **probe_before)

    # 4. PEFT: LoRA / DoRA on all-linear or attention modules, optionally only the top N layers; or the start adapter
    model = adapt(model, config, "CAUSAL_LM", start)
    trainable, total = parameter_counts(model)
    echo(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%); {device}, {precision}, {threads} threads")
    runlog.write("params", trainable=trainable, total=total)

    # 5. Trainer: packing collator, mixture sampler, eval/early stopping/best checkpoint/resume
    collator = PackingCollator(tokenizer.pad_token_id, packing=config.packing)
    weights = {}
    for s in sources:
        weights[s.task] = weights.get(s.task, 0.0) + s.weight
    sampler = MixtureSampler([r["task"] for r in train_rows], Schedule(weights, config.new_task, config.p0, config.p1),
                             config.seed, total_draws=total_draws(config, len(train_rows)))
    has_eval = bool(eval_rows)
    args = training_arguments(config, run_dir / "checkpoints", has_eval, device)
    callbacks = [LogCallback(runlog, echo=None if config.progress else echo)]
    if has_eval and config.early_stopping_patience > 0:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=config.early_stopping_patience))
    trainer = SFTTrainer(model=model, args=args, train_dataset=ListDataset(train_rows), data_collator=collator,
                         eval_dataset=ListDataset(eval_rows) if has_eval else None, sampler=sampler, eval_rows=eval_rows, eval_collator=collator, callbacks=callbacks,
                         pass_tokens=config.pass_tokens, cpu_bf16=device == "cpu" and precision == "bf16")
    without_dict_printer(trainer)
    with attention.segments_enabled(model):  # packed examples attend one at a time, no mask (tuning.attention)
        train_start = time.time()
        result = trainer.train(resume_from_checkpoint=resume_from)
        train_seconds = time.time() - train_start
        metrics = {"train_loss": round(result.training_loss, 5), "steps": trainer.state.global_step,
                   "epochs": round(trainer.state.epoch or 0.0, 4)}
        if has_eval:  # the best checkpoint is loaded back at the end (load_best_model_at_end)
            final = trainer.evaluate()
            metrics.update({k: round(v, 5) if isinstance(v, float) else v for k, v in final.items()})
            metrics["best_eval_loss"] = trainer.state.best_metric
            metrics["best_checkpoint"] = Path(trainer.state.best_model_checkpoint).name if trainer.state.best_model_checkpoint else None
    if not trainer.is_world_process_zero():
        return {}

    # 6. probe after, then the adapter folder and manifest, written to a temp folder and renamed
    probe_after = forgetting.run_probe(model, tokenizer, device, config.probe_limit) if probe_before else None
    probe = forgetting.compare(probe_before, probe_after)
    tmp = staging_dir(out_dir.parent, config.name)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    manifest = {
        "format": 1,
        "name": config.name,
        "task": "sft",
        "method": start[1].get("method", config.method) if start else config.method,  # a start adapter keeps its own
        "quant": config.quant,
        "base_model": {"id": base.id, "kind": base.kind, "sha256": weights_hash(base)},
        "data": [{"path": str(Path(s.path).resolve()), "task": s.task, "weight": s.weight, "sha256": file_sha256(s.path)}
                 for s in sources] + ([{"path": str(Path(config.eval_data).resolve()), "task": "eval", "sha256": file_sha256(config.eval_data)}]
                                      if config.eval_data else []),
        "data_stats": {"train": train_stats.as_dict(), "eval": eval_stats.as_dict()},
        "config": resolved_dict(config),
        "metrics": metrics,
        "forgetting": probe,
        "params": {"trainable": trainable, "total": total},
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "train_seconds": round(train_seconds, 2),
        "total_seconds": round(time.time() - started, 2),
        "tokens_per_second": round(trainer.tokens_seen / train_seconds, 1) if train_seconds > 0 else None,
        "device": device,
        "precision": precision,
        "threads": threads,
        "resumed_from": Path(resume_from).name if resume_from else None,
        "start_adapter": ({"name": config.start_adapter, "created": start[1].get("created")} if start else None),
        "run_dir": str(run_dir),
    }
    write_manifest(tmp, manifest)
    publish_folder(tmp, out_dir)
    runlog.write("done", metrics=metrics, forgetting=probe, adapter=str(out_dir))
    echo(f"adapter written to {out_dir}")
    if probe:
        echo(forgetting.describe(probe))
    return manifest
