"""Hostile input on every surface this layer owns: names that would become paths, files that would
stop or swamp an indexing run, filters that would reach SQL, and creation races between processes.

Each class is tested through the surface where it was found: the ``ragtune`` command (its installed
entry point, in a subprocess), the Python API, and real concurrent processes.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest

RAGTUNE = str(Path(sys.executable).parent / "ragtune")
REPO = Path(__file__).resolve().parents[1]


def cli(*args: str, home: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAGTUNE_HOME": str(home)}
    return subprocess.run([RAGTUNE, *args], capture_output=True, text=True, env=env, timeout=timeout)


def one_line_error(out: subprocess.CompletedProcess, *needles: str) -> None:
    assert out.returncode == 1, (out.returncode, out.stdout, out.stderr)
    assert "Traceback" not in out.stderr, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def planted_victim(tmp_path: Path) -> Path:
    """A folder outside the workspace that looks like an adapter (it holds a ragtune.json)."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "ragtune.json").write_text('{"name": "victim", "task": "sft"}', encoding="utf-8")
    (victim / "precious.txt").write_text("keep me", encoding="utf-8")
    return victim


# --- 1. names that would become paths ------------------------------------------------------------

BAD_NAMES = ["../../victim", "../victim", "./x", "././x", "/tmp", "a/b", "..", "x/../y", "x\\y", ".hidden"]


@pytest.mark.parametrize("name", ["../../victim", "./x", "/etc"])
def test_cli_ask_refuses_adapter_paths_before_loading_anything(home, name):
    out = cli("ask", "What is the warranty?", "--adapter", name, home=home)
    one_line_error(out, "adapter name")


def test_cli_adapters_rm_never_deletes_outside_the_workspace(home, tmp_path):
    victim = planted_victim(tmp_path)
    home.mkdir(parents=True, exist_ok=True)
    rel = os.path.relpath(victim, home / "adapters")
    for name in (rel, str(victim), "../" + victim.name):
        out = cli("adapters", "rm", name, home=home)
        one_line_error(out, "adapter name")
    assert (victim / "precious.txt").read_text() == "keep me"


def test_python_api_refuses_adapter_names_everywhere(tmp_path):
    from tuning.adapters import adapter_dir, get_adapter, remove_adapter
    from tuning.errors import AdapterError

    home = tmp_path / "home"
    victim = planted_victim(tmp_path)
    (home / "adapters").mkdir(parents=True)
    (home / "adapters" / "link").symlink_to(victim)  # a link planted inside the registry
    for name in BAD_NAMES + [str(victim), "link", os.path.relpath(victim, home / "adapters")]:
        for call in (adapter_dir, get_adapter, remove_adapter):
            with pytest.raises(AdapterError):
                call(home, name)
    assert victim.exists() and (home / "adapters" / "link").is_symlink()


def test_generator_refuses_adapter_paths_and_loads_no_copy(serving_generator, serving_home):
    from serving.config import ServingError

    before = serving_generator.loaded_adapters()
    alpha = serving_home / "adapters" / "alpha"
    for name in ("../adapters/alpha", "./alpha", "././alpha", str(alpha), "alpha/", "../../x"):
        with pytest.raises(ServingError, match="adapter name"):
            serving_generator.check_adapter(name)
        with pytest.raises(ServingError):
            serving_generator.load_adapter(name)
    assert serving_generator.loaded_adapters() == before
    assert str(serving_home) not in str(pytest.raises(ServingError, serving_generator.check_adapter, "../x").value)


def test_cli_ab_run_names_cannot_escape_the_reports_folder(home, tmp_path):
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"id": "q1", "question": "What?", "answer": "x"}\n', encoding="utf-8")
    for name in ("../../x", "/tmp/x", "a/b", ".."):
        out = cli("ab", "run", "--questions", str(questions), "--arms", "base", "--name", name, home=home)
        one_line_error(out, "A/B run name")
        out = cli("ab", "report", name, home=home)
        one_line_error(out, "A/B run name")
    assert not (tmp_path / "x").exists()


def test_ab_store_refuses_run_names_in_the_python_api(tmp_path):
    from core.names import InvalidName
    from serving.ab.runs import ABStore

    store = ABStore(tmp_path / "ragtune.db")
    for name in BAD_NAMES:
        with pytest.raises(InvalidName):
            store.open_run(name, {})
    assert store.runs() == []


