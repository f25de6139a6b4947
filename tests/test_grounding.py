"""Issue 11 on the real packaged SmolLM2 and a real collection: grounded decoding, context-aware
decoding, evidence first and abstention (session fixtures from conftest: serving_home, serving_generator)."""

from __future__ import annotations

import pytest

from serving.config import ConfigError, ServeConfig
from serving.generation import GenerationParams

QUESTIONS = [
    "How long is the warranty on an HX heat pump bought in 2025?",
    "What does error code E07 mean?",
    "What minimum flow rate does the HX-14 need?",
    "What is the daily allowance for meals on business travel?",
]


def make_assistant(serving_home, serving_generator, **options):
    from rag.collection import Workspace
    from serving.assistant import Assistant

    # every issue-11 option off unless a test sets it (the defaults turn some on): each test says what it tests
    off = {"abstain_threshold": 0.0, "grounded": False, "grounded_spans": 0, "evidence_sentences": 0}
    return Assistant(Workspace(serving_home), serving_generator, ServeConfig(**{"source_tokens": 96, **off, **options}))


def flat(text: str) -> str:
    return " ".join(text.split())


def test_grounded_spans_are_substrings_of_their_cited_sources(serving_home, serving_generator):
    assistant = make_assistant(serving_home, serving_generator, grounded=True, max_new_tokens=32)
    col = assistant.workspace.get("corvida")
    spans_seen = 0
    for question in QUESTIONS:
        stream = assistant.stream(question, "rag", "corvida", log=False)
        pieces = list(stream)
        answer = stream.answer
        assert "".join(pieces).strip() == answer.text  # streaming works, citations included
        assert answer.decoding["grounded"] is True
        by_n = {s.n: s for s in answer.sources}
        for span in answer.spans:
            source = by_n[span["n"]]
            assert span["text"] in flat(source.text)  # copied from the source it is attributed to
            document = col.document_text(span["doc"])
            assert flat(document[span["start"]:span["end"]]) == span["text"]  # exact offsets in the document
            assert source.start <= span["start"] < span["end"] <= source.end
            spans_seen += 1
        # citations come from the spans, in order of first use, and are appended as [n] markers
        expected = list(dict.fromkeys(s["n"] for s in answer.spans))
        assert answer.cited == expected
        if expected:
            assert answer.text.endswith("".join(f"[{n}]" for n in expected))
        # everything but connecting words, punctuation and the markers is inside a copied span
        rest = answer.text
        for span in sorted(answer.spans, key=lambda s: -len(s["text"])):
            rest = rest.replace(span["text"], " ")
        from serving.grounding import FREE_WORDS

        leftovers = [w for w in rest.replace("[", " ").replace("]", " ").split() if w.strip(".,;-'\"%")]
        assert all(w.strip(".,;-'\"%").lower() in FREE_WORDS or w.strip(".,;-'\"%").isdigit() for w in leftovers), leftovers
    assert spans_seen >= len(QUESTIONS)


def test_citation_marker_puts_exactly_one_space_before_the_citations():
    """The stream and Answer.text both end with this suffix: a copied span that ends with whitespace must not
    get a second space ("more than  [1]" streamed while the text said "more than [1]")."""
    from serving.assistant import citation_marker

    assert citation_marker("more than ", [1, 4]) == "[1][4]"
    assert citation_marker("more than\n", [2]) == "[2]"
    assert citation_marker("more than", [1, 4, 3]) == " [1][4][3]"
    assert citation_marker("more than", []) == ""
    for streamed in ("more than ", "more than"):
        assert streamed + citation_marker(streamed, [1]) == "more than [1]"


def test_one_span_grounding_gives_an_extract_without_preamble(serving_home, serving_generator):
    assistant = make_assistant(serving_home, serving_generator, grounded=True, grounded_spans=1, max_new_tokens=24)
    for question in QUESTIONS[:2]:
        answer = assistant.answer(question, "rag", "corvida", log=False)
        assert len(answer.spans) == 1 and answer.text.startswith(answer.spans[0]["text"])
        # one extract, then the exact citation
        assert answer.text == f"{answer.spans[0]['text']} [{answer.spans[0]['n']}]"
        assert answer.cited == [answer.spans[0]["n"]]


