"""Issue 14, the app's part: names from users become paths only through core.names, folders and data only
inside the configured roots, uploads indexed exactly and removed when they fail, deletion final, text
escaped so nothing is fetched, and the optional password. Real Workspace, real SQLite and FAISS."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest

from core.names import InvalidName


@pytest.fixture()
def app_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("RAGTUNE_HOME", str(home))
    return home


def _docx_bomb() -> bytes:
    """A .docx whose XML is broken: the loader fails on it."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("[Content_Types].xml", "<Types/>")
        z.writestr("word/document.xml", "<w:document><w:body><unclosed>")
    return buf.getvalue()


# ------------------------------------------------------------------------------------- names

@pytest.mark.parametrize("bad", ["../x", "..", "a/b", "/etc", "", "x" * 80, ".hidden", "a\x00b"])
def test_collection_names_that_are_not_plain_are_refused_before_anything_is_written(app_home, bad):
    from serving import webapp

    with pytest.raises(InvalidName):
        webapp.upload_and_index(app_home, bad, [("a.md", b"# A\n\ntext\n")])
    assert not (app_home / "uploads").exists() or not any((app_home / "uploads").rglob("a.md"))
    assert not (app_home.parent / "x").exists()


@pytest.mark.parametrize("given,expected", [
    ("../../etc/passwd", "passwd"), ("..\\..\\win.ini", "win.ini"), (".hidden", "upload.hidden"),
    ("a b<>|?.md", "a_b.md"), ("", "upload"), ("..", "upload"), ("/abs/path/x.txt", "x.txt"),
    ("x" * 200 + ".md", "x" * 61 + ".md"), ("ü ñ.md", "upload.md"), ("a..b.md", "a.b.md"), ("x.<>", "x"),
])
def test_upload_names_become_plain_names(given, expected):
    from core.names import check_name
    from serving.webapp import safe_filename

    got = safe_filename(given)
    assert check_name(got, "upload name") == got
    assert got == expected


def test_save_uploads_stays_in_the_collection_folder_and_refuses_a_planted_symlink(tmp_path):
    from serving.webapp import save_uploads

    written = save_uploads(tmp_path, "docs", [("../../evil.md", b"x"), ("ok.txt", b"y")])
    folder = tmp_path / "uploads" / "docs"
    assert [p.parent for p in written] == [folder, folder] and (folder / "evil.md").read_bytes() == b"x"
    outside = tmp_path / "outside.md"
    outside.write_text("keep me")
    (folder / "link.md").symlink_to(outside)
    with pytest.raises(InvalidName, match="outside"):
        save_uploads(tmp_path, "docs", [("link.md", b"overwrite")])
    assert outside.read_text() == "keep me"


def test_ab_run_names_cannot_leave_the_reports_folder(app_home):
    from serving import webapp

    with pytest.raises(InvalidName):
        webapp.run_ab(app_home, None, "corpora/corvida/qa/test.jsonl", None, None, ["base"], 1, "../../x")
    assert webapp.default_run_name("corpora/corvida/qa/test.jsonl", "corvida", None).startswith("test-corvida-")


# ------------------------------------------------------------------------------------- roots

def test_index_folder_only_inside_the_configured_roots(app_home, tmp_path):
    from serving import webapp

    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "passwords.txt").write_text("root:hunter2\n")
    with pytest.raises(InvalidName, match="outside the allowed folders"):
        webapp.index_folder(app_home, "stolen", str(secret))
    with pytest.raises(InvalidName, match="outside the allowed folders"):
        webapp.index_folder(app_home, "stolen", "/etc")
    # a symlink inside an allowed root that points outside it is refused too
    uploads = app_home / "uploads"
    uploads.mkdir()
    (uploads / "escape").symlink_to(secret, target_is_directory=True)
    with pytest.raises(InvalidName):
        webapp.index_folder(app_home, "stolen", str(uploads / "escape"))
    assert "stolen" not in webapp.collections(app_home)
    # configured roots replace the defaults; unknown keys in app.yaml are refused with the known ones listed
    (app_home / "app.yaml").write_text(f"index_roots: [{secret}]\n")
    report = webapp.index_folder(app_home, "allowed", str(secret))
    assert report.added == 1
    (app_home / "app.yaml").write_text("index_root: [/]\n")
    with pytest.raises(ValueError, match="unknown key.*index_roots"):
        webapp.index_roots(app_home)


def test_tuning_data_only_inside_the_data_roots(app_home, tmp_path):
    from serving import tune_jobs

    outside = tmp_path / "elsewhere" / "train.jsonl"
    outside.parent.mkdir()
    outside.write_text('{"instruction": "a", "output": "b"}\n')
    with pytest.raises(InvalidName, match="outside the allowed folders"):
        tune_jobs.check_tune_values(app_home, {"name": "x", "data": [str(outside)]})
    with pytest.raises(InvalidName, match="outside the allowed folders"):
        tune_jobs.check_tune_values(app_home, {"name": "x", "data": ["/etc/passwd"]})
    with pytest.raises(InvalidName):
        tune_jobs.check_tune_values(app_home, {"name": "x", "data": [str(tune_jobs.REPO / "corpora/corvida/qa/train.jsonl")],
                                               "eval_data": str(outside)})
    inside = app_home / "data" / "train.jsonl"
    inside.parent.mkdir()
    inside.write_text(outside.read_text())
    assert tune_jobs.check_tune_values(app_home, {"name": "x", "data": [str(inside)]}).name == "x"
    with pytest.raises(ValueError, match="not found"):
        tune_jobs.check_tune_values(app_home, {"name": "x", "data": [str(app_home / "data" / "missing.jsonl")]})


