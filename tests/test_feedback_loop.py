"""The feedback loop (issue 13): corrections -> export -> DPO -> gate -> promotion -> default adapter.

Real parts only: the packaged SmolLM2 (int8 serving engine), the packaged embedder, real SQLite/FAISS,
TRL's DPOTrainer. The workspace is this module's own (the shared serving workspace's adapter list is
asserted elsewhere), with a three-document collection whose facts a 135M model answers with retrieval.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import home_with_models, write_jsonl

DOCS = {
    "vault.md": "# Vault\n\nThe vault code of the Brenholt office is 4417.\n",
    "ferry.md": "# Ferry\n\nThe ferry to Tullan Island leaves at 06:40 every morning.\n",
    "mascot.md": "# Mascot\n\nThe mascot of the Corvida football club is a heron named Pim.\n",
}
QUESTIONS = [
    {"id": "q1", "question": "What is the vault code of the Brenholt office?", "answer": "4417"},
    {"id": "q2", "question": "When does the ferry to Tullan Island leave?", "answer": "06:40"},
    {"id": "q3", "question": "What is the mascot of the Corvida football club?", "answer": "heron"},
    {"id": "q4", "question": "What is the name of the Corvida football club's mascot?", "answer": "Pim"},
    {"id": "q5", "question": "Which code opens the vault of the Brenholt office?", "answer": "4417"},
    {"id": "q6", "question": "At what time does the Tullan Island ferry leave each morning?", "answer": "06:40"},
]

# The gate's constructed case: references any sensible answer repeats (a word of the question or of the
# one matching source), so the base model with retrieval scores them and a wrecked adapter does not.
# The gate is under test here, not the 135M model's knowledge. Each is a word the base model's 16-token
# answer says early ("Brenholt" and "time" were not: the base scored 4 of 6, and once the wrecked adapter's
# noise held one of them, 1 of 6, the CI of +0.5 held zero and the gate test failed in a CI run).
GATE_QUESTIONS = [{**q, "answer": a} for q, a in zip(QUESTIONS, ["vault", "ferry", "Corvida", "mascot", "vault", "Tullan"])]


def _write_adapters(home: Path, probe: dict | None, model, base) -> None:
    """Two LoRA adapters in the registry format: 'zero' keeps lora_B at zero, i.e. trained 0 steps (it
    is exactly the base model); 'wreck' gets large random weights that wreck the model (clearly worse)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from tuning.adapters import adapter_dir, write_manifest
    from tuning.models import weights_hash

    torch.manual_seed(7)  # before peft draws lora_A: unseeded, 'wreck' was another random model in each run
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                                  init_lora_weights=True, task_type="CAUSAL_LM"))
    for n, (name, scale) in enumerate((("zero", 0.0), ("wreck", 0.5))):
        with torch.no_grad():
            for pname, param in peft_model.named_parameters():
                if "lora_B" in pname and scale:
                    param.normal_(0.0, scale)
        folder = adapter_dir(home, name)
        peft_model.save_pretrained(folder, safe_serialization=True)
        write_manifest(folder, {"format": 1, "name": name, "task": "sft", "method": "lora", "quant": "none",
                                "base_model": {"id": base.id, "kind": "packaged", "sha256": weights_hash(base)},
                                "created": f"2026-01-01T00:00:0{n}+00:00", "metrics": {"steps": 0}, "forgetting": probe})


