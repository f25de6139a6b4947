"""Grounded decoding: the answer's content is copied from the numbered sources, token by token.

A :class:`GroundedConstraint` is a logits processor for our own decode loop
(:meth:`serving.generation.LocalGenerator.stream_ids`). At each step it allows only:

- tokens that **continue the span being copied**: the span so far is a run of source tokens, and the
  allowed continuations are the tokens that follow that run somewhere in a source (an index from each
  token id to its positions in the sources; the live state is the set of positions the span can end
  at, which is what a suffix automaton would hold, built in O(source tokens) per request);
- when no span is open (at the start, or after a free token): a source token that begins a word, which
  **starts** a span (and the same token without its leading space, so the answer can open with a
  source's word); never a token inside a word or number;
- a small **free set** between spans: punctuation, a few connecting words, ``Yes``/``No``,
  and, when ``citations`` is on, markers ``[n]`` (a digit only after ``[``, only 1..number of sources);
  by default the assistant appends the exact markers itself after the answer;
- a span, once started, runs at least ``min_span_tokens`` tokens (no stitching of single tokens);
- at most ``max_spans`` spans (0 = any number); with ``max_spans=1`` the answer is one extract of one
  source: it starts at once (no preamble such as "The answer is:") and the model copies on or ends
  the answer (EOS);
- EOS.

So every content span of the answer is a substring of one source, and the source of each span is
known exactly from the automaton state (the lowest-numbered source the whole span occurs in), not
parsed from the text. One extra pseudo-source holds the collection's "not in the sources" sentence,
so the model can still abstain; a span copied from it marks the answer as an abstention.

The constraint also records, per step, the probability mass the model put on the allowed set
(``allowed_mass``): how much of what the model wanted to say the sources could supply.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, Sequence

FREE_WORDS = ("and", "or", "the", "a", "an", "is", "are", "was", "were", "of", "in", "on", "at", "to", "for", "with",
              "it", "its", "not", "no", "yes", "by", "from", "per", "than", "after", "before", "each", "every", "be",
              "can", "must", "should", "has", "have", "does", "do")
# No "(", ")", ":", "[" or newline: with them a small model copies the "[n] (doc)" headers of the prompt
# or starts a list of numbers. Citations are added by the assistant from the spans' sources instead.
FREE_PUNCT = (".", ",", ";", "-", "'", '"', "%")
REFUSAL_SOURCE = 0  # the pseudo-source number of the "not in the sources" sentence


@dataclass
class CopiedSpan:
    """A run of copied tokens: ``text`` as generated, ``source`` its 1-based source number (0 = the
    refusal sentence), ``start``/``end`` its character offsets in that source's text."""

    text: str
    source: int
    start: int
    end: int
    tokens: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "source": self.source, "start": self.start, "end": self.end}


def _word_start(text: str, at: int) -> bool:
    """True when a token starting at character ``at`` of ``text`` begins a word: spans start there, not
    inside a word or number ("1 C" copied out of "21 C" was a dev-split failure; digits are single tokens)."""
    return at == 0 or text[at].isspace() or text[at - 1].isspace() or text[at - 1] in "*([\"'`/|:-"


_vocabs: "weakref.WeakKeyDictionary[Any, dict[str, int]]" = weakref.WeakKeyDictionary()


def _vocab(tokenizer) -> dict[str, int]:
    """``tokenizer.get_vocab()``, built once per tokenizer object: it makes a new 49k-entry dict on every call
    (54-71 ms on a 2-core AVX2 EPYC; serve_bench.py --only ttft), which was in every grounded request's time
    to first token. Tokens added to the tokenizer after its first grounded request are not seen (ragtune
    adds none)."""
    vocab = _vocabs.get(tokenizer)
    if vocab is None:
        vocab = _vocabs[tokenizer] = tokenizer.get_vocab()
    return vocab


