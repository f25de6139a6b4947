"""Pieces the recipes share: PEFT setup, the SFT Trainer subclass, the JSONL run log, checkpoints.

Why plain ``transformers.Trainer`` and not TRL's ``SFTTrainer`` (checked against TRL 1.16):

- TRL's ``completion_only_loss`` trains everything the template renders after the prompt, including the
  newline after ``<|im_end|>``, and its ``assistant_only_loss`` needs ``{% generation %}`` markers that
  SmolLM2's template lacks. We need the exact "reply + EOS" mask (tested), so we tokenize ourselves.
- TRL truncates over-long rows silently; we drop or truncate by a stated policy and count it.
- TRL documents padding-free/packing as FlashAttention-only. Here transformers' own
  ``find_packed_sequence_indices`` builds a block-diagonal mask from ``position_ids`` for SDPA/eager
  too, so packing works on CPU without cross-contamination (tested against unpacked logits).
- The loss computes logits only at labelled positions (``logits_to_keep`` with a boolean mask): with a
  49k vocabulary the full logits tensor dominated memory and a good share of step time.
- The progressive multi-task sampler replaces Trainer's sampler (one override either way).

Trainer still gives us what we would otherwise re-implement: the optimizer/scheduler loop, gradient
accumulation, evaluation cadence, best-checkpoint tracking, early stopping, safe resumable checkpoints
(Trainer loads optimizer/scheduler/RNG state with ``weights_only=True``; adapters are safetensors) and
``accelerate launch`` for DDP/FSDP.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import Trainer, TrainerCallback

from core.files import write_atomic
from core.progress import format_duration
from tuning import attention
from tuning.config import TuneConfig
from tuning.errors import TuningError

ATTENTION_MODULES = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "bert": ["query", "key", "value", "attention.output.dense"],
}


# ------------------------------------------------------------------------------------------------ PEFT

def _num_layers(model) -> int:
    cfg = getattr(model, "config", None)
    return int(getattr(cfg, "num_hidden_layers", 0) or 0)


def _linear_module_names(model) -> list[str]:
    """Leaf names of every nn.Linear except output heads (what peft's 'all-linear' selects)."""
    names = set()
    for full_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and full_name.split(".")[-1] not in ("lm_head", "score", "classifier"):
            names.add(full_name.split(".")[-1])
    return sorted(names)


def target_modules(config: TuneConfig, model) -> Any:
    if config.target_modules == "all-linear":
        # peft refuses layers_to_transform with the 'all-linear' string, so spell the modules out then
        return _linear_module_names(model) if config.layers > 0 else "all-linear"
    if config.target_modules == "attention":
        model_type = getattr(model.config, "model_type", "")
        if model_type in ("bert", "roberta", "xlm-roberta", "distilbert"):
            return ATTENTION_MODULES["bert"]
        return ATTENTION_MODULES["llama"]
    names = [n.strip() for n in config.target_modules.split(",") if n.strip()]
    if not names:
        raise TuningError("target_modules: give 'attention', 'all-linear' or module names like q_proj,v_proj")
    return names


def top_layer_indices(config: TuneConfig, model) -> list[int] | None:
    if config.layers <= 0:
        return None
    total = _num_layers(model)
    if total == 0:
        raise TuningError("layers: this model does not report num_hidden_layers; set layers=0")
    if config.layers > total:
        raise TuningError(f"layers: the model has {total} layers; use layers between 1 and {total} (or 0 for all)")
    return list(range(total - config.layers, total))


def start_adapter(config: TuneConfig, home: str | os.PathLike | None) -> tuple[Path, dict[str, Any]] | None:
    """The registered adapter ``config.start_adapter`` names, as (folder, manifest), or None; refused before
    anything is written when it is missing or is the adapter this run writes."""
    if not config.start_adapter:
        return None
    from core.workspace import ragtune_home
    from tuning.adapters import get_adapter

    start = get_adapter(ragtune_home(home), config.start_adapter)
    if config.start_adapter == config.name:
        raise TuningError(f"start_adapter {config.start_adapter!r} is the adapter being written; give the new one another name")
    return start


def adapt(model, config: TuneConfig, task_type: str, start: tuple[Path, dict[str, Any]] | None = None):
    """The model to train: ``start``'s adapter loaded trainable (its own rank and targets), or
    :func:`apply_method`'s new one."""
    if start is None:
        return apply_method(model, config, task_type)
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(start[0]), is_trainable=True)


