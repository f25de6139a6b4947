"""Shared fixtures. Every path goes to a temp dir; the real packaged models are loaded once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CORPORA = REPO / "corpora"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may come from a model hub in tests


@pytest.fixture()
def home(tmp_path, monkeypatch) -> Path:
    """A fresh RAGTUNE_HOME for one test."""
    path = tmp_path / "home"
    monkeypatch.setenv("RAGTUNE_HOME", str(path))
    return path


@pytest.fixture(scope="session")
def embedder():
    from rag.embeddings import get_embedder

    return get_embedder("default")


# --- rag fixtures ---
@pytest.fixture()
def small_docs(tmp_path) -> Path:
    """A tiny folder with one file per loader, some good, some bad."""
    root = tmp_path / "docs"
    (root / "manuals").mkdir(parents=True)
    (root / "manuals" / "hx.md").write_text(
        "# HX manual\n\nThe HX-9 heat pump delivers 9 kW.\n\n## Warranty\n\nThe warranty on HX units lasts seven years.\n\n"
        "## Error codes\n\nE07 means low water flow; check the strainer.\n", encoding="utf-8")
    (root / "notes.txt").write_text("The Brenholt Works factory opened on 9 September 2016.\n", encoding="utf-8")
    (root / "prices.html").write_text(
        "<html><head><title>Prices</title><script>alert('x')</script></head><body><h1>Price list</h1>"
        "<p>The Lumo 2 controller costs 189 EUR.</p></body></html>", encoding="utf-8")
    (root / "faq.jsonl").write_text('{"text": "Support is open Saturday 09:00-13:00.", "topic": "support"}\n', encoding="utf-8")
    return root


@pytest.fixture(params=["sqlite", "milvus"])
def store_uri(request, tmp_path) -> str:
    """Each chunk store in turn: the default SQLite + FAISS, and Milvus Lite in a temp folder (Milvus Lite
    3.2 runs in-process, so a fresh file per test costs well under a second; nothing to share)."""
    if request.param == "sqlite":
        return "sqlite"
    return f"milvus://{tmp_path / 'milvus.db'}"


# --- tuning fixtures ---
@pytest.fixture(scope="session")
def tuning_home(tmp_path_factory) -> Path:
    """A workspace holding the packaged SmolLM2 converted once from its GGUF (~20 s, 540 MB), shared by the
    xdist workers: the first one converts under a lock, the others wait and reuse it."""
    from filelock import FileLock

    from tuning.models import ensure_packaged_causal_lm

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's own folder, above each worker's popen-gwN
    path = root / "tuning-home"
    with FileLock(str(path) + ".lock"):
        ensure_packaged_causal_lm(path)
    return path


@pytest.fixture(scope="session")
def smol_tokenizer(tuning_home):
    from tuning.models import load_tokenizer, resolve_base_model

    return load_tokenizer(resolve_base_model("smollm2-135m-instruct", tuning_home))


def home_with_models(tuning_home: Path, path: Path) -> Path:
    """``path`` as a fresh workspace that reuses the session's converted model (symlinked, read-only use)."""
    (path / "models").mkdir(parents=True)
    for model in (tuning_home / "models").iterdir():
        if not model.name.startswith("."):
            (path / "models" / model.name).symlink_to(model, target_is_directory=True)
    return path


@pytest.fixture()
def tune_home(tuning_home, tmp_path) -> Path:
    """A fresh workspace per test with the session's converted model."""
    return home_with_models(tuning_home, tmp_path / "tune-home")


def write_jsonl(path: Path, rows: list) -> Path:
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture()
def tiny_sft_data(tmp_path) -> Path:
    """Twelve short instruction rows (a few dozen tokens each)."""
    rows = [{"instruction": f"What is the warranty on the HX-{n}?", "output": f"The HX-{n} has a {n}-year warranty."}
            for n in range(2, 14)]
    return write_jsonl(tmp_path / "data" / "tiny.jsonl", rows)


