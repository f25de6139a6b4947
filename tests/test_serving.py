"""Serving: generation with adapters mixed per row, the assistant's four modes, storage, the OpenAI server
and client, concurrency and the CLI, on the real packaged model (tiny max_new_tokens)."""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from serving.config import ServingError

WARRANTY_Q = "How long is the warranty on HX heat pumps registered after July 2025?"
FLOW_Q = "What is the minimum water flow for the HX-14 according to the service bulletin?"
TRAVEL_Q = "Under what trip distance must staff travel by rail?"
ERROR_Q = "What does error code E07 mean on an HX heat pump?"
CHAT = [{"role": "user", "content": "Name a colour."}]


# --- units (no model) -------------------------------------------------------------------------

def test_stop_string_buffer_holds_back_partial_stops():
    from serving.generation import StopStringBuffer

    buf = StopStringBuffer(("\nQuestion:",))
    out = [buf.feed("Seven years."), buf.feed("Seven years.\nQues"), buf.feed("Seven years.\nQuestion: and")]
    assert "".join(out) == "Seven years." and buf.stopped
    buf = StopStringBuffer(("\nQuestion:",))
    assert buf.feed("A\nQu") == "A" and buf.flush("A\nQu") == "\nQu"  # not a stop after all: released at the end


def test_prompt_budget_rule_and_citations():
    from serving.prompts import Turn, build_messages, cited_numbers, is_follow_up, retrieval_query

    count = lambda text: len(text.split())  # noqa: E731  (a word counts as a token here)
    truncate = lambda text, n: " ".join(text.split()[:n])  # noqa: E731
    hits = [SimpleNamespace(doc=f"d{i}.md", text="word " * 50, metadata={}) for i in range(4)]
    history = [Turn(f"question {i}", "answer " * 5) for i in range(5)]
    plan = build_messages("How long?", sources=hits, history=history, rag=True, count=count, truncate=truncate,
                          budget=200, source_tokens=40, history_turns=3)
    assert plan.sources_used == 3 and "sources 4-4 left out" in plan.notes[-2]  # best sources first, then cut
    assert plan.turns_used == 1  # newest turn kept, older ones dropped by the budget
    assert plan.messages[-1]["content"].startswith("Sources:\n[1] (d0.md)") and plan.messages[-1]["content"].endswith("Question: How long?")
    assert plan.messages[1]["content"] == "question 4"
    with pytest.raises(ValueError, match="prompt budget"):
        build_messages("long " * 300, rag=False, count=count, truncate=truncate, budget=100, source_tokens=40, history_turns=2)
    assert cited_numbers("Seven years [2], see also [1, 3] and [9].", 3) == [2, 1, 3]
    assert is_follow_up("and how long does that take?") and not is_follow_up("How long is the HX-9 warranty?")
    assert retrieval_query("and how long does that take?", [Turn("How do I register an HX unit?", "Online.")]) == \
        "How do I register an HX unit? and how long does that take?"


def test_serving_migrations_feedback_and_runs_on_memory():
    from serving.history import MIGRATIONS, ChatStore

    store = ChatStore(":memory:")
    tables = {r[0] for r in store.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"chats", "messages", "feedback", "tuning_runs"} <= tables  # its own namespace only (core.db)
    assert store.conn.execute("SELECT COUNT(*) FROM _migrations WHERE namespace = 'serving'").fetchone()[0] == len(MIGRATIONS)
    answer = SimpleNamespace(mode="rag", collection="c", collection_version=3, adapter=None, base_model="b", text="Seven years [1].",
                             retrieval_query="q", sources=[], cited=[1], timings={"total_s": 1.5}, refused=False)
    chat = store.new_chat("warranty")
    _, answer_id = store.log_exchange(chat, "How long?", answer)
    store.set_feedback(answer_id, 1)
    store.set_feedback(answer_id, -1)  # a second vote replaces the first
    assert store.messages(chat)[1]["vote"] == -1 and store.messages(chat)[1]["collection_version"] == 3
    assert store.feedback_summary() == [{"mode": "rag", "adapter": "", "up": 0, "down": 1}]
    with pytest.raises(ValueError, match="no answer"):
        store.set_feedback(answer_id - 1, 1)  # the question, not an answer
    run = store.add_run("demo", "c.yaml", [], 123, "out.txt")
    store.finish_run(run, "done", 0)
    assert store.run(run)["status"] == "done"
    with pytest.raises(sqlite3.IntegrityError):
        store.conn.execute("INSERT INTO feedback (message_id, vote, created_at) VALUES (?, 5, 0)", (answer_id,))


# --- generation -------------------------------------------------------------------------------