def test_cli_refuses_collection_names_that_are_paths(home, small_docs):
    for name in ("../x", "/etc", "a/b", ".."):
        out = cli("index", str(small_docs), "--collection", name, home=home)
        one_line_error(out, "collection name")
    assert not (home.parent / "x").exists()


# --- 2. indexing that never stops for one file ---------------------------------------------------

def docx_bytes(document_xml: bytes) -> bytes:
    """A minimal .docx (the parts python-docx needs) around ``document_xml``."""
    content_types = (b'<?xml version="1.0" encoding="UTF-8"?><Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
                     b'<Default Extension="rels" ContentType="application/vnd.openxmlformats-package.relationships+xml"/>'
                     b'<Default Extension="xml" ContentType="application/xml"/>'
                     b'<Override PartName="/word/document.xml" ContentType="application/vnd.openxmlformats-officedocument.wordprocessingml.document.main+xml"/>'
                     b'</Types>')
    rels = (b'<?xml version="1.0" encoding="UTF-8"?><Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships">'
            b'<Relationship Id="rId1" Type="http://schemas.openxmlformats.org/officeDocument/2006/relationships/officeDocument" Target="word/document.xml"/>'
            b'</Relationships>')
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        z.writestr("[Content_Types].xml", content_types)
        z.writestr("_rels/.rels", rels)
        z.writestr("word/document.xml", document_xml)
    return buf.getvalue()


W = b'xmlns:w="http://schemas.openxmlformats.org/wordprocessingml/2006/main"'


def good_docx(text: str) -> bytes:
    return docx_bytes(b'<?xml version="1.0" encoding="UTF-8"?><w:document ' + W + b'><w:body><w:p><w:r><w:t>'
                      + text.encode() + b'</w:t></w:r></w:p></w:body></w:document>')


def docx_bomb(paragraphs: int) -> bytes:
    para = b"<w:p><w:r><w:t>" + b"A" * 1000 + b"</w:t></w:r></w:p>"
    return docx_bytes(b'<?xml version="1.0" encoding="UTF-8"?><w:document ' + W + b"><w:body>"
                      + para * paragraphs + b"</w:body></w:document>")


def hostile_folder(root: Path) -> dict[str, str]:
    """Good files plus one of each kind of bad file; returns {bad file: expected words in its error}."""
    from pdf_fixture import make_pdf

    root.mkdir(parents=True, exist_ok=True)
    (root / "good.md").write_text("# Good\n\nThe HX-9 warranty lasts seven years.\n", encoding="utf-8")
    (root / "good.docx").write_bytes(good_docx("The Lumo 2 controller costs 189 EUR."))
    (root / "good.pdf").write_bytes(make_pdf(["The Tessa cylinder holds 200 litres."]))
    bad = {
        "malformed.docx": docx_bytes(b'<?xml version="1.0"?><w:document ' + W + b"><w:body><w:p>unclosed"),
        "notzip.docx": b"PK\x03\x04 this is not really a zip archive",
        "bomb.docx": docx_bomb(30_000),  # ~30 MB of XML in a ~60 KB file
        "truncated.pdf": make_pdf(["Half a page."])[:120],
        "random.pdf": os.urandom(4096),
        "empty.txt": b"",
        "binary.md": b"\x00\x01\x02\x03" * 100,
        "latin1.txt": "caf\xe9 cr\xe8me br\xfbl\xe9e".encode("latin-1"),
        "utf16.md": "# Titel\n\nText".encode("utf-16"),
        "badrow.jsonl": b'{"text": "ok"}\n{not json\n',
        "deep.jsonl": b"[" * 100_000 + b"\n",
        "nodoc.docx": zip_without_document(),
        "entities.docx": docx_bytes(entity_bomb()),
        "header-only.pdf": b"%PDF-1.4\n",
        "bom-only.txt": b"\xef\xbb\xbf",
    }
    for name, data in bad.items():
        (root / name).write_bytes(data)
    (root / "nested.html").write_bytes(b"<html><body>" + b"<div>" * 50_000 + b"deep</body></html>")  # valid, indexed
    os.mkfifo(root / "pipe.txt")  # reading it would block forever
    with open(os.path.join(os.fsencode(root), b"latin1-\xe9t\xe9.md"), "wb") as fh:  # a file name that is not UTF-8
        fh.write(b"# Summer\n\nA file whose name SQLite cannot store as text.\n")
    return {name: "" for name in bad} | {"pipe.txt": "not a regular file", "latin1-\\udce9t\\udce9.md": "not valid UTF-8"}


