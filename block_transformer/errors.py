"""Errors whose message tells the user what to do; the CLI prints them as one line."""


class BlockTransformerError(Exception):
    """Base class: anything raised with this type is a user-facing, actionable message."""


class ConversionError(BlockTransformerError):
    """A source model, split or output path that conversion cannot use."""
