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

import copy
import importlib
import inspect
import types
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, GenerationConfig, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.generation import GenerationMode
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_block_transformer import BlockTransformerConfig

if TYPE_CHECKING:
    from .batching_block_transformer import BlockTransformerBatchingManager, GenerationOutput


@dataclass
class BlockTransformerCausalLMOutput(CausalLMOutputWithPast):
    """``CausalLMOutputWithPast`` plus the start vector's prediction of each row's first real token."""

    first_token_logits: torch.FloatTensor | None = None


@dataclass
class BlockLayout:
    """Where each row's real tokens are and how they fall into blocks (block-transformer docs/design.md §2).

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

    @classmethod
    def from_pretrained(cls, *args, output_loading_info: bool = False, **kwargs):
        """As in transformers, but a folder whose weights do not cover the model its config describes is an
        error, not a model with silently re-initialised or dropped tensors (an edited config.json, or the
        weights of another conversion)."""
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        problems = [
            f"{kind.replace('_', ' ')} {sorted(map(str, keys))[:4]}"
            for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")
            if (keys := info.get(kind))
        ]
        if problems:
            raise ValueError(
                "the weights in this folder do not match its config.json (" + "; ".join(problems) + "): the config "
                "was edited or the weights belong to another model. Restore config.json or convert again."
            )
        return (model, info) if output_loading_info else model


@dataclass
class KVLayout:
    """Where the positions of one cached decoder call come from and go to.

    The call's input is [C, W]: C chunks of W positions. Position (c, w) belongs to row ``rows[c, w]`` and
    is written to slot ``slots[c, w]`` (slot i holds position i). Chunk c attends to the cached entries of
    the G rows ``key_rows[c]``, laid end to end, and each position only to those of its own row, member
    ``members[c, w]`` of ``key_rows[c]``. ``key_rows`` None means chunk c is row c (G = 1): the whole batch
    in order, read without a gather.

    Packing several rows into one chunk is what lets a decode step send every row through the token decoder
    in one call, whatever the rows' phases: a row that starts a block brings N_P positions (its prefix), a
    row inside a block brings one, and rows of one position share chunks N_P at a time. Positions that pad
    the last chunk belong to the cache's scratch row, which no sequence owns.
    """

    rows: torch.Tensor  # [C, W]
    slots: torch.Tensor  # [C, W]
    key_rows: torch.Tensor | None = None  # [C, G]
    members: torch.Tensor | None = None  # [C, W], index into key_rows[c]; None: 0

    @classmethod
    def per_row(cls, rows: torch.Tensor | None, slots: torch.Tensor, batch_size: int) -> "KVLayout":
        """One chunk per row: ``rows`` (None = all, in order) write ``slots`` [R, W]."""
        if rows is None:
            rows = torch.arange(batch_size, device=slots.device)
            key_rows = None
        else:
            key_rows = rows.unsqueeze(1)
        return cls(rows=rows.unsqueeze(1).expand_as(slots), slots=slots, key_rows=key_rows)


class DecoderKV:
    """KV buffers for the layers of one decoder: slot i holds position i, rows filled to different lengths.

    Duck-types the part of ``transformers.Cache`` the family's attention layers use (``update``). Each call
    says which rows take part, where their new entries go and which entries each position sees
    (``prepare`` with a ``KVLayout``), because rows of a batch sit at different offsets inside their current
    block (block-transformer docs/design.md §3). Attention masks are built here, from the slots, so the
    family's mask code never has to understand per-row lengths. Row ``batch_size`` is scratch: padding
    positions write there and nothing real ever reads it.
    """

    is_compileable = False
    is_croppable = False

    def __init__(self, batch_size: int, windows: dict[str | None, tuple[int | None, int | None]] | None = None,
                 capacity: int | None = None):
        self.batch_size = batch_size
        self.windows = windows or {None: (None, None)}  # (window, chunk) per layer type (None: one mask for all)
        self.capacity = capacity  # fixed size (token decoder), or None: grow as blocks arrive
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.indexer_keys: dict[int, torch.Tensor] = {}  # sparse-attention indexers (DeepSeek-V3.2): [rows + 1, 1, slots, D]
        self._layout: KVLayout | None = None
        self._kv_len = 0
        self.fixed_len: int | None = None  # static decoding: every call reads this many slots (no host sync)

    def fix_length(self, num_slots: int) -> None:
        """Hold ``num_slots`` slots per row from now on and read all of them in every call: fixed shapes for a
        compiled (CUDA-graph) step; the mask still hides every slot past a position's own."""
        for buffers, i in self._buffers():
            buffer = buffers[i]
            if buffer.shape[2] < num_slots:
                buffers[i] = torch.cat([buffer, buffer.new_zeros(*buffer.shape[:2], num_slots - buffer.shape[2],
                                                                 buffer.shape[3])], dim=2)
        self.capacity = self.fixed_len = num_slots

    def prepare(self, layout: KVLayout, attn_impl: str, dtype):
        """Set up one call laid out as ``layout``; returns its attention mask (per layer type if they differ)."""
        if attn_impl not in ("sdpa", "eager"):
            raise ValueError(
                f"cached generation supports attn_implementation 'sdpa' and 'eager', not {attn_impl!r}: "
                "load the model with attn_implementation='sdpa'."
            )
        self._layout = layout
        self._kv_len = self.fixed_len if self.fixed_len is not None else int(layout.slots.max()) + 1
        masks = {kind: self._mask(*span, attn_impl, dtype) for kind, span in self.windows.items()}
        return masks[None] if None in masks else masks  # per-layer-type masks go in as the family's mapping

    def key_slots(self) -> torch.Tensor:
        """The slot of every key this call's chunks attend to, as ``update`` returns them: [G * kv_len], member by
        member. A slot is the key's position in its row (ALiBi is built from it: BLOOM)."""
        groups = 1 if self._layout.key_rows is None else self._layout.key_rows.shape[1]
        return torch.arange(self._kv_len, device=self._layout.slots.device).repeat(groups)

    def _mask(self, window: int | None, chunk: int | None, attn_impl: str, dtype) -> torch.Tensor:
        layout = self._layout
        slots = layout.slots.unsqueeze(-1)  # [C, W, 1]
        groups = 1 if layout.key_rows is None else layout.key_rows.shape[1]
        keys = self.key_slots()
        allowed = keys <= slots  # causal; slots past a row's length are never allowed
        if window is not None:
            allowed &= keys > slots - window
        if chunk is not None:
            allowed &= keys // chunk == slots // chunk
        if groups > 1:  # a position sees only the entries of its own row
            member_of_key = torch.arange(groups, device=slots.device).repeat_interleave(self._kv_len)
            allowed &= member_of_key == layout.members.unsqueeze(-1)
        allowed = allowed.unsqueeze(1)  # [C, 1, W, G * kv]
        if attn_impl == "sdpa":
            return allowed
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        if layer_idx == len(self.keys):  # keys and values may differ in head size (multi-head latent attention)
            slots = self.capacity or self._kv_len
            self.keys.append(key.new_zeros(self.batch_size + 1, key.shape[1], slots, key.shape[-1]))
            self.values.append(value.new_zeros(self.batch_size + 1, value.shape[1], slots, value.shape[-1]))
        self.keys[layer_idx], self.values[layer_idx] = self._fit(self.keys[layer_idx]), self._fit(self.values[layer_idx])
        layout = self._layout
        self.keys[layer_idx][layout.rows, :, layout.slots] = key.transpose(1, 2)
        self.values[layer_idx][layout.rows, :, layout.slots] = value.transpose(1, 2)
        return self._read(self.keys[layer_idx]), self._read(self.values[layer_idx])

    def update_indexer(self, key: torch.Tensor, layer_idx: int) -> torch.Tensor:
        """The indexer keys of a sparse-attention layer ([C, W, D] in), laid out like ``update``'s keys:
        [C, G * kv_len, D], so the indexer scores exactly the entries the layer's mask shows."""
        buffer = self.indexer_keys.get(layer_idx)
        if buffer is None:
            buffer = key.new_zeros(self.batch_size + 1, 1, self.capacity or self._kv_len, key.shape[-1])
        buffer = self._fit(buffer)
        buffer[self._layout.rows, :, self._layout.slots] = key.unsqueeze(2)
        self.indexer_keys[layer_idx] = buffer
        return self._read(buffer).squeeze(1)

    def _fit(self, buffer: torch.Tensor) -> torch.Tensor:
        """``buffer`` with room for this call's slots (grown by doubling, so a row's growth costs O(length))."""
        if self._kv_len <= buffer.shape[2]:
            return buffer
        grow = max(self._kv_len, 2 * buffer.shape[2]) - buffer.shape[2]
        return torch.cat([buffer, buffer.new_zeros(*buffer.shape[:2], grow, buffer.shape[3])], dim=2)

    def _read(self, buffer: torch.Tensor) -> torch.Tensor:
        """What the call's chunks attend to: [C, heads, G * kv_len, head_dim]."""
        key_rows = self._layout.key_rows
        if key_rows is None:
            return buffer[: self.batch_size, :, : self._kv_len]
        entries = buffer[key_rows, :, : self._kv_len]  # [C, G, heads, kv_len, head_dim]
        return entries.squeeze(1) if key_rows.shape[1] == 1 else entries.transpose(1, 2).flatten(2, 3)

    def _buffers(self):
        """(container, index) of every cached tensor [rows + 1, heads, slots, dim], in layer order: keys and
        values per layer, sparse-attention indexer keys (one head)."""
        for container in (self.keys, self.values, self.indexer_keys):
            yield from ((container, i) for i in (list(container) if isinstance(container, dict) else range(len(container))))

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Entries before this call, as a family reads it to place the call's positions (Llama 4's NoPE
        temperature): exact when the call's rows all write the same slots (an aligned batch, one row); otherwise
        (rows at different lengths, a packed decode step) it is the highest slot written minus the call's width,
        which may be no row's own past length."""
        return self._kv_len - self._layout.slots.shape[1] if self._layout is not None else 0

    def num_slots(self) -> int:
        """Slots allocated per row (0 before the first call)."""
        return self.keys[0].shape[2] if self.keys else 0

    def keep_rows(self, index: torch.Tensor, num_slots: int | None = None) -> None:
        """Keep only rows ``index``, in that order, and (growing caches) only their first ``num_slots`` slots.

        The buffers are copied, so the memory of the dropped rows and slots is released.
        """
        rows = torch.cat([index, index.new_tensor([self.batch_size])])  # the scratch row stays last
        slots = self.num_slots() if self.capacity is not None or num_slots is None else num_slots
        for buffers, i in self._buffers():
            buffers[i] = buffers[i][rows, :, :slots]
        self.batch_size = index.shape[0]

    def admit(self, joined: "DecoderKV", into: torch.Tensor) -> None:
        """Row j of ``joined`` becomes row ``into[j]``: an existing row (its entries are overwritten) or, for
        ``into[j] >= batch_size``, a new row appended (the new rows' indices must follow on from batch_size).

        Only the slots ``joined`` holds are copied; a row's later slots may keep a former row's entries, which
        the mask never shows (a position only sees slots up to its own).
        """
        appended = int((into >= self.batch_size).sum())
        rows = self.batch_size + appended
        slots = joined.num_slots()
        for (buffers, i), (sources, _) in zip(self._buffers(), joined._buffers()):
            buffer, source = buffers[i], sources[i]
            if appended or slots > buffer.shape[2]:
                grown = buffer.new_zeros(rows + 1, buffer.shape[1], max(slots, buffer.shape[2]), buffer.shape[3])
                grown[: self.batch_size, :, : buffer.shape[2]] = buffer[: self.batch_size]
                buffers[i] = buffer = grown
            buffer[into, :, :slots] = source[: joined.batch_size]
        self.batch_size = rows


