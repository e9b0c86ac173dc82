"""Which source layers each decoder starts from: partition, duplicate, interleaved or any selection.

``--split A/B`` is the partition shorthand (layers [0, A) -> block decoder, [A, N) -> token decoder);
``--block-layers``/``--token-layers`` take explicit lists (``0-14``, ``0,2,4``, ``0-3,8``, and ``0-28:2``
for every second layer). A layer
named by both decoders is copied into each (two trainable tensors): ``--block-layers 0-29
--token-layers 0-29`` makes the token decoder the full source network on local context.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..errors import ConversionError

_ITEM = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*(?::\s*(\d+)\s*)?)?$")


def parse_layers(text: str | list[int] | tuple[int, ...], option: str) -> tuple[int, ...]:
    """``"0-3,8"`` (inclusive ranges ``A-B`` or ``A-B:step``, commas) or a list of ints -> (0, 1, 2, 3, 8).

    Order is kept as given (:meth:`LayerMapping.check` wants it ascending)."""
    if isinstance(text, (list, tuple)):
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in text):
            raise ConversionError(f"{option} must list layer indices (ints), got {list(text)!r}")
        return tuple(text)
    layers: list[int] = []
    for item in str(text).split(","):
        match = _ITEM.match(item)
        if match is None:
            raise ConversionError(
                f"{option} must be comma-separated layer indices and inclusive ranges (e.g. 0-14, 0,2,4, 0-3,8 or "
                f"0-28:2), got {text!r}"
            )
        first, last, step = int(match[1]), int(match[2] if match[2] is not None else match[1]), int(match[3] or 1)
        if last < first:
            raise ConversionError(f"{option}: the range {item.strip()!r} runs backwards; write {last}-{first}.")
        if step < 1:
            raise ConversionError(f"{option}: the step in {item.strip()!r} must be >= 1.")
        layers.extend(range(first, last + 1, step))
    return tuple(layers)


def format_layers(layers: tuple[int, ...] | list[int]) -> str:
    """(0, 1, 2, 3, 8) -> ``"0-3,8"``: the inverse of :func:`parse_layers` for ascending lists."""
    runs: list[list[int]] = []
    for index in layers:
        if runs and index == runs[-1][1] + 1:
            runs[-1][1] = index
        else:
            runs.append([index, index])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


@dataclass(frozen=True)
class LayerMapping:
    """Source-layer indices of the block decoder's and the token decoder's layers, in order."""

    block: tuple[int, ...]
    token: tuple[int, ...]
    split: tuple[int, int] | None = None  # set when given as A/B, so errors speak in those terms
    names: tuple[str, str] = field(default=("--block-layers", "--token-layers"), compare=False)  # for errors

    @classmethod
    def partition(cls, block: int, token: int) -> "LayerMapping":
        return cls(tuple(range(block)), tuple(range(block, block + token)), (block, token))

    @classmethod
    def parse_split(cls, text: str) -> "LayerMapping":
        try:
            block, token = (int(part) for part in text.split("/"))
        except ValueError:
            raise ConversionError(f"--split must look like A/B (e.g. 6/6), got {text!r}") from None
        return cls.partition(block, token)

    @classmethod
    def from_config(cls, config) -> "LayerMapping":
        """The mapping a converted model's config records (``conversion.block_layers/token_layers``); a
        conversion from before layer lists were recorded was a partition of its decoders' layer counts."""
        conv = getattr(config, "conversion", None) or {}
        if "block_layers" in conv and "token_layers" in conv:
            return cls(tuple(conv["block_layers"]), tuple(conv["token_layers"]))
        return cls.partition(config.block_decoder_config.num_hidden_layers, config.token_decoder_config.num_hidden_layers)

    @classmethod
    def halves(cls, num_layers: int) -> "LayerMapping":
        """The default: the lower half of the layers (rounded down) becomes the block decoder."""
        return cls.partition(num_layers // 2, num_layers - num_layers // 2)

    @classmethod
    def from_options(
        cls, split: str | None, block_layers, token_layers, *, names: tuple[str, str, str] = ("--split", "--block-layers", "--token-layers")
    ) -> "LayerMapping | None":
        """The mapping the user asked for with a split or with both layer lists (None: neither given).

        ``names`` are the option or recipe-field names, so an error says what to change.
        """
        split_name, block_name, token_name = names
        lists = (block_layers is not None, token_layers is not None)
        if split is not None and any(lists):
            raise ConversionError(f"give either {split_name} or {block_name} with {token_name}, not both.")
        if lists[0] != lists[1]:
            raise ConversionError(f"{block_name} and {token_name} go together: give both (e.g. {block_name} 0-14 {token_name} 15-29).")
        if split is not None:
            return cls.parse_split(split)
        if lists[0]:
            return cls(parse_layers(block_layers, block_name), parse_layers(token_layers, token_name), names=(block_name, token_name))
        return None

    def check(self, num_layers: int) -> None:
        """Both lists non-empty, inside [0, N) and strictly ascending; a split sums to N."""
        if self.split is not None:
            block, token = self.split
            if block < 1 or token < 1 or block + token != num_layers:
                raise ConversionError(
                    f"split {block}/{token} does not fit a {num_layers}-layer model: A/B must sum to "
                    f"{num_layers} with both sides >= 1 (e.g. {LayerMapping.halves(num_layers)})."
                )
            return
        for name, layers in zip(self.names, (self.block, self.token)):
            if not layers:
                raise ConversionError(f"{name} is empty: each decoder needs at least one source layer.")
            outside = [i for i in layers if not 0 <= i < num_layers]
            if outside:
                raise ConversionError(f"{name} names layer {outside[0]}, but the source has layers 0-{num_layers - 1}.")
            for before, after in zip(layers, layers[1:]):
                if after <= before:
                    raise ConversionError(
                        f"{name} must list layers in ascending order without repeats ({before} comes before {after}): "
                        "each decoder runs its layers in source order."
                    )

    def kind(self, num_layers: int) -> str:
        """partition (every layer once, in order), duplicate (both decoders are the whole source) or custom."""
        every = tuple(range(num_layers))
        if self.block + self.token == every:
            return "partition"
        if self.block == self.token == every:
            return "duplicate"
        return "custom"

    def record(self, num_layers: int) -> dict:
        """The mapping as written to ``config.conversion`` (``split``: the two decoders' layer counts)."""
        return {
            "split": [len(self.block), len(self.token)],
            "mapping": self.kind(num_layers),
            "block_layers": list(self.block),
            "token_layers": list(self.token),
        }

    def __str__(self) -> str:
        if self.split is not None:
            return f"{self.split[0]}/{self.split[1]}"
        return f"block {format_layers(self.block)} / token {format_layers(self.token)}"