def test_generator_streams_stops_and_mixes_adapters(serving_generator):
    from serving.generation import GenerationParams

    gen = serving_generator
    params = GenerationParams(max_new_tokens=6)
    stream = gen.stream(CHAT, params=params)
    pieces = list(stream)
    base = "".join(pieces)
    assert pieces and base and stream.completion_tokens <= 6 and stream.finish_reason in ("stop", "length")
    assert stream.first_token_s is not None and stream.prompt_tokens > 5
    alpha = gen.stream(CHAT, adapter="alpha", params=params).text()
    assert alpha != base  # the adapter is applied
    assert gen.stream(CHAT, params=params).text() == base  # and switched off again: the base is untouched
    assert gen.stream(CHAT, adapter="alpha", params=params).text() == alpha
    gen.load_adapter("beta")
    assert sorted(gen.loaded_adapters()) == ["alpha", "beta"]
    # stop strings are cut from the text
    first_word = base.split()[0] if base.split() else base
    stopped = gen.stream(CHAT, params=GenerationParams(max_new_tokens=6, stop=(first_word,))).text()
    assert first_word not in stopped and stopped == base[: base.index(first_word)]


def test_generator_refuses_bad_adapters(serving_generator):
    with pytest.raises(ServingError, match="no adapter named 'nope'"):
        serving_generator.stream(CHAT, adapter="nope")
    with pytest.raises(ServingError, match="was trained on HuggingFaceTB/SmolLM2-360M-Instruct.*retrain"):
        serving_generator.stream(CHAT, adapter="foreign")
    usable = {a["name"]: a["usable"] for a in serving_generator.available_adapters()}
    assert usable == {"alpha": True, "beta": True, "foreign": False}


# --- the assistant ----------------------------------------------------------------------------

def test_plain_answer_is_found_in_its_cited_source_and_its_quote_checked():
    """A RAFT adapter answers "{claim} [n]" then a free-text quote: the claim is located in the cited source
    (a span in document offsets, for the chat to highlight) and a quote that is not the supporting text is flagged."""
    from serving.assistant import Answer, AnswerStream, Source
    from serving.prompts import claim_and_quote
    from tuning.raft import find_answer

    doc = ("Quiet mode\n\nWith firmware 3.4 you can schedule quiet mode for one window each night.\n"
           "Switching it on lowers the\n  sound power by 4 dB(A) at full load.")
    start = doc.index("With")
    sources = [Source(1, "other.md", 1, "The HX-14 weighs 164 kg.", 0, 24, 1.0, 0.5),
               Source(2, "quiet.md", 2, doc[start:], start, len(doc), 0.9, 0.4)]
    assert claim_and_quote('4 dB(a) [2]\n\nEvidence [2]: "With firmware 3.4 you can"') == ("4 dB(a)", 2, "With firmware 3.4 you can")
    assert claim_and_quote("It weighs 164 kg [1, 2].") == ("It weighs 164 kg", None, "")
    assert find_answer(sources[0].text, "14 kg") is None and find_answer("4 dB(A)", "dB(A)") == (2, 7)  # whole words only

    def checked(text, cited):
        answer = Answer("How much quieter?", "rag+ft", text, sources=sources, cited=cited)
        AnswerStream._check_claim(answer)
        return answer

    wrong_quote = checked('4 dB(a) [2]\n\nEvidence [2]: "With firmware 3.4 you can schedule quiet mode"', [2])
    [span] = wrong_quote.spans
    assert doc[span["start"]:span["end"]] == "4 dB(A)" and span["n"] == 2 and span["doc"] == "quiet.md"
    assert wrong_quote.notes == ["the quote after the answer does not hold it; the answer's words are highlighted in source [2]"]
    invented = checked('4 dB(A) [2]\n\nEvidence [2]: "Quiet mode halves the noise"', [2])
    assert invented.notes == ["the quote after the answer is not in source [2]"] and len(invented.spans) == 1
    # a quote across the source's line break, and the answer found in the second cited source
    good = checked('lowers the sound power by 4 dB(A) [1][2]\n\nEvidence [2]: "Switching it on lowers the sound power by 4 dB(A)"', [1, 2])
    assert good.notes == [] and doc[good.spans[0]["start"]:good.spans[0]["end"]] == "lowers the\n  sound power by 4 dB(A)"
    assert checked("About 3 dB [2]", [2]).spans == []  # not in the source: no span, no note
    miscited = checked("4 dB(A) [1]", [1])  # a right answer citing the wrong source: the span shows where it stands
    assert [(s["n"], s["text"]) for s in miscited.spans] == [(2, "4 dB(A)")]
    assert miscited.notes == ["the answer's words are in source [2], not in the cited [1]"]