class BlockTransformerCache:
    """Generation state: a block-level cache, a local token cache, and where each row stands.

    After t tokens a row's block cache holds 1 + floor(t / L_B) entries (the start vector plus its complete
    blocks) and its token cache N_P + (t mod L_B) entries (the current block's prefix and tokens); both are
    derived from ``num_tokens``, the one per-row counter.
    """

    is_compileable = False
    is_croppable = False

    def __init__(self, config: BlockTransformerConfig, max_length: int | None = None):
        """``max_length``: tokens a row may reach (prompt + generated); given, decoding runs the static step
        (``BlockTransformerForCausalLM.static_decode_step``) on caches of that fixed size."""
        self.config = config
        self.max_length = max_length
        self.num_tokens: torch.Tensor | None = None  # [B] real tokens seen per row
        self.current_block: torch.Tensor | None = None  # [B, L_B] ids of each row's current block
        self.block: DecoderKV | None = None
        self.token: DecoderKV | None = None
        self._longest = 0  # the longest row's token count, known on the host (static decoding checks room)

    def start(self, num_tokens: torch.Tensor, current_block: torch.Tensor) -> None:
        batch = num_tokens.shape[0]
        self.num_tokens, self.current_block = num_tokens.clone(), current_block.clone()
        self.block = DecoderKV(batch, windows=attention_windows(self.config.block_decoder_config))
        self.token = DecoderKV(
            batch, windows=attention_windows(self.config.token_decoder_config), capacity=self.config.token_decoder_len
        )
        self._longest = int(num_tokens.max())

    @property
    def static(self) -> bool:
        return self.max_length is not None

    def _refuse_static(self, what: str) -> None:
        if self.static:
            raise ValueError(f"{what} changes the rows of a cache, which a static (fixed-size) cache cannot do: "
                             "continuous batching uses growing caches (create the cache without max_length).")

    def before_static_step(self) -> None:
        """Fix both caches' sizes (first step) and check the step has room: the compiled step cannot."""
        if self._longest >= self.max_length:
            raise ValueError(f"a row reached this cache's max_length ({self.max_length} tokens); "
                             "create the cache with a larger max_length.")
        if self.block.fixed_len is None:
            self.block.fix_length(2 + self.max_length // self.config.block_len)  # the start vector + every block
            self.token.fix_length(self.config.token_decoder_len)
        self._longest += 1

    @property
    def started(self) -> bool:
        return self.num_tokens is not None

    def block_cache_lengths(self) -> torch.Tensor:
        return 1 + self.num_tokens // self.config.block_len

    def token_cache_lengths(self) -> torch.Tensor:
        return self.config.num_prefix_tokens + self.num_tokens % self.config.block_len

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0 if self.num_tokens is None else int(self.num_tokens.max())

    # Row management for continuous batching: rows leave when their request finishes, freshly prefilled
    # rows (a cache of their own) join at their own token counts, hence at their own block phases.

    @property
    def batch_size(self) -> int:
        return 0 if self.num_tokens is None else self.num_tokens.shape[0]

    def keep_rows(self, index: torch.Tensor) -> None:
        """Keep only rows ``index`` (a non-empty [R] tensor), in that order, releasing the others' memory.

        The block cache is also cut to twice what the longest kept row needs when it holds more (it grows by
        doubling and would otherwise stay as large as the longest row ever seen).
        """
        if index.numel() == 0:
            raise ValueError("keep_rows needs at least one row; drop the cache instead.")
        self._refuse_static("keep_rows")
        self.num_tokens, self.current_block = self.num_tokens[index], self.current_block[index]
        needed = int(self.block_cache_lengths().max())
        self.block.keep_rows(index, num_slots=min(self.block.num_slots(), 2 * needed))
        self.token.keep_rows(index)

    def admit(self, joined: "BlockTransformerCache", into: torch.Tensor) -> None:
        """Rows of ``joined`` (a started cache, e.g. just prefilled from new prompts) take rows ``into`` of
        this cache: ``into[j]`` < batch_size overwrites a freed row, larger values append rows (see
        ``DecoderKV.admit``). Each joined row keeps its own token count, so it decodes at its own phase."""
        if not joined.started or not self.started:
            raise ValueError("admit needs two started caches (prefill the joining prompts first).")
        self._refuse_static("admit")
        into = into.to(self.num_tokens.device)
        if into.shape[0] != joined.batch_size:
            raise ValueError(f"admit got {into.shape[0]} target rows for {joined.batch_size} joining rows.")
        appended = int((into >= self.batch_size).sum())
        if appended:
            self.num_tokens = torch.cat([self.num_tokens, self.num_tokens.new_zeros(appended)])
            self.current_block = torch.cat([self.current_block, self.current_block.new_zeros(appended, self.config.block_len)])
        self.num_tokens[into] = joined.num_tokens
        self.current_block[into] = joined.current_block
        self.block.admit(joined.block, into)
        self.token.admit(joined.token, into)


def sliding_window(sub_config) -> int | None:
    """The family config's attention window in positions, or None (Qwen2 can carry one it does not use)."""
    if getattr(sub_config, "use_sliding_window", True) is False:
        return None
    return getattr(sub_config, "sliding_window", None)


def attention_windows(sub_config) -> dict[str | None, tuple[int | None, int | None]]:
    """(sliding window, chunk) per layer type (``layer_types`` of recent configs); key None when all layers
    share one. A chunked layer (Llama 4) attends only inside its chunk of ``attention_chunk_size`` positions."""
    window = sliding_window(sub_config)
    layer_types = getattr(sub_config, "layer_types", None)
    if not layer_types:
        return {None: (window, None)}
    chunk = getattr(sub_config, "attention_chunk_size", None)
    return {kind: (window if kind == "sliding_attention" else None, chunk if kind == "chunked_attention" else None)
            for kind in dict.fromkeys(layer_types)}


_CACHE_KWARGS: dict[type, str] = {}  # a plain dict, not functools.cache: torch.compile traces through lookups


def cache_kwarg(decoder: nn.Module) -> str:
    """The name a family's base model takes its KV cache by (transformers 5.2x renames past_key_values)."""
    kind = type(decoder)
    if kind not in _CACHE_KWARGS:
        _CACHE_KWARGS[kind] = "cache" if "cache" in inspect.signature(kind.forward).parameters else "past_key_values"
    return _CACHE_KWARGS[kind]


def _build_decoder(sub_config, *without: str | None) -> PreTrainedModel:
    """The family's own base model, minus its vocabulary table (we own one shared table).

    ``without`` names modules of the base model to replace with an identity: the final norm (block decoder),
    the norm a family applies to ``inputs_embeds`` (the model applies that one to token embeddings itself).
    """
    decoder = AutoModel.from_config(sub_config)
    decoder.set_input_embeddings(None)
    for path in dict.fromkeys(filter(None, without)):  # NanoChat's one norm is both
        _detach(decoder, path)
    if hasattr(decoder, "build_alibi_tensor"):  # BLOOM: under the cache its bias is built from the keys' slots
        decoder.build_alibi_tensor = types.MethodType(_alibi_by_slot, decoder)
        decoder.alibi_key_slots = None
    return decoder


def _detach(decoder: nn.Module, path: str) -> nn.Module:
    """Replace the module at ``path`` with an identity; returns the module."""
    parent_path, _, name = path.rpartition(".")
    parent = decoder.get_submodule(parent_path) if parent_path else decoder
    module = getattr(parent, name, None)
    if not isinstance(module, nn.Module) or isinstance(module, nn.Identity):
        raise ValueError(f"{type(decoder).__name__} has no norm module named {path!r}.")
    setattr(parent, name, nn.Identity())
    return module


def _head_transform(class_path: str | None, sub_config) -> nn.Module | None:
    """The family's module between the final norm and the LM head (``module:class``, a transformers model class),
    built from the family's config."""
    if class_path is None:
        return None
    module, _, name = class_path.partition(":")
    try:
        cls = getattr(importlib.import_module(module), name, None) if module.startswith("transformers.models.") and name else None
    except ImportError:
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"head_transform must name a transformers model class as module:Class, not {class_path!r}: "
                         "the config was edited or made by another version; convert the model again.")
    return cls(sub_config)


