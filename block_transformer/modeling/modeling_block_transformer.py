"""Block Transformer for causal language modeling (Ho et al., NeurIPS 2024, arXiv 2406.02657).

Self-contained (torch + transformers only): this file travels with every saved model.

A sequence x_0 … x_{T-1} is cut into blocks of L_B tokens, anchored at each row's first real token.

1. Embedder: each *complete* block becomes one vector, a linear map of its concatenated token
   embeddings (W_e: L_B·D -> D).
2. Block decoder (the source's lower layers): causal attention over [s, e_0, …, e_{M-1}], s a learned
   start vector at block position 0. Its output h_k has seen exactly the blocks before k.
3. Token decoder (the source's upper layers): per block k, on [p_1 … p_{N_P}, t(x_{k,0}) … t(x_{k,L_B-2})]
   with local positions, where p = W_x h_k. The last prefix slot predicts x_{k,0}; token x_{k,j}
   predicts x_{k,j+1}.

Logits follow the Hugging Face convention: ``logits[:, t]`` predicts x_{t+1} for every t, so
``generate`` and evaluation harnesses work unchanged. The prediction of x_0 (from the start vector) is
returned separately as ``first_token_logits`` and is not part of ``loss``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_block_transformer import BlockTransformerConfig


@dataclass
class BlockTransformerCausalLMOutput(CausalLMOutputWithPast):
    """``CausalLMOutputWithPast`` plus the start vector's prediction of each row's first real token."""

    first_token_logits: torch.FloatTensor | None = None


@dataclass
class BlockLayout:
    """Where each row's real tokens are and how they fall into blocks (DESIGN §2.5).

    Rows are anchored at their first real token, so a left-padded row computes what it computes alone.
    """

    start: torch.Tensor  # [B] index of the first real token
    length: torch.Tensor  # [B] number of real tokens
    num_blocks: int  # complete blocks of the longest row, M_max

    @classmethod
    def from_mask(cls, attention_mask: torch.Tensor, block_len: int) -> "BlockLayout":
        mask = attention_mask.to(torch.bool)
        length = mask.sum(dim=1)
        if bool((length == 0).any()):
            raise ValueError("attention_mask has a row without any real token; drop empty rows before calling the model.")
        start = mask.to(torch.int8).argmax(dim=1)
        positions = torch.arange(mask.shape[1], device=mask.device)
        contiguous = (positions >= start[:, None]) & (positions < (start + length)[:, None])
        if not torch.equal(contiguous, mask):
            raise ValueError(
                "attention_mask has holes: each row's real tokens must be contiguous (left or right padding only). "
                "Split such rows into separate sequences."
            )
        return cls(start=start, length=length, num_blocks=int(length.max()) // block_len)


class BlockTransformerPreTrainedModel(PreTrainedModel):
    config_class = BlockTransformerConfig
    base_model_prefix = "block_transformer"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, BlockTransformerForCausalLM):
            init.normal_(module.start, mean=0.0, std=self.config.initializer_range)


def _build_decoder(sub_config, final_norm: str | None) -> PreTrainedModel:
    """The family's own base model, minus its vocabulary table (we own one shared table).

    ``final_norm`` names the family's final-norm attribute to replace with an identity (block decoder).
    """
    decoder = AutoModel.from_config(sub_config)
    decoder.set_input_embeddings(None)
    if final_norm is not None:
        if not isinstance(getattr(decoder, final_norm, None), nn.Module):
            raise ValueError(f"{type(decoder).__name__} has no final norm module named {final_norm!r}.")
        setattr(decoder, final_norm, nn.Identity())
    return decoder


class BlockTransformerForCausalLM(BlockTransformerPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "embed_tokens.weight"}

    def __init__(self, config: BlockTransformerConfig):
        super().__init__(config)
        dim, block_len, n_prefix = config.hidden_size, config.block_len, config.num_prefix_tokens
        self.embed_tokens = nn.Embedding(config.vocab_size, dim)
        self.token_embed_tokens = nn.Embedding(config.vocab_size, dim) if config.separate_token_embeddings else None
        self.embedder = nn.Linear(block_len * dim, dim, bias=False)
        self.start = nn.Parameter(torch.zeros(dim))
        self.block_decoder = _build_decoder(config.block_decoder_config, final_norm=config.block_decoder_final_norm)
        self.prefix = nn.Linear(dim, n_prefix * dim, bias=True)
        self.token_decoder = _build_decoder(config.token_decoder_config, final_norm=None)
        self.lm_head = nn.Linear(dim, config.vocab_size, bias=False)
        self._no_split_modules = sorted(
            set(self.block_decoder._no_split_modules or []) | set(self.token_decoder._no_split_modules or [])
        )
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def token_decoder_inputs(self, input_ids: torch.Tensor) -> torch.Tensor:
        """t(x): the token decoder's input embedding of each token."""
        table = self.token_embed_tokens if self.token_embed_tokens is not None else self.embed_tokens
        return table(input_ids)

    def embed_blocks(self, block_ids: torch.Tensor, block_mask: torch.Tensor) -> torch.Tensor:
        """[..., L_B] token ids -> [..., D] block embeddings; masked tokens contribute zeros."""
        tokens = self.embed_tokens(block_ids) * block_mask.unsqueeze(-1).to(self.embed_tokens.weight.dtype)
        return self.embedder(tokens.flatten(-2))

    def run_block_decoder(self, block_embeds: torch.Tensor, **kwargs) -> torch.Tensor:
        """[B, M, D] block embeddings -> [B, M + 1, D] context embeddings (index k serves block k).

        Rows with fewer blocks are right-padded: causal attention never lets a real block see the padding,
        so no mask is needed and every row computes what it computes alone.
        """
        batch = block_embeds.shape[0]
        start = self.start.to(block_embeds.dtype).expand(batch, 1, -1)
        inputs = torch.cat([start, block_embeds], dim=1)
        positions = torch.arange(inputs.shape[1], device=inputs.device).unsqueeze(0)
        out = self.block_decoder(inputs_embeds=inputs, position_ids=positions, use_cache=False, **kwargs)
        return out.last_hidden_state

    def expand_prefix(self, context: torch.Tensor) -> torch.Tensor:
        """[..., D] context embeddings -> [..., N_P, D] prefix vectors."""
        return self.prefix(context).unflatten(-1, (self.config.num_prefix_tokens, self.config.hidden_size))

    def run_token_decoder(self, prefix: torch.Tensor, token_inputs: torch.Tensor, **kwargs) -> torch.Tensor:
        """[R, N_P, D] prefixes + [R, L, D] token inputs (L <= L_B - 1) -> final-normed hidden states.

        Only the last prefix slot and the token positions predict anything, so those L + 1 states are
        returned: index j predicts the block's token j.
        """
        inputs = torch.cat([prefix, token_inputs], dim=1)
        positions = torch.arange(inputs.shape[1], device=inputs.device).unsqueeze(0)
        out = self.token_decoder(inputs_embeds=inputs, position_ids=positions, use_cache=False, **kwargs)
        return out.last_hidden_state[:, self.config.num_prefix_tokens - 1 :]

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        past_key_values=None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        num_items_in_batch: int | torch.Tensor | None = None,
        **kwargs,
    ) -> BlockTransformerCausalLMOutput:
        r"""
        labels: shifted inside as in Hugging Face causal LMs (``labels[:, t + 1]`` is scored against
            ``logits[:, t]``); -100 and positions where ``attention_mask`` is 0 are ignored.
        logits_to_keep: if > 0, only the last ``logits_to_keep`` positions get logits (generation).
        """
        if input_ids is None:
            raise ValueError("BlockTransformerForCausalLM needs input_ids (block embeddings are built from token ids).")
        if kwargs.get("inputs_embeds") is not None:
            raise ValueError("inputs_embeds is not supported: the block embedder needs token ids.")
        kwargs.pop("inputs_embeds", None)
        kwargs.pop("cache_position", None)
        kwargs.pop("position_ids", None)
        batch, seq_len = input_ids.shape
        block_len = self.config.block_len
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        layout = BlockLayout.from_mask(attention_mask, block_len)
        device = input_ids.device

        # Regroup each row's real tokens into a block grid [B, M_max + 1, L_B] anchored at its first token.
        n_slots = layout.num_blocks + 1
        offsets = torch.arange(n_slots * block_len, device=device).view(n_slots, block_len)
        gather_at = layout.start.view(batch, 1, 1) + offsets
        in_row = offsets.unsqueeze(0) < layout.length.view(batch, 1, 1)
        grid = torch.gather(input_ids, 1, gather_at.clamp(max=seq_len - 1).flatten(1)).view(batch, n_slots, block_len)

        # Block decoder over complete blocks only (a partial block is never embedded).
        block_embeds = self.embed_blocks(grid[:, : layout.num_blocks], in_row[:, : layout.num_blocks])
        context = self.run_block_decoder(block_embeds, **kwargs)  # [B, M_max + 1, D]

        # Token decoder on every block a row reaches: its complete blocks plus the current (partial) one.
        reached = (layout.length // block_len).view(batch, 1) >= torch.arange(n_slots, device=device)
        rows, slots = reached.nonzero(as_tuple=True)
        prefix = self.expand_prefix(context[rows, slots])
        token_inputs = self.token_decoder_inputs(grid[rows, slots, : block_len - 1])
        hidden = self.run_token_decoder(prefix, token_inputs, **kwargs)  # [R, L_B, D]

        # predictions[b, u] predicts x_u of row b; scatter back to the input layout (HF convention).
        predictions = hidden.new_zeros(batch, n_slots, block_len, hidden.shape[-1])
        predictions[rows, slots] = hidden
        predictions = predictions.flatten(1, 2)
        token_index = torch.arange(seq_len, device=device) - layout.start.view(batch, 1) + 1
        token_index = token_index.clamp(min=0, max=predictions.shape[1] - 1)
        if logits_to_keep:
            token_index = token_index[:, -logits_to_keep:]
        states = torch.gather(predictions, 1, token_index.unsqueeze(-1).expand(-1, -1, predictions.shape[-1]))
        logits = self.lm_head(states)
        first_token_logits = self.lm_head(predictions[:, 0])

        loss = None
        if labels is not None:
            loss = self.loss(logits, labels, attention_mask, num_items_in_batch)
        return BlockTransformerCausalLMOutput(loss=loss, logits=logits, first_token_logits=first_token_logits)

    @staticmethod
    def loss(
        logits: torch.Tensor,
        labels: torch.Tensor,
        attention_mask: torch.Tensor,
        num_items_in_batch: int | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token-level cross-entropy with the HF shift; padding (by attention_mask) never counts.

        The first real token of a left-padded row is not scored: like x_0 of any row, only the start vector
        predicts it (``first_token_logits``).
        """
        scored = attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()  # both the input and the target are real
        targets = labels[:, 1:].masked_fill(~scored, -100)
        if logits.shape[1] != labels.shape[1]:
            raise ValueError("labels need logits for every position: call the model without logits_to_keep.")
        flat_logits = logits[:, :-1].flatten(0, 1).float()
        if num_items_in_batch is None:
            return F.cross_entropy(flat_logits, targets.flatten(), ignore_index=-100)
        total = F.cross_entropy(flat_logits, targets.flatten(), ignore_index=-100, reduction="sum")
        return total / num_items_in_batch

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        """Recompute the whole sequence every step: correct, not fast (no KV cache yet)."""
        return {"input_ids": input_ids, "attention_mask": attention_mask, "logits_to_keep": 1}


__all__ = ["BlockTransformerForCausalLM", "BlockTransformerPreTrainedModel", "BlockTransformerCausalLMOutput"]
