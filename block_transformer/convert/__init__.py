"""Model surgery: per-family descriptors, discovery, weight copy, init of the new modules, the probe.

Names load on first use, so reading the init names (``convert.init_names``) costs no torch import.
"""

from .init_names import DEFAULT_INIT, INITS

_LAZY = {"LayerMapping": ".mapping"}  # the pipeline itself: block_transformer.convert.convert.convert


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["DEFAULT_INIT", "INITS", "LayerMapping"]
