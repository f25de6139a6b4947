"""Preference tuning (DPO) of a LoRA adapter with TRL's ``DPOTrainer``, read top to bottom.

    ragtune feedback export -c corvida --out rows.jsonl          # also writes rows.pairs.jsonl
    ragtune tune task=dpo name=corvida-dpo data=rows.pairs.jsonl start_adapter=corvida-raft max_steps=40

Rows are preference pairs ``{"prompt" or "question", "context"?, "system"?, "chosen", "rejected"}``
(``ragtune feedback export`` writes them from arena votes and corrections). Each prompt is rendered
as the chat messages serving sends (system, then ``<context>\\n\\nQuestion: <question>``, the
``tuning.data`` qa layout), and TRL applies the model's chat template, so the loss is on the two
answers only.

The reference model is the starting point: with ``start_adapter`` the adapter is loaded trainable and
TRL keeps a frozen copy of it as the reference ("ref" adapter); without it a new LoRA is trained and
the base (adapters disabled) is the reference. The output is the same as SFT's: ``adapters/<name>/``
(peft files) + ``ragtune.json`` (base id and hash, data hash, resolved config, metrics, forgetting probe
on the base before and on the trained adapter after), published atomically, listed by the registry.
"""

from __future__ import annotations

import datetime as dt
import json
import time
import warnings
from pathlib import Path

from core.workspace import ragtune_home
from tuning import forgetting
from tuning.adapters import file_sha256, write_manifest
from tuning.config import TuneConfig, resolved_dict
from tuning.data import ensure_chat_template, read_rows
from tuning.errors import DataError
from tuning.models import load_causal_lm, load_tokenizer, resolve_base_model, weights_hash
from tuning.training import (LogCallback, adapt, parameter_counts, publish_folder, staging_dir, start_adapter, start_run,
                             without_dict_printer, write_run_info)


def pair_messages(row: dict) -> dict:
    """A pair row -> TRL's conversational format (prompt messages, chosen and rejected replies)."""
    question = str(row.get("question") or row.get("prompt") or "").strip()
    user = f"{row['context'].strip()}\n\nQuestion: {question}" if str(row.get("context") or "").strip() else question
    prompt = ([{"role": "system", "content": row["system"].strip()}] if str(row.get("system") or "").strip() else [])
    prompt.append({"role": "user", "content": user})
    return {"prompt": prompt, "chosen": [{"role": "assistant", "content": str(row["chosen"]).strip()}],
            "rejected": [{"role": "assistant", "content": str(row["rejected"]).strip()}]}


def load_pairs(path: str | Path) -> list[dict]:
    """Validated pair rows (errors name the file, row and field, and say how to fix it)."""
    rows, errors = [], []
    for n, row in read_rows(path):
        where = f"{path}, row {n}"
        if not isinstance(row, dict):
            errors.append(f"{where}: expected a JSON object with prompt/question, chosen and rejected")
            continue
        for key in ("chosen", "rejected"):
            if not isinstance(row.get(key), str) or not row[key].strip():
                errors.append(f"{where}, field '{key}': needs a non-empty string (the preferred / the worse answer)")
        if not str(row.get("question") or row.get("prompt") or "").strip():
            errors.append(f"{where}: needs a non-empty 'prompt' or 'question'")
        elif isinstance(row.get("chosen"), str) and row.get("chosen", "").strip() == str(row.get("rejected", "")).strip():
            errors.append(f"{where}: 'chosen' and 'rejected' are the same text; a pair needs two different answers")
        else:
            rows.append(row)
        if len(errors) >= 20:
            break
    if errors:
        raise DataError("preference data has errors:\n" + "\n".join(errors))
    if not rows:
        raise DataError(f"{path}: no preference pairs (rows {{prompt, chosen, rejected}}; `ragtune feedback export` writes them)")
    return rows


