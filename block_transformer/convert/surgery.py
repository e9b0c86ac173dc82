"""Model surgery: a vanilla causal LM becomes a Block Transformer.

The source layers a :class:`~block_transformer.convert.mapping.LayerMapping` names become the block
decoder's and the token decoder's layers, in order (a layer named twice is copied twice); embeddings,
position tables, final norm and LM head are copied bit for bit. The new modules (embedder, start
vector, prefix expansion and, for the sink-aware init, the token-decoder input table) are then
initialised by one of the schemes in :mod:`block_transformer.convert.inits`.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math

import torch
from transformers import PretrainedConfig, PreTrainedModel

from ..errors import ConversionError
from ..modeling import BlockTransformerConfig, BlockTransformerForCausalLM
from ..modeling.modeling_block_transformer import _build_decoder, sliding_window
from .discovery import Arithmetic, Structure, check_architecture
from .families import Family, family_for
from .mapping import LayerMapping

logger = logging.getLogger(__name__)


def check_conversion(config: PretrainedConfig, mapping: LayerMapping, block_len: int, num_prefix_tokens: int) -> Family:
    """Everything that can be checked from the source config alone, before weights are loaded."""
    family = check_architecture(config)
    if block_len < 1:
        raise ConversionError(f"--block-len must be >= 1, got {block_len}")
    if num_prefix_tokens < 1:
        raise ConversionError(f"--prefix-tokens must be >= 1, got {num_prefix_tokens}")
    mapping.check(family.depth(config))
    positions = getattr(config, "max_position_embeddings", None)
    local = num_prefix_tokens + block_len - 1  # the token decoder's positions: prefix + block minus its last token
    if positions is not None and local > positions:
        raise ConversionError(
            f"--block-len {block_len} with --prefix-tokens {num_prefix_tokens} needs {local} token-decoder positions, "
            f"but the source has {positions}: use --block-len {positions - num_prefix_tokens + 1} or less."
        )
    _check_reused_layers(config, family, mapping)
    return family


def _global(config: PretrainedConfig, name: str):
    """A config field's global value, or None: plain access to a per-layer field of a heterogeneous config
    (``per_layer_config``) raises."""
    getter = getattr(config, "_getattr_without_heterogeneous_validation", None)
    try:
        return getter(name) if getter is not None else getattr(config, name, None)
    except AttributeError:
        return None


def _has(config: PretrainedConfig, name: str) -> bool:
    checker = getattr(config, "_hasattr_without_heterogeneous_validation", None)
    return checker(name) if checker is not None else hasattr(config, name)


def _check_reused_layers(config: PretrainedConfig, family: Family, mapping: LayerMapping) -> None:
    """A layer that reuses its predecessor's result (GLM-DSA's "shared" indexer layers) needs that predecessor
    right before it in its new decoder."""
    for name, value in family.reuses_previous_layer.items():
        per_layer = _global(config, name) or []
        for decoder, layers in (("block", mapping.block), ("token", mapping.token)):
            for position, layer in enumerate(layers):
                if layer < len(per_layer) and per_layer[layer] == value and (position == 0 or layers[position - 1] != layer - 1):
                    owners = [i for i, kind in enumerate(per_layer) if kind != value]
                    raise ConversionError(
                        f"source layer {layer} reuses layer {layer - 1}'s result ({name} is {value!r}), so it cannot "
                        + (f"open the {decoder} decoder" if position == 0 else
                           f"follow layer {layers[position - 1]} in the {decoder} decoder")
                        + f": start each decoder at a layer that computes its own ({', '.join(map(str, owners))}) "
                        "and keep runs of layers contiguous."
                    )


def build_config(
    source_config: PretrainedConfig,
    family: Family,
    mapping: LayerMapping,
    block_len: int,
    num_prefix_tokens: int,
    tie_word_embeddings: bool,
    conversion: dict,
    *,
    structure: Structure,
    arithmetic: Arithmetic | None = None,
    lm_head_bias: bool = False,
    head_transform: str | None = None,
) -> BlockTransformerConfig:
    """The converted model's config; without ``arithmetic`` (a source on the meta device) its defaults."""
    block_cfg = _sub_config(source_config, family, mapping.block)
    token_cfg = _sub_config(source_config, family, mapping.token)
    window = sliding_window(source_config)
    if window is not None:
        # Keep the attention span in tokens: the block decoder's positions are blocks of L_B tokens.
        block_cfg.sliding_window = max(1, math.ceil(window / block_len))
        conversion = {**conversion, "block_decoder_sliding_window": block_cfg.sliding_window}
    for name in family.token_span_attrs:
        if isinstance(span := _global(source_config, name), int):
            setattr(block_cfg, name, max(1, math.ceil(span / block_len)))
            conversion = {**conversion, f"block_decoder_{name}": getattr(block_cfg, name)}
    return BlockTransformerConfig(
        block_decoder_config=block_cfg,
        token_decoder_config=token_cfg,
        block_len=block_len,
        num_prefix_tokens=num_prefix_tokens,
        block_decoder_final_norm=structure.final_norm,
        embedding_norm=structure.embedding_norm,
        head_transform=head_transform,
        decoder_layers=structure.layers,
        **(dataclasses.asdict(arithmetic) if arithmetic is not None else {}),
        lm_head_bias=lm_head_bias,
        separate_token_embeddings=conversion["init"] == "sink",
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=getattr(source_config, "pad_token_id", None),
        bos_token_id=getattr(source_config, "bos_token_id", None),
        eos_token_id=getattr(source_config, "eos_token_id", None),
        conversion=conversion,
    )


