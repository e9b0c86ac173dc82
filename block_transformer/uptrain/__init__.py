"""Uptraining: YAML recipes (schema), data packing, the accelerate loop, recovery losses, checkpoints."""

from .recipe import Recipe, RecipeError, load_recipe

__all__ = ["Recipe", "RecipeError", "load_recipe"]
