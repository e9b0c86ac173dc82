"""Find where a source keeps its pieces, and measure the arithmetic around its layer stack.

Conversion needs, for any decoder-only family: the decoder-layer list, the final norm, the input
embedding, and the scalars that sit around the layers in the family's own code — what the embedding
path multiplies token embeddings by (Gemma's √d), what the base model does to ``inputs_embeds``,
what position signal it adds before layer 0 (learned tables, with any offset), and how the causal-LM
head turns the final state into logits (logit scaling, soft-capping). The structure is read from the
module tree (the layer class named in ``_no_split_modules``, the modules beside the layer stack); the
scalars are measured with hooks on a tiny input, so nothing is assumed from a family's name.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from ..errors import ConversionError, Refused, first_line
from .families import Family, family_for

# Layer kinds that are attention over the residual stream; any other kind is a recurrent/hybrid layer.
ATTENTION_LAYER_TYPES = {"full_attention", "sliding_attention", "chunked_attention", "indexed_attention", "attention"}
# "hybrid" and "hybrid_sliding" (Inkling) are attention layers with short-convolution state.
RECURRENT_LAYER_TYPES = {"linear_attention", "mamba", "conv", "hybrid", "hybrid_sliding", "recurrent", "rwkv"}
NOT_LM = "not_decoder_only"
SOFTCAP_ATTRS = ("final_logit_softcapping", "output_logit_soft_cap")
_TOLERANCE = 1e-4


@dataclass(frozen=True)
class Structure:
    """Dotted paths inside the family's base model."""

    layers: str
    embedding: str
    final_norm: str | None
    embedding_norm: str | None = None  # a norm applied to inputs_embeds before the first layer (may be final_norm)
    head_transform: str | None = None  # a module of the causal LM between the base model and its LM head


@dataclass(frozen=True)
class Arithmetic:
    """The scalars around the layer stack: layer 0 sees ``embedding_multiplier·E[x] + P[pos]``."""

    embedding_multiplier: float
    decoder_input_multiplier: float  # what the base model multiplies ``inputs_embeds`` by
    logit_scale: float
    final_logit_softcapping: float | None


def check_architecture(config: PretrainedConfig) -> Family:
    """Refuse what is not a decoder-only attention LM, from the config alone (before any weights)."""
    model_type = config.model_type
    if getattr(config, "is_encoder_decoder", False):
        raise Refused(f"cannot convert {model_type!r}: an encoder-decoder model; only decoder-only LMs convert.", NOT_LM)
    sub_configs = set(getattr(type(config), "sub_configs", None) or {})
    if sub_configs & {"text_config", "vision_config", "audio_config", "audio_encoder_config"}:
        raise Refused(
            f"cannot convert {model_type!r}: a multimodal model; convert its text model instead "
            "(load it with AutoModelForCausalLM and save the language model alone).",
            NOT_LM,
        )
    family = family_for(model_type)
    if (reason := family.refusal(config)) is not None:
        raise Refused(f"cannot convert {model_type!r}: {reason}.", family.refuse_kind)
    layer_types = set(getattr(config, "layer_types", None) or [])
    other = sorted(layer_types - ATTENTION_LAYER_TYPES)
    if other:
        raise Refused(
            f"cannot convert {model_type!r}: it has {', '.join(other)} layers; only full, sliding-window, "
            "chunked and indexer-sparse attention layers have a block-level equivalent so far.",
            "recurrent" if set(other) & RECURRENT_LAYER_TYPES else "unsupported",
        )
    return family