class GroundedConstraint:
    """Per-request state of grounded decoding over ``sources`` (the source texts exactly as in the prompt)."""

    def __init__(self, tokenizer, sources: Sequence[str], eos_ids: set[int], refusal: str = "",
                 min_span_tokens: int = 2, citations: bool = False, max_spans: int = 0) -> None:
        self.tokenizer = tokenizer
        self.texts = [refusal] + list(sources)  # index 0: the refusal pseudo-source
        self.eos_ids = set(eos_ids)
        self.min_span_tokens = min_span_tokens
        self.max_spans = max_spans  # 0 = any number; 1 = the answer is one extract of one source
        self.ids: list[list[int]] = []
        self.offsets: list[list[tuple[int, int]]] = []
        self.positions: dict[int, list[tuple[int, int]]] = {}
        self.start_positions: dict[int, list[tuple[int, int]]] = {}  # positions where a word begins
        for s, text in enumerate(self.texts):
            enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True) if text else {"input_ids": [], "offset_mapping": []}
            self.ids.append(list(enc["input_ids"]))
            self.offsets.append([tuple(o) for o in enc["offset_mapping"]])
            for i, (t, (a, _)) in enumerate(zip(enc["input_ids"], enc["offset_mapping"])):
                self.positions.setdefault(t, []).append((s, i))
                if _word_start(text, a):
                    self.start_positions.setdefault(t, []).append((s, i))
        # a span may start with a source token minus its leading space ("Ġrated" -> "rated")
        self.aliases: dict[int, int] = {}
        vocab = _vocab(tokenizer)
        for t in self.start_positions:
            piece = tokenizer.convert_ids_to_tokens(t)
            if isinstance(piece, str) and piece.startswith("Ġ") and len(piece) > 1:
                alt = vocab.get(piece[1:])
                if alt is not None and alt not in self.start_positions:
                    self.aliases[alt] = t
        self.free = self._free_ids(vocab)
        self.punct = {vocab[p] for p in FREE_PUNCT if p in vocab}
        self.open_bracket = {vocab[p] for p in ("[", "Ġ[") if p in vocab} if citations else set()
        self.close_bracket = {vocab[p] for p in ("]",) if p in vocab}
        self.digits = {vocab[str(n)]: n for n in range(1, min(len(sources), 9) + 1) if str(n) in vocab}
        self.starts = set(self.start_positions) | set(self.aliases)
        self.state: list[tuple[int, int]] = []  # positions the open span ends at; [] = no span open
        self.span_tokens: list[int] = []
        self.after_bracket = False
        self.after_digit = False
        self.spans: list[CopiedSpan] = []
        self.allowed_mass: list[float] = []
        self._mask_cache: dict[tuple, Any] = {}

    def _free_ids(self, vocab: dict[str, int]) -> set[int]:
        free: set[int] = set()
        for w in FREE_WORDS:
            for variant in (w, w.capitalize()):
                for piece in (variant, "Ġ" + variant):
                    if piece in vocab:
                        free.add(vocab[piece])
        for p in FREE_PUNCT:
            for piece in (p, "Ġ" + p):
                if piece in vocab:
                    free.add(vocab[piece])
        return free

    # --- the constraint ---------------------------------------------------------------------------
    def allowed(self) -> set[int]:
        if self.after_bracket:
            return set(self.digits)
        if self.after_digit:
            return set(self.close_bracket)
        if self.state:
            cont = {self.ids[s][i + 1] for s, i in self.state if i + 1 < len(self.ids[s])}
            if cont and len(self.span_tokens) < self.min_span_tokens:
                return cont  # a span is at least min_span_tokens long: no stitching of single tokens
            if self.max_spans and len(self.spans) + 1 >= self.max_spans:
                return cont | set(self.eos_ids)  # the last extract: copy on, or end the answer
            return cont | set(self.eos_ids) | self.free | self.open_bracket
        if self.max_spans and len(self.spans) >= self.max_spans:
            return set(self.eos_ids)  # the extracts are done
        if self.max_spans == 1 and not self.spans:
            return set(self.starts)  # an extract: it starts with a source word, no preamble
        return self.starts | set(self.eos_ids) | self.free | self.open_bracket

    def __call__(self, scores):
        """Mask ``scores`` (1 x vocab) to the allowed tokens; records the allowed probability mass."""
        import torch

        allowed = sorted(self.allowed())
        index = torch.tensor(allowed, dtype=torch.long, device=scores.device)
        index = index[index < scores.shape[-1]]
        probs = torch.softmax(scores.float(), dim=-1)
        self.allowed_mass.append(float(probs[0, index].sum()))
        masked = torch.full_like(scores, float("-inf"))
        masked[:, index] = scores[:, index]
        return masked

    def advance(self, token: int) -> None:
        """Move the state past the chosen ``token``."""
        if self.after_bracket:
            self.after_bracket, self.after_digit = False, token in self.digits
            return
        if self.after_digit:
            self.after_digit = False
            return
        if self.state:
            nxt = [(s, i + 1) for s, i in self.state if i + 1 < len(self.ids[s]) and self.ids[s][i + 1] == token]
            if nxt:
                self.state = nxt
                self.span_tokens.append(token)
                return
            self._close_span()
        if token in self.open_bracket:
            self.after_bracket = True
            return
        opening = self.max_spans == 1 and not self.spans  # an extract starts at once, even with a free word
        if (token in self.free and not opening) or token in self.eos_ids:
            return
        source_token = self.aliases.get(token, token)
        if source_token in self.start_positions:
            self.state = list(self.start_positions[source_token])
            self.span_tokens = [token]

    def finish(self) -> None:
        self._close_span()

    def _close_span(self) -> None:
        if not self.state:
            return
        n = len(self.span_tokens)
        real = [p for p in self.state if p[0] != REFUSAL_SOURCE]
        s, end_i = min(real or self.state)  # the lowest-numbered source the whole span occurs in (0 = refusal, last)
        start_i = end_i - n + 1
        text = self.tokenizer.decode(self.span_tokens, skip_special_tokens=True)
        a, b = self.offsets[s][start_i][0], self.offsets[s][end_i][1]
        # the alias start token has no leading space: its text starts inside the source token
        src = self.texts[s]
        while a < b and src[a].isspace():
            a += 1
        if n:
            self.spans.append(CopiedSpan(text.strip(), s, a, b, list(self.span_tokens)))
        self.state, self.span_tokens = [], []

    # --- results -----------------------------------------------------------------------------------
    def cited(self) -> list[int]:
        """Source numbers the copied spans came from, in order of first use (the refusal source excluded)."""
        out: list[int] = []
        for span in self.spans:
            if span.source != REFUSAL_SOURCE and span.source not in out and len(span.text) > 1:
                out.append(span.source)
        return out

    def refused(self) -> bool:
        """True when the answer's content came from the refusal sentence (and nothing from the sources)."""
        content = [s for s in self.spans if len(s.text) > 1]
        return bool(content) and all(s.source == REFUSAL_SOURCE for s in content)

    def mean_allowed_mass(self, first: int = 8) -> float | None:
        head = self.allowed_mass[:first]
        return sum(head) / len(head) if head else None
