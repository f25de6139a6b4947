"""One decode step of a Llama-architecture model without transformers' per-call machinery, same bits.

A decode step of SmolLM2-135M runs over a thousand tensor operations; on a 2-core CPU the Python around
them is a third of the step. transformers' forward adds, per step, the causal-mask builder, output-capture and
keyword-deprecation decorators on the model and on each of the 30 decoder layers, the attention-interface
lookup and the output dataclasses. :func:`decode_step` calls the model's own modules in the order
``LlamaModel.forward`` / ``LlamaDecoderLayer.forward`` / ``LlamaAttention.forward`` do (the embedding,
the rotary embedding, each layer's norms, projections, MLP, the cache's ``update``, the engine's attention
of :mod:`serving.generation.attention`, the final norm and the head): the same operations on the same
numbers, so the logits are the same bits (tested against the model's own forward, int8 and fp32, with
adapters mixed per row), and the int8, LoRA and attention wrappers apply as before. Only for
``model_type == "llama"`` with the standard layout (:func:`supports`); any other model takes the ordinary
forward.

Measured (2-core AMD EPYC, AVX2, one row, ~120-token prompt, median of 30 steps, alternating): 67.5 /
68.6 / 68.2 ms a step through ``model(...)`` against 62.9 / 63.2 / 63.5 ms here (before the int8 decode
kernel change of the same stop; see docs/benchmarks.md for the whole-bench figures).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from serving.generation.attention import rows_attention


def supports(model: Any) -> bool:
    """True when ``model`` is a Llama causal LM with the module layout :func:`decode_step` relies on."""
    config = getattr(model, "config", None)
    inner = getattr(model, "model", None)
    if getattr(config, "model_type", None) != "llama" or inner is None or not hasattr(inner, "rotary_emb"):
        return False
    layer = inner.layers[0] if len(getattr(inner, "layers", ())) else None
    return layer is not None and all(hasattr(layer, name) for name in ("self_attn", "mlp", "input_layernorm",
                                                                       "post_attention_layernorm"))


def decode_step(model: Any, ids, cache, positions=None):
    """Last-position logits for one new token per row (``ids``: rows x 1) continuing ``cache``;
    ``positions`` (rows x 1) as the model's ``position_ids`` (default: the cache's length)."""
    inner = model.model
    rows = ids.shape[0]
    h = inner.embed_tokens(ids)
    if positions is None:
        positions = torch.full((1, 1), cache.get_seq_length(), dtype=torch.long, device=ids.device)
    cos, sin = inner.rotary_emb(h, position_ids=positions)
    for index, layer in enumerate(inner.layers):
        attn = layer.self_attn
        x = layer.input_layernorm(h)
        shape = (rows, 1, -1, attn.head_dim)
        q = attn.q_proj(x).view(shape).transpose(1, 2)
        k = attn.k_proj(x).view(shape).transpose(1, 2)
        v = attn.v_proj(x).view(shape).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k, v = cache.update(k, v, index)
        out, _ = rows_attention(attn, q, k, v, None, dropout=0.0, scaling=attn.scaling)
        h = h + attn.o_proj(out.reshape(rows, 1, -1).contiguous())
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return model.lm_head(inner.norm(h))[:, -1, :]


__all__ = ["decode_step", "supports"]
