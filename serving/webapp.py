"""What the Streamlit pages call, so they stay views: the app's config and password, the engine (loaded
once per server process in the background), collections and uploads, A/B runs and the arena, display text.

- The engine (one model, adapters switched per request under its lock) is built by a background thread
  the first time anything asks for it; ``python -m serving.app_launch`` asks at server start. Pages read
  its state (loading, with elapsed time and the previous load's duration as the estimate; ready; failed).
- Per-user state (the conversation, choices) lives in ``st.session_state``; nothing here holds it.
- Folders the app may index and training data it may read are limited to roots in ``<home>/app.yaml``
  (default: the workspace's upload area and the demo corpus), checked with ``core.names.within_roots``.
- Uploads go to ``<home>/uploads/<collection>/<name>`` through ``core.names.child_path``; the app
  indexes exactly the files just uploaded, removes those that fail, and a deleted document's upload file
  is removed with it, so nothing brings it back.
- Text from documents, questions and answers is escaped before it reaches Markdown: no markup, no
  HTML, and no link or image that the browser would fetch.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import shutil
import sys
import threading
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import yaml

from core.names import InvalidName, check_name, child_path, within_roots
from core.config import ConfigError, field, load_config
from core.files import write_atomic
from core.progress import format_duration
from core.workspace import Layout, ragtune_home
from rag.collection import CollectionError
from rag.documents import SUPPORTED_SUFFIXES
from serving.config import ServingError
from tuning.errors import TuningError

# What a page shows as a one-line error instead of a traceback (core's ConfigError and InvalidName are
# ValueErrors). The pages take these from here so that they import nothing below serving.
USER_ERRORS = (ValueError, CollectionError, TuningError, ServingError)
UPLOAD_TYPES = [suffix.lstrip(".") for suffix in SUPPORTED_SUFFIXES]

REPO = Path(__file__).resolve().parents[1]
DEMO_COLLECTION = "corvida"
DEMO_QUESTION = "How long is the warranty on an HX heat pump?"
DEMO_ADAPTER = "corvida-demo"
DEMO_CORPUS = REPO / "corpora"
DEMO_TUNE = {  # ~6 s a step on 2 CPU cores: about 6 minutes; a starting point, not a good model
    "name": DEMO_ADAPTER,
    "data": [str(REPO / "corpora/corvida/qa/train.jsonl")],
    "max_steps": 60, "eval_steps": 20, "save_steps": 20, "logging_steps": 2,
    "forgetting_probe": False, "progress": False,
}
APP_CONFIG_FILE = "app.yaml"


def app_home() -> Path:
    return ragtune_home(None)


# ------------------------------------------------------------------------------------- app config

@dataclass
class AppConfig:
    """``<home>/app.yaml``: what a shared deployment of the app allows. Unknown keys are refused."""

    password_hash: str = field("", help="scrypt hash of the app's password ('' = no password); make one with: "
                                         "python -m serving.webapp hash-password")
    index_roots: list[str] = field(default_factory=list, help="folders (and their subfolders) the app may index "
                                   "from; empty = <home>/uploads and the demo corpus")
    data_roots: list[str] = field(default_factory=list, help="folders tuning data may come from; empty = "
                                  "<home>/uploads, <home>/data and the demo corpus")
    max_upload_mb: int = field(50, help="largest file accepted by an upload, in MB")

    def __post_init__(self) -> None:
        if self.password_hash and not self.password_hash.startswith("scrypt$"):
            raise ConfigError("password_hash: not a hash made by `python -m serving.webapp hash-password` "
                              "(never put the password itself in app.yaml)")
        if self.max_upload_mb < 1:
            raise ConfigError("max_upload_mb: must be >= 1 (example: max_upload_mb: 50)")


def app_config(home: str | os.PathLike) -> AppConfig:
    path = Layout(Path(home)).app_config
    return load_config(AppConfig, path if path.exists() else None)


def index_roots(home: str | os.PathLike) -> list[Path]:
    cfg = app_config(home)
    return [Path(r) for r in cfg.index_roots] if cfg.index_roots else [Layout(Path(home)).uploads, DEMO_CORPUS]


def data_roots(home: str | os.PathLike) -> list[Path]:
    cfg = app_config(home)
    return ([Path(r) for r in cfg.data_roots] if cfg.data_roots else
            [Layout(Path(home)).uploads, Layout(Path(home)).data, DEMO_CORPUS])


_SCRYPT = {"n": 2**14, "r": 8, "p": 1}


def hash_password(password: str, salt: bytes | None = None) -> str:
    """``scrypt$n$r$p$salt$hash`` (hashlib.scrypt, a memory-hard KDF; salt and hash base64)."""
    if not password:
        raise ValueError("empty password")
    salt = salt or os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, dklen=32, **_SCRYPT)
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    return f"scrypt${_SCRYPT['n']}${_SCRYPT['r']}${_SCRYPT['p']}${b64(salt)}${b64(digest)}"


def verify_password(password: str, stored: str) -> bool:
    try:
        kind, n, r, p, salt, digest = stored.split("$")
        if kind != "scrypt":
            return False
        expected = base64.b64decode(digest)
        got = hashlib.scrypt(password.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p),
                             dklen=len(expected))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, expected)


def password_required(home: str | os.PathLike) -> bool:
    return bool(app_config(home).password_hash)


def check_password(home: str | os.PathLike, password: str) -> bool:
    """True when the app has no password or ``password`` matches; a wrong one costs a second."""
    stored = app_config(home).password_hash
    if not stored:
        return True
    if verify_password(password or "", stored):
        return True
    time.sleep(1.0)  # slows guessing from one session
    return False


# ------------------------------------------------------------------------------------------ engine

class Engine:
    """The assistant, built once per (home, serving config) in a background thread."""

    def __init__(self, home: str, config_json: str) -> None:
        self.home, self.config_json = home, config_json
        self.assistant: Any = None
        self.error: str | None = None
        self.phase = "starting"
        self.started = time.time()
        self.loaded_in: float | None = None
        self.expected_s = _previous_load_seconds(home)
        self._thread = threading.Thread(target=self._load, name="ragtune-engine", daemon=True)
        self._thread.start()

    def _load(self) -> None:
        from rag.collection import Workspace
        from core.config import build_config
        from serving.assistant import Assistant
        from serving.config import ServeConfig
        from serving.generation import make_generator
        from serving.history import ChatStore

        try:
            config = build_config(ServeConfig, json.loads(self.config_json), source="app config")
            ws = Workspace(self.home)
            self.phase = "loading the model"
            generator = make_generator(config, ws.home)
            served = Assistant(ws, generator, config, ChatStore(ws.db_path))
            self.phase = "warming up (embedding models, first token)"
            served.warm_up()
            self.assistant = served
            self.loaded_in = time.time() - self.started
            _save_load_seconds(self.home, self.loaded_in)
            self.phase = "ready"
        except Exception as exc:  # shown in the page with what to do; the server keeps running
            self.error = f"{type(exc).__name__}: {exc}"
            self.phase = "failed"

    @property
    def ready(self) -> bool:
        return self.assistant is not None

    def wait(self, timeout: float | None = None) -> Any:
        self._thread.join(timeout)
        return self.assistant

    def status(self) -> dict[str, Any]:
        """For the progress display: phase, seconds so far, and the estimate from the previous load."""
        elapsed = time.time() - self.started
        fraction = min(0.95, elapsed / self.expected_s) if self.expected_s else None
        return {"phase": self.phase, "elapsed_s": elapsed, "expected_s": self.expected_s, "fraction": fraction,
                "ready": self.ready, "error": self.error}


_ENGINES: dict[tuple[str, str], Engine] = {}
_ENGINES_LOCK = threading.Lock()


def engine(home: str | os.PathLike | None = None, config_json: str | None = None) -> Engine:
    """The process-wide engine for ``home`` and the serving config, started on first call (not blocking).

    A module-level registry rather than ``st.cache_resource``, so the launcher can start it before the
    first page load; Streamlit reruns pages but keeps imported modules."""
    home = str(home or app_home())
    config_json = config_json or serve_config_json()
    key = (home, config_json)
    with _ENGINES_LOCK:
        found = _ENGINES.get(key)
        if found is None or found.error:  # a failed load is retried on the next visit
            found = _ENGINES[key] = Engine(home, config_json)
        return found


def _load_seconds_path(home: str | os.PathLike) -> Path:
    return Layout(Path(home)).app_state / "engine-load.json"


def _previous_load_seconds(home: str | os.PathLike) -> float | None:
    try:
        return float(json.loads(_load_seconds_path(home).read_text())["seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _save_load_seconds(home: str | os.PathLike, seconds: float) -> None:
    path = _load_seconds_path(home)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps({"seconds": round(seconds, 1)}))
    except OSError:
        pass  # only an estimate for next time


def serve_config_json(overrides: dict[str, Any] | None = None) -> str:
    """The serving config for the app: $RAGTUNE_SERVE_CONFIG (a YAML file) < overrides, as a cache key."""
    from core.config import config_to_dict
    from serving.config import ServeConfig

    path = os.environ.get("RAGTUNE_SERVE_CONFIG") or None
    return json.dumps(config_to_dict(load_config(ServeConfig, path, overrides or {})), sort_keys=True)


def usable_adapters(assistant: Any) -> list[str]:
    return sorted(a["name"] for a in assistant.generator.available_adapters() if a.get("usable"))


# ------------------------------------------------------------------------------- shared resources

_RESOURCES: dict[tuple[str, str], Any] = {}
_RESOURCES_LOCK = threading.RLock()  # a build may ask for another resource


def _shared(kind: str, home: str, build: Callable[[], Any]) -> Any:
    with _RESOURCES_LOCK:
        key = (kind, str(home))
        if key not in _RESOURCES:
            _RESOURCES[key] = build()
        return _RESOURCES[key]


def _workspace(home: str | os.PathLike):
    from rag.collection import Workspace

    return _shared("workspace", str(home), lambda: Workspace(home))


def chat_store(home: str | os.PathLike):
    from serving.history import ChatStore

    return _shared("chats", str(home), lambda: ChatStore(_workspace(home).db_path))


def _ab_store(home: str | os.PathLike):
    from serving.ab.runs import ABStore

    return _shared("ab", str(home), lambda: ABStore(_workspace(home).db_path))


# ------------------------------------------------------------------------------------ collections

def collections(home: str | os.PathLike) -> list[str]:
    return _workspace(home).names()


def collection_rows(home: str | os.PathLike) -> list[dict[str, Any]]:
    keys = ("name", "documents", "chunks", "embedding_model", "index_type", "version")
    return [{k: r[k] for k in keys} for r in _workspace(home).list()]


def documents(home: str | os.PathLike, name: str) -> list[dict[str, Any]]:
    return [{"path": d["path"], "chunks": d["chunks"], "size": d["size"]} for d in _workspace(home).get(name).documents()]


def document_text(home: str | os.PathLike, name: str, doc: str) -> str | None:
    """The stored text of ``doc``, or None when the document or collection is gone."""
    try:
        return _workspace(home).get(name).document_text(doc)
    except Exception:
        return None


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_filename(name: str) -> str:
    """A plain file name that ``core.names.check_name`` accepts: no folders, no '..', no spaces or odd
    characters, not hidden, at most 64 characters, keeping the suffix (``ü ñ.md`` -> ``upload.md``)."""
    name = unicodedata.normalize("NFKC", str(name)).replace("\\", "/").split("/")[-1].strip()
    stem, dot, suffix = name.rpartition(".")
    if not dot:
        stem, suffix = name, ""
    suffix = _UNSAFE.sub("", suffix)[:10]
    stem = re.sub(r"\.{2,}", ".", _UNSAFE.sub("_", stem)).strip(" ._-")[: 63 - len(suffix)].strip(" ._-") or "upload"
    return f"{stem}.{suffix}" if suffix else stem


def upload_folder(home: str | os.PathLike, collection: str) -> Path:
    return Layout(Path(home)).upload_dir(collection)


def save_uploads(home: str | os.PathLike, collection: str, files: Iterable[tuple[str, bytes]],
                 max_bytes: int | None = None) -> list[Path]:
    """Write (name, bytes) pairs into the collection's upload folder; returns the paths written.
    Each file is written to a hidden temp name and renamed, so a crash leaves no half file."""
    folder = upload_folder(home, collection)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, data in files:
        if max_bytes is not None and len(data) > max_bytes:
            raise ValueError(f"{name}: {len(data) / 1e6:.1f} MB is over the upload limit of {max_bytes / 1e6:.0f} MB; "
                             f"split the file or raise max_upload_mb in {APP_CONFIG_FILE}")
        target = child_path(folder, safe_filename(name), "upload name")
        write_atomic(target, data)
        written.append(target)
    return written


def upload_and_index(home: str | os.PathLike, collection: str, files: list[tuple[str, bytes]],
                     progress: Callable[[int, int, str], None] | None = None):
    """Save the uploads, index exactly those files into ``collection``, remove the ones that failed.

    Returns the index report. On an exception (bad collection name, crash in indexing) every file written
    by this call is removed again; documents already in the collection are not touched."""
    if not files:
        raise ValueError("choose at least one file to upload")
    check_name(collection, "collection name")
    limit = app_config(home).max_upload_mb * 1_000_000
    written = save_uploads(home, collection, files, max_bytes=limit)
    try:
        report = _index_each(home, collection, written, progress)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    failed_names = {Path(item["path"]).name for item in report.failed}
    for path in written:
        if path.name in failed_names:
            path.unlink(missing_ok=True)  # a failed upload is not kept to fail again
    return report


def _index_each(home: str | os.PathLike, collection: str, paths: list[Path], progress):
    """Index ``paths`` in one run; if that run raises on a file, index them one at a time so a bad file
    is reported in ``failed`` and the good ones still go in (user errors such as a bad name still raise)."""
    from rag.collection import CollectionError

    ws = _workspace(home)
    try:
        return ws.index(collection, paths, progress=progress or False)
    except (CollectionError, ConfigError, InvalidName):
        raise
    except Exception:
        pass
    total = None
    for path in paths:
        try:
            one = ws.index(collection, [path])
        except (CollectionError, ConfigError, InvalidName):
            raise
        except Exception as exc:  # a loader crash: that file fails, the others are kept
            if total is None:
                total = _empty_report()
            total.failed.append({"path": str(path), "error": f"could not be read ({type(exc).__name__}: {exc})"[:300]})
            continue
        if total is None:
            total = one
        else:
            for key in ("added", "updated", "unchanged", "deleted", "chunks", "skipped"):
                setattr(total, key, getattr(total, key) + getattr(one, key))
            total.failed += one.failed
            total.total_documents, total.total_chunks = one.total_documents, one.total_chunks
    if total.total_documents == 0 and ws.exists(collection):
        stats = [r for r in ws.list() if r["name"] == collection]
        if stats:
            total.total_documents, total.total_chunks = stats[0]["documents"], stats[0]["chunks"]
    return total


def _empty_report():
    from rag.collection import IndexReport

    return IndexReport()


def index_folder(home: str | os.PathLike, collection: str, folder: str, sync: bool = False,
                 progress: Callable[[int, int, str], None] | None = None):
    """Index a folder on the server, only inside the configured roots (``index_roots`` in app.yaml)."""
    check_name(collection, "collection name")
    if not str(folder).strip():
        raise ValueError("give a folder on this server to index")
    path = within_roots(folder, index_roots(home), "folder")
    return _workspace(home).index(collection, [path], sync=sync, progress=progress or False)


def delete_documents(home: str | os.PathLike, collection: str, paths: list[str]) -> int:
    """Delete documents; an uploaded document's file goes too, so nothing can bring it back."""
    count = _workspace(home).get(collection).delete_documents(paths)
    try:
        folder = upload_folder(home, collection)
    except InvalidName:
        return count
    for doc in paths:
        try:
            child_path(folder, doc, "document").unlink(missing_ok=True)
        except InvalidName:
            continue  # not an upload (a path from an indexed folder)
    return count


