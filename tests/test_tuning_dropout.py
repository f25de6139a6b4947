"""The LoRA input dropout that replaces peft's nn.Dropout on CPU, and the training precision choice."""

from __future__ import annotations

import pytest
import torch

from tuning.models import training_precision
from tuning.training import FastDropout, use_fast_dropout


def test_keep_rate_scale_and_gradient():
    torch.manual_seed(0)
    drop = FastDropout(0.05).train()
    x = torch.rand(1000, 1000) + 0.5
    x.requires_grad_(True)
    y = drop(x)
    kept = y != 0
    # 1e6 draws: the kept share has a standard deviation of 2.2e-4 around 0.95
    assert abs(kept.float().mean().item() - 0.95) < 2e-3
    torch.testing.assert_close(y[kept], x.detach()[kept] / 0.95)
    y.sum().backward()
    expected = kept.float() / 0.95
    torch.testing.assert_close(x.grad, expected)


def test_expectation_matches_torch_dropout_and_eval_is_identity():
    torch.manual_seed(1)
    x = torch.ones(512, 512)
    ours, theirs = FastDropout(0.3).train(), torch.nn.Dropout(0.3).train()
    # inverted dropout keeps the expectation: both means are 1 within ~3 standard deviations (0.0025 each)
    assert abs(ours(x).mean().item() - 1.0) < 0.01 and abs(theirs(x).mean().item() - 1.0) < 0.01
    assert abs((ours(x) == 0).float().mean().item() - 0.3) < 0.01
    x = torch.randn(512, 512)
    assert torch.equal(ours.eval()(x), x)
    assert torch.equal(FastDropout(0.0).train()(x), x)
    with pytest.raises(ValueError):
        FastDropout(1.0)


def test_same_seed_same_mask_and_bf16_input():
    x = torch.randn(64, 96, dtype=torch.bfloat16)
    torch.manual_seed(7)
    a = FastDropout(0.1).train()(x)
    torch.manual_seed(7)
    b = FastDropout(0.1).train()(x)
    assert a.dtype == torch.bfloat16 and torch.equal(a, b)


def test_under_autocast_the_mask_runs_in_bf16_with_the_same_values():
    x = torch.randn(64, 96, requires_grad=True)
    torch.manual_seed(3)
    plain = FastDropout(0.2).train()(x.detach())
    torch.manual_seed(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = FastDropout(0.2).train()(x)
    # what the following LoRA matmul would have seen: the fp32 result cast to bf16
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), plain.to(torch.bfloat16).float(), atol=0, rtol=1e-2)
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32
    torch.testing.assert_close(x.grad, (plain != 0).float() / 0.8, atol=0, rtol=1e-2)


def test_peft_dropouts_are_swapped():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, lora_dropout=0.1, target_modules="all-linear"))
    assert use_fast_dropout(model) == 2 * 7  # q, k, v, o, gate, up, down per layer
    drops = [m for m in model.modules() if isinstance(m, FastDropout)]
    assert len(drops) == 14 and all(d.p == 0.1 for d in drops)
    model.train()
    out = model(input_ids=torch.randint(0, 64, (2, 8)), labels=torch.randint(0, 64, (2, 8)))
    out.loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)


def test_precision_choice(monkeypatch):
    import tuning.models as models

    assert training_precision("fp32", "cpu") == "fp32" and training_precision("bf16", "cpu") == "bf16"
    assert training_precision("auto", "cuda") == "bf16"
    with pytest.raises(models.ModelError, match="precision=fp32 is for CPU"):
        training_precision("fp32", "cuda")
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: False)
    assert training_precision("auto", "cpu") == "fp32"
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: True)
    assert training_precision("auto", "cpu") == "bf16"
