"""The Block Transformer model: the two self-contained files that travel with every saved folder.

Importing this package registers the model with the ``transformers`` Auto classes and for ``auto_map``
(this file itself does not travel: saved folders name the two modeling files in ``auto_map``).
"""

from transformers import AutoConfig, AutoModelForCausalLM

from .configuration_block_transformer import BlockTransformerConfig
from .modeling_block_transformer import (
    BlockTransformerCache,
    BlockTransformerCausalLMOutput,
    BlockTransformerForCausalLM,
    BlockTransformerPreTrainedModel,
)

AutoConfig.register(BlockTransformerConfig.model_type, BlockTransformerConfig, exist_ok=True)
AutoModelForCausalLM.register(BlockTransformerConfig, BlockTransformerForCausalLM, exist_ok=True)
BlockTransformerConfig.register_for_auto_class()
BlockTransformerForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "BlockTransformerCache",
    "BlockTransformerCausalLMOutput",
    "BlockTransformerConfig",
    "BlockTransformerForCausalLM",
    "BlockTransformerPreTrainedModel",
]
