"""Per-family descriptors, loaded from ``families.yaml``: architecture knowledge as data."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib import resources

import yaml

from ..errors import ConversionError


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    layers: str
    final_norm: str
    separators: tuple[str, ...]
    position_embedding: str | None = None


@cache
def families() -> dict[str, Family]:
    """model_type -> Family, for every supported model type."""
    raw = yaml.safe_load(resources.files(__package__).joinpath("families.yaml").read_text())
    table: dict[str, Family] = {}
    for name, entry in raw.items():
        family = Family(
            name=name,
            model_types=tuple(entry["model_types"]),
            layers=entry["layers"],
            final_norm=entry["final_norm"],
            separators=tuple(entry["separators"]),
            position_embedding=entry.get("position_embedding"),
        )
        table.update({model_type: family for model_type in family.model_types})
    return table


def family_for(model_type: str) -> Family:
    table = families()
    if model_type not in table:
        raise ConversionError(
            f"unsupported architecture {model_type!r}; supported model types: {', '.join(sorted(table))}. "
            "Add a descriptor to block_transformer/convert/families.yaml to support another family."
        )
    return table[model_type]