def apply_method(model, config: TuneConfig, task_type: str):
    """Wrap ``model`` with LoRA/DoRA (peft) or unfreeze it for full fine-tuning."""
    layers = top_layer_indices(config, model)
    if config.method == "full":
        for name, param in model.named_parameters():
            param.requires_grad = True
            if layers is not None:
                param.requires_grad = any(f"layers.{i}." in name or f"layer.{i}." in name for i in layers) or \
                    (task_type == "SEQ_CLS" and ("classifier" in name or "score" in name))
        return model
    from peft import LoraConfig, get_peft_model

    kwargs: dict[str, Any] = {}
    if layers is not None:
        kwargs["layers_to_transform"] = layers
        model_type = getattr(model.config, "model_type", "")
        kwargs["layers_pattern"] = "layer" if model_type in ("bert", "roberta", "distilbert") else "layers"
    try:
        lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                          target_modules=target_modules(config, model), use_dora=config.method == "dora",
                          task_type=task_type, bias="none", **kwargs)
        model = get_peft_model(model, lora)
    except ValueError as exc:
        raise TuningError(f"target_modules/layers do not match this model ({exc}); try target_modules=all-linear layers=0") from None
    use_fast_dropout(model)
    return model


# --------------------------------------------------------------------------------------------- dropout

class _MaskedScale(torch.autograd.Function):
    """``where(keep, x, 0) * scale``, saving only the boolean mask (1 byte per element) for backward.
    (``x * keep`` would promote the mask to x's dtype first: 10x slower on CPU in fp32.)"""

    @staticmethod
    def forward(ctx, x, keep, scale):
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return torch.where(keep, x, 0).mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return torch.where(keep, grad, 0).mul_(ctx.scale), None, None


