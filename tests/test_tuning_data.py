"""Data layer of tuning: formats, validation, answer-only masks, over-long policy, packing, mixtures, config."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from conftest import write_jsonl
from rag.config import ConfigError
from tuning.config import TuneConfig, load_tune_config, yaml_template
from tuning.data import (PackingCollator, TokenStats, detect_format, load_records, render_segments, tokenize_example,
                         to_messages)
from tuning.errors import DataError, TuningError
from tuning.mixing import MixtureSampler, Schedule


def test_formats_are_detected():
    assert detect_format({"instruction": "a", "output": "b"}) == "instruction"
    assert detect_format({"messages": []}) == "messages"
    assert detect_format({"question": "q", "answer": "a", "context": "c"}) == "qa"
    assert detect_format({"text": "t", "label": 1}) == "classification"
    assert detect_format({"prompt": "x"}) is None


def test_validation_names_file_row_and_field(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [
        {"instruction": "ok", "output": "fine"},
        {"instruction": "no output here"},
        {"instruction": "x", "output": 3},
    ])
    with pytest.raises(DataError) as err:
        load_records(path, "t")
    msg = str(err.value)
    assert f"{path}, row 2, field 'output': missing" in msg
    assert f"{path}, row 3, field 'output': expected a string" in msg
    assert "nothing was trained" in msg and "Fix:" in msg
    assert isinstance(err.value, TuningError)


def test_bad_json_and_unknown_shape_are_named(tmp_path):
    bad = tmp_path / "broken.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": \n', encoding="utf-8")
    with pytest.raises(DataError, match=r"broken.jsonl, row 2: not valid JSON"):
        load_records(bad, "t")
    odd = write_jsonl(tmp_path / "odd.jsonl", [{"prompt": "x", "completion": "y"}])
    with pytest.raises(DataError, match=r"row 1: cannot tell the record shape"):
        load_records(odd, "t")
    msgs = write_jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(DataError, match=r"messages\[0\]'.*last message must be the assistant"):
        load_records(msgs, "t")


def test_csv_goes_through_datasets(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("question,answer\nWhat is E07?,Low water flow.\n", encoding="utf-8")
    records = load_records(path, "csv")
    assert records[0].messages[-1] == {"role": "assistant", "content": "Low water flow."}


def test_unmasked_tokens_are_exactly_the_answers_plus_eos(smol_tokenizer):
    tok = smol_tokenizer
    conversation = [
        {"role": "system", "content": "You answer about heat pumps."},
        {"role": "user", "content": "What does E07 mean?"},
        {"role": "assistant", "content": "Low water flow; check the strainer."},
        {"role": "user", "content": "And E14?"},
        {"role": "assistant", "content": "The outdoor sensor is disconnected."},
    ]
    ex = tokenize_example(tok, conversation, 512, "drop")
    ids, labels = torch.tensor(ex["input_ids"]), torch.tensor(ex["labels"])
    trained = tok.decode(ids[labels != -100])
    assert trained == ("Low water flow; check the strainer." + tok.eos_token + "The outdoor sensor is disconnected." + tok.eos_token)
    # the whole sequence is the chat template's rendering, and the prompt part is what inference tokenizes
    assert tok.decode(ids) == tok.apply_chat_template(conversation, tokenize=False)
    prompt = tok.apply_chat_template(conversation[:2], tokenize=False, add_generation_prompt=True)
    assert ex["input_ids"][:len(tok(prompt, add_special_tokens=False)["input_ids"])] == tok(prompt, add_special_tokens=False)["input_ids"]

    for row, fmt in [({"instruction": "Summarise.", "input": "Long text.", "output": "Short."}, "instruction"),
                     ({"question": "Who?", "answer": "Corvida.", "context": "[1] Corvida makes heat pumps."}, "qa")]:
        ex = tokenize_example(tok, to_messages(row, fmt), 512, "drop")
        ids, labels = torch.tensor(ex["input_ids"]), torch.tensor(ex["labels"])
        expected = (row.get("output") or row.get("answer")) + tok.eos_token
        assert tok.decode(ids[labels != -100]) == expected


def test_eos_is_trained_even_without_an_end_marker(smol_tokenizer):
    tok = smol_tokenizer
    saved = tok.chat_template
    try:
        tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
        segs = render_segments(tok, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])
        assert ("hello", True) in segs and (tok.eos_token, True) in segs
    finally:
        tok.chat_template = saved


def test_overlong_rows_are_dropped_or_truncated_and_counted(smol_tokenizer):
    long = [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "answer " * 50}]
    short = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    stats = TokenStats()
    assert tokenize_example(smol_tokenizer, long, 128, "drop", stats) is None
    assert tokenize_example(smol_tokenizer, short, 128, "drop", stats) is not None
    assert (stats.rows, stats.kept, stats.dropped_overlong) == (2, 1, 0 + 1)
    stats = TokenStats()
    long_answer = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "answer " * 300}]
    ex = tokenize_example(smol_tokenizer, long_answer, 128, "truncate", stats)
    assert len(ex["input_ids"]) == 128 and stats.truncated == 1
    # a row whose answer is cut away entirely is dropped, not trained on nothing
    assert tokenize_example(smol_tokenizer, long, 128, "truncate", stats) is None and stats.dropped_no_target == 1


def test_packing_keeps_examples_apart(smol_tokenizer, tuning_home):
    from tuning.models import load_causal_lm, resolve_base_model

    tok = smol_tokenizer
    a = tokenize_example(tok, [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}], 128, "drop")
    b = tokenize_example(tok, [{"role": "user", "content": "Count to three, please."}, {"role": "assistant", "content": "One, two, three."}], 128, "drop")
    batch = PackingCollator(tok.pad_token_id, 128, packing=True)([a, b])
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch
    la, lb = len(a["input_ids"]), len(b["input_ids"])
    first, second = (a, b) if int(batch["input_ids"][0, 0]) == a["input_ids"][0] and la >= lb else (b, a)
    l1 = len(first["input_ids"])
    assert batch["position_ids"][0, l1] == 0  # positions restart for the second example
    assert int(batch["row_tokens"].sum()) == la + lb
    assert (batch["shift_labels"][0, :-1] == batch["labels"][0, 1:]).all()

    model = load_causal_lm(resolve_base_model("smollm2-135m-instruct", tuning_home), for_training=False).eval()
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        alone = model(input_ids=torch.tensor([second["input_ids"]]), use_cache=False).logits[0]
    torch.testing.assert_close(packed[l1:l1 + len(second["input_ids"])], alone, atol=2e-4, rtol=1e-3)

    # one example per row (they do not fit together): the pad tail continues the positions, so transformers
    # sees no packing and builds no mask; the padded row's real tokens still match the example alone
    from transformers.masking_utils import find_packed_sequence_indices

    rows = PackingCollator(tok.pad_token_id, max(la, lb) + 2, packing=True)([a, b])
    assert rows["input_ids"].shape[0] == 2 and find_packed_sequence_indices(rows["position_ids"]) is None
    short = 1 if rows["row_tokens"][1] < rows["row_tokens"][0] else 0
    n = int(rows["row_tokens"][short])
    with torch.no_grad():
        tailed = model(input_ids=rows["input_ids"][short:short + 1], position_ids=rows["position_ids"][short:short + 1],
                       use_cache=False).logits[0, :n]
        alone = model(input_ids=rows["input_ids"][short:short + 1, :n], use_cache=False).logits[0]
    torch.testing.assert_close(tailed, alone, atol=2e-4, rtol=1e-3)
    assert rows["labels"][short, n:].eq(-100).all()

    padded = PackingCollator(tok.pad_token_id, 128, packing=False)([a, b])
    assert padded["input_ids"].shape[0] == 2 and padded["attention_mask"].sum() == la + lb


def test_mixture_weights_and_progressive_schedule():
    tasks = ["old"] * 50 + ["new"] * 50
    static = MixtureSampler(tasks, Schedule({"old": 1.0, "new": 3.0}), seed=1)
    drawn = Counter(tasks[i] for i in static)
    assert 0.65 < drawn["new"] / len(tasks) < 0.85
    ramp = MixtureSampler(tasks, Schedule({"old": 1.0, "new": 1.0}, new_task="new", p0=0.1, p1=0.9), seed=1, total_epochs=1)
    order = [tasks[i] for i in ramp]
    assert order[:30].count("new") < order[-30:].count("new")
    assert Schedule({"a": 1, "b": 1, "c": 2}, "a", 0.2, 0.8).shares(1.0) == pytest.approx({"a": 0.8, "b": 0.2 / 3, "c": 0.4 / 3})
    # deterministic per (seed, epoch), different across epochs: resume replays the same order
    again = MixtureSampler(tasks, Schedule({"old": 1.0, "new": 3.0}), seed=1)
    assert list(again) == list(static)
    again.set_epoch(1)
    assert list(again) != list(static)


def test_config_precedence_and_refusals(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b"}])
    cfg_file = tmp_path / "tune.yaml"
    cfg_file.write_text(f"name: first\ndata: {data.name}\nlora_r: 8\n", encoding="utf-8")
    cfg = load_tune_config(cfg_file, ["lora_r=4", "learning_rate=1e-4"])
    assert (cfg.name, cfg.lora_r, cfg.learning_rate) == ("first", 4, 1e-4)
    assert cfg.sources()[0].path == str(data)  # relative to the YAML file
    with pytest.raises(ConfigError, match="unknown key"):
        load_tune_config(cfg_file, ["lora_rank=4"])
    with pytest.raises(ConfigError, match="quant"):
        load_tune_config(cfg_file, ["method=full", "quant=4bit"])
    with pytest.raises(ConfigError, match="not one of"):
        load_tune_config(cfg_file, ["method=prefix"])
    with pytest.raises(ConfigError, match="new_task"):
        TuneConfig(data=[{"path": "a.jsonl", "task": "x"}], new_task="y")
    multi = TuneConfig(data=[{"path": "a.jsonl", "weight": 3, "task": "raft"}, "b.jsonl"])
    assert [(s.task, s.weight) for s in multi.sources()] == [("raft", 3.0), ("b", 1.0)]
    template = yaml_template("ragtune tune my.yaml")
    assert template.startswith("# Run: ragtune tune my.yaml")
    assert "\nlora_r: 16\n" in template and "# LoRA rank" in template