@pytest.fixture(scope="module")
def loop_home(tuning_home, tmp_path_factory):
    """Workspace: converted model (symlinked), collection 'loop', adapters 'zero' (0 steps) and 'wreck'."""
    from rag.collection import Workspace
    from tuning import forgetting
    from tuning.models import load_causal_lm, load_tokenizer, resolve_base_model

    home = home_with_models(tuning_home, tmp_path_factory.mktemp("loop-home"))
    docs = tmp_path_factory.mktemp("loop-docs")
    for name, text in DOCS.items():
        (docs / name).write_text(text, encoding="utf-8")
    Workspace(home).index("loop", [docs])
    # the 0-step adapter IS the base, so the base's probe measured once is its before and after
    base = resolve_base_model("smollm2-135m-instruct", home)
    model = load_causal_lm(base, for_training=False)
    probe = forgetting.run_probe(model, load_tokenizer(base), "cpu", limit=1)
    _write_adapters(home, forgetting.compare(probe, probe), model, base)
    write_jsonl(home / "questions.jsonl", GATE_QUESTIONS)
    return home


# plain decoding over whole chunks: under the default grounded one-extract decoding even the wrecked adapter can
# only copy source words (it scored 4 of 6 there), so "clearly worse" needs free decoding
SERVE = {"max_new_tokens": 16, "source_tokens": 96, "k": 2, "grounded": False, "grounded_spans": 0, "evidence_sentences": 0}


@pytest.fixture(scope="module")
def loop_assistant(loop_home):
    """The app's engine for this workspace and serving config (the AppTest below then reuses it)."""
    from core.workspace import ragtune_home
    from serving import webapp

    return webapp.engine(str(ragtune_home(loop_home)), webapp.serve_config_json(SERVE)).wait()


def test_corrections_export_in_the_served_layout_with_flags(loop_home, loop_assistant, smol_tokenizer, tmp_path):
    from rag.collection import Workspace
    from serving.ab.runs import ABStore
    from serving.feedback import FeedbackError, export_feedback, record_correction
    from serving.prompts import build_messages
    from tuning.data import to_messages, tokenize_example
    from tuning.raft import REFUSAL

    a = loop_assistant
    ws, store = a.workspace, a.store
    first = a.answer(QUESTIONS[1]["question"], mode="rag", collection="loop")
    second = a.answer("Who painted the office door?", mode="rag", collection="loop")
    liked = a.answer(QUESTIONS[2]["question"], mode="rag", collection="loop")
    assert first.message_id and first.collection_version == ws.get("loop").version()
    ferry_n = next(s.n for s in first.sources if s.doc == "ferry.md")
    cid = record_correction(store, ws, first.message_id, "It leaves at 06:40.", source_n=ferry_n)
    record_correction(store, ws, second.message_id, "", not_in_sources=True)
    store.set_feedback(liked.message_id, 1)
    ABStore(ws.db_path).add_vote(QUESTIONS[0]["question"], "rag", "base", "The code is 4417.", "No idea.", "a", "loop", None)
    with pytest.raises(FeedbackError, match="not shown"):
        record_correction(store, ws, first.message_id, "x", source_n=99)
    with pytest.raises(FeedbackError, match="empty correction"):
        record_correction(store, ws, first.message_id, "  ")
    stored = store.corrections("loop")
    assert [c["id"] for c in stored][0] == cid and stored[0]["question"] == QUESTIONS[1]["question"]
    assert stored[0]["mode"] == "rag" and stored[0]["collection_version"] == first.collection_version
    assert [s["text"] for s in stored[0]["sources"]] == [s.text for s in first.sources]  # the exact sources seen

    out = tmp_path / "fb.jsonl"
    report = export_feedback(loop_home, "loop", out, thumbs_up=True)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    pairs = [json.loads(line) for line in Path(report.pairs_out).read_text().splitlines()]
    assert [r["row_type"] for r in rows] == ["correction", "abstain", "thumbs_up"]
    assert rows[0]["answer"] == f"It leaves at 06:40. [{ferry_n}]" and rows[0]["feedback"] == [f"correction:{cid}"]
    assert rows[1]["answer"] == REFUSAL
    # the row renders to exactly the messages serving sent for that answer
    plan = build_messages(first.question, sources=first.sources, rag=True, count=lambda t: 1, truncate=lambda t, n: t,
                          budget=10_000, source_tokens=96, history_turns=0)
    assert to_messages(rows[0], "qa")[:-1] == plan.messages
    # answer-only labels: the trained tokens are the corrected answer and the end of the turn
    example = tokenize_example(smol_tokenizer, to_messages(rows[0], "qa"), 2048, "drop")
    trained = smol_tokenizer.decode([t for t in example["labels"] if t != -100])
    assert trained.startswith(rows[0]["answer"]) and "Question:" not in trained
    # preference pairs: the arena winner, and the correction against the original answer
    arena = [p for p in pairs if p["source"] == "arena"]
    assert arena[0]["chosen"] == "The code is 4417." and arena[0]["rejected"] == "No idea."
    assert any(p["source"] == "correction" and p["rejected"] == first.text for p in pairs)
    # reproducible: same feedback -> same bytes; a repeated correction replaces, never duplicates
    record_correction(store, ws, first.message_id, "It leaves at 06:40.", source_n=ferry_n)
    again = export_feedback(loop_home, "loop", tmp_path / "fb2.jsonl", thumbs_up=True)
    assert again.sha256 == report.sha256 and again.pairs_sha256 == report.pairs_sha256
    # the ferry document changes: its correction is flagged and left out (or kept, flagged, on request)
    docs = tmp_path / "changed"
    docs.mkdir()
    for name, text in DOCS.items():
        (docs / name).write_text(text.replace("06:40", "07:10"), encoding="utf-8")
    Workspace(loop_home).index("loop", [docs], sync=True)
    flagged = export_feedback(loop_home, "loop", tmp_path / "fb3.jsonl", thumbs_up=True)
    assert [f["feedback"] for f in flagged.flagged_changed] == [f"correction:{cid}"]
    assert "correction" not in [r["row_type"] for r in map(json.loads, (tmp_path / "fb3.jsonl").read_text().splitlines())]
    export_feedback(loop_home, "loop", tmp_path / "fb4.jsonl", include_changed=True)
    row = json.loads((tmp_path / "fb4.jsonl").read_text().splitlines()[0])
    assert row["flags"] == ["changed_document"] and row["changed_documents"] == ["ferry.md"]
    for name, text in DOCS.items():  # restore the collection for the gate tests
        (docs / name).write_text(text, encoding="utf-8")
    Workspace(loop_home).index("loop", [docs], sync=True)


