"""Prompts for the four modes, the context budget, follow-up retrieval and citation parsing.

The RAG user message has the shape ``<numbered sources>\\n\\nQuestion: <question>``: the same shape as
``tuning.data`` renders ``{question, answer, context}`` rows (RAFT examples), so an adapter trained on
those sees at serving time the layout it was trained on (the ``rag+ft`` mode).

The budget rule (``build_messages``): the prompt may use ``min(context_tokens, model window) -
max_new_tokens`` tokens. The system message and the question always go in (a question that alone
does not fit is refused). Then sources, best first, each cut to ``source_tokens``; a source that
no longer fits is dropped with all lower-ranked ones. Then previous turns, newest first, at most
``history_turns`` of them; the first turn that no longer fits is dropped with all older ones.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from tuning.raft import SYSTEM_PLAIN, SYSTEM_RAG, format_source  # the layout RAFT adapters are trained on

# Small models go on to invent the next turn of a Q/A layout: "Question:" (ours), "Q:"/"A:" and
# "Answer:" (the layouts of their pre-training data), which left a stray "A:" at the end of answers.
STOP_STRINGS = ("\nQuestion:", "\nSources:", "<|im_start|>", "<|im_end|>", "\nQ:", "\nA:", "\nAnswer:",
                "\n\nQuestion", "\n\nAnswer")
MESSAGE_OVERHEAD_TOKENS = 6  # role markers and separators the chat template adds per message

# Words that make a question lean on the previous turn ("and how long does that take?").
_REFERRING = frozenset("it its it's that this these those they them their there he she his her one ones such "
                       "same former latter also then".split())
_FOLLOW_UP_OPENERS = ("and ", "what about", "how about", "also", "but ", "so ", "then ")
_CONTENT_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9'-]*")
_CITATION = re.compile(r"\[(\s*\d+(?:\s*[,;]\s*\d+)*\s*)\]")
_STOPWORDS = frozenset("a an the is are was were be do does did of to in on at for and or with how what when where "
                       "which who why long much many take takes".split())


@dataclass
class Turn:
    """One previous exchange of a conversation."""

    question: str
    answer: str


@dataclass
class PromptPlan:
    messages: list[dict[str, str]]
    sources_used: int  # how many of the given sources made it into the prompt
    turns_used: int
    prompt_tokens: int
    notes: list[str] = field(default_factory=list)  # what was cut, for the UI and the log
    source_texts: list[str] = field(default_factory=list)  # each source's text exactly as in the prompt (flattened)
    context: str = ""  # the numbered sources block of a RAG user message (before "\n\nQuestion: ...")


def count_tokens(tokenizer, text: str) -> int:
    """Model tokens of ``text`` (no special tokens)."""
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def truncate_tokens(tokenizer, text: str, n: int) -> str:
    """``text`` cut after its first ``n`` model tokens (unchanged when it has no more)."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return text if len(enc["input_ids"]) <= n else text[: enc["offset_mapping"][n - 1][1]]


def is_follow_up(question: str) -> bool:
    """A question that refers back (pronoun, 'and ...', or too few content words to stand alone)."""
    q = question.strip().lower()
    words = _CONTENT_WORD.findall(q)
    if q.startswith(_FOLLOW_UP_OPENERS):
        return True
    if any(w in _REFERRING for w in words):
        return True
    return len([w for w in words if w not in _STOPWORDS]) <= 1


def retrieval_query(question: str, history: Sequence[Turn]) -> str:
    """What to search for: the question alone, or, for a follow-up, the previous question + this one.

    A 135M model rewrites follow-ups unreliably, so the rewrite is this stated rule: a follow-up
    (see :func:`is_follow_up`) is searched together with the last user question, which carries the
    subject the pronoun refers to. The model itself still sees the turns in its messages."""
    if history and is_follow_up(question):
        return f"{history[-1].question.strip()} {question.strip()}"
    return question.strip()


