"""Family descriptors, loaded from ``families.yaml``: what inspection of a source model cannot tell.

Most families need no entry at all (see :mod:`block_transformer.convert.discovery`); an entry holds
the document separator, a path inspection would get wrong, config fields holding absolute layer
indices, or the reason a family is refused. Entries are validated: a misspelt key is an error naming it.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from ..errors import ConversionError, Refused

DEFAULT_ENTRY = "default"


class Family(BaseModel):
    """One entry of ``families.yaml`` (``default`` fills what an entry leaves out)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = DEFAULT_ENTRY
    model_types: tuple[str, ...] = ()
    separators: tuple[str, ...] = ()
    layers: str | None = None
    depth_attr: str = "num_hidden_layers"  # the config field counting the entries of the layer list
    final_norm: str | None = None
    layer_index_attrs: tuple[str, ...] = ()
    layer_threshold_attrs: tuple[str, ...] = ()  # layer i is special when i >= the value
    layer_end_attrs: tuple[str, ...] = ()  # ... when i <= the value
    depth_scaled_attrs: dict[str, float] = {}
    token_span_attrs: tuple[str, ...] = ()  # spans counted in token positions: the block decoder counts blocks
    reuses_previous_layer: dict[str, str] = {}  # per-layer config field: the value of a layer reusing its predecessor
    zero_bias_params: tuple[str, ...] = ()  # biases a moved layer may gain (zero) where its source layer had none
    refuse: str | None = None
    refuse_when: dict[str, Any] = {}  # config field: value; the refusal applies only to configs that match all
    refuse_kind: Literal["not_decoder_only", "recurrent", "unsupported"] = "unsupported"

    @model_validator(mode="after")
    def _refuse_when_needs_a_reason(self) -> "Family":
        if self.refuse_when and not self.refuse:
            raise ValueError("refuse_when needs refuse: the one-line reason")
        return self

    def refusal(self, config) -> str | None:
        """Why ``config`` cannot be converted, or None: the entry's reason, for every config or (``refuse_when``)
        for those whose fields all match."""
        if not self.refuse:
            return None
        if all(getattr(config, name, None) == value for name, value in self.refuse_when.items()):
            return self.refuse
        return None

    def depth(self, config) -> int:
        """Entries of the source's decoder-layer list, as its config counts them."""
        return getattr(config, self.depth_attr)


def parse_families(raw: dict) -> dict[str, Family]:
    """model_type -> Family; the ``default`` entry under its own name. Raises on a malformed entry."""
    if not isinstance(raw, dict) or DEFAULT_ENTRY not in raw:
        raise ConversionError(f"families.yaml must be a mapping with a {DEFAULT_ENTRY!r} entry.")
    table: dict[str, Family] = {}
    default = None
    for name, entry in raw.items():
        try:
            family = Family(name=name, **(entry or {}))
        except ValidationError as err:
            problem = err.errors()[0]
            where = ".".join(str(part) for part in problem["loc"])
            raise ConversionError(f"families.yaml entry {name!r}: {where}: {problem['msg']}") from None
        if name == DEFAULT_ENTRY:
            default = family
            continue
        for model_type in family.model_types:
            if model_type in table:
                raise ConversionError(f"families.yaml: model type {model_type!r} is listed twice.")
            table[model_type] = family
    table[DEFAULT_ENTRY] = default
    if not default.separators:
        raise ConversionError("families.yaml: the default entry needs separators.")
    return {key: _with_defaults(family, default) for key, family in table.items()}


def _with_defaults(family: Family, default: Family) -> Family:
    """Separators fall back to the default's; layer-index field lists add to the default's."""
    if family is default:
        return family
    return family.model_copy(
        update={
            "separators": family.separators or default.separators,
            "layer_index_attrs": tuple(dict.fromkeys(default.layer_index_attrs + family.layer_index_attrs)),
            "layer_threshold_attrs": tuple(dict.fromkeys(default.layer_threshold_attrs + family.layer_threshold_attrs)),
            "layer_end_attrs": tuple(dict.fromkeys(default.layer_end_attrs + family.layer_end_attrs)),
            "token_span_attrs": tuple(dict.fromkeys(default.token_span_attrs + family.token_span_attrs)),
        }
    )


@cache
def families() -> dict[str, Family]:
    raw = yaml.safe_load(resources.files(__package__).joinpath("families.yaml").read_text())
    return parse_families(raw)


def stack_depth(config) -> int:
    """Entries of a source's decoder-layer list (LongCat-Flash's num_hidden_layers counts its attention sub-layers)."""
    table = families()
    return table.get(config.model_type, table[DEFAULT_ENTRY]).depth(config)


def family_for(model_type: str) -> Family:
    """The entry for ``model_type``, or the default one; refused families raise with their reason."""
    table = families()
    family = table.get(model_type, table[DEFAULT_ENTRY])
    if family.refuse and not family.refuse_when:  # refused whatever the config (a variant: Family.refusal)
        raise Refused(f"cannot convert {model_type!r}: {family.refuse}.", family.refuse_kind)
    return family