def test_defaults_answer_with_one_grounded_extract_of_the_best_sentence(serving_home, serving_generator):
    """The dev-chosen defaults (docs/answering-from-sources.md): the best-ranked sentence is the one
    source, and the answer is one extract of it with its exact citation."""
    from rag.collection import Workspace
    from serving.assistant import Assistant

    assistant = Assistant(Workspace(serving_home), serving_generator, ServeConfig(max_new_tokens=24))
    answer = assistant.answer(QUESTIONS[0], "rag", "corvida", log=False)
    assert answer.decoding["grounded"] and answer.decoding["grounded_spans"] == 1 and answer.decoding["evidence_sentences"] == 1
    # recorded with the answer: bf16 where this generator keeps bf16 weights (native bf16 CPUs), else int8
    assert answer.decoding["prefill"] == ("bf16" if serving_generator.bf16_prefill else "int8")
    assert len(answer.sources) == 1 and len(answer.spans) == 1 and answer.cited == [1]
    assert answer.spans[0]["text"] in flat(answer.sources[0].text) and answer.text == f"{answer.spans[0]['text']} [1]"
    assert len(answer.sources[0].text) < 400  # a sentence, not a whole chunk


def test_spans_start_at_word_starts_never_inside_a_number(serving_generator):
    """SmolLM2 writes numbers digit by digit: a span may start at "21", never at the "1" inside it."""
    from serving.grounding import GroundedConstraint

    tok = serving_generator.tokenizer
    c = GroundedConstraint(tok, ["- Default comfort temperature: 21 C."], serving_generator.eos_ids, max_spans=1)
    two, one = tok.convert_tokens_to_ids("2"), tok.convert_tokens_to_ids("1")
    assert two in c.allowed() and one not in c.allowed() and tok.convert_tokens_to_ids("ĠDefault") in c.allowed()
    c.advance(two)
    assert c.allowed() == {one}  # the span that starts at "2" goes on with "1" (spans run >= 2 tokens)


@pytest.mark.parametrize("bf16_prefill", [False, True])
def test_generator_without_options_equals_transformers_greedy_generate(bf16_generator, bf16_prefill):
    """The decode loop with no constraint and no contrast is plain greedy decoding: token for token what
    ``model.generate`` gives on the same (int8) model, for prompts within one prefill slice; with the prompt
    multiplied in bf16, what ``generate`` gives inside ``bf16_matmuls`` (its one-row decode steps stay int8)."""
    import torch

    from serving.generation.int8 import bf16_matmuls

    gen = bf16_generator
    for question in QUESTIONS[:3]:
        ids = gen.render([{"role": "user", "content": question}])
        assert len(ids) < 256
        stream = gen.stream_ids(ids, params=GenerationParams(max_new_tokens=12, prefill_bf16=bf16_prefill))
        ours = stream.text()
        # adapters loaded by other tests stay in the shared model, but apply only to the engine's rows
        with torch.inference_mode(), gen._lock, bf16_matmuls(bf16_prefill):
            out = gen.model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, repetition_penalty=1.0,
                                     pad_token_id=gen.tokenizer.eos_token_id)
        reference = gen.tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)
        assert ours == reference


def test_grounded_off_is_todays_path(serving_home, serving_generator):
    """With the options off the assistant hands the generator no constraint and no contrast prompt."""
    from serving.prompts import STOP_STRINGS, build_messages

    assistant = make_assistant(serving_home, serving_generator, max_new_tokens=16, k=2)
    answer = assistant.answer(QUESTIONS[0], "rag", "corvida", log=False)
    assert answer.decoding == {**answer.decoding, "grounded": False, "cad_alpha": 0.0, "evidence_sentences": 0}
    hits = assistant.workspace.get("corvida").search(QUESTIONS[0], k=2)
    gen = serving_generator
    plan = build_messages(QUESTIONS[0], sources=hits, rag=True, count=gen.count_tokens, truncate=gen.truncate_tokens,
                          budget=2048 - 16, source_tokens=96, history_turns=4)
    params = GenerationParams.from_config(assistant.config, max_new_tokens=16)
    params.stop = STOP_STRINGS
    assert gen.stream(plan.messages, params=params).text().strip() == answer.text