def build_messages(question: str, *, sources: Sequence[Any] = (), history: Sequence[Turn] = (), rag: bool,
                   count: Callable[[str], int], truncate: Callable[[str, int], str], budget: int,
                   source_tokens: int, history_turns: int) -> PromptPlan:
    """Messages for one request under the budget rule in the module docstring.

    ``sources`` are :class:`rag.search.Hit`-like objects (``doc``, ``text``, ``metadata``), best first."""
    system = SYSTEM_RAG if rag else SYSTEM_PLAIN
    question = question.strip()
    used = count(system) + MESSAGE_OVERHEAD_TOKENS * 2 + count("Question: " + question)
    if used > budget:
        raise ValueError(f"the question alone needs about {used} tokens, over the {budget}-token prompt budget; shorten it")
    notes: list[str] = []
    blocks: list[str] = []
    texts: list[str] = []
    if rag:
        for n, hit in enumerate(sources, start=1):
            text = truncate(hit.text, source_tokens)
            block = format_source(n, hit.doc, text, (hit.metadata or {}).get("section"))
            cost = count(block) + 2
            if used + cost > budget:
                notes.append(f"sources {n}-{len(sources)} left out: over the prompt budget")
                break
            if text != hit.text:
                notes.append(f"source {n} cut to {source_tokens} tokens")
            blocks.append(block)
            texts.append(" ".join(text.split()))
            used += cost
    turns: list[dict[str, str]] = []
    kept = 0
    for turn in list(reversed(history))[:history_turns]:
        cost = count(turn.question) + count(turn.answer) + MESSAGE_OVERHEAD_TOKENS * 2
        if used + cost > budget:
            notes.append(f"{len(history) - kept} older turn(s) left out: over the prompt budget")
            break
        turns[:0] = [{"role": "user", "content": turn.question}, {"role": "assistant", "content": turn.answer}]
        used += cost
        kept += 1
    else:
        if len(history) > history_turns:
            notes.append(f"{len(history) - history_turns} older turn(s) left out (history_turns={history_turns})")
    context = "Sources:\n" + "\n\n".join(blocks) if rag else ""
    user = f"{context}\n\nQuestion: {question}" if rag else question
    messages = [{"role": "system", "content": system}, *turns, {"role": "user", "content": user}]
    return PromptPlan(messages, len(blocks), kept, used, notes, texts, context)


def cited_numbers(answer: str, n_sources: int) -> list[int]:
    """Source numbers the answer cites as [n] or [n, m], in order of first mention, within 1..n_sources."""
    seen: list[int] = []
    for group in _CITATION.findall(answer):
        for part in re.split(r"[,;]", group):
            n = int(part.strip())
            if 1 <= n <= n_sources and n not in seen:
                seen.append(n)
    return seen


_EVIDENCE = re.compile(r"\n\s*Evidence\b(?:\s*\[\s*(\d+)\s*\]\s*:)?(.*)", re.DOTALL)  # RAFT's quote after the answer
_CITE = re.compile(r"\s*\[\d+(?:\s*[,;]\s*\d+)*\]")


def answer_for_scoring(text: str) -> str:
    """The answer itself: without the quoted evidence (RAFT-style outputs) and the [n] markers."""
    return _CITE.sub("", _EVIDENCE.sub("", text)).strip()


def claim_and_quote(answer: str) -> tuple[str, int | None, str]:
    """An answer in the RAFT target format, ``{claim} [n]`` then ``Evidence [n]: "{quote}"``, split into its
    claim (:func:`answer_for_scoring`, a final period dropped), the quote's source number and the quote
    (``None, ""`` without one)."""
    m = _EVIDENCE.search(answer)
    n, quote = (int(m.group(1)), m.group(2).strip().strip('"\u201c\u201d').strip()) if m and m.group(1) else (None, "")
    return answer_for_scoring(answer).rstrip(" ."), n, quote


def refusal_state(text: str, refusal: str) -> str:
    """One rule for "the model said the sources do not say" (case and spacing ignored): ``"refusal"`` when
    ``text`` starts with the refusal sentence (its final period optional), ``"prefix"`` while ``text`` could
    still become it (a streamed answer is held back then), else ``""``."""
    said, refusal = " ".join(text.split()).lower(), " ".join(refusal.split()).lower()
    if said.startswith(refusal.rstrip(".")):
        return "refusal"
    return "prefix" if refusal.startswith(said) else ""


def dont_know(collection: str, best: float | None, threshold: float) -> str:
    if best is None:
        return f"I don't know: nothing in the collection '{collection}' matches this question."
    return (f"I don't know: nothing in the collection '{collection}' is close enough to this question "
            f"(best match similarity {best:.2f}, below {threshold:.2f}).")


def flatten_with_offsets(text: str) -> tuple[str, list[int]]:
    """``" ".join(text.split())`` (how sources appear in the prompt) and, for each of its characters,
    the offset of that character in ``text`` (a joining space maps to the whitespace it replaced)."""
    out: list[str] = []
    where: list[int] = []
    for m in re.finditer(r"\S+", text):
        if out:
            out.append(" ")
            where.append(m.start() - 1)
        out.append(m.group())
        where.extend(range(m.start(), m.end()))
    return "".join(out), where