def test_export_trains_a_sentence_answer_in_the_whole_chunk_layout_rag_ft_reads(tuning_home, loop_assistant, tmp_path):
    """An answer that saw one evidence sentence (the rag defaults) exports with that sentence's whole chunk
    by default (rag+ft reads whole chunks), or with the sentence itself with sources="as_seen"."""
    from rag.collection import Workspace
    from serving.assistant import Assistant
    from serving.config import ServeConfig
    from serving.feedback import FeedbackError, export_feedback, record_correction
    from serving.history import ChatStore

    home = home_with_models(tuning_home, tmp_path / "home")
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "ferry.md").write_text("# Ferry\n\nThe harbour opens at dawn. The ferry to Tullan Island leaves at 06:40 "
                                   "every morning. Tickets are sold on board.\n", encoding="utf-8")
    ws = Workspace(home)
    ws.index("ferries", [docs])
    config = ServeConfig(**{**SERVE, "evidence_sentences": 1})
    assistant = Assistant(ws, loop_assistant.generator, config, store=ChatStore(ws.db_path))
    answer = assistant.answer(QUESTIONS[1]["question"], mode="rag", collection="ferries")
    seen = answer.sources[0].text
    chunk = next(c for c in ws.get("ferries").chunks("ferry.md") if seen in c.text)
    assert "06:40" in seen and len(seen) < len(chunk.text)  # one sentence of a longer chunk
    record_correction(assistant.store, ws, answer.message_id, "At 06:40.", source_n=1)
    whole = json.loads(export_feedback(home, "ferries", tmp_path / "w.jsonl") and (tmp_path / "w.jsonl").read_text())
    as_seen = json.loads(export_feedback(home, "ferries", tmp_path / "s.jsonl", sources="as_seen")
                         and (tmp_path / "s.jsonl").read_text())
    flat = " ".join(chunk.text.split())
    assert flat in whole["context"] and "Tickets are sold on board." in whole["context"]
    assert " ".join(seen.split()) in as_seen["context"] and "Tickets are sold" not in as_seen["context"]
    assert whole["answer"] == as_seen["answer"] == "At 06:40. [1]" and whole["question"] == as_seen["question"]
    with pytest.raises(FeedbackError, match="sources="):
        export_feedback(home, "ferries", tmp_path / "x.jsonl", sources="chunks")


