"""The Streamlit app through streamlit.testing.v1.AppTest (one test per page) and its view helpers."""

from __future__ import annotations

import json
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


def test_chat_page_renders_a_rag_answer_with_sources(app_env):
    from serving.history import ChatStore

    at = _app().run()
    assert not at.exception
    assert at.radio(key="mode").value == "rag" and at.selectbox(key="collection").value == "corvida"
    assert sorted(at.selectbox(key="adapter").options) == ["alpha", "beta"]
    at.chat_input[0].set_value("When is the Vexa-7 gasket replaced?").run()
    assert not at.exception
    assistant = [m for m in at.chat_message if m.name == "assistant"]
    assert assistant and assistant[0].markdown[0].value.strip()
    assert any(e.label.startswith("Sources") for e in at.expander)
    bodies = [md.value for md in assistant[0].markdown]
    source_md = [b for b in bodies if "Vexa" in b and "INJECTED" in b]
    assert source_md, bodies
    # the injected markup is escaped: every '<' of the document is shown as text
    assert all(b.count("<") == b.count("\\<") for b in source_md)
    assert any("first token" in c.value for c in at.caption)
    chats = ChatStore(app_env / "ragtune.db").chats()
    assert chats and chats[0]["messages"] >= 2
    # ft mode with an adapter, then an invalid request shows a one-line error, not a traceback
    at.radio(key="mode").set_value("ft").run()
    at.chat_input[0].set_value("Name a colour.").run()
    assert not at.exception and len([m for m in at.chat_message if m.name == "assistant"]) == 2
    at.chat_input[0].set_value("x" * 2100).run()
    assert not at.exception and "over the limit" in at.error[0].value


def test_collections_page_indexes_a_folder_and_drops_it(tmp_path, monkeypatch):
    home = tmp_path / "home"
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.md").write_text("# A\n\nThe Orla pump is blue.\n", encoding="utf-8")
    (docs / "b.txt").write_text("The Brin valve is red.\n", encoding="utf-8")
    monkeypatch.setenv("RAGTUNE_HOME", str(home))
    at = _app()
    at.switch_page("pages/collections.py").run()
    assert not at.exception and "No collection yet" in at.info[0].value
    at.text_input(key="folder_collection").set_value("notes")
    [t for t in at.text_input if t.label == "Folder on this server"][0].set_value(str(docs))
    [b for b in at.button if b.label == "Index folder"][0].click().run()
    assert not at.exception
    assert "notes: 2 added" in at.success[0].value
    at.run()
    assert at.selectbox(key="inspect").value == "notes"
    at.checkbox(key="sure_drop").check().run()
    [b for b in at.button if b.label == "Delete collection"][0].click().run()
    assert not at.exception
    from rag.collection import Workspace

    assert Workspace(home).names() == []


def test_tuning_page_lists_adapters_and_refuses_bad_config(app_env):
    at = _app()
    at.switch_page("pages/tuning.py").run()
    assert not at.exception
    labels = [e.label for e in at.expander]
    assert any(l.startswith("alpha") for l in labels) and any(l.startswith("foreign") for l in labels)
    [t for t in at.text_input if t.label.startswith("Training data")][0].set_value("/nonexistent/data.jsonl")
    [b for b in at.button if b.label == "Start training"][0].click().run()
    assert not at.exception and at.error and "not found" in at.error[0].value


def test_view_helpers(tmp_path):
    from serving.webapp import escape_markdown, highlighted_span, loss_curve, safe_filename, save_uploads

    assert safe_filename("../../etc/passwd") == "passwd"
    assert safe_filename("..\\..\\win.ini") == "win.ini"
    assert safe_filename(".hidden") == "hidden" and safe_filename("a b<>|?.md") == "a b.md"
    assert safe_filename("") == "upload"
    written = save_uploads(tmp_path, "docs", [("../../evil.md", b"x"), ("ok.txt", b"y")])
    folder = (tmp_path / "uploads" / "docs").resolve()
    assert [p.parent for p in written] == [folder, folder] and (folder / "evil.md").read_bytes() == b"x"
    with pytest.raises(Exception, match="invalid collection name"):
        save_uploads(tmp_path, "../x", [("a.md", b"")])
    assert escape_markdown("<b>[x](y)</b>") == "\\<b\\>\\[x\\]\\(y\\)\\</b\\>"
    text = "before <i>span</i> after"
    md = highlighted_span(text, 7, 18, context=100)
    assert md == "before :orange-background[\\<i\\>span\\</i\\>] after"
    rows = [{"event": "train", "step": 2, "loss": 1.5}, {"event": "eval", "step": 2, "eval_loss": 1.7},
            {"event": "train", "step": 4, "loss": 1.2}]
    assert loss_curve(rows) == {"loss": {2: 1.5, 4: 1.2}, "eval_loss": {2: 1.7}}
    assert json.loads(json.dumps(loss_curve(rows)))  # chartable


def test_ab_page_arena_vote_reveals_arms_and_updates_the_leaderboard(app_env):
    from serving.ab.runs import ABStore

    at = _app().run()
    at.switch_page("pages/ab.py").run()
    assert not at.exception
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
    assert revealed
    stored = ABStore(app_env / "ragtune.db").votes()
    assert len(stored) == 1 and stored[0][2] == "a" and stored[0][0] != stored[0][1]
    assert f"`{stored[0][0]}`" in revealed[0] and f"`{stored[0][1]}`" in revealed[0]
    assert any("Leaderboard (1 votes" in h.value for h in at.subheader)
