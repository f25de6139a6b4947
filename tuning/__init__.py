"""Fine-tuning: training data -> LoRA/QLoRA/DoRA/full recipe -> adapter + manifest.

Public entry points:

- :func:`tuning.recipes.sft.train` / :func:`tuning.run.tune` run a config (``ragtune tune CONFIG``);
- :mod:`tuning.adapters` lists, removes and merges adapters;
- :mod:`tuning.raft` builds RAFT examples from a collection;
- :mod:`tuning.models` resolves and loads base models (packaged SmolLM2, local folder, hub id).

Heavy imports (torch, transformers, peft) happen inside functions so ``import tuning`` stays cheap.
"""

from tuning.errors import AdapterError, DataError, ModelError, RaftError, TuningError

__all__ = ["TuningError", "DataError", "ModelError", "AdapterError", "RaftError"]
