"""The A/B report: per-arm means with paired bootstrap CIs, pairwise differences with tests, the 2x2
interaction, examples where arms disagree; written as JSON, Markdown and PNG plots.

    ragtune ab report test-corvida-corvida-raft --format md --out reports/
"""

from __future__ import annotations

import json
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

from serving.ab import stats
from serving.ab.runner import ARMS, HIT_DEPTH
from serving.ab.runs import ABStore

ANSWER_METRICS = ("correct", "token_f1", "exact_match", "rouge_l", "contains")
RAG_METRICS = ("hit_at_1", "hit_at_4", f"hit_at_{HIT_DEPTH}", "citation_correct")


def build_report(store: ABStore, name: str, n_boot: int = 2000) -> dict[str, Any]:
    run = store.run(name)
    if run is None:
        known = ", ".join(r["name"] for r in store.runs()) or "none yet"
        raise ValueError(f"no A/B run named {name!r} (known: {known}); start one with: ragtune ab run --questions FILE ...")
    results = store.results(run["id"])
    by_arm: dict[str, dict[str, dict[str, Any]]] = {}
    for r in results:
        by_arm.setdefault(r["arm"], {})[r["question_id"]] = r
    arms = [a for a in ARMS if a in by_arm]
    # paired analysis: only questions every arm answered
    common = sorted(set.intersection(*(set(v) for v in by_arm.values()))) if by_arm else []
    report: dict[str, Any] = {"run": name, "config": run["config"], "questions": len(common), "arms": {},
                              "differences": [], "interaction": None, "examples": []}
    vectors: dict[str, dict[str, np.ndarray]] = {}
    for arm in arms:
        rows = [by_arm[arm][q]["row"]["scores"] for q in common]
        metric_names = [m for m in (*ANSWER_METRICS, *RAG_METRICS, "latency_s") if rows and m in rows[0]]
        vectors[arm] = {m: np.array([r[m] for r in rows], dtype=float) for m in metric_names}
        report["arms"][arm] = {}
        for m, values in vectors[arm].items():
            mean, low, high = stats.bootstrap_mean_ci(values, n_boot=n_boot)
            report["arms"][arm][m] = {"mean": mean, "ci_low": low, "ci_high": high}
    for a, b in combinations(arms, 2):
        for m in ANSWER_METRICS:
            if m in vectors[a] and m in vectors[b]:
                diff = stats.paired_difference(vectors[b][m], vectors[a][m], n_boot=n_boot)
                report["differences"].append({"a": b, "b": a, "metric": m, **diff})
    if all(arm in vectors for arm in ARMS):
        report["interaction"] = {m: stats.interaction(vectors["base"][m], vectors["rag"][m], vectors["ft"][m],
                                                      vectors["rag+ft"][m], n_boot=n_boot) for m in ("correct", "token_f1")}
    if report["differences"]:
        # examples where arms disagree on correctness, for reading
        for q in common:
            outcomes = {arm: by_arm[arm][q]["row"]["scores"]["correct"] for arm in arms}
            if len(set(outcomes.values())) > 1 and len(report["examples"]) < 12:
                row = by_arm[arms[0]][q]["row"]
                report["examples"].append({"id": q, "question": row["question"], "reference": row["answer"],
                                           "answers": {arm: by_arm[arm][q]["answer"]["text"] for arm in arms},
                                           "correct": outcomes})
    return report


def _fmt(cell: dict[str, float], pct: bool = True) -> str:
    scale = 100 if pct else 1
    return f"{cell['mean'] * scale:.1f} [{cell['ci_low'] * scale:.1f}, {cell['ci_high'] * scale:.1f}]"


