"""The Block Transformer model: the two self-contained files that travel with every saved folder."""

from .configuration_block_transformer import BlockTransformerConfig
from .modeling_block_transformer import (
    BlockTransformerCache,
    BlockTransformerCausalLMOutput,
    BlockTransformerForCausalLM,
    BlockTransformerPreTrainedModel,
)

__all__ = [
    "BlockTransformerCache",
    "BlockTransformerCausalLMOutput",
    "BlockTransformerConfig",
    "BlockTransformerForCausalLM",
    "BlockTransformerPreTrainedModel",
]