def zip_without_document() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("[Content_Types].xml", "<Types/>")
    return buf.getvalue()


def entity_bomb() -> bytes:
    """document.xml with nested entities ("billion laughs"): 10 characters grown tenfold eight times."""
    levels = [b'<!ENTITY a "aaaaaaaaaa">']
    for i in range(8):
        name, previous = chr(98 + i).encode(), chr(97 + i).encode()
        levels.append(b"<!ENTITY " + name + b' "' + (b"&" + previous + b";") * 10 + b'">')
    return (b'<?xml version="1.0"?><!DOCTYPE d [' + b"".join(levels) + b"]><w:document " + W
            + b"><w:body><w:p><w:r><w:t>&i;</w:t></w:r></w:p></w:body></w:document>")


def test_python_api_indexes_good_files_and_reports_every_bad_one(home, tmp_path):
    from rag.collection import Workspace

    root = tmp_path / "docs"
    expected = hostile_folder(root)
    started = time.perf_counter()
    report = Workspace(home).index("h", [root])
    seconds = time.perf_counter() - started
    failed = {f["path"]: f["error"] for f in report.failed}
    assert report.added == 4, report  # the three good files and the deeply nested (valid) HTML
    assert set(failed) == set(expected), failed
    for name, words in expected.items():
        assert words in failed[name], (name, failed[name])
    assert "max_text_chars" in failed["bomb.docx"] and "MiB" in failed["bomb.docx"]
    for name, error in failed.items():
        assert "\n" not in error and len(error) < 400, (name, error)
    # nothing hung (the FIFO blocks forever) or ran away (the bomb alone took 60 s before); generous
    # because the machine is shared: the loaders take ~3 s here, the rest is loading the embedder
    assert seconds < 300, seconds
    col = Workspace(home).get("h")
    assert "189 EUR" in col.search("Lumo 2 controller price", k=1)[0].text


def test_cli_index_reports_bad_files_and_exits_partial(home, tmp_path):
    root = tmp_path / "docs"
    hostile_folder(root)
    out = cli("index", str(root), "--collection", "h", "--json", home=home)
    assert out.returncode == 3, out.stderr
    assert "Traceback" not in out.stderr
    report = json.loads(out.stdout)
    assert report["added"] == 4 and {"malformed.docx", "bomb.docx", "pipe.txt"} <= {f["path"] for f in report["failed"]}


def test_cli_limits_are_settable_per_collection_and_per_run(home, tmp_path):
    root = tmp_path / "docs"
    root.mkdir()
    (root / "long.txt").write_text("word " * 2000, encoding="utf-8")
    out = cli("index", str(root), "--collection", "l", "--set", "max_text_chars=1000", "--json", home=home)
    assert out.returncode == 3 and "max_text_chars=1,000" in json.loads(out.stdout)["failed"][0]["error"]
    out = cli("index", str(root), "--collection", "l", "--set", "max_text_chars=100000", "--json", home=home)
    assert out.returncode == 0 and json.loads(out.stdout)["added"] == 1, out.stderr  # raised for this run
    one_line_error(cli("index", str(root), "--collection", "l", "--set", "chunk_tokens=64", home=home), "ragtune reindex l")
    one_line_error(cli("index", str(root), "--collection", "l", "--set", "max_text_chars=-5", home=home), "max_text_chars")
    one_line_error(cli("index", str(root), "--collection", "n", "--set", "bogus=1", home=home), "unknown key")


def test_devices_and_pipes_given_directly_are_refused(home, tmp_path):
    fifo = tmp_path / "direct.txt"
    os.mkfifo(fifo)
    out = cli("index", "/dev/zero", str(fifo), "--collection", "d", "--json", home=home, timeout=120)
    assert out.returncode == 3, out.stderr
    errors = {f["path"]: f["error"] for f in json.loads(out.stdout)["failed"]}
    assert "not a regular file" in errors["/dev/zero"] and "not a regular file" in errors[str(fifo)]


