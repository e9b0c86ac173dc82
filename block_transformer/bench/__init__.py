"""Throughput measurement: the converted model against its source, side by side (bt-bench)."""

from .run import run_benchmark
from .throughput import PRESETS, Setting

__all__ = ["PRESETS", "Setting", "run_benchmark"]
