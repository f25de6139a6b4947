"""The one tuning config: :class:`TuneConfig` (defaults < YAML < ``key=value``; see core.config).

Top-level keys are kept stable (``name``, ``task``, ``base_model``, ``data``, ``method``, ``quant``,
``epochs``, ``max_steps``, ``learning_rate``, ``seed``) so old configs keep working. The resolved config
is saved in the adapter's ``ragtune.json``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from core.config import ConfigError, config_help, config_to_dict, field, load_config
from core.names import InvalidName, check_name

__all__ = ["TuneConfig", "DataSource", "load_tune_config", "yaml_template", "ConfigError"]



@dataclass
class DataSource:
    """One training file with its sampling weight and task tag."""

    path: str
    weight: float = 1.0
    task: str = ""


@dataclass
class TuneConfig:
    name: str = field("my-adapter", help="adapter name: output goes to <home>/adapters/<name>/ and the run log to <home>/runs/<name>/")
    task: Literal["sft", "classification", "dpo"] = field("sft", help="sft: instruction/chat tuning of a causal LM; classification: a sequence-classification head on {text, label}; dpo: preference tuning (TRL DPOTrainer) on {prompt|question, chosen, rejected} pairs")
    base_model: str = field("smollm2-135m-instruct", help="packaged 'smollm2-135m-instruct' or 'all-minilm-l6-v2' (classification), a local HF folder, or a hub id")
    data: Any = field(None, help="a training file, or a list of files / {path, weight, task} mappings (JSONL, JSON, CSV, Parquet)")
    data_format: Literal["auto", "instruction", "messages", "qa", "classification"] = field("auto", help="record shape; auto detects it per file from the first row")
    eval_data: str | None = field(None, help="validation file; when unset, val_share of the training rows is held out (per task)")
    test_data: str | None = field(None, help="classification: test file scored for accuracy and macro-F1 after training (default: the validation split)")
    val_share: float = field(0.1, help="share of rows held out for validation when eval_data is unset (0 disables evaluation)")
    method: Literal["lora", "dora", "full"] = field("lora", help="lora, dora (weight-decomposed LoRA) or full fine-tuning (small models only)")
    quant: Literal["none", "8bit", "4bit"] = field("none", help="load the base with bitsandbytes: 8bit, or 4bit nf4 with double quant (QLoRA); lora/dora only")
    epochs: float = field(1.0, help="passes over the training data (ignored when max_steps > 0)")
    max_steps: int = field(-1, help="optimizer steps to run; -1 means use epochs")
    learning_rate: float = field(2e-4, help="peak learning rate (linear warmup, then linear decay)")
    warmup_ratio: float = field(0.03, help="share of steps spent warming the learning rate up")
    weight_decay: float = field(0.0, help="AdamW weight decay")
    seed: int = field(42, help="seed for data order, splits, dropout and adapter init")
    batch_size: int = field(8, help="examples per step (with packing: the step holds about batch_size examples' worth of tokens)")
    grad_accum: int = field(1, help="gradient accumulation steps")
    max_seq_len: int = field(512, help="longest row in tokens; longer rows follow `overlong`")
    overlong: Literal["drop", "truncate"] = field("drop", help="rows over max_seq_len: drop them, or truncate the end (the answer tail and EOS are lost); counted in the log")
    packing: bool = field(True, help="put a step's rows end to end without padding; attention never crosses rows (False: pad each row)")
    pass_tokens: int = field(1024, help="tokens per forward/backward pass: a step's rows are split into passes of about this many tokens and their gradients summed, so a step equals one big pass but holds only one pass's activations (memory); 0 = the whole step in one pass")
    system_prompt: str | None = field(None, help="system message added to rows that have none (None keeps the template's default)")
    lora_r: int = field(16, help="LoRA rank")
    lora_alpha: int = field(32, help="LoRA scaling alpha")
    lora_dropout: float = field(0.05, help="dropout on the LoRA input")
    target_modules: str = field("all-linear", help="'attention' (q,k,v,o), 'all-linear', or a comma list of module names")
    layers: int = field(0, help="adapt only the top N transformer layers (0 = all): the 'freeze early layers' approach")
    eval_steps: int = field(50, help="evaluate every N optimizer steps (and at the end)")
    save_steps: int = field(50, help="write a resumable checkpoint every N steps")
    save_total_limit: int = field(2, help="checkpoints kept on disk (the best one is always kept)")
    early_stopping_patience: int = field(0, help="stop after N evaluations without improvement of eval loss (0 = off)")
    resume: bool = field(False, help="continue from the newest checkpoint in <home>/runs/<name>/checkpoints")
    overwrite: bool = field(False, help="replace an existing adapter with the same name")
    new_task: str | None = field(None, help="progressive mixing: the task tag whose share ramps from p0 to p1; other tasks replay in proportion to their weights")
    p0: float = field(0.5, help="progressive mixing: share of new_task at the start of training")
    p1: float = field(0.9, help="progressive mixing: share of new_task at the end of training")
    start_adapter: str | None = field(None, help="sft/dpo: the registered adapter to continue training (its rank, targets and base model; "
                                                 "lora_* keys are then unused); for dpo also the frozen reference (None: a new LoRA on the "
                                                 "base, the base is the reference)")
    dpo_beta: float = field(0.1, help="dpo: strength of the pull towards the reference (DPO's beta; higher = closer to the reference)")
    forgetting_probe: bool = field(True, help="measure general perplexity and general QA accuracy before and after (sft only)")
    probe_limit: int = field(0, help="forgetting probe: use at most N prose passages and N questions (0 = all)")
    logging_steps: int = field(5, help="log the training loss every N steps")
    threads: int = field(0, help="CPU threads for torch (0 = auto: the cores not already busy, by load average)")
    device: Literal["auto", "cpu", "cuda"] = field("auto", help="where to train; auto picks CUDA when present (bf16) else CPU")
    precision: Literal["auto", "fp32", "bf16"] = field("auto", help="training matmuls: auto = bf16 on CUDA and on CPUs with native bf16 instructions (AVX512-BF16/AMX), fp32 otherwise. On CPU (sft), bf16 is autocast in the training forward only: weights, LoRA parameters, optimizer and evaluation stay fp32")
    gradient_checkpointing: bool = field(False, help="trade compute for memory (always on for 8bit/4bit as in QLoRA)")
    progress: bool = field(True, help="show a progress bar with the loss")

    def __post_init__(self) -> None:
        try:  # the adapter and run folders are named after it: the one name rule (core.names)
            check_name(self.name, "adapter name")
        except InvalidName as exc:
            raise ConfigError(f"name: {exc}") from None
        if self.data is None or self.data == [] or self.data == "":
            raise ConfigError("data: no training data given (example: data=corpora/corvida/instructions/train.jsonl)")
        self.sources()  # validates the shape
        if self.quant != "none" and self.method == "full":
            raise ConfigError("quant: full fine-tuning cannot train quantized weights; use method=lora with quant=4bit (QLoRA) or quant=none")
        if self.max_seq_len < 16:
            raise ConfigError("max_seq_len: must be at least 16 tokens (example: max_seq_len=512)")
        if self.pass_tokens < 0:
            raise ConfigError("pass_tokens: must be >= 0 (0 = the whole step in one pass)")
        for key in ("batch_size", "grad_accum", "lora_r", "eval_steps", "save_steps", "save_total_limit", "logging_steps"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be >= 1")
        if not 0.0 <= self.val_share < 0.9:
            raise ConfigError("val_share: must be in [0, 0.9) (example: val_share=0.1)")
        if self.max_steps <= 0 and self.epochs <= 0:
            raise ConfigError("epochs: must be > 0 when max_steps is -1 (example: epochs=1)")
        if not (0.0 <= self.p0 <= 1.0 and 0.0 <= self.p1 <= 1.0):
            raise ConfigError("p0/p1: shares must be between 0 and 1 (example: p0=0.5 p1=0.9)")
        if self.new_task is not None and self.new_task not in {s.task for s in self.sources()}:
            tasks = sorted({s.task for s in self.sources()})
            raise ConfigError(f"new_task: {self.new_task!r} is not the task of any data entry (tasks: {tasks}); tag it as {{path: ..., task: {self.new_task}}}")
        if self.layers < 0:
            raise ConfigError("layers: must be >= 0 (0 adapts every layer)")
        if self.start_adapter is not None:
            if self.task not in ("dpo", "sft") or self.method == "full":
                raise ConfigError("start_adapter: only LoRA/DoRA adapters of task=sft or task=dpo start from an adapter "
                                  "(remove it, or set method=lora)")
            try:
                check_name(self.start_adapter, "adapter name")
            except InvalidName as exc:
                raise ConfigError(f"start_adapter: {exc}") from None
        if self.task == "dpo" and (self.method != "lora" or self.quant != "none"):
            raise ConfigError("task=dpo trains a LoRA adapter on an unquantized base: set method=lora quant=none")
        if self.dpo_beta <= 0:
            raise ConfigError("dpo_beta: must be > 0 (example: dpo_beta=0.1)")

    def sources(self) -> list[DataSource]:
        """``data`` as a list of :class:`DataSource` (task defaults to the file's stem)."""
        items = self.data if isinstance(self.data, list) else [self.data]
        out: list[DataSource] = []
        for i, item in enumerate(items):
            if isinstance(item, (str, Path)):
                out.append(DataSource(str(item), 1.0, Path(str(item)).stem))
            elif isinstance(item, dict):
                unknown = set(item) - {"path", "weight", "task"}
                if "path" not in item or unknown:
                    raise ConfigError(f"data[{i}]: expected {{path, weight?, task?}}, got keys {sorted(item)} (example: {{path: qa.jsonl, weight: 3, task: corvida}})")
                try:
                    weight = float(item.get("weight", 1.0))
                except (TypeError, ValueError):
                    raise ConfigError(f"data[{i}].weight: expected a number, got {item.get('weight')!r}") from None
                if weight <= 0:
                    raise ConfigError(f"data[{i}].weight: must be > 0")
                out.append(DataSource(str(item["path"]), weight, str(item.get("task") or Path(str(item["path"])).stem)))
            else:
                raise ConfigError(f"data[{i}]: expected a path or a mapping, got {item!r}")
        return out


def load_tune_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> TuneConfig:
    """Defaults < YAML file < overrides. Relative data paths are resolved against the YAML file's folder
    when they do not exist relative to the current directory."""
    config = load_config(TuneConfig, path, overrides)
    if path is not None:
        base = Path(path).resolve().parent

        def fix(p: str) -> str:
            return p if Path(p).exists() or Path(p).is_absolute() or not (base / p).exists() else str(base / p)

        if isinstance(config.data, list):
            config.data = [fix(d) if isinstance(d, str) else {**d, "path": fix(str(d["path"]))} for d in config.data]
        elif isinstance(config.data, str):
            config.data = fix(config.data)
        for key in ("eval_data", "test_data"):
            if getattr(config, key):
                setattr(config, key, fix(getattr(config, key)))
    return config


def yaml_template(command: str = "ragtune tune tune.yaml") -> str:
    """Every key with its help and default, as a commented YAML file."""
    lines = [f"# Run: {command}", "# Override any key on the command line: key=value", ""]
    for name, tp, default, help_ in config_help(TuneConfig):
        lines.append(f"# {help_} ({tp})")
        lines.append(f"{name}: {_yaml_value(default)}")
    return "\n".join(lines) + "\n"


def _yaml_value(value: Any) -> str:
    import yaml

    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def resolved_dict(config: TuneConfig) -> dict[str, Any]:
    d = config_to_dict(config)
    d["data"] = [dataclasses.asdict(s) for s in config.sources()]
    return d
