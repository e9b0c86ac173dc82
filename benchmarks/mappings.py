"""The layer mappings the trade-off measurements compare on SmolLM2-135M (30 layers), by name.

Each is (block layers, token layers, L_B), in ``bt-convert --block-layers/--token-layers`` syntax, so
every row of a result file can be rebuilt with one ``bt-convert`` command (``benchmarks/tradeoff.py``
records it next to the figures).
"""

from __future__ import annotations

MAPPINGS: dict[str, tuple[str, str, int]] = {
    "partition 15/15": ("0-14", "15-29", 4),
    "partition 10/20": ("0-9", "10-29", 4),
    "partition 20/10": ("0-19", "20-29", 4),
    "duplicate 30/30": ("0-29", "0-29", 4),
    "interleaved even/odd": ("0-28:2", "1-29:2", 4),
    "partition 15/15 L_B 2": ("0-14", "15-29", 2),
    "partition 15/15 L_B 8": ("0-14", "15-29", 8),
}
DEFAULT = "partition 15/15"