# --- serving fixtures ---
SERVING_DOCS = [  # a slice of the demo corpus: distinct topics so each question has its own sources
    "company/press-release-2025-06-warranty-seven-years.html",
    "policies/warranty-policy-v2-2021.md",
    "service/sb-2023-07-hx14-minimum-flow.md",
    "service/hx-error-codes.md",
    "policies/travel-policy-2024.md",
    "products/tessa-cylinder-manual.md",
]
# A document that tries to inject markup: the app must show it as text.
MARKUP_DOC = ("# Markup test\n\nThe Vexa-7 gasket is replaced every 11 months. <b id=\"injected-bold\">INJECTED</b> "
              "<script>window.__ragtune_injected = 1</script> <img src=x onerror=\"window.__ragtune_injected = 2\">\n")


def make_test_adapter(home: Path, name: str, seed: int, base_id: str | None = None) -> Path:
    """A small random LoRA adapter (not trained: tests need adapters that change the output, fast),
    written in the registry format `ragtune tune` writes (peft files + ragtune.json)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from tuning.adapters import adapter_dir, write_manifest
    from tuning.models import load_causal_lm, resolve_base_model, weights_hash

    base = resolve_base_model("smollm2-135m-instruct", home)
    model = load_causal_lm(base, for_training=False)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                                  init_lora_weights=False, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for pname, param in peft_model.named_parameters():
            if "lora_B" in pname:
                param.mul_(0.5)
    folder = adapter_dir(home, name)
    peft_model.save_pretrained(folder, safe_serialization=True)
    write_manifest(folder, {"format": 1, "name": name, "task": "sft", "method": "lora", "quant": "none",
                            "base_model": {"id": base_id or base.id, "kind": "packaged", "sha256": None if base_id else weights_hash(base)},
                            "created": f"2025-01-01T00:00:{seed:02d}+00:00", "metrics": {"train_loss": 1.0}})
    return folder


@pytest.fixture(scope="session")
def serving_home(tuning_home, tmp_path_factory) -> Path:
    """A workspace with the converted model (symlinked), collection 'corvida' (6 demo docs + a markup
    test doc) and adapters 'alpha', 'beta' (random LoRA) and 'foreign' (manifest names another base)."""
    import shutil

    from rag.collection import Workspace

    home = home_with_models(tuning_home, tmp_path_factory.mktemp("serving-home"))
    docs = tmp_path_factory.mktemp("serving-docs")
    for rel in SERVING_DOCS:
        (docs / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(CORPORA / "corvida" / "docs" / rel, docs / rel)
    (docs / "notes").mkdir()
    (docs / "notes" / "markup-test.md").write_text(MARKUP_DOC, encoding="utf-8")
    Workspace(home).index("corvida", [docs])
    make_test_adapter(home, "alpha", 1)
    make_test_adapter(home, "beta", 2)
    make_test_adapter(home, "foreign", 3, base_id="HuggingFaceTB/SmolLM2-360M-Instruct")
    return home


@pytest.fixture(scope="session")
def serving_generator(serving_home):
    from serving.generation import LocalGenerator

    # prefill precision as served: bf16 where the CPU multiplies bf16 natively, int8 elsewhere (emulated bf16
    # prefill is ~3x slower than int8 on an AVX2 CPU and made every serving test pay for it)
    return LocalGenerator("smollm2-135m-instruct", serving_home, quantize="int8")


@pytest.fixture(scope="session")
def bf16_generator(serving_home, serving_generator):
    """The engine with bf16 prefill forced, so both prefill paths (bf16, and int8 with prefill_bf16=False)
    are tested on any CPU; the served generator itself where it already keeps bf16 weights."""
    from serving.generation import LocalGenerator

    if serving_generator.bf16_prefill:
        return serving_generator
    return LocalGenerator("smollm2-135m-instruct", serving_home, quantize="int8", bf16_prefill=True)


@pytest.fixture(scope="session")
def serving_assistant(serving_home, serving_generator):
    from rag.collection import Workspace
    from serving.assistant import Assistant
    from serving.config import ServeConfig
    from serving.history import ChatStore

    ws = Workspace(serving_home)
    # whole chunks and plain decoding: these tests are about the plumbing around any answer (sources, spans,
    # logging, concurrency); the default one-extract answer is tested in test_grounding
    config = ServeConfig(max_new_tokens=8, source_tokens=96, grounded=False, grounded_spans=0, evidence_sentences=0)
    return Assistant(ws, serving_generator, config, ChatStore(ws.db_path))
