"""Per-row LoRA on the shared base: each row of a batch with its own adapter, or none (Punica/S-LoRA style,
on a CPU).

:class:`LoraRows` wraps one linear layer of the base model (the int8 one on CPU). It holds the LoRA
matrices of every loaded adapter that targets that layer (``A``: r x in, ``B``: out x r, the scaling folded
into ``B``, in float64) and, per forward pass, adds ``B A x`` for each row's own adapter:

- The adapters present in the batch are concatenated once per *set* of adapters (cached per layer):
  ``A_cat`` (sum of ranks x in) and ``B_cat`` (out x sum of ranks).
- A row's LoRA input is ``x A_cat^T`` masked to its own adapter's columns (a rows x 1 x sum-of-ranks
  0/1 mask, cached per batch composition; no mask when every row has the same adapter), then ``@ B_cat^T``.
  So a step costs the same handful of tensor operations per layer whatever the mix of adapters: peft's
  mixed-batch path (``adapter_names=``) split the rows into one group per adapter in each of the 210
  layers, behind forward hooks registered on every call, and on this CPU each small tensor operation
  costs ~15 us.
- float64 in decode steps, because the products must not depend on the neighbours: in float32 a row's
  tiny LoRA product rounds differently for 1 row and for a batch (other matrix kernels), the int8 layers
  downstream then quantize a value one step apart and a greedy answer can change with its neighbours.
  Masked columns add exact zeros. A prompt's prefill runs alone (one request, the same slices whatever
  else is running), so there float32 is as batch-invariant and much cheaper: a 1,000-token prompt in
  256-token slices with a trained adapter took 1.66 s with float64 products, 1.29 s with float32 (a
  profile on 2 cores; the base model alone ~1 s) (``LoraSet.rows(exact=False)``).

Adapters are read from their folder without peft: ``adapter_config.json`` (rank, alpha, rsLoRA) and
``adapter_model.safetensors`` (never a pickle). What this serving path cannot reproduce exactly is
refused with the reason: DoRA, trained biases, extra trained modules (``modules_to_save``) and per-layer
rank or alpha patterns.

:class:`LoraSet` is the generator's registry of wrapped layers; the engine sets the batch's row keys
(:meth:`LoraSet.rows`) around each forward pass, under the model lock. With no rows set (for example
``model.generate`` called directly) the wrapped layers compute the base model alone.
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

PREFIX = "base_model.model."  # peft's prefix of the saved tensor names
DTYPE = torch.float64


class LoraError(ValueError):
    """An adapter folder this serving path cannot load; the message says why and what to do."""


class _Plan:
    """The batch's row keys for one forward pass, with the masks derived from them (cached per layout)."""

    def __init__(self, keys: tuple[str, ...], dtype: torch.dtype = DTYPE) -> None:
        self.keys, self.dtype = keys, dtype
        self.present = tuple(sorted(set(keys)))
        self._masks: dict[tuple, torch.Tensor | None] = {}

    def mask(self, blocks: tuple[tuple[str, int], ...]) -> torch.Tensor | None:
        """rows x 1 x sum-of-ranks 0/1 mask selecting each row's own block (None: every row uses the only block)."""
        if blocks in self._masks:
            return self._masks[blocks]
        if len(blocks) == 1 and all(k == blocks[0][0] for k in self.keys):
            mask = None
        else:
            cols = [key for key, r in blocks for _ in range(r)]
            mask = torch.tensor([[[1.0 if c == k else 0.0 for c in cols]] for k in self.keys], dtype=self.dtype)
        self._masks[blocks] = mask
        return mask


