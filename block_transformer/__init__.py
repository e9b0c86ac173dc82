"""block-transformer: convert a pretrained decoder-only LM into a Block Transformer and uptrain it.

The package imports nothing heavy, so the command-line tools answer ``--help`` at once. The model
classes load on first use (``from block_transformer import BlockTransformerForCausalLM``, or any
tool); loading them registers the model with the ``transformers`` Auto classes and marks it for
``auto_map``, so every saved folder carries its modeling code (loadable with ``trust_remote_code``).
"""

__version__ = "0.1.0"

_MODEL_CLASSES = ("BlockTransformerConfig", "BlockTransformerForCausalLM")


def __getattr__(name: str):
    if name in _MODEL_CLASSES:
        from . import modeling

        return getattr(modeling, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [*_MODEL_CLASSES, "__version__"]
