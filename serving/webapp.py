"""What the Streamlit pages need, so they stay views: shared resources, uploads, tuning jobs, display text.

- Resources shared by every session (``st.cache_resource``): the workspace, the chat store, the
  assistant (one model, adapters switched per request under its lock), the registry of running
  tuning subprocesses. Per-user state (the conversation, choices) lives in ``st.session_state``.
- Uploads are written under ``<home>/uploads/<collection>/`` with sanitised names that can never
  leave that folder.
- Tuning runs are ``ragtune tune CONFIG`` subprocesses; the page polls them and plots
  ``<home>/runs/<name>/log.jsonl``.
- Retrieved text is escaped before it reaches Markdown, so a document cannot inject markup.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import yaml

from core.workspace import ragtune_home

REPO = Path(__file__).resolve().parents[1]
DEMO_COLLECTION = "corvida"
DEMO_QUESTION = "How long is the warranty on an HX heat pump?"
DEMO_ADAPTER = "corvida-demo"
DEMO_TUNE = {  # a few minutes on 2 CPU cores; a starting point, not a good model
    "name": DEMO_ADAPTER,
    "data": [str(REPO / "corpora/corvida/qa/train.jsonl")],
    "max_steps": 60, "eval_steps": 20, "save_steps": 20, "logging_steps": 2,
    "forgetting_probe": False, "progress": False,
}


# ---------------------------------------------------------------------------------- resources

def app_home() -> Path:
    return ragtune_home(None)


def _cache_resource(fn):
    """``st.cache_resource`` when running under Streamlit, a plain per-process memo otherwise."""
    import streamlit as st

    return st.cache_resource(show_spinner=False)(fn)


@_cache_resource
def workspace(home: str):
    from rag.collection import Workspace

    return Workspace(home)


@_cache_resource
def chat_store(home: str):
    from serving.history import ChatStore

    return ChatStore(workspace(home).db_path)


@_cache_resource
def assistant(home: str, config_json: str):
    """One assistant per (home, serving config): the model loads once for every session."""
    from core.config import build_config
    from serving.assistant import Assistant
    from serving.config import ServeConfig
    from serving.generation import make_generator

    config = build_config(ServeConfig, json.loads(config_json), source="app config")
    ws = workspace(home)
    served = Assistant(ws, make_generator(config, ws.home), config, chat_store(home))
    served.warm_up()
    return served


@_cache_resource
def job_registry() -> "JobRegistry":
    return JobRegistry()


def serve_config_json(overrides: dict[str, Any] | None = None) -> str:
    """The serving config for the app: $RAGTUNE_SERVE_CONFIG (a YAML file) < overrides, as a cache key."""
    from core.config import config_to_dict, load_config
    from serving.config import ServeConfig

    path = os.environ.get("RAGTUNE_SERVE_CONFIG") or None
    return json.dumps(config_to_dict(load_config(ServeConfig, path, overrides or {})), sort_keys=True)


# ------------------------------------------------------------------------------------ display

_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>~:$=&])")


def escape_markdown(text: str) -> str:
    """Text that Streamlit's Markdown shows literally (no markup, no HTML, no links, no LaTeX)."""
    return _MD_SPECIAL.sub(r"\\\1", text).replace("\n", "  \n")


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


def timings_caption(timings: dict[str, Any]) -> str:
    parts = []
    if timings.get("retrieval_ms") is not None:
        parts.append(f"retrieval {timings['retrieval_ms']:.0f} ms")
    if timings.get("ttft_s") is not None:
        parts.append(f"first token {timings['ttft_s']:.2f} s")
    if timings.get("tokens_per_s"):
        parts.append(f"{timings['tokens_per_s']:.1f} tokens/s")
    if timings.get("total_s") is not None:
        parts.append(f"total {timings['total_s']:.1f} s")
    return " · ".join(parts)


# ------------------------------------------------------------------------------------ uploads

_UNSAFE = re.compile(r"[^A-Za-z0-9._ -]+")


def safe_filename(name: str) -> str:
    """A plain file name: no folders, no '..', no control or odd characters, not hidden, <= 120 chars."""
    name = unicodedata.normalize("NFKC", name).replace("\\", "/").split("/")[-1]
    name = _UNSAFE.sub("_", name).strip(" .")
    stem, dot, suffix = name.rpartition(".")
    if not dot:
        stem, suffix = name, ""
    stem = stem.strip(" ._")[:100] or "upload"
    return f"{stem}.{suffix[:10]}" if suffix else stem


