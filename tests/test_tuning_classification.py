"""Sequence classification on the packaged MiniLM encoder (LoRA SEQ_CLS) and on the causal LM."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.torch import load_file

from conftest import write_jsonl
from tuning.recipes.classification import accuracy_and_macro_f1, classify
from tuning.run import tune

pytestmark = pytest.mark.slow

ROWS = [("My invoice is wrong, please check the amount.", "billing"), ("Please refund the double charge.", "billing"),
        ("I was billed twice this month.", "billing"), ("Where can I download my statement?", "billing"),
        ("The unit shows error E07 and stopped heating.", "fault"), ("Loud banging from the outdoor unit.", "fault"),
        ("No hot water since this morning.", "fault"), ("The display is blank and nothing works.", "fault")]


def test_accuracy_and_macro_f1():
    m = accuracy_and_macro_f1(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1]), 2)
    assert m["accuracy"] == 0.75 and m["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2, abs=1e-4)


def test_minilm_lora_classifier_and_classify_cli(tune_home, tmp_path):
    from typer.testing import CliRunner

    from serving import cli

    data = write_jsonl(tmp_path / "train.jsonl", [{"text": t, "label": l} for t, l in ROWS * 2])
    test = write_jsonl(tmp_path / "test.jsonl", [{"text": t, "label": l} for t, l in ROWS[::2]])
    m = tune(None, ["name=intent", "task=classification", "base_model=all-minilm-l6-v2", f"data={data}", f"test_data={test}",
                    "max_steps=3", "batch_size=8", "max_seq_len=32", "eval_steps=2", "save_steps=2", "learning_rate=5e-3",
                    "threads=1", "progress=false"], home=tune_home, echo=lambda *_: None)
    assert m["labels"] == ["billing", "fault"]
    assert {"test_accuracy", "test_macro_f1"} <= set(m["metrics"])
    folder = tune_home / "adapters" / "intent"
    weights = load_file(folder / "adapter_model.safetensors")
    assert any("classifier" in k for k in weights) and any("lora_A" in k for k in weights)  # head saved with the adapter
    assert json.loads((folder / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"

    first = classify(tune_home, "intent", [ROWS[0][0], ROWS[4][0]])
    again = classify(tune_home, "intent", [ROWS[0][0], ROWS[4][0]])
    assert first == again and set(first[0]["scores"]) == {"billing", "fault"}
    assert sum(first[0]["scores"].values()) == pytest.approx(1.0, abs=1e-3)

    cli._register_plugins()
    result = CliRunner().invoke(cli.app, ["classify", "--adapter", "intent", "--json", ROWS[1][0]], env={"RAGTUNE_HOME": str(tune_home)})
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)[0]["label"] in {"billing", "fault"}


def test_causal_lm_classifier(tune_home, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", [{"text": t, "label": l} for t, l in ROWS])
    m = tune(None, ["name=lm-intent", "task=classification", f"data={data}", "max_steps=1", "batch_size=4", "max_seq_len=32",
                    "val_share=0.25", "target_modules=attention", "threads=1", "progress=false"], home=tune_home, echo=lambda *_: None)
    assert m["base_model"]["id"] == "smollm2-135m-instruct" and "test_accuracy" in m["metrics"]
    weights = load_file(tune_home / "adapters" / "lm-intent" / "adapter_model.safetensors")
    assert any("score" in k for k in weights)
