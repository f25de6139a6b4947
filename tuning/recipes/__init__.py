"""Training recipes, each readable top to bottom: :mod:`tuning.recipes.sft` and :mod:`tuning.recipes.classification`."""
