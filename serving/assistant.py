"""The assistant: ``answer(question, mode, collection, adapter, history)`` in four modes.

- ``base``: the base model alone (closed book);
- ``rag``: retrieve (hybrid, ``k`` chunks), prompt with numbered sources, cite them as [n];
- ``ft``: the base model with a LoRA adapter (closed book);
- ``rag+ft``: the adapter with retrieved sources.

In RAG modes, when the best chunk's cosine similarity to the question is under ``min_similarity``,
the assistant says it does not know instead of letting the model invent. Every request is checked
before any work starts; what cannot be done raises :class:`ServingError` with one line saying what to
do. Every answer is logged (question, mode, collection version, adapter, sources, timings) when a
:class:`serving.history.ChatStore` is attached.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Sequence

from serving.config import MODES, WHOLE_CHUNKS, ServeConfig, ServingError, check_reading
from serving.evidence import search_keeping_query
from serving.generation import GenerationParams, TokenStream
from serving.modes import uses_adapter, uses_retrieval
from serving.prompts import (STOP_STRINGS, Turn, build_messages, cited_numbers, claim_and_quote, dont_know,
                             flatten_with_offsets, refusal_state, retrieval_query)
from tuning.raft import find_answer


@dataclass
class Source:
    """A retrieved chunk as put into the prompt: number ``n``, its span ``start:end`` in ``doc``."""

    n: int
    doc: str
    chunk_id: int
    text: str
    start: int
    end: int
    score: float
    similarity: float | None
    metadata: dict[str, Any] = field(default_factory=dict)
    cited: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Answer:
    question: str
    mode: str
    text: str
    collection: str | None = None
    collection_version: int | None = None
    adapter: str | None = None
    base_model: str | None = None
    retrieval_query: str | None = None
    sources: list[Source] = field(default_factory=list)  # every chunk in the prompt, numbered
    hits: list[Any] = field(default_factory=list)  # every retrieved Hit (also those cut by the budget)
    cited: list[int] = field(default_factory=list)  # source numbers the answer cites, in order
    refused: bool = False  # True when the assistant abstained: the sources do not hold the answer
    refusal_reason: str = ""  # why it abstained (retrieval similarity, support score, or the model chose to)
    abstain_score: float | None = None  # support score of the best evidence sentence (see serving.evidence)
    spans: list[dict[str, Any]] = field(default_factory=list)  # grounded decoding: copied spans, each with its
    #   source number n, doc and exact start/end in the document; plain decoding: where the answer stands in a cited source
    decoding: dict[str, Any] = field(default_factory=dict)  # the decoding options this answer used
    timings: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    message_id: int | None = None  # the stored answer's id (for feedback)
    chat_id: int | None = None

    @property
    def cited_sources(self) -> list[Source]:
        by_n = {s.n: s for s in self.sources}
        return [by_n[n] for n in self.cited if n in by_n]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hits"] = [h.to_dict() if hasattr(h, "to_dict") else h for h in self.hits]
        return d


@dataclass
class _FirstLook:
    """What a second look keeps of the first: its options (``config``, already set to read whole chunks), the
    adapter's recorded layout, and the answer whose retrieval it reuses."""
    config: ServeConfig
    reading: dict[str, Any] | None
    answer: Answer


def citation_marker(streamed: str, cited: Sequence[int]) -> str:
    """What a grounded answer streams after its text: the ``[n]`` markers of the sources it copied from,
    with one space before them unless the streamed text already ends with whitespace (the stream and
    ``Answer.text`` must say the same)."""
    if not cited:
        return ""
    return ("" if streamed[-1:].isspace() else " ") + "".join(f"[{n}]" for n in cited)