def _alibi_by_slot(self, attention_mask: torch.Tensor, num_heads: int, dtype: torch.dtype) -> torch.Tensor:
    """BLOOM's ALiBi. The family builds it from a 2-D padding mask (kept for a plain call); under the cache's 4-D
    mask it is slope · key slot for the keys ``alibi_key_slots`` names (set around each cached call by
    ``_run_decoder``): a slot is the key's position in its row, so every row gets the family's own bias, computed
    as the family computes it (float32, then cast) and added by its own attention arithmetic."""
    build = type(self).build_alibi_tensor
    if attention_mask.dim() != 4:
        return build(self, attention_mask, num_heads, dtype)
    if self.alibi_key_slots is None:
        raise ValueError("an ALiBi decoder given a 4-D attention mask needs its keys' slots: run it through the model.")
    two = torch.ones(1, 2, dtype=torch.long, device=attention_mask.device)  # positions 0 and 1: the bias at 1 is the slope
    slopes = build(self, two, num_heads, torch.float32)[:, 0, 1]
    bias = (slopes[:, None] * self.alibi_key_slots[None]).to(dtype)  # [heads, keys]
    chunks = attention_mask.shape[0]
    return bias.unsqueeze(0).expand(chunks, -1, -1).reshape(chunks * num_heads, 1, -1)


