"""Uptraining: YAML recipes (schema), checks before any weights load, data packing, the accelerate loop,
the recovery loss, checkpoints."""

from .recipe import Recipe, RecipeError, load_recipe

__all__ = ["Recipe", "RecipeError", "load_recipe"]
