"""Model surgery: sources, per-family descriptors, weight copy and init of the new modules."""

from .convert import convert
from .inits import DEFAULT_INIT, INITS
from .sources import Source, resolve_source
from .surgery import Split

__all__ = ["DEFAULT_INIT", "INITS", "Source", "Split", "convert", "resolve_source"]