def _sub_config(source_config: PretrainedConfig, family: Family, layers: tuple[int, ...] | range) -> PretrainedConfig:
    """The source config for a selection of its layers (ascending): per-layer settings follow each layer.

    Any list with one entry per source layer (``layer_types``, per-layer windows or RoPE flags, ...) is
    indexed by the selection; fields holding absolute layer indices or thresholds (named in
    ``families.yaml``) are renumbered, so each new layer builds as its source layer did.
    """
    cfg = copy.deepcopy(source_config)
    total = family.depth(source_config)
    layers = tuple(layers)
    per_layer = cfg.to_dict().get("per_layer_config")  # heterogeneous configs: {layer index: overrides}
    if per_layer:
        per_layer = {int(index): overrides for index, overrides in per_layer.items()}  # keys come zero-padded ("07")
        cfg.per_layer_config = None  # reassigned below for the new indices
    for name in list(cfg.to_dict()):
        current = getattr(cfg, name, None)
        if isinstance(current, (list, tuple)) and len(current) == total and name not in family.layer_index_attrs:
            setattr(cfg, name, type(current)(current[i] for i in layers))
    for name in family.layer_index_attrs:
        if getattr(cfg, name, None) is not None:
            listed = set(getattr(cfg, name))
            setattr(cfg, name, [new for new, old in enumerate(layers) if old in listed])
    for name, exponent in family.depth_scaled_attrs.items():
        setattr(cfg, name, getattr(cfg, name) * (len(layers) / total) ** exponent)
    for name in family.layer_threshold_attrs:  # "layer i is special when i >= threshold"
        if isinstance(getattr(cfg, name, None), int):
            setattr(cfg, name, sum(old < getattr(cfg, name) for old in layers))
    for name in family.layer_end_attrs:  # "... when i <= end"
        if isinstance(getattr(cfg, name, None), int):
            setattr(cfg, name, sum(old <= getattr(cfg, name) for old in layers) - 1)
    setattr(cfg, family.depth_attr, len(layers))
    if per_layer:
        cfg.per_layer_config = {new: per_layer[old] for new, old in enumerate(layers) if old in per_layer}
    cfg.architectures = None
    # Weights are saved dequantised: a GGUF source's quantization_config must not travel along; nor may the
    # source's auto_map, which names remote-code modules the output folder does not ship.
    for name in ("quantization_config", "_model_name_or_path", "auto_map"):
        if name in cfg.__dict__:
            delattr(cfg, name)
    cfg.name_or_path = ""
    return cfg


