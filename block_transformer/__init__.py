"""block-transformer: convert a pretrained decoder-only LM into a Block Transformer and uptrain it.

Importing the package registers the model with the ``transformers`` Auto classes, and marks it for
``auto_map`` so every saved folder carries its modeling code (loadable with ``trust_remote_code``).
"""

from transformers import AutoConfig, AutoModelForCausalLM

from .modeling import BlockTransformerConfig, BlockTransformerForCausalLM

__version__ = "0.1.0"

AutoConfig.register(BlockTransformerConfig.model_type, BlockTransformerConfig, exist_ok=True)
AutoModelForCausalLM.register(BlockTransformerConfig, BlockTransformerForCausalLM, exist_ok=True)
BlockTransformerConfig.register_for_auto_class()
BlockTransformerForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["BlockTransformerConfig", "BlockTransformerForCausalLM", "__version__"]
