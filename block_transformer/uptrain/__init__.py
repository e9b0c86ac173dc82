"""Uptraining: YAML recipes (schema), checks before any weights load, data packing, the accelerate loop,
the recovery loss, checkpoints; ``command`` is ``bt-uptrain``.

Importing the package loads nothing heavy (``bt-uptrain --help`` answers at once); the recipe names
below load on first use.
"""

_RECIPE_NAMES = ("Recipe", "RecipeError", "load_recipe")


def __getattr__(name: str):
    if name in _RECIPE_NAMES:
        from . import recipe

        return getattr(recipe, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_RECIPE_NAMES)