class AnswerStream:
    """Iterate to get the answer's text pieces as they are generated; ``answer`` is complete after.

    Retrieval has happened when this object exists, so ``sources`` can be shown before the first token."""

    def __init__(self, assistant: "Assistant", answer: Answer, tokens: TokenStream | None, started: float,
                 chat_id: int | None, log: bool, constraint: Any = None, source_maps: Sequence[Any] = (),
                 second_look: Callable[[], "AnswerStream"] | None = None) -> None:
        self.answer = answer
        self._second_look = second_look  # starts the answer over the whole chunks, if this one is a refusal
        self._constraint = constraint
        self._source_maps = list(source_maps)
        self.sources = answer.sources
        self._assistant = assistant
        self._tokens = tokens
        self._started = started
        self._chat_id = chat_id
        self._log = log
        self._pieces = self._run()

    def __iter__(self) -> "AnswerStream":
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def _run(self) -> Iterator[str]:
        answer, parts = self.answer, []
        if self._tokens is None:  # refused: the "don't know" text is the whole answer
            answer.timings["ttft_s"] = round(time.perf_counter() - self._started, 4)
            parts.append(answer.text)
            yield answer.text
        else:
            # second look: pieces that may begin a refusal are held back until the text says otherwise
            holding, marker = self._second_look is not None, ""
            for piece in self._tokens:
                if "ttft_s" not in answer.timings:
                    answer.timings["ttft_s"] = round(time.perf_counter() - self._started, 4)
                parts.append(piece)
                if holding:
                    if refusal_state("".join(parts), self._assistant.config.refusal_text):
                        continue
                    holding, piece = False, "".join(parts)
                yield piece
            streamed = "".join(parts)
            answer.text = streamed.strip()
            if self._constraint is not None:  # grounded: the exact citations of the copied spans, appended
                self._grounded_result(answer)
                marker = "" if answer.refused else citation_marker(streamed, answer.cited)
                if marker:
                    answer.text = (streamed + marker).strip()
            answer.finish_reason = self._tokens.finish_reason
            answer.timings["prompt_tokens"] = self._tokens.prompt_tokens
            answer.timings["completion_tokens"] = self._tokens.completion_tokens
            answer.timings["queued_s"] = round(self._tokens.queued_s, 4)
            rate = self._tokens.decode_tokens_per_s
            answer.timings["tokens_per_s"] = round(rate, 2) if rate else None
            if self._constraint is None:
                answer.cited = cited_numbers(answer.text, len(answer.sources))
                if refusal_state(answer.text, self._assistant.config.refusal_text) == "refusal":
                    answer.refused, answer.refusal_reason = True, "the model answered that the sources do not say"
                elif answer.cited:
                    self._check_claim(answer)
            for s in answer.sources:
                s.cited = s.n in answer.cited
            if holding and answer.refused:
                yield from self._look_again(answer)
            else:
                if holding:
                    yield "".join(parts)
                if marker:
                    yield marker
        answer.timings["total_s"] = round(time.perf_counter() - self._started, 4)
        if self._log and self._assistant.store is not None:
            store = self._assistant.store
            chat_id = self._chat_id or store.new_chat(answer.question)
            _, answer.message_id = store.log_exchange(chat_id, answer.question, answer)
            answer.chat_id = chat_id

    def _look_again(self, answer: Answer) -> Iterator[str]:
        """The model said the sources do not say from the best sentence(s): answer again from the whole retrieved
        chunks (plain decoding), stream that, and make it this answer; the first look's text stays in ``decoding``."""
        first_text, first_reason = answer.text, answer.refusal_reason
        again = self._second_look()
        for piece in again:
            if "second_look_ttft_s" not in answer.timings:
                answer.timings["second_look_ttft_s"] = round(time.perf_counter() - self._started, 4)
            yield piece
        first_timings = dict(answer.timings)
        for f in dataclasses.fields(Answer):
            if f.name not in ("question", "message_id", "chat_id"):
                setattr(answer, f.name, getattr(again.answer, f.name))
        # what a user waited for: the first piece shown came from the second look
        answer.timings["first_look_s"] = first_timings.get("ttft_s")
        answer.timings["ttft_s"] = first_timings.get("second_look_ttft_s", answer.timings.get("ttft_s"))
        answer.decoding["second_look"] = True
        answer.decoding["first_look"] = first_text
        answer.notes.insert(0, f"second look: from the best sentence the model answered that the sources do not say "
                               f"({first_reason}); this answer reads the whole retrieved chunks")

    @staticmethod
    def _check_claim(answer: Answer) -> None:
        """Plain decoding: find the answer's claim in the sources it cites (a span, as grounded decoding records
        one, for the chat to highlight), and check the quote a RAFT adapter writes after it (``Evidence [n]:
        "..."``): free text, often another sentence than the one holding the answer. A failed check is a note."""
        claim, quoted, quote = claim_and_quote(answer.text)
        by_n = {s.n: s for s in answer.sources}
        others = [s.n for s in answer.sources if s.n not in answer.cited]
        for n in [*answer.cited, *others]:  # the cited sources first; then the words may stand in another one
            where = find_answer(by_n[n].text, claim)
            if where is not None:
                source = by_n[n]
                answer.spans.append({"text": source.text[where[0]:where[1]], "n": n, "doc": source.doc,
                                     "start": source.start + where[0], "end": source.start + where[1]})
                if n in others:
                    cited = ", ".join(f"[{c}]" for c in answer.cited)
                    answer.notes.append(f"the answer's words are in source [{n}], not in the cited {cited}")
                break
        if quoted not in by_n or not quote:
            return
        if find_answer(by_n[quoted].text, quote) is None:
            answer.notes.append(f"the quote after the answer is not in source [{quoted}]")
        elif answer.spans and find_answer(quote, claim) is None:
            answer.notes.append(f"the quote after the answer does not hold it; the answer's words are highlighted "
                                f"in source [{answer.spans[0]['n']}]")

    def _grounded_result(self, answer: Answer) -> None:
        """Citations and spans from the grounded-decoding state: exact, not parsed from the text."""
        c = self._constraint
        answer.cited = c.cited()
        by_n = {s.n: s for s in answer.sources}
        for span in c.spans:
            if span.source == 0 or span.source not in by_n or len(span.text) < 2:
                continue
            source = by_n[span.source]
            where = self._source_maps[span.source - 1]
            a, b = where[span.start], where[span.end - 1] + 1
            answer.spans.append({"text": span.text, "n": span.source, "doc": source.doc,
                                 "start": source.start + a, "end": source.start + b})
        answer.timings["grounded_mass"] = round(c.mean_allowed_mass() or 0.0, 4)
        if c.refused():
            answer.refused, answer.refusal_reason = True, "the model copied the refusal sentence: the sources do not say"

    def result(self) -> Answer:
        """Consume what is left and return the complete answer."""
        for _ in self:
            pass
        return self.answer


