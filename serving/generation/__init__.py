"""The generation engine: :class:`Generator` is what callers type against.

- ``types``: :class:`GenerationParams`, :class:`TokenStream`, :class:`StopStringBuffer`;
- ``int8``: batch-invariant int8 linear layers for CPU decoding;
- ``scheduler``: continuous batching with per-row adapters and logits processors;
- ``local``: :class:`LocalGenerator`, the model in this process behind the scheduler;
- ``remote``: :class:`OpenAIGenerator`, a client of vLLM / llama.cpp / Ollama / ``ragtune serve``.
"""

from __future__ import annotations

import os
from typing import Any

from serving.config import ServingError
from serving.generation.int8 import quantize_int8
from serving.generation.local import LocalGenerator
from serving.generation.protocol import Generator
from serving.generation.remote import OpenAIGenerator
from serving.generation.scheduler import PREFILL_SLICE
from serving.generation.types import GenerationParams, StopStringBuffer, TokenStream


def make_generator(config: Any, home: str | os.PathLike | None = None) -> Generator:
    """The generator a :class:`serving.config.ServeConfig` asks for."""
    if config.backend == "openai":
        return OpenAIGenerator(config.openai_url, config.openai_model, config.openai_api_key)
    return LocalGenerator(config.base_model, home, quantize=config.quantize, device=config.device, threads=config.threads,
                          max_batch_rows=config.max_batch_rows, kv_cache_tokens=config.kv_cache_tokens)


__all__ = ["Generator", "LocalGenerator", "OpenAIGenerator", "GenerationParams", "TokenStream", "StopStringBuffer",
           "make_generator", "quantize_int8", "PREFILL_SLICE", "ServingError"]
