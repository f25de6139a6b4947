"""Decode-step attention that gives each row of a left-padded batch exactly what it gets alone.

With one padded SDPA call a row attends over the batch's longest length with the padding masked out:
mathematically the same, but the softmax and the value sums run over more (zero) terms in another order,
so the row's numbers differ from the row decoded alone in the last bits. The int8 layers then quantize a
value that sits on a rounding boundary one step apart, and a greedy answer can change. So during a
decode step (one new token per row) each row attends over its own keys only: one SDPA call per row on
a slice of the batch cache, the same call a row decoded alone makes. Prefill (one row, many tokens) is
plain SDPA.

The engine sets the rows' lengths (:func:`row_lengths`) around each decode forward pass.
"""

from __future__ import annotations

import contextlib
import threading

NAME = "ragtune_rows"
_state = threading.local()


@contextlib.contextmanager
def row_lengths(lengths: list[int] | None):
    """Inside: decode-step attention uses these per-row key lengths (the cache's last ``n`` positions)."""
    previous = getattr(_state, "lengths", None)
    _state.lengths = lengths
    try:
        yield
    finally:
        _state.lengths = previous


def rows_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None, **kwargs):
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    lengths = getattr(_state, "lengths", None)
    if lengths is None or query.shape[2] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    width = key.shape[2]
    outputs = [sdpa_attention_forward(module, query[b:b + 1], key[b:b + 1, :, width - n:], value[b:b + 1, :, width - n:],
                                      None, dropout=dropout, scaling=scaling, is_causal=False, **kwargs)[0]
               for b, n in enumerate(lengths)]
    return torch.cat(outputs, dim=0), None


def install(model) -> None:
    """Register the attention (and SDPA's mask builder under the same name) and switch ``model`` to it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(NAME, rows_attention)
    AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    model.set_attn_implementation(NAME)