def drop_collection(home: str | os.PathLike, collection: str) -> None:
    _workspace(home).drop(collection)
    try:
        shutil.rmtree(upload_folder(home, collection), ignore_errors=True)
    except InvalidName:
        pass


def reindex(home: str | os.PathLike, collection: str, model: str, progress: Callable[[int, int, str], None] | None = None):
    return _workspace(home).reindex(collection, model, progress=progress or False)


# -------------------------------------------------------------------------------------- chat

def set_feedback(home: str | os.PathLike, message_id: int, vote: int) -> None:
    chat_store(home).set_feedback(message_id, vote)


def answer_view(answer: Any) -> dict[str, Any]:
    """The parts of an ``Answer`` the chat shows (an abstention stays an abstention)."""
    d = answer.to_dict()
    d.pop("hits", None)
    d["refused"] = bool(getattr(answer, "refused", False))
    d["refusal_reason"] = getattr(answer, "refusal_reason", "") or ""
    return d


def sources_label(answer: dict[str, Any]) -> str | None:
    sources = answer.get("sources") or []
    if not sources:
        return None
    if answer.get("refused"):
        return f"Closest matches ({len(sources)}), not used for an answer"
    cited = [s for s in sources if s.get("cited")]
    return f"Sources: {len(cited)} cited of {len(sources)}" if cited else f"Sources ({len(sources)})"


