"""Streaming generation: one base model with hot-switched LoRA adapters, or a remote OpenAI-compatible server.

A generator yields strings (a :class:`TokenStream`); capability attributes say what it can do
(``supports_adapters``, ``backend``). Two implementations:

- :class:`LocalGenerator` loads the base model once (``tuning.models``) and any number of peft
  adapters by name (``PeftModel.load_adapter``); each request picks base or one adapter.
- :class:`OpenAIGenerator` speaks to vLLM (``--enable-lora``: adapters are model names), the llama.cpp
  server, Ollama or ``ragtune serve`` by URL, so the same assistant runs on a serving cluster.

Why our own decode loop instead of ``model.generate`` + ``TextIteratorStreamer``:

- concurrency: one model serves every session. The loop takes the model lock for one forward pass at
  a time (the prompt in slices of :data:`PREFILL_SLICE` tokens, then one token), activating the
  request's adapter inside the lock, so concurrent sessions interleave fairly and never see each
  other's adapter; ``generate`` would hold the model (and the adapter choice) for a whole answer;
- the repetition penalty applies to the generated tokens only: ``generate`` also penalises the
  prompt, which in RAG modes pushes the model away from copying the facts in its sources;
- stop strings are held back while they may still be forming, so they never reach the reader.
The sampling pieces themselves are transformers' logits processors.

Why int8: decoding on CPU is memory-bound (fp32 SmolLM2-135M reads 538 MB per token). Dynamic int8
linear layers (fbgemm ``quantized::linear_dynamic``, what ``torch.ao.quantization.quantize_dynamic``
builds) read a quarter of that. :class:`Int8Linear` subclasses ``nn.Linear`` so peft wraps it like any
linear layer and LoRA adapters load, switch and run on top of the int8 base unchanged (the LoRA
matrices stay fp32). Greedy text differs slightly from fp32; ``quantize=none`` turns it off.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from serving.config import ServingError

PREFILL_SLICE = 256  # prompt tokens per locked forward pass: bounds how long one request blocks others
BASE = None  # adapter value meaning "the base model"


@dataclass
class GenerationParams:
    max_new_tokens: int = 160
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    repetition_penalty: float = 1.0  # applied to generated tokens only
    stop: tuple[str, ...] = ()
    seed: int = 0
    # per request, not from config: a serving.grounding.GroundedConstraint (grounded decoding), and the
    # question-only prompt ids + weight of context-aware decoding (Shi et al. 2023; None = off)
    constraint: Any = None
    contrast_ids: list[int] | None = None
    cad_alpha: float = 0.0

    @classmethod
    def from_config(cls, config: Any, **overrides: Any) -> "GenerationParams":
        values = {k: getattr(config, k) for k in ("max_new_tokens", "temperature", "top_p", "repetition_penalty", "seed")}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


class TokenStream:
    """An iterator of text pieces. When exhausted: ``prompt_tokens``, ``completion_tokens``,
    ``finish_reason`` ("stop" or "length"), ``first_token_s`` (from creation) and ``decode_tokens_per_s``."""

    def __init__(self, pieces: Iterator[str]) -> None:
        self._pieces = pieces
        self.started = time.perf_counter()
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.first_token_s: float | None = None
        self.finished_s: float | None = None

    def __iter__(self) -> "TokenStream":
        return self

    def __next__(self) -> str:
        piece = next(self._pieces)
        if self.first_token_s is None:
            self.first_token_s = time.perf_counter() - self.started
        return piece

    def text(self) -> str:
        return "".join(self)

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Tokens after the first, per second after the first (prefill excluded)."""
        if self.finished_s is None or self.first_token_s is None or self.completion_tokens < 2:
            return None
        span = self.finished_s - self.first_token_s
        return (self.completion_tokens - 1) / span if span > 0 else None


