"""The serving config: :class:`ServeConfig` (defaults < YAML < ``key=value``, see :mod:`core.config`)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal

from core.config import ConfigError, field

Mode = Literal["base", "rag", "ft", "rag+ft"]
MODES: tuple[str, ...] = ("base", "rag", "ft", "rag+ft")


class ServingError(Exception):
    """A request the assistant cannot carry out; the message is one line that says what to do."""


@dataclass
class ServeConfig:
    backend: Literal["local", "openai"] = field("local", help="local: load the model in this process; openai: call an OpenAI-compatible server at openai_url")
    base_model: str = field("smollm2-135m-instruct", help="packaged 'smollm2-135m-instruct', a local HF folder or a hub id (local backend)")
    openai_url: str = field("http://127.0.0.1:8000/v1", help="base URL of an OpenAI-compatible server (vLLM, llama.cpp server, Ollama, `ragtune serve`)")
    openai_model: str = field("", help="model name the remote server knows the base model by ('' = ask the server's /v1/models)")
    openai_api_key: str = field("", help="bearer token for the remote server ('' = $OPENAI_API_KEY or none)")
    quantize: Literal["auto", "int8", "none"] = field("auto", help="int8: dynamic int8 linear layers (CPU, ~2x faster decoding, slightly different text); auto = int8 on CPU, none on GPU")
    device: Literal["auto", "cpu", "cuda"] = field("auto", help="where the local model runs")
    prefill_bf16: bool = field(True, help="local engine, int8 on a CPU with native bf16 (AMX/AVX512-BF16): multiply the prompt "
                                         "(prefill) in bf16, decode in int8; elsewhere it has no effect (answers record "
                                         "the precision used)")
    threads: int = field(0, help="CPU threads for torch (0 = leave torch's default)")
    max_batch_rows: int = field(16, help="local engine: most rows decoded together (a request with context-aware "
                                         "decoding takes two); more requests wait for a free row")
    kv_cache_tokens: int = field(32768, help="local engine: bound on the batch's KV cache in tokens (rows x longest "
                                             "prompt + answer; ~46 KB each for SmolLM2-135M); a request that does not "
                                             "fit waits, one that could never fit is refused")
    k: int = field(4, help="retrieved chunks put into the prompt in rag modes")
    search_mode: Literal["hybrid", "dense", "bm25"] = field("hybrid", help="retrieval: hybrid (dense + BM25 fused), dense or bm25")
    min_similarity: float = field(0.25, help="if the best retrieved chunk's cosine similarity to the question is below this, say 'I don't know' instead of answering")
    max_new_tokens: int = field(160, help="longest answer in tokens")
    temperature: float = field(0.0, help="0 = greedy (reproducible, used for evaluation); > 0 samples")
    top_p: float = field(1.0, help="nucleus sampling mass (only when temperature > 0)")
    repetition_penalty: float = field(1.1, help="> 1 discourages repeating tokens (1 = off)")
    context_tokens: int = field(2048, help="prompt budget in model tokens; sources, then older turns, are cut to fit (see prompts.build_prompt)")
    source_tokens: int = field(320, help="each retrieved chunk is cut to this many model tokens in the prompt")
    history_turns: int = field(4, help="previous question/answer pairs passed to the model (newest kept first)")
    max_question_chars: int = field(2000, help="longer questions are refused with a message")
    seed: int = field(0, help="sampling seed (temperature > 0)")
    # --- answering from the sources (issue 11); each measured on a dev split of the training questions
    # defaults chosen on the dev split (docs/answering-from-sources.md): one grounded extract of the best sentence
    grounded: bool = field(True, help="grounded decoding (local backend): the answer's content is copied from the sources "
                                     "span by span (plus connecting words, punctuation, [n]); each span's source is known exactly")
    grounded_spans: int = field(1, help="grounded decoding: at most this many copied spans (0 = any number; 1 = the answer "
                                        "is one extract of one source)")
    cad_alpha: float = field(0.0, help="context-aware decoding weight a: logits (1+a)*with-sources - a*question-only "
                                       "(0 = off; costs a second forward pass per token)")
    evidence_sentences: int = field(1, help="evidence first: put the best N sentences of the retrieved chunks (MiniLM + BM25 "
                                            "ranked, each widened to evidence_window_tokens) in the prompt instead of whole chunks "
                                            "(0 = off: whole chunks)")
    evidence_skip_questions: bool = field(True, help="evidence first: a sentence that is itself a question (an FAQ heading) "
                                                    "is not evidence; its rank goes to the sentence after it (its answer)")
    evidence_ranker: str = field("auto", help="evidence first: auto = order the sentences with the collection's learned ranker "
                                             "when it has one (ragtune tune-ranker; serving.ranker), else the fixed MiniLM + BM25 "
                                             "mix; fixed = always the fixed mix")
    evidence_window_tokens: int = field(8, help="each evidence sentence is widened with its neighbours up to this many model "
                                               "tokens (8: in practice the sentence alone)")
    second_look: bool = field(False, help="evidence first: when the model answers from the best sentence(s) that the sources "
                                          "do not say, read the whole retrieved chunks (decoded plainly) before abstaining; "
                                          "the first look's refusal is held back, not streamed")
    abstain_threshold: float = field(0.0, help="abstain when the support score (mean of the best chunk's similarity and the best "
                                               "sentence's question-term coverage, serving.evidence.support_score) is below this "
                                               "(0 = off). 0.479 was the dev split's choice (<= 5% false abstain on qa/dev.jsonl) but abstained on "
                                               "66% of the answerable test questions (paraphrased): see docs/answering-from-sources.md before turning it on")
    refusal_text: str = field("The sources do not say.", help="what the assistant answers when it abstains")
    # rag+ft reads with its own options: an adapter answers best in the layout it was trained on (RAFT rows hold
    # whole chunks, decoded plainly), which is not the base model's best (docs/answering-from-sources.md)
    ragft_grounded: bool = field(False, help="rag+ft: grounded decoding (as `grounded`, for answers with an adapter)")
    ragft_grounded_spans: int = field(0, help="rag+ft: at most this many copied spans (as `grounded_spans`)")
    ragft_evidence_sentences: int = field(0, help="rag+ft: the best N sentences instead of whole chunks (as "
                                                  "`evidence_sentences`; 0 = whole chunks, the RAFT rows' layout)")
    ragft_second_look: bool = field(False, help="rag+ft: as `second_look` (a second look at the whole chunks after a refusal)")
    ragft_reading: Literal["adapter", "config"] = field("adapter", help="rag+ft: adapter = read in the layout recorded with "
                                                        "the adapter (`ragtune adapters reading`, chosen on a dev split) "
                                                        "when it has one, else the ragft_* options; config = always the "
                                                        "ragft_* options")

    def __post_init__(self) -> None:
        if self.k < 1 or self.k > 20:
            raise ConfigError(f"k: {self.k} is out of range; use 1-20 (example: k=4)")
        if self.max_new_tokens < 1:
            raise ConfigError("max_new_tokens: must be >= 1 (example: max_new_tokens=160)")
        if self.temperature < 0:
            raise ConfigError("temperature: must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise ConfigError("top_p: must be in (0, 1] (example: top_p=0.9)")
        if self.repetition_penalty <= 0:
            raise ConfigError("repetition_penalty: must be > 0 (1 = off)")
        if self.context_tokens < 256:
            raise ConfigError("context_tokens: must be >= 256 (example: context_tokens=2048)")
        if self.source_tokens < 32:
            raise ConfigError("source_tokens: must be >= 32")
        for key in ("grounded_spans", "ragft_grounded_spans"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key}: must be >= 0 (0 = any number; example: {key}=1)")
        if self.cad_alpha < 0 or self.cad_alpha > 10:
            raise ConfigError(f"cad_alpha: {self.cad_alpha} is out of range; use 0 (off) to 10 (example: cad_alpha=0.5)")
        for key in ("evidence_sentences", "ragft_evidence_sentences"):
            if not 0 <= getattr(self, key) <= 40:
                raise ConfigError(f"{key}: use 0 (off) to 40 (example: {key}=4)")
        if self.evidence_ranker not in ("auto", "fixed"):
            raise ConfigError(f"evidence_ranker: {self.evidence_ranker!r} is not auto or fixed (example: evidence_ranker=fixed)")
        if self.evidence_window_tokens < 8:
            raise ConfigError("evidence_window_tokens: must be >= 8 (example: evidence_window_tokens=48)")
        if not -1.0 <= self.abstain_threshold <= 1.0:
            raise ConfigError("abstain_threshold: use 0 (off) or a score in (0, 1] (example: abstain_threshold=0.4)")
        if not self.refusal_text.strip():
            raise ConfigError("refusal_text: must not be empty (example: refusal_text='The sources do not say.')")
        if not 1 <= self.max_batch_rows <= 256:
            raise ConfigError("max_batch_rows: use 1-256 (example: max_batch_rows=16)")
        if self.kv_cache_tokens < 512:
            raise ConfigError("kv_cache_tokens: must be >= 512 (example: kv_cache_tokens=32768)")
        if self.history_turns < 0 or self.max_question_chars < 1:
            raise ConfigError("history_turns must be >= 0 and max_question_chars >= 1")

    def for_mode(self, mode: str, reading: dict[str, Any] | None = None) -> "ServeConfig":
        """The options one answer in ``mode`` reads with: ``rag+ft`` takes the adapter's recorded ``reading``
        layout (:func:`check_reading`) when it has one and ``ragft_reading`` is ``adapter``, else its ``ragft_*``
        options."""
        if mode != "rag+ft":
            return self
        if reading and self.ragft_reading == "adapter":
            return replace(self, **{key: reading[key] for key in READING_KEYS})
        return replace(self, grounded=self.ragft_grounded, grounded_spans=self.ragft_grounded_spans,
                       evidence_sentences=self.ragft_evidence_sentences, second_look=self.ragft_second_look)


# The options a reading layout sets (an adapter answers best in the layout it was trained or chosen in)
READING_KEYS = ("evidence_sentences", "grounded", "grounded_spans", "second_look")
# The whole retrieved chunks, decoded plainly: the RAFT rows' layout, and what a second look reads
WHOLE_CHUNKS = {"evidence_sentences": 0, "grounded": False, "grounded_spans": 0, "second_look": False}


def check_reading(raw: Any, adapter: str) -> dict[str, Any] | None:
    """An adapter manifest's ``reading`` record as the :data:`READING_KEYS` options (None when it has none), checked as the
    ``ragft_*`` options are; a damaged record is a one-line ServingError naming the adapter and the fix."""
    if raw is None:
        return None
    from core.config import build_config

    try:
        if not isinstance(raw, dict):
            raise ConfigError("not a mapping")
        missing = [key for key in READING_KEYS if key not in raw]
        if missing:
            raise ConfigError(f"missing {', '.join(missing)}")
        checked = build_config(ServeConfig, {f"ragft_{key}": raw[key] for key in READING_KEYS}, source="reading")
    except ConfigError as exc:
        raise ServingError(f"adapter {adapter!r}: its recorded reading layout is damaged ({exc}); set it again with "
                           f"`ragtune adapters reading {adapter} --layout chunks` or clear it with --clear") from None
    return {key: getattr(checked, f"ragft_{key}") for key in READING_KEYS}


__all__ = ["ServeConfig", "ServingError", "ConfigError", "Mode", "MODES", "READING_KEYS", "WHOLE_CHUNKS", "check_reading"]
