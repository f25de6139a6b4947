"""The adapter registry: ``<home>/adapters/<name>/`` holds peft's files and ``ragtune.json``.

peft files (``adapter_config.json`` + ``adapter_model.safetensors``) load with
``PeftModel.from_pretrained`` and in vLLM (``--enable-lora``). ``method: full`` adapters are complete
HF model folders instead. ``ragtune.json`` records base model id and weights hash, data files and
hashes, the resolved config, metrics, the forgetting probe, time and throughput.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from core.files import write_atomic
from core.names import InvalidName
from core.workspace import Layout
from tuning.errors import AdapterError

MANIFEST = "ragtune.json"


def adapters_root(home: Path) -> Path:
    return Layout(Path(home)).adapters


def adapter_dir(home: Path, name: str) -> Path:
    """``<home>/adapters/<name>``; an adapter name that is not a plain name (``../x``, ``./x``, ``/abs``,
    a symlink out of the folder) is refused with AdapterError, so no adapter is read or deleted elsewhere."""
    try:
        return Layout(Path(home)).adapter_dir(name)
    except InvalidName as exc:
        raise AdapterError(f"{exc}; list adapters with `ragtune adapters`") from None


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(folder: Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AdapterError(f"{folder} has no {MANIFEST}; it was not written by `ragtune tune` (or training did not finish)") from None
    except ValueError:
        raise AdapterError(f"{path} is not valid JSON; remove the adapter with `ragtune adapters rm {Path(folder).name}` and train again") from None


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    # atomic: a crash while an adapter's reading layout is recorded leaves the old manifest, never half of one
    write_atomic(Path(folder) / MANIFEST, json.dumps(manifest, indent=2, default=str) + "\n", fsync=True)


def set_reading(home: Path, name: str, reading: dict[str, Any] | None) -> dict[str, Any]:
    """Record (or with None clear) the reading layout adapter ``name`` is served with in rag+ft
    (``serving.config.check_reading`` reads it); returns the new manifest."""
    folder, manifest = get_adapter(home, name)
    if reading is None:
        manifest.pop("reading", None)
    else:
        manifest["reading"] = reading
    write_manifest(folder, manifest)
    return manifest


def get_adapter(home: Path, name: str) -> tuple[Path, dict[str, Any]]:
    folder = adapter_dir(home, name)
    if folder.is_symlink() or not folder.is_dir():
        known = ", ".join(a["name"] for a in list_adapters(home)) or "none yet"
        raise AdapterError(f"no adapter named {name!r} (known: {known}); train one with `ragtune tune CONFIG name={name}`")
    return folder, read_manifest(folder)


def list_adapters(home: Path) -> list[dict[str, Any]]:
    """One summary per adapter, newest first; half-written folders (names starting with '.') are skipped."""
    root = adapters_root(home)
    out = []
    for folder in sorted(root.iterdir()) if root.exists() else []:
        if folder.name.startswith(".") or not folder.is_dir():
            continue
        try:
            m = read_manifest(folder)
        except AdapterError as exc:
            out.append({"name": folder.name, "path": str(folder), "error": str(exc)})
            continue
        out.append({
            "name": folder.name,
            "task": m.get("task"),
            "method": m.get("method"),
            "quant": m.get("quant"),
            "base_model": (m.get("base_model") or {}).get("id"),
            "created": m.get("created"),
            "metrics": m.get("metrics", {}),
            "forgetting": (m.get("forgetting") or {}).get("perplexity_change_pct"),
            "reading": m["reading"].get("layout") if isinstance(m.get("reading"), dict) else None,
            "size_mb": round(sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 1e6, 2),
            "path": str(folder),
        })
    out.sort(key=lambda a: a.get("created") or "", reverse=True)
    return out


def serving_incompatibility(name: str, task: str | None, method: str | None, trained_on: str | None,
                            trained_sha: str | None, base_id: str, base_sha: str | None) -> str | None:
    """Why adapter ``name`` cannot be served on base ``base_id`` (weights hash ``base_sha``), or None.

    The message never holds an absolute path: HTTP clients see it."""
    if task not in (None, "sft"):
        return f"adapter {name!r} is a {task} model, not a chat model; pick an sft adapter"
    if method == "full":
        return (f"adapter {name!r} is a full fine-tune (a whole model), which cannot be switched on a shared base; "
                f"serve it as its own base: base_model=<RAGTUNE_HOME>/adapters/{name}")
    if trained_on and trained_on != base_id:
        return (f"adapter {name!r} was trained on {trained_on}, but this assistant runs {base_id}; "
                f"start it with base_model={trained_on} or retrain the adapter on {base_id}")
    if trained_sha and base_sha and trained_sha != base_sha:
        return (f"adapter {name!r} was trained on other weights of {trained_on} (hash differs); "
                "retrain it on this base model")
    return None


def remove_adapter(home: Path, name: str) -> Path:
    folder, _ = get_adapter(home, name)
    # rename first (atomic): a reader never sees half an adapter, and a crash leaves a hidden folder
    # that listings skip, never a damaged one under the adapter's name
    trash = folder.with_name(f".removing-{folder.name}-{os.getpid()}")
    os.replace(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)
    return folder


def load_for_inference(home: Path, name: str, device: str = "auto"):
    """(model with the adapter applied, tokenizer, manifest) for generation or classification."""
    from tuning.models import load_tokenizer, pick_device, resolve_base_model

    folder, manifest = get_adapter(home, name)
    dev, dtype = pick_device(device)
    task = manifest.get("task", "sft")
    if manifest.get("method") == "full":
        from tuning.models import BaseModel

        base = BaseModel(name, str(folder), "local")
        model = _auto_class(task).from_pretrained(str(folder), dtype=dtype, use_safetensors=True, trust_remote_code=False)
    else:
        from peft import PeftModel

        base = resolve_base_model(manifest["base_model"]["id"], home)
        kwargs = _classification_kwargs(manifest) if task == "classification" else {}
        model = _auto_class(task).from_pretrained(base.path, dtype=dtype, use_safetensors=True, trust_remote_code=False, **kwargs)
        model = PeftModel.from_pretrained(model, str(folder))
    tokenizer = load_tokenizer(base) if manifest.get("method") == "full" else _tokenizer_for(folder, base)
    model.to(dev).eval()
    return model, tokenizer, manifest


def _tokenizer_for(folder: Path, base):
    from tuning.models import BaseModel, load_tokenizer

    if (folder / "tokenizer_config.json").exists():
        return load_tokenizer(BaseModel(str(folder), str(folder), "local"))
    return load_tokenizer(base)


def _auto_class(task: str):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM


def _classification_kwargs(manifest: dict) -> dict:
    labels = manifest["labels"]
    return {"num_labels": len(labels), "id2label": dict(enumerate(labels)), "label2id": {l: i for i, l in enumerate(labels)}}


def merge_adapter(home: Path, name: str, out: str | Path) -> Path:
    """Write base + adapter merged into one HF model folder at ``out`` (safetensors, with tokenizer)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise AdapterError(f"{out} exists and is not empty; choose a new --out folder")
    model, tokenizer, manifest = load_for_inference(home, name, device="cpu")
    if manifest.get("method") != "full":
        model = model.merge_and_unload()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    write_manifest(out, {**manifest, "merged_from": name})
    return out