def train(config: TuneConfig, home: str | Path | None = None, echo=print) -> dict:
    """Run ``config`` (task=dpo); return the manifest written to ``<home>/adapters/<name>/ragtune.json``."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    warnings.filterwarnings("ignore", message=".*DPOTrainer.*")
    started = time.time()
    home = ragtune_home(home)
    start = start_adapter(config, home)
    run = start_run(config, home, False)
    out_dir, device, run_dir, threads, runlog = run.out_dir, run.device, run.run_dir, run.threads, run.runlog

    # 1. data: every file validated before the model loads
    sources = config.sources()
    rows = [pair_messages(r) for s in sources for r in load_pairs(s.path)]
    runlog.write("data", train={"kept": len(rows)}, eval={"kept": 0})
    echo(f"data: {len(rows)} preference pairs")

    # 2. base model and tokenizer (the start adapter's base must be this base)
    base = resolve_base_model(start[1]["base_model"]["id"] if start else config.base_model, home)
    write_run_info(run_dir, config, base, None)
    runlog.write("run", name=config.name, run_id=run_dir.name, resumed_from=None)
    tokenizer = load_tokenizer(base)
    ensure_chat_template(tokenizer)
    model = load_causal_lm(base, device=config.device, gradient_checkpointing=config.gradient_checkpointing)
    probe_before = forgetting.run_probe(model, tokenizer, device, config.probe_limit) if config.forgetting_probe else None
    if probe_before:
        runlog.write("probe_before", **probe_before)

    # 3. the policy: the start adapter, trainable (TRL copies it as the frozen "ref" adapter), or a new LoRA
    model = adapt(model, config, "CAUSAL_LM", start)
    trainable, total = parameter_counts(model)
    echo(f"trainable parameters: {trainable:,} of {total:,}; reference: {config.start_adapter or 'the base model'}; "
         f"{device}, {threads} threads")
    runlog.write("params", trainable=trainable, total=total)

    # 4. TRL's DPOTrainer: sigmoid DPO loss against the reference, answers-only log-probs
    args = DPOConfig(
        output_dir=str(run_dir / "checkpoints"), per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum, learning_rate=config.learning_rate,
        num_train_epochs=config.epochs, max_steps=config.max_steps, lr_scheduler_type="linear",
        warmup_steps=config.warmup_ratio, logging_steps=config.logging_steps, save_strategy="no", seed=config.seed,
        report_to="none", disable_tqdm=not config.progress, use_cpu=device == "cpu", bf16=device == "cuda",
        beta=config.dpo_beta, max_length=config.max_seq_len, dataloader_num_workers=0,
        gradient_checkpointing=config.gradient_checkpointing)
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         callbacks=[LogCallback(runlog, echo=None if config.progress else echo)])
    without_dict_printer(trainer)
    train_start = time.time()
    result = trainer.train()
    train_seconds = time.time() - train_start
    history = [h for h in trainer.state.log_history if "loss" in h]
    last = history[-1] if history else {}
    metrics = {"train_loss": round(result.training_loss, 5), "steps": trainer.state.global_step,
               "epochs": round(trainer.state.epoch or 0.0, 4),
               **{k.replace("/", "_"): round(v, 5) for k, v in last.items() if k.startswith("rewards/") and isinstance(v, float)}}

    # 5. probe after, then the adapter folder (only the trained adapter, not TRL's "ref" copy) and manifest
    model = trainer.model
    probe_after = forgetting.run_probe(model, tokenizer, device, config.probe_limit) if probe_before else None
    probe = forgetting.compare(probe_before, probe_after)
    tmp = staging_dir(out_dir.parent, config.name)
    model.save_pretrained(tmp, safe_serialization=True, selected_adapters=["default"])
    tokenizer.save_pretrained(tmp)
    manifest = {
        "format": 1,
        "name": config.name,
        "task": "sft",  # a chat adapter like SFT's (serving switches it the same way); the objective says how it was trained
        "objective": "dpo",
        "reference": config.start_adapter,
        "method": "lora",
        "quant": "none",
        "base_model": {"id": base.id, "kind": base.kind, "sha256": weights_hash(base)},
        "start_adapter": ({"name": config.start_adapter, "created": start[1].get("created")} if start else None),
        "data": [{"path": str(Path(s.path).resolve()), "task": s.task, "weight": s.weight, "sha256": file_sha256(s.path)}
                 for s in sources],
        "data_stats": {"train": {"pairs": len(rows)}},
        "config": resolved_dict(config),
        "metrics": metrics,
        "forgetting": probe,
        "params": {"trainable": trainable, "total": total},
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "train_seconds": round(train_seconds, 2),
        "total_seconds": round(time.time() - started, 2),
        "device": device,
        "threads": threads,
        "run_dir": str(run_dir),
    }
    write_manifest(tmp, manifest)
    publish_folder(tmp, out_dir)
    runlog.write("done", metrics=metrics, forgetting=probe, adapter=str(out_dir))
    (run_dir / "trainer_log.json").write_text(json.dumps(trainer.state.log_history, indent=1, default=str), encoding="utf-8")
    echo(f"adapter written to {out_dir}")
    if probe:
        echo(forgetting.describe(probe))
    return manifest