@contextmanager
def _keys_for_alibi(decoder: nn.Module, kv: DecoderKV):
    """Tell an ALiBi decoder (BLOOM) the slots of the keys it attends to during one cached call."""
    if not hasattr(decoder, "alibi_key_slots"):
        yield
        return
    decoder.alibi_key_slots = kv.key_slots()
    try:
        yield
    finally:
        decoder.alibi_key_slots = None


class BlockTransformerForCausalLM(BlockTransformerPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "embed_tokens.weight"}

    def __init__(self, config: BlockTransformerConfig):
        super().__init__(config)
        dim, block_len, n_prefix = config.hidden_size, config.block_len, config.num_prefix_tokens
        self.embed_tokens = nn.Embedding(config.vocab_size, dim)
        self.token_embed_tokens = nn.Embedding(config.vocab_size, dim) if config.separate_token_embeddings else None
        self.embedder = nn.Linear(block_len * dim, dim, bias=False)
        self.start = nn.Parameter(torch.zeros(dim))
        self.block_decoder = _build_decoder(config.block_decoder_config, config.block_decoder_final_norm, config.embedding_norm)
        self.prefix = nn.Linear(dim, n_prefix * dim, bias=True)
        self.token_decoder = _build_decoder(config.token_decoder_config)
        # The family's norm on inputs_embeds (BLOOM, NanoChat): applied once, to token embeddings (docs/design.md §1).
        self.embedding_norm = _detach(self.token_decoder, config.embedding_norm) if config.embedding_norm else None
        self.apply_layer_modules()
        self.apply_layer_scalars()
        self.head_transform = _head_transform(config.head_transform, config.token_decoder_config)
        self.lm_head = nn.Linear(dim, config.vocab_size, bias=config.lm_head_bias)
        self._no_split_modules = sorted(
            set(self.block_decoder._no_split_modules or []) | set(self.token_decoder._no_split_modules or [])
        )
        self.compiled_decode_step = None  # set by compile_decode_step(); None: the static step runs eagerly
        self.post_init()

    @property
    def shares_final_norm(self) -> bool:
        """The family's embedding norm is also its final norm (NanoChat): applied after the token decoder too."""
        return self.embedding_norm is not None and self.config.embedding_norm == self.config.block_decoder_final_norm

    def apply_layer_modules(self) -> None:
        """Rebuild the sub-modules listed in ``config.layer_modules`` as their source layer had them: a copy of a
        sibling of the same kind, or an identity (ModernBERT-decoder builds layer 0 without an attention norm)."""
        for decoder, name in ((self.block_decoder, "block"), (self.token_decoder, "token")):
            layers = decoder.get_submodule(self.config.decoder_layers)
            for index, modules in (self.config.layer_modules or {}).get(name, {}).items():
                layer = layers[int(index)]
                for path, like in modules.items():
                    owner, _, attr = path.rpartition(".")
                    setattr(layer.get_submodule(owner), attr, nn.Identity() if like is None else copy.deepcopy(layer.get_submodule(like)))

    def apply_layer_scalars(self) -> None:
        """Set ``config.layer_scalars`` on the decoders' layers (numbers their family derives from a layer's depth)."""
        for decoder, name in ((self.block_decoder, "block"), (self.token_decoder, "token")):
            layers = decoder.get_submodule(self.config.decoder_layers)
            for index, values in (self.config.layer_scalars or {}).get(name, {}).items():
                for path, value in values.items():
                    owner, _, attr = path.rpartition(".")
                    setattr(layers[int(index)].get_submodule(owner), attr, value)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def token_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings as the source's first layer saw them (times the family's multiplier, through its
        embedding norm)."""
        embeds = self.embed_tokens(input_ids)
        multiplier = self.config.embedding_multiplier
        if multiplier != 1.0:
            embeds = embeds * torch.tensor(multiplier, dtype=embeds.dtype)
        return embeds if self.embedding_norm is None else self.embedding_norm(embeds)

    def token_decoder_inputs(self, input_ids: torch.Tensor) -> torch.Tensor:
        """t(x): the token decoder's input embedding of each token."""
        if self.token_embed_tokens is not None:
            return self.token_embed_tokens(input_ids)
        return self.token_embeddings(input_ids)

    def embed_blocks(self, block_ids: torch.Tensor, block_mask: torch.Tensor) -> torch.Tensor:
        """[..., L_B] token ids -> [..., D] block embeddings; masked tokens contribute zeros."""
        tokens = self.token_embeddings(block_ids) * block_mask.unsqueeze(-1).to(self.embed_tokens.weight.dtype)
        return self.embedder(tokens.flatten(-2))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The family's LM-head arithmetic: its head transform if it has one (ModernBERT-decoder's dense, activation
        and norm), the head, then logit scaling and soft-capping if it has them."""
        logits = self.lm_head(hidden if self.head_transform is None else self.head_transform(hidden))
        if self.config.logit_scale != 1.0:
            logits = logits * self.config.logit_scale
        cap = self.config.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def decoder_inputs(self, inputs: torch.Tensor) -> torch.Tensor:
        """What to pass as ``inputs_embeds`` so the decoder's layers see ``inputs``: the family's base model
        multiplies ``inputs_embeds`` by ``decoder_input_multiplier`` (CTRL), which is undone here."""
        multiplier = self.config.decoder_input_multiplier
        return inputs if multiplier == 1.0 else inputs / torch.tensor(multiplier, dtype=inputs.dtype)

    def _run_decoder(
        self,
        decoder: PreTrainedModel,
        inputs: torch.Tensor,
        positions: torch.Tensor,
        kv: DecoderKV | None = None,
        layout: KVLayout | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """The family's base model on ``inputs_embeds`` at explicit positions, optionally through a cache.

        With a cache, ``layout`` says which row and slot each position belongs to (default: row b of the
        batch is row b of the input, writing from slot 0); a slot is its position.
        """
        inputs = self.decoder_inputs(inputs)
        if kv is None:
            hidden = decoder(inputs_embeds=inputs, position_ids=positions, use_cache=False, **kwargs).last_hidden_state
        else:
            if layout is None:
                layout = KVLayout.per_row(None, positions.expand(inputs.shape[:2]), kv.batch_size)
            mask = kv.prepare(layout, decoder.config._attn_implementation, inputs.dtype)
            with _keys_for_alibi(decoder, kv):
                hidden = decoder(
                    inputs_embeds=inputs, position_ids=positions, attention_mask=mask, use_cache=True,
                    **{cache_kwarg(decoder): kv},
                ).last_hidden_state
        if decoder is self.token_decoder and self.shares_final_norm:
            hidden = self.embedding_norm(hidden)  # NanoChat's one norm is also its final norm
        return hidden

    def run_block_decoder(self, block_embeds: torch.Tensor, kv: DecoderKV | None = None, **kwargs) -> torch.Tensor:
        """[B, M, D] block embeddings -> [B, M + 1, D] context embeddings (index k serves block k).

        Rows with fewer blocks are right-padded: causal attention never lets a real block see the padding,
        so no mask is needed and every row computes what it computes alone. Slot i is block position i,
        which is also the layout of the block cache.
        """
        batch = block_embeds.shape[0]
        start = self.start.to(block_embeds.dtype).expand(batch, 1, -1)
        inputs = torch.cat([start, block_embeds], dim=1)
        positions = torch.arange(inputs.shape[1], device=inputs.device).unsqueeze(0)
        return self._run_decoder(self.block_decoder, inputs, positions, kv, **kwargs)

    def expand_prefix(self, context: torch.Tensor) -> torch.Tensor:
        """[..., D] context embeddings -> [..., N_P, D] prefix vectors."""
        return self.prefix(context).unflatten(-1, (self.config.num_prefix_tokens, self.config.hidden_size))

    def run_token_decoder(
        self, prefix: torch.Tensor, token_inputs: torch.Tensor, kv: DecoderKV | None = None, **kwargs
    ) -> torch.Tensor:
        """[R, N_P, D] prefixes + [R, L, D] token inputs (L <= L_B - 1) -> final-normed hidden states.

        Only the last prefix slot and the token positions predict anything, so those L + 1 states are
        returned: index j predicts the block's token j.
        """
        inputs = torch.cat([prefix, token_inputs], dim=1)
        positions = torch.arange(inputs.shape[1], device=inputs.device).unsqueeze(0)
        hidden = self._run_decoder(self.token_decoder, inputs, positions, kv, **kwargs)
        return hidden[:, self.config.num_prefix_tokens - 1 :]

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        past_key_values: BlockTransformerCache | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        num_items_in_batch: int | torch.Tensor | None = None,
        **kwargs,
    ) -> BlockTransformerCausalLMOutput:
        r"""
        labels: shifted inside as in Hugging Face causal LMs (``labels[:, t + 1]`` is scored against
            ``logits[:, t]``); -100 and positions where ``attention_mask`` is 0 are ignored.
        past_key_values: a ``BlockTransformerCache``. An empty one is filled from the prompt (prefill); a
            started one takes only the newest token of each row (``input_ids`` of shape [B, 1]).
        logits_to_keep: if 1, only the prediction after each row's last real token is computed (generation).
        """
        if input_ids is None:
            raise ValueError("BlockTransformerForCausalLM needs input_ids (block embeddings are built from token ids).")
        if kwargs.pop("inputs_embeds", None) is not None:
            raise ValueError("inputs_embeds is not supported: the block embedder needs token ids.")
        for unused in ("cache_position", "position_ids", "return_dict"):
            kwargs.pop(unused, None)
        if past_key_values is not None and not isinstance(past_key_values, BlockTransformerCache):
            raise TypeError("past_key_values must be a BlockTransformerCache (or None).")
        if past_key_values is not None and past_key_values.started:
            if past_key_values.static:
                self._check_decode_inputs(input_ids, attention_mask)
                past_key_values.before_static_step()
                step = self.compiled_decode_step or self.static_decode_step
                logits = step(input_ids[:, 0], past_key_values)
                return BlockTransformerCausalLMOutput(logits=logits.unsqueeze(1), past_key_values=past_key_values)
            return self._decode_step(input_ids, attention_mask, past_key_values)

        batch, seq_len = input_ids.shape
        block_len = self.config.block_len
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        layout = BlockLayout.from_mask(attention_mask, block_len)
        device = input_ids.device
        rows_all = torch.arange(batch, device=device)

        # Regroup each row's real tokens into a block grid [B, M_max + 1, L_B] anchored at its first token.
        n_slots = layout.num_blocks + 1
        offsets = torch.arange(n_slots * block_len, device=device).view(n_slots, block_len)
        gather_at = layout.start.view(batch, 1, 1) + offsets
        in_row = offsets.unsqueeze(0) < layout.length.view(batch, 1, 1)
        grid = torch.gather(input_ids, 1, gather_at.clamp(max=seq_len - 1).flatten(1)).view(batch, n_slots, block_len)
        row_blocks = layout.length // block_len  # complete blocks per row = index of its current block

        cache = past_key_values
        if cache is not None:
            cache.start(layout.length, grid[rows_all, row_blocks])

        # Block decoder over complete blocks only (a partial block is never embedded).
        block_embeds = self.embed_blocks(grid[:, : layout.num_blocks], in_row[:, : layout.num_blocks])
        context = self.run_block_decoder(block_embeds, kv=cache.block if cache else None, **kwargs)

        if cache is not None:  # the token cache holds the current block: prefix + its tokens so far
            phase = layout.length % block_len
            prefix = self.expand_prefix(context[rows_all, row_blocks])
            tokens = self.token_decoder_inputs(grid[rows_all, row_blocks, : int(phase.max())])
            last = self.run_token_decoder(prefix, tokens, kv=cache.token)[rows_all, phase]
            if logits_to_keep == 1:
                return BlockTransformerCausalLMOutput(logits=self.logits(last).unsqueeze(1), past_key_values=cache)

        # Token decoder on every block a row reaches: its complete blocks plus the current (partial) one.
        reached = row_blocks.view(batch, 1) >= torch.arange(n_slots, device=device)
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
        logits = self.logits(states)
        first_token_logits = self.logits(predictions[:, 0])

        loss = None
        if labels is not None:
            loss = self.loss(logits, labels, attention_mask, num_items_in_batch)
        return BlockTransformerCausalLMOutput(
            loss=loss, logits=logits, first_token_logits=first_token_logits, past_key_values=cache
        )

    def _decode_step(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, cache: BlockTransformerCache,
        rows: torch.Tensor | None = None,
    ) -> BlockTransformerCausalLMOutput:
        """Feed each row's newest token: one block-decoder call for the rows that complete a block, then one
        token-decoder call for every row.

        A completed block is never a token-decoder input: its embedding extends the block cache, the new
        context is expanded into a fresh prefix (the token cache restarts) and the last prefix slot
        predicts the next block's first token. Every other row runs one token-decoder position.

        ``rows`` (cache row indices, ``input_ids`` in that order) lets only those rows take a step; the others
        sit it out unchanged. The continuous batcher holds rows this way to keep their block phases aligned.
        """
        self._check_decode_inputs(input_ids, attention_mask)
        block_len = self.config.block_len
        token = input_ids[:, 0]
        batch = token.shape[0]
        if rows is not None and rows.shape[0] != batch:
            raise ValueError(f"{rows.shape[0]} rows take a step but input_ids has {batch}.")
        index = torch.arange(batch, device=token.device) if rows is None else rows
        lengths = cache.num_tokens if rows is None else cache.num_tokens[rows]
        offset = lengths % block_len
        cache.current_block[index, offset] = token
        completes = offset == block_len - 1
        n_complete = int(completes.sum())  # the step's one host sync on the row phases
        prefix = None
        if n_complete:
            # None: every cache row, in order (no gather)
            starting = None if rows is None and n_complete == batch else index[completes]
            block_ids = cache.current_block if starting is None else cache.current_block[starting]
            blocks = self.embed_blocks(block_ids, torch.ones_like(block_ids, dtype=torch.bool)).unsqueeze(1)
            done = cache.num_tokens if starting is None else cache.num_tokens[starting]  # (a boolean mask would sync again)
            write_at = 1 + done // block_len  # block k sits at block position k + 1
            layout = KVLayout.per_row(starting, write_at.unsqueeze(1), cache.batch_size)
            context = self._run_decoder(self.block_decoder, blocks, layout.slots, cache.block, layout)
            prefix = self.expand_prefix(context[:, 0])
        inputs, layout, take = self._token_step_layout(token, offset, completes, n_complete, prefix, rows,
                                                       cache.batch_size)
        hidden = self._run_decoder(self.token_decoder, inputs, layout.slots, cache.token, layout).flatten(0, 1)
        hidden = hidden[take]
        if rows is None:
            cache.num_tokens += 1
        else:
            cache.num_tokens[rows] += 1
        return BlockTransformerCausalLMOutput(logits=self.logits(hidden).unsqueeze(1), past_key_values=cache)

    @staticmethod
    def _check_decode_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        if input_ids.shape[1] != 1:
            raise ValueError("with a started cache, pass only the newest token of each row (input_ids of shape [B, 1]).")
        if attention_mask is not None and not bool(attention_mask[:, -1].all()):
            raise ValueError("the newest token of every row must be real (attention_mask 1) during cached decoding.")

    def static_decode_step(self, token: torch.Tensor, cache: BlockTransformerCache) -> torch.Tensor:
        """A decode step of fixed shapes and no host sync, for ``torch.compile`` / CUDA graphs: [B] newest
        tokens -> [B, V] logits, the same as ``_decode_step`` (tested).

        Every row runs the block decoder (a row that does not complete a block writes the cache's scratch row,
        and its output is not used) and N_P token-decoder positions (its prefix when it starts a block, else
        its newest token and N_P - 1 scratch positions); both caches read a fixed number of slots. That is
        L_B times the block decoder's work and N_P times the token decoder's positions of the eager step:
        worth it where a step is bound by launches (a GPU at small batch), not by arithmetic (a CPU).
        """
        block_len, n_prefix = self.config.block_len, self.config.num_prefix_tokens
        batch, device = token.shape[0], token.device
        rows = torch.arange(batch, device=device)
        scratch = torch.full_like(rows, batch)
        offset = cache.num_tokens % block_len
        cache.current_block[rows, offset] = token
        completes = offset == block_len - 1

        blocks = self.embed_blocks(cache.current_block, torch.ones_like(cache.current_block, dtype=torch.bool))
        write_at = (1 + cache.num_tokens // block_len).unsqueeze(1)
        layout = KVLayout(rows=torch.where(completes, rows, scratch).unsqueeze(1), slots=write_at)
        prefix = self.expand_prefix(self._run_decoder(self.block_decoder, blocks.unsqueeze(1), write_at, cache.block,
                                                      layout)[:, 0])  # [B, N_P, D]

        first = torch.arange(n_prefix, device=device) == 0  # a continuing row's one real position
        newest = self.token_decoder_inputs(token).unsqueeze(1) * first.view(1, -1, 1).to(prefix.dtype)
        inputs = torch.where(completes.view(-1, 1, 1), prefix, newest)
        starting = completes.unsqueeze(1)
        slots = torch.where(starting, torch.arange(n_prefix, device=device), (n_prefix + offset).unsqueeze(1) * first)
        owners = torch.where(starting | first, rows.unsqueeze(1), scratch.unsqueeze(1))
        hidden = self._run_decoder(self.token_decoder, inputs, slots, cache.token, KVLayout(rows=owners, slots=slots))
        predicting = torch.where(completes, n_prefix - 1, 0)
        cache.num_tokens += 1
        return self.logits(hidden[rows, predicting])

    def compile_decode_step(self, **compile_kwargs) -> None:
        """Compile ``static_decode_step`` with ``torch.compile(**compile_kwargs)``; generation with a static cache
        (``generate(..., cache_implementation="static")``, or ``forward`` with ``BlockTransformerCache(config,
        max_length)``, which also checks the room left) then runs it. The step mutates its cache tensors, so
        Inductor's CUDA graphs (``mode="reduce-overhead"``) skip it for now: that needs caches at fixed addresses
        reused across calls."""
        self.compiled_decode_step = torch.compile(self.static_decode_step, **compile_kwargs)

    def _token_step_layout(
        self, token: torch.Tensor, offset: torch.Tensor, completes: torch.Tensor, n_complete: int,
        prefix: torch.Tensor | None, rows: torch.Tensor | None, cache_rows: int,
    ) -> tuple[torch.Tensor, KVLayout, torch.Tensor]:
        """The token-decoder input of a decode step for every stepping row at once: (inputs [C, W, D], their
        layout, the flat index of each row's predicting state in the [C * W] outputs).

        A row that completes a block brings its N_P prefix vectors (slots 0 … N_P - 1, the token cache
        restarts); any other row brings its newest token, at slot N_P + its offset in the block. When every
        row brings as many positions as the others (aligned prompts, or N_P = 1), the batch goes in as it
        is. Otherwise each prefix is a chunk of its own and the one-position rows share chunks of N_P, so
        no position is computed for nothing except the padding of the last chunk (< N_P positions).
        ``rows``: the cache rows stepping (None: all ``cache_rows``, in order); row ``cache_rows`` is scratch.
        """
        n_prefix = self.config.num_prefix_tokens
        device = token.device
        batch = token.shape[0]
        if n_complete == batch:  # every row starts a block
            slots = torch.arange(n_prefix, device=device).expand(batch, -1)
            take = torch.arange(batch, device=device) * n_prefix + n_prefix - 1
            return prefix, KVLayout.per_row(rows, slots, cache_rows), take
        inputs = self.token_decoder_inputs(token)
        slots = n_prefix + offset
        if n_complete == 0 or n_prefix == 1:  # one position per row
            if n_complete:
                inputs = inputs.masked_scatter(completes.unsqueeze(-1), prefix[:, -1])
                slots = slots.masked_fill(completes, 0)
            layout = KVLayout.per_row(rows, slots.unsqueeze(1), cache_rows)
            return inputs.unsqueeze(1), layout, torch.arange(batch, device=device)

        width = n_prefix
        index = torch.arange(batch, device=device) if rows is None else rows
        starting = completes.nonzero(as_tuple=True)[0]
        going_on = (~completes).nonzero(as_tuple=True)[0]
        n_going_on = going_on.shape[0]
        pad = -n_going_on % width
        scratch = torch.full((pad,), cache_rows, dtype=torch.long, device=device)
        flat_inputs = torch.cat([prefix.flatten(0, 1), inputs[going_on], inputs.new_zeros(pad, inputs.shape[-1])])
        owners = torch.cat([index[starting].repeat_interleave(width), index[going_on], scratch])
        flat_slots = torch.cat([torch.arange(width, device=device).repeat(n_complete), slots[going_on], scratch * 0])
        members = torch.cat([
            torch.zeros(n_complete * width, dtype=torch.long, device=device),
            torch.arange(n_going_on + pad, device=device) % width,
        ])
        key_rows = torch.cat([
            torch.cat([index[starting].unsqueeze(1), starting.new_full((n_complete, width - 1), cache_rows)], dim=1),
            torch.cat([index[going_on], scratch]).view(-1, width),
        ])
        layout = KVLayout(
            rows=owners.view(-1, width), slots=flat_slots.view(-1, width), key_rows=key_rows,
            members=members.view(-1, width),
        )
        take = torch.empty(batch, dtype=torch.long, device=device)
        take[starting] = torch.arange(n_complete, device=device) * width + width - 1
        take[going_on] = n_complete * width + torch.arange(n_going_on, device=device)
        return flat_inputs.view(-1, width, flat_inputs.shape[-1]), layout, take

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

    _supported_generation_modes = [GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE]

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs) -> None:
        """generate() hook: our own cache (block-level + local), never a DynamicCache or transformers' static
        cache. ``cache_implementation="static"`` sizes ours for ``max_length`` and decodes with the static step
        (compiled after ``compile_decode_step()``)."""
        if generation_config.cache_implementation not in (None, "static"):
            raise ValueError(
                f"cache_implementation={generation_config.cache_implementation!r} is not supported: Block "
                "Transformers use their own block-level and local caches; leave cache_implementation unset, or "
                "'static' for fixed-size caches and the static (compilable) decode step."
            )
        cache = model_kwargs.get("past_key_values")
        if cache is not None and not (isinstance(cache, BlockTransformerCache) and not cache.started):
            raise ValueError("pass no past_key_values to generate(), or a fresh BlockTransformerCache.")
        if generation_config.use_cache is not False and cache is None:
            static = generation_config.cache_implementation == "static"
            model_kwargs["past_key_values"] = BlockTransformerCache(
                self.config, max_length=generation_config.max_length if static else None
            )

    # Continuous batching: transformers' entry points, served by BlockTransformerBatchingManager
    # (batching_block_transformer.py, which travels with this file).

    def init_continuous_batching(
        self,
        generation_config: GenerationConfig | None = None,
        continuous_batching_config=None,
        workload_hints=None,
        max_batch_size: int | None = None,
        align_blocks: bool = True,
    ) -> "BlockTransformerBatchingManager":
        """A manager that keeps up to ``max_batch_size`` requests decoding together (default: the
        ``max_requests_per_batch`` of a transformers ``ContinuousBatchingConfig``, else 32). Its other fields
        (pages, CUDA graphs, ...) and ``workload_hints`` concern transformers' paged cache and are ignored.
        ``align_blocks``: keep the rows' block phases aligned (see ``BlockTransformerBatchingManager``)."""
        from .batching_block_transformer import BlockTransformerBatchingManager

        config = copy.deepcopy(generation_config)  # None: the model's, as in generate()
        if max_batch_size is None:
            max_batch_size = getattr(continuous_batching_config, "max_requests_per_batch", None) or 32
        return BlockTransformerBatchingManager(self, config, max_batch_size, align_blocks=align_blocks)

    @contextmanager
    def continuous_batching_context_manager(
        self,
        generation_config: GenerationConfig | None = None,
        block: bool = True,
        timeout: float | None = None,
        continuous_batching_config=None,
        max_batch_size: int | None = None,
        align_blocks: bool = True,
        **ignored,
    ) -> Iterator["BlockTransformerBatchingManager"]:
        """A started manager (background thread), stopped on exit."""
        manager = self.init_continuous_batching(generation_config, continuous_batching_config,
                                                max_batch_size=max_batch_size, align_blocks=align_blocks)
        manager.start()
        try:
            yield manager
        finally:
            manager.stop(block=block, timeout=timeout)

    @torch.no_grad()
    def generate_batch(
        self,
        inputs: list,
        generation_config: GenerationConfig | None = None,
        continuous_batching_config=None,
        record_timestamps: bool = False,
        progress_bar: bool = False,
        persistent_manager: bool = False,
        warmup: bool = True,
        max_batch_size: int | None = None,
        align_blocks: bool = True,
        **kwargs,
    ) -> dict[str, "GenerationOutput"]:
        """Generate for many prompts with continuous batching; returns {request id: GenerationOutput} in input
        order (ids ``req_0``, ``req_1``, ...).

        ``inputs`` are token-id lists, or dicts of per-request ``add_request`` arguments (``input_ids`` plus e.g.
        ``max_new_tokens``, ``eos_token_id``, ``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``seed``);
        ``kwargs`` are settings shared by every request. Runs in the calling thread; ``progress_bar``,
        ``persistent_manager`` and ``warmup`` are accepted for compatibility and have no effect. ``align_blocks``:
        see ``BlockTransformerBatchingManager``.
        """
        manager = self.init_continuous_batching(generation_config, continuous_batching_config,
                                                max_batch_size=max_batch_size, align_blocks=align_blocks)
        request_ids = manager.add_requests(inputs, record_timestamps=record_timestamps, **kwargs)
        manager.run()
        results = {}
        while (result := manager.get_result()) is not None:
            if result.is_finished():
                results[result.request_id] = result
        return {request_id: results[request_id] for request_id in request_ids}

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None, **kwargs):
        """Prefill with the whole prompt, then one token per step; without a cache, recompute everything."""
        if past_key_values is not None and past_key_values.started:
            input_ids = input_ids[:, -1:]
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "past_key_values": past_key_values,
            "logits_to_keep": 1,
        }


__all__ = [
    "BlockTransformerCache",
    "BlockTransformerCausalLMOutput",
    "BlockTransformerForCausalLM",
    "BlockTransformerPreTrainedModel",
]