def test_dpo_two_steps_registers_an_adapter(loop_home, tmp_path):
    from tuning.adapters import list_adapters
    from tuning.run import tune

    pairs = write_jsonl(tmp_path / "pairs.jsonl", [
        {"system": "Answer briefly.", "prompt": q["question"], "chosen": q["answer"], "rejected": "I do not know."}
        for q in QUESTIONS])
    manifest = tune(None, [f"data={pairs}", "task=dpo", "name=dpo-two", "max_steps=2", "batch_size=2", "lora_r=4",
                           "target_modules=attention", "probe_limit=1", "progress=false", "threads=1",
                           "start_adapter=zero"], home=loop_home, echo=lambda *_: None)
    assert manifest["objective"] == "dpo" and manifest["metrics"]["steps"] == 2 and manifest["reference"] == "zero"
    assert manifest["data"][0]["sha256"] and set(manifest["forgetting"]) >= {"before", "after", "perplexity_change_pct"}
    folder = loop_home / "adapters" / "dpo-two"
    assert {"adapter_config.json", "adapter_model.safetensors", "ragtune.json"} <= {p.name for p in folder.iterdir()}
    assert not (folder / "ref").exists()  # only the trained adapter, not TRL's reference copy
    assert "dpo-two" in [a["name"] for a in list_adapters(loop_home)]


def test_gate_refuses_a_zero_step_candidate(loop_home, loop_assistant):
    from serving import promotion

    decision = promotion.gate(loop_assistant, "zero", "loop", str(loop_home / "questions.jsonl"), max_new_tokens=16)
    assert not decision.promote and decision.current is None and decision.correct["n"] == len(GATE_QUESTIONS)
    assert decision.correct["ci_low"] <= 0 <= decision.correct["ci_high"]  # a 0-step adapter answers as the base
    assert "not above zero" in decision.summary() and decision.summary().startswith("REFUSED")
    assert promotion.current_adapter(loop_home, "loop") is None  # nothing recorded


def test_gate_promotes_a_better_candidate_records_force_and_rolls_back(loop_home, loop_assistant):
    from serving import promotion

    questions = str(loop_home / "questions.jsonl")
    forced = promotion.gate(loop_assistant, "wreck", "loop", questions, force=True, max_new_tokens=16)
    assert not forced.promote and forced.forced and forced.promotion_id
    assert promotion.current_adapter(loop_home, "loop") == "wreck"
    assert promotion.default_adapter(loop_home, "loop", None) == "wreck"  # what ask/chat use when given none
    assert promotion.default_adapter(loop_home, "loop", "rag") is None
    better = promotion.gate(loop_assistant, "zero", "loop", questions, max_new_tokens=16)  # against the current: wreck
    assert better.current == "wreck" and better.correct["ci_low"] > 0, better.summary()
    assert better.promote and better.promotion_id and promotion.current_adapter(loop_home, "loop") == "zero"
    rows = promotion.history(loop_home, "loop")
    assert [(r["adapter"], r["forced"]) for r in rows] == [("wreck", True), ("zero", False)]
    assert rows[1]["evidence"]["correct"]["ci_low"] > 0
    assert promotion.rollback(loop_home, "loop") == "wreck"
    assert promotion.current_adapter(loop_home, "loop") == "wreck"
    assert promotion.rollback(loop_home, "loop") is None and promotion.current_adapter(loop_home, "loop") is None
    with pytest.raises(promotion.PromotionError, match="no promoted adapter"):
        promotion.rollback(loop_home, "loop")


