"""Attention over packed examples without a mask: each example of a packed row attends only to itself.

The packing collator puts a step's examples end to end in one row with no padding and returns their
boundaries (``cu_seqlens``). Passed down as the ``segments`` keyword (transformers hands unknown keywords
through to the attention function), :func:`segment_attention` runs causal attention one example at a
time, so no masked block is computed. (transformers still builds its block-diagonal mask from the
restarting positions for the fallback below; at ~1,000 tokens that costs 2.3 ms per forward, unused.)

On CPU, examples of up to :data:`EXPLICIT_MAX` tokens use explicit matmuls (bf16 under autocast) with an
fp32 softmax instead of SDPA's flash kernel, which was the slower of the two at these lengths on 2 cores
(forward+backward, 9 query and 3 key/value heads of 64, bf16, median of 80: 150 tokens 1.9 ms vs 4.8 ms,
450 tokens 13.2 ms vs 16.3 ms; a training step of 8 examples, 2,232 tokens: 7.3 s vs 8.3 s with SDPA per
example). Around 512 tokens the two meet (20.1 vs 18.5 ms) and beyond it flash's skipping of masked blocks
wins (1,000 tokens: 86.8 vs 42.6 ms), so longer examples, CUDA and attention dropout go through SDPA per
example. Without ``segments`` (generation, padded batches) the call is plain SDPA with the mask
transformers built.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F

NAME = "ragtune_segments"
EXPLICIT_MAX = 512  # longer examples: SDPA, faster there (and the explicit path holds 6 bytes per score for backward)

_registered = False


def register() -> str:
    """Register :func:`segment_attention` with transformers (idempotent); returns its name."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(NAME, segment_attention)
        AttentionMaskInterface.register(NAME, sdpa_mask)  # the mask the fallback needs is SDPA's
        _registered = True
    return NAME


@contextlib.contextmanager
def segments_enabled(model):
    """Use segment attention inside the block when the model supports switching; restore it after, so
    nothing saved (a full fine-tune's config.json) names an implementation only ragtune registers."""
    before = getattr(model.config, "_attn_implementation", None)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    switchable = before in ("sdpa", "eager", None) and getattr(base, "_can_set_attn_implementation", lambda: False)()
    if switchable:
        base.set_attn_implementation(register())
    try:
        yield switchable
    finally:
        if switchable:
            base.set_attn_implementation(before or "sdpa")


@functools.lru_cache(maxsize=None)
def _causal_bias(device: torch.device) -> torch.Tensor:
    """-inf above the diagonal, 0 elsewhere (1 MB): its top-left L x L corner is the causal bias of any
    example up to EXPLICIT_MAX tokens, built once instead of once per example and layer."""
    return torch.full((EXPLICIT_MAX, EXPLICIT_MAX), float("-inf"), device=device).triu_(1)


def uses_segments(model) -> bool:
    return getattr(model.config, "_attn_implementation", None) == NAME


def segment_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, segments: list[int] | None = None, **kwargs):
    """transformers attention-interface function; ``segments`` = example boundaries [0, l1, l1+l2, ..., T]."""
    if segments is None or query.shape[0] != 1:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    heads, kv_heads, dim = query.shape[1], key.shape[1], query.shape[-1]
    scale = scaling if scaling is not None else dim ** -0.5
    outs = []
    for start, end in zip(segments[:-1], segments[1:]):
        q, k, v = query[:, :, start:end], key[:, :, start:end], value[:, :, start:end]
        length = end - start
        if query.device.type == "cpu" and length <= EXPLICIT_MAX and dropout == 0.0:
            # (1, kv_heads, group, L, D): each key/value head serves its group of query heads, no repeat. The
            # scale goes on q (exact in bf16 for head_dim 64); adding the fp32 causal bias gives fp32 scores
            # for the softmax in one pass
            qg = (q * scale).reshape(1, kv_heads, heads // kv_heads, length, dim)
            future = _causal_bias(q.device)[:length, :length]
            probs = torch.softmax(torch.matmul(qg, k.unsqueeze(2).transpose(-1, -2)) + future, dim=-1)
            out = torch.matmul(probs.to(v.dtype), v.unsqueeze(2))
            outs.append(out.reshape(1, heads, length, dim))
        else:
            outs.append(F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scale, is_causal=True,
                                                       enable_gqa=heads != kv_heads))
    out = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
    return out.transpose(1, 2).contiguous(), None
