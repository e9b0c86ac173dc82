"""Uptraining recipes: a YAML file validated against a schema before any work starts.

Every section is a pydantic model that forbids unknown keys, so a typo (``lerning_rate``) is an error
that names the key and the closest valid one instead of a silently ignored setting. Types are strict
and numbers finite (``batch_size: true`` is not 1, ``lr: .inf`` is not a learning rate), so a value
that would fail or misbehave steps into the run is refused here. Values that cannot work together
(two budgets, a held-out size beside an explicit eval set or below one eval window, a warmup longer
than the run) are errors too; an eval or checkpoint interval longer than the run is a warning. ``data.train`` is one data spec
or a mixture (a list of ``{name, path, weight}``, each component holding out its own tail);
``eval.sets`` adds named held-out sets; names are unique over both (they key metrics and summary). What depends on the model
(``data.seq_len`` against its block length, the split, the separator) is checked by
:mod:`block_transformer.uptrain.preflight`. ``--set train.lr=1e-4`` overrides any field from the
command line, parsed as YAML.
"""

from __future__ import annotations

import difflib
import logging
import math
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from ..convert.init_names import DEFAULT_INIT, INITS
from ..data_spec import is_local
from ..dtypes import DTYPES
from ..errors import BlockTransformerError


logger = logging.getLogger(__name__)


class RecipeError(BlockTransformerError):
    """A recipe that cannot be run: unknown keys, wrong types, impossible values, missing files."""