class LoraRows(nn.Module):
    """A base linear layer plus the LoRA matrices of any number of adapters, applied per row."""

    def __init__(self, base: nn.Module, owner: "LoraSet") -> None:
        super().__init__()
        self.base = base
        self.owner = owner
        self.weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # key -> (A, B * scaling), float64
        self._stacks: dict[tuple, tuple[torch.Tensor, torch.Tensor, tuple] | None] = {}

    @property
    def in_features(self) -> int:
        return int(self.base.in_features)

    @property
    def out_features(self) -> int:
        return int(self.base.out_features)

    def put(self, key: str, a: torch.Tensor, b: torch.Tensor) -> None:
        self.weights[key] = (a, b)
        self._stacks.clear()

    def drop(self, key: str) -> None:
        if self.weights.pop(key, None) is not None:
            self._stacks.clear()

    def _stack(self, present: tuple[str, ...], dtype: torch.dtype):
        if (present, dtype) not in self._stacks:
            keys = [k for k in present if k in self.weights]
            if not keys:
                self._stacks[(present, dtype)] = None
            else:
                a = torch.cat([self.weights[k][0] for k in keys], dim=0) if len(keys) > 1 else self.weights[keys[0]][0]
                b = torch.cat([self.weights[k][1] for k in keys], dim=1) if len(keys) > 1 else self.weights[keys[0]][1]
                self._stacks[(present, dtype)] = (a.to(dtype), b.to(dtype), tuple((k, self.weights[k][0].shape[0]) for k in keys))
            if len(self._stacks) > 8:  # recent adapter sets x (float64, float32); each holds a copy of its matrices
                self._stacks.pop(next(iter(self._stacks)))
        return self._stacks[(present, dtype)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        plan = self.owner.plan
        if plan is None or not self.weights:
            return out
        stack = self._stack(plan.present, plan.dtype)
        if stack is None:
            return out
        a, b, blocks = stack
        lora = x.to(plan.dtype) @ a.T
        mask = plan.mask(blocks)
        if mask is not None:
            lora = lora * mask
        return out + (lora @ b.T).to(out.dtype)

    def extra_repr(self) -> str:
        return f"adapters={sorted(self.weights)}"


class LoraSet:
    """The wrapped layers of one model and the adapters loaded into them."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.plan: _Plan | None = None
        self._last: _Plan | None = None
        self.layers: dict[str, LoraRows] = {}  # module path -> wrapper

    @property
    def loaded(self) -> set[str]:
        """Keys of the adapters whose matrices are in some layer."""
        return {key for layer in self.layers.values() for key in layer.weights}

    @contextmanager
    def rows(self, keys: list[str], exact: bool = True) -> Iterator[None]:
        """Apply each row's adapter (``keys[i]``; a key no adapter has, such as the base row's, adds nothing)
        during the forward passes inside the block; in float64 (``exact``: decode steps, whose rows must not
        depend on their neighbours) or float32 (a prefill, which runs one request alone)."""
        keys_t, dtype = tuple(keys), DTYPE if exact else torch.float32
        plan = (self._last if self._last is not None and self._last.keys == keys_t and self._last.dtype == dtype
                else _Plan(keys_t, dtype))
        self._last, self.plan = plan, plan
        try:
            yield
        finally:
            self.plan = None

    def _wrap(self, path: str) -> LoraRows:
        layer = self.layers.get(path)
        if layer is not None:
            return layer
        try:
            module = self.model.get_submodule(path)
        except AttributeError:
            raise LoraError(f"it adapts layer {path!r}, which this base model does not have") from None
        if not hasattr(module, "in_features") or not hasattr(module, "out_features"):
            raise LoraError(f"it adapts {path!r}, which is not a linear layer")
        parent_path, _, name = path.rpartition(".")
        parent = self.model.get_submodule(parent_path) if parent_path else self.model
        layer = LoraRows(module, self)
        setattr(parent, name, layer)
        self.layers[path] = layer
        return layer

    def load(self, key: str, folder: str | Path) -> int:
        """Load the adapter in ``folder`` under ``key``; returns how many layers it adapts."""
        from safetensors.torch import load_file

        folder = Path(folder)
        try:
            config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise LoraError(f"adapter_config.json cannot be read ({exc})") from None
        why = unsupported(config)
        if why:
            raise LoraError(why)
        weights = folder / "adapter_model.safetensors"
        if not weights.is_file():
            raise LoraError("adapter_model.safetensors is missing (only safetensors adapters are served, never pickles)")
        r = int(config["r"])
        alpha = float(config.get("lora_alpha", r))
        scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        try:
            tensors = load_file(str(weights))
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type for a damaged file
            raise LoraError(f"adapter_model.safetensors cannot be read ({exc})") from None
        for name, tensor in tensors.items():
            for part in ("lora_A", "lora_B"):
                suffix = f".{part}.weight"
                if name.endswith(suffix):
                    path = name[:-len(suffix)]
                    path = path[len(PREFIX):] if path.startswith(PREFIX) else path
                    pairs.setdefault(path, {})[part] = tensor
                    break
            else:
                raise LoraError(f"it holds a tensor this serving path does not apply: {name}")
        if not pairs:
            raise LoraError("it holds no LoRA matrices")
        staged = []
        for path, ab in sorted(pairs.items()):
            if set(ab) != {"lora_A", "lora_B"}:
                raise LoraError(f"layer {path!r} has only {sorted(ab)}")
            layer = self._wrap(path)
            a, b = ab["lora_A"].to(DTYPE), ab["lora_B"].to(DTYPE) * scaling
            if a.shape != (r, layer.in_features) or b.shape != (layer.out_features, r):
                raise LoraError(f"layer {path!r}: LoRA shapes {tuple(a.shape)} / {tuple(b.shape)} do not fit the base "
                                f"layer ({layer.in_features} -> {layer.out_features}, rank {r}); was it trained on this base model?")
            staged.append((layer, a, b))
        for layer, a, b in staged:  # all checked: now visible
            layer.put(key, a, b)
        return len(staged)

    def unload(self, key: str) -> None:
        for layer in self.layers.values():
            layer.drop(key)


def unsupported(config: dict[str, Any]) -> str | None:
    """Why an adapter with this ``adapter_config.json`` cannot be served per row, or None."""
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        return f"it is a {config.get('peft_type')} adapter; only LoRA adapters are served"
    if config.get("use_dora"):
        return "it is a DoRA adapter, which the per-row engine cannot apply; retrain it with method=lora (or qlora)"
    if config.get("bias", "none") != "none":
        return f"it trains biases (bias={config.get('bias')}); retrain it with bias=none"
    if config.get("modules_to_save"):
        return f"it trains whole modules ({config.get('modules_to_save')}); retrain it without modules_to_save"
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        return "it uses per-layer rank or alpha patterns, which the per-row engine does not apply"
    try:
        if int(config.get("r", 0)) < 1:
            return f"its rank r={config.get('r')} is not a positive integer"
    except (TypeError, ValueError):
        return f"its rank r={config.get('r')!r} is not a positive integer"
    return None


__all__ = ["LoraRows", "LoraSet", "LoraError", "unsupported"]
