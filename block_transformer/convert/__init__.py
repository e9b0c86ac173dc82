"""Model surgery: per-family descriptors, weight copy and init of the new modules."""

from .convert import convert
from .inits import DEFAULT_INIT, INITS
from .surgery import Split

__all__ = ["DEFAULT_INIT", "INITS", "Split", "convert"]