def find_structure(source: PreTrainedModel, family: Family) -> Structure:
    """Locate the decoder layers, input embedding, final norm and position table in the base model."""
    base = source.base_model
    embedding = _path_of(base, base.get_input_embeddings())
    forward_args = inspect.signature(base.forward).parameters
    if not {"cache", "past_key_values", "layer_past"} & set(forward_args):
        raise Refused(
            f"cannot convert {source.config.model_type!r}: the family has no KV cache, which cached block decoding needs."
        )
    layers = family.layers or _find_layers(source, family.depth(source.config))
    if layers.startswith("encoder."):
        raise Refused(
            f"cannot convert {source.config.model_type!r}: an encoder stack (BERT-style) used as a decoder, "
            "not a decoder-only LM.",
            NOT_LM,
        )
    parent_path, _, _ = layers.rpartition(".")
    parent = base.get_submodule(parent_path) if parent_path else base
    prefix = f"{parent_path}." if parent_path else ""
    # A learned position table needs no path: it is copied to both decoders like any other shared module,
    # and what it adds is measured (position_signal).
    norms = [
        prefix + name
        for name, child in parent.named_children()
        if prefix + name not in (layers, embedding)
        and not isinstance(child, nn.Embedding)
        and any(True for _ in child.parameters())
        and _norm_like(name, child)
    ]
    outside = []  # every norm-like module outside the layer list (not one nested in another)
    for path, module in base.named_modules():
        if path and not path.startswith(f"{layers}.") and path != layers and _norm_like(path, module) \
                and not any(path.startswith(f"{other}.") for other in outside):
            outside.append(path)
    head = source.get_output_embeddings()
    transforms = [name for name, child in source.named_children()  # ModernBERT-decoder: dense, act, norm
                  if child is not base and child is not head and any(True for _ in child.parameters())]
    head_transform = _one_or_none(transforms, "head transform", source, named=False)
    if family.final_norm or (len(norms) <= 1 and outside == norms):  # the usual layout: one final norm, or none
        final_norm = family.final_norm or _one_or_none(norms, "final norm", source)
        return Structure(layers=layers, embedding=embedding, final_norm=final_norm, head_transform=head_transform)
    before, after = _norms_around_layers(base, base.get_submodule(layers), outside)
    return Structure(layers=layers, embedding=embedding, final_norm=_one_or_none(after, "final norm", source, named=False),
                     embedding_norm=_one_or_none(before, "embedding norm", source, named=False), head_transform=head_transform)


def _norm_like(name: str, module: nn.Module) -> bool:
    return not isinstance(module, (nn.Embedding, nn.Identity)) and (
        "norm" in type(module).__name__.lower() or "norm" in name.rpartition(".")[2].lower())


@torch.no_grad()
def _norms_around_layers(base: PreTrainedModel, layers: nn.ModuleList, paths: list[str]) -> tuple[list[str], list[str]]:
    """Which of the modules at ``paths`` run before the first layer and which after the last, on a few tokens
    (the source's own device: the meta device of a skeleton works too): a family with a norm on its
    embeddings (BLOOM, ModernBERT-decoder), or one norm for both (NanoChat)."""
    events: list[str] = []
    handles = [base.get_submodule(path).register_forward_hook(lambda *_, path=path: events.append(path)) for path in paths]
    handles.append(layers[0].register_forward_pre_hook(lambda *_: events.append("<first layer>")))
    handles.append(layers[-1].register_forward_hook(lambda *_: events.append("<last layer>")))
    embedding = base.get_input_embeddings().weight
    try:
        base(input_ids=torch.zeros(1, 4, dtype=torch.long, device=embedding.device), use_cache=False)
        first, last = events.index("<first layer>"), len(events) - 1 - events[::-1].index("<last layer>")
    except Exception as err:  # noqa: BLE001 - e.g. data-dependent code on the meta device, a layer that never ran
        raise ConversionError(
            f"could not tell which of {', '.join(paths)} are {type(base).__name__}'s embedding and final norms "
            f"(running it failed: {first_line(err)}); please report it.") from err
    finally:
        for handle in handles:
            handle.remove()
    return list(dict.fromkeys(events[:first])), list(dict.fromkeys(events[last + 1 :]))


def _find_layers(source: PreTrainedModel, n: int) -> str:
    layer_classes = set(getattr(source, "_no_split_modules", None) or [])
    lists = [
        (name, module)
        for name, module in source.base_model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == n and name
    ]
    named = [name for name, module in lists if type(module[0]).__name__ in layer_classes]
    found = named or [name for name, _ in lists]
    if len(found) != 1:
        raise ConversionError(
            f"could not find the decoder-layer list of {type(source).__name__} (candidates: {found or 'none'}): "
            "add `layers: <path>` for this model type to block_transformer/convert/families.yaml."
        )
    return found[0]


def _one_or_none(paths: list[str], what: str, source: PreTrainedModel, named: bool = True) -> str | None:
    """``named``: families.yaml can name it (``layers``, ``final_norm``); otherwise there is no such entry yet."""
    if len(paths) > 1:
        fix = "name it in block_transformer/convert/families.yaml" if named else "conversion does not support this yet; please report it"
        raise ConversionError(f"{type(source).__name__} has several candidates for its {what} ({', '.join(paths)}): {fix}.")
    return paths[0] if paths else None


def _path_of(parent: nn.Module, child: nn.Module) -> str:
    for name, module in parent.named_modules():
        if module is child:
            return name
    raise ConversionError(f"{type(parent).__name__}'s input embedding is not one of its modules.")