def test_context_aware_decoding_with_a_zero_equals_plain_decoding(serving_generator):
    gen = serving_generator
    source = "Sources:\n[1] (warranty.md)\nThe HX warranty lasts seven years from installation.\n\n"
    changed = 0
    for question in QUESTIONS[:3]:
        with_sources = gen.render([{"role": "user", "content": source + "Question: " + question}])
        question_only = gen.render([{"role": "user", "content": "Question: " + question}])
        plain = gen.stream_ids(with_sources, params=GenerationParams(max_new_tokens=12))
        plain_text = plain.text()
        cad0 = gen.stream_ids(with_sources, params=GenerationParams(max_new_tokens=12, contrast_ids=question_only, cad_alpha=0.0))
        assert cad0.text() == plain_text and cad0.completion_tokens == plain.completion_tokens
        cad1 = gen.stream_ids(with_sources, params=GenerationParams(max_new_tokens=12, contrast_ids=question_only, cad_alpha=1.0))
        changed += cad1.text() != plain_text
    assert changed >= 1  # the contrast pass does act when a > 0


def test_evidence_first_sources_are_exact_sentence_windows(serving_home, serving_generator):
    assistant = make_assistant(serving_home, serving_generator, evidence_sentences=3, evidence_window_tokens=40,
                               max_new_tokens=4)
    col = assistant.workspace.get("corvida")
    answer = assistant.answer(QUESTIONS[1], "rag", "corvida", log=False)
    assert 1 <= len(answer.sources) <= 3 and answer.abstain_score is not None
    for source in answer.sources:
        assert col.document_text(source.doc)[source.start:source.end] == source.text
        assert serving_generator.count_tokens(source.text) <= 40 or "." not in source.text[:-1]
    assert "evidence_ms" in answer.timings
    # the ranked sentences' vectors are on the collection's disk for the next process; the question is not
    from pathlib import Path

    from rag.chunking import split_sentences
    from serving.evidence import stored_vectors

    store = stored_vectors(col)
    held = [h.text[a:b] for h in answer.hits for a, b in split_sentences(h.text)]
    assert store.path == Path(col.folder) / "sentence_vectors.sqlite" and store.path.is_file()
    assert set(store.get(held)) == set(held) and store.get([QUESTIONS[1]]) == {}
    # the question is embedded once for retrieval and evidence, and retrieves what a plain search does
    embedded: list[str] = []
    real = col.embedder.embed_batch
    question = "Which error code means the water flow is too low?"  # asked by no other test
    try:
        col.embedder.embed_batch = lambda texts, **kw: (embedded.extend(texts), real(texts, **kw))[1]
        asked = assistant.answer(question, "rag", "corvida", log=False)
    finally:
        del col.embedder.embed_batch
    assert embedded.count(question) == 1 and asked.sources
    assert [h.chunk_id for h in asked.hits] == [h.chunk_id for h in col.search(question, k=assistant.config.k)]


def test_sentence_ranking_puts_the_answering_sentence_first(embedder):
    """The real MiniLM + FTS5 BM25 over the sentences of retrieved chunks (Hit-shaped records)."""
    from rag.search import Hit
    from serving.evidence import evidence_sources, rank_sentences, split_sentences, support_score

    texts = ["The HX-9 heat pump delivers 9 kW of heating. Its casing is painted Basalt Grey.\n"
             "Error E07 means low water flow; check the strainer. The warranty lasts seven years.",
             "Support is open Saturday 09:00-13:00. Technicians carry spare strainers."]
    hits = [Hit(i + 1, f"doc{i}.md", t, 100 * i, 100 * i + len(t), 1.0, {}, 0.5) for i, t in enumerate(texts)]
    assert [texts[0][a:b] for a, b in split_sentences(texts[0])][2] == "Error E07 means low water flow; check the strainer."
    for question, expected in (("What does error E07 mean?", "Error E07"), ("When is support open?", "Support is open")):
        ranked = rank_sentences(question, hits, embedder.embed_batch)
        assert ranked[0].text.startswith(expected)
        best = evidence_sources(hits, ranked, 1, 12, lambda t: len(t.split()))[0]
        assert best.text.startswith(expected) and texts[best.chunk_id - 1][best.start - 100 * (best.chunk_id - 1):].startswith(best.text)
    unrelated = support_score(rank_sentences("Who painted the Mona Lisa?", hits, embedder.embed_batch), hits)
    related = support_score(rank_sentences("What does error E07 mean?", hits, embedder.embed_batch), hits)
    assert related > unrelated