# ---------------------------------------------------------------------------------------- A/B

def ab_runs(home: str | os.PathLike) -> list[dict[str, Any]]:
    return _ab_store(home).runs()


_REPORTS: dict[tuple, dict[str, Any]] = {}
_REPORTS_LOCK = threading.Lock()


def ab_report(home: str | os.PathLike, name: str, n_boot: int = 1000) -> tuple[dict[str, Any], dict[str, str]]:
    """(report, files) for A/B run ``name``, built and written once per state of the run (its answer count
    and finish time), not on every rerun of the page."""
    from serving.ab import report as ab_report_mod

    store = _ab_store(home)
    run = store.run(name)
    if run is None:
        raise ValueError(f"no A/B run named {name!r}")
    key = (str(home), name, run["answers"], run["finished_at"], n_boot)
    with _REPORTS_LOCK:
        if key not in _REPORTS:
            out = Layout(Path(home)).report_dir(name)
            rep = ab_report_mod.build_report(store, name, n_boot=n_boot)
            files = ab_report_mod.write_report(store, name, out, report=rep)
            _REPORTS[key] = {"report": rep, "files": files}
        cached = _REPORTS[key]
    return cached["report"], cached["files"]


def ab_answers(home: str | os.PathLike, name: str, only_disagreements: bool = False) -> list[dict[str, Any]]:
    """One row per question: the question, the reference, and each arm's answer with its correctness;
    ``only_disagreements`` keeps the questions where the arms' correctness differs."""
    store = _ab_store(home)
    run = store.run(name)
    if run is None:
        raise ValueError(f"no A/B run named {name!r}")
    by_question: dict[str, dict[str, Any]] = {}
    for r in store.results(run["id"]):
        row = by_question.setdefault(r["question_id"], {"id": r["question_id"], "question": r["row"].get("question", ""),
                                                         "reference": r["row"].get("answer", ""), "_correct": {}})
        row[r["arm"]] = r["answer"].get("text", "")
        correct = r["row"].get("scores", {}).get("correct")
        row["_correct"][r["arm"]] = correct
        row[f"{r['arm']} correct"] = "yes" if correct == 1 else ("no" if correct == 0 else "")
    rows = []
    for row in by_question.values():
        outcomes = set(row.pop("_correct").values())
        row["arms disagree"] = len(outcomes) > 1
        if not only_disagreements or row["arms disagree"]:
            rows.append(row)
    return rows


