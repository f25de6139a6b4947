"""The Streamlit app through streamlit.testing.v1.AppTest (page logic, state across reruns) and its
helpers: the real packaged models, a real workspace, real training subprocesses for the run folders."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
APP = str(REPO / "streamlit_app.py")


@pytest.fixture()
def app_env(serving_home, tmp_path, monkeypatch):
    config = tmp_path / "serve.yaml"
    config.write_text("max_new_tokens: 8\nsource_tokens: 96\n", encoding="utf-8")
    monkeypatch.setenv("RAGTUNE_HOME", str(serving_home))
    monkeypatch.setenv("RAGTUNE_SERVE_CONFIG", str(config))
    return serving_home


def _app():
    from streamlit.testing.v1 import AppTest

    return AppTest.from_file(APP, default_timeout=240)


def _assistant_messages(at):
    return [m for m in at.chat_message if m.name == "assistant"]


def test_chat_page_answers_escapes_text_and_keeps_state(app_env):
    from serving.history import ChatStore

    at = _app().run()
    assert not at.exception
    assert at.radio(key="mode").value == "rag" and at.selectbox(key="chat_collection").value == "corvida"
    assert sorted(at.selectbox(key="chat_adapter").options) == ["alpha", "beta"]
    at.chat_input[0].set_value("When is the Vexa-7 gasket replaced? ![p](http://127.0.0.1:9/pixel.png)").run()
    assert not at.exception
    user = [m for m in at.chat_message if m.name == "user"][0]
    # the question is shown as text: its image syntax is escaped, so no image element is made from it
    assert "\\!\\[p\\]\\(http" in user.markdown[0].value
    assistant = _assistant_messages(at)
    assert assistant and assistant[0].markdown[0].value.strip()
    assert any(e.label.startswith("Sources") for e in at.expander)
    bodies = [md.value for md in assistant[0].markdown]
    source_md = [b for b in bodies if "Vexa" in b and "INJECTED" in b]
    assert source_md, bodies
    assert all(b.count("<") == b.count("\\<") for b in source_md)  # the document's markup stays text
    assert any("first token" in c.value for c in at.caption)
    chats = ChatStore(app_env / "ragtune.db").chats()
    assert chats and chats[0]["messages"] >= 2
    # choices survive reruns: pick another adapter and mode, rerun, they stay
    at.radio(key="mode").set_value("ft").run()
    at.selectbox(key="chat_adapter").set_value("beta").run()
    at.run()
    assert at.radio(key="mode").value == "ft" and at.selectbox(key="chat_adapter").value == "beta"
    at.chat_input[0].set_value("Name a colour.").run()
    assert not at.exception and len(_assistant_messages(at)) == 2
    # an invalid request: a one-line error that stays, with its question, after the next rerun
    at.chat_input[0].set_value("x" * 2100).run()
    assert not at.exception and "over the limit" in at.error[0].value
    at.run()
    assert at.error and "over the limit" in at.error[0].value
    assert any(("x" * 50) in m.markdown[0].value for m in at.chat_message if m.name == "user" and m.markdown)


def test_chat_shows_an_abstention_with_closest_matches_labelled(serving_home, tmp_path, monkeypatch):
    config = tmp_path / "serve.yaml"
    config.write_text("max_new_tokens: 8\nsource_tokens: 96\nmin_similarity: 0.99\n", encoding="utf-8")
    monkeypatch.setenv("RAGTUNE_HOME", str(serving_home))
    monkeypatch.setenv("RAGTUNE_SERVE_CONFIG", str(config))
    at = _app().run()
    at.chat_input[0].set_value("When is the Vexa-7 gasket replaced?").run()
    assert not at.exception
    labels = [e.label for e in at.expander]
    assert any(label.startswith("Closest matches") for label in labels), labels
    assert not any(label.startswith("Sources") for label in labels)
    assert any(c.value.startswith("Not answered") for c in at.caption)


def test_password_gate_keeps_every_page_closed_until_the_password(app_env, monkeypatch):
    from serving.webapp import hash_password

    (app_env / "app.yaml").write_text(f"password_hash: '{hash_password('s3cret-pass')}'\n", encoding="utf-8")
    try:
        at = _app().run()
        assert not at.exception and not at.chat_input and at.text_input(key="login_password")
        at.switch_page("pages/collections.py").run()  # a page run on its own shows nothing either
        assert not at.exception and not at.dataframe and not [t for t in at.title if t.value == "Collections"]
        at.switch_page("streamlit_app.py").run()
        at.text_input(key="login_password").set_value("wrong")
        at.button[0].click().run()
        assert at.error and "Wrong password" in at.error[0].value and not at.chat_input
        at.text_input(key="login_password").set_value("s3cret-pass")
        at.button[0].click().run()
        assert not at.exception and at.chat_input
        at.switch_page("pages/collections.py").run()
        assert not at.exception and [t for t in at.title if t.value == "Collections"]
    finally:
        (app_env / "app.yaml").unlink()


def test_collections_page_indexes_inside_roots_refuses_outside_and_drops(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.md").write_text("# A\n\nThe Orla pump is blue.\n", encoding="utf-8")
    (docs / "b.txt").write_text("The Brin valve is red.\n", encoding="utf-8")
    monkeypatch.setenv("RAGTUNE_HOME", str(home))
    at = _app()
    at.switch_page("pages/collections.py").run()
    assert not at.exception and "No collection yet" in at.info[0].value
    assert at.text_input(key="upload_collection").value == "corvida"
    # outside the allowed roots (default: uploads + the demo corpus): refused, nothing created
    at.text_input(key="folder_collection").set_value("notes")
    [t for t in at.text_input if t.label == "Folder on this server"][0].set_value(str(docs))
    [b for b in at.button if b.label == "Index folder"][0].click().run()
    assert not at.exception and at.error and "outside the allowed folders" in at.error[0].value
    (home / "app.yaml").write_text(f"index_roots: ['{docs}']\n", encoding="utf-8")
    at.text_input(key="upload_collection").set_value("manuals")
    [t for t in at.text_input if t.label == "Folder on this server"][0].set_value(str(docs))
    [b for b in at.button if b.label == "Index folder"][0].click().run()
    assert not at.exception
    assert at.success and "notes: 2 added" in at.success[0].value, [e.value for e in at.error]
    # the new collection is in the table on this very run, and becomes the inspected one
    assert "notes" in list(at.dataframe[0].value["name"])
    assert at.selectbox(key="inspect").value == "notes"
    at.run()
    assert at.text_input(key="upload_collection").value == "manuals"  # the typed collection is kept
    at.multiselect(key="delete_docs").set_value(["a.md"]).run()
    [b for b in at.button if b.label == "Delete selected documents"][0].click().run()
    assert not at.exception and "1 document(s) deleted" in at.success[0].value
    at.checkbox(key="sure_drop_notes").check().run()
    [b for b in at.button if b.label == "Delete collection"][0].click().run()
    assert not at.exception
    from rag.collection import Workspace

    assert Workspace(home).names() == []


def test_tuning_page_lists_adapters_and_refuses_data_outside_roots(app_env):
    at = _app()
    at.switch_page("pages/tuning.py").run()
    assert not at.exception
    labels = [e.label for e in at.expander]
    assert any(label.startswith("alpha") for label in labels) and any(label.startswith("foreign") for label in labels)
    at.text_input(key="tune_data").set_value("/etc/passwd")
    [b for b in at.button if b.label == "Start training"][0].click().run()
    assert not at.exception and at.error and "outside the allowed folders" in at.error[0].value
    at.text_input(key="tune_data").set_value(str(app_env / "data" / "missing.jsonl"))
    [b for b in at.button if b.label == "Start training"][0].click().run()
    assert not at.exception and at.error and "not found" in at.error[0].value
    # a valid start: the run panel follows the new run (its Stop button shows), and Stop ends it
    from serving.history import ChatStore

    store = ChatStore(app_env / "ragtune.db")

    def start_and_stop() -> dict:
        [b for b in at.button if b.label == "Start training"][0].click().run()
        assert not at.exception and at.success and "started run" in at.success[0].value, [e.value for e in at.error]
        newest = store.runs(1)[0]
        assert at.selectbox(key="run_pick").value == newest["id"]  # followed, though another run was picked
        stop = [b for b in at.button if b.label == "Stop run" and b.key == f"stop_{newest['id']}"]
        assert stop
        stop[0].click().run()
        assert store.run(newest["id"])["status"] == "stopped"
        return newest

    at.text_input(key="tune_data").set_value(str(REPO / "corpora/corvida/qa/train.jsonl"))
    try:
        first = start_and_stop()
        second = start_and_stop()  # the picker held the first run; it moves to the second
        assert Path(second["config_path"]).parent.parent == app_env / "runs" / "corvida-demo"
        at.selectbox(key="run_pick").set_value(first["id"]).run()  # pick the older run by hand...
        assert at.selectbox(key="run_pick").value == first["id"]
        third = start_and_stop()  # ...and a new start still brings the picker to the new run
        assert first["id"] < second["id"] < third["id"]
    finally:  # a failed assertion must not leave a training process behind
        from serving.tune_jobs import job_registry

        for run in store.runs():
            if run["status"] == "running":
                job_registry().stop(run["id"], store)


def _wait(store, run_id: int, jobs, timeout: float = 400) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        jobs.refresh(store)
        run = store.run(run_id)
        if run["status"] != "running":
            return run
        time.sleep(1)
    raise AssertionError(f"run {run_id} did not finish in {timeout} s")


@pytest.mark.slow
def test_runs_get_their_own_folders_readable_logs_resume_and_keep(tune_home, tiny_sft_data, monkeypatch):
    """Two runs of one name keep separate logs; a run's checkpoint is resumed in its folder and kept as an adapter."""
    from serving import tune_jobs
    from serving.history import ChatStore

    monkeypatch.setenv("RAGTUNE_HOME", str(tune_home))
    (tune_home / "app.yaml").write_text(f"data_roots: ['{tiny_sft_data.parent}']\n", encoding="utf-8")
    store, jobs = ChatStore(tune_home / "ragtune.db"), tune_jobs.JobRegistry()
    values = {"name": "tiny", "data": [str(tiny_sft_data)], "max_steps": 2, "save_steps": 2, "eval_steps": 2,
              "logging_steps": 1, "batch_size": 4, "forgetting_probe": False, "progress": False, "threads": 1,
              "val_share": 0.25, "overwrite": True, "max_seq_len": 128}
    first = jobs.start(tune_home, values, store)
    with pytest.raises(ValueError, match="already going"):
        jobs.start(tune_home, values, store)
    run1 = _wait(store, first.run_id, jobs)
    assert run1["status"] == "done", tune_jobs.tail(run1["output_path"], 40)
    second = jobs.start(tune_home, {**values, "max_steps": 1, "save_steps": 1, "eval_steps": 1}, store)
    run2 = _wait(store, second.run_id, jobs)
    assert run2["status"] == "done", tune_jobs.tail(run2["output_path"], 40)
    dir1, dir2 = tune_jobs.run_dir_of(run1), tune_jobs.run_dir_of(run2)
    assert dir1 != dir2 and dir1.parent == dir2.parent == tune_home / "runs" / "tiny"
    view1, view2 = tune_jobs.run_view(run1), tune_jobs.run_view(run2)
    assert sorted(view1["curve"]["loss"]) == [1, 2] and sorted(view2["curve"]["loss"]) == [1]  # each its own log
    assert view1["progress"]["max_steps"] == 2 and view1["progress"]["step"] == 2
    log_text = (dir1 / "log.txt").read_text()
    assert "step 1/2" in log_text and "loss " in log_text and "tokens/s" in log_text and "ETA" in log_text
    assert "eval loss" in log_text
    assert json.loads((dir1 / "run.json").read_text())["run_id"] == dir1.name
    # resume run 1 from its checkpoint, in the same folder (it is already at max_steps: it ends at once)
    resumed = jobs.resume(tune_home, run1, store)
    run3 = _wait(store, resumed.run_id, jobs)
    assert run3["status"] == "done" and tune_jobs.run_dir_of(run3) == dir1, tune_jobs.tail(run3["output_path"], 40)
    assert "(resumed)" in (dir1 / "log.txt").read_text()
    # keep run 2's checkpoint as an adapter the registry and the generator accept
    path = tune_jobs.keep_checkpoint(tune_home, run2, "tiny-kept")
    assert (path / "adapter_model.safetensors").is_file()
    kept = [a for a in tune_jobs.list_adapters(tune_home) if a["name"] == "tiny-kept"]
    assert kept and not kept[0].get("error") and kept[0]["metrics"]["steps"] == 1
    from serving.generation import LocalGenerator

    generator = LocalGenerator("smollm2-135m-instruct", tune_home, quantize="int8")
    generator.check_adapter("tiny-kept")
    with pytest.raises(Exception, match="already exists"):
        tune_jobs.keep_checkpoint(tune_home, run2, "tiny-kept")