def copy_source_weights(
    model: BlockTransformerForCausalLM, source: PreTrainedModel, structure: Structure, mapping: LayerMapping
) -> list[str]:
    """Copy every source tensor to its place(s); returns the names of our parameters that were copied."""
    base = source.base_model
    state = base.state_dict()
    block_state = _decoder_state(state, structure, mapping.block, final_norm=False)
    token_state = _decoder_state(state, structure, mapping.token, final_norm=True)
    zero_biases = family_for(source.config.model_type).zero_bias_params
    _load_exact(model.block_decoder, block_state, "block decoder", zero_biases)
    _load_exact(model.token_decoder, token_state, "token decoder", zero_biases)
    norm_state = _embedding_norm_state(state, structure)
    if norm_state:
        _load_exact(model.embedding_norm, norm_state, "embedding norm")
    if structure.head_transform:
        _load_exact(model.head_transform, source.get_submodule(structure.head_transform).state_dict(), "head transform")
    with torch.no_grad():
        model.embed_tokens.weight.copy_(base.get_input_embeddings().weight)
        head = source.get_output_embeddings()
        if not model.config.tie_word_embeddings:
            model.lm_head.weight.copy_(head.weight)
        if model.config.lm_head_bias:
            model.lm_head.bias.copy_(head.bias)
    copied = [f"block_decoder.{k}" for k in block_state] + [f"token_decoder.{k}" for k in token_state]
    copied += [f"embedding_norm.{k}" for k in norm_state]
    copied += [f"head_transform.{k}" for k in (model.head_transform.state_dict() if structure.head_transform else ())]
    head = ["lm_head.weight", "lm_head.bias"] if model.config.lm_head_bias else ["lm_head.weight"]
    return copied + ["embed_tokens.weight", *head]


def layer_modules(model: BlockTransformerForCausalLM, source: PreTrainedModel, structure: Structure,
                  mapping: LayerMapping) -> dict[str, dict[str, dict[str, str | None]]]:
    """Sub-modules each converted layer built differently from its source layer because of its new depth
    (ModernBERT-decoder's layer 0 has no attention norm): how to rebuild each as the source had it, a sibling
    module built alike (same class and settings) to copy, or None for an identity."""
    source_layers = source.base_model.get_submodule(structure.layers)
    found: dict[str, dict[str, dict[str, str | None]]] = {}
    for name, decoder, layers in (("block", model.block_decoder, mapping.block), ("token", model.token_decoder, mapping.token)):
        ours = decoder.get_submodule(model.config.decoder_layers)
        for index, source_index in enumerate(layers):
            theirs = source_layers[source_index]
            mine = dict(ours[index].named_modules())
            recorded: list[str] = []
            for path, module in theirs.named_modules():
                if not path or path not in mine or _same_kind(mine[path], module) \
                        or any(path.startswith(f"{parent}.") for parent in recorded):
                    continue
                recorded.append(path)
                like = None if isinstance(module, torch.nn.Identity) else next(
                    (other for other, sibling in mine.items() if other != path and _built_alike(sibling, module)), False)
                if like is False:
                    raise ConversionError(
                        f"source layer {source_index} has a {type(module).__name__} at {path!r} that its new place "
                        f"({name} decoder layer {index}) builds differently, and no module built alike to copy.")
                found.setdefault(name, {}).setdefault(str(index), {})[path] = like
    return found