def normalize_history(history: Sequence[Any] | None) -> list[Turn]:
    """Accept :class:`Turn`s, ``{"question", "answer"}`` dicts or chat messages (``role``/``content``)."""
    turns: list[Turn] = []
    pending: str | None = None
    for item in history or []:
        if isinstance(item, Turn):
            turns.append(item)
        elif isinstance(item, dict) and "question" in item:
            turns.append(Turn(str(item["question"]), str(item.get("answer", ""))))
        elif isinstance(item, dict) and item.get("role") == "user":
            pending = str(item.get("content", ""))
        elif isinstance(item, dict) and item.get("role") == "assistant" and pending is not None:
            turns.append(Turn(pending, str(item.get("content", ""))))
            pending = None
    return turns


class Assistant:
    """Answers questions over a workspace's collections with a generator (local or remote)."""

    def __init__(self, workspace: Any, generator: Any, config: ServeConfig | None = None, store: Any = None) -> None:
        self.workspace = workspace
        self.generator = generator
        self.config = config or ServeConfig()
        self.store = store

    @classmethod
    def open(cls, home: str | os.PathLike | None = None, config: ServeConfig | None = None, log: bool = True) -> "Assistant":
        """Workspace + generator + chat store for ``home`` (``$RAGTUNE_HOME`` when None)."""
        from rag.collection import Workspace
        from serving.generation import make_generator
        from serving.history import ChatStore

        config = config or ServeConfig()
        workspace = Workspace(home)
        generator = make_generator(config, workspace.home)
        return cls(workspace, generator, config, ChatStore(workspace.db_path) if log else None)

    def warm_up(self) -> None:
        """Load the collections' embedders and run the model once, so the first user does not wait for it."""
        for name in self.workspace.names():
            try:
                self.workspace.get(name).search("warm up", k=1)
            except Exception:  # an empty or broken collection must not stop the app from starting
                pass
        self.generator.warm_up()

    # --- checks -------------------------------------------------------------------------------
    def check(self, question: str, mode: str, collection: str | None, adapter: str | None) -> dict[str, Any] | None:
        """Raise :class:`ServingError` (one line, says what to do) for a request that cannot be served; returns
        the adapter's manifest when the mode uses one."""
        from rag.collection import CollectionError

        if not isinstance(question, str) or not question.strip():
            raise ServingError("empty question: type a question")
        limit = self.config.max_question_chars
        if len(question) > limit:
            raise ServingError(f"the question is {len(question)} characters, over the limit of {limit}; shorten it "
                               f"(or raise max_question_chars)")
        if mode not in MODES:
            raise ServingError(f"unknown mode {mode!r}; use one of: {', '.join(MODES)}")
        if uses_retrieval(mode):
            if not collection:
                names = self.workspace.names()
                hint = (f"pick one of: {', '.join(names)}" if names else
                        "index one first: ragtune index PATH --collection NAME")
                raise ServingError(f"mode {mode} needs a collection to retrieve from; {hint}")
            try:
                self.workspace.get(collection)
            except CollectionError as exc:
                raise ServingError(str(exc)) from None
        if uses_adapter(mode):
            if not adapter:
                usable = sorted(a["name"] for a in self.generator.available_adapters() if a.get("usable"))
                hint = (f"pick one of: {', '.join(usable)}" if usable else
                        "train one first: ragtune tune CONFIG (or use mode rag)")
                raise ServingError(f"mode {mode} needs an adapter; {hint}")
            return self.generator.check_adapter(adapter)
        if adapter:
            raise ServingError(f"mode {mode} uses no adapter; use mode {'rag+ft' if mode == 'rag' else 'ft'} to answer "
                               f"with adapter {adapter!r}")
        return None

    # --- answering ----------------------------------------------------------------------------
    def stream(self, question: str, mode: str = "rag", collection: str | None = None, adapter: str | None = None,
               history: Sequence[Any] | None = None, *, k: int | None = None, chat_id: int | None = None,
               log: bool = True, max_new_tokens: int | None = None, temperature: float | None = None,
               _first: "_FirstLook | None" = None) -> AnswerStream:
        """Check, retrieve, build the prompt and start generating; iterate the result for text pieces."""
        started = time.perf_counter()
        if _first is None:
            manifest = self.check(question, mode, collection, adapter)
            # rag+ft reads in the layout recorded with the adapter (chosen on a dev split), if it has one
            reading = check_reading(manifest.get("reading"), adapter) if manifest and mode == "rag+ft" else None
            cfg = self.config.for_mode(mode, reading)
        else:  # a second look: the first look's checks and options hold, read over the whole chunks
            reading, cfg = _first.reading, _first.config
        question = question.strip()
        turns = normalize_history(history)
        use_adapter = adapter if uses_adapter(mode) else None
        rag = uses_retrieval(mode)
        answer = Answer(question=question, mode=mode, text="", adapter=use_adapter,
                        base_model=getattr(self.generator, "base_id", None), collection=collection if rag else None)
        hits, ranker = self._retrieve(answer, turns, cfg, collection, k, _first) if rag else ([], "none")
        if answer.refused:  # retrieval found nothing close enough, or nothing supports an answer
            return AnswerStream(self, answer, None, started, chat_id, log)
        params = GenerationParams.from_config(cfg, max_new_tokens=max_new_tokens, temperature=temperature)
        params.stop = STOP_STRINGS  # small models go on to invent the next "Question:" of the prompt layout
        window = getattr(self.generator, "context_window", cfg.context_tokens)
        prompt = functools.partial(build_messages, question, history=turns, rag=rag, count=self.generator.count_tokens,
                                   truncate=self.generator.truncate_tokens,
                                   budget=min(cfg.context_tokens, window) - params.max_new_tokens,
                                   source_tokens=cfg.source_tokens, history_turns=cfg.history_turns)
        try:
            plan = prompt(sources=hits)
        except ValueError as exc:
            raise ServingError(str(exc)) from None
        answer.notes = plan.notes
        answer.sources = [self._source(n, h) for n, h in enumerate(hits[:plan.sources_used], start=1)]
        constraint, maps = self._decoding_options(answer, cfg, params, plan, prompt, use_adapter) if rag else (None, [])
        answer.decoding = {"grounded": bool(constraint), "grounded_spans": cfg.grounded_spans if constraint else 0, "cad_alpha": params.cad_alpha if params.contrast_ids else 0.0,
                           "evidence_sentences": cfg.evidence_sentences if rag else 0, "evidence_ranker": ranker, "k": k or cfg.k if rag else 0,
                           "source_tokens": cfg.source_tokens, "abstain_threshold": cfg.abstain_threshold if rag else 0.0}
        if reading and cfg.ragft_reading == "adapter":
            answer.decoding["reading"] = "adapter"  # the options above came from the adapter's recorded layout
        precision = getattr(self.generator, "prefill_precision", None)
        if precision is not None:
            answer.decoding["prefill"] = precision(params.prefill_bf16)
        look_again = (functools.partial(self.stream, question, mode, collection, adapter, history, k=k, log=False,
                                        max_new_tokens=max_new_tokens, temperature=temperature,
                                        _first=_FirstLook(dataclasses.replace(cfg, **WHOLE_CHUNKS), reading, answer))
                      if cfg.second_look and cfg.evidence_sentences and rag and _first is None else None)
        tokens = self.generator.stream(plan.messages, adapter=use_adapter, params=params)
        return AnswerStream(self, answer, tokens, started, chat_id, log, constraint, maps, look_again)

    def _retrieve(self, answer: Answer, turns: list[Turn], cfg: ServeConfig, collection: str | None, k: int | None,
                  first: "_FirstLook | None") -> tuple[list[Any], str]:
        """The sources of a rag answer and the evidence ranker that ordered them. Refusing (nothing close enough
        retrieved, or a support score under ``abstain_threshold``) sets ``answer.refused`` and its text."""
        if first is not None:
            # the first look's retrieval (same hits, same collection version) and support score; its refusal checks
            # passed, and whole chunks need no sentence ranking
            seen = first.answer
            answer.hits = hits = list(seen.hits)
            answer.collection_version, answer.retrieval_query = seen.collection_version, seen.retrieval_query
            answer.abstain_score = seen.abstain_score
            answer.timings.update({key: seen.timings[key] for key in ("retrieval_ms", "evidence_ms") if key in seen.timings})
            return hits, seen.decoding.get("evidence_ranker", "none")
        col = self.workspace.get(collection)
        answer.collection_version = col.version()
        answer.retrieval_query = retrieval_query(answer.question, turns)
        t0 = time.perf_counter()
        hits = search_keeping_query(col, answer.retrieval_query, k or cfg.k, cfg.search_mode)
        answer.timings["retrieval_ms"] = round((time.perf_counter() - t0) * 1000, 2)
        answer.hits = hits
        sims = [h.similarity for h in hits if h.similarity is not None]
        best = max(sims) if sims else None
        if not hits or (best is not None and best < cfg.min_similarity):
            answer.refusal_reason = (f"retrieval: best match similarity {best:.2f} below min_similarity {cfg.min_similarity:.2f}"
                                     if best is not None else "retrieval: nothing matched")
            self._refuse(answer, hits, dont_know(collection, best, cfg.min_similarity))
            return hits, "none"
        if not (cfg.evidence_sentences or cfg.abstain_threshold > 0):
            return hits, "none"
        from serving.evidence import evidence_sources, support_score
        from serving.ranker import rank_evidence

        t0 = time.perf_counter()
        ranked, ranker = rank_evidence(col, answer.question, hits, cfg.evidence_skip_questions, cfg.evidence_ranker)
        answer.abstain_score = support_score(ranked, hits)
        if cfg.evidence_sentences:
            hits = evidence_sources(hits, ranked, cfg.evidence_sentences, cfg.evidence_window_tokens,
                                    self.generator.count_tokens)
        answer.timings["evidence_ms"] = round((time.perf_counter() - t0) * 1000, 2)
        if cfg.abstain_threshold > 0 and (answer.abstain_score or 0.0) < cfg.abstain_threshold:
            answer.refusal_reason = (f"support score {answer.abstain_score or 0.0:.2f} below abstain_threshold "
                                     f"{cfg.abstain_threshold:.2f}: no retrieved sentence supports an answer")
            self._refuse(answer, hits, cfg.refusal_text)
        return hits, ranker

    def _refuse(self, answer: Answer, hits: list[Any], text: str) -> None:
        """Mark ``answer`` refused before generation: ``text`` is the whole answer, ``hits`` its sources."""
        answer.refused, answer.text = True, text
        answer.sources = [self._source(n, h) for n, h in enumerate(hits, start=1)]

    def _decoding_options(self, answer: Answer, cfg: ServeConfig, params: GenerationParams, plan: Any,
                          prompt: Callable[..., Any], use_adapter: str | None) -> tuple[Any, list[Any]]:
        """Grounded decoding (a constraint on ``params``, and each source's offset map for the exact spans) and
        context-aware decoding (the question-only prompt as ``params.contrast_ids``), as ``cfg`` asks."""
        constraint, maps = None, []
        local = self.generator.local_decoding
        if (cfg.grounded or cfg.cad_alpha > 0) and not local:
            answer.notes.append("grounded and context-aware decoding need the local backend; decoded plainly")
            return constraint, maps
        if cfg.grounded:
            from serving.grounding import GroundedConstraint

            # the constraint sees each source exactly as the prompt holds it (cut to source_tokens, flattened:
            # a prefix of the flattened chunk, so the offset map of the whole chunk applies)
            maps = [flatten_with_offsets(s.text)[1] for s in answer.sources]
            # the refusal sentence is a copyable pseudo-source only for adapters (trained to say it): for the
            # base model it was a magnet ("The sources ..." -> "The sources do not say" on 9 of 24 dev rows)
            constraint = GroundedConstraint(self.generator.tokenizer, plan.source_texts, self.generator.eos_ids,
                                            refusal=cfg.refusal_text if use_adapter else "", max_spans=cfg.grounded_spans)
            params.constraint = constraint
            params.stop = tuple(params.stop) + ("\n",)  # a grounded answer is one paragraph (sources are flattened)
        if cfg.cad_alpha > 0:
            params.contrast_ids, params.cad_alpha = self.generator.render(prompt(sources=()).messages), cfg.cad_alpha
        return constraint, maps

    def answer(self, question: str, mode: str = "rag", collection: str | None = None, adapter: str | None = None,
               history: Sequence[Any] | None = None, **kwargs: Any) -> Answer:
        """The complete :class:`Answer` (text, cited sources with spans, all hits, timings)."""
        return self.stream(question, mode, collection, adapter, history, **kwargs).result()

    @staticmethod
    def _source(n: int, hit: Any) -> Source:
        return Source(n, hit.doc, hit.chunk_id, hit.text, hit.start, hit.end, float(hit.score), hit.similarity,
                      dict(hit.metadata or {}))
