"""Indexing and retrieval benchmark: ragtune vs the plain stack, in one process, one JSON line per figure.

    python bench/index_bench.py            # full COVID-QA (98 papers, 1,380 questions) + 100k-chunk latency
    python bench/index_bench.py --quick    # 30 papers, 300 questions, same metrics, < 5 minutes on 2 cores

Corpus: the contexts of ../shared/datasets/covid_qa (SQuAD format) when present, else a generated
corpus of similar size (hit@k is then reported on generated questions). Metrics (names are fixed):
embed_overhead_ratio, resync_speedup, query_p50_ms, query_p95_ms, query_p50_ms_100k,
query_p95_ms_100k, hit_at_{1,5,10}_{dense,bm25,hybrid}.
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
DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "covid_qa" / "200423_covidQA.json"


def line(metric: str, value, unit: str, goal: str | None = None, baseline=None, ragtune=None) -> dict:
    row = {"bench": "index", "metric": metric, "value": round(float(value), 4), "baseline": baseline,
           "ragtune": ragtune, "unit": unit, "goal": goal}
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
