"""Serving benchmark on the demo corpus: ragtune vs the plain stack in one process, one JSON line per figure.

    python bench/serve_bench.py            # 64-token decodes, 20 RAG questions, 8 concurrent asks
    python bench/serve_bench.py --quick    # 32-token decodes, 6 questions, same metrics (< 5 minutes)

Metrics (names fixed by issue 4):
- decode_speedup: decode tokens/s of ragtune's generator (int8 linear layers, own decode loop) / plain
  fp32 ``model.generate`` on the same prompt and model, same number of new tokens (prefill excluded);
  llamacpp_tokens_per_s: llama.cpp on the packaged GGUF when ``llama_cpp`` is importable;
- ttft_p50_s_rag: time to first token in ``rag`` mode with k=4 (retrieval + prompt + prefill), baseline =
  the same retrieval and prompt through fp32 ``model.generate``;
- concurrent_errors, concurrent_throughput_ratio (answers/s of 8 concurrent ``ask`` calls / the same 8
  one after another), concurrent_p95_s (value: p95 latency of the 8 concurrent / the single-request p50),
  concurrent_engine_seconds (where the engine thread's time went, sequential and concurrent: prefill,
  decode forwards, token choice, batch edits, not in the engine); ``--only concurrent`` runs these alone;
- batch_decode_tokens_per_s: aggregate decode tokens/s of 8 rows decoding together / 1 row (issue 12);
- adapter_mix_overhead: time per decode step of 8 rows with 4 different adapters / 8 rows with one
  (``--only batching`` runs this and batch_decode_tokens_per_s alone);
- ab_run_speedup: an A/B run (all four arms) with 8 answers at once / the same run one answer at a time;
- ``--only ttft``: ttft_phases_rag (p50 time to first token with the app's defaults, and its phases:
  retrieval, evidence sentences, prompt tokens, engine prefill), grounded_constraint_ms (the constraint
  built with ``get_vocab()`` per request / once per tokenizer) and evidence_ms_per_question (sentences
  embedded in batches of 32 / 8), evidence_ms_same_question_again (a question's sentences ranked a
  second time, embedded again / kept) and evidence_ms_new_process (a new process: embedded / read from
  the collection's sentence vector store), old and new in the same run;
- http_*: the same generator behind ``ragtune serve``'s server on localhost (streamed chat completions
  read with the standard library), baseline = the generator called in-process, so each ratio is what
  the HTTP layer costs: http_ttft_p50_s (one-token answers), http_decode_tokens_per_s (streamed
  pieces per second after the first), http_concurrent_errors / http_concurrent_p95_s /
  http_concurrent_throughput_qps (8 concurrent streams, every other one with the adapter; baseline: the
  same 8 concurrently in-process), http_models_p50_ms (``GET /v1/models``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
DOCS = REPO / "corpora" / "corvida" / "docs"
QUESTIONS = REPO / "corpora" / "corvida" / "qa" / "test.jsonl"
LONG_PROMPT = [{"role": "user", "content": "Write a long, detailed story about an engineer who installs a heat pump "
                                           "in an old farmhouse in winter."}]


def line(metric: str, value, unit: str, goal: str | None = None, baseline=None, ragtune=None, **extra) -> dict:
    row = {"bench": "serve", "metric": metric, "value": None if value is None else round(float(value), 4),
           "baseline": baseline, "ragtune": ragtune, "unit": unit, "goal": goal, **extra}
    print(json.dumps(row), flush=True)
    return row


def p(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]


def random_adapter(home: Path, name: str, seed: int = 0) -> None:
    """An untrained LoRA (all-linear, r=16 like the default recipe) in the registry format: switch cost
    does not depend on the weights' values."""
    import torch
    from peft import LoraConfig, get_peft_model

    from tuning.adapters import adapter_dir, write_manifest
    from tuning.models import load_causal_lm, resolve_base_model, weights_hash

    base = resolve_base_model("smollm2-135m-instruct", home)
    torch.manual_seed(seed)
    model = get_peft_model(load_causal_lm(base, for_training=False),
                           LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    folder = adapter_dir(home, name)
    model.save_pretrained(folder, safe_serialization=True)
    write_manifest(folder, {"format": 1, "name": name, "task": "sft", "method": "lora", "quant": "none",
                            "base_model": {"id": base.id, "kind": base.kind, "sha256": weights_hash(base)},
                            "created": "bench", "metrics": {}})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer tokens and questions (same metrics)")
    parser.add_argument("--home", type=Path, default=None, help="workspace to use (default: a temp folder; the demo corpus is indexed into it)")
    parser.add_argument("--only", choices=("all", "http", "concurrent", "batching", "ttft"), default="all",
                        help="http: only the http_* figures (what the server adds), e.g. to compare two server versions; "
                             "concurrent: only the concurrent_* figures, with where the engine's time went; "
                             "batching: only batch_decode_tokens_per_s and adapter_mix_overhead; "
                             "ttft: only the ttft_phases_rag figures (the app's defaults; --home a `make demo` workspace)")
    parser.add_argument("--adapter", default=None, help="adapter for the switch and rag+ft figures (default: an untrained one made here)")
    args = parser.parse_args()
    new_tokens = 32 if args.quick else 64
    n_questions = 6 if args.quick else 20
    concurrent_tokens = 16 if args.quick else 32

    import torch

    from rag.collection import Workspace
    from serving.assistant import Assistant
    from serving.config import ServeConfig
    from serving.generation import GenerationParams, LocalGenerator
    from tuning.models import load_causal_lm, load_tokenizer, resolve_base_model

    tmp = tempfile.TemporaryDirectory(prefix="serve-bench-")
    home = args.home or Path(tmp.name)
    ws = Workspace(home)
    t0 = time.perf_counter()
    if "corvida" not in ws.names():
        ws.index("corvida", [DOCS])
    adapter = args.adapter
    if adapter is None:
        adapter = "bench-random"
        random_adapter(ws.home, adapter)
    print(f"# setup {time.perf_counter() - t0:.0f}s, torch threads {torch.get_num_threads()}, "
          f"load {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)

    base = resolve_base_model("smollm2-135m-instruct", ws.home)
    gen = LocalGenerator("smollm2-135m-instruct", ws.home, quantize="int8")
    questions = [json.loads(l)["question"] for l in QUESTIONS.read_text(encoding="utf-8").splitlines() if l.strip()]
    questions = questions[:: max(1, len(questions) // n_questions)][:n_questions]
    eight = [(questions[i % len(questions)], adapter if i % 2 else None) for i in range(8)]
    if args.only == "http":
        http_figures(gen, adapter, new_tokens, concurrent_tokens, eight)
        tmp.cleanup()
        return
    if args.only == "batching":
        batching_figures(gen, ws, adapter, new_tokens)
        tmp.cleanup()
        return
    if args.only == "ttft":
        ttft_figures(ws, gen, questions)
        tmp.cleanup()
        return
    if args.only == "concurrent":
        assistant = Assistant(ws, gen, ServeConfig(k=4, max_new_tokens=concurrent_tokens))
        assistant.warm_up()
        concurrent_figures(assistant, gen, eight, concurrent_tokens)
        tmp.cleanup()
        return
    tokenizer = load_tokenizer(base)
    plain = load_causal_lm(base, for_training=False).eval()

    # 1. decode speed: same prompt, same number of new tokens
    params = GenerationParams(max_new_tokens=new_tokens)
    "".join(gen.stream(LONG_PROMPT, params=GenerationParams(max_new_tokens=4)))  # warm-up
    stream = gen.stream(LONG_PROMPT, params=params)
    "".join(stream)
    n = stream.completion_tokens
    ragtune_tps = stream.decode_tokens_per_s
    ids = torch.tensor([gen.render(LONG_PROMPT)])

    def plain_generate(tokens: int) -> float:
        started = time.perf_counter()
        with torch.inference_mode():
            plain.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                           min_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        return time.perf_counter() - started

    plain_generate(2)  # warm-up
    first = min(plain_generate(1) for _ in range(2))
    total = plain_generate(n)
    baseline_tps = (n - 1) / max(total - first, 1e-9)
    line("decode_speedup", ragtune_tps / baseline_tps, "x", ">= 2", baseline=round(baseline_tps, 2),
         ragtune=round(ragtune_tps, 2), tokens=n)
    fp32 = LocalGenerator("smollm2-135m-instruct", ws.home, quantize="none")
    s = fp32.stream(LONG_PROMPT, params=GenerationParams(max_new_tokens=n))
    "".join(s)
    line("decode_tokens_per_s_fp32_loop", s.decode_tokens_per_s, "tokens/s", None, baseline=round(baseline_tps, 2),
         ragtune=round(s.decode_tokens_per_s or 0, 2), note="ragtune's loop without int8: what the loop alone gives")
    del fp32
    try:
        from llama_cpp import Llama

        from tuning.models import packaged_gguf

        llm = Llama(model_path=str(packaged_gguf()), n_ctx=1024, n_threads=os.cpu_count(), verbose=False)
        prompt = tokenizer.apply_chat_template(LONG_PROMPT, tokenize=False, add_generation_prompt=True)
        llm(prompt, max_tokens=2)
        started = time.perf_counter()
        out = llm(prompt, max_tokens=n, temperature=0.0)
        elapsed = time.perf_counter() - started
        line("llamacpp_tokens_per_s", out["usage"]["completion_tokens"] / elapsed, "tokens/s", None,
             baseline=round(baseline_tps, 2), ragtune=round(ragtune_tps, 2), note="includes prefill")
    except ImportError:
        line("llamacpp_tokens_per_s", None, "tokens/s", None, note="llama_cpp not importable; skipped")

    # 2. time to first token in rag mode, k=4
    config = ServeConfig(k=4, max_new_tokens=concurrent_tokens)
    assistant = Assistant(ws, gen, config)
    assistant.warm_up()
    ours, theirs, prompt_tokens = [], [], []
    from serving.prompts import build_messages

    col = ws.get("corvida")
    for q in questions:
        stream = assistant.stream(q, "rag", "corvida", k=4, max_new_tokens=1, log=False)
        "".join(stream)
        ours.append(stream.answer.timings["ttft_s"])
        prompt_tokens.append(stream.answer.timings.get("prompt_tokens") or 0)
        started = time.perf_counter()  # baseline: same retrieval and prompt layout, untrimmed chunks, fp32 generate
        hits = col.search(q, k=4)
        plan = build_messages(q, sources=hits, rag=True, count=lambda t: 0, truncate=lambda t, k: t, budget=10**9,
                              source_tokens=10**6, history_turns=0)
        with torch.inference_mode():
            pids = torch.tensor([gen.render(plan.messages)])
            plain.generate(input_ids=pids, attention_mask=torch.ones_like(pids), max_new_tokens=1, do_sample=False,
                           pad_token_id=tokenizer.pad_token_id)
        theirs.append(time.perf_counter() - started)
    line("ttft_p50_s_rag", statistics.median(ours), "s", "<= 1.0", baseline=round(statistics.median(theirs), 4),
         ragtune=round(statistics.median(ours), 4), ttft_p95_s=round(p(ours, 0.95), 4),
         prompt_tokens_p50=statistics.median(prompt_tokens), questions=len(questions))

    # 3. batching: 8 rows decoding together vs 1 row; 4 adapters mixed in the 8 vs one adapter
    batching_figures(gen, ws, adapter, new_tokens)

    # 4. eight concurrent asks (rag, and rag+ft for every other one) vs the same eight in sequence
    concurrent_figures(assistant, gen, eight, concurrent_tokens)

    # 5. an A/B run (four arms) with 8 answers at once vs one at a time. Each run must compute every answer:
    # the answer cache is keyed by the config's hash, so each gets a config with its own seed (greedy
    # decoding ignores the seed), and nothing stored in the workspace is touched
    from serving.ab.runner import ABConfig, run_ab

    ab_questions = 4 if args.quick else 16
    qfile = Path(tmp.name) / "ab-questions.jsonl"
    rows = [json.loads(l) for l in QUESTIONS.read_text(encoding="utf-8").splitlines() if l.strip()][:ab_questions]
    qfile.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    seconds = {}
    fresh = time.time_ns() % 10**9
    for concurrency in (1, 8):
        runner = Assistant(ws, gen, ServeConfig(k=4, max_new_tokens=concurrent_tokens, seed=fresh + concurrency))
        config = ABConfig(questions=str(qfile), collection="corvida", adapter=adapter, name=f"bench-c{concurrency}-{fresh}",
                          max_new_tokens=concurrent_tokens, concurrency=concurrency)
        summary = run_ab(runner, config)
        assert summary["reused"] == 0, summary
        seconds[concurrency] = summary["seconds"]
    line("ab_run_speedup", seconds[1] / seconds[8], "x", ">= 2.5", baseline=seconds[1], ragtune=seconds[8],
         answers=ab_questions * 4, baseline_is="the same run with concurrency=1 (one answer at a time)")
    http_figures(gen, adapter, new_tokens, concurrent_tokens, eight)
    tmp.cleanup()


def batching_figures(gen, ws, adapter: str, new_tokens: int) -> None:
    """8 rows decoding together vs 1 row (batch_decode_tokens_per_s), and 8 rows with 4 different adapters vs
    8 rows with one (adapter_mix_overhead)."""
    from serving.generation import GenerationParams

    adapters = [adapter] + [f"bench-random-{i}" for i in range(1, 4)]
    for name in adapters[1:]:
        if not ws.layout.adapter_dir(name).exists():
            random_adapter(ws.home, name, seed=int(name[-1]))
    for name in adapters:
        gen.load_adapter(name)

    def decode_together(rows: list) -> tuple[float, float]:
        """(aggregate decode tokens/s, seconds per decode step) of ``rows`` (adapter per row) started at once,
        counted from the moment every row has its first token (prefill excluded) to the last row's end."""
        streams = [gen.stream(LONG_PROMPT, adapter=a, params=GenerationParams(max_new_tokens=new_tokens, stop=()))
                   for a in rows]
        marks: list = [None] * len(streams)

        def read(i):
            pieces = []
            for piece in streams[i]:
                pieces.append((time.perf_counter(), streams[i].completion_tokens))
            marks[i] = pieces

        threads = [threading.Thread(target=read, args=(i,)) for i in range(len(streams))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        start = max(m[0][0] for m in marks)  # every row is decoding from here on (or already done)
        end = max(m[-1][0] for m in marks)

        def after_start(m):  # tokens a row produced after ``start``
            return m[-1][1] - max([k for t, k in m if t <= start], default=0)

        tokens = sum(after_start(m) for m in marks)
        steps = max(after_start(m) for m in marks)
        return tokens / max(end - start, 1e-9), (end - start) / max(steps, 1)

    decode_together([None])  # warm-up
    one_tps, _ = max(decode_together([None]) for _ in range(2))
    eight_tps, _ = max(decode_together([None] * 8) for _ in range(2))
    line("batch_decode_tokens_per_s", eight_tps / one_tps, "x", ">= 4", baseline=round(one_tps, 2),
         ragtune=round(eight_tps, 2), rows=8, baseline_is="1 row")
    same = min(decode_together([adapter] * 8)[1] for _ in range(2))
    mixed = min(decode_together([adapters[i % 4] for i in range(8)])[1] for _ in range(2))
    line("adapter_mix_overhead", mixed / same, "x", "<= 1.3", baseline=round(same * 1000, 2), ragtune=round(mixed * 1000, 2),
         unit_detail="ms per decode step", baseline_is="8 rows, one adapter")


def ttft_figures(ws, gen, questions: list[str]) -> None:
    """Where a rag answer's time to first token goes with the app's defaults (grounded decoding, evidence
    sentences): p50 of each phase over ``questions``; then four parts of it, old way (baseline) against
    ragtune's in the same run: the grounded constraint built with ``get_vocab()`` each request / read once,
    the evidence sentences embedded in batches of 32 (sentence-transformers' default) / 8, a question's
    sentences ranked a second time, embedded again / kept, and in a new process, embedded / read from disk."""
    import functools

    from rag.chunking import split_sentences
    from serving import grounding
    from serving.assistant import Assistant
    from serving.config import ServeConfig
    from serving.evidence import SentenceVectors, rank_sentences, stored_vectors

    col = ws.get("corvida")
    hits = [col.search(q, k=4) for q in questions]
    # how many of these questions' sentences an earlier process (tune-ranker over the training questions, an
    # earlier answer) had stored on the collection's disk already: the first answers below read those
    store = stored_vectors(col)
    sentences = {h.text[a:b] for found in hits for h in found for a, b in split_sentences(h.text)}
    stored_share = round(len(store.get(sorted(sentences))) / max(1, len(sentences)), 3)
    assistant = Assistant(ws, gen, ServeConfig())
    assistant.warm_up()
    busy = gen.engine.busy_seconds()
    timings = [assistant.answer(q, "rag", "corvida", None, log=False).timings for q in questions]
    after = gen.engine.busy_seconds()
    phases = {k: round(statistics.median(t.get(k) or 0.0 for t in timings), 4)
              for k in ("retrieval_ms", "evidence_ms", "ttft_s", "prompt_tokens")}
    line("ttft_phases_rag", phases["ttft_s"], "s (p50)", "<= 1.0 (ttft_p50_s_rag)", questions=len(questions), **phases,
         stored_share=stored_share,
         engine_s={k: round(after[k] - busy[k], 3) for k in ("prefill", "decode_forward", "choose")},
         prefill_tokens=after["prefill_tokens"] - busy["prefill_tokens"])

    tokenizer = gen.tokenizer
    sources = [h.text for h in hits[0]]

    def build(cached: bool) -> float:
        started = time.perf_counter()
        if not cached:
            grounding._vocabs.clear()
        grounding.GroundedConstraint(tokenizer, sources, {tokenizer.eos_token_id}, refusal="Not in the sources.",
                                     citations=True)
        return time.perf_counter() - started

    build(True)
    times = {False: [], True: []}
    for _ in range(10):
        for cached in (False, True):
            times[cached].append(build(cached))
    old, new = statistics.median(times[False]) * 1000, statistics.median(times[True]) * 1000
    line("grounded_constraint_ms", old / new, "x (get_vocab per request / once)", None, round(old, 2), round(new, 2))

    def ms_per_question(old_embed, new_embed) -> tuple[float, float]:
        """Best of two interleaved passes each (a loaded machine slows both alike), ms per question."""
        spent: dict[int, list[float]] = {0: [], 1: []}
        for _ in range(2):
            for which, embed in enumerate((old_embed, new_embed)):
                started = time.perf_counter()
                for q, h in zip(questions, hits):
                    rank_sentences(q, h, embed, skip_questions=True)
                spent[which].append((time.perf_counter() - started) / len(questions) * 1000)
        return min(spent[0]), min(spent[1])

    batch_8 = functools.partial(col.embedder.embed_batch, batch_size=8)
    old, new = ms_per_question(functools.partial(col.embedder.embed_batch, batch_size=32), batch_8)
    line("evidence_ms_per_question", old / new, "x (batches of 32 / 8)", None, round(old, 1), round(new, 1))

    # the same question's sentences ranked a second time (an A/B run's rag+ft arm after its rag arm, the
    # arena's second answer): embedded again / read from the process's SentenceVectors
    kept = SentenceVectors(col.embedder)
    for q, h in zip(questions, hits):
        rank_sentences(q, h, kept, skip_questions=True)
    old, new = ms_per_question(batch_8, kept)
    line("evidence_ms_same_question_again", old / new, "x (embedded again / kept vectors)", None, round(old, 1), round(new, 1))

    # a new process (the app after a restart, `ragtune ask`, an A/B run) keeps nothing in memory: the
    # sentences embedded / read from the collection's store on disk (all stored now: answered above)
    old, new = ms_per_question(batch_8, lambda texts: SentenceVectors(col.embedder)(texts, store=store, transient=texts[:1]))
    line("evidence_ms_new_process", old / new, "x (embedded / read from the collection's store)", None, round(old, 1),
         round(new, 1), stored=store.count())


def concurrent_figures(assistant, gen, eight: list, concurrent_tokens: int) -> None:
    """Eight concurrent asks (rag, and rag+ft for every other one) vs the same eight in sequence, and where
    the engine thread's time went in each (``concurrent_engine_seconds``: prefill, decode forwards, token
    choice, batch edits, and what was left: the engine idle or waiting, while the askers retrieve and build
    prompts)."""

    def ask(q, a):
        started = time.perf_counter()
        assistant.answer(q, "rag+ft" if a else "rag", "corvida", a, max_new_tokens=concurrent_tokens, log=False)
        return time.perf_counter() - started

    engine = gen.engine
    before = engine.busy_seconds()
    started = time.perf_counter()
    sequential = [ask(q, a) for q, a in eight]
    sequential_s = time.perf_counter() - started
    after_sequential = engine.busy_seconds()
    latencies, errors = [], []
    lock = threading.Lock()

    def worker(q, a):
        try:
            value = ask(q, a)
            with lock:
                latencies.append(value)
        except Exception as exc:  # noqa: BLE001 - counted as an error
            with lock:
                errors.append(repr(exc))

    started = time.perf_counter()
    threads = [threading.Thread(target=worker, args=case) for case in eight]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    concurrent_s = time.perf_counter() - started
    after_concurrent = engine.busy_seconds()

    def phases(a: dict, b: dict, wall: float) -> dict:
        spent = {k: round(b[k] - a[k], 2) for k in a}
        spent["not_in_engine"] = round(wall - sum(v for k, v in spent.items() if k != "prefill_tokens"), 2)
        return spent

    line("concurrent_engine_seconds", concurrent_s, "s", None, baseline=phases(before, after_sequential, sequential_s),
         ragtune=phases(after_sequential, after_concurrent, concurrent_s), sequential_s=round(sequential_s, 2),
         note="engine-thread seconds by phase; not_in_engine = wall time the engine thread was not busy")
    line("concurrent_errors", len(errors), "count", "== 0", errors=errors[:3])
    single_p50 = statistics.median(sequential)
    line("concurrent_p95_s", p(latencies, 0.95) / single_p50 if latencies else None, "x", "<= 2.5",
         baseline=round(single_p50, 3), ragtune=round(p(latencies, 0.95), 3) if latencies else None,
         baseline_is="p50 latency of the same questions asked one at a time")
    line("concurrent_throughput_ratio", (len(latencies) / concurrent_s) / (len(eight) / sequential_s), "x", ">= 3.0",
         baseline=round(len(eight) / sequential_s, 4), ragtune=round(len(latencies) / concurrent_s, 4), unit_detail="answers/s")


def http_figures(gen, adapter: str, new_tokens: int, concurrent_tokens: int, eight: list) -> None:
    """Section 5: the generator behind the HTTP server vs called in-process (see the module docstring)."""
    from serving.generation import GenerationParams
    from serving.openai_server import serve_in_thread

    server, url = serve_in_thread(gen)

    def local(messages, tokens, a=None):
        started = time.perf_counter()
        first, pieces = None, 0
        for piece in gen.stream(messages, adapter=a, params=GenerationParams(max_new_tokens=tokens)):
            if piece:
                first = first if first is not None else time.perf_counter() - started
                pieces += 1
        return first, time.perf_counter() - started, pieces

    def remote(messages, tokens, a=None):
        body = json.dumps({"model": a or gen.base_id, "messages": messages, "max_tokens": tokens, "stream": True}).encode()
        started = time.perf_counter()
        first, pieces = None, 0
        request = urllib.request.Request(url + "/chat/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=600) as response:
            for raw in response:
                raw = raw.strip()
                if not raw.startswith(b"data:") or raw[5:].strip() == b"[DONE]":
                    continue
                event = json.loads(raw[5:])
                if "error" in event:
                    raise RuntimeError(event["error"]["message"])
                for choice in event.get("choices") or []:
                    if (choice.get("delta") or {}).get("content"):
                        first = first if first is not None else time.perf_counter() - started
                        pieces += 1
        return first, time.perf_counter() - started, pieces

    def rate(first, total, pieces):
        return (pieces - 1) / (total - first) if pieces > 1 and total > first else None

    try:
        remote(LONG_PROMPT, 2)  # warm-up (first connection, thread pool)
        theirs, ours = [], []
        for _ in range(5):  # alternated, so a change in the machine's load hits both alike
            theirs.append(local(LONG_PROMPT, 1)[0])
            ours.append(remote(LONG_PROMPT, 1)[0])
        line("http_ttft_p50_s", statistics.median(ours), "s", None, baseline=round(statistics.median(theirs), 4),
             ragtune=round(statistics.median(ours), 4), baseline_is="the generator in-process")
        rates = [(rate(*local(LONG_PROMPT, new_tokens)), rate(*remote(LONG_PROMPT, new_tokens))) for _ in range(2)]
        base_rate = max((r for r, _ in rates if r), default=None)  # best of two: the least disturbed run
        http_rate = max((r for _, r in rates if r), default=None)
        line("http_decode_tokens_per_s", http_rate, "pieces/s", None, baseline=base_rate and round(base_rate, 2),
             ragtune=http_rate and round(http_rate, 2), baseline_is="the generator in-process")

        def run_eight(call, cases=eight):
            latencies, errors, lock = [], [], threading.Lock()

            def worker(q, a):
                try:
                    _, total, _ = call([{"role": "user", "content": q}], concurrent_tokens, a)
                    with lock:
                        latencies.append(total)
                except Exception as exc:  # noqa: BLE001 - counted as an error
                    with lock:
                        errors.append(repr(exc))

            started = time.perf_counter()
            threads = [threading.Thread(target=worker, args=case) for case in cases]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            return latencies, errors, time.perf_counter() - started

        base_lat, _, base_s = run_eight(local)
        http_lat, http_errors, http_s = run_eight(remote)
        line("http_concurrent_errors", len(http_errors), "count", "== 0", errors=http_errors[:3])
        line("http_concurrent_p95_s", p(http_lat, 0.95) if http_lat else None, "s", None,
             baseline=round(p(base_lat, 0.95), 3), ragtune=round(p(http_lat, 0.95), 3) if http_lat else None,
             baseline_is="the same 8 streams concurrently in-process")
        line("http_concurrent_throughput_qps", len(http_lat) / http_s, "answers/s", None,
             baseline=round(len(base_lat) / base_s, 4), ragtune=round(len(http_lat) / http_s, 4))
        sixteen_lat, sixteen_errors, sixteen_s = run_eight(remote, eight + eight)
        line("concurrent_errors_16", len(sixteen_errors), "count", "== 0", errors=sixteen_errors[:3],
             answers_per_s=round(len(sixteen_lat) / sixteen_s, 4), clients=16)
        lists = []
        for _ in range(20):
            started = time.perf_counter()
            urllib.request.urlopen(url + "/models", timeout=60).read()
            lists.append((time.perf_counter() - started) * 1000)
        direct = []
        for _ in range(20):
            started = time.perf_counter()
            gen.available_adapters()
            direct.append((time.perf_counter() - started) * 1000)
        line("http_models_p50_ms", statistics.median(lists), "ms", None, baseline=round(statistics.median(direct), 3),
             ragtune=round(statistics.median(lists), 3), baseline_is="available_adapters() in-process")
    finally:
        server.shutdown()
        server.server_close()


if __name__ == "__main__":
    main()