def test_view_helpers(tmp_path):
    from serving.tune_jobs import loss_curve, progress
    from serving.webapp import escape_markdown, eta_text, highlighted_span, sources_label

    assert escape_markdown("<b>[x](y)</b>") == "\\<b\\>\\[x\\]\\(y\\)\\</b\\>"
    assert escape_markdown("![i](http://h/p.png)") == "\\!\\[i\\]\\(http\\://h/p\\.png\\)"
    text = "before <i>span</i> after"
    assert highlighted_span(text, 7, 18, context=100) == "before :orange-background[\\<i\\>span\\</i\\>] after"
    rows = [{"event": "train", "step": 2, "loss": 1.5, "max_steps": 10, "eta_s": 40.0},
            {"event": "eval", "step": 2, "eval_loss": 1.7}, {"event": "train", "step": 4, "loss": 1.2, "max_steps": 10, "eta_s": 30.0}]
    assert loss_curve(rows) == {"loss": {2: 1.5, 4: 1.2}, "eval_loss": {2: 1.7}}
    assert progress(rows)["step"] == 4 and progress(rows)["eta_s"] == 30.0
    assert eta_text(5, 20, started=100.0, now=110.0) == "5/20 · 10s elapsed · ETA 30s"
    assert eta_text(0, 20, started=100.0, now=101.0).endswith("ETA ?")
    source = {"n": 1, "doc": "a.md", "cited": False}
    assert sources_label({"sources": [source], "refused": True}).startswith("Closest matches (1)")
    assert sources_label({"sources": [source, {**source, "cited": True}]}) == "Sources: 1 cited of 2"
    assert sources_label({"sources": []}) is None
    from serving.webapp import coalesce

    # the chat's stream reaches the page in fewer pieces: the first at once, the rest joined, nothing lost
    assert list(coalesce(iter(["The", " gasket", " is", " replaced"]), interval_s=60)) == ["The", " gasket is replaced"]
    assert list(coalesce(iter(["a", "b", "c"]), interval_s=0)) == ["a", "b", "c"]
    assert list(coalesce(iter([]))) == []
    from serving.webapp import timings_caption

    assert timings_caption({"queued_s": 2.04, "ttft_s": 2.5}).startswith("waited 2.0 s for a free slot · first token 2.50 s")
    assert "waited" not in timings_caption({"queued_s": 0.0, "ttft_s": 0.5})
    from core.progress import format_duration
    from tuning.training import readable_line

    assert readable_line({"event": "data", "train": 5, "time": 0}).endswith("data: 5 training rows")  # classification
    assert readable_line({"event": "data", "train": {"kept": 9}, "time": 0}).endswith("data: 9 training rows")  # sft
    line = readable_line({"event": "train", "step": 3, "max_steps": 60, "loss": 1.23456, "tokens_per_s": 410.2,
                          "step_s": 6.1, "eta_s": 347.7, "time": 0})
    assert line.endswith("step 3/60  loss 1.2346  410 tokens/s  6.1 s/step  ETA 5m48s")
    assert format_duration(4000) == "1h06m" and format_duration(None) == "?"


