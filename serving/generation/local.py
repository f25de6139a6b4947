"""The local engine: one base model in this process, any number of LoRA adapters, every caller batched.

:class:`LocalGenerator` loads the base model once (``tuning.models``), quantizes its linear layers to
int8 on CPU (``serving.generation.int8``), loads LoRA adapters by name from the registry on first use
(``serving.generation.lora``: applied per row, without peft),
and hands every request to one :class:`~serving.generation.scheduler.BatchScheduler`: the chat, ``ragtune
ask``, the A/B runner, the arena and ``ragtune serve`` share one batch in which each row has its own
adapter (or none), its own sampling settings and its own logits processors.

Why our own decode loop instead of ``model.generate`` + ``TextIteratorStreamer``: ``generate`` holds the
model (and one adapter choice) for a whole answer, so concurrent users take turns; it also applies the
repetition penalty to the prompt, which in RAG modes pushes the model away from copying its sources;
and stop strings must be held back while they may still be forming. The sampling pieces themselves are
transformers' logits processors.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from serving.config import ServingError
from serving.generation.int8 import bf16_matmuls, quantize_int8
from serving.generation.kvcache import RoomyCache
from serving.generation.llama_step import decode_step, supports as supports_lean_step
from serving.generation.lora import LoraError, LoraSet
from serving.generation.scheduler import BASE_ROW, BatchScheduler, Request, read_pieces
from serving.generation.types import GenerationParams, TokenStream
from serving.prompts import count_tokens, truncate_tokens

DEFAULT_MAX_ROWS = 16
DEFAULT_KV_CACHE_TOKENS = 32768  # ~1.5 GB of fp32 KV for SmolLM2-135M (46 KB per token)


@dataclass
class LoadedAdapter:
    name: str
    key: str  # the engine's key for this version of the adapter (name + created)
    folder: str
    created: str | None
    loaded_s: float


class LocalGenerator:
    """The base model loaded once; adapters from ``<home>/adapters/`` loaded on first use and mixed per row
    in one batch. Thread-safe: any number of threads may stream at once."""

    backend = "local"
    supports_adapters = True
    local_decoding = True  # grounded and context-aware decoding run here

    def __init__(self, base_model: str = "smollm2-135m-instruct", home: str | os.PathLike | None = None,
                 quantize: str = "auto", device: str = "auto", threads: int = 0, max_batch_rows: int = DEFAULT_MAX_ROWS,
                 kv_cache_tokens: int = DEFAULT_KV_CACHE_TOKENS, bf16_prefill: bool | None = None) -> None:
        import torch

        from core.workspace import ragtune_home
        from tuning.errors import TuningError
        from tuning.models import (cpu_has_native_bf16, load_causal_lm, load_tokenizer, pick_device,
                                   resolve_base_model, weights_hash)

        if threads > 0:
            torch.set_num_threads(threads)
        self.home = ragtune_home(home)
        try:
            self.base = resolve_base_model(base_model, self.home)
            self.tokenizer = load_tokenizer(self.base)
            self.model = load_causal_lm(self.base, device=device, for_training=False)
        except TuningError as exc:
            raise ServingError(str(exc)) from None
        self.device, _ = pick_device(device)
        self.model.eval()
        self.model.requires_grad_(False)
        self.base_id = self.base.id
        self.base_sha256 = weights_hash(self.base)
        self.quantize = ("int8" if self.device == "cpu" else "none") if quantize == "auto" else quantize
        # prompt prefill multiplies in bf16 where the CPU does so natively (None = detect; int8 layers only)
        self.bf16_prefill = self.quantize == "int8" and (cpu_has_native_bf16() if bf16_prefill is None else bf16_prefill)
        if self.quantize == "int8":
            if self.device != "cpu":
                raise ServingError("quantize=int8 is for CPU serving; on a GPU use quantize=none (or auto)")
            quantize_int8(self.model, keep_bf16=self.bf16_prefill)
        from serving.generation import attention

        attention.install(self.model)
        self._row_lengths = attention.row_lengths
        self._lean_steps = supports_lean_step(self.model)  # decode steps via serving.generation.llama_step
        if not getattr(self.tokenizer, "chat_template", None):
            from tuning.data import ensure_chat_template

            ensure_chat_template(self.tokenizer)
        config = self.model.config
        self.context_window = int(getattr(config, "max_position_embeddings", 2048) or 2048)
        eos = self.model.generation_config.eos_token_id if self.model.generation_config else None
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            eos_ids.add(self.tokenizer.eos_token_id)
        self.eos_ids = eos_ids
        self._lock = threading.RLock()  # the model: the engine holds it per step, adapter loading per load
        self._lora = LoraSet(self.model)  # per-row LoRA layers, wrapped as adapters that need them are loaded
        self._adapters: dict[str, LoadedAdapter] = {}
        self._stale: set[str] = set()  # keys of replaced adapters, deleted once no row uses them
        self._cache_kw = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        self._prefix_ids: dict[str, tuple[int, ...]] = {}
        self.name = self.base_id
        self.engine = BatchScheduler(self._forward, self._new_cache, self._decode_text, self.eos_ids, self._lock,
                                     self.device, max_batch_rows, kv_cache_tokens, self._drop_stale)

    # --- adapters -----------------------------------------------------------------------------
    def available_adapters(self) -> list[dict[str, Any]]:
        """Adapters in the registry, each with ``usable`` and, when not, ``why``."""
        from tuning.adapters import list_adapters, serving_incompatibility

        out = []
        for a in list_adapters(self.home):
            why = a.get("error") or serving_incompatibility(a.get("name"), a.get("task"), a.get("method"),
                                                            a.get("base_model"), None, self.base_id, self.base_sha256)
            out.append({**a, "usable": not why, "why": why})
        return out

    def _resolve_adapter(self, name: str) -> tuple[Path, dict[str, Any]]:
        from core.names import InvalidName
        from tuning.adapters import get_adapter, serving_incompatibility
        from tuning.errors import TuningError

        try:
            folder, manifest = get_adapter(self.home, name)
        except (TuningError, InvalidName) as exc:
            raise ServingError(str(exc)) from None
        base = manifest.get("base_model") or {}
        why = serving_incompatibility(name, manifest.get("task", "sft"), manifest.get("method"), base.get("id"),
                                      base.get("sha256"), self.base_id, self.base_sha256)
        if why:
            raise ServingError(why)
        return folder, manifest

    def check_adapter(self, name: str) -> dict[str, Any]:
        """The manifest of adapter ``name`` if this engine can serve it; else a one-line ServingError."""
        return self._resolve_adapter(name)[1]

    def load_adapter(self, name: str) -> LoadedAdapter:
        """Load (or reload, when retrained since) adapter ``name``; returns its record."""
        folder, manifest = self._resolve_adapter(name)
        created = manifest.get("created")
        with self._lock:
            loaded = self._adapters.get(name)
            if loaded is not None and loaded.created == created:
                return loaded
            started = time.perf_counter()
            key = "a_" + hashlib.sha1(f"{name}\0{created}".encode()).hexdigest()[:12]
            try:
                self._lora.load(key, folder)
            except (OSError, LoraError, RuntimeError) as exc:
                raise ServingError(f"adapter {name!r} could not be loaded: {exc}; retrain it or remove it with "
                                   f"`ragtune adapters rm {name}`") from None
            if loaded is not None:  # retrained: the old weights go once no running row uses them
                self._stale.add(loaded.key)
            record = LoadedAdapter(name, key, str(folder), created, time.perf_counter() - started)
            self._adapters[name] = record
            return record

    def unload_adapter(self, name: str) -> None:
        with self._lock:
            loaded = self._adapters.pop(name, None)
            if loaded is not None:
                self._stale.add(loaded.key)

    def loaded_adapters(self) -> list[str]:
        return sorted(self._adapters)

    def _drop_stale(self, in_use: set[str]) -> None:
        """Delete replaced adapters that no request uses any more (the engine calls this with the lock held)."""
        for key in sorted(self._stale - in_use):
            self._lora.unload(key)
            self._stale.discard(key)

    # --- tokens -------------------------------------------------------------------------------
    def count_tokens(self, text: str) -> int:
        return count_tokens(self.tokenizer, text)

    def truncate_tokens(self, text: str, n: int) -> str:
        return truncate_tokens(self.tokenizer, text, n)

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        ids = self.tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)

    def prefix_len(self, messages: list[dict[str, str]], ids: list[int]) -> int:
        """How many leading tokens of ``ids`` are the system message alone: what every request with the same
        system prompt shares (0 when there is none or the template does not render it as a prefix)."""
        if not messages or messages[0].get("role") != "system":
            return 0
        content = messages[0].get("content", "")
        system = self._prefix_ids.get(content)
        if system is None:
            system = tuple(self.render(messages[:1], add_generation_prompt=False))
            if len(self._prefix_ids) < 64:
                self._prefix_ids[content] = system
        return len(system) if tuple(ids[:len(system)]) == system else 0

    def _decode_text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def warm_up(self) -> None:
        """Run the model once, so the first user does not wait for lazy initialisation."""
        "".join(self.stream([{"role": "user", "content": "Hi"}], params=GenerationParams(max_new_tokens=1)))

    # --- generation ---------------------------------------------------------------------------
    def stream(self, messages: list[dict[str, str]], adapter: str | None = None,
               params: GenerationParams | None = None) -> TokenStream:
        """Stream a chat reply from the base model (``adapter=None``) or base + ``adapter``."""
        ids = self.render(messages)
        params = params or GenerationParams()
        contrast_prefix = 0
        if params.contrast_ids is not None:
            contrast_prefix = self.prefix_len(messages, list(params.contrast_ids))
        return self._submit(ids, adapter, params, self.prefix_len(messages, ids), contrast_prefix)

    def stream_prompt(self, prompt: str, adapter: str | None = None, params: GenerationParams | None = None) -> TokenStream:
        """Stream a continuation of a raw prompt (no chat template), for ``/v1/completions``."""
        return self.stream_ids(self.tokenizer(prompt, add_special_tokens=False)["input_ids"], adapter, params)

    def stream_ids(self, ids: list[int], adapter: str | None = None, params: GenerationParams | None = None) -> TokenStream:
        return self._submit(list(ids), adapter, params or GenerationParams(), 0, 0)

    def _submit(self, ids: list[int], adapter: str | None, params: GenerationParams, prefix: int,
                contrast_prefix: int) -> TokenStream:
        key = self.load_adapter(adapter).key if adapter else BASE_ROW  # errors surface now, not mid-stream
        if not ids:
            raise ServingError("empty prompt: send at least one token of text")
        longest = max(len(ids), len(params.contrast_ids or ()))
        if longest + params.max_new_tokens > self.context_window:
            raise ServingError(f"prompt of {longest} tokens + max_new_tokens={params.max_new_tokens} exceeds the model's "
                               f"{self.context_window}-token window; shorten the question or history, or lower k")
        if params.prefill_bf16 and not self.bf16_prefill:  # what the prompt really runs in (and its KV is kept under)
            params = replace(params, prefill_bf16=False)
        stream = TokenStream(iter(()))
        stream.prompt_tokens = len(ids)
        request = Request(ids, key, params, stream, prefix, contrast_prefix)
        self.engine.submit(request)
        stream._pieces = read_pieces(request)
        stream.on_close = lambda: self.engine.cancel(request)
        return stream

    # --- the model, for the engine thread ------------------------------------------------------
    def _new_cache(self, layers: list | None = None, capacity: int = 0):
        """A KV cache that appends in place (:mod:`serving.generation.kvcache`), with room for ``capacity``
        positions, filled with a copy of ``layers`` if given."""
        return RoomyCache(self.model.config.num_hidden_layers, layers, capacity)

    def prefill_precision(self, bf16: bool) -> str:
        """What a request's prompt is multiplied in: 'bf16' when asked for and this engine kept bf16 weights,
        else 'int8' or 'fp32' (the decode steps are always in the engine's own precision)."""
        if bf16 and self.bf16_prefill:
            return "bf16"
        return "int8" if self.quantize == "int8" else "fp32"

    def _forward(self, ids, cache, adapters: list[str], mask=None, positions=None, bf16: bool = False):
        """Last-position logits of ``ids`` (rows x new tokens) continuing ``cache``; one adapter name per row;
        ``bf16``: multiply in bf16 (prefill; see :mod:`serving.generation.int8`)."""
        kwargs: dict[str, Any] = {self._cache_kw: cache, "use_cache": True, "logits_to_keep": 1}
        lengths = None
        if mask is not None and ids.shape[0] > 1:  # one row has no padding: the plain path is the same call
            kwargs["attention_mask"], kwargs["position_ids"] = mask, positions
            lengths = [int(n) + 1 for n in positions[:, 0].tolist()]  # keys per row, the new token included
        # a prefill (no mask: one request alone) takes the LoRA products in float32, decode steps in float64
        with self._row_lengths(lengths), self._lora.rows(adapters, exact=mask is not None), bf16_matmuls(bf16):
            if self._lean_steps and ids.shape[1] == 1:  # a decode step: the same operations, less Python
                return decode_step(self.model, ids, cache, kwargs.get("position_ids"))
            return self.model(input_ids=ids, **kwargs).logits[:, -1, :]


__all__ = ["LocalGenerator", "LoadedAdapter", "DEFAULT_MAX_ROWS", "DEFAULT_KV_CACHE_TOKENS"]
