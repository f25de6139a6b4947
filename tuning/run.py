"""``tune(config_path, overrides)``: load the config and run the recipe for its task."""

from __future__ import annotations

from pathlib import Path

from tuning.config import TuneConfig, load_tune_config


def tune(config: TuneConfig | str | Path | None, overrides: list[str] | dict | None = None,
         home: str | Path | None = None, echo=print) -> dict:
    if not isinstance(config, TuneConfig):
        config = load_tune_config(config, overrides)
    if config.task == "classification":
        from tuning.recipes.classification import train
    elif config.task == "dpo":
        from tuning.recipes.dpo import train
    else:
        from tuning.recipes.sft import train
    return train(config, home, echo=echo)
