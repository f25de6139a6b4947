"""A client of any OpenAI-compatible server (vLLM, the llama.cpp server, Ollama, ``ragtune serve``)."""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from typing import Any, Iterator

from serving.config import ServingError
from serving.generation.types import GenerationParams, TokenStream


class OpenAIGenerator:
    """A client of any OpenAI-compatible server: ``/v1/chat/completions`` streamed over SSE.

    Adapters are model names on the server (vLLM ``--lora-modules name=path``; ``ragtune serve``
    serves every registry adapter under its name). Token counts for prompt budgeting are estimated
    (4 characters per token) since the remote tokenizer is not at hand."""

    backend = "openai"
    supports_adapters = True
    local_decoding = False  # grounded and context-aware decoding need the model's tokenizer and logits

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

    def check_adapter(self, name: str) -> dict[str, Any]:
        """The adapter's manifest: the server only says it exists, so ``{"name": name}``."""
        models = self.models()
        if name not in models:
            raise ServingError(f"the server at {self.url} has no adapter {name!r} (models: {', '.join(models)}); "
                               "load it there (vLLM: --lora-modules NAME=PATH)")
        return {"name": name, "server": self.url}

    def warm_up(self) -> None:
        """Nothing to load here: the server holds the model."""

    def count_tokens(self, text: str) -> int:
        return max(1, len(text) // 4)

    def truncate_tokens(self, text: str, n: int) -> str:
        return text[: n * 4]

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