class LayerInputs:
    """Captures the hidden states a layer receives (forward pre-hook), for the probes."""

    def __init__(self, layer: nn.Module):
        self.seen: list[torch.Tensor] = []
        self._handle = layer.register_forward_pre_hook(self._capture, with_kwargs=True)

    def _capture(self, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        self.seen.append(hidden.detach().clone())

    def take(self) -> torch.Tensor:
        seen, self.seen = self.seen, []
        return seen[0]

    def close(self) -> None:
        self._handle.remove()


@torch.no_grad()
def position_signal(base: PreTrainedModel, layers: nn.ModuleList, positions: torch.Tensor, dim: int, dtype,
                    first: nn.Module | None = None) -> torch.Tensor:
    """What the base model adds to ``inputs_embeds`` before layer 0 (or the module ``first``) at ``positions``
    ([1, T] -> [T, D])."""
    hook = LayerInputs(layers[0] if first is None else first)
    try:
        base(inputs_embeds=torch.zeros(1, positions.shape[1], dim, dtype=dtype), position_ids=positions, use_cache=False)
        return hook.take()[0]
    finally:
        hook.close()


@torch.no_grad()
def measure_arithmetic(source: PreTrainedModel, structure: Structure) -> Arithmetic:
    """Measure the scalars of :class:`Arithmetic` on the source with hooks (eval mode, a few tokens)."""
    base = source.base_model
    layers = base.get_submodule(structure.layers)
    embed = base.get_input_embeddings().weight
    dim, dtype = embed.shape[1], embed.dtype
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, embed.shape[0], (1, 6), generator=generator)
    positions = torch.arange(ids.shape[1]).unsqueeze(0)
    # With an embedding norm the multipliers are measured at its input; layer 0 must see its output.
    first = base.get_submodule(structure.embedding_norm) if structure.embedding_norm else layers[0]
    added = position_signal(base, layers, positions, dim, dtype, first)
    if structure.embedding_norm and added.abs().max() > 0:
        raise ConversionError(
            f"{type(source).__name__} adds a signal (positions?) to inputs_embeds before its embedding norm "
            f"{structure.embedding_norm!r}: conversion cannot reproduce that yet; please report it.")
    hook, seen = LayerInputs(first), LayerInputs(layers[0])
    try:
        probe = torch.randn(1, ids.shape[1], dim, generator=generator).to(dtype)
        base(inputs_embeds=probe.clone(), position_ids=positions, use_cache=False)  # some scale it in place
        decoder_input = _fit_scale(hook.take()[0] - added, probe[0], "inputs_embeds", source)
        seen.take()
        final = base(input_ids=ids, position_ids=positions, use_cache=False).last_hidden_state
        normed = hook.take()
        embedding = _fit_scale(normed[0] - added, embed[ids[0]], "token embeddings", source)
        if structure.embedding_norm and not torch.allclose(first(normed), seen.take(), rtol=1e-5, atol=1e-6):
            raise ConversionError(
                f"{type(source).__name__}'s first layer does not receive the output of {structure.embedding_norm!r} "
                "directly: conversion cannot reproduce what happens in between.")
    finally:
        hook.close()
        seen.close()
    logits = source(input_ids=ids, position_ids=positions, use_cache=False).logits[0].float()
    head = source.get_output_embeddings()
    raw = head(final if structure.head_transform is None else source.get_submodule(structure.head_transform)(final))[0].float()
    softcap = next((getattr(source.config, a) for a in SOFTCAP_ATTRS if getattr(source.config, a, None)), None)
    if softcap:
        logits = torch.atanh((logits / softcap).clamp(-1 + 1e-7, 1 - 1e-7)) * softcap
    logit_scale = _fit_scale(logits, raw, "logits", source)
    return Arithmetic(embedding, decoder_input, logit_scale, float(softcap) if softcap else None)


def _fit_scale(observed: torch.Tensor, given: torch.Tensor, what: str, source: PreTrainedModel) -> float:
    """The scalar c with observed = c · given, or an error if no scalar explains the relation."""
    observed, given = observed.double(), given.double()
    scale = float((observed * given).sum() / (given * given).sum())
    error = float((observed - scale * given).norm() / observed.norm().clamp(min=1e-12))
    if error > 1e-2:
        raise ConversionError(
            f"{type(source).__name__} transforms its {what} in a way conversion cannot reproduce "
            f"(not a scalar multiple: relative error {error:.2g})."
        )
    return 1.0 if abs(scale - 1.0) < _TOLERANCE else scale
