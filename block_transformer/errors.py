"""Errors whose message tells the user what to do; the CLI prints them as one line."""


class BlockTransformerError(Exception):
    """Base class: anything raised with this type is a user-facing, actionable message."""


class ConversionError(BlockTransformerError):
    """A source model, split or output path that conversion cannot use."""


class Refused(ConversionError):
    """A family conversion refuses by design; ``kind`` says which way it falls outside what converts.

    ``not_decoder_only``: encoder-decoder, multimodal or encoder models; ``recurrent``: state-space,
    hybrid-recurrent or looped models; ``unsupported``: a decoder-only LM with a feature not handled yet.
    """

    def __init__(self, message: str, kind: str = "unsupported"):
        super().__init__(message)
        self.kind = kind


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (library errors can be pages long), or its type name."""
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]
