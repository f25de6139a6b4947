"""Indexing and retrieval benchmark: ragtune vs the plain stack, in one process, one JSON line per figure.

    python bench/index_bench.py            # full COVID-QA (98 papers, 1,380 questions) + 100k-chunk latency
    python bench/index_bench.py --quick    # 30 papers, 300 questions, same metrics, < 5 minutes on 2 cores
    python bench/index_bench.py --quick --store milvus   # also the same corpus on Milvus Lite, vs the FAISS store

Corpus: the contexts of ../shared/datasets/covid_qa (SQuAD format) when present, else a generated
corpus of similar size (hit@k is then reported on generated questions). Metrics (names are fixed):
embed_overhead_ratio, resync_speedup, query_p50_ms, query_p95_ms, query_p50_ms_100k,
query_p95_ms_100k, hit_at_{1,5,10}_{dense,bm25,hybrid}.

With ``--store milvus`` the same corpus is also indexed into a Milvus Lite file and compared with the
SQLite + FAISS store in the same run (``"store": "milvus"`` on those lines): index_chunks_per_s
(Milvus / FAISS), resync_speedup, hit_at_5_hybrid (Milvus' own RRF ranker vs ragtune's convex fusion
chosen on a dev half of the questions, reported on the other half against the FAISS store),
query_p50_ms_100k (Milvus Lite vs FAISS, ratio) and kill9_consistency (the indexer killed at 5
points, re-run, compared with an uninterrupted run).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# ../shared beside the checkout (main), or two levels up (a worktree under wt/)
DEFAULT_DATA = next((p / "shared" / "datasets" / "covid_qa" / "200423_covidQA.json" for p in (REPO.parent, REPO.parents[1])
                     if (p / "shared" / "datasets" / "covid_qa" / "200423_covidQA.json").exists()),
                    REPO.parent / "shared" / "datasets" / "covid_qa" / "200423_covidQA.json")


def line(metric: str, value, unit: str, goal: str | None = None, baseline=None, ragtune=None, **extra) -> dict:
    row = {"bench": "index", "metric": metric, "value": round(float(value), 4), "baseline": baseline,
           "ragtune": ragtune, "unit": unit, "goal": goal, **extra}
    print(json.dumps(row), flush=True)
    return row


def load_squad(path: Path, papers: int | None) -> tuple[dict[str, str], list[dict]]:
    data = json.loads(path.read_text(encoding="utf-8"))["data"]
    docs: dict[str, str] = {}
    questions = []
    for n, article in enumerate(data[:papers] if papers else data):
        name = f"paper{n:03d}.txt"
        contexts = [p["context"] for p in article["paragraphs"]]
        docs[name] = "\n\n".join(contexts)
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                if qa.get("answers"):
                    questions.append({"question": qa["question"], "answer": qa["answers"][0]["text"], "doc": name})
    return docs, questions


def generated_corpus(papers: int) -> tuple[dict[str, str], list[dict]]:
    """Stand-in when COVID-QA is absent: synthetic 'papers' with unique checkable numbers."""
    rng = random.Random(7)
    words = ("cell virus protein host immune response sample patient cohort assay receptor binding model "
             "infection transmission rate study analysis gene expression pathway clinical trial").split()
    docs, questions = {}, []
    for n in range(papers):
        paragraphs = []
        for p in range(60):
            code, value = f"K{n:03d}-{p:02d}", rng.randint(100, 99999)
            filler = " ".join(rng.choice(words) for _ in range(90))
            paragraphs.append(f"{filler}. The measured titre of sample {code} was {value} units. {filler}.")
            if p % 6 == 0:
                questions.append({"question": f"What was the measured titre of sample {code}?", "answer": f"{value} units",
                                  "doc": f"paper{n:03d}.txt"})
        docs[f"paper{n:03d}.txt"] = "\n\n".join(paragraphs)
    return docs, questions


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q))


def time_queries(col, questions: list[dict], n: int) -> list[float]:
    latencies = []
    for q in questions[:n]:
        start = time.perf_counter()
        col.search(q["question"], k=5, mode="hybrid")
        latencies.append((time.perf_counter() - start) * 1000)
    return latencies


def normalise(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


def hit_rates(col, questions: list[dict]) -> dict[str, dict[int, float]]:
    from tqdm import tqdm

    rates = {}
    for mode in ("dense", "bm25", "hybrid"):
        found = {1: 0, 5: 0, 10: 0}
        for q in tqdm(questions, desc=f"hit@k {mode}", file=sys.stderr):
            hits = col.search(q["question"], k=10, mode=mode)
            answer = normalise(q["answer"])
            ranks = [i for i, h in enumerate(hits, start=1) if answer and answer in normalise(h.text)]
            for k in found:
                found[k] += bool(ranks and ranks[0] <= k)
        rates[mode] = {k: v / len(questions) for k, v in found.items()}
    return rates


def synthetic_100k(ws, source, target: int):
    """A collection of ``target`` chunks: the real chunks repeated, vectors jittered and re-normalised."""
    from core import db
    from rag import store

    from rag.collection import IndexConfig

    # at this size exact search reads 150 MB of vectors per query (memory-bound, ~12 ms here):
    # HNSW is what the docs recommend for large collections (--index-type hnsw)
    col = ws.create("bench100k", IndexConfig(index_type="hnsw"))
    rows = source.conn.execute("SELECT text, vector FROM chunks WHERE collection_id = ?", (source.id,)).fetchall()
    texts = [r[0] for r in rows]
    base = store.blobs_to_matrix((r[1] for r in rows), source.dimension)
    rng = np.random.default_rng(0)
    fts = store.fts_table(col.id)
    copies = -(-target // len(rows))
    made = 0
    with db.transaction(ws.conn) as conn:
        for c in range(copies):
            doc_id = conn.execute(
                "INSERT INTO documents (collection_id, path, root, content_hash, size, text, indexed_at) VALUES (?, ?, '', '', 0, '', 0)",
                (col.id, f"copy{c:03d}.txt")).lastrowid
            vectors = base + rng.normal(0, 0.02, base.shape).astype(np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            for i, text in enumerate(texts):
                if made >= target:
                    break
                cid = conn.execute(
                    "INSERT INTO chunks (document_id, collection_id, ordinal, start, end, text, vector) VALUES (?, ?, ?, 0, ?, ?, ?)",
                    (doc_id, col.id, i, len(text), text, store.vector_to_blob(vectors[i]))).lastrowid
                conn.execute(f"INSERT INTO {fts} (rowid, text) VALUES (?, ?)", (cid, text))
                made += 1
        conn.execute("UPDATE collections SET version = version + 1 WHERE id = ?", (col.id,))
    col.save_index()
    return col


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="30 papers and 300 questions (same metrics)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="SQuAD-format file (default: COVID-QA)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results", help="where the plot goes")
    parser.add_argument("--store", choices=["sqlite", "milvus"], default="sqlite",
                        help="milvus: also run the corpus on Milvus Lite and compare it with the SQLite + FAISS store")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from sentence_transformers import SentenceTransformer

    from rag.collection import Workspace
    from rag.embeddings import resolve_embedding_model

    papers = 30 if args.quick else None
    if args.data.exists():
        docs, questions = load_squad(args.data, papers)
        source = f"COVID-QA ({len(docs)} papers)"
    else:
        docs, questions = generated_corpus(30 if args.quick else 98)
        source = f"generated ({len(docs)} papers; {args.data} not found)"
    random.Random(0).shuffle(questions)
    if args.quick:
        questions = questions[:300]
    print(f"# corpus: {source}, {sum(len(t) for t in docs.values()) / 1e6:.2f} M chars, {len(questions)} questions",
          file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "corpus"
        folder.mkdir()
        for name, text in docs.items():
            (folder / name).write_text(text, encoding="utf-8")
        ws = Workspace(Path(tmp) / "home")
        # warm the model (both paths then run hot): loading is not what is compared
        _, location = resolve_embedding_model("default")
        plain = SentenceTransformer(location, device="cpu")
        plain.encode(["warm up"] * 64)
        from rag.embeddings import get_embedder

        get_embedder("default").embed_batch(["warm up"] * 64)

        # the chunk texts ragtune will embed, made the same way, for the baseline to encode
        from rag.chunking import TokenChunker
        from rag.documents import load_document

        embedder = get_embedder("default")
        chunker = TokenChunker(embedder.tokenizer, 256, 32, embedder.max_tokens)
        texts = [c.embedding_text() for p in sorted(folder.iterdir()) for c in chunker.split(load_document(p, p.name))]

        # baseline before and after ragtune, averaged, so drift in machine load hits both sides
        encode_runs = []
        start = time.perf_counter()
        plain.encode(texts, batch_size=32, normalize_embeddings=True)
        encode_runs.append(time.perf_counter() - start)
        start = time.perf_counter()
        report = ws.index("bench", [folder])
        first_index_s = time.perf_counter() - start
        col = ws.get("bench")
        start = time.perf_counter()
        plain.encode(texts, batch_size=32, normalize_embeddings=True)
        encode_runs.append(time.perf_counter() - start)
        encode_s = statistics.mean(encode_runs)
        assert report.chunks == len(texts), (report.chunks, len(texts))
        ragtune_tput, plain_tput = len(texts) / first_index_s, len(texts) / encode_s
        line("embed_overhead_ratio", ragtune_tput / plain_tput, "x", ">= 0.9",
             baseline=round(plain_tput, 2), ragtune=round(ragtune_tput, 2))
        print(f"# {len(texts)} chunks; ragtune index {first_index_s:.1f}s, plain encode {encode_s:.1f}s", file=sys.stderr)

        start = time.perf_counter()
        resync = ws.index("bench", [folder], sync=True)
        resync_s = time.perf_counter() - start
        assert resync.chunks == 0 and resync.unchanged == len(docs), resync
        line("resync_speedup", first_index_s / resync_s, "x", ">= 50", baseline=round(first_index_s, 3), ragtune=round(resync_s, 4))

        time_queries(col, questions, 20)  # warm caches
        lat = time_queries(col, questions, 200)
        line("query_p50_ms", percentile(lat, 50), "ms", None, ragtune=round(percentile(lat, 50), 2))
        line("query_p95_ms", percentile(lat, 95), "ms", None, ragtune=round(percentile(lat, 95), 2))

        rates = hit_rates(col, questions)
        for k in (1, 5, 10):
            best = max(rates["dense"][k], rates["bm25"][k])
            for mode in ("dense", "bm25", "hybrid"):
                line(f"hit_at_{k}_{mode}", rates[mode][k], "fraction",
                     ">= max(dense, bm25)" if mode == "hybrid" else None,
                     baseline=round(best, 4) if mode == "hybrid" else None, ragtune=round(rates[mode][k], 4))

        big = synthetic_100k(ws, col, 100_000)
        time_queries(big, questions, 20)
        lat = time_queries(big, questions, 200)
        line("query_p50_ms_100k", percentile(lat, 50), "ms", "<= 20", ragtune=round(percentile(lat, 50), 2))
        line("query_p95_ms_100k", percentile(lat, 95), "ms", None, ragtune=round(percentile(lat, 95), 2))
        plot(rates, args.out, source)
        if args.store == "milvus":
            milvus_section(ws, folder, docs, questions, Path(tmp), col, first_index_s, big, lat, args.quick)


# --- --store milvus: the same corpus on Milvus Lite, compared with the SQLite + FAISS store ----------

def first_ranks(col, questions: list[dict], mode: str, fusion: str = "convex") -> list[int | None]:
    """Rank of the first chunk holding the answer (None when not in the top 10), per question."""
    out = []
    for q in questions:
        hits = col.search(q["question"], k=10, mode=mode, fusion=fusion)
        answer = normalise(q["answer"])
        ranks = [i for i, h in enumerate(hits, start=1) if answer and answer in normalise(h.text)]
        out.append(ranks[0] if ranks else None)
    return out


def hit_at(ranks: list[int | None], k: int) -> float:
    return sum(1 for r in ranks if r is not None and r <= k) / max(1, len(ranks))


def paired_ci(a: list[int | None], b: list[int | None], k: int, rounds: int = 2000) -> tuple[float, float]:
    """95% paired bootstrap CI of hit@k(a) - hit@k(b) over the same questions."""
    x = np.array([(r is not None and r <= k) for r in a], dtype=float)
    y = np.array([(r is not None and r <= k) for r in b], dtype=float)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, len(x), (rounds, len(x)))
    diffs = (x[idx] - y[idx]).mean(axis=1)
    return float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))


def milvus_100k(ws, source, target: int, uri: str):
    """The synthetic 100k chunks of :func:`synthetic_100k` (same texts, same jitter) in a Milvus Lite collection."""
    from rag import store
    from rag.collection import IndexConfig

    col = ws.create("bench100km", IndexConfig(index_type="hnsw"), store_uri=uri)
    rows = source.conn.execute("SELECT text, vector FROM chunks WHERE collection_id = ?", (source.id,)).fetchall()
    texts = [r[0] for r in rows]
    base = store.blobs_to_matrix((r[1] for r in rows), source.dimension)
    rng = np.random.default_rng(0)
    client, name = col.backend.client, col.backend.name
    made, batch = 0, []
    for c in range(-(-target // len(rows))):
        vectors = base + rng.normal(0, 0.02, base.shape).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        for i, text in enumerate(texts):
            if made >= target:
                break
            batch.append({"id": made, "text": text, "dense": vectors[i].tolist(), "doc": f"copy{c:03d}.txt", "hash": "",
                          "ordinal": i, "start": 0, "end": len(text), "metadata": {}, "filters": {}})
            made += 1
            if len(batch) == 5000:
                client.insert(name, batch)
                batch = []
        if c % 10 == 0:
            print(f"# milvus 100k: {made} rows", file=sys.stderr, flush=True)
    if batch:
        client.insert(name, batch)
    col.save_index()  # flush: sealed segments get their indexes (as after every index run)
    return col


KILL_CHILD = r"""
import sys
from rag.collection import Workspace
from rag.embeddings import get_embedder
get_embedder("default")
print("ready", flush=True)
Workspace(sys.argv[1]).index("k", [sys.argv[2]], sync=True)
"""


def kill9_consistency(tmp: Path, docs: dict[str, str], points: int = 5) -> tuple[int, list[int]]:
    """Index a corpus into Milvus Lite, change it (edits + deletions), then run the re-sync in a child
    killed after commit n (n spread over the run), re-run it, and compare documents, hashes and chunk
    counts with an uninterrupted re-sync. Returns (identical runs, kill points)."""
    import shutil
    import signal
    import sqlite3
    import subprocess

    from rag import milvus_store
    from rag.collection import IndexConfig, Workspace

    corpus = tmp / "kill-corpus"
    corpus.mkdir()
    names = sorted(docs)[:12]
    for name in names:
        (corpus / name).write_text(docs[name][:6000], encoding="utf-8")
    base = tmp / "kill-base"

    def release():
        for uri in list(milvus_store._CLIENTS):
            milvus_store.release(uri)

    Workspace(base).index("k", [corpus], config=IndexConfig(group_chunks=4), store_uri=f"milvus://{base / 'm.db'}")
    release()
    for n, name in enumerate(names):  # v2: a third deleted, the rest edited
        if n % 3 == 0:
            (corpus / name).unlink()
        else:
            (corpus / name).write_text(docs[name][:6000] + f"\n\nRevision note {n}.", encoding="utf-8")

    def copy(label: str) -> Path:
        home = tmp / label
        shutil.copytree(base, home)
        with Workspace(home).conn as conn:
            conn.execute("UPDATE collections SET store = ?", (f"milvus://{home / 'm.db'}",))
        return home

    def version(home: Path) -> int:
        conn = sqlite3.connect(home / "ragtune.db", timeout=30)
        try:
            return int(conn.execute("SELECT version FROM collections WHERE name = 'k'").fetchone()[0])
        finally:
            conn.close()

    def state(home: Path) -> dict:
        col = Workspace(home).get("k")
        ok = col.check()["mismatched"] == 0
        out = {d["path"]: (d["content_hash"], d["chunks"]) for d in col.documents()}
        release()
        return {"ok": ok, "docs": out}

    clean = copy("kill-clean")
    start = version(clean)
    Workspace(clean).index("k", [corpus], sync=True)
    expected = state(clean)
    commits = version(clean) - start
    identical, killed_at = 0, []
    for p in range(points):
        home = copy(f"kill-{p}")
        target = start + 1 + p * max(1, commits - 1) // points
        child = subprocess.Popen([sys.executable, "-c", KILL_CHILD, str(home), str(corpus)], stdout=subprocess.PIPE,
                                 text=True, cwd=str(REPO), env={**os.environ, "PYTHONPATH": str(REPO)})
        child.stdout.readline()
        while child.poll() is None and version(home) < target:
            time.sleep(0.002)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
        killed_at.append(version(home) - start)
        Workspace(home).index("k", [corpus], sync=True)
        identical += int(state(home) == expected and expected["ok"])
        shutil.rmtree(home, ignore_errors=True)
    print(f"# kill9: {commits} commits in an uninterrupted re-sync; killed after commits {killed_at}", file=sys.stderr)
    return identical, killed_at


def milvus_section(ws, folder: Path, docs: dict[str, str], questions: list[dict], tmp: Path, faiss_col,
                   faiss_index_s: float, faiss_big, faiss_lat_100k: list[float], quick: bool) -> None:
    uri = f"milvus://{tmp / 'milvus.db'}"
    chunks = faiss_col.stats()["chunks"]
    start = time.perf_counter()
    report = ws.index("benchm", [folder], store_uri=uri)
    milvus_index_s = time.perf_counter() - start
    col = ws.get("benchm")
    assert report.chunks == chunks and col.check()["mismatched"] == 0, (report.chunks, chunks)
    faiss_tput, milvus_tput = chunks / faiss_index_s, chunks / milvus_index_s
    line("index_chunks_per_s", milvus_tput / faiss_tput, "x", ">= 0.8", baseline=round(faiss_tput, 2),
         ragtune=round(milvus_tput, 2), store="milvus")

    start = time.perf_counter()
    resync = ws.index("benchm", [folder], sync=True)
    resync_s = time.perf_counter() - start
    assert resync.chunks == 0 and resync.unchanged == len(docs), resync
    line("resync_speedup", milvus_index_s / resync_s, "x", ">= 50", baseline=round(milvus_index_s, 3),
         ragtune=round(resync_s, 4), store="milvus")

    # fusion on Milvus: its own RRF ranker vs ragtune's convex fusion over its two lists, chosen on a dev
    # half of the questions; the other half (never used to choose) compares the stores
    half = len(questions) // 2
    dev, test = questions[:half], questions[half:]
    dev_hits = {f: hit_at(first_ranks(col, dev, "hybrid", f), 5) for f in ("convex", "rrf")}
    chosen = max(dev_hits, key=lambda f: (dev_hits[f], f == "convex"))
    for f, v in dev_hits.items():
        line(f"hit_at_5_hybrid_dev_{f}", v, "fraction", None, ragtune=round(v, 4), store="milvus",
             note="dev half; 'rrf' is Milvus hybrid_search + RRFRanker(60)")
    m_ranks = first_ranks(col, test, "hybrid", chosen)
    f_ranks = first_ranks(faiss_col, test, "hybrid", "convex")
    low, high = paired_ci(m_ranks, f_ranks, 5)
    line("hit_at_5_hybrid", hit_at(m_ranks, 5), "fraction", "within 0.01 of the FAISS store",
         baseline=round(hit_at(f_ranks, 5), 4), ragtune=round(hit_at(m_ranks, 5), 4), store="milvus", fusion=chosen,
         diff_ci95=[round(low, 4), round(high, 4)], questions=len(test))
    for mode in ("dense", "bm25"):
        mv, fv = hit_at(first_ranks(col, test, mode), 5), hit_at(first_ranks(faiss_col, test, mode), 5)
        line(f"hit_at_5_{mode}", mv, "fraction", None, baseline=round(fv, 4), ragtune=round(mv, 4), store="milvus",
             questions=len(test))

    start = time.perf_counter()
    big = milvus_100k(ws, faiss_col, 100_000, uri)
    print(f"# milvus 100k built in {time.perf_counter() - start:.0f}s", file=sys.stderr, flush=True)
    time_queries(big, questions, 20)  # the same warm-up and queries as the FAISS store's figure
    lat = time_queries(big, questions, 200)
    p50, f50 = percentile(lat, 50), percentile(faiss_lat_100k, 50)
    line("query_p50_ms_100k", p50, "ms", "<= 50", baseline=round(f50, 2), ragtune=round(p50, 2), store="milvus",
         ratio=round(p50 / f50, 2))
    line("query_p95_ms_100k", percentile(lat, 95), "ms", None, baseline=round(percentile(faiss_lat_100k, 95), 2),
         ragtune=round(percentile(lat, 95), 2), store="milvus")

    identical, points = kill9_consistency(tmp, docs)
    line("kill9_consistency", identical / len(points), "fraction", "1.0 (identical documents, hashes, chunk counts)",
         ragtune=f"{identical}/{len(points)}", store="milvus", killed_after_commits=points)


def plot(rates: dict, out: Path, source: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for mode, marker in (("dense", "o"), ("bm25", "s"), ("hybrid", "^")):
        ks = sorted(rates[mode])
        ax.plot(ks, [rates[mode][k] for k in ks], marker=marker, label=mode)
    ax.set_xlabel("k")
    ax.set_ylabel("hit@k (answer in a retrieved chunk)")
    ax.set_title(f"Retrieval on {source}", fontsize=9)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "index_hit_at_k.png", dpi=120)
    print(f"# plot: {out / 'index_hit_at_k.png'}", file=sys.stderr)


if __name__ == "__main__":
    main()