class FastDropout(torch.nn.Module):
    """Inverted dropout with a cheaper mask than ``torch.bernoulli_`` on CPU.

    peft puts a dropout on the input of every LoRA layer (210 of them on SmolLM2-135M with all-linear
    targets). On this CPU ``bernoulli_`` drew ~200M numbers/s and took 17% of a LoRA step. Here one 64-bit
    draw from torch's generator gives four 16-bit lanes, each kept when it is at or above ``p`` of the
    16-bit range: the same distribution with ``p`` rounded to 1/65536, 3.6x faster, and reproducible
    under the same seed (``set_seed`` and Trainer's checkpointed RNG state cover it).
    """

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout p must be in [0, 1), got {p}")
        self.p = p
        self.threshold = -32768 + round(p * 65536)

    def keep_mask(self, shape, device) -> torch.Tensor:
        n = math.prod(shape)
        info = torch.iinfo(torch.int64)
        bits = torch.randint(info.min, info.max, ((n + 3) // 4,), dtype=torch.int64, device=device)
        return (bits.view(torch.int16)[:n] >= self.threshold).view(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type == "cpu" and x.dtype == torch.float32 and torch.is_autocast_enabled("cpu"):
            # the LoRA matmul that follows casts its input to the autocast dtype anyway: casting first makes
            # the masking pass move half the bytes and the matmul's own cast a no-op (same values)
            x = x.to(torch.get_autocast_dtype("cpu"))
        return _MaskedScale.apply(x, self.keep_mask(x.shape, x.device), 1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}"


def use_fast_dropout(model) -> int:
    """Swap peft's ``lora_dropout`` ``nn.Dropout`` modules for :class:`FastDropout` (CPU only); returns the count."""
    swapped = 0
    for module in model.modules():
        drops = getattr(module, "lora_dropout", None)
        if not isinstance(drops, torch.nn.ModuleDict):
            continue
        for key, drop in list(drops.items()):
            if isinstance(drop, torch.nn.Dropout) and drop.p > 0 and _on_cpu(module):
                drops[key] = FastDropout(drop.p)
                swapped += 1
    return swapped


def _on_cpu(module) -> bool:
    param = next(module.parameters(), None)
    return param is None or param.device.type == "cpu"


def parameter_counts(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


# --------------------------------------------------------------------------------------------- logging

class JsonlLog:
    """Appends one JSON object per line to ``<run>/log.jsonl`` (the UI plots it), and a line a person can
    read to ``<run>/log.txt`` for training and evaluation events (step, loss, eval loss, tokens/s, ETA)."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path = path
        self.text_path = path.with_name("log.txt")
        self.enabled = enabled
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, event: str, **values: Any) -> str | None:
        """Appends the row; returns its readable line (None when a person need not read it)."""
        row = {"event": event, "time": round(time.time(), 3), **values}
        line = readable_line(row)
        if not self.enabled:
            return line
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row, default=float) + "\n")
        if line:
            with open(self.text_path, "a", encoding="utf-8") as fh:
                fh.write(line + "\n")
        return line

    def last(self, event: str) -> dict | None:
        """The newest row of ``event`` without its bookkeeping keys, or None."""
        if not self.path.exists():
            return None
        found = None
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a line cut short by a kill
            if row.get("event") == event:
                found = {k: v for k, v in row.items() if k not in ("event", "time")}
        return found



def readable_line(row: dict[str, Any]) -> str | None:
    """The human-readable log line for a log row (None for rows a person need not read)."""
    stamp = time.strftime("%H:%M:%S", time.localtime(row.get("time", time.time())))
    event = row.get("event")
    if event in ("train", "eval"):
        step, total = row.get("step"), row.get("max_steps")
        parts = [f"{stamp} step {step}" + (f"/{total}" if total else "")]
        if "loss" in row:
            parts.append(f"loss {row['loss']:.4f}")
        if "eval_loss" in row:
            parts.append(f"eval loss {row['eval_loss']:.4f}")
        if row.get("tokens_per_s"):
            parts.append(f"{row['tokens_per_s']:.0f} tokens/s")
        if row.get("step_s"):
            parts.append(f"{row['step_s']:.1f} s/step")
        if row.get("eta_s") is not None:
            parts.append(f"ETA {format_duration(row['eta_s'])}")
        return "  ".join(parts)
    if event == "data":
        train = row.get("train")
        kept = train.get("kept", "?") if isinstance(train, dict) else train  # sft: stats; classification: a count
        return f"{stamp} data: {kept if kept is not None else '?'} training rows"
    if event == "done":
        return f"{stamp} done: adapter written to {row.get('adapter')}"
    if event == "run":
        return f"{stamp} run {row.get('run_id')} of {row.get('name')} started" + (" (resumed)" if row.get("resumed_from") else "")
    return None


def without_dict_printer(trainer: Any) -> Any:
    """``trainer`` without transformers' PrinterCallback, which prints each log as a raw Python dict on
    stdout when the progress bar is off; :class:`LogCallback` writes the readable lines."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    return trainer


class LogCallback(TrainerCallback):
    """Logs Trainer's losses with the step count, measured seconds per step, tokens/s and an ETA.

    Step time is measured from this process's first step, so a resumed run's ETA is not skewed by the
    steps done before the interruption. ``echo``: also hand each readable line to it (the recipes pass
    their ``echo`` when the progress bar is off, so a script or a bench still shows steps and the ETA)."""

    def __init__(self, log: JsonlLog, echo: Callable[[str], Any] | None = None):
        self.log = log
        self.echo = echo
        self.started: float | None = None
        self.first_step = 0
        self.last_time: float | None = None
        self.last_tokens = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = self.last_time = time.time()
        self.first_step = state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not (state.is_world_process_zero and logs):
            return
        kind = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        now = time.time()
        extra: dict[str, Any] = {"max_steps": state.max_steps}
        done = state.global_step - self.first_step
        if self.started is not None and done > 0:
            step_s = (now - self.started) / done
            extra["step_s"] = round(step_s, 3)
            extra["eta_s"] = round(step_s * max(state.max_steps - state.global_step, 0), 1)
        tokens = logs.get("tokens_seen")
        if kind == "train" and tokens is not None and self.last_time is not None and now > self.last_time:
            extra["tokens_per_s"] = round((tokens - self.last_tokens) / (now - self.last_time), 1)
            self.last_tokens, self.last_time = tokens, now
        line = self.log.write(kind, **{"step": state.global_step, **logs, "epoch": round(state.epoch or 0.0, 4), **extra})
        if self.echo is not None and line:
            self.echo(line)


# ------------------------------------------------------------------------------------------ SFT trainer

class ListDataset(torch.utils.data.Dataset):
    def __init__(self, rows: list[dict]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


def causal_lm_loss(model, batch: dict, reduction: str = "sum") -> tuple[torch.Tensor, int]:
    """Cross-entropy over the labelled positions only; logits are computed just there."""
    shift_labels = batch["shift_labels"]
    keep = shift_labels != -100
    n = int(keep.sum())
    kwargs: dict[str, Any] = {"position_ids": batch["position_ids"]} if "position_ids" in batch else {"attention_mask": batch["attention_mask"]}
    if "cu_seqlens" in batch and attention.uses_segments(model):
        kwargs["segments"] = batch["cu_seqlens"].tolist()
    out = model(input_ids=batch["input_ids"], logits_to_keep=keep, use_cache=False, **kwargs)
    logits = out.logits.float()  # fp32 logits for the loss, as the QLoRA recipe does
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), shift_labels[keep], reduction=reduction)
    return loss, n


_ROW_KEYS = ("input_ids", "labels", "shift_labels", "position_ids")


def split_passes(batch: dict, pass_tokens: int) -> list[dict]:
    """A step's batch as forward/backward passes of at most ``pass_tokens`` tokens (0: one pass).

    A packed batch (one row, ``cu_seqlens``) is cut at example boundaries, an example longer than the
    budget getting a pass of its own; a padded batch is cut by rows (``pass_tokens // width`` per pass)."""
    if pass_tokens <= 0:
        return [batch]
    if "cu_seqlens" in batch:
        bounds = batch["cu_seqlens"].tolist()
        cuts = [0]  # indexes into bounds where a pass starts
        for i in range(2, len(bounds)):
            if bounds[i] - bounds[cuts[-1]] > pass_tokens:
                cuts.append(i - 1)
        cuts.append(len(bounds) - 1)
        if len(cuts) == 2:
            return [batch]
        passes = []
        for a, b in zip(cuts[:-1], cuts[1:]):
            start, end = bounds[a], bounds[b]
            part = {k: batch[k][:, start:end] for k in _ROW_KEYS}
            part["cu_seqlens"] = batch["cu_seqlens"][a:b + 1] - start
            part["row_tokens"] = batch["row_tokens"].new_tensor([end - start])
            passes.append(part)
        return passes
    rows, width = batch["input_ids"].shape
    per_pass = max(1, pass_tokens // max(width, 1))
    if rows <= per_pass:
        return [batch]
    return [{k: v[i:i + per_pass] if torch.is_tensor(v) and v.dim() >= 1 and v.shape[0] == rows else v for k, v in batch.items()}
            for i in range(0, rows, per_pass)]


class SFTTrainer(Trainer):
    """Trainer with the answer-only, labelled-logits loss, the mixture sampler and per-task evaluation."""

    loss_is_scaled_for_ga = True  # compute_loss divides by the tokens of the whole accumulated batch

    def __init__(self, *args, sampler=None, eval_rows: list[dict] | None = None, eval_collator=None,
                 pass_tokens: int = 1024, cpu_bf16: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.pass_tokens = pass_tokens
        self.cpu_bf16 = cpu_bf16
        self._mixture_sampler = sampler
        self._eval_rows = eval_rows or []
        self._eval_collator = eval_collator
        self.model_accepts_loss_kwargs = True  # so Trainer counts label tokens across accumulation steps
        self._loss_shifts_labels = True
        self.tokens_seen = 0

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs:  # training logs carry the token count, for tokens/s in the run log
            logs = {**logs, "tokens_seen": self.tokens_seen}
        super().log(logs, *args, **kwargs)

    def _get_train_sampler(self, train_dataset=None):
        return self._mixture_sampler if self._mixture_sampler is not None else super()._get_train_sampler(train_dataset)

    def training_step(self, model, inputs, num_items_in_batch=None):
        """Forward/backward the step in passes of ~``pass_tokens`` tokens and accumulate their gradients.

        The loss of each pass is its label-token sum over the whole step's label count, so the summed
        gradient equals one pass over the whole batch (same step, same hyperparameters) while activation
        memory is one pass's: on CPU, activations (~2.5 MB per token for LoRA on all linear layers of
        SmolLM2-135M in fp32) dominate peak RSS, not the weights. Tiny passes pay per-pass overhead: an
        epoch of the tuning bench (15 steps of ~2,200 tokens, 2 cores) took 162 s with one example per
        pass and 147 s with the default 1,024-token passes.
        """
        passes = split_passes(inputs, self.pass_tokens)
        if len(passes) == 1:
            return super().training_step(model, inputs, num_items_in_batch)
        model.train()
        if num_items_in_batch is None:
            num_items_in_batch = inputs["shift_labels"].ne(-100).sum()
        total = torch.zeros((), device=self.args.device)
        for i, part in enumerate(passes):
            part = self._prepare_inputs(part)
            last = i == len(passes) - 1
            sync = contextlib.nullcontext() if last or self.accelerator.num_processes == 1 else self.accelerator.no_sync(model)
            with sync:
                with self.compute_loss_context_manager():
                    loss = self.compute_loss(model, part, num_items_in_batch=num_items_in_batch)
                self.accelerator.backward(loss)
            total += loss.detach()
        return total

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            self.tokens_seen += int(inputs["row_tokens"].sum())
        # CPU bf16 autocast for the training forward only (backward follows the forward's dtypes); on CUDA
        # the weights are bf16 already. Evaluation stays fp32 so eval losses compare across precisions.
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.cpu_bf16 and model.training):
            loss_sum, n = causal_lm_loss(model, inputs, reduction="sum")
        denom = num_items_in_batch if num_items_in_batch is not None else max(n, 1)
        if torch.is_tensor(denom):
            denom = denom.to(loss_sum.device)
        loss = loss_sum / denom
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes
        return (loss, None) if return_outputs else loss

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Token-weighted answer loss, overall and per task (Trainer's default averages batch means)."""
        metrics = evaluate_loss(self.model, self._eval_rows, self._eval_collator, self.args.per_device_eval_batch_size,
                                self.args.device, prefix=metric_key_prefix)
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


@torch.no_grad()
def evaluate_loss(model, rows: list[dict], collator, batch_size: int, device, prefix: str = "eval") -> dict[str, float]:
    was_training = model.training
    model.eval()
    totals: dict[str, list[float]] = {}
    for task in sorted({r["task"] for r in rows}):
        task_rows = [r for r in rows if r["task"] == task]
        loss_sum, count = 0.0, 0
        for i in range(0, len(task_rows), batch_size):
            batch = {k: v.to(device) for k, v in collator(task_rows[i:i + batch_size]).items()}
            s, n = causal_lm_loss(model, batch, reduction="sum")
            loss_sum += float(s)
            count += n
        totals[task] = [loss_sum, count]
    if was_training:
        model.train()
    metrics: dict[str, float] = {}
    all_sum = sum(v[0] for v in totals.values())
    all_n = sum(v[1] for v in totals.values())
    metrics[f"{prefix}_loss"] = all_sum / max(all_n, 1)
    if len(totals) > 1:
        for task, (s, n) in totals.items():
            metrics[f"{prefix}_loss_{task}"] = s / max(n, 1)
    metrics[f"{prefix}_tokens"] = all_n
    return metrics


# -------------------------------------------------------------------------------------- run folders

RUN_ID_ENV = "RAGTUNE_RUN_ID"  # set by the app so it knows the folder of the run it starts (or resumes)


def run_folder(home: Path, name: str, resume: bool) -> Path:
    """The folder of this training run: ``<home>/runs/<name>/<run-id>/``.

    Every run gets its own folder (log, human-readable log, checkpoints, config), so two runs of the same
    name never share a log. The run id is ``$RAGTUNE_RUN_ID`` when set (the app names the runs it starts),
    else a new timestamp; ``resume=true`` without an id continues the newest run of that name that has a
    checkpoint (a run folder of the older ``runs/<name>/checkpoints`` layout included)."""
    from core.names import check_name, child_path
    from core.workspace import Layout

    root = Layout(Path(home)).run_dir(name)
    given = os.environ.get(RUN_ID_ENV) or None
    if given:
        return child_path(root, check_name(given, "run id"), "run id")
    if resume:
        candidates = sorted((p for p in root.iterdir() if p.is_dir() and (p / "checkpoints").is_dir()),
                            key=lambda p: p.stat().st_mtime) if root.is_dir() else []
        if candidates:
            return candidates[-1]
        if (root / "checkpoints").is_dir():
            return root  # written before run folders had ids
        raise TuningError(f"resume=true but no run of {name!r} under {root} has a checkpoint; run again without resume=true")
    root.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1, 1000):
        run_dir = root / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            run_dir.mkdir()  # atomic: two runs started in the same second get different folders
            return run_dir
        except FileExistsError:
            continue
    raise TuningError(f"could not make a new run folder under {root}")


def write_run_info(run_dir: Path, config: TuneConfig, base: Any, resume_from: str | None) -> None:
    """``run.json``: what is needed later to keep a checkpoint of this run as an adapter."""
    from tuning.config import resolved_dict

    info = {"name": config.name, "run_id": run_dir.name, "task": config.task, "method": config.method,
            "quant": config.quant, "config": resolved_dict(config),
            "base_model": {"id": base.id, "kind": base.kind, "path": str(base.path)},
            "started": time.time(), "resumed_from": Path(resume_from).name if resume_from else None}
    write_atomic(run_dir / "run.json", json.dumps(info, indent=2, default=str))


def prepare_run_dir(run_dir: Path, resume: bool) -> str | None:
    """Checkpoint to resume from (``resume=true``), else a clean ``checkpoints`` folder."""
    from transformers.trainer_utils import get_last_checkpoint

    ckpt_dir = run_dir / "checkpoints"
    if resume:
        last = get_last_checkpoint(str(ckpt_dir)) if ckpt_dir.exists() else None
        if last is None:
            raise TuningError(f"resume=true but {ckpt_dir} holds no checkpoint; run again without resume=true")
        return last
    if ckpt_dir.exists():
        shutil.rmtree(ckpt_dir)
    if (run_dir / "log.jsonl").exists():
        (run_dir / "log.jsonl").unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    return None


@dataclass
class RunSetup:
    """What every recipe starts from (:func:`start_run`)."""

    home: Path
    out_dir: Path  # adapters/<name>/
    device: str
    run_dir: Path  # runs/<name>/<run-id>/
    resume_from: str | None  # checkpoint to resume from
    threads: int
    runlog: "JsonlLog"


def start_run(config: TuneConfig, home: str | os.PathLike | None, resume: bool) -> RunSetup:
    """The set-up of every recipe, in dependency order: the workspace, the adapter slot (refused before
    anything is written), the run folder (clean, or the checkpoint to resume), threads, seed, run log."""
    from transformers import set_seed

    from core.workspace import ragtune_home
    from tuning.adapters import adapter_dir
    from tuning.models import pick_device

    home = ragtune_home(home)
    out_dir = adapter_dir(home, config.name)
    device, _dtype = pick_device(config.device)
    check_adapter_slot(out_dir, config)
    run_dir = run_folder(home, config.name, resume)
    resume_from = prepare_run_dir(run_dir, resume)
    threads = set_threads(config.threads)
    set_seed(config.seed)
    return RunSetup(home, out_dir, device, run_dir, resume_from, threads, JsonlLog(run_dir / "log.jsonl"))


def check_adapter_slot(adapter_dir: Path, config: TuneConfig) -> None:
    if adapter_dir.exists() and not (config.overwrite or config.resume):
        raise TuningError(f"adapter {config.name!r} already exists at {adapter_dir}; pick another name, "
                          f"add overwrite=true, or remove it with `ragtune adapters rm {config.name}`")


def publish_folder(tmp: Path, target: Path) -> None:
    """Replace ``target`` with ``tmp`` (same filesystem), never leaving a half-written folder."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.rename(target, old)
    os.rename(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def staging_dir(parent: Path, name: str) -> Path:
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{name}-", dir=parent))


def training_arguments(config: TuneConfig, output_dir: Path, has_eval: bool, device: str, **extra):
    from transformers import TrainingArguments

    eval_kwargs: dict[str, Any] = {"eval_strategy": "no"}
    if has_eval:
        eval_kwargs = {"eval_strategy": "steps", "eval_steps": config.eval_steps, "load_best_model_at_end": True,
                       "metric_for_best_model": "eval_loss", "greater_is_better": False}
    # Trainer keeps the best checkpoint in addition to save_total_limit when load_best_model_at_end is set;
    # save_steps must then be a multiple of eval_steps.
    save_steps = config.save_steps
    if has_eval and save_steps % config.eval_steps:
        save_steps = config.eval_steps * max(1, round(save_steps / config.eval_steps))
    return TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        lr_scheduler_type="linear",
        warmup_steps=config.warmup_ratio,
        logging_steps=config.logging_steps,
        save_strategy="steps",
        save_steps=save_steps,
        save_total_limit=config.save_total_limit,
        seed=config.seed,
        data_seed=config.seed,
        report_to="none",
        disable_tqdm=not config.progress,
        remove_unused_columns=False,
        label_names=["labels"],
        use_cpu=device == "cpu",
        bf16=device == "cuda",
        dataloader_num_workers=0,
        optim="adamw_torch",
        **eval_kwargs,
        **extra,
    )


def total_draws(config: TuneConfig, n_train: int, world_size: int = 1) -> int:
    if config.max_steps > 0:
        return config.max_steps * config.batch_size * config.grad_accum * world_size
    return int(math.ceil(config.epochs * n_train))


def auto_threads() -> int:
    """Cores not already busy with other processes. On a shared CPU, OpenMP threads that lose their core to
    another process stall every parallel region at its barrier: measured here with two other jobs running, a
    LoRA step took ~10x longer with 2 threads than with 1. On an idle machine this is every core.

    "Busy" is sampled now, over a quarter second, minus this process's own CPU time: the load average lags
    by a minute and counts this process too, so a run started right after this process answered questions
    (the feedback loop does) was given 1 thread of 2 on an idle machine."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    busy = _others_busy_cores()
    if busy is None:
        try:
            busy = os.getloadavg()[0]
        except OSError:  # pragma: no cover
            busy = 0.0
    return max(1, min(cores, int(round(cores - busy))))


def _others_busy_cores(window_s: float = 0.25) -> float | None:
    """Cores other processes kept busy over ``window_s`` (from /proc/stat and /proc/self/stat; None elsewhere)."""

    def sample() -> tuple[int, int, int]:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        with open("/proc/self/stat", encoding="ascii") as f:
            own = f.read().rsplit(")", 1)[1].split()
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields[:8]), idle, int(own[11]) + int(own[12])  # utime + stime, in the same clock ticks

    try:
        total0, idle0, own0 = sample()
        time.sleep(window_s)
        total1, idle1, own1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    elapsed = total1 - total0
    if elapsed <= 0:
        return None
    cores = os.cpu_count() or 1
    others = (elapsed - (idle1 - idle0)) - (own1 - own0)
    return max(0.0, others / elapsed * cores)


def set_threads(threads: int) -> int:
    """``threads`` > 0: exactly that many; 0: :func:`auto_threads` (CPU only)."""
    n = threads if threads > 0 else (auto_threads() if not torch.cuda.is_available() else torch.get_num_threads())
    torch.set_num_threads(n)
    return n


def checkpoint_to_adapter(home: Path, run_dir: Path, name: str, overwrite: bool = False) -> Path:
    """Keep the newest checkpoint of a stopped run (``<run_dir>/checkpoints/checkpoint-N``) as adapter
    ``name``: peft's files copied into ``<home>/adapters/<name>/`` with a ``ragtune.json`` saying where
    it came from (run, step, last logged losses). Written to a temp folder and renamed."""
    import datetime as dt

    from core.names import child_path
    from tuning.adapters import adapters_root, write_manifest
    from tuning.models import BaseModel, weights_hash

    info_path = Path(run_dir) / "run.json"
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise TuningError(f"{run_dir} has no readable run.json; only runs started by this version can be kept") from None
    if info.get("task") != "sft" or info.get("method") == "full":
        raise TuningError("only LoRA/DoRA runs of task sft can be kept from a checkpoint; train to the end instead")
    folder = Path(run_dir) / "checkpoints"
    found = sorted((p for p in folder.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
                   key=lambda p: int(p.name.split("-")[-1]))
    if not found or not (found[-1] / "adapter_model.safetensors").is_file():
        raise TuningError(f"no checkpoint with adapter weights under {folder}; the run stopped before its first save "
                          f"(save_steps) - resume it or start again")
    checkpoint = found[-1]
    target = child_path(adapters_root(home), name, "adapter name")
    if target.exists() and not overwrite:
        raise TuningError(f"adapter {name!r} already exists; pick another name or remove it first")
    state: dict[str, Any] = {}
    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pass
    history = state.get("log_history") or []
    losses = [h["loss"] for h in history if "loss" in h]
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    base_info = info.get("base_model") or {}
    base = BaseModel(base_info.get("id", ""), base_info.get("path", ""), base_info.get("kind", "local"))
    tmp = staging_dir(target.parent, name)
    for f in checkpoint.iterdir():
        if f.is_file() and (f.name.startswith("adapter_") or f.name in ("tokenizer.json", "tokenizer_config.json",
                                                                          "special_tokens_map.json", "chat_template.jinja")):
            shutil.copy2(f, tmp / f.name)
    config = dict(info.get("config") or {})
    config["name"] = name
    write_manifest(tmp, {
        "format": 1, "name": name, "task": "sft", "method": info.get("method"), "quant": info.get("quant"),
        "base_model": {"id": base.id, "kind": base.kind, "sha256": weights_hash(base) if base.path else None},
        "config": config,
        "metrics": {"steps": state.get("global_step"), "train_loss": losses[-1] if losses else None,
                    "eval_loss": evals[-1] if evals else None},
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "from_checkpoint": {"run_dir": str(run_dir), "checkpoint": checkpoint.name, "run_id": info.get("run_id")},
        "run_dir": str(run_dir),
    })
    publish_folder(tmp, target)
    return target
