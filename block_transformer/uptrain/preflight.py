"""Everything about a run that needs no weights, checked before any weights load.

A mistake in a recipe should cost a second, not the minutes of loading or converting a model first:
data paths, the output and checkpoint folders (and the checkpoint to resume), trackers and push
credentials, then the model's
config and tokenizer (the conversion is planned on paper), the block length, the document separator
and the hidden-alignment layers. ``--dry-run`` is these checks plus the parameter counts of the model
built on the meta device.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from ..sources import Source, resolve_source
from ..convert.convert import resolve_separator
from ..convert.families import stack_depth
from ..convert.mapping import LayerMapping
from ..data_spec import DataSpec
from ..export import check_output
from ..modeling import BlockTransformerConfig, BlockTransformerForCausalLM
from . import checkpoint
from .build import apply_lora, count_parameters
from .data import require_heldout_source
from .recipe import DistillSection, Recipe, RecipeError

_TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


@dataclass(frozen=True)
class Blueprint:
    """What a run is made of, read from configs and the tokenizer only."""

    config: BlockTransformerConfig  # the model to train (for a source, the conversion's config, planned)
    tokenizer: PreTrainedTokenizerBase
    mapping: LayerMapping | None  # how a source's layers are mapped when converted (default resolved); None for a folder
    separator_id: int  # the document separator the data is packed with
    hidden_layers: list[int]  # token-decoder layers aligned with the source's ([] without hidden alignment)
    teacher: Source | None  # the source model: distillation teacher and reference, when known
    resume_path: Path | None = None  # the checkpoint to resume from


def micro_batch_size(recipe: Recipe, world_size: int) -> int:
    t = recipe.train
    micro = t.micro_batch_size or t.batch_size // world_size
    if micro == 0 or t.batch_size % (micro * world_size):
        raise RecipeError(
            f"train.batch_size {t.batch_size} must be a multiple of train.micro_batch_size ({micro}) x "
            f"{world_size} processes: change one of them."
        )
    return micro


def check_before_work(recipe: Recipe, resume: str | None) -> Blueprint:
    """Every check that needs no weights; returns what they read, for the run to use.

    ``resume``: None starts a fresh run; a checkpoint folder, or "" for the latest one of the recipe's.
    """
    _check_paths_and_services(recipe, starts_fresh=resume is None)
    resume_path = checkpoint.resolve(resume, recipe.checkpoint_dir) if resume is not None else None
    check_output_dir(recipe)
    return dataclasses.replace(read_blueprint(recipe), resume_path=resume_path)


def plan(recipe: Recipe) -> dict:
    """What ``--dry-run`` prints: parameter counts (model built on the meta device, no weights read) and budget."""
    _check_paths_and_services(recipe, starts_fresh=False)  # a dry run writes nothing
    check_output_dir(recipe)
    blueprint = read_blueprint(recipe)
    with torch.device("meta"):
        model = BlockTransformerForCausalLM(blueprint.config)
        if recipe.lora.enabled:
            model = apply_lora(model, recipe)
    steps = recipe.total_steps
    return {
        "parameters": count_parameters(model),
        "steps": steps,
        "tokens_per_step": recipe.train.batch_size * recipe.data.seq_len,
        "token_budget": steps * recipe.train.batch_size * recipe.data.seq_len,
    }


def _check_paths_and_services(recipe: Recipe, starts_fresh: bool) -> None:
    """Data paths, the checkpoint folder (for a fresh run: free), trackers, push credentials."""
    for c in recipe.data.components:
        spec = DataSpec.parse(c.path, recipe.data.text_field)
        if recipe.data.mixture and spec.kind != "local":
            raise RecipeError(
                f"data.train {c.name}: {c.path} is a hub dataset, but a mixture component must be a local "
                "file/folder/glob; to train on a hub dataset, stream it as the single data.train."
            )
    if recipe.data.eval:
        DataSpec.parse(recipe.data.eval, recipe.data.text_field)
    for held in recipe.eval.sets:
        DataSpec.parse(held.data, held.text_field or recipe.data.text_field)
    require_heldout_source(recipe.data, len(recipe.eval.sets))
    if starts_fresh and checkpoint.checkpoints(recipe.checkpoint_dir):
        raise RecipeError(
            f"{recipe.checkpoint_dir} already holds checkpoints of a run: pass --resume to continue it, "
            "or set checkpoint.dir to a new folder."
        )
    for tracker in recipe.train.report_to:
        if importlib.util.find_spec(_TRACKER_PACKAGES[tracker]) is None:
            raise RecipeError(f"train.report_to lists {tracker}, which is not installed: pip install {tracker}.")
    if recipe.output.push_to_hub:
        from ..hub import check_push_possible, check_repo_id

        check_repo_id(recipe.output.push_to_hub)
        check_push_possible()


def check_output_dir(recipe: Recipe) -> None:
    """``output.dir`` may be written: free, or ``output.overwrite`` set. Resumed runs too, so that a
    finished run's model is not found in the way only after the training is redone."""
    inputs = [p for p in (recipe.model.path, recipe.model.source, recipe.distill.teacher, *recipe.data.train_specs) if p]
    check_output(Path(recipe.output.dir).expanduser(), recipe.output.overwrite, inputs=inputs,
                 elsewhere="Set another output folder with --set output.dir=<new folder>",
                 replace="replace it with --set output.overwrite=true")