def test_ab_answers_keeps_only_the_questions_where_the_arms_disagree(tmp_path):
    """Stored results of a real A/B store: q1 both right, q2 base wrong and rag right, q3 both wrong, q4 unscored."""
    from rag.collection import Workspace
    from serving.ab.runs import ABStore
    from serving.webapp import ab_answers

    home = tmp_path / "home"
    store = ABStore(Workspace(home).db_path)
    run_id = store.open_run("disagree", {})
    outcomes = {"q1": (1.0, 1.0), "q2": (0.0, 1.0), "q3": (0.0, 0.0), "q4": (None, None)}
    for qid, pair in outcomes.items():
        for arm, correct in zip(("base", "rag"), pair):
            scores = {} if correct is None else {"correct": correct}
            store.put(run_id, qid, arm, f"{qid}-{arm}", {"text": f"{arm} says {qid}"},
                      {"question": f"question {qid}", "answer": "ref", "scores": scores})
    store.finish_run(run_id)
    every = ab_answers(home, "disagree")
    assert [r["id"] for r in every] == ["q1", "q2", "q3", "q4"]
    assert [r["arms disagree"] for r in every] == [False, True, False, False]
    only = ab_answers(home, "disagree", only_disagreements=True)
    assert [(r["id"], r["base correct"], r["rag correct"], r["rag"]) for r in only] == [("q2", "no", "yes", "rag says q2")]