def default_run_name(questions: str, collection: str | None, adapter: str | None) -> str:
    stem = Path(questions).stem
    parts = [stem, collection or "", adapter or "", time.strftime("%m%d-%H%M")]
    return check_name("-".join(p for p in parts if p)[:64].strip("-._") or "ab-run", "A/B run name")


def run_ab(home: str | os.PathLike, assistant: Any, questions: str, collection: str | None, adapter: str | None,
           arms: list[str], limit: int, name: str, progress: Callable[[int, int, str], None] | None = None) -> dict[str, Any]:
    from serving.ab.runner import ABConfig, run_ab as run

    check_name(name, "A/B run name")
    qpath = within_roots(questions, data_roots(home), "question file")
    config = ABConfig(questions=str(qpath), collection=collection, adapter=adapter, arms=list(arms), limit=int(limit),
                      name=name)
    return run(assistant, config, progress)


def question_files() -> list[str]:
    return sorted(str(p.relative_to(REPO)) for p in DEMO_CORPUS.glob("*/qa/*.jsonl"))


def new_arena_round(question: str, collection: str | None, adapter: str | None):
    import random

    from serving.ab import arena

    return arena.new_round(question, collection, adapter, random.SystemRandom())


def arena_streams(assistant: Any, round_: Any, sides: list[str]) -> dict[str, Any]:
    """Both answers started together (one batch in the engine); each side: a stream or its error."""
    from serving.ab import arena

    return arena.stream_sides(assistant, round_, sides)


