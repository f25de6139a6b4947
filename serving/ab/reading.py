"""Choose the layout an adapter reads its sources in, on a dev split, and record it with the adapter.

A RAFT adapter answers in ``rag+ft`` from whole chunks (the layout of its training rows), from the best
evidence sentence with grounded decoding, or from that sentence with a second look at the whole chunks where
it says the sources do not say (``second_look``); which one is best depends on the adapter and the collection
(docs/answering-from-sources.md: the demo's 2-epoch adapter lost 5.5 F1 points with sentences on its
dev split, the COVID-QA adapter gained 4.3). ``ragtune adapters reading NAME -c C --questions DEV.jsonl``
answers the dev questions in each layout, keeps the one with the highest mean token F1 (a tie keeps the
simpler layout) and writes it, with the figures it was chosen on, into the adapter's manifest;
``rag+ft`` answers then read in it (``ServeConfig.ragft_reading``). Dev questions only: a choice made on the
test set would make the test figures a tuned number.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from serving.ab import metrics
from serving.ab.runner import load_questions
from serving.ab.stats import paired_difference
from serving.config import READING_KEYS, WHOLE_CHUNKS, ServingError
from serving.prompts import answer_for_scoring

LAYOUTS: dict[str, dict[str, Any]] = {
    "chunks": dict(WHOLE_CHUNKS),  # the RAFT rows' layout, decoded plainly
    "sentences": {"evidence_sentences": 1, "grounded": True, "grounded_spans": 1, "second_look": False},  # one extract
    # the best sentence first; where the model says the sources do not say, a second look at the whole chunks
    "sentences+chunks": {"evidence_sentences": 1, "grounded": True, "grounded_spans": 1, "second_look": True},
}
MEASURED = ("chunks", "sentences+chunks")  # "sentences" is read off the second: its answer up to the second look


def layout_record(layout: str, chosen_on: dict[str, Any] | None = None) -> dict[str, Any]:
    """The manifest's ``reading`` entry for ``layout`` (``chosen_on``: the figures, or None when set by hand)."""
    if layout not in LAYOUTS:
        raise ServingError(f"unknown reading layout {layout!r}; use one of: {', '.join(LAYOUTS)}")
    return {"layout": layout, **LAYOUTS[layout], "chosen_on": chosen_on or "set by hand"}


def measure_layouts(assistant: Any, adapter: str, collection: str, rows: list[dict[str, Any]],
                    concurrency: int = 8, progress: Callable[[int, int], None] | None = None) -> dict[str, list[dict]]:
    """Each row answered in rag+ft in every layout (greedy); per layout, per row: the answer's scores.

    Two layouts are generated; ``sentences`` is the ``sentences+chunks`` answer where no second look was
    taken and that answer's first look (the refusal, kept in ``decoding["first_look"]``) where one was: the
    same greedy text the layout gives alone, without answering every row a third time."""
    from serving.assistant import Assistant

    arms = {}
    for name in MEASURED:
        config = dataclasses.replace(assistant.config, ragft_reading="config",
                                     **{f"ragft_{key}": LAYOUTS[name][key] for key in READING_KEYS})
        arms[name] = Assistant(assistant.workspace, assistant.generator, config)
    cells = [(name, i) for name in MEASURED for i in range(len(rows))]
    done = 0

    def answer(cell: tuple[str, int]) -> tuple[dict[str, float], dict[str, float]]:
        nonlocal done
        name, i = cell
        reply = arms[name].answer(rows[i]["question"], mode="rag+ft", collection=collection, adapter=adapter,
                                  log=False, max_new_tokens=64)
        done += 1
        if progress:
            progress(done, len(cells))
        first = reply.decoding.get("first_look", reply.text)
        return (metrics.score_answer(answer_for_scoring(reply.text), rows[i]),
                metrics.score_answer(answer_for_scoring(first), rows[i]))

    # concurrently: the local engine decodes them in one batch (greedy answers equal one at a time)
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="reading") as pool:
        scored = list(pool.map(answer, cells))
    n = len(rows)
    chunks, both = scored[:n], scored[n:]
    return {"chunks": [s for s, _ in chunks], "sentences": [first for _, first in both],
            "sentences+chunks": [s for s, _ in both]}


def choose_reading(assistant: Any, adapter: str, collection: str, questions: str | Path, limit: int = 0,
                   progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Measure the layouts on the dev ``questions`` and return the ``reading`` record of the best one (mean
    token F1; a tie keeps the simpler layout, in the order of :data:`LAYOUTS`)."""
    rows = load_questions(questions)
    if limit:
        rows = rows[:limit]
    assistant.check(rows[0]["question"], "rag+ft", collection, adapter)
    started = time.perf_counter()
    scores = measure_layouts(assistant, adapter, collection, rows, progress=progress)
    f1 = {name: [s["token_f1"] for s in per_row] for name, per_row in scores.items()}
    correct = {name: [s["correct"] for s in per_row] for name, per_row in scores.items()}
    mean = {name: 100 * sum(v) / len(v) for name, v in f1.items()}
    layout = max(LAYOUTS, key=lambda name: (round(mean[name], 6), -list(LAYOUTS).index(name)))
    versus = {}
    for name in LAYOUTS:
        if name != "chunks":
            diff = paired_difference(f1[name], f1["chunks"])
            versus[name] = [round(100 * diff[key], 1) for key in ("mean", "ci_low", "ci_high")]
    chosen_on = {
        "questions": str(questions), "sha256": hashlib.sha256(Path(questions).read_bytes()).hexdigest()[:16],
        "n": len(rows), "collection": collection, "metric": "token_f1",
        "token_f1": {name: round(v, 1) for name, v in mean.items()},
        "correct": {name: round(100 * sum(v) / len(v), 1) for name, v in correct.items()},
        "f1_minus_chunks": versus,  # paired difference in token F1 points, with its 95% bootstrap CI
        "seconds": round(time.perf_counter() - started, 1),
        "chosen": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return layout_record(layout, chosen_on)


__all__ = ["LAYOUTS", "MEASURED", "layout_record", "measure_layouts", "choose_reading"]