# ------------------------------------------------------------------------------------- uploads

def test_upload_indexes_exactly_the_uploaded_file_removes_failures_and_deletion_is_final(app_home):
    from serving import webapp

    first = webapp.upload_and_index(app_home, "notes", [("a.md", b"# A\n\nThe Orla pump is blue.\n")])
    assert first.added == 1
    folder = app_home / "uploads" / "notes"
    # a file dropped into the upload folder by other means is not indexed by the next upload
    (folder / "stray.md").write_text("# Stray\n\nnot uploaded through the app\n")
    second = webapp.upload_and_index(app_home, "notes", [("b.txt", b"The Brin valve is red.\n")])
    assert second.added == 1 and second.unchanged == 0 and second.failed == []
    assert sorted(d["path"] for d in webapp.documents(app_home, "notes")) == ["a.md", "b.txt"]
    # a bad file is reported, its upload removed, and the good file of the same batch still indexed
    third = webapp.upload_and_index(app_home, "notes", [("broken.docx", _docx_bomb()), ("c.md", b"# C\n\ncyan\n")])
    assert [Path(f["path"]).name for f in third.failed] == ["broken.docx"] and third.added == 1
    assert not (folder / "broken.docx").exists()
    # so the next upload is not blocked by it
    assert webapp.upload_and_index(app_home, "notes", [("d.md", b"# D\n\ndun\n")]).failed == []
    # delete a document: it and its upload file are gone, and later uploads never bring it back
    assert webapp.delete_documents(app_home, "notes", ["a.md"]) == 1
    assert not (folder / "a.md").exists()
    webapp.upload_and_index(app_home, "notes", [("e.md", b"# E\n\negg\n")])
    assert "a.md" not in [d["path"] for d in webapp.documents(app_home, "notes")]
    # an empty upload is a clear error and writes nothing
    with pytest.raises(ValueError, match="choose at least one file"):
        webapp.upload_and_index(app_home, "notes", [])
    webapp.drop_collection(app_home, "notes")
    assert not folder.exists() and "notes" not in webapp.collections(app_home)


def test_upload_over_the_size_limit_is_refused_and_not_kept(app_home):
    from serving import webapp

    (app_home / "app.yaml").write_text("max_upload_mb: 1\n")
    with pytest.raises(ValueError, match="over the upload limit"):
        webapp.upload_and_index(app_home, "big", [("big.txt", b"x" * 1_100_000)])
    assert not list((app_home / "uploads").rglob("big.txt"))


# ------------------------------------------------------------------------------------ display

@pytest.mark.parametrize("text", [
    "![pixel](http://127.0.0.1:9/pixel.png)", "[click](javascript:alert(1))", "<img src=http://127.0.0.1:9/x>",
    "![ref][1]\n\n[1]: http://127.0.0.1:9/y.png", "$$\\href{http://x}{y}$$",
])
def test_escaped_text_has_no_markdown_link_image_or_html(text):
    from serving.webapp import escape_markdown

    escaped = escape_markdown(text)
    live = _unescaped(escaped)  # the characters Markdown still treats as syntax
    for token in ("![", "](", "<img", "]:", "$$", "["):
        assert token not in live, (text, escaped)


def _unescaped(escaped: str) -> str:
    """Only the characters that are live Markdown after escaping (escaped ones dropped)."""
    out, i = [], 0
    while i < len(escaped):
        if escaped[i] == "\\" and i + 1 < len(escaped):
            i += 2
            continue
        out.append(escaped[i])
        i += 1
    return "".join(out)


# ------------------------------------------------------------------------------------ password

def test_password_hash_verifies_and_is_never_the_password(app_home):
    from serving import webapp

    stored = webapp.hash_password("correct horse")
    assert stored.startswith("scrypt$") and "correct horse" not in stored
    assert webapp.verify_password("correct horse", stored) and not webapp.verify_password("wrong", stored)
    assert webapp.hash_password("correct horse") != stored  # salted
    assert not webapp.verify_password("x", "scrypt$garbage")
    assert not webapp.password_required(app_home)
    (app_home / "app.yaml").write_text(f"password_hash: '{stored}'\n")
    assert webapp.password_required(app_home) and webapp.check_password(app_home, "correct horse")
    (app_home / "app.yaml").write_text("password_hash: correct horse\n")
    with pytest.raises(ValueError, match="never put the password itself"):
        webapp.password_required(app_home)