def test_an_faq_question_in_the_sources_hands_its_rank_to_its_answer(embedder):
    """An FAQ heading matches the user's question best and answers nothing: with skip_questions its answer
    (the sentence after it) ranks first and the heading last; off, the heading wins (the bug this fixes)."""
    from rag.search import Hit
    from serving.evidence import is_question, rank_sentences

    text = ("How long is the warranty on my HX heat pump?\nUnits registered after July 2025 have a 7-year parts warranty. "
            "How do I register my heat pump?\nYour installer registers the unit at commissioning.")
    hits = [Hit(1, "faq.html", text, 0, len(text), 1.0, {}, 0.6)]
    question = "How long is the warranty on an HX heat pump?"
    plain = rank_sentences(question, hits, embedder.embed_batch)
    assert is_question(plain[0].text)  # without the option the heading is the "evidence"
    ranked = rank_sentences(question, hits, embedder.embed_batch, skip_questions=True)
    assert ranked[0].text.startswith("Units registered after July 2025")
    assert all(is_question(s.text) for s in ranked[-2:]) and not any(is_question(s.text) for s in ranked[:2])
    assert is_question('Is it "quiet?"') and not is_question("It is rated for 38 dB.")


def test_abstain_threshold_from_config_flags_the_answer_refused_with_reason(serving_home, serving_generator):
    strict = make_assistant(serving_home, serving_generator, abstain_threshold=0.99, max_new_tokens=4)
    answer = strict.answer(QUESTIONS[1], "rag", "corvida", log=False)
    assert answer.refused and answer.text == strict.config.refusal_text
    assert "support score" in answer.refusal_reason and "0.99" in answer.refusal_reason
    assert answer.timings.get("completion_tokens") is None  # nothing was generated
    lenient = make_assistant(serving_home, serving_generator, abstain_threshold=0.05, max_new_tokens=4)
    kept = lenient.answer(QUESTIONS[1], "rag", "corvida", log=False)
    assert not kept.refused and kept.refusal_reason == "" and kept.abstain_score > 0.05
    assert kept.to_dict()["refused"] is False and "refusal_reason" in kept.to_dict()
    with pytest.raises(ConfigError, match="abstain_threshold"):
        ServeConfig(abstain_threshold=2.0)
    with pytest.raises(ConfigError, match="cad_alpha"):
        ServeConfig(cad_alpha=-1)


def test_rag_ft_reads_with_its_own_options(serving_home, serving_generator):
    """rag and rag+ft read the same hits with their own options: by default rag gets the best sentence,
    grounded, and rag+ft (an adapter trained on whole chunks) gets whole chunks decoded plainly; the
    ragft_* keys change rag+ft alone."""
    from rag.collection import Workspace
    from serving.assistant import Assistant

    def ask(mode, **options):
        config = ServeConfig(max_new_tokens=8, k=2, **options)
        assistant = Assistant(Workspace(serving_home), serving_generator, config)
        return assistant.answer(QUESTIONS[0], mode, "corvida", "alpha" if mode == "rag+ft" else None, log=False)

    rag, ragft = ask("rag"), ask("rag+ft")
    assert rag.decoding["evidence_sentences"] == 1 and rag.decoding["grounded"] and len(rag.sources) == 1
    assert ragft.decoding["evidence_sentences"] == 0 and not ragft.decoding["grounded"] and ragft.spans == []
    assert [s.text for s in ragft.sources] == [h.text for h in ragft.hits[:len(ragft.sources)]]  # whole chunks
    assert len(ragft.sources) == 2 and len(ragft.sources[0].text) > len(rag.sources[0].text)
    tuned = ask("rag+ft", ragft_grounded=True, ragft_grounded_spans=1, ragft_evidence_sentences=1)
    assert tuned.decoding["grounded"] and tuned.decoding["grounded_spans"] == 1 and tuned.decoding["evidence_sentences"] == 1
    assert len(tuned.sources) == 1 and len(tuned.spans) <= 1
    unchanged = ask("rag", ragft_grounded=False, ragft_evidence_sentences=3)
    assert unchanged.decoding == rag.decoding and unchanged.text == rag.text
    with pytest.raises(ConfigError, match="ragft_evidence_sentences"):
        ServeConfig(ragft_evidence_sentences=41)
    with pytest.raises(ConfigError, match="ragft_grounded_spans"):
        ServeConfig(ragft_grounded_spans=-1)