def to_markdown(report: dict[str, Any], plots: dict[str, str] | None = None) -> str:
    arms = list(report["arms"])
    lines = [f"# A/B report: {report['run']}", "",
             f"{report['questions']} questions answered by every arm; means in % with 95% paired-bootstrap CIs.", ""]
    metric_names = [m for m in (*ANSWER_METRICS, *RAG_METRICS) if any(m in report["arms"][a] for a in arms)]
    lines.append("| metric | " + " | ".join(arms) + " |")
    lines.append("|---|" + "---|" * len(arms))
    for m in metric_names:
        cells = [_fmt(report["arms"][a][m]) if m in report["arms"][a] else "—" for a in arms]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lat = [f"{report['arms'][a]['latency_s']['mean']:.2f}" for a in arms if "latency_s" in report["arms"][a]]
    if lat:
        lines.append("| latency_s (mean) | " + " | ".join(lat) + " |")
    if all(a in arms for a in ARMS):
        c = {a: report["arms"][a]["correct"]["mean"] * 100 for a in ARMS}
        lines += ["", "## The 2x2 (correct, %)", "", "| | no fine-tuning | fine-tuned |", "|---|---|---|",
                  f"| no retrieval | base {c['base']:.1f} | ft {c['ft']:.1f} |",
                  f"| retrieval | rag {c['rag']:.1f} | rag+ft {c['rag+ft']:.1f} |"]
    lines += ["", "## Differences (row arm minus column arm)", "",
              "| comparison | metric | difference (pts) | 95% CI | test | p |", "|---|---|---|---|---|---|"]
    for d in report["differences"]:
        if d["metric"] in ("correct", "token_f1"):
            lines.append(f"| {d['a']} − {d['b']} | {d['metric']} | {d['mean'] * 100:+.1f} | "
                         f"[{d['ci_low'] * 100:+.1f}, {d['ci_high'] * 100:+.1f}] | {d['test']} | {d['p_value']:.3g} |")
    if report.get("interaction"):
        i = report["interaction"]["correct"]
        lines += ["", "## Interaction", "",
                  f"Fine-tuning changes correctness by {i['ft_effect_without_rag'] * 100:+.1f} pts without retrieval and "
                  f"{i['ft_effect_with_rag'] * 100:+.1f} pts with it; the difference (interaction) is "
                  f"{i['mean'] * 100:+.1f} pts, 95% CI [{i['ci_low'] * 100:+.1f}, {i['ci_high'] * 100:+.1f}]."]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{k}]({Path(v).name})" for k, v in plots.items() if v.endswith(".png")]
    if report["examples"]:
        lines += ["", "## Where the arms disagree", ""]
        for e in report["examples"]:
            lines.append(f"**{e['id']}** {e['question']}  \nreference: *{e['reference']}*  ")
            for arm, text in e["answers"].items():
                mark = "✓" if e["correct"][arm] else "✗"
                lines.append(f"- {mark} `{arm}`: {' '.join(text.split())[:240]}")
            lines.append("")
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], out: Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    arms = list(report["arms"])
    files: dict[str, str] = {}
    fig, ax = plt.subplots(figsize=(6, 3.4))
    metrics_shown = [m for m in ("correct", "token_f1", "rouge_l") if all(m in report["arms"][a] for a in arms)]
    width = 0.8 / max(1, len(arms))
    for i, arm in enumerate(arms):
        means = [report["arms"][arm][m]["mean"] * 100 for m in metrics_shown]
        err = [[(report["arms"][arm][m]["mean"] - report["arms"][arm][m]["ci_low"]) * 100 for m in metrics_shown],
               [(report["arms"][arm][m]["ci_high"] - report["arms"][arm][m]["mean"]) * 100 for m in metrics_shown]]
        ax.bar(np.arange(len(metrics_shown)) + i * width, means, width, yerr=err, capsize=3, label=arm)
    ax.set_xticks(np.arange(len(metrics_shown)) + width * (len(arms) - 1) / 2, metrics_shown)
    ax.set_ylabel("% (95% CI)")
    ax.set_title(f"{report['run']} ({report['questions']} questions)", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    files["means"] = str(out / "ab_means.png")
    fig.savefig(files["means"], dpi=120)
    plt.close(fig)
    rag_arms = [a for a in arms if "hit_at_1" in report["arms"][a]]
    if rag_arms:
        fig, ax = plt.subplots(figsize=(4.5, 3.2))
        ks = [1, 4, HIT_DEPTH]
        for arm in rag_arms[:1]:  # retrieval is the same for both rag arms
            ax.plot(ks, [report["arms"][arm][f"hit_at_{k}"]["mean"] * 100 for k in ks], marker="o", label="hybrid retrieval")
        ax.set_xlabel("k")
        ax.set_ylabel("hit@k (%)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.set_title("Retrieval: reference or source doc in top k", fontsize=9)
        fig.tight_layout()
        files["hit_at_k"] = str(out / "ab_hit_at_k.png")
        fig.savefig(files["hit_at_k"], dpi=120)
        plt.close(fig)
    return files


def write_report(store: ABStore, name: str, out: str | Path, fmt: str = "md",
                 report: dict[str, Any] | None = None) -> dict[str, str]:
    """Write plots, report.json and (``md``) report.md; ``report`` reuses one already built."""
    report = report or build_report(store, name)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = plot(report, out)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=float), encoding="utf-8")
    files["json"] = str(out / "report.json")
    if fmt == "md":
        (out / "report.md").write_text(to_markdown(report, files), encoding="utf-8")
        files["md"] = str(out / "report.md")
    return files
