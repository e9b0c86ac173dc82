"""The conversion pipeline: source -> checks -> surgery -> init -> (model, tokenizer)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import GenerationConfig, PretrainedConfig, PreTrainedModel

from .. import __version__
from ..errors import ConversionError, Refused
from ..modeling import BlockTransformerConfig, BlockTransformerForCausalLM
from ..sources import Source, expose_base_model, resolve_source
from . import probe
from .discovery import Structure, find_structure, measure_arithmetic
from .families import DEFAULT_ENTRY, Family, family_for
from .init_names import DEFAULT_INIT
from .inits import init_new_modules
from .mapping import LayerMapping
from .surgery import build_config, check_conversion, copy_source_weights, is_tied, layer_modules, layer_scalars, lower_stack

logger = logging.getLogger(__name__)


def convert(
    source: str,
    mapping: LayerMapping,
    block_len: int,
    num_prefix_tokens: int = 2,
    init: str = DEFAULT_INIT,
    dtype: torch.dtype | None = None,
    revision: str | None = None,
    separator: str | None = None,
    check: bool = False,
):
    """Convert a hub id, local folder or .gguf file. Returns (model, tokenizer, source).

    ``check`` runs the numerical probe (:mod:`block_transformer.convert.probe`) on the real source
    and records its figures in ``config.conversion["probe"]``; a failed probe is an error.
    """
    src = resolve_source(source, revision=revision)
    check_conversion(src.config, mapping, block_len, num_prefix_tokens)
    logger.info("loading %s (%s)", src.name, src.kind)
    tokenizer = src.load_tokenizer()
    source_model = src.load_model(dtype)
    model = convert_model(
        source_model,
        mapping,
        block_len,
        num_prefix_tokens=num_prefix_tokens,
        init=init,
        separator_id=resolve_separator(tokenizer, source_model.config, separator, setting="--separator"),
        source_info={"source": src.name, "source_kind": src.kind, "revision": src.revision, **_local_path(src), **src.metadata},
    )
    if check:
        report = probe.check(source_model, model)
        model.config.conversion = {**model.config.conversion, "probe": report.as_dict()}
        upper = (
            "upper-layer logits not compared (the token decoder is not the source's top layers)"
            if report.logits_error is None
            else f"upper-layer logits within {report.logits_error:.1e}"
        )
        logger.info("probe passed: first-layer inputs within %.1e, %s of the source", report.input_error, upper)
    return model, tokenizer, src


def _local_path(src: Source) -> dict:
    """Where a local source lies, so uptraining can find it again as the teacher."""
    if src.kind == "hub":
        return {}
    return {"source_path": str(Path(src.spec).expanduser().resolve())}


def convert_model(
    source_model: PreTrainedModel,
    mapping: LayerMapping,
    block_len: int,
    *,
    num_prefix_tokens: int = 2,
    init: str = DEFAULT_INIT,
    separator_id: int,
    source_info: dict | None = None,
) -> BlockTransformerForCausalLM:
    """Surgery on an in-memory causal LM: copy its weights, then initialise the new modules."""
    config, structure = conversion_config(source_model, mapping, block_len, num_prefix_tokens, init, separator_id, source_info)
    model = BlockTransformerForCausalLM(config).to(source_model.get_input_embeddings().weight.dtype)
    model.config.layer_modules = layer_modules(model, source_model, structure, mapping) or None
    model.apply_layer_modules()
    copy_source_weights(model, source_model, structure, mapping)
    model.config.layer_scalars = layer_scalars(model, source_model, structure, mapping) or None
    model.apply_layer_scalars()
    lower = _layers_below_token_decoder(model, source_model, mapping, structure) if init == "sink" else None
    init_new_modules(model, init, separator_id, lower)
    model.generation_config = _generation_config(source_model)
    return model.eval()


def _layers_below_token_decoder(
    model: BlockTransformerForCausalLM, source: PreTrainedModel, mapping: LayerMapping, structure: Structure
) -> PreTrainedModel | None:
    """What computes the source's state before the token decoder's first layer (None: the embeddings).

    For a partition that is the block decoder; otherwise a temporary copy of the source's lower layers.
    """
    first = mapping.token[0]
    if first == 0:
        return None
    if mapping.block == tuple(range(first)):
        return model.block_decoder
    return lower_stack(source, family_for(source.config.model_type), structure, first)


def conversion_config(
    source_model: PreTrainedModel, mapping: LayerMapping, block_len: int, num_prefix_tokens: int, init: str, separator_id: int,
    source_info: dict | None = None,
) -> tuple[BlockTransformerConfig, Structure]:
    """The converted model's config (with its conversion record), and where the source keeps its parts.

    On a source built on the meta device (:meth:`block_transformer.sources.Source.skeleton`, for
    ``bt-uptrain --dry-run``) this is the same config, planned without reading weights; only the
    embedding and logit arithmetic, which is measured by running the source, keeps its defaults.
    """
    expose_base_model(source_model)
    family: Family = check_conversion(source_model.config, mapping, block_len, num_prefix_tokens)
    structure = find_structure(source_model, family)
    embeddings = source_model.get_input_embeddings().weight
    conversion = {
        **(source_info or {}),
        "family": source_model.config.model_type if family.name == DEFAULT_ENTRY else family.name,
        "model_type": source_model.config.model_type,
        **mapping.record(family.depth(source_model.config)),
        **({"depth_attr": family.depth_attr} if family.depth_attr != "num_hidden_layers" else {}),
        "init": init,
        "separator_id": separator_id,
        "dtype": str(embeddings.dtype).removeprefix("torch."),
        "block_transformer_version": __version__,
    }
    config = build_config(
        source_model.config,
        family,
        mapping,
        block_len,
        num_prefix_tokens,
        is_tied(source_model),
        conversion,
        structure=structure,
        arithmetic=None if embeddings.is_meta else measure_arithmetic(source_model, structure),
        lm_head_bias=getattr(source_model.get_output_embeddings(), "bias", None) is not None,
        head_transform=_class_path(source_model.get_submodule(structure.head_transform)) if structure.head_transform else None,
    )
    config._attn_implementation = source_model.config._attn_implementation
    return config, structure


def _class_path(module: torch.nn.Module) -> str:
    return f"{type(module).__module__}:{type(module).__qualname__}"


def resolve_separator(tokenizer, config: PretrainedConfig, token: str | None = None, *, setting: str | None = None) -> int:
    """The id of the token between packed documents, decided the same way by every command.

    In order: ``token``, when the user names one (``eos`` and ``bos`` name the tokenizer's own);
    the id recorded at conversion (``config.conversion["separator_id"]``), so a converted model keeps
    the separator it was made with; the family's pretraining separators (``families.yaml``, ending
    with bos/eos); the eos token, for a family conversion refuses (``bt-eval`` still scores those).
    ``setting`` names the option or recipe field the user sets a separator with (``--separator``,
    ``model.separator``, ``data.separator``), so that an error says what to change.
    """
    if token is not None:
        token_id = _token_id(tokenizer, token)
        if token_id is None:
            raise ConversionError(f"{setting} {token!r} is not a token of the tokenizer: name one of its tokens, or eos/bos.")
        return token_id
    recorded = (getattr(config, "conversion", None) or {}).get("separator_id")
    if recorded is not None:
        return int(recorded)
    try:
        candidates = family_for(config.model_type).separators
    except Refused:
        candidates = ("eos",)
    for candidate in candidates:
        token_id = _token_id(tokenizer, candidate)
        if token_id is not None:
            return token_id
    fix = f"set {setting} to one of its tokens" if setting else "the model has no known document separator"
    raise ConversionError(f"none of the separator tokens {list(candidates)} is in the tokenizer's vocabulary: {fix}.")


def _token_id(tokenizer, token: str) -> int | None:
    token_id = getattr(tokenizer, f"{token}_token_id") if token in ("eos", "bos") else tokenizer.get_vocab().get(token)
    return None if token_id is None else int(token_id)


def _generation_config(source_model: PreTrainedModel) -> GenerationConfig:
    gen = source_model.generation_config
    return GenerationConfig(
        bos_token_id=gen.bos_token_id, eos_token_id=gen.eos_token_id, pad_token_id=gen.pad_token_id
    )
