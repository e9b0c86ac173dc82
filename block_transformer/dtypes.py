"""Weight dtypes by name: the choices of every ``--dtype`` option and of a recipe's ``output.dtype``.

Names rather than torch objects, so that the command-line tools offer them without importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DTYPES = ("float32", "bfloat16", "float16")


def torch_dtype(name: str | None) -> torch.dtype | None:
    """The torch dtype called ``name``; None (each model keeps its own) stays None."""
    if name is None:
        return None
    import torch

    return getattr(torch, name)
