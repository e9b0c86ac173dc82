"""Initialisation of the modules conversion adds (docs/design.md §5): the first quality lever.

``reference`` — the reference code's uptraining init: the block embedder is the mean of its token
embeddings, every prefix slot is the context embedding (identity), and the token decoder reads the
plain token embeddings E, although the source's upper layers were trained on its layer-N_b residual
stream.

``sink`` — gives the token decoder what its layers saw in the source. With t0 the source index of the
token decoder's first layer (N_b for a partition, 0 for a token decoder that starts at the bottom),
prefix slot 1 is the source's constant state before layer t0 at position 0 (the *attention sink*),
the remaining slots are the context embedding (the state after the last block-decoder layer), and the
token decoder reads a second vocabulary table holding each token's state before layer t0, computed
by the source's layers [0, t0) on [separator, token] and read at the second position (for t0 = 0: the
token embedding itself). The start vector is the separator's embedding, so block position 0 looks like
the start of a document.
"""

from __future__ import annotations

import copy
import logging

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from ..modeling import BlockTransformerForCausalLM
from ..modeling.modeling_block_transformer import cache_kwarg
from .discovery import position_signal
from .init_names import DEFAULT_INIT, INITS  # noqa: F401 - DEFAULT_INIT re-exported for callers

logger = logging.getLogger(__name__)



@torch.no_grad()
def init_new_modules(
    model: BlockTransformerForCausalLM,
    init: str,
    separator_id: int,
    lower: PreTrainedModel | None,
    batch_size: int = 1024,
) -> None:
    """Initialise embedder, start vector, prefix and (sink) the token-input table in place.

    ``lower`` runs the source's layers below the token decoder's first one (the block decoder, for a
    partition; None when the token decoder starts at layer 0): the sink init reads its states.
    """
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; choose one of {', '.join(INITS)}")
    cfg = model.config
    dim, block_len, n_prefix = cfg.hidden_size, cfg.block_len, cfg.num_prefix_tokens
    dtype = model.embedder.weight.dtype
    eye = torch.eye(dim, dtype=dtype)
    model.embedder.weight.copy_(torch.cat([eye / block_len] * block_len, dim=1))
    model.prefix.weight.copy_(torch.cat([eye] * n_prefix, dim=0))
    model.prefix.bias.zero_()
    if init == "reference":
        generator = torch.Generator().manual_seed(0)
        model.start.copy_(torch.randn(dim, generator=generator) * cfg.initializer_range)
        return

    model.start.copy_(model.token_embeddings(torch.tensor(separator_id)))
    if lower is None:  # the token decoder's first layer is the source's first: it saw the embeddings
        sink, states = model.start.clone(), model.token_embeddings(torch.arange(cfg.vocab_size))
    else:
        sink, states = _lower_states(model, lower, batch_size)
        # The token decoder adds its own (local) position signal, if the family has one, to what we feed it.
        layers = model.token_decoder.get_submodule(cfg.decoder_layers)
        added = position_signal(model.token_decoder, layers, torch.arange(2).unsqueeze(0), dim, dtype)
        sink, states = sink - added[0], states - added[1]
    model.token_embed_tokens.weight.copy_(states)
    if n_prefix == 1:
        logger.warning("sink init with one prefix token: no slot is left for the attention sink.")
        return
    model.prefix.weight[:dim].zero_()
    model.prefix.bias[:dim].copy_(sink)


def _lower_states(
    model: BlockTransformerForCausalLM, lower: PreTrainedModel, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The output of ``lower`` on [separator, v] for every vocabulary token v: (state at 0, states at 1).

    The start vector is the separator's embedding, so ``lower`` computes exactly the source's lower
    layers here. Position 0 is run once and its KV cache reused for every token batch.
    """
    was_training = model.training
    model.eval()
    embed = model.token_embeddings(torch.arange(model.config.vocab_size))
    prefix = lower(
        inputs_embeds=model.decoder_inputs(model.start.view(1, 1, -1)),
        position_ids=torch.zeros(1, 1, dtype=torch.long),
        use_cache=True,
    )
    prefix_cache = prefix.cache if hasattr(prefix, "cache") else prefix.past_key_values
    sink = prefix.last_hidden_state[0, 0]
    states = torch.empty_like(embed)
    for begin in tqdm(range(0, embed.shape[0], batch_size), desc="token-decoder input table", unit="batch"):
        tokens = model.decoder_inputs(embed[begin : begin + batch_size].unsqueeze(1))
        cache = copy.deepcopy(prefix_cache)
        cache.batch_repeat_interleave(tokens.shape[0])
        position = torch.ones(1, 1, dtype=torch.long)
        out = lower(inputs_embeds=tokens, position_ids=position, use_cache=True, **{cache_kwarg(lower): cache})
        states[begin : begin + batch_size] = out.last_hidden_state[:, 0]
    model.train(was_training)
    return sink, states
