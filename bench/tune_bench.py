"""Tuning benchmark: the usual tutorial recipe vs ragtune's defaults, same examples, same hyperparameters.

    python bench/tune_bench.py --quick        # < 5 minutes on 2 CPU cores
    python bench/tune_bench.py                # full size (make bench)

Baseline (what tutorials write): transformers ``Trainer`` + peft LoRA (r=16, alpha=32, all-linear),
``DataCollatorForLanguageModeling(mlm=False)`` padding each batch, loss on every token (and, since
SmolLM2's pad token is its EOS, EOS is masked out of the loss).
ragtune: ``ragtune tune`` at its defaults (answer-only loss + EOS, examples end to end without padding and
attention one example at a time, logits only at labelled positions, ~1,024-token passes, bf16 autocast
where the CPU has native bf16, a cheaper LoRA dropout mask) with the same LoRA settings (dropout 0.05
included), learning rate, batch size, epochs, seed. Neither arm evaluates during its timed epoch; afterwards
both models are scored in fp32 by the same function on the same held-out rows (ragtune's from the adapter
folder it wrote).

Each arm runs in its own subprocess so peak RSS (``ru_maxrss``) is not shared. Prints one JSON line per
metric: epoch_speedup (baseline epoch wall time / ragtune's, goal >= 2), peak_rss_ratio (ragtune /
baseline, goal <= 0.7), eval_loss_ratio (ragtune eval loss on answer tokens / baseline's, goal <= 1.0).

On a GPU (device tool): ``python bench/tune_bench.py --device cuda`` (bf16), add ``--quant 4bit`` for QLoRA.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from core.workspace import Layout  # noqa: E402  (after the path insert: the bench runs from a checkout)

DATA = [REPO / "corpora" / "corvida" / "instructions" / "A.jsonl", REPO / "corpora" / "corvida" / "instructions" / "B.jsonl"]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def prepare(work: Path, n_train: int, n_eval: int, max_len: int, seed: int) -> tuple[Path, Path]:
    """Same rows for both arms: rows that fit max_len, shuffled, split into train/eval files."""
    from tuning.data import to_messages, tokenize_example
    from tuning.models import load_tokenizer, resolve_base_model
    from core.workspace import ragtune_home

    tok = load_tokenizer(resolve_base_model("smollm2-135m-instruct", ragtune_home()))
    rows = []
    for path in DATA:
        if not path.exists():
            raise SystemExit(f"{path} missing: the bench needs corpora/corvida/instructions")
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                rows.append(json.loads(line))
    fitting = []
    for row in rows:
        if tokenize_example(tok, to_messages(row, "instruction"), max_len, "drop") is not None:
            fitting.append({"instruction": row["instruction"], "input": row.get("input", ""), "output": row["output"]})
    random.Random(seed).shuffle(fitting)
    if len(fitting) < n_train + n_eval:
        n_train = len(fitting) - n_eval
    train, evals = fitting[:n_train], fitting[n_train:n_train + n_eval]
    tp, ep = work / "train.jsonl", work / "eval.jsonl"
    tp.write_text("".join(json.dumps(r) + "\n" for r in train), encoding="utf-8")
    ep.write_text("".join(json.dumps(r) + "\n" for r in evals), encoding="utf-8")
    return tp, ep


def eval_rows(tok, path: Path, max_len: int) -> list[dict]:
    from tuning.data import load_records, tokenize_records

    rows, _ = tokenize_records(tok, load_records(path, "eval"), max_len, "drop")
    return rows


def load_base(a):
    """The base model exactly as the baseline arm loads it (both arms' eval losses come from such a model)."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if a.device == "cuda" else torch.float32
    kwargs = {}
    if a.quant == "4bit":
        from transformers import BitsAndBytesConfig
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    return AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype, **kwargs)


def eval_loss(a, tok, model) -> float:
    """Answer-token loss on the held-out rows: same function, rows and padded batches for both arms."""
    from tuning.data import PackingCollator
    from tuning.training import evaluate_loss

    rows = eval_rows(tok, Path(a.eval), a.max_len)
    return evaluate_loss(model, rows, PackingCollator(tok.pad_token_id, packing=False), a.batch_size, model.device)["eval_loss"]


def worker_baseline(a) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, DataCollatorForLanguageModeling, Trainer, TrainingArguments

    from tuning.data import load_records

    if a.threads:
        torch.set_num_threads(a.threads)
    tok = AutoTokenizer.from_pretrained(a.model)
    model = load_base(a)
    if a.quant == "4bit":
        from peft import prepare_model_for_kbit_training
        model = prepare_model_for_kbit_training(model)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM"))
    texts = [tok.apply_chat_template(r.messages, tokenize=False) for r in load_records(a.train, "train")]
    ds = Dataset.from_dict({"text": texts}).map(lambda b: tok(b["text"], truncation=True, max_length=a.max_len),
                                                 batched=True, remove_columns=["text"])
    args = TrainingArguments(output_dir=str(Path(a.work) / "baseline"), per_device_train_batch_size=a.batch_size,
                             num_train_epochs=a.epochs, learning_rate=2e-4, warmup_steps=0.03, lr_scheduler_type="linear",
                             logging_steps=10, save_strategy="no", report_to="none", seed=42, disable_tqdm=True,
                             use_cpu=a.device == "cpu", bf16=a.device == "cuda")
    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=DataCollatorForLanguageModeling(tok, mlm=False))
    start = time.time()
    trainer.train()
    seconds = time.time() - start
    return {"epoch_seconds": seconds / a.epochs, "peak_rss_mb": peak_rss_mb(), "eval_loss": eval_loss(a, tok, model)}


