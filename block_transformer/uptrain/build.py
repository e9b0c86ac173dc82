"""The model side of a run: model and teacher loading, LoRA, optimizer groups, schedule, and the model exported."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..dtypes import torch_dtype
from ..modeling import BlockTransformerConfig, BlockTransformerForCausalLM
from ..sources import Source
from .recipe import Recipe

if TYPE_CHECKING:
    from .preflight import Blueprint

logger = logging.getLogger(__name__)

NEW_MODULES = ("embedder.", "prefix.", "start", "token_embed_tokens.")
"""Parameters that do not exist in the source model: they get their own LR multiplier and always train."""


def is_new(name: str) -> bool:
    return name.startswith(NEW_MODULES)


def is_norm(name: str, param: torch.Tensor) -> bool:
    return param.ndim == 1 and ("norm" in name or ".ln_" in name or "layernorm" in name)


def load_model(recipe: Recipe, blueprint: Blueprint) -> tuple[BlockTransformerForCausalLM, PreTrainedTokenizerBase]:
    """The model to train (fp32 master weights) and its tokenizer: a converted folder, or a source converted now."""
    m = recipe.model
    if m.path is not None:
        model = BlockTransformerForCausalLM.from_pretrained(Path(m.path).expanduser(), dtype=torch.float32)
        return model, blueprint.tokenizer
    from ..convert.convert import convert

    model, tokenizer, _ = convert(
        m.source, blueprint.mapping, m.block_len, m.num_prefix_tokens, init=m.init, dtype=torch.float32,
        revision=m.revision, separator=m.separator,
    )
    return model.train(), tokenizer


def load_teacher(source: Source) -> nn.Module:
    teacher = source.load_model(torch.float32)
    teacher.requires_grad_(False)
    return teacher.eval()


def decoder_layers(decoder: nn.Module, path: str) -> nn.ModuleList:
    """The decoder-layer list at ``path`` (``config.decoder_layers``, found by conversion) of a base model."""
    return decoder.get_submodule(path)


def apply_lora(model: BlockTransformerForCausalLM, recipe: Recipe) -> nn.Module:
    """LoRA on every linear layer of the two decoders; the new modules (and norms) keep training fully."""
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    targets = [
        name for name, module in model.named_modules()
        if name.startswith(("block_decoder.", "token_decoder.")) and isinstance(module, (nn.Linear, Conv1D))
    ]
    config = LoraConfig(
        r=recipe.lora.r, lora_alpha=recipe.lora.alpha, lora_dropout=recipe.lora.dropout, target_modules=targets,
        fan_in_fan_out=any(isinstance(model.get_submodule(t), Conv1D) for t in targets),
    )
    wrapped = get_peft_model(model, config)
    for name, param in model.named_parameters():
        if is_new(name) or is_norm(name, param):
            param.requires_grad_(True)
    return wrapped


def exportable_model(config: BlockTransformerConfig, full_state: dict, recipe: Recipe) -> BlockTransformerForCausalLM:
    """The trained weights in a fresh plain BlockTransformerForCausalLM (LoRA merged into the base weights).

    ``full_state`` comes from ``accelerator.get_state_dict``, which gathers FSDP / DeepSpeed shards.
    """
    model = BlockTransformerForCausalLM(config)
    if recipe.lora.enabled:
        model = apply_lora(model, recipe)
    model.load_state_dict(full_state)
    if recipe.lora.enabled:
        model = model.merge_and_unload()
    dtype = torch_dtype(recipe.output.dtype)
    return (model.to(dtype) if dtype else model).eval()


def base_name(name: str) -> str:
    """A parameter's name in the plain model, whatever wrappers (peft) sit around it."""
    return name.removeprefix("base_model.model.")


def parameter_groups(model: nn.Module, recipe: Recipe) -> list[dict]:
    """AdamW groups: {new, norm, pretrained} x {decay, no decay}. ``kind`` drives LR multiplier and freezing."""
    groups: dict[tuple[str, bool], list[torch.Tensor]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        plain = base_name(name)
        kind = "new" if is_new(plain) else "norm" if is_norm(plain, param) else "pretrained"
        decay = param.ndim >= 2
        groups.setdefault((kind, decay), []).append(param)
    t = recipe.train
    return [
        {
            "params": params,
            "kind": kind,
            "weight_decay": t.weight_decay if decay else 0.0,
            "lr": t.lr * (t.new_modules_lr_multiplier if kind == "new" else 1.0),
        }
        for (kind, decay), params in sorted(groups.items())
    ]


def lr_lambdas(groups: list[dict], recipe: Recipe, total_steps: int) -> list:
    """Linear warmup, cosine to ``min_lr_ratio``; pretrained weights stay still for ``freeze_pretrained_steps``."""
    t = recipe.train
    warmup = t.warmup_steps if t.warmup_steps is not None else round(t.warmup_fraction * total_steps)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def frozen_then(step: int) -> float:
        return 0.0 if step < t.freeze_pretrained_steps else schedule(step)

    return [frozen_then if g["kind"] == "pretrained" else schedule for g in groups]


def count_parameters(model: nn.Module) -> dict[str, int]:
    """trainable / frozen / new parameter counts (tied tables counted once)."""
    seen: set[int] = set()
    counts = {"total": 0, "trainable": 0, "frozen": 0, "new": 0}
    for name, param in model.named_parameters(remove_duplicate=True):
        if id(param) in seen:
            continue
        seen.add(id(param))
        n = param.numel()
        counts["total"] += n
        counts["trainable" if param.requires_grad else "frozen"] += n
        if is_new(base_name(name)) or "lora_" in name:
            counts["new"] += n
    return counts