def test_a_file_turning_hostile_loses_nothing_already_stored(home, tmp_path):
    from rag.collection import Workspace

    root = tmp_path / "docs"
    root.mkdir()
    (root / "spec.docx").write_bytes(good_docx("The HX-14 weighs 118 kg."))
    ws = Workspace(home)
    ws.index("s", [root])
    (root / "spec.docx").write_bytes(docx_bomb(30_000))
    report = ws.index("s", [root], sync=True)
    assert report.deleted == 0 and report.failed[0]["path"] == "spec.docx"
    assert "118 kg" in ws.get("s").document_text("spec.docx")


def test_text_and_time_limits_are_config_fields(home, tmp_path):
    from core.config import ConfigError
    from rag.collection import IndexConfig, Workspace

    root = tmp_path / "docs"
    root.mkdir()
    (root / "long.txt").write_text("word " * 2000, encoding="utf-8")
    report = Workspace(home).index("t", [root], config=IndexConfig(max_text_chars=1000))
    assert "max_text_chars=1,000" in report.failed[0]["error"]
    report = Workspace(home).index("t2", [root], config=IndexConfig(max_seconds_per_file=1e-9))
    assert "max_seconds_per_file" in report.failed[0]["error"]
    for bad in ({"max_text_chars": 0}, {"max_seconds_per_file": -1}, {"max_seconds_per_file": "nan"}):
        with pytest.raises(ConfigError):
            from core.config import build_config

            build_config(IndexConfig, bad)


def test_the_time_limit_interrupts_a_long_call_in_the_main_thread():
    import signal

    from rag.documents import Budget, DocumentError, hard_deadline

    started = time.perf_counter()
    with pytest.raises(DocumentError, match="max_seconds_per_file=0.2"):
        with hard_deadline(Budget(max_seconds=0.2)):
            while True:  # one call that never checks the budget itself
                sum(range(10_000))
    assert time.perf_counter() - started < 5
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)  # the timer is cancelled afterwards


def test_docx_bomb_is_refused_before_it_is_inflated():
    from rag.documents import Budget, DocumentError, load_bytes

    data = docx_bomb(100_000)  # ~100 MB of XML packed into ~200 KB
    started = time.perf_counter()
    with pytest.raises(DocumentError, match="expands to"):
        load_bytes(Path("bomb.docx"), data, budget=Budget())
    assert time.perf_counter() - started < 5


# --- 3. filters: the dict form is checked like the string form -----------------------------------

INJECTIONS = [
    "section') = 'x' OR 1=1 OR json_extract(c.metadata_json, '$.a",
    "a' ) OR (SELECT COUNT(*) FROM documents WHERE path LIKE 'secret%') > 0 --",
    "x\"]') OR 1=1 --",
    "a b",
    "1abc",
    "",
    "doc; DROP TABLE chunks",
]


@pytest.fixture()
def two_collections(home, small_docs, tmp_path):
    from rag.collection import Workspace

    ws = Workspace(home)
    ws.index("public", [small_docs])
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "secret-plans.md").write_text("# Plans\n\nThe merger closes in March.\n", encoding="utf-8")
    ws.index("private", [secret])
    return ws


def test_dict_filter_keys_are_refused_in_the_python_api(two_collections):
    from rag.collection import CollectionError

    col = two_collections.get("public")
    for key in INJECTIONS + [1, None, ("a",)]:
        with pytest.raises(CollectionError, match="filter key"):
            col.search("warranty", where={key: "x"})
    for key in INJECTIONS:
        with pytest.raises(CollectionError):
            col.search("warranty", where=[f"{key}=x"])
    for where in ("section", 42, {"section"}, [None]):
        with pytest.raises(CollectionError):
            col.search("warranty", where=where)  # type: ignore[arg-type]
    for value in (["a"], {"a": 1}, None, float("nan")):
        with pytest.raises(CollectionError, match="value"):
            col.search("warranty", where={"section": value})
    # the bypass (a key that turns the filter into "true") and the blind read return nothing
    assert col.search("warranty", mode="bm25", where={"section": "no such section"}) == []
    hits = col.search("warranty", k=3, where={"doc": "manuals/*"})
    assert hits and {h.doc for h in hits} == {"manuals/hx.md"}
    assert col.search("warranty", k=3, where={"section": "HX manual"})[0].doc == "manuals/hx.md"


