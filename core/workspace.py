"""The workspace layout: every folder under ``RAGTUNE_HOME`` is computed here and nowhere else.

::

    <home>/ragtune.db              SQLite: collections, documents, chunks, chats, A/B runs (core.db)
    <home>/collections/<id>/       FAISS files of one collection (by id: names can be renamed)
    <home>/models/<name>/          base models converted once (the packaged SmolLM2)
    <home>/adapters/<name>/        trained adapters (peft files + ragtune.json)
    <home>/retrievers/<name>/      fine-tuned sentence-transformers embedders (+ ragtune.json)
    <home>/runs/<name>/            training run logs and checkpoints
    <home>/app.yaml                the app's deployment settings (password hash, allowed folders)
    <home>/app/                    the app's own state (how long the model took to load)
    <home>/reports/<name>/         A/B reports (Markdown, JSON, plots)
    <home>/uploads/<collection>/   files uploaded through the app, one folder per collection
    <home>/data/                   data the app writes (training files built from collections)

Every folder named by a user (adapter, run, A/B report, upload folder) goes through
``core.names.child_path``, so a name like ``../../x`` or ``/etc`` never becomes a path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from core.names import check_name, child_path

DEFAULT_HOME = Path("~/.local/share/ragtune")


def ragtune_home(explicit: str | os.PathLike | None = None) -> Path:
    """The workspace folder, created if missing: ``--home`` > ``$RAGTUNE_HOME`` > ``~/.local/share/ragtune``."""
    if explicit:
        home = Path(explicit)
    elif os.environ.get("RAGTUNE_HOME"):
        home = Path(os.environ["RAGTUNE_HOME"])
    else:
        home = DEFAULT_HOME
    home = home.expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    return home


@dataclass(frozen=True)
class Layout:
    """The paths of one workspace. ``Layout.open(home)`` resolves (and creates) the home first."""

    home: Path

    @classmethod
    def open(cls, home: str | os.PathLike | None = None) -> "Layout":
        return cls(ragtune_home(home))

    # --- fixed places -----------------------------------------------------------------------------
    @property
    def db(self) -> Path:
        return self.home / "ragtune.db"

    @property
    def collections(self) -> Path:
        return self.home / "collections"

    @property
    def models(self) -> Path:
        return self.home / "models"

    @property
    def adapters(self) -> Path:
        return self.home / "adapters"

    @property
    def retrievers(self) -> Path:
        return self.home / "retrievers"

    @property
    def runs(self) -> Path:
        return self.home / "runs"

    @property
    def app_config(self) -> Path:
        return self.home / "app.yaml"

    @property
    def app_state(self) -> Path:
        return self.home / "app"

    @property
    def reports(self) -> Path:
        return self.home / "reports"

    @property
    def uploads(self) -> Path:
        return self.home / "uploads"

    @property
    def data(self) -> Path:
        return self.home / "data"

    # --- one entry per user-given name (validated) -------------------------------------------------
    def collection_dir(self, collection_id: int) -> Path:
        """A collection's FAISS folder; keyed by its database id, never by its (user-given) name."""
        return self.collections / str(int(collection_id))

    def model_dir(self, name: str) -> Path:
        """A converted base model's folder. The name is checked, but the folder may be a symlink to a
        shared model cache (tests and benchmarks link one converted model into many workspaces)."""
        return self.models / check_name(name, "model name")

    def adapter_dir(self, name: str) -> Path:
        return child_path(self.adapters, name, "adapter name")

    def retriever_dir(self, name: str) -> Path:
        return child_path(self.retrievers, name, "retriever name")

    def run_dir(self, name: str) -> Path:
        return child_path(self.runs, name, "run name")

    def report_dir(self, name: str) -> Path:
        return child_path(self.reports, name, "A/B run name")

    def upload_dir(self, collection: str) -> Path:
        return child_path(self.uploads, collection, "collection name")

    def upload_file(self, collection: str, filename: str) -> Path:
        return child_path(self.upload_dir(collection), filename, "upload file name")


def layout(home: str | os.PathLike | None = None) -> Layout:
    """The layout of ``home`` (or of ``$RAGTUNE_HOME`` / the default), resolved and created."""
    return Layout.open(home)
