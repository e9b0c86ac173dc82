"""Configuration of a Block Transformer (Ho et al., NeurIPS 2024, arXiv 2406.02657).

Self-contained (torch + transformers only): this file is copied next to the weights of every saved
model so that ``AutoConfig.from_pretrained(dir, trust_remote_code=True)`` works without this package.

The two decoders keep the *source family's* own config (``block_decoder_config``,
``token_decoder_config``): they are built with ``AutoModel.from_config`` so attention, positions,
GQA and norms are exactly the family's.
"""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, PretrainedConfig
from transformers.configuration_utils import SubConfigSpec


class BlockTransformerConfig(PretrainedConfig):
    r"""
    Args:
        block_decoder_config: config of the source family with the lower ``N_b`` layers; its positions
            count *blocks* (position 0 is the start vector, block ``k`` sits at ``k + 1``).
        token_decoder_config: config of the source family with the upper ``N_t`` layers; its positions
            are local to one block (``0 … num_prefix_tokens + block_len - 2``).
        block_len: tokens per block (``L_B``).
        num_prefix_tokens: prefix vectors the context embedding expands into (``N_P``).
        block_decoder_final_norm: attribute of the block decoder's base model that holds the family's
            final norm; it is replaced by an identity because layer ``N_b`` of the source never saw a
            normed residual stream.
        separate_token_embeddings: token-decoder inputs come from their own ``V x D`` table instead of
            the shared token embedding (set by the sink-aware conversion init).
        decoder_layers: path of the decoder-layer list inside each decoder's base model.
        embedding_multiplier: what the source family multiplies token embeddings by before its first
            layer (Gemma: √D); applied to the token embeddings that feed the embedder and token decoder.
        embedding_norm: path in each decoder's base model of the norm the family applies to ``inputs_embeds``
            before its first layer (BLOOM, NanoChat, ModernBERT-decoder), or None. The model holds it once and
            applies it to token embeddings; both decoders take their inputs as they are.
        decoder_input_multiplier: what the family's base model itself multiplies ``inputs_embeds`` by;
            decoder inputs are divided by it, so each layer sees exactly the vectors we pass.
        logit_scale, final_logit_softcapping: the family's LM-head arithmetic,
            ``cap · tanh(logit_scale · head(h) / cap)`` (no cap when ``None``).
        head_transform: the transformers class (``module:class``) of the family's module between the final norm and
            the LM head, built from the token decoder's config (ModernBERT-decoder: dense, activation, norm), or None.
        lm_head_bias: whether the LM head has a bias (Phi-1/2).
        conversion: how the model was made (source, revision, split, init, ...); informational, except ``split`` and
            ``depth_attr`` (the config field counting a decoder's layers when ``num_hidden_layers`` does not, LongCat-Flash),
            which check that the decoders' configs were not edited.
        layer_scalars: per decoder ("block"/"token"), per layer index, number attributes the family derives
            from a layer's absolute depth (DiffLlama's lambda_init, Beam's residual index), as the source had them;
            set on the built layers, so a moved layer computes what it computed in the source.
        layer_modules: the same for sub-modules a family builds or leaves out by depth (ModernBERT-decoder's layer 0
            has no attention norm): per decoder, per layer, module path -> the path of a sibling built alike, to copy,
            or None for an identity.
    """

    model_type = "block_transformer"
    sub_configs_defaults = {
        "block_decoder_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
        "token_decoder_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
    }

    block_decoder_config: dict | PretrainedConfig | None = None
    token_decoder_config: dict | PretrainedConfig | None = None
    block_len: int = 4
    num_prefix_tokens: int = 2
    block_decoder_final_norm: str = "norm"
    separate_token_embeddings: bool = False
    decoder_layers: str = "layers"
    embedding_multiplier: float = 1.0
    decoder_input_multiplier: float = 1.0
    embedding_norm: str | None = None
    logit_scale: float = 1.0
    final_logit_softcapping: float | None = None
    head_transform: str | None = None
    lm_head_bias: bool = False
    vocab_size: int | None = None
    hidden_size: int | None = None
    max_position_embeddings: int | None = None
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    conversion: dict[str, Any] | None = None
    layer_scalars: dict[str, dict[str, dict[str, float | int]]] | None = None
    layer_modules: dict[str, dict[str, dict[str, str | None]]] | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        if self.block_len < 1:
            raise ValueError(f"block_len must be >= 1, got {self.block_len}")
        if self.num_prefix_tokens < 1:
            raise ValueError(f"num_prefix_tokens must be >= 1, got {self.num_prefix_tokens}")
        split = (self.conversion or {}).get("split")
        depth = (self.conversion or {}).get("depth_attr", "num_hidden_layers")  # LongCat: num_layers
        layers = [getattr(self.block_decoder_config, depth), getattr(self.token_decoder_config, depth)]
        if split is not None and list(split) != layers:
            raise ValueError(
                f"config.json records a {split[0]}/{split[1]} conversion but its decoders have {layers[0]} and "
                f"{layers[1]} layers: the config was edited. Restore it or convert again."
            )
        token_cfg = self.token_decoder_config
        if self.vocab_size is None:
            self.vocab_size = token_cfg.vocab_size
        if self.hidden_size is None:
            self.hidden_size = token_cfg.hidden_size
        if self.max_position_embeddings is None:
            # Block position 0 is the start vector, so B block positions hold (B - 1) * L_B tokens.
            block_positions = getattr(self.block_decoder_config, "max_position_embeddings", None)
            if block_positions is not None:
                self.max_position_embeddings = (block_positions - 1) * self.block_len

    @property
    def num_hidden_layers(self) -> int:
        return self.block_decoder_config.num_hidden_layers + self.token_decoder_config.num_hidden_layers

    @property
    def token_decoder_len(self) -> int:
        """Length of one token-decoder window: the prefix plus the first L_B - 1 tokens of a block."""
        return self.num_prefix_tokens + self.block_len - 1


__all__ = ["BlockTransformerConfig"]