def arena_outcomes() -> dict[str, str]:
    from serving.ab import arena

    return dict(arena.OUTCOMES)


def arena_vote(home: str | os.PathLike, round_: Any, outcome: str) -> int:
    from serving.ab import arena

    return arena.record_vote(_ab_store(home), round_, outcome)


def arena_leaderboard(home: str | os.PathLike) -> tuple[dict[str, Any], str]:
    from serving.ab import arena

    board = arena.leaderboard(_ab_store(home))
    return board, arena.leaderboard_caption(board)


# ------------------------------------------------------------------------------------ display

_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>~:$=&])")


def escape_markdown(text: str) -> str:
    """Text that Streamlit's Markdown shows literally: no markup, no HTML, no LaTeX, and no link or image
    (``![x](http://...)`` and bare URLs lose their syntax), so the browser fetches nothing from it."""
    return _MD_SPECIAL.sub(r"\\\1", text).replace("\n", "  \n")


def coalesce(pieces: Iterable[str], interval_s: float = 0.25) -> Iterable[str]:
    """The stream's text in fewer, larger pieces: the first at once (the first token shows when it comes),
    then at most one every ``interval_s``. Each piece ``st.write_stream`` receives re-sends the answer so
    far and makes the browser re-render it; per token, that work competed with decoding for the CPU."""
    held: list[str] = []
    last = None
    for piece in pieces:
        held.append(piece)
        now = time.perf_counter()
        if last is None or now - last >= interval_s:
            yield "".join(held)
            held, last = [], now
    if held:
        yield "".join(held)