def test_rag_answer_has_sources_with_spans_timings_and_is_logged(serving_assistant):
    a = serving_assistant
    answer = a.answer(WARRANTY_Q, "rag", "corvida")
    assert answer.text and not answer.refused and answer.collection_version >= 1
    assert len(answer.sources) == 4 and answer.sources[0].n == 1
    col = a.workspace.get("corvida")
    assert any("warranty" in s.doc for s in answer.sources)
    for s in answer.sources:  # spans point into the stored document text
        assert col.document_text(s.doc)[s.start:s.end].split()[:5] == s.text.split()[:5]
    t = answer.timings
    assert t["retrieval_ms"] > 0 and t["ttft_s"] > 0 and t["total_s"] >= t["ttft_s"] and t["prompt_tokens"] > 200
    stored = a.store.messages(answer.chat_id)
    assert stored[1]["id"] == answer.message_id and stored[1]["mode"] == "rag" and stored[1]["collection"] == "corvida"
    assert stored[1]["collection_version"] == answer.collection_version and len(stored[1]["sources"]) == 4


def test_unrelated_question_gets_dont_know(serving_assistant):
    answer = serving_assistant.answer("Who painted the Mona Lisa in Florence?", "rag", "corvida")
    assert answer.refused and answer.text.startswith("I don't know") and "similarity" in answer.text


def test_ft_modes_and_follow_up(serving_assistant):
    a = serving_assistant
    # the random test adapter moves the logits a little: for one prompt its greedy text can equal the base's
    # on a given CPU ("Name a colour." did on an AVX-512 machine), so it must differ on one of a few
    for question in ("Name a colour.", "Name three colours.", "What is a heat pump?", "Write a haiku about snow."):
        ft = a.answer(question, "ft", adapter="alpha")
        base = a.answer(question, "base")
        if ft.text != base.text:
            break
    assert ft.adapter == "alpha" and not ft.sources and ft.text != base.text
    both = a.answer(FLOW_Q, "rag+ft", "corvida", "beta")
    assert both.adapter == "beta" and any("minimum-flow" in s.doc for s in both.sources)
    follow = a.answer("and how long does that take?", "rag", "corvida",
                      history=[{"role": "user", "content": WARRANTY_Q}, {"role": "assistant", "content": "Seven years."}])
    assert follow.retrieval_query.startswith(WARRANTY_Q) and any("warranty" in s.doc for s in follow.sources)


@pytest.mark.parametrize("question, mode, collection, adapter, message", [
    ("  ", "rag", "corvida", None, "empty question"),
    ("x" * 2500, "rag", "corvida", None, "over the limit of 2000"),
    ("q", "magic", None, None, "unknown mode 'magic'"),
    ("q", "rag", None, None, "needs a collection.*corvida"),
    ("q", "rag", "nope", None, "no collection named 'nope'"),
    ("q", "ft", None, None, "needs an adapter; pick one of: alpha, beta"),
    ("q", "rag+ft", "corvida", "foreign", "trained on HuggingFaceTB"),
    ("q", "rag", "corvida", "alpha", "uses no adapter; use mode rag\\+ft"),
])
def test_bad_requests_get_one_line_messages(serving_assistant, question, mode, collection, adapter, message):
    with pytest.raises(ServingError, match=message) as info:
        serving_assistant.stream(question, mode, collection, adapter)
    assert "\n" not in str(info.value)


def test_concurrent_sessions_with_different_adapters_get_their_own_answers(serving_assistant):
    a = serving_assistant
    cases = [(WARRANTY_Q, "alpha"), (FLOW_Q, "beta"), (TRAVEL_Q, None), (ERROR_Q, "alpha")]
    expected = {}
    for q, adapter in cases:  # answered one at a time first
        ans = a.answer(q, "rag+ft" if adapter else "rag", "corvida", adapter, log=False)
        expected[q] = (ans.text, [s.chunk_id for s in ans.sources])
    results, errors = {}, []
    barrier = threading.Barrier(len(cases))

    def ask(q, adapter):
        try:
            barrier.wait()
            ans = a.answer(q, "rag+ft" if adapter else "rag", "corvida", adapter, log=False)
            results[q] = (ans.text, [s.chunk_id for s in ans.sources])
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=ask, args=case) for case in cases]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors
    assert results == expected  # same sources and the same greedy text as alone: no adapter or cache leaked
    assert len({tuple(v[1]) for v in results.values()}) == 4


# --- OpenAI-compatible server and client --------------------------------------------------------