class _Loader(yaml.SafeLoader):
    """YAML with 1.2's floats: ``1e-4`` is a number (YAML 1.1 wants ``1.0e-4`` and reads ``1e-4`` as a
    string), so ``--set train.lr=1e-4`` works with the strict schema, which takes no numeric strings."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$"), list("-+0123456789.")
)


class _Section(BaseModel):
    # strict: no bool -> int (batch_size: true is not 1), no "8" -> 8; finite: lr: .inf is refused
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


def _check_unique(names: list[str], where: str) -> None:
    seen = set()
    for name in names:
        if name in seen:
            raise ValueError(f"{where}: the name {name!r} is used twice; names must be unique")
        seen.add(name)


Beta = Annotated[float, Field(ge=0, lt=1)]
"""An Adam moment decay: in [0, 1), as torch requires, checked here rather than at the first step."""


def _list_as_tuple(value: Any) -> Any:
    """YAML writes a pair as a list; strict mode takes a tuple only as a tuple."""
    return tuple(value) if isinstance(value, list) else value


Betas = Annotated[tuple[Beta, Beta], BeforeValidator(_list_as_tuple)]


class ModelSection(_Section):
    """Either a converted folder (``path``) or a source to convert first (``source`` + conversion fields,
    which a folder ignores: it was converted already)."""

    path: str | None = None
    source: str | None = None
    block_len: int = Field(4, ge=1)
    split: str | None = None  # "N_b/N_t"; default: half and half
    block_layers: str | list[int] | None = None  # instead of split, with token_layers: "0-14", "0,2,4", [0, 2, 4]
    token_layers: str | list[int] | None = None
    num_prefix_tokens: int = Field(2, ge=1)
    init: Literal[INITS] = DEFAULT_INIT  # checked here, before any conversion work
    separator: str | None = None
    revision: str | None = None

    @model_validator(mode="after")
    def _one_model(self) -> ModelSection:
        if (self.path is None) == (self.source is None):
            raise ValueError("set exactly one of model.path (a converted folder) or model.source (to convert)")
        return self


SetName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=64)]
"""A training component's or an eval set's name: it keys the metrics, the summary and the plots."""

HELDOUT_SET = "held-out"
"""The name of the held-out set of a single training corpus (its tail, or ``data.eval``)."""

MIXTURE_CHUNK = 256
"""A mixture draws its components in chunks of this many sequences, each holding every component's
share of the chunk (largest remainder), shuffled: see :mod:`block_transformer.uptrain.data`."""


class TrainComponent(_Section):
    """One part of a training mixture: a local data spec (a hub dataset is refused by the preflight: it
    would be read whole), its weight (share of the training sequences), and its held-out tail, scored as
    an eval set under ``name``."""

    name: SetName
    path: str
    weight: float = Field(1.0, gt=0)  # relative: weights are normalised over the components
    heldout_tokens: int | None = Field(None, gt=0)  # this component's tail; default data.heldout_tokens/fraction


class DataSection(_Section):
    train: str | list[TrainComponent]  # a data spec, or a mixture: a list of {name, path, weight}
    text_field: str = "text"
    eval: str | None = None  # explicit held-out data; default: the tail of a local train corpus
    heldout_tokens: int | None = Field(None, gt=0)  # tail size when eval is not set (default 65,536)
    heldout_fraction: float | None = Field(None, gt=0, lt=1)
    seq_len: int = Field(512, ge=2)
    separator: str | None = None  # token between packed documents; default: the model's recorded separator
    block_aligned: bool = False  # each document starts on a block boundary; its last block is padded, unscored
    streaming: bool | None = None  # default: hub datasets stream, local files are read whole
    shuffle_buffer: int = Field(10_000, ge=1)  # streaming only

    @model_validator(mode="after")
    def _one_heldout(self) -> DataSection:
        if self.heldout_tokens is not None and self.heldout_fraction is not None:
            raise ValueError("set at most one of data.heldout_tokens and data.heldout_fraction")
        if self.eval is not None and (self.heldout_tokens is not None or self.heldout_fraction is not None):
            raise ValueError("data.eval is an explicit held-out set: drop data.heldout_tokens/heldout_fraction")
        return self

    @model_validator(mode="after")
    def _mixture(self) -> DataSection:
        if isinstance(self.train, str):
            return self
        if not self.train:
            raise ValueError("data.train: list at least one component {name, path, weight}, or give one data spec")
        _check_unique([c.name for c in self.train], "data.train")
        if self.eval is not None:
            raise ValueError("data.eval is for a single training corpus: with a mixture, each component's tail is "
                             "held out; add other held-out data to eval.sets")
        if self.streaming:
            raise ValueError("data.streaming: a mixture is read whole (each component keeps a held-out tail); "
                             "stream a single corpus instead")
        total = sum(c.weight for c in self.train)
        for c in self.train:
            share = c.weight / total
            if share < 1 / (2 * MIXTURE_CHUNK):
                raise ValueError(
                    f"data.train {c.name}: weight {c.weight:g} is {share:.2e} of the total, less than half a sequence "
                    f"in {MIXTURE_CHUNK}, yet every chunk of {MIXTURE_CHUNK} sequences draws each component at least "
                    f"once, so it would be drawn {1 / (MIXTURE_CHUNK * share):.0f}x as often as its weight says: "
                    "raise it, or drop the component")
        return self

    @property
    def mixture(self) -> bool:
        return not isinstance(self.train, str)

    @property
    def components(self) -> list[TrainComponent]:
        """The training components; a single data spec is one component named ``held-out`` (its tail's name)."""
        if isinstance(self.train, str):
            return [TrainComponent(name=HELDOUT_SET, path=self.train)]
        return list(self.train)

    @property
    def train_specs(self) -> list[str]:
        return [c.path for c in self.components]

    @property
    def streamed(self) -> bool:
        """``streaming``; by default hub datasets stream and local files are read whole. A mixture is read whole."""
        if self.mixture:
            return False
        return self.streaming if self.streaming is not None else not is_local(self.train)


class TrainSection(_Section):
    seed: int = 0
    batch_size: int = Field(8, ge=1)  # sequences per optimizer step, over all processes
    micro_batch_size: int | None = Field(None, ge=1)  # sequences per process per forward; default: no accumulation
    max_steps: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    lr: float = Field(3e-4, gt=0)
    new_modules_lr_multiplier: float = Field(1.0, gt=0)  # embedder, prefix, start, token-decoder table
    betas: Betas = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    warmup_steps: int | None = Field(None, ge=0)
    warmup_fraction: float = Field(0.02, ge=0, lt=1)  # used when warmup_steps is not set
    min_lr_ratio: float = Field(0.1, ge=0, le=1)  # cosine ends at lr * min_lr_ratio
    max_grad_norm: float | None = Field(1.0, gt=0)
    # YAML reads a bare `no` as false (accelerate's own configs quote it): false means "no" here
    mixed_precision: Annotated[Literal["auto", "no", "bf16", "fp16"],
                               BeforeValidator(lambda v: "no" if v is False else v)] = "auto"
    gradient_checkpointing: bool = False
    freeze_pretrained_steps: int = Field(0, ge=0)  # first K steps train only new modules and norms
    log_every: int = Field(10, ge=1)
    report_to: list[Literal["tensorboard", "wandb"]] = []

    @model_validator(mode="after")
    def _one_budget(self) -> TrainSection:
        if (self.max_steps is None) == (self.max_tokens is None):
            raise ValueError("set exactly one budget: train.max_steps or train.max_tokens")
        return self


class LoraSection(_Section):
    """LoRA adapters on the pretrained decoder layers; new modules still train fully. Merged on export."""

    enabled: bool = False
    r: int = Field(16, ge=1)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)