def test_where_sql_never_takes_a_key_into_the_sql_text():
    from rag.search import where_sql

    sql, params = where_sql({"section": "x", "doc": "a/*"})
    assert "section" not in sql and "$.section" in params
    with pytest.raises(ValueError):
        where_sql({"a') OR 1=1 --": "x"})


def test_langchain_retriever_checks_dict_keys(two_collections):
    import pydantic

    from rag.collection import CollectionError
    from rag.langchain import CollectionRetriever

    col = two_collections.get("public")
    for key in INJECTIONS:
        with pytest.raises(pydantic.ValidationError):
            CollectionRetriever(collection=col, where={key: "x"})
    retriever = CollectionRetriever(collection=col, k=2, where={"doc": "manuals/*"})
    assert {d.metadata["doc"] for d in retriever.invoke("warranty")} == {"manuals/hx.md"}
    retriever.where = {INJECTIONS[1]: "x"}  # set after construction: still refused at search time
    with pytest.raises(CollectionError):
        retriever.invoke("warranty")


def test_search_arguments_are_checked(two_collections):
    from rag.collection import CollectionError

    col = two_collections.get("public")
    for kwargs in ({"k": 0}, {"k": -1}, {"k": 10**9}, {"k": "3"}, {"alpha": float("nan")}, {"fusion": "x"}):
        with pytest.raises(CollectionError):
            col.search("warranty", **kwargs)
    for query in (None, 3, {"q": 1}, "   "):
        with pytest.raises(CollectionError):
            col.search(query)  # type: ignore[arg-type]


# --- 4. creation races between real processes ----------------------------------------------------

RACE_CHILD = textwrap.dedent(r"""
    import json, sys, time
    from pathlib import Path
    kind, home, go, arg = sys.argv[1:5]
    if kind == "collection":
        from rag.collection import Workspace, CollectionError
        from rag.embeddings import get_embedder
        get_embedder("default")
        ws = Workspace(home)
    else:
        from serving.ab.runs import ABStore
        store = ABStore(Path(home) / "ragtune.db")
        store.conn
    print("ready", flush=True)
    while not Path(go).exists():
        time.sleep(0.001)
    out = {}
    if kind == "collection":
        try:
            ws.create("shared")
            out["create"] = "created"
        except CollectionError as exc:
            out["create"] = str(exc)
        out["index"] = ws.index("shared2", [arg]).to_dict()["total_documents"]
    else:
        out["runs"] = [store.open_run(f"run{i}", {"i": i}) for i in range(200)]
    print(json.dumps(out), flush=True)
""")


def race(kind: str, home: Path, tmp_path: Path, arg: str = "") -> list[dict]:
    go = tmp_path / f"go-{kind}"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", RACE_CHILD, kind, str(home), str(go), arg], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    for p in procs:
        assert p.stdout.readline().strip() == "ready", p.stderr.read()
    go.touch()
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        assert "IntegrityError" not in err and "Traceback" not in err, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def test_two_processes_creating_the_same_collection(home, small_docs, tmp_path):
    from rag.collection import Workspace

    home.mkdir(parents=True)
    Workspace(home)  # migrated once, so both children race on the collection only
    results = race("collection", home, tmp_path, str(small_docs))
    outcomes = [r["create"] for r in results]
    assert outcomes.count("created") == 1, outcomes
    assert any("collection 'shared' exists already" in o for o in outcomes), outcomes
    assert [r["index"] for r in results] == [4, 4]  # create-if-missing: both end with the one collection
    ws = Workspace(home)
    assert ws.names() == ["shared", "shared2"] and ws.get("shared2").check()["mismatched"] == 0


def test_two_processes_opening_the_same_ab_runs(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    first, second = race("ab", home, tmp_path)
    assert first["runs"] == second["runs"] and len(set(first["runs"])) == 200