def test_evidence_rows_follow_the_layout_rag_serves(serving_home, serving_generator, tmp_path):
    """`ragtune data evidence` rows: for N evidence sentences, a row's context is exactly the sources the assistant
    puts into its prompt with evidence_sentences=N (same retrieval, ranking and window), its target the short
    answer, which the evidence holds; unanswerable questions and yes/no answers are skipped and counted."""
    import json

    from rag.collection import Workspace
    from serving.config import ServingError
    from serving.evidence_rows import build_evidence_rows, write_evidence_rows
    from tests.conftest import CORPORA, SERVING_DOCS
    from tuning.raft import SYSTEM_RAG, format_source, holds_answer

    train = [json.loads(x) for x in (CORPORA / "corvida" / "qa" / "train.jsonl").read_text().splitlines() if x.strip()]
    questions = [r for r in train if r.get("doc") in SERVING_DOCS and r["answer"].lower() not in ("yes", "no")][:5]
    questions += [{"id": "u1", "question": "How many parking spaces are there?", "answer": "The knowledge base does not say.",
                   "kind": "unanswerable", "doc": None},
                  {"id": "y1", "question": "Is the HX-14 flow rate checked at commissioning?", "answer": "yes",
                   "doc": SERVING_DOCS[2]}]
    gen = serving_generator
    col = Workspace(serving_home).get("corvida")
    rows, report = build_evidence_rows(col, questions, (1, 2), ServeConfig(), gen.count_tokens, gen.truncate_tokens,
                                       echo=lambda message: None)
    assert report.skipped_unanswerable == 1 and report.skipped_yes_no == 1 and report.questions == 7
    assert report.written == len(rows) == sum(report.per_layout.values()) and set(report.per_layout) <= {1, 2}
    assert len(rows) + report.skipped_answer_not_shown == 2 * 5 and len(rows) >= 4
    for row in rows:
        n = row["evidence_sentences"]
        assistant = make_assistant(serving_home, gen, evidence_sentences=n, evidence_window_tokens=8,
                                   source_tokens=ServeConfig().source_tokens)
        answer = assistant.answer(row["question"], "rag", "corvida", log=False, max_new_tokens=1)
        served = "Sources:\n" + "\n\n".join(format_source(s.n, s.doc, s.text, (s.metadata or {}).get("section"))
                                           for s in answer.sources)
        assert row["context"] == served and len(answer.sources) == n
        assert holds_answer(row["context"], row["answer"]) and row["system"] == SYSTEM_RAG
    source, out = tmp_path / "questions.jsonl", tmp_path / "rows.jsonl"
    source.write_text("".join(json.dumps(q) + "\n" for q in questions[:2]))
    with pytest.raises(ServingError, match="counts from 1 to 40"):
        write_evidence_rows(serving_home, "corvida", source, out, [0])
    assert not out.exists()
    report = write_evidence_rows(serving_home, "corvida", source, out, [1])
    assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == [r["id"] for r in rows if r["id"].endswith("-e1")
                                                                           and r["id"][:-3] in {q["id"] for q in questions[:2]}]
    assert report.out == str(out)