class DistillSection(_Section):
    """The source model as a frozen teacher: loss = ce_weight·CE + kl_weight·KL + hidden_weight·alignment."""

    teacher: str | None = None  # default: the source the model was converted from
    ce_weight: float = Field(1.0, ge=0)
    kl_weight: float = Field(0.0, ge=0)
    temperature: float = Field(1.0, gt=0)
    hidden_weight: float = Field(0.0, ge=0)  # hidden-state alignment of token-decoder layers (MOHAWK stage 2)
    hidden_layers: Literal["all"] | list[int] = "all"  # token-decoder layers j >= 1 (1 = after its first layer)
    align_prefix: bool = True  # also align the last prefix slot with the previous block's last token
    # the frozen teacher's dtype; auto: bf16 where the hardware computes in it natively (~2x faster teacher), else fp32
    teacher_dtype: Literal["auto", "float32", "bfloat16"] = "auto"

    @model_validator(mode="after")
    def _layers_from_one(self) -> DistillSection:
        if isinstance(self.hidden_layers, list) and (not self.hidden_layers or min(self.hidden_layers) < 1):
            raise ValueError("hidden_layers: list token-decoder layers as 1, 2, ... (1 = after its first layer), or 'all'")
        return self

    @property
    def needs_teacher(self) -> bool:
        return self.kl_weight > 0 or self.hidden_weight > 0


class EvalSet(_Section):
    """A named held-out set scored beside the training data's own: its first ``max_tokens`` tokens."""

    name: SetName
    data: str  # a data spec (local or hub)
    text_field: str | None = None  # default: data.text_field
    max_tokens: int | None = Field(None, ge=2)  # default: eval.max_tokens


class EvalSection(_Section):
    every: int = Field(0, ge=0)  # steps; 0 = only at the start and the end
    max_tokens: int = Field(8192, ge=2)  # per set
    seq_len: int | None = Field(None, ge=2)  # default: data.seq_len
    batch_size: int = Field(4, ge=1)
    source_reference: bool = True  # score the source model once on the same tokens (every set)
    sets: list[EvalSet] = []  # more held-out sets, scored beside the training tails (or data.eval)
    primary: str | None = None  # the set reported as eval_ppl (card, summary's final_ppl); default: the first

    @model_validator(mode="after")
    def _unique_sets(self) -> EvalSection:
        _check_unique([s.name for s in self.sets], "eval.sets")
        return self


class CheckpointSection(_Section):
    dir: str | None = None  # default: <output.dir>.checkpoints
    every: int = Field(0, ge=0)  # steps; 0 = no intermediate checkpoints
    keep_last: int = Field(2, ge=1)