def test_ab_page_names_a_run_shows_answers_and_an_honest_leaderboard(app_env):
    from serving.ab.runs import ABStore

    at = _app().run()
    at.switch_page("pages/ab.py").run()
    assert not at.exception
    # an offline run with a name, 2 questions, arms base and rag
    at.text_input(key="ab_run_name").set_value("my-run")
    [m for m in at.multiselect if m.label == "Arms"][0].set_value(["base", "rag"])
    [n for n in at.number_input if n.label.startswith("Questions")][0].set_value(2)
    [b for b in at.button if b.label == "Run"][0].click().run()
    assert not at.exception, at.exception
    assert any(s.value.startswith("my-run:") for s in at.success)
    assert at.selectbox(key="ab_report_pick").value == "my-run"
    answers = [d for d in at.dataframe if "question" in list(d.value.columns)]
    assert answers and len(answers[0].value) == 2 and {"base", "rag"} <= set(answers[0].value.columns)
    assert any(c.value == "2 question(s)" for c in at.caption)
    table = answers[0].value
    disagree = sorted(table.loc[table["arms disagree"], "id"])
    assert all((table["base correct"] != table["rag correct"]) == table["arms disagree"])
    at.toggle(key="ab_only_disagree").set_value(True).run()
    assert not at.exception
    # the toggle keeps exactly the questions where one arm is correct and the other is not
    assert any(c.value == f"{len(disagree)} question(s)" for c in at.caption), [c.value for c in at.caption]
    shown = [d for d in at.dataframe if "question" in list(d.value.columns)]
    assert sorted(shown[0].value["id"]) == disagree if shown else disagree == []
    # the arena: one vote reveals the arms and the leaderboard claims nothing
    assert at.selectbox(key="arena_collection").value == "corvida"
    at.text_input(key="arena_question").set_value("When is the Vexa-7 gasket replaced?")
    next(b for b in at.button if b.label == "Ask both").click().run()
    assert not at.exception
    votes = [b for b in at.button if b.key and b.key.startswith("vote_")]
    assert {b.key for b in votes} == {"vote_a", "vote_b", "vote_tie", "vote_both_bad"}
    assert not any("A was" in s.value for s in at.success)  # arms stay hidden before the vote
    next(b for b in votes if b.key == "vote_a").click().run()
    assert not at.exception
    revealed = [s.value for s in at.success if "A was" in s.value]
    stored = ABStore(app_env / "ragtune.db").votes()
    assert revealed and len(stored) >= 1 and stored[-1][2] == "a" and stored[-1][0] != stored[-1][1]
    assert any("votes, Bradley-Terry" in h.value for h in at.subheader)
    captions = " ".join(c.value for c in at.caption)
    assert "Too few votes" in captions and "separated:" not in captions