def test_adapter_reading_layout_is_chosen_on_dev_recorded_and_served(serving_home, serving_generator, tmp_path,
                                                                       monkeypatch, capsys):
    """`ragtune adapters reading`: the layouts are answered on the dev questions, the one with the highest mean
    token F1 is recorded in the adapter's manifest with its figures, and rag+ft answers read in it (ragft_reading=
    config ignores it); set by hand, cleared, and a damaged record or a bad request is a one-line error."""
    import json

    from rag.collection import Workspace
    from serving.ab.reading import LAYOUTS, choose_reading
    from serving.assistant import Assistant
    from serving.cli import main
    from serving.config import ServingError
    from tuning.adapters import get_adapter, set_reading

    dev = tmp_path / "dev.jsonl"
    dev.write_text("\n".join(json.dumps({"id": f"d{i}", "question": q, "answer": a}) for i, (q, a) in enumerate(
        [(QUESTIONS[0], "7 years"), (QUESTIONS[1], "the flow")])) + "\n", encoding="utf-8")
    assistant = Assistant(Workspace(serving_home), serving_generator, ServeConfig(max_new_tokens=8, k=2))
    try:
        record = choose_reading(assistant, "alpha", "corvida", dev)
        figures = record["chosen_on"]
        assert figures["n"] == 2 and set(figures["token_f1"]) == set(LAYOUTS) == set(figures["correct"])
        better = max(LAYOUTS, key=lambda name: (figures["token_f1"][name], -list(LAYOUTS).index(name)))
        assert record["layout"] == better and {k: record[k] for k in LAYOUTS[better]} == LAYOUTS[better]
        assert set(figures["f1_minus_chunks"]) == {"sentences", "sentences+chunks"}
        for layout, (mean, low, high) in figures["f1_minus_chunks"].items():
            assert low <= mean <= high
            assert mean == pytest.approx(figures["token_f1"][layout] - figures["token_f1"]["chunks"], abs=0.11)
        # set by hand: rag+ft reads in it; the config can still overrule
        set_reading(serving_home, "alpha", {**LAYOUTS["sentences"], "layout": "sentences", "chosen_on": "set by hand"})
        served = assistant.answer(QUESTIONS[0], "rag+ft", "corvida", "alpha", log=False)
        assert served.decoding["evidence_sentences"] == 1 and served.decoding["grounded"]
        assert served.decoding["reading"] == "adapter" and len(served.sources) == 1
        own = Assistant(Workspace(serving_home), serving_generator, ServeConfig(max_new_tokens=8, k=2, ragft_reading="config"))
        plain = own.answer(QUESTIONS[0], "rag+ft", "corvida", "alpha", log=False)
        assert plain.decoding["evidence_sentences"] == 0 and "reading" not in plain.decoding and len(plain.sources) == 2
        assert assistant.answer(QUESTIONS[0], "rag", "corvida", log=False).decoding.get("reading") is None
        # a damaged record names the adapter and the fix; the manifest's other fields are kept
        folder, manifest = get_adapter(serving_home, "alpha")
        set_reading(serving_home, "alpha", {"layout": "x", "evidence_sentences": "many", "grounded": True, "grounded_spans": 0})
        with pytest.raises(ServingError, match=r"adapter 'alpha'.*damaged.*--clear"):
            assistant.answer(QUESTIONS[0], "rag+ft", "corvida", "alpha", log=False)
        # the CLI: by hand, shown, cleared; bad requests are one line
        monkeypatch.setenv("RAGTUNE_HOME", str(serving_home))
        for argv, code, text in [
            (["adapters", "reading", "alpha", "--layout", "chunks", "--json"], 0, '"layout": "chunks"'),
            (["adapters", "reading", "alpha"], 0, "alpha: reads chunks in rag+ft; set by hand"),
            (["adapters", "reading", "alpha", "--clear"], 0, "no reading layout recorded"),
            (["adapters", "reading", "alpha", "--layout", "pages"], 1, "error: unknown reading layout 'pages'; use one of: chunks, sentences, sentences+chunks"),
            (["adapters", "reading", "alpha", "--questions", str(dev)], 1, "error: --questions needs --collection"),
            (["adapters", "reading", "../alpha", "--layout", "chunks"], 1, "error: "),
        ]:
            with pytest.raises(SystemExit) as info:
                main(argv)
            captured = capsys.readouterr()
            assert info.value.code == code and text in (captured.out if code == 0 else captured.err), argv
            assert "Traceback" not in captured.err
        after = get_adapter(serving_home, "alpha")[1]
        assert "reading" not in after and {k: v for k, v in manifest.items() if k != "reading"} == after
    finally:
        set_reading(serving_home, "alpha", None)