def upload_folder(home: str | os.PathLike, collection: str) -> Path:
    from core.names import NAME_RE
    from rag.collection import CollectionError

    if not NAME_RE.fullmatch(collection):
        raise CollectionError(f"invalid collection name {collection!r}: use letters, digits, '.', '_' or '-' (max 64)")
    return Path(home) / "uploads" / collection


def save_uploads(home: str | os.PathLike, collection: str, files: Iterable[tuple[str, bytes]]) -> list[Path]:
    """Write (name, bytes) pairs into the collection's upload folder; returns the paths written."""
    folder = upload_folder(home, collection).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, data in files:
        target = (folder / safe_filename(name)).resolve()
        if target.parent != folder:  # cannot happen after safe_filename; checked anyway
            raise ValueError(f"refusing upload name {name!r}")
        tmp = target.with_name(f".{target.name}.part")
        tmp.write_bytes(data)
        os.replace(tmp, target)
        written.append(target)
    return written


# ------------------------------------------------------------------------------- tuning jobs

@dataclass
class Job:
    run_id: int
    name: str
    process: subprocess.Popen
    output: Path


class JobRegistry:
    """Tuning subprocesses started by this app process (shared by all sessions)."""

    def __init__(self) -> None:
        self.jobs: dict[int, Job] = {}
        self.lock = threading.Lock()

    def start(self, home: str | os.PathLike, values: dict[str, Any], store: Any) -> Job:
        """Validate ``values`` as a TuneConfig, write it as YAML, start ``ragtune tune`` on it."""
        from tuning.config import load_tune_config

        config = load_tune_config(None, values)  # refuse a bad config now, with the config's own message
        for source in config.sources():
            if not Path(source.path).is_file():
                raise ValueError(f"training data {source.path} not found; give a JSONL/JSON/CSV/Parquet file on this server")
        home = Path(home)
        name = str(values.get("name"))
        with self.lock:
            for job in self.jobs.values():
                if job.name == name and job.process.poll() is None:
                    raise ValueError(f"a run named {name!r} is already going; wait for it or pick another name")
            folder = home / "app-runs"
            folder.mkdir(parents=True, exist_ok=True)
            stamp = time.strftime("%Y%m%d-%H%M%S")
            config_path = folder / f"{name}-{stamp}.yaml"
            config_path.write_text(yaml.safe_dump(values, sort_keys=False), encoding="utf-8")
            output = folder / f"{name}-{stamp}.out"
            env = {**os.environ, "RAGTUNE_HOME": str(home), "PYTHONUNBUFFERED": "1"}
            with open(output, "wb") as out:
                process = subprocess.Popen([sys.executable, "-m", "serving.cli", "tune", str(config_path), "--home", str(home)],
                                           stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                           cwd=str(REPO), env=env, start_new_session=True)
            run_id = store.add_run(name, str(config_path), [], process.pid, str(output))
            job = self.jobs[run_id] = Job(run_id, name, process, output)
            return job

    def refresh(self, store: Any) -> None:
        """Record finished runs in the store (and runs whose process is gone after an app restart)."""
        with self.lock:
            for job in list(self.jobs.values()):
                code = job.process.poll()
                if code is not None:
                    store.finish_run(job.run_id, "done" if code == 0 else "failed", code)
            for run in store.runs():
                if run["status"] == "running" and run["id"] not in self.jobs and not _pid_alive(run["pid"]):
                    store.finish_run(run["id"], "failed", None)

    def stop(self, run_id: int, store: Any) -> None:
        with self.lock:
            job = self.jobs.get(run_id)
            if job is not None and job.process.poll() is None:
                job.process.terminate()
                try:
                    job.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    job.process.kill()
                store.finish_run(run_id, "stopped", job.process.returncode)


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def run_log(home: str | os.PathLike, name: str) -> list[dict[str, Any]]:
    """Rows of ``<home>/runs/<name>/log.jsonl`` (a line cut short by a kill is skipped)."""
    path = Path(home) / "runs" / name / "log.jsonl"
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    for line in lines:
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def loss_curve(rows: list[dict[str, Any]]) -> dict[str, dict[int, float]]:
    """{"loss": {step: value}, "eval_loss": {step: value}} for a line chart."""
    curve: dict[str, dict[int, float]] = {"loss": {}, "eval_loss": {}}
    for row in rows:
        if row.get("event") == "train" and "loss" in row:
            curve["loss"][int(row["step"])] = float(row["loss"])
        elif row.get("event") == "eval" and "eval_loss" in row:
            curve["eval_loss"][int(row["step"])] = float(row["eval_loss"])
    return curve


def tail(path: str | os.PathLike, lines: int = 15) -> str:
    try:
        return "\n".join(Path(path).read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return ""