def worker_ragtune(a) -> dict:
    from peft import PeftModel
    from transformers import AutoTokenizer

    from tuning.run import tune

    # no validation split while timing (the baseline evaluates nothing during its epoch either); the adapter
    # ragtune writes is scored afterwards exactly like the baseline's model
    overrides = ["name=bench", f"data={a.train}", "val_share=0", f"epochs={a.epochs}", f"batch_size={a.batch_size}",
                 f"max_seq_len={a.max_len}", "forgetting_probe=false", "progress=false", "save_steps=100000",
                 f"device={a.device}", f"quant={a.quant}", f"threads={a.threads}", "overwrite=true"]
    m = tune(None, overrides, home=a.home, echo=lambda *_: None)
    model = PeftModel.from_pretrained(load_base(a), Layout(Path(a.home)).adapter_dir("bench"))
    return {"epoch_seconds": m["train_seconds"] / a.epochs, "peak_rss_mb": peak_rss_mb(),
            "eval_loss": eval_loss(a, AutoTokenizer.from_pretrained(a.model), model), "tokens_per_second": m["tokens_per_second"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller input, same metrics (< 5 minutes on 2 cores)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cpu (fp32) or cuda (bf16)")
    p.add_argument("--quant", default="none", choices=["none", "4bit"], help="4bit: QLoRA in both arms")
    p.add_argument("--threads", type=int, default=0, help="torch threads, the same in both arms (0 = torch's default count)")
    p.add_argument("--rows", type=int, default=0, help="training rows (default 16 quick, 120 full)")
    p.add_argument("--worker", choices=["baseline", "ragtune"], help=argparse.SUPPRESS)
    for hidden in ("--train", "--eval", "--work", "--home", "--model"):
        p.add_argument(hidden, help=argparse.SUPPRESS)
    p.add_argument("--max-len", dest="max_len", type=int, default=512, help=argparse.SUPPRESS)
    p.add_argument("--batch-size", dest="batch_size", type=int, default=8, help="examples per step (both arms)")
    p.add_argument("--epochs", type=int, default=1, help="epochs (both arms)")
    a = p.parse_args()
    if a.worker:
        out = worker_baseline(a) if a.worker == "baseline" else worker_ragtune(a)
        print("RESULT " + json.dumps(out), flush=True)
        return

    from core.workspace import ragtune_home
    from tuning.models import ensure_packaged_causal_lm

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    model_dir = ensure_packaged_causal_lm(ragtune_home())  # converted once, outside the timed/measured runs
    if not a.threads:
        # an explicit, equal count for both arms: ragtune's own threads=0 means "auto from the load
        # average", which on a busy machine picks fewer threads than the baseline and skews the ratio
        import torch

        a.threads = torch.get_num_threads()
    n_train = a.rows or (12 if a.quick else 120)
    n_eval = 6 if a.quick else 24
    if a.quick:
        a.batch_size = min(a.batch_size, 4)
        a.max_len = min(a.max_len, 384)
    with tempfile.TemporaryDirectory(prefix="tune-bench-") as tmp:
        work = Path(tmp)
        home = work / "home"
        models = Layout(home).models
        models.mkdir(parents=True)
        (models / model_dir.name).symlink_to(model_dir, target_is_directory=True)
        train, evals = prepare(work, n_train, n_eval, a.max_len, 42)
        results = {}
        for arm in ("baseline", "ragtune"):
            cmd = [sys.executable, __file__, "--worker", arm, "--train", str(train), "--eval", str(evals), "--work", str(work),
                   "--home", str(home), "--model", str(model_dir), "--max-len", str(a.max_len), "--batch-size", str(a.batch_size),
                   "--epochs", str(a.epochs), "--device", a.device, "--quant", a.quant, "--threads", str(a.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
            line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                sys.stderr.write(proc.stderr[-4000:])
                raise SystemExit(f"{arm} run failed (exit {proc.returncode})")
            results[arm] = json.loads(line[len("RESULT "):])
            print(f"# {arm}: {results[arm]}", file=sys.stderr, flush=True)
    b, r = results["baseline"], results["ragtune"]
    extra = {"device": a.device, "quant": a.quant, "rows": n_train, "quick": a.quick}
    for metric, value, bv, rv, unit, goal in [
        ("epoch_speedup", b["epoch_seconds"] / r["epoch_seconds"], b["epoch_seconds"], r["epoch_seconds"], "x", ">= 2"),
        ("peak_rss_ratio", r["peak_rss_mb"] / b["peak_rss_mb"], b["peak_rss_mb"], r["peak_rss_mb"], "ratio", "<= 0.7"),
        ("eval_loss_ratio", r["eval_loss"] / b["eval_loss"], b["eval_loss"], r["eval_loss"], "ratio", "<= 1.0"),
    ]:
        print(json.dumps({"bench": "tune", "metric": metric, "value": round(value, 3), "baseline": round(bv, 3),
                          "ragtune": round(rv, 3), "unit": unit, "goal": goal, **extra}), flush=True)


if __name__ == "__main__":
    main()