class OutputSection(_Section):
    dir: str
    overwrite: bool = False
    push_to_hub: str | None = None  # repo id
    private: bool = True
    dtype: Literal[DTYPES] | None = None  # weights of the export; default float32


class Recipe(_Section):
    model: ModelSection
    data: DataSection
    train: TrainSection
    lora: LoraSection = LoraSection()
    distill: DistillSection = DistillSection()
    eval: EvalSection = EvalSection()
    checkpoint: CheckpointSection = CheckpointSection()
    output: OutputSection

    @model_validator(mode="after")
    def _eval_set_names(self) -> Recipe:
        names = self.eval_set_names
        _check_unique(names, "held-out sets (training components' tails and eval.sets)")
        if self.eval.primary is not None and self.eval.primary not in names:
            raise ValueError(f"eval.primary {self.eval.primary!r} is not a held-out set: choose one of {', '.join(names)}")
        return self

    @property
    def eval_set_names(self) -> list[str]:
        """Every held-out set, in evaluation order: the training data's (each component's tail, or the
        single corpus's tail / ``data.eval``), then ``eval.sets``. A streamed corpus without ``data.eval``
        has none of its own."""
        d = self.data
        if d.mixture:
            own = [c.name for c in d.components]
        else:
            own = [] if d.streamed and d.eval is None else [HELDOUT_SET]
        return own + [s.name for s in self.eval.sets]

    @property
    def primary_eval_set(self) -> str | None:
        names = self.eval_set_names
        return self.eval.primary or (names[0] if names else None)

    @property
    def eval_seq_len(self) -> int:
        """The eval window: ``eval.seq_len``, else ``data.seq_len``. A held-out set needs at least one."""
        return self.eval.seq_len or self.data.seq_len

    @model_validator(mode="after")
    def _held_out_sets_fill_a_window(self) -> Recipe:
        """The held-out sizes known now each hold one eval window (the data's own size is checked once read)."""
        window, d = self.eval_seq_len, self.data
        sizes = [("eval.max_tokens", self.eval.max_tokens)]
        sizes += [(f"eval.sets.{i}.max_tokens", s.max_tokens) for i, s in enumerate(self.eval.sets)]
        if not (d.mixture and all(c.heldout_tokens for c in d.components)):  # else no component uses it
            sizes.append(("data.heldout_tokens", d.heldout_tokens))
        if d.mixture:
            sizes += [(f"data.train.{i}.heldout_tokens", c.heldout_tokens) for i, c in enumerate(d.components)]
        for key, size in sizes:
            if size is not None and size < window:
                raise ValueError(f"{key} {size} is less than one eval window of {window} tokens (eval.seq_len, else "
                                 f"data.seq_len): raise {key} to at least {window}, or lower eval.seq_len.")
        return self

    @model_validator(mode="after")
    def _warmup_within_the_run(self) -> Recipe:
        warmup = self.train.warmup_steps
        if warmup is not None and warmup > self.total_steps:
            raise ValueError(
                f"train.warmup_steps {warmup} is longer than the run ({self.total_steps} steps): "
                "lower it, or use train.warmup_fraction."
            )
        return self

    @model_validator(mode="after")
    def _freeze_within_the_run(self) -> Recipe:
        frozen = self.train.freeze_pretrained_steps
        if frozen > self.total_steps:
            raise ValueError(
                f"train.freeze_pretrained_steps {frozen} is longer than the run ({self.total_steps} steps): lower it "
                f"(set it to {self.total_steps} to train only the new modules and norms for the whole run)."
            )
        return self

    @property
    def total_steps(self) -> int:
        """Optimizer steps of the run: ``train.max_steps``, or ``train.max_tokens`` in whole global batches."""
        t = self.train
        return t.max_steps or math.ceil(t.max_tokens / (t.batch_size * self.data.seq_len))

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir or f"{self.output.dir.rstrip('/')}.checkpoints").expanduser()

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read ``path``, apply ``key.sub=value`` overrides, validate. Raises :class:`RecipeError`."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"no such recipe file: {path}")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader) or {}
    except yaml.YAMLError as err:
        raise RecipeError(f"{path} is not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise RecipeError(f"{path} must hold a mapping of sections (model, data, train, ...).")
    for item in overrides:
        apply_override(raw, item)
    recipe = validate(raw, str(path))
    warn_long_intervals(recipe)
    return recipe


def apply_override(raw: dict, item: str) -> None:
    """``train.lr=1e-4`` -> raw["train"]["lr"] = 1e-4 (the value is parsed as YAML)."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise RecipeError(f"--set {item!r}: use --set section.key=value, e.g. --set train.lr=1e-4")
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise RecipeError(f"--set {item!r}: {part} is not a section")
        node = child
    node[parts[-1]] = yaml.load(value, Loader=_Loader) if value else None


def validate(raw: dict, where: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as err:
        errors = _matching_branch(err.errors(), raw)
        raise RecipeError(f"{where}: " + "; ".join(dict.fromkeys(_explain(e) for e in errors))) from None


def warn_long_intervals(recipe: Recipe) -> None:
    """Eval and checkpoint intervals longer than the run are allowed (the run still evaluates at its start
    and end) but are likely a budget lowered without them: say so before any work."""
    steps = recipe.total_steps
    if recipe.eval.every > steps:
        logger.warning("eval.every %d is longer than the run (%d steps): the model is evaluated only at the "
                       "start and the end. Lower eval.every, or set it to 0 to say so.", recipe.eval.every, steps)
    if recipe.checkpoint.every > steps:
        logger.warning("checkpoint.every %d is longer than the run (%d steps): no intermediate checkpoint is "
                       "written. Lower checkpoint.every, or set it to 0 to say so.", recipe.checkpoint.every, steps)


def _is_branch(part: Any) -> bool:
    """A union member's tag in an error location (``str``, ``list[TrainComponent]``), not a key."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool") or "[" in part)


def _matching_branch(errors: list[dict], raw: Any) -> list[dict]:
    """Of a union's errors, those of the member matching the value's kind (a list is not "not a string")."""
    kept = []
    for error in errors:
        loc = list(error["loc"])
        branch = next((i for i, part in enumerate(loc) if _is_branch(part)), None)
        if branch is not None:
            value = raw
            for part in loc[:branch]:
                value = value.get(part) if isinstance(value, dict) else None
            if (loc[branch] == "str") == isinstance(value, list):  # neither: the string's error says it
                continue
        kept.append(error)
    return kept or errors


def _explain(error: dict) -> str:
    loc = [str(p) for p in error["loc"] if not _is_branch(p)]
    key = ".".join(loc) or "recipe"
    if error["type"] == "extra_forbidden":
        valid = _fields_at(loc[:-1])
        close = difflib.get_close_matches(loc[-1], valid, n=1)
        hint = f" (did you mean {'.'.join([*loc[:-1], close[0]])}?)" if close else f" (valid: {', '.join(valid)})"
        return f"unknown key {key}{hint}"
    if error["type"] == "missing":
        return f"missing required key {key}"
    message = error["msg"].removeprefix("Value error, ")
    return f"{key}: {message}" if loc else message


def _fields_at(loc: list[str]) -> list[str]:
    model: Any = Recipe
    for part in loc:
        if part.isdigit():  # an index into a list of sections
            continue
        field = model.model_fields.get(part)
        model = _section_in(field.annotation) if field is not None else None
        if model is None:
            return []
    return list(model.model_fields)


def _section_in(annotation: Any) -> type[BaseModel] | None:
    """The section model a field holds, itself or inside a list or a union (``str | list[TrainComponent]``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _section_in(arg)
        if found is not None:
            return found
    return None