def highlighted_span(document: str, start: int, end: int, context: int = 240) -> str:
    """Markdown: the span ``start:end`` of ``document`` highlighted, with ``context`` characters around."""
    a, b = max(0, start - context), min(len(document), end + context)
    before, span, after = document[a:start], document[start:end], document[end:b]
    pieces = ["… " if a > 0 else "", escape_markdown(before)]
    for i, paragraph in enumerate(span.split("\n")):
        if i:
            pieces.append("  \n")
        if paragraph.strip():
            pieces.append(f":orange-background[{escape_markdown(paragraph)}]")
    pieces += [escape_markdown(after), " …" if b < len(document) else ""]
    return "".join(pieces)


def queue_note(assistant: Any) -> str | None:
    """While the engine's batch is full: how many requests wait for a row (None when nobody has to: a request
    that the engine admits at its next step is not shown as waiting)."""
    engine = getattr(assistant.generator, "engine", None)
    if engine is None:
        return None
    stats = engine.stats()
    if not stats["blocked"]:
        return None
    return (f"the model is answering {stats['running'] + stats['prefilling']} other requests; "
            f"{stats['waiting']} waiting for a free slot, yours included (it starts when one finishes)")


def timings_caption(timings: dict[str, Any]) -> str:
    parts = []
    if timings.get("queued_s", 0) >= 0.05:
        parts.append(f"waited {timings['queued_s']:.1f} s for a free slot")
    if timings.get("retrieval_ms") is not None:
        parts.append(f"retrieval {timings['retrieval_ms']:.0f} ms")
    if timings.get("ttft_s") is not None:
        parts.append(f"first token {timings['ttft_s']:.2f} s")
    if timings.get("tokens_per_s"):
        parts.append(f"{timings['tokens_per_s']:.1f} tokens/s")
    if timings.get("total_s") is not None:
        parts.append(f"total {timings['total_s']:.1f} s")
    return " · ".join(parts)



