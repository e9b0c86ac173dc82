"""Throughput measurement: the converted model against its source, side by side (``bt-bench``).

``settings`` (what is measured) imports nothing heavy; ``run`` (the worker processes, the record) and
``throughput`` (the measurement itself) need torch.
"""

from .settings import PRESETS, Setting

__all__ = ["PRESETS", "Setting"]
