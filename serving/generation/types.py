"""The types every generator shares: request parameters, the token stream a caller reads, stop strings."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Iterator

@dataclass
class GenerationParams:
    max_new_tokens: int = 160
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    repetition_penalty: float = 1.0  # applied to generated tokens only
    stop: tuple[str, ...] = ()
    seed: int = 0
    prefill_bf16: bool = True  # the prompt in bf16 where the engine kept bf16 weights (LocalGenerator.prefill_precision)
    # per request, not from config: a serving.grounding.GroundedConstraint (grounded decoding), and the
    # question-only prompt ids + weight of context-aware decoding (Shi et al. 2023; None = off)
    constraint: Any = None
    contrast_ids: list[int] | None = None
    cad_alpha: float = 0.0

    @classmethod
    def from_config(cls, config: Any, **overrides: Any) -> "GenerationParams":
        values = {k: getattr(config, k) for k in ("max_new_tokens", "temperature", "top_p", "repetition_penalty", "seed",
                                                  "prefill_bf16")}
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
        self.queued_s = 0.0  # time spent waiting for room in the local engine's batch (0 for remote servers)
        self.on_close: Any = None  # set by the local engine: cancels the request

    def close(self) -> None:
        """Stop reading: the engine drops the request at its next step (what a disconnected client does).
        Safe to call from another thread while a reader is blocked waiting for the next piece."""
        if self.on_close is not None:
            self.on_close()
        close = getattr(self._pieces, "close", None)
        if close is not None:
            try:
                close()
            except ValueError:  # being read right now in another thread: the cancel above ends it
                pass

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