def _same_kind(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Same class and printed settings. A bare bias parameter a layer gains (not in its printed settings) is
    ``zero_bias_params``' business, not a rebuild."""
    return type(a) is type(b) and a.extra_repr() == b.extra_repr()


def _built_alike(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """The same kind, with the same parameter names and shapes: a copy of ``a`` can hold ``b``'s weights."""
    shapes = [{name: tuple(p.shape) for name, p in m.named_parameters()} for m in (a, b)]
    return _same_kind(a, b) and shapes[0] == shapes[1]


def layer_scalars(model: BlockTransformerForCausalLM, source: PreTrainedModel, structure: Structure,
                  mapping: LayerMapping) -> dict[str, dict[str, dict[str, float | int]]]:
    """The number attributes each converted layer built differently from its source layer: a family that
    derives a constant from the layer's index (DiffLlama's lambda_init, Beam's residual index) would otherwise
    compute with the new index.

    The layer's index itself (an int equal to the new index here and to the source index there: ``layer_idx``)
    addresses the new decoder's cache and stays as built; so does an attribute named after a config field (a
    window, a top-k): the conversion set that one on purpose (spans counted in blocks).
    """
    source_layers = source.base_model.get_submodule(structure.layers)
    found: dict[str, dict[str, dict[str, float | int]]] = {}
    for name, decoder, layers in (("block", model.block_decoder, mapping.block), ("token", model.token_decoder, mapping.token)):
        ours = decoder.get_submodule(model.config.decoder_layers)
        for index, source_index in enumerate(layers):
            theirs = dict(source_layers[source_index].named_modules())
            for path, module in ours[index].named_modules():
                for attr, value in vars(module).items():
                    original = getattr(theirs.get(path), attr, None)
                    if type(value) not in (int, float) or type(original) is not type(value) or original == value:
                        continue
                    if (value, original) == (index, source_index) or attr == "layer_idx" or _has(source.config, attr):
                        continue  # the layer's own index (or its sub-layers' cache index), or a converted config setting
                    found.setdefault(name, {}).setdefault(str(index), {})[f"{path}.{attr}".lstrip(".")] = original
    return found


def _decoder_state(
    state: dict[str, torch.Tensor], structure: Structure, layers: tuple[int, ...] | range, *, final_norm: bool
) -> dict[str, torch.Tensor]:
    """The base-model state of a decoder made of the source ``layers`` (renumbered from 0; a layer listed in
    two decoders lands in both), the shared non-layer state (position tables, ...) and, if asked, the final
    norm; never the vocabulary table nor an embedding norm (the model owns those)."""
    layer_prefix = f"{structure.layers}."
    sub: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key.startswith(layer_prefix):
            index, rest = key[len(layer_prefix) :].split(".", 1)
            sub.update({f"{layer_prefix}{new}.{rest}": tensor for new, old in enumerate(layers) if old == int(index)})
        elif key.startswith(f"{structure.embedding}.") or (structure.embedding_norm and key.startswith(f"{structure.embedding_norm}.")):
            continue
        elif structure.final_norm and key.startswith(f"{structure.final_norm}."):
            if final_norm:
                sub[key] = tensor
        else:
            sub[key] = tensor
    return sub


def _embedding_norm_state(state: dict[str, torch.Tensor], structure: Structure) -> dict:
    """The source's embedding-norm tensors (the model holds that norm itself), keyed inside the norm."""
    if not structure.embedding_norm:
        return {}
    prefix = f"{structure.embedding_norm}."
    return {key[len(prefix):]: tensor for key, tensor in state.items() if key.startswith(prefix)}


def lower_stack(source: PreTrainedModel, family: Family, structure: Structure, num_layers: int) -> PreTrainedModel:
    """The source's layers [0, num_layers) as a decoder of their own (no vocabulary table, no final norm):
    what computes the state the source had before layer ``num_layers``, for the sink-aware init."""
    sub_config = _sub_config(source.config, family, range(num_layers))
    sub_config._attn_implementation = source.config._attn_implementation
    decoder = _build_decoder(sub_config, structure.final_norm, structure.embedding_norm).to(source.get_input_embeddings().weight.dtype)
    state = _decoder_state(source.base_model.state_dict(), structure, range(num_layers), final_norm=False)
    _load_exact(decoder, state, "lower layers", family.zero_bias_params)
    return decoder.eval()


def _load_exact(decoder: torch.nn.Module, state: dict[str, torch.Tensor], what: str, zero_biases: tuple[str, ...] = ()) -> None:
    """Load ``state`` into ``decoder``: every tensor must find its place and every place a tensor, except
    ``zero_biases`` (families.yaml) the decoder builds where its source layer had none: set to zero, they add nothing."""
    result = decoder.load_state_dict(state, strict=False)
    zeroed = [key for key in result.missing_keys if key.endswith(zero_biases)] if zero_biases else []
    with torch.no_grad():
        for key in zeroed:
            decoder.get_parameter(key).zero_()
    missing = [key for key in result.missing_keys if key not in zeroed]
    if missing or result.unexpected_keys:
        raise ConversionError(
            f"the {what} does not match the source layout (missing {missing[:3]}, "
            f"unexpected {result.unexpected_keys[:3]}): the family descriptor is wrong for this checkpoint."
        )


def is_tied(source: PreTrainedModel) -> bool:
    """Whether the source's LM head shares the token embedding (checked on the tensors, not the config)."""
    return source.get_output_embeddings().weight is source.get_input_embeddings().weight