def test_second_look_reads_the_whole_chunks_after_a_refusal(serving_home, serving_generator, monkeypatch):
    """second_look: an answer from the best sentence that is the refusal sentence is not shown; the whole chunks
    are read (plain decoding) and that answer, the same as the whole-chunk layout gives, is streamed and kept,
    with the first look recorded; an answer that is no refusal streams as without the option."""
    from rag.collection import Collection, Workspace
    from serving.assistant import Assistant
    from serving.config import WHOLE_CHUNKS

    base = {"max_new_tokens": 8, "k": 2, "evidence_sentences": 1, "grounded": False, "grounded_spans": 0}

    def make(**options):
        return Assistant(Workspace(serving_home), serving_generator, ServeConfig(**{**base, **options}))

    first = make().answer(QUESTIONS[0], "rag", "corvida", log=False)
    assert not first.refused and len(first.sources) == 1
    # a refusal sentence that is how the model's answer from the best sentence begins makes that answer a refusal
    refusal = first.text.split("[")[0].strip()[:16].strip()
    assert refusal
    refused = make(refusal_text=refusal).answer(QUESTIONS[0], "rag", "corvida", log=False)
    assert refused.refused and refused.text == first.text and "sources do not say" in refused.refusal_reason
    searches = []  # the real search, counted: a second look reuses the first look's retrieval
    real_search = Collection.search
    monkeypatch.setattr(Collection, "search", lambda self, *a, **kw: searches.append(a) or real_search(self, *a, **kw))
    stream = make(refusal_text=refusal, second_look=True).stream(QUESTIONS[0], "rag", "corvida", log=False)
    pieces = list(stream)
    looked = stream.answer
    assert len(searches) == 1 and [h.chunk_id for h in looked.hits] == [h.chunk_id for h in refused.hits]
    chunks = make(refusal_text=refusal, **WHOLE_CHUNKS).answer(QUESTIONS[0], "rag", "corvida", log=False)
    assert looked.text == chunks.text and "".join(pieces).strip() == looked.text  # the first look never shown
    assert [s.text for s in looked.sources] == [s.text for s in chunks.sources] and len(looked.sources) == 2
    assert looked.decoding["second_look"] and looked.decoding["first_look"] == first.text
    assert looked.decoding["evidence_sentences"] == 0 and not looked.decoding["grounded"]
    assert looked.notes[0].startswith("second look: ") and looked.timings["ttft_s"] >= looked.timings["first_look_s"]
    # no refusal: the same text and pieces as without the option
    plain = make(second_look=True).stream(QUESTIONS[0], "rag", "corvida", log=False)
    assert "".join(plain).strip() == first.text and "second_look" not in plain.answer.decoding
    assert ServeConfig(ragft_second_look=True).for_mode("rag+ft").second_look
    assert not ServeConfig(second_look=True, ragft_second_look=False).for_mode("rag+ft").second_look


def test_sentence_vectors_embed_each_text_once_and_rank_as_the_embedder_does(embedder):
    """The rag and rag+ft arms of one question (or the arena's two answers) rank the same sentences: the
    second ranking embeds nothing, a new question over the same chunks embeds only itself, and the order
    is the one the embedder gives directly. The kept vectors are bounded."""
    import numpy as np

    from rag.search import Hit
    from serving.evidence import SentenceVectors, rank_sentences, split_sentences

    calls: list[list[str]] = []

    class Recorded:  # the real MiniLM; only its calls are written down
        def embed_batch(self, texts, batch_size=32):
            calls.append(list(texts))
            return embedder.embed_batch(texts, batch_size=batch_size)

    texts = ["The HX-9 heat pump delivers 9 kW of heating. Its casing is painted Basalt Grey.\n"
             "Error E07 means low water flow; check the strainer. The warranty lasts seven years.",
             "Support is open Saturday 09:00-13:00. Technicians carry spare strainers."]
    hits = [Hit(i + 1, f"doc{i}.md", t, 100 * i, 100 * i + len(t), 1.0, {}, 0.5) for i, t in enumerate(texts)]
    sentences = [t[a:b] for t in texts for a, b in split_sentences(t)]
    kept = SentenceVectors(Recorded())
    first = rank_sentences("What does error E07 mean?", hits, kept)
    again = rank_sentences("What does error E07 mean?", hits, kept)
    other = rank_sentences("When is support open?", hits, kept)
    assert calls == [["What does error E07 mean?", *sentences], ["When is support open?"]]
    order = lambda ranked: [(s.hit_index, s.start) for s in ranked]  # noqa: E731
    assert order(first) == order(again) == order(rank_sentences("What does error E07 mean?", hits, embedder.embed_batch))
    assert order(other) == order(rank_sentences("When is support open?", hits, embedder.embed_batch))
    np.testing.assert_allclose(kept(sentences), embedder.embed_batch(sentences), atol=1e-5)

    small = SentenceVectors(Recorded(), size=3)
    small(sentences)
    assert len(small._vectors) == 3 and list(small._vectors) == sentences[-3:]


