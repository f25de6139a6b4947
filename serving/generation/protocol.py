"""What the assistant, the A/B runner and the server need from a generator: :class:`Generator`."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from serving.generation.types import GenerationParams, TokenStream


@runtime_checkable
class Generator(Protocol):
    """Implemented by :class:`~serving.generation.local.LocalGenerator` (this process) and
    :class:`~serving.generation.remote.OpenAIGenerator` (any OpenAI-compatible server)."""

    backend: str  # "local" or "openai"
    supports_adapters: bool
    local_decoding: bool  # True: grounded and context-aware decoding can run (tokenizer and logits at hand)
    base_id: str
    context_window: int

    def available_adapters(self) -> list[dict[str, Any]]: ...

    def check_adapter(self, name: str) -> dict[str, Any]:
        """The adapter's manifest (what the engine knows of it), or a one-line ServingError."""

    def count_tokens(self, text: str) -> int: ...

    def truncate_tokens(self, text: str, n: int) -> str: ...

    def warm_up(self) -> None: ...

    def stream(self, messages: list[dict[str, str]], adapter: str | None = None,
               params: GenerationParams | None = None) -> TokenStream: ...

    def stream_prompt(self, prompt: str, adapter: str | None = None,
                      params: GenerationParams | None = None) -> TokenStream: ...