def eta_text(done: int, total: int, started: float, now: float | None = None) -> str:
    """``3/20 · 41s elapsed · ETA 3m52s`` from the measured rate of the work done so far."""
    elapsed = (now or time.time()) - started
    eta = elapsed / done * (total - done) if done else None
    return f"{done}/{total} · {format_duration(elapsed)} elapsed · ETA {format_duration(eta)}"


def main(argv: list[str] | None = None) -> int:
    """``python -m serving.webapp hash-password``: prompt for a password, print the app.yaml line."""
    import getpass

    args = sys.argv[1:] if argv is None else argv
    if args[:1] != ["hash-password"]:
        print("usage: python -m serving.webapp hash-password   (prints a password_hash line for <home>/app.yaml)")
        return 2
    password = getpass.getpass("app password: ")
    if not password or password != getpass.getpass("again: "):
        print("the passwords are empty or differ; nothing written", file=sys.stderr)
        return 1
    print(yaml.safe_dump({"password_hash": hash_password(password)}).strip())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


# ------------------------------------------------------------------------- feedback loop (issue 13)

def record_correction(home: str | os.PathLike, message_id: int, correction: str, source_n: int | None,
                      not_in_sources: bool) -> int:
    from serving.feedback import record_correction as record

    return record(chat_store(home), _workspace(home), message_id, correction, source_n, not_in_sources)


def promoted_adapter(home: str | os.PathLike, collection: str | None) -> str | None:
    """The collection's current (promoted) adapter, read on every call: a promotion is seen without a restart."""
    from serving.promotion import current_adapter

    return current_adapter(home, collection)


def feedback_pending(home: str | os.PathLike, collection: str) -> dict[str, int]:
    from serving.feedback import pending

    return pending(home, collection)


def feedback_dataset_path(home: str | os.PathLike, collection: str) -> Path:
    from core.names import child_path

    folder = Layout(Path(home)).data / "feedback"
    folder.mkdir(parents=True, exist_ok=True)
    return child_path(folder, collection, "collection name").with_suffix(".jsonl")


def export_feedback(home: str | os.PathLike, collection: str, thumbs_up: bool) -> dict[str, Any]:
    from serving.feedback import export_feedback as export

    return export(home, collection, feedback_dataset_path(home, collection), thumbs_up=thumbs_up).to_dict()


def feedback_tune_values(home: str | os.PathLike, collection: str, name: str, max_steps: int) -> dict[str, Any]:
    """The run config the panel starts: a LoRA on the exported rows, with the forgetting probe the gate reads."""
    return {**{k: v for k, v in DEMO_TUNE.items() if k not in ("name", "data", "max_steps")}, "name": name,
            "data": [str(feedback_dataset_path(home, collection))], "max_steps": int(max_steps), "val_share": 0.0,
            "forgetting_probe": True, "probe_limit": 10, "overwrite": True}


def default_gate_questions(home: str | os.PathLike, collection: str) -> str:
    from serving.promotion import PromotionError, default_questions

    try:
        return default_questions(home, collection)
    except PromotionError:
        return ""


def run_gate(home: str | os.PathLike, candidate: str, collection: str, questions: str, limit: int = 0,
             progress: Callable[[int, int, str], None] | None = None) -> dict[str, Any]:
    """The promotion gate as a dry run (the panel's buttons then promote or not, with this evidence)."""
    from serving.promotion import gate

    if questions:
        questions = str(within_roots(questions, data_roots(home), "question file"))
    decision = gate(engine(home).wait(), candidate, collection, questions or None, dry_run=True, limit=limit,
                    progress=progress)
    return {**decision.to_dict(), "summary": decision.summary()}


def promote(home: str | os.PathLike, collection: str, decision: dict[str, Any]) -> int:
    """Promote the gate's candidate; forced (and recorded so) when the gate refused it."""
    from serving.promotion import record_promotion

    evidence = {k: v for k, v in decision.items() if k != "summary"}
    forced = not decision["promote"]
    evidence["forced"] = forced
    return record_promotion(home, collection, decision["candidate"], evidence, forced=forced)


def rollback(home: str | os.PathLike, collection: str) -> str | None:
    from serving.promotion import rollback as roll

    return roll(home, collection)


def promotion_history(home: str | os.PathLike, collection: str) -> list[dict[str, Any]]:
    from serving.promotion import history

    return history(home, collection)