def test_engine_loads_in_the_background_with_progress_and_an_estimate(tune_home, monkeypatch):
    """The model loads in a thread while pages render: its status reports the phase and, from the second
    start on, the previous load's duration as the estimate; a failed load shows its error on the page."""
    from serving import webapp

    config_json = webapp.serve_config_json()
    first = webapp.Engine(str(tune_home), config_json)
    status = first.status()
    assert not status["ready"] and status["error"] is None
    assert status["phase"] in ("starting", "loading the model", "warming up (embedding models, first token)")
    assert status["expected_s"] is None and status["fraction"] is None  # no earlier load to estimate from
    assert first.wait(300) is not None and first.status()["phase"] == "ready" and first.loaded_in > 0
    second = webapp.Engine(str(tune_home), config_json)
    try:
        assert second.expected_s == pytest.approx(first.loaded_in, abs=0.05)  # stored to 0.1 s
        fraction = second.status()["fraction"]
        assert fraction is not None and 0.0 <= fraction <= 0.95
    finally:
        second.wait(300)
    # a model that cannot load: the chat page says so, with the error, instead of waiting forever
    bad = tune_home / "bad-serve.yaml"
    bad.write_text("base_model: /nonexistent/model-folder\n", encoding="utf-8")
    monkeypatch.setenv("RAGTUNE_HOME", str(tune_home))
    monkeypatch.setenv("RAGTUNE_SERVE_CONFIG", str(bad))
    at = _app().run()
    assert not at.exception and not at.chat_input
    assert at.error and "could not be loaded" in at.error[0].value and "nonexistent" in at.error[0].value, \
        [e.value for e in at.error]