def test_stored_sentence_vectors_serve_a_new_process_and_survive_bad_files(embedder, tmp_path):
    """A collection's sentence vectors on disk: a new process (a fresh in-memory cache and store) embeds only
    the question and ranks as before; the store is emptied for another embedder, set aside with a warning
    naming the file when damaged (the answer still ranks), and bounded."""
    import numpy as np

    from rag.search import Hit
    from serving.evidence import SentenceVectors, StoredVectors, rank_sentences, split_sentences

    calls: list[list[str]] = []

    class Recorded:
        def embed_batch(self, texts, batch_size=32):
            calls.append(list(texts))
            return embedder.embed_batch(texts, batch_size=batch_size)

    text = ("The HX-9 heat pump delivers 9 kW of heating. Error E07 means low water flow; check the strainer.\n"
            "Support is open Saturday 09:00-13:00. The warranty lasts seven years.")
    hits = [Hit(1, "doc.md", text, 0, len(text), 1.0, {}, 0.5)]
    sentences = [text[a:b] for a, b in split_sentences(text)]
    question = "What does error E07 mean?"
    path = tmp_path / "sentence_vectors.sqlite"

    def rank(store):
        kept = SentenceVectors(Recorded())  # a new process: nothing kept in memory
        return rank_sentences(question, hits, lambda texts: kept(texts, store=store, transient=(question,)))

    order = lambda ranked: [(s.hit_index, s.start) for s in ranked]  # noqa: E731
    first = rank(StoredVectors(path, "minilm", embedder.dimension))
    assert calls == [[question, *sentences]]
    again = rank(StoredVectors(path, "minilm", embedder.dimension))
    assert calls[1:] == [[question]] and order(again) == order(first)
    stored = StoredVectors(path, "minilm", embedder.dimension)
    assert stored.count() == len(sentences) and question not in stored.get([question, *sentences])
    np.testing.assert_allclose(np.stack([stored.get(sentences)[t] for t in sentences]), embedder.embed_batch(sentences), atol=1e-5)
    stored.close()

    other = StoredVectors(path, "another-embedder", embedder.dimension)  # the collection was reindexed
    assert other.count() == 0 and other.get(sentences) == {}
    other.close()

    bad = tmp_path / "bad.sqlite"
    bad.write_bytes(b"not a database at all" * 100)
    calls.clear()
    with pytest.warns(UserWarning, match="bad.sqlite.*Delete the file"):
        ranked = rank(StoredVectors(bad, "minilm", embedder.dimension))
    assert order(ranked) == order(first) and calls == [[question, *sentences]]
    assert bad.read_bytes() == b"not a database at all" * 100  # left as it was for the user to look at

    small = StoredVectors(tmp_path / "small.sqlite", "minilm", embedder.dimension, limit=2)
    small.put(dict(zip(sentences, embedder.embed_batch(sentences))))
    assert small.count() == 2 and set(small.get(sentences)) == set(sentences[-2:])


def test_a_store_locked_by_another_writer_skips_the_write_and_keeps_reading(embedder, tmp_path):
    """Two processes answer from one collection: while one holds the store's write lock, the other's write is
    skipped within the busy timeout (its answer is not held up or failed), reads go on (WAL), and the next
    write after the lock is released lands."""
    import sqlite3
    import time

    from serving.evidence import StoredVectors

    texts = ["Support is open Saturday 09:00-13:00.", "The warranty lasts seven years.", "Error E07 means low water flow."]
    vectors = dict(zip(texts, embedder.embed_batch(texts)))
    path = tmp_path / "sentence_vectors.sqlite"
    store = StoredVectors(path, "minilm", embedder.dimension)
    store.put({texts[0]: vectors[texts[0]]})
    other = sqlite3.connect(path, isolation_level=None)  # another process's writer, mid-transaction
    other.execute("BEGIN IMMEDIATE")
    other.execute("INSERT INTO vectors (digest, vector) VALUES (x'00', x'00')")
    started = time.perf_counter()
    store.put({texts[1]: vectors[texts[1]]})
    assert time.perf_counter() - started < 5.0
    assert set(store.get(texts)) == {texts[0]}  # read while the other writes; the skipped one is simply absent
    other.execute("ROLLBACK")
    other.close()
    store.put({texts[2]: vectors[texts[2]]})
    assert set(store.get(texts)) == {texts[0], texts[2]} and store.count() == 2