def test_server_for_a_collection_serves_its_promoted_adapter_as_default(loop_home, loop_assistant):
    """`ragtune serve -c loop`: the model 'default' (and a request naming none) is the promoted adapter,
    read per request: a promotion and a rollback apply without a restart."""
    import urllib.request

    from serving import promotion
    from serving.openai_server import serve_in_thread

    server, url = serve_in_thread(loop_assistant.generator, collection="loop", default_max_tokens=6)

    def complete(model):
        body = {"prompt": "The ferry to Tullan Island leaves at", "max_tokens": 6, "temperature": 0}
        if model is not None:
            body["model"] = model
        request = urllib.request.Request(url + "/completions", json.dumps(body).encode(), {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            out = json.loads(response.read())
        return out["model"], out["choices"][0]["text"]

    def listed_default():
        with urllib.request.urlopen(url + "/models", timeout=30) as response:
            return next(m for m in json.loads(response.read())["data"] if m["id"] == "default")

    try:
        assert promotion.current_adapter(loop_home, "loop") is None
        base = complete("base")
        assert complete("default") == (loop_assistant.generator.base_id, base[1]) == complete(None)
        assert listed_default()["parent"] == loop_assistant.generator.base_id
        wreck = complete("wreck")
        assert wreck[1] != base[1]  # the adapter changes the answer, so the comparison below can fail
        promotion.record_promotion(loop_home, "loop", "wreck", {"test": "server default"}, forced=True)
        assert complete("default") == ("wreck", wreck[1]) == complete(None)  # no restart
        assert listed_default() | {"created": 0} == {"id": "default", "object": "model", "created": 0, "owned_by": "ragtune",
                                                     "parent": "wreck", "collection": "loop"}
        assert complete("base") == ("base", base[1])  # naming a model still wins
        promotion.rollback(loop_home, "loop")
        assert complete("default")[1] == base[1]
    finally:
        server.shutdown()
        server.server_close()
    assert promotion.current_adapter(loop_home, "loop") is None


def test_decision_rule_both_directions():
    from serving.promotion import decide, forgetting_check

    ok, _, reason = forgetting_check({"forgetting": {"perplexity_change_pct": 2.0, "qa_accuracy_change": 0.0}}, None)
    assert ok
    bad, _, why = forgetting_check({"forgetting": {"perplexity_change_pct": 9.0, "qa_accuracy_change": 0.0}}, None)
    assert not bad and "perplexity" in why
    missing, _, why = forgetting_check({}, None)
    assert not missing and "forgetting_probe=true" in why
    better, diff, _ = decide([1.0] * 8 + [0.0] * 2, [0.0] * 8 + [0.0] * 2, True, reason)
    assert better and diff["ci_low"] > 0
    assert not decide([1.0] * 8, [0.0] * 8, False, why)[0]  # better but forgetting failed
    same, diff, _ = decide([1.0, 0.0] * 5, [1.0, 0.0] * 5, True, reason)
    assert not same and diff["ci_low"] <= 0 <= diff["ci_high"]


def test_cli_feedback_and_promote_refuse_bad_names(loop_home, tmp_path):
    import subprocess
    import sys

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "serving.cli", *args, "--home", str(loop_home)],
                              capture_output=True, text=True, timeout=120)

    r = cli("promote", "../x", "-c", "loop")
    assert r.returncode == 1 and "error:" in r.stderr and "Traceback" not in r.stderr
    r = cli("promote", "--rollback", "-c", "loop")
    assert r.returncode == 1 and "no promoted adapter" in r.stderr
    r = cli("feedback", "export", "-c", "../loop", "--out", str(tmp_path / "x.jsonl"))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    r = cli("feedback", "export", "-c", "loop", "--out", str(tmp_path / "cli.jsonl"), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["sha256"] and (tmp_path / "cli.jsonl").exists()
    r = cli("serve", "-c", "nope", "--port", "0")  # refused before the model loads, naming the fix
    assert r.returncode == 1 and "collection 'nope' does not exist" in r.stderr and "ragtune collections" in r.stderr


def test_app_correction_promoted_default_and_feedback_panel(loop_home, loop_assistant, tmp_path, monkeypatch):
    """The chat stores a correction; a promotion made outside the app becomes the chat's adapter on the next
    rerun; the Tuning page's panel counts feedback, builds the dataset, runs the gate and rolls back."""
    from streamlit.testing.v1 import AppTest

    from serving import promotion
    from serving.history import ChatStore

    config = tmp_path / "serve.yaml"
    config.write_text("".join(f"{k}: {v}\n" for k, v in SERVE.items()), encoding="utf-8")
    monkeypatch.setenv("RAGTUNE_HOME", str(loop_home))
    monkeypatch.setenv("RAGTUNE_SERVE_CONFIG", str(config))
    (loop_home / "data").mkdir(exist_ok=True)
    questions = write_jsonl(loop_home / "data" / "gate.jsonl", GATE_QUESTIONS[:2])
    store = ChatStore(loop_home / "ragtune.db")
    before = len(store.corrections("loop"))

    at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "streamlit_app.py"), default_timeout=240).run()
    assert not at.exception and at.selectbox(key="chat_collection").value == "loop"
    at.chat_input[0].set_value(QUESTIONS[0]["question"]).run()
    assert not at.exception
    message_id = max(m["id"] for c in store.chats() for m in store.messages(c["id"]) if m["role"] == "assistant")
    at.text_area(key=f"correction_{message_id}").input("The code is 4417.")
    at.selectbox(key=f"correction_source_{message_id}").set_value(
        next(o for o in at.selectbox(key=f"correction_source_{message_id}").options if "vault.md" in o))
    next(b for b in at.button if "Save correction" in b.label).click().run()
    assert not at.exception and any("Saved (correction" in s.value for s in at.success)
    stored = store.corrections("loop")
    assert len(stored) == before + 1 and stored[-1]["correction"] == "The code is 4417." and stored[-1]["source_n"]

    promotion.record_promotion(loop_home, "loop", "zero", {"note": "promoted by another process"})
    at.run()
    assert at.selectbox(key="chat_adapter").value == "zero" and at.radio(key="mode").value == "rag+ft"

    at.switch_page("pages/tuning.py").run()
    assert not at.exception
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Corrections"] == str(before + 1) and metrics["Current adapter"] == "zero"
    at.button(key="fb_build").click().run()
    assert any("rows" in s.value and "sha256" in s.value for s in at.success)
    at.selectbox(key="fb_candidate").set_value("wreck")
    at.text_input(key="fb_questions").input(str(questions))
    at.button(key="fb_gate").click().run()
    assert not at.exception
    # the gate's bar shows progress with the elapsed time and an ETA, like every other long wait in the app
    gate_bars = [p.text for p in at.progress if p.text.startswith("gate:")]
    assert gate_bars and re.match(r"gate: (\d+)/\1 · \S+ elapsed · ETA \S+ · ", gate_bars[0]), gate_bars
    assert any("REFUSED" in c.value for c in at.code)  # a wrecked candidate never passes the gate
    assert "Promote anyway (recorded as forced)" in [b.label for b in at.button]
    at.button(key="fb_rollback").click().run()
    assert not at.exception and promotion.current_adapter(loop_home, "loop") is None
