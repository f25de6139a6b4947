"""The offline A/B runner with the real packaged models: four arms, caching, report, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import CORPORA, home_with_models, write_jsonl

DOCS = ["service/hx-error-codes.md", "policies/travel-policy-2024.md", "products/tessa-cylinder-manual.md"]


@pytest.fixture(scope="module")
def ab_home(tmp_path_factory, tuning_home):
    """A workspace with a small Corvida collection and a tiny adapter (2 steps: wiring, not quality)."""
    from rag.collection import Workspace
    from tuning.run import tune

    home = home_with_models(tuning_home, tmp_path_factory.mktemp("ab-home"))
    docs = home / "docs"
    for rel in DOCS:
        target = docs / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((CORPORA / "corvida" / "docs" / rel).read_bytes())
    Workspace(home).index("corvida", [docs])
    rows = [json.loads(line) for line in (CORPORA / "corvida" / "qa" / "train.jsonl").read_text().splitlines()]
    train = write_jsonl(home / "train.jsonl", [r for r in rows if r["doc"] in DOCS][:8])
    tune(None, [f"data={train}", "name=tiny", "max_steps=2", "val_share=0", "forgetting_probe=false",
                "max_seq_len=128", "batch_size=2", "progress=false"], home=home, echo=lambda *_: None)
    tests = [json.loads(line) for line in (CORPORA / "corvida" / "qa" / "test.jsonl").read_text().splitlines()]
    write_jsonl(home / "questions.jsonl", [r for r in tests if r["doc"] in DOCS][:3])
    return home


@pytest.fixture(scope="module")
def assistant(ab_home):
    from serving.assistant import Assistant
    from serving.config import ServeConfig

    return Assistant.open(ab_home, ServeConfig(max_new_tokens=8, source_tokens=96), log=False)


def test_four_arms_run_cache_and_report(ab_home, assistant, tmp_path):
    from serving.ab.report import build_report, write_report
    from serving.ab.runner import ABConfig, run_ab
    from serving.ab.runs import ABStore

    config = ABConfig(questions=str(ab_home / "questions.jsonl"), collection="corvida", adapter="tiny", limit=3,
                      max_new_tokens=8, name="smoke")
    first = run_ab(assistant, config)
    assert first["computed"] == 12 and first["reused"] == 0
    again = run_ab(assistant, config)
    assert again["computed"] == 0 and again["reused"] == 12  # the cache answers everything

    store = ABStore(ab_home / "ragtune.db")
    report = build_report(store, "smoke", n_boot=200)
    assert report["questions"] == 3 and set(report["arms"]) == {"base", "rag", "ft", "rag+ft"}
    for arm in report["arms"].values():
        f1 = arm["token_f1"]
        assert 0 <= f1["ci_low"] <= f1["mean"] <= f1["ci_high"] <= 1
    assert "hit_at_4" in report["arms"]["rag"] and "hit_at_4" not in report["arms"]["base"]
    assert report["arms"]["rag"]["hit_at_10"]["mean"] > 0  # retrieval finds the source documents
    assert report["interaction"]["correct"]["ci_low"] <= report["interaction"]["correct"]["ci_high"]
    pairs = {(d["a"], d["b"]) for d in report["differences"] if d["metric"] == "correct"}
    assert len(pairs) == 6
    files = write_report(store, "smoke", tmp_path / "report")
    assert Path(files["means"]).stat().st_size > 1000 and "## The 2x2" in Path(files["md"]).read_text()

    out = subprocess.run([str(Path(sys.executable).parent / "ragtune"), "ab", "report", "smoke", "--format", "json"],
                         capture_output=True, text=True, env={**os.environ, "RAGTUNE_HOME": str(ab_home)}, timeout=300)
    assert out.returncode == 0, out.stderr
    printed = json.loads(out.stdout)
    assert set(printed["arms"]["rag"]["token_f1"]) == {"mean", "ci_low", "ci_high"}
    assert printed["interaction"] is not None and printed["differences"]


def test_a_changed_setting_computes_only_what_it_changes(ab_home, assistant):
    from serving.ab.runner import ABConfig, run_ab

    common = dict(questions=str(ab_home / "questions.jsonl"), collection="corvida", limit=1, max_new_tokens=8,
                  arms=["base", "rag"])
    run_ab(assistant, ABConfig(**common, k=4, name="k4"))
    summary = run_ab(assistant, ABConfig(**common, k=2, name="k2"))
    # the base answer does not depend on k: reused; the rag answer is new
    assert summary["reused"] == 1 and summary["computed"] == 1
