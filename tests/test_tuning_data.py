"""Data layer of tuning: formats, validation, answer-only masks, over-long policy, packing, mixtures, config."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from conftest import write_jsonl
from core.config import ConfigError
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
    from tuning import attention
    from tuning.models import load_causal_lm, resolve_base_model
    from tuning.training import causal_lm_loss

    tok = smol_tokenizer
    a = tokenize_example(tok, [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}], 128, "drop")
    b = tokenize_example(tok, [{"role": "user", "content": "Count to three, please."}, {"role": "assistant", "content": "One, two, three."}], 128, "drop")
    la, lb = len(a["input_ids"]), len(b["input_ids"])
    batch = PackingCollator(tok.pad_token_id, packing=True)([a, b])
    # one row of exactly the real tokens: no pad token, no attention mask
    assert batch["input_ids"].shape == (1, la + lb) and "attention_mask" not in batch
    assert batch["input_ids"][0].tolist() == a["input_ids"] + b["input_ids"]
    assert batch["cu_seqlens"].tolist() == [0, la, la + lb] and batch["row_tokens"].tolist() == [la + lb]
    assert batch["position_ids"][0, la] == 0 and batch["position_ids"][0, -1] == lb - 1  # positions restart
    assert batch["labels"][0, la] == -100  # the second example's first token is never predicted from the first
    assert (batch["shift_labels"][0, :-1] == batch["labels"][0, 1:]).all() and batch["shift_labels"][0, -1] == -100

    model = load_causal_lm(resolve_base_model("smollm2-135m-instruct", tuning_home), for_training=False).eval()
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([b["input_ids"]]), use_cache=False).logits[0]
        # without segments transformers builds a block-diagonal mask from the restarting positions
        masked = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0, la:]
        with attention.segments_enabled(model) as on:
            assert on and attention.uses_segments(model)
            segmented = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                              segments=batch["cu_seqlens"].tolist()).logits[0, la:]
            loss_seg, n = causal_lm_loss(model, batch)
        assert model.config._attn_implementation == "sdpa"  # restored: nothing saved names ragtune's function
        loss_mask, n2 = causal_lm_loss(model, batch)
    torch.testing.assert_close(masked, alone, atol=2e-4, rtol=1e-3)
    torch.testing.assert_close(segmented, alone, atol=2e-4, rtol=1e-3)
    assert n == n2 == int(batch["shift_labels"].ne(-100).sum())
    torch.testing.assert_close(loss_seg, loss_mask, atol=1e-3, rtol=1e-4)

    padded = PackingCollator(tok.pad_token_id, packing=False)([a, b])
    assert padded["input_ids"].shape == (2, max(la, lb)) and padded["attention_mask"].sum() == la + lb
    assert padded["row_tokens"].tolist() == [la, lb] and padded["labels"][:, 0].eq(-100).all()


def test_passes_cut_packed_steps_at_example_boundaries():
    from tuning.training import split_passes

    lengths = [300, 500, 200, 900, 1500, 100]
    examples = [{"input_ids": list(range(1, n + 1)), "labels": list(range(1, n + 1))} for n in lengths]
    batch = PackingCollator(0, packing=True)(examples)
    passes = split_passes(batch, 1024)
    # greedy in order: 300+500+200 fit, 900 alone, 1500 is over the budget and gets a pass of its own, then 100
    assert [p["cu_seqlens"].tolist() for p in passes] == [[0, 300, 800, 1000], [0, 900], [0, 1500], [0, 100]]
    for key in ("input_ids", "labels", "shift_labels", "position_ids"):
        assert torch.equal(torch.cat([p[key] for p in passes], dim=1), batch[key])
    assert sum(int(p["row_tokens"]) for p in passes) == sum(lengths)
    assert all(int(p["position_ids"][0, 0]) == 0 for p in passes)
    assert split_passes(batch, 0) == [batch] and split_passes(batch, 10_000) == [batch]
    padded = PackingCollator(0, packing=False)(examples[:4])  # 4 rows of width 900: 1 row per 1,024-token pass
    assert [p["input_ids"].shape[0] for p in split_passes(padded, 1024)] == [1, 1, 1, 1]
    assert [p["input_ids"].shape[0] for p in split_passes(padded, 2000)] == [2, 2]


def test_segment_attention_matches_masked_sdpa():
    """The explicit CPU path and the SDPA path give the block-diagonal causal attention, values and grads."""
    from types import SimpleNamespace

    from tuning import attention

    torch.manual_seed(0)
    lengths = [37, 5, attention.EXPLICIT_MAX + 20]  # the last one takes the SDPA path
    total = sum(lengths)
    q = torch.randn(1, 6, total, 16, requires_grad=True)
    k = torch.randn(1, 2, total, 16, requires_grad=True)
    v = torch.randn(1, 2, total, 16, requires_grad=True)
    bounds = [0, 37, 42, total]
    seg = torch.repeat_interleave(torch.arange(3), torch.tensor(lengths))
    allowed = (seg[:, None] == seg[None, :]) & torch.ones(total, total, dtype=torch.bool).tril()
    module = SimpleNamespace(num_key_value_groups=3, is_causal=True)
    want = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1),
                                                            attn_mask=allowed, scale=0.3).transpose(1, 2)
    got, _ = attention.segment_attention(module, q, k, v, None, scaling=0.3, segments=bounds)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    grads_want = torch.autograd.grad((want * torch.linspace(-1, 1, 16)).sum(), (q, k, v))
    grads_got = torch.autograd.grad((got * torch.linspace(-1, 1, 16)).sum(), (q, k, v))
    for g, w in zip(grads_got, grads_want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)
    # without segments it is plain SDPA with the given mask
    plain, _ = attention.segment_attention(module, q, k, v, allowed[None, None], scaling=0.3)
    torch.testing.assert_close(plain, want, atol=1e-5, rtol=1e-4)


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