def test_chat_hints_what_a_mode_needs_next_to_the_question_box(tune_home, tmp_path, monkeypatch):
    """No adapter and no collection: the hints sit below the conversation, right above the question box
    (they used to scroll out of view), and asking anyway keeps the question and its error across reruns."""
    config = tmp_path / "serve.yaml"
    config.write_text("max_new_tokens: 4\n", encoding="utf-8")
    monkeypatch.setenv("RAGTUNE_HOME", str(tune_home))
    monkeypatch.setenv("RAGTUNE_SERVE_CONFIG", str(config))
    at = _app().run()
    at.radio(key="mode").set_value("base").run()
    at.chat_input[0].set_value("Name a colour.").run()
    assert not at.exception and not at.info  # base needs neither
    at.radio(key="mode").set_value("rag+ft").run()
    hints = [i.value for i in at.info]
    assert any("needs a fine-tuned adapter" in h and "ragtune tune" in h for h in hints), hints
    assert any("No collection yet" in h for h in hints), hints

    def order(node, out):  # element types in page order, depth first
        for child in getattr(node, "children", {}).values():
            out.append(getattr(child, "type", ""))
            order(child, out)
        return out

    kinds = order(at.main, [])
    assert kinds.index("info") > max(i for i, kind in enumerate(kinds) if kind == "chat_message"), kinds
    at.chat_input[0].set_value("When is the Vexa-7 gasket replaced?").run()
    assert not at.exception and at.error
    at.run()
    assert at.error and any("gasket" in m.markdown[0].value for m in at.chat_message if m.name == "user" and m.markdown)