class StopStringBuffer:
    """Holds back text that could be the start of a stop string; ``feed`` returns what is safe to emit."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.emitted = 0
        self.stopped = False

    def feed(self, text: str) -> str:
        """``text`` is the whole answer so far; returns the new safe suffix (and sets ``stopped``)."""
        cut = len(text)
        for s in self.stops:
            at = text.find(s, max(0, self.emitted - len(s)))
            if at != -1 and at < cut:
                cut, self.stopped = at, True
        if not self.stopped:
            hold = 0
            for s in self.stops:
                for n in range(min(len(s) - 1, len(text)), 0, -1):
                    if text.endswith(s[:n]):
                        hold = max(hold, n)
                        break
            cut = len(text) - hold
        if text[:cut].endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its next byte
            cut -= 1
        if cut <= self.emitted:
            return ""
        piece = text[self.emitted:cut]
        self.emitted = cut
        return piece

    def flush(self, text: str) -> str:
        if self.stopped or len(text) <= self.emitted:
            return ""
        piece, self.emitted = text[self.emitted:].rstrip("\ufffd"), len(text)
        return piece


# ------------------------------------------------------------------------------------------ int8

def _int8_linear_class():
    import torch
    from torch import nn

    class Int8Linear(nn.Linear):
        """A linear layer with int8 per-channel weights and dynamically quantized activations (fbgemm).

        A subclass of ``nn.Linear`` so peft wraps it for LoRA; ``weight`` is an empty fp32 tensor that
        only tells peft the device and dtype for the adapter weights."""

        def __init__(self, linear: nn.Linear) -> None:
            nn.Module.__init__(self)
            self.in_features, self.out_features = linear.in_features, linear.out_features
            w = linear.weight.detach().float()
            scales = (w.abs().amax(dim=1).clamp(min=1e-8) / 127.0).double()
            zeros = torch.zeros(w.shape[0], dtype=torch.long)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # quantized tensor creation is deprecated in favour of torchao
                qweight = torch.quantize_per_channel(w, scales, zeros, 0, torch.qint8)
                bias = linear.bias.detach().float() if linear.bias is not None else None
                self._packed = torch.ops.quantized.linear_prepack(qweight, bias)
            self.register_buffer("weight", torch.empty(0, dtype=torch.float32, device=w.device), persistent=False)
            self.bias = None

        def forward(self, x):  # type: ignore[override]
            # reduce_range as quantize_dynamic does on x86, so the int8 products never saturate
            return torch.ops.quantized.linear_dynamic(x, self._packed, True)

        def extra_repr(self) -> str:
            return f"in_features={self.in_features}, out_features={self.out_features}, int8"

    return Int8Linear


def quantize_int8(model) -> int:
    """Replace every ``nn.Linear`` (including the tied output head) with :class:`Int8Linear`."""
    from torch import nn

    Int8Linear = _int8_linear_class()
    targets = [(name, module) for name, module in model.named_modules()
               if type(module) is nn.Linear and module.in_features >= 64]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Int8Linear(module))
    return len(targets)


# ------------------------------------------------------------------------------- local generator

@dataclass
class LoadedAdapter:
    name: str
    key: str  # peft adapter name (module dict keys cannot contain '.')
    folder: str
    created: str | None
    loaded_s: float


class LocalGenerator:
    """The base model loaded once; adapters from ``<home>/adapters/`` loaded on first use and switched
    per request without reloading the base. Thread-safe: one lock guards the model and its adapter state."""

    backend = "local"
    supports_adapters = True

    def __init__(self, base_model: str = "smollm2-135m-instruct", home: str | os.PathLike | None = None,
                 quantize: str = "auto", device: str = "auto", threads: int = 0) -> None:
        import torch

        from core.workspace import ragtune_home
        from tuning.errors import TuningError
        from tuning.models import load_causal_lm, load_tokenizer, pick_device, resolve_base_model, weights_hash

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
        if self.quantize == "int8":
            if self.device != "cpu":
                raise ServingError("quantize=int8 is for CPU serving; on a GPU use quantize=none (or auto)")
            quantize_int8(self.model)
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
        self._lock = threading.RLock()
        self._peft = None  # the PeftModel once an adapter is loaded
        self._adapters: dict[str, LoadedAdapter] = {}
        self._active: str | None = BASE  # peft key of the active adapter, or BASE
        self._lora_layers: list[Any] = []
        import inspect

        self._cache_kw = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        self.name = self.base_id

    # --- adapters -----------------------------------------------------------------------------
    def available_adapters(self) -> list[dict[str, Any]]:
        """Adapters in the registry, each with ``usable`` and, when not, ``why``."""
        from tuning.adapters import list_adapters

        out = []
        for a in list_adapters(self.home):
            why = a.get("error") or self._incompatibility(a.get("name"), a.get("task"), a.get("method"), a.get("base_model"), None)
            out.append({**a, "usable": not why, "why": why})
        return out

    def _incompatibility(self, name, task, method, base_id, base_sha) -> str | None:
        if task not in (None, "sft"):
            return f"adapter {name!r} is a {task} model, not a chat model; pick an sft adapter"
        if method == "full":
            return (f"adapter {name!r} is a full fine-tune (a whole model), which cannot be switched on a shared base; "
                    f"serve it as its own base: base_model=<RAGTUNE_HOME>/adapters/{name}")  # no absolute path: HTTP clients see this
        if base_id and base_id != self.base_id:
            return (f"adapter {name!r} was trained on {base_id}, but this assistant runs {self.base_id}; "
                    f"start it with base_model={base_id} or retrain the adapter on {self.base_id}")
        if base_sha and self.base_sha256 and base_sha != self.base_sha256:
            return (f"adapter {name!r} was trained on other weights of {base_id} (hash differs); "
                    "retrain it on this base model")
        return None

    def check_adapter(self, name: str) -> tuple[Path, dict[str, Any]]:
        from core.names import InvalidName
        from tuning.adapters import get_adapter
        from tuning.errors import TuningError

        try:
            folder, manifest = get_adapter(self.home, name)
        except (TuningError, InvalidName) as exc:
            raise ServingError(str(exc)) from None
        base = manifest.get("base_model") or {}
        why = self._incompatibility(name, manifest.get("task", "sft"), manifest.get("method"), base.get("id"), base.get("sha256"))
        if why:
            raise ServingError(why)
        return folder, manifest

    def load_adapter(self, name: str) -> LoadedAdapter:
        """Load (or reload, when retrained since) adapter ``name``; returns its record."""
        folder, manifest = self.check_adapter(name)
        created = manifest.get("created")
        with self._lock:
            loaded = self._adapters.get(name)
            if loaded is not None and loaded.created == created:
                return loaded
            started = time.perf_counter()
            key = "a_" + hashlib.sha1(f"{name}\0{created}".encode()).hexdigest()[:12]
            try:
                if self._peft is None:
                    from peft import PeftModel

                    self._peft = PeftModel.from_pretrained(self.model, str(folder), adapter_name=key, is_trainable=False)
                    self._active = key
                else:
                    self._peft.load_adapter(str(folder), adapter_name=key, is_trainable=False)
            except (OSError, ValueError, KeyError, RuntimeError) as exc:
                raise ServingError(f"adapter {name!r} could not be loaded ({exc}); retrain it or remove it with "
                                   f"`ragtune adapters rm {name}`") from None
            if loaded is not None:  # retrained: drop the old weights
                self._peft.base_model.set_adapter(key, inference_mode=True)
                self._peft.delete_adapter(loaded.key)
            self._collect_lora_layers()
            self._activate(BASE)
            record = LoadedAdapter(name, key, str(folder), created, time.perf_counter() - started)
            self._adapters[name] = record
            return record

    def unload_adapter(self, name: str) -> None:
        with self._lock:
            loaded = self._adapters.pop(name, None)
            if loaded is not None and self._peft is not None:
                remaining = [a.key for a in self._adapters.values()]
                if remaining:  # peft keeps at least one adapter; the last one stays (disabled) in memory
                    self._peft.base_model.set_adapter(remaining[0], inference_mode=True)
                    self._peft.delete_adapter(loaded.key)
                self._collect_lora_layers()
                self._activate(BASE)

    def loaded_adapters(self) -> list[str]:
        return sorted(self._adapters)

    def _activate(self, key: str | None) -> None:
        """Make ``key`` (a peft adapter key, or BASE) the active one; call with the lock held.

        peft's ``set_adapter`` / ``enable_adapter_layers`` also toggle ``requires_grad`` on every adapter
        parameter (tens of ms with a few adapters); nothing trains here (all parameters were frozen
        with ``inference_mode=True`` at load), so we set only the two flags those calls end with."""
        if key == self._active or self._peft is None:
            return
        for layer in self._lora_layers:
            layer._disable_adapters = key is BASE
            if key is not BASE:
                layer._active_adapter = [key]
        if key is not BASE:
            self._peft.base_model.active_adapter = key
        self._active = key

    def _collect_lora_layers(self) -> None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        self._peft.base_model.set_adapter(self._peft.base_model.active_adapter, inference_mode=True)
        self._lora_layers = [m for m in self.model.modules() if isinstance(m, BaseTunerLayer)]
        self._active = "?"  # unknown until the next _activate sets every layer

    def switch(self, adapter: str | None) -> float:
        """Activate ``adapter`` (None = base) now; returns seconds taken (for the benchmark)."""
        key = self.load_adapter(adapter).key if adapter else BASE
        started = time.perf_counter()
        with self._lock:
            self._activate(key)
        return time.perf_counter() - started

    # --- tokens -------------------------------------------------------------------------------
    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def truncate_tokens(self, text: str, n: int) -> str:
        ids = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        if len(ids["input_ids"]) <= n:
            return text
        return text[: ids["offset_mapping"][n - 1][1]]

    def render(self, messages: list[dict[str, str]]) -> list[int]:
        ids = self.tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)

    # --- generation ---------------------------------------------------------------------------
    def stream(self, messages: list[dict[str, str]], adapter: str | None = None,
               params: GenerationParams | None = None) -> TokenStream:
        """Stream a chat reply from the base model (``adapter=None``) or base + ``adapter``."""
        return self.stream_ids(self.render(messages), adapter, params)

    def stream_prompt(self, prompt: str, adapter: str | None = None, params: GenerationParams | None = None) -> TokenStream:
        """Stream a continuation of a raw prompt (no chat template), for ``/v1/completions``."""
        return self.stream_ids(self.tokenizer(prompt, add_special_tokens=False)["input_ids"], adapter, params)

    def stream_ids(self, ids: list[int], adapter: str | None = None, params: GenerationParams | None = None) -> TokenStream:
        params = params or GenerationParams()
        key = self.load_adapter(adapter).key if adapter else BASE  # errors surface now, not mid-stream
        if len(ids) + params.max_new_tokens > self.context_window:
            raise ServingError(f"prompt of {len(ids)} tokens + max_new_tokens={params.max_new_tokens} exceeds the model's "
                               f"{self.context_window}-token window; shorten the question or history, or lower k")
        stream = TokenStream(iter(()))
        stream._pieces = self._decode(ids, key, params, stream)
        stream.prompt_tokens = len(ids)
        return stream

    def _decode(self, ids: list[int], key: str | None, params: GenerationParams, stream: TokenStream) -> Iterator[str]:
        import torch
        from transformers import (DynamicCache, LogitsProcessorList, RepetitionPenaltyLogitsProcessor,
                                  TemperatureLogitsWarper, TopPLogitsWarper)

        sampling = params.temperature > 0
        processors = LogitsProcessorList()
        if sampling:
            processors.append(TemperatureLogitsWarper(params.temperature))
            if params.top_p < 1.0:
                processors.append(TopPLogitsWarper(params.top_p))
        penalty = RepetitionPenaltyLogitsProcessor(params.repetition_penalty) if params.repetition_penalty != 1.0 else None
        rng = torch.Generator().manual_seed(params.seed) if sampling else None
        cache = DynamicCache(config=self.model.config)
        prompt = torch.tensor([ids], dtype=torch.long, device=self.device)
        constraint = params.constraint
        # Context-aware decoding runs the question-only prompt as a second sequence with its own cache.
        # Not one padded batch of two rows: the int8 layers quantize activations with one scale per
        # tensor, so batching would change the with-sources row's numbers, and a=0 would no longer
        # equal plain decoding token for token.
        contrast = params.contrast_ids is not None
        contrast_cache = DynamicCache(config=self.model.config) if contrast else None
        contrast_logits = None
        generated: list[int] = []
        stops = StopStringBuffer(tuple(params.stop))
        stream.finish_reason = "length"
        logits = None
        with torch.inference_mode():
            for start in range(0, prompt.shape[1], PREFILL_SLICE):
                with self._lock:
                    self._activate(key)
                    logits = self.model(input_ids=prompt[:, start:start + PREFILL_SLICE], **{self._cache_kw: cache},
                                        use_cache=True, logits_to_keep=1).logits[:, -1, :]
            if contrast:
                plain = torch.tensor([params.contrast_ids], dtype=torch.long, device=self.device)
                for start in range(0, plain.shape[1], PREFILL_SLICE):
                    with self._lock:
                        self._activate(key)
                        contrast_logits = self.model(input_ids=plain[:, start:start + PREFILL_SLICE],
                                                     **{self._cache_kw: contrast_cache}, use_cache=True,
                                                     logits_to_keep=1).logits[:, -1, :]
            while True:
                scores = logits.float()
                if contrast:
                    a = params.cad_alpha
                    scores = (1.0 + a) * scores - a * contrast_logits.float()
                if penalty is not None and generated:
                    scores = penalty(torch.tensor([generated], device=scores.device), scores)
                scores = processors(prompt, scores)
                if constraint is not None:
                    scores = constraint(scores)
                if sampling:
                    token = int(torch.multinomial(torch.softmax(scores, dim=-1).cpu(), 1, generator=rng)[0, 0])
                else:
                    token = int(scores.argmax(dim=-1)[0])
                if constraint is not None:
                    constraint.advance(token)
                if token in self.eos_ids:
                    stream.finish_reason = "stop"
                    break
                generated.append(token)
                stream.completion_tokens = len(generated)
                text = self.tokenizer.decode(generated, skip_special_tokens=True)
                piece = stops.feed(text)
                if piece:
                    yield piece
                if stops.stopped:
                    stream.finish_reason = "stop"
                    break
                if len(generated) >= params.max_new_tokens:
                    break
                with self._lock:
                    self._activate(key)
                    logits = self.model(input_ids=torch.tensor([[token]], device=self.device), **{self._cache_kw: cache},
                                        use_cache=True).logits[:, -1, :]
                    if contrast:
                        contrast_logits = self.model(input_ids=torch.tensor([[token]], device=self.device),
                                                     **{self._cache_kw: contrast_cache}, use_cache=True).logits[:, -1, :]
        if constraint is not None:
            constraint.finish()
        if not stops.stopped:
            tail = stops.flush(self.tokenizer.decode(generated, skip_special_tokens=True))
            if tail:
                yield tail
        stream.finished_s = time.perf_counter() - stream.started


# ----------------------------------------------------------------------------- remote generator

class OpenAIGenerator:
    """A client of any OpenAI-compatible server: ``/v1/chat/completions`` streamed over SSE.

    Adapters are model names on the server (vLLM ``--lora-modules name=path``; ``ragtune serve``
    serves every registry adapter under its name). Token counts for prompt budgeting are estimated
    (4 characters per token) since the remote tokenizer is not at hand."""

    backend = "openai"
    supports_adapters = True

    def __init__(self, url: str, model: str = "", api_key: str = "", timeout: float = 120.0,
                 context_window: int = 4096) -> None:
        self.url = url.rstrip("/")
        if not self.url.endswith("/v1"):
            self.url += "/v1"
        self.api_key = api_key or os.environ.get("OPENAI_API_KEY", "")
        self.timeout = timeout
        self.context_window = context_window
        models = self.models()
        if not models:
            raise ServingError(f"{self.url}/models lists no models; start the server with a model loaded")
        self.base_id = model or models[0]
        if self.base_id not in models:
            raise ServingError(f"the server at {self.url} has no model {self.base_id!r} (it has: {', '.join(models)}); "
                               "set openai_model to one of those")
        self.name = self.base_id

    def _request(self, path: str, body: dict | None = None):
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, method="POST" if body is not None else "GET")
        request.add_header("Content-Type", "application/json")
        if self.api_key:
            request.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            return urllib.request.urlopen(request, timeout=self.timeout)
        except urllib.error.HTTPError as exc:
            try:
                message = json.loads(exc.read().decode("utf-8", "replace"))["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = f"HTTP {exc.code} {exc.reason}"
            raise ServingError(f"{self.url}{path}: {message}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ServingError(f"cannot reach the model server at {self.url} ({reason}); start it (e.g. `ragtune serve`) "
                               "or fix openai_url") from None

    def models(self) -> list[str]:
        with self._request("/models") as response:
            return [m["id"] for m in json.loads(response.read().decode())["data"]]

    def available_adapters(self) -> list[dict[str, Any]]:
        return [{"name": m, "usable": True, "why": None, "base_model": self.base_id} for m in self.models() if m != self.base_id]

    def check_adapter(self, name: str) -> None:
        models = self.models()
        if name not in models:
            raise ServingError(f"the server at {self.url} has no adapter {name!r} (models: {', '.join(models)}); "
                               "load it there (vLLM: --lora-modules NAME=PATH)")

    def count_tokens(self, text: str) -> int:
        return max(1, len(text) // 4)

    def truncate_tokens(self, text: str, n: int) -> str:
        return text[: n * 4]

    def switch(self, adapter: str | None) -> float:
        return 0.0

    def stream(self, messages: list[dict[str, str]], adapter: str | None = None,
               params: GenerationParams | None = None) -> TokenStream:
        body = {"messages": messages}
        return self._stream("/chat/completions", body, adapter, params)

    def stream_prompt(self, prompt: str, adapter: str | None = None, params: GenerationParams | None = None) -> TokenStream:
        return self._stream("/completions", {"prompt": prompt}, adapter, params)

    def _stream(self, path: str, body: dict, adapter: str | None, params: GenerationParams | None) -> TokenStream:
        params = params or GenerationParams()
        body = {**body, "model": adapter or self.base_id, "stream": True, "max_tokens": params.max_new_tokens,
                "temperature": params.temperature, "top_p": params.top_p, "seed": params.seed,
                "stream_options": {"include_usage": True}}
        if params.stop:
            body["stop"] = list(params.stop)
        if params.repetition_penalty != 1.0:
            body["repetition_penalty"] = params.repetition_penalty  # vLLM / llama.cpp / ragtune extension
        response = self._request(path, body)  # HTTP errors surface here, before streaming starts
        stream = TokenStream(iter(()))
        stream._pieces = self._read_events(response, stream)
        return stream

    @staticmethod
    def _read_events(response, stream: TokenStream) -> Iterator[str]:
        with response:
            for raw in response:
                line = raw.decode("utf-8").strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    raise ServingError(f"the model server failed mid-answer: {event['error'].get('message')}")
                usage = event.get("usage")
                if usage:
                    stream.prompt_tokens = usage.get("prompt_tokens", 0)
                    stream.completion_tokens = usage.get("completion_tokens", 0)
                for choice in event.get("choices") or []:
                    piece = (choice.get("delta") or {}).get("content") if "delta" in choice else choice.get("text")
                    if choice.get("finish_reason"):
                        stream.finish_reason = choice["finish_reason"]
                    if piece:
                        if not usage:
                            stream.completion_tokens += 1  # one piece per token until usage arrives
                        yield piece
        stream.finished_s = time.perf_counter() - stream.started


def make_generator(config: Any, home: str | os.PathLike | None = None):
    """The generator a :class:`serving.config.ServeConfig` asks for."""
    if config.backend == "openai":
        return OpenAIGenerator(config.openai_url, config.openai_model, config.openai_api_key)
    return LocalGenerator(config.base_model, home, quantize=config.quantize, device=config.device, threads=config.threads)



__all__ = ["LocalGenerator", "OpenAIGenerator", "GenerationParams", "TokenStream", "StopStringBuffer",
           "make_generator", "quantize_int8", "PREFILL_SLICE", "ServingError"]
