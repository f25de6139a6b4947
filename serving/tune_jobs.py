"""Tuning runs started from the app: ``ragtune tune`` subprocesses, one run folder each.

A run started here gets its own folder ``<home>/runs/<name>/<run-id>/`` (the id chosen here and passed as
``$RAGTUNE_RUN_ID``, see ``tuning.training.run_folder``) holding its config, the subprocess output, the
JSONL log the chart reads, the human-readable ``log.txt`` and the checkpoints. So a run's panel always
shows that run's log; a stopped run can be resumed in the same folder, or its newest checkpoint kept as
an adapter. Data paths are checked against the app's roots before anything starts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from core.names import check_name, within_roots
from core.workspace import Layout
from serving.webapp import REPO, data_roots

PACKAGED_MODELS = ("smollm2-135m-instruct", "all-minilm-l6-v2")


@dataclass
class Job:
    run_id: int
    name: str
    process: subprocess.Popen
    output: Path
    run_dir: Path


def check_tune_values(home: str | os.PathLike, values: dict[str, Any]):
    """The TuneConfig for ``values`` (refused with the config's own message), with every file it reads
    inside the app's data roots and present."""
    from tuning.config import load_tune_config

    config = load_tune_config(None, values)
    roots = data_roots(home)
    paths = [s.path for s in config.sources()] + [p for p in (config.eval_data, config.test_data) if p]
    for path in paths:
        resolved = within_roots(path, roots, "training data")
        if not resolved.is_file():
            raise ValueError(f"training data {path} not found; give a JSONL/JSON/CSV/Parquet file under "
                             f"{', '.join(str(r) for r in roots)}")
    if config.base_model not in PACKAGED_MODELS and Path(config.base_model).expanduser().exists():
        within_roots(config.base_model, roots, "base model folder")
    return config


def run_dir_of(run: dict[str, Any]) -> Path:
    """The run folder of a stored run row (its config file lives there)."""
    return Path(run["config_path"]).parent


class JobRegistry:
    """Tuning subprocesses started by this app process (shared by all sessions)."""

    def __init__(self) -> None:
        self.jobs: dict[int, Job] = {}
        self.lock = threading.Lock()

    def start(self, home: str | os.PathLike, values: dict[str, Any], store: Any) -> Job:
        """Validate ``values``, make a new run folder, write the config there and start ``ragtune tune``."""
        config = check_tune_values(home, values)
        name = check_name(config.name, "adapter name")
        runs_root = Layout(Path(home)).run_dir(name)
        with self.lock:
            self._refuse_running(name)
            runs_root.mkdir(parents=True, exist_ok=True)
            stamp = time.strftime("%Y%m%d-%H%M%S")
            for n in range(1, 1000):
                run_dir = runs_root / (stamp if n == 1 else f"{stamp}-{n}")
                try:
                    run_dir.mkdir()
                    break
                except FileExistsError:
                    continue
            config_path = run_dir / "config.yaml"
            config_path.write_text(yaml.safe_dump({**values, "resume": False}, sort_keys=False), encoding="utf-8")
            return self._launch(home, name, run_dir, config_path, store)

    def resume(self, home: str | os.PathLike, run: dict[str, Any], store: Any) -> Job:
        """Continue a stopped or failed run from its newest checkpoint, in the same folder."""
        run_dir = run_dir_of(run)
        if not any((run_dir / "checkpoints").glob("checkpoint-*")):
            raise ValueError(f"run {run['id']} ({run['name']}) has no checkpoint to resume from yet; start a new run")
        values = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
        check_tune_values(home, values)
        with self.lock:
            self._refuse_running(run["name"])
            config_path = run_dir / "config-resume.yaml"
            config_path.write_text(yaml.safe_dump({**values, "resume": True}, sort_keys=False), encoding="utf-8")
            return self._launch(home, run["name"], run_dir, config_path, store)

    def _refuse_running(self, name: str) -> None:
        for job in self.jobs.values():
            if job.name == name and job.process.poll() is None:
                raise ValueError(f"a run named {name!r} is already going; wait for it, stop it, or pick another name")

    def _launch(self, home, name: str, run_dir: Path, config_path: Path, store: Any) -> Job:
        output = run_dir / "output.txt"
        env = {**os.environ, "RAGTUNE_HOME": str(home), "PYTHONUNBUFFERED": "1", "RAGTUNE_RUN_ID": run_dir.name,
               "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore"}
        with open(output, "ab") as out:
            process = subprocess.Popen([sys.executable, "-m", "serving.cli", "tune", str(config_path), "--home", str(home)],
                                       stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       cwd=str(REPO), env=env, start_new_session=True)
        run_id = store.add_run(name, str(config_path), [], process.pid, str(output))
        job = self.jobs[run_id] = Job(run_id, name, process, output, run_dir)
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
                    job.process.wait()
                store.finish_run(run_id, "stopped", job.process.returncode)


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


_REGISTRY = JobRegistry()


def job_registry() -> JobRegistry:
    return _REGISTRY


# ------------------------------------------------------------------------------------ run views

def read_log(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of the run's ``log.jsonl`` (a line cut short by a kill is skipped)."""
    rows = []
    try:
        lines = (Path(run_dir) / "log.jsonl").read_text(encoding="utf-8").splitlines()
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


def progress(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The newest step, the planned steps and the ETA the trainer measured, or None before the first log."""
    for row in reversed(rows):
        if row.get("event") in ("train", "eval") and row.get("max_steps"):
            return {"step": int(row["step"]), "max_steps": int(row["max_steps"]), "eta_s": row.get("eta_s"),
                    "tokens_per_s": row.get("tokens_per_s"), "step_s": row.get("step_s")}
    return None


def tail(path: str | os.PathLike, lines: int = 15) -> str:
    try:
        return "\n".join(Path(path).read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return ""


def checkpoints(run_dir: str | os.PathLike) -> list[str]:
    folder = Path(run_dir) / "checkpoints"
    found = [p for p in folder.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return [p.name for p in sorted(found, key=lambda p: int(p.name.split("-")[-1]))]


def run_view(run: dict[str, Any]) -> dict[str, Any]:
    run_dir = run_dir_of(run)
    rows = read_log(run_dir)
    return {"run_dir": str(run_dir), "curve": loss_curve(rows), "progress": progress(rows),
            "log_text": tail(run_dir / "log.txt", 20), "output": tail(run["output_path"], 40),
            "checkpoints": checkpoints(run_dir)}


def keep_checkpoint(home: str | os.PathLike, run: dict[str, Any], adapter_name: str, overwrite: bool = False) -> Path:
    """Keep the newest checkpoint of a stopped run as adapter ``adapter_name`` (with its manifest)."""
    from tuning.training import checkpoint_to_adapter

    if run["status"] == "running":
        raise ValueError("the run is still going; stop it first (or wait for its adapter)")
    return checkpoint_to_adapter(Path(home), run_dir_of(run), adapter_name, overwrite=overwrite)


def list_adapters(home: str | os.PathLike) -> list[dict[str, Any]]:
    from tuning.adapters import list_adapters as listed

    return listed(Path(home))


def remove_adapter(home: str | os.PathLike, name: str) -> Path:
    from tuning.adapters import remove_adapter as removed

    return removed(Path(home), name)