def test_openai_server_and_client_backend(serving_generator, serving_assistant):
    from serving.assistant import Assistant
    from serving.generation import GenerationParams, OpenAIGenerator
    from serving.openai_server import serve_in_thread

    server, url = serve_in_thread(serving_generator)
    try:
        client = OpenAIGenerator(url)
        assert client.base_id == serving_generator.base_id
        assert sorted(a["name"] for a in client.available_adapters()) == ["alpha", "beta"]
        params = GenerationParams(max_new_tokens=6)
        for adapter in (None, "alpha"):
            remote = client.stream(CHAT, adapter=adapter, params=params)
            text = remote.text()
            assert text == serving_generator.stream(CHAT, adapter=adapter, params=params).text()
            assert remote.finish_reason in ("stop", "length") and remote.completion_tokens >= 1
        assert client.stream_prompt("The capital of France is", params=params).text()
        with pytest.raises(ServingError, match="model 'foreign'.*trained on"):
            client.stream(CHAT, adapter="foreign")
        remote_assistant = Assistant(serving_assistant.workspace, client, serving_assistant.config)
        answer = remote_assistant.answer(FLOW_Q, "rag+ft", "corvida", "beta")
        assert answer.text and any("minimum-flow" in s.doc for s in answer.sources)
        # non-streamed responses and errors are OpenAI-shaped
        import urllib.request

        body = json.dumps({"model": "alpha", "messages": CHAT, "max_tokens": 3}).encode()
        reply = json.loads(urllib.request.urlopen(urllib.request.Request(url + "/chat/completions", body)).read())
        assert reply["object"] == "chat.completion" and reply["usage"]["completion_tokens"] <= 3
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(urllib.request.Request(url + "/chat/completions", b'{"messages": []}'))
        assert info.value.code == 400 and "messages" in json.loads(info.value.read())["error"]["message"]
        # vLLM's runtime adapter endpoints: load now / free the weights; only registry adapters, by name
        from tuning.adapters import adapter_dir

        def post(path, body):
            try:
                with urllib.request.urlopen(urllib.request.Request(url + path, json.dumps(body).encode())) as r:
                    return r.status, r.read().decode()
            except urllib.error.HTTPError as exc:
                return exc.code, json.loads(exc.read())["error"]["message"]

        beta = serving_generator.stream(CHAT, adapter="beta", params=params).text()
        assert post("/unload_lora_adapter", {"lora_name": "beta"}) == (200, "Success: LoRA adapter 'beta' removed successfully.")
        assert "beta" not in serving_generator.loaded_adapters()
        assert post("/unload_lora_adapter", {"lora_name": "beta"}) == (404, "adapter 'beta' is not loaded (loaded: alpha)")
        folder = str(adapter_dir(Path(serving_generator.home), "beta"))
        assert post("/load_lora_adapter", {"lora_name": "beta", "lora_path": folder}) == (
            200, "Success: LoRA adapter 'beta' added successfully.")
        assert "beta" in serving_generator.loaded_adapters()
        assert serving_generator.stream(CHAT, adapter="beta", params=params).text() == beta  # the same weights again
        assert post("/load_lora_adapter", {"lora_name": "beta"})[0] == 200  # loaded already: nothing to do
        for elsewhere in (str(Path(folder).parent / "alpha"), folder + "/../alpha", "/etc", "a\x00b", "~nobody-here/x"):
            status, message = post("/load_lora_adapter", {"lora_name": "beta", "lora_path": elsewhere})
            assert status == 400 and "lora_path must be left out or be this adapter's own folder" in message, elsewhere
            assert str(serving_generator.home) not in message
        for body, code, words in [({"lora_name": "../alpha"}, 400, "invalid model"), ({"lora_name": "nope"}, 404, "does not exist"),
                                  ({"lora_name": "foreign"}, 404, "trained on"), ({"lora_name": "base"}, 400, "base model"),
                                  ({"lora_name": "beta", "extra": 1}, 400, "extra")]:
            status, message = post("/load_lora_adapter", body)
            assert status == code and words in message, (body, status, message)
        assert post("/unload_lora_adapter", {"lora_name": "../beta"})[0] == 400
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(ServingError, match="cannot reach the model server"):
        OpenAIGenerator(url)


# --- CLI ----------------------------------------------------------------------------------------

def test_cli_ask_json_and_errors(serving_home, monkeypatch, capsys):
    from serving.cli import main

    monkeypatch.setenv("RAGTUNE_HOME", str(serving_home))
    with pytest.raises(SystemExit) as info:
        main(["ask", ERROR_Q, "--collection", "corvida", "--max-new-tokens", "4", "--json", "--set", "k=2"])
    out = capsys.readouterr().out
    assert info.value.code == 0
    data = json.loads(out)
    # the defaults answer from the best sentence of the k=2 chunks: one source, one grounded extract
    assert data["mode"] == "rag" and len(data["sources"]) == 1 and "ttft_s" in data["timings"]
    with pytest.raises(SystemExit) as info:
        main(["ask", " ", "--collection", "corvida"])
    err = capsys.readouterr().err
    assert info.value.code == 1 and err.strip() == "error: empty question: type a question"
    with pytest.raises(SystemExit) as info:
        main(["ask", "q", "--mode", "ft", "--set", "k=2"])
    err = capsys.readouterr().err
    assert info.value.code == 1 and "needs an adapter" in err and "Traceback" not in err