def read_blueprint(recipe: Recipe) -> Blueprint:
    """The model's config and tokenizer (a source's conversion planned on paper), checked against the recipe."""
    if recipe.model.path is not None:
        config, tokenizer = _read_folder(recipe.model.path)
        mapping, teacher = None, teacher_source(recipe, config)
    else:
        config, tokenizer, mapping, source = _plan_conversion(recipe)
        teacher = resolve_source(recipe.distill.teacher) if recipe.distill.teacher else source
    check_seq_len(recipe, config.block_len)
    if recipe.distill.needs_teacher and teacher is None:
        raise RecipeError("distillation needs a teacher: set distill.teacher to the source model.")
    return Blueprint(
        config=config,
        tokenizer=tokenizer,
        mapping=mapping,
        separator_id=resolve_separator(tokenizer, config, recipe.data.separator, setting="data.separator"),
        hidden_layers=hidden_layers(recipe.distill, len(LayerMapping.from_config(config).token)),
        teacher=teacher,
    )


def check_seq_len(recipe: Recipe, block_len: int) -> None:
    """Training sequences hold whole blocks: ``data.seq_len`` is a multiple of the model's block length."""
    if recipe.data.seq_len % block_len:
        where = f"model.block_len {block_len}" if recipe.model.source else f"the block length {block_len} of {recipe.model.path}"
        raise RecipeError(f"data.seq_len {recipe.data.seq_len} is not a multiple of {where}: change data.seq_len.")


def _read_folder(path: str) -> tuple[BlockTransformerConfig, PreTrainedTokenizerBase]:
    from transformers import AutoConfig, AutoTokenizer

    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise RecipeError(f"model.path {path} is not a converted model folder (no config.json): run bt-convert first.")
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    if not isinstance(config, BlockTransformerConfig):  # the folder's own copy of the class
        config = BlockTransformerConfig.from_dict(config.to_dict())
    return config, AutoTokenizer.from_pretrained(folder, trust_remote_code=True)


def _plan_conversion(recipe: Recipe) -> tuple[BlockTransformerConfig, PreTrainedTokenizerBase, LayerMapping, Source]:
    """The config ``convert`` will build from ``model.source``, and the source's tokenizer: no weights read."""
    from ..convert.convert import conversion_config
    from ..convert.surgery import check_conversion

    m = recipe.model
    source = resolve_source(m.source, revision=m.revision)
    mapping = LayerMapping.from_options(
        m.split, m.block_layers, m.token_layers, names=("model.split", "model.block_layers", "model.token_layers")
    ) or LayerMapping.halves(stack_depth(source.config))
    check_conversion(source.config, mapping, m.block_len, m.num_prefix_tokens)  # before anything is built
    tokenizer = source.load_tokenizer()
    separator_id = resolve_separator(tokenizer, source.config, m.separator, setting="model.separator")
    config, _ = conversion_config(source.skeleton(), mapping, m.block_len, m.num_prefix_tokens, m.init, separator_id)
    return config, tokenizer, mapping, source


def teacher_source(recipe: Recipe, config: BlockTransformerConfig) -> Source | None:
    """The source model of a converted folder: ``distill.teacher``, or the hub id recorded at conversion."""
    if recipe.distill.teacher:
        return resolve_source(recipe.distill.teacher)
    conversion = config.conversion or {}
    if conversion.get("source_kind") == "hub":
        return resolve_source(conversion["source"], revision=conversion.get("revision"))
    recorded = conversion.get("source_path")
    if recorded and Path(recorded).exists():  # a local source recorded at conversion, still where it was
        return resolve_source(recorded)
    if recipe.distill.needs_teacher:
        raise RecipeError(
            f"the teacher (the source of {recipe.model.path}, a {conversion.get('source_kind', 'unknown')} "
            f"{conversion.get('source', '')!r}) cannot be found from the folder: set distill.teacher to its path."
        )
    return None


def hidden_layers(distill: DistillSection, num_token_layers: int) -> list[int]:
    """The token-decoder layers (1-based) whose outputs are aligned with the source's; [] without alignment."""
    if not distill.hidden_weight:
        return []
    layers = list(range(1, num_token_layers + 1)) if distill.hidden_layers == "all" else list(distill.hidden_layers)
    bad = [j for j in layers if not 1 <= j <= num_token_layers]
    if bad:
        raise RecipeError(f"distill.hidden_layers {bad} out of range: the token decoder has layers 1..{num_token_layers}.")
    return layers
