"""The uptraining recipe: a plain loop on accelerate, readable top to bottom.

:func:`uptrain` is the whole run. :func:`setup` checks everything that needs no weights, then builds
one :class:`Run` (model, teacher, data, optimizer, scheduler, accelerator, state); each step is
:func:`train_step`, with :func:`evaluate` and :func:`save_checkpoint` on their schedules; :func:`export`
writes the model folder at the end.

``accelerate launch`` (or torchrun) decides the hardware: one CPU, one GPU, DDP, FSDP, DeepSpeed.
Every process builds the same global batch for a step and trains on its own slice of it, so losses
are normalised by the global number of scored tokens and the result does not depend on the number of
processes. Only the main process writes files.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from .. import environment
from ..sources import Source
from ..errors import BlockTransformerError
from ..export import add_uptrain_row, save_model_folder, write_text_atomic
from ..measure.perplexity import score
from ..modeling import BlockTransformerForCausalLM
from . import checkpoint
from .build import apply_lora, count_parameters, exportable_model, load_model, load_teacher, lr_lambdas, parameter_groups
from .data import Batch, HeldOut, LocalData, StreamingData, heldout_sets, load_local
from .losses import RecoveryLoss, teacher_dtype
from .preflight import check_before_work, check_output_dir, micro_batch_size
from .recipe import HELDOUT_SET, Recipe, RecipeError, validate

logger = logging.getLogger(__name__)

__all__ = ["Run", "StepResult", "TrainerState", "TrainingError", "evaluate", "export", "save_checkpoint", "save_uptrained",
           "setup", "train_step", "uptrain"]

METRICS_FILE = "metrics.jsonl"
RECIPE_FILE = "uptraining_recipe.yaml"
SUMMARY_FILE = "uptraining_summary.json"
EXPORTED_METRICS_FILE = "uptraining_metrics.jsonl"


class TrainingError(BlockTransformerError):
    """The run cannot go on (non-finite loss); the last good checkpoint is kept."""


@dataclass
class TrainerState:
    """What a checkpoint records beside accelerate's own state (``trainer_state.json``)."""

    step: int = 0
    tokens: int = 0
    evals: list[dict] = field(default_factory=list)
    references: dict | None = None  # the source model on every held-out set, by name: once per run
    data: dict | None = None  # the streamed data's position
    recipe: str = ""  # the recipe the run was started with; a resumed run warns when it differs


@dataclass
class Run:
    """One uptraining run: built by :func:`setup`, advanced by :func:`train_step`."""

    recipe: Recipe
    recipe_name: str  # how the summary and the card name the recipe
    accelerator: Accelerator
    model: nn.Module  # what trains: peft-wrapped with LoRA, then prepared by accelerate (DDP, FSDP, ...)
    plain: BlockTransformerForCausalLM  # the same model unwrapped: its config, layers and export
    tokenizer: PreTrainedTokenizerBase
    loss: RecoveryLoss  # holds the frozen teacher when a distillation term needs it
    data: LocalData | StreamingData
    eval_sets: list[HeldOut]  # every held-out set, scored at each evaluation (at least one)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    state: TrainerState
    total_steps: int
    micro_batch_size: int  # sequences per process per forward
    parameters: dict[str, int]
    checkpointed_step: int | None = None  # the step of the last checkpoint this run saved or resumed from

    @property
    def primary(self) -> HeldOut:
        """The held-out set reported as ``eval_ppl`` (the card's and the summary's figure)."""
        return _primary(self.recipe, self.eval_sets)

    @property
    def metrics_path(self) -> Path:
        return self.recipe.checkpoint_dir / METRICS_FILE

    @property
    def tokens_per_step(self) -> int:
        return self.recipe.train.batch_size * self.recipe.data.seq_len


@dataclass(frozen=True)
class StepResult:
    """One optimizer step's loss terms (over the whole global batch) and gradient norm before clipping."""

    loss: float
    ce: float
    kl: float
    hidden: float
    grad_norm: float | None


def uptrain(recipe: Recipe, resume: str | None = None, recipe_name: str = "recipe") -> Path:
    """Run ``recipe`` (optionally resuming a checkpoint) and export the trained model folder.

    The main process holds the lock of the checkpoint folder throughout, so a second run into the same
    folders fails before it checks or loads anything. The last step is always checkpointed before the
    export, so a run whose export failed (or a finished one, with ``output.overwrite``) resumes
    straight to the export instead of training again.
    """
    main = int(os.environ.get("RANK", "0")) == 0  # before accelerate is set up: torchrun and accelerate set RANK
    with checkpoint.run_lock(recipe.checkpoint_dir) if main else contextlib.nullcontext():
        return _uptrain(recipe, resume, recipe_name)


def _uptrain(recipe: Recipe, resume: str | None, recipe_name: str) -> Path:
    run = setup(recipe, resume, recipe_name)
    if run.state.step == 0:
        evaluate(run)
    progress = tqdm(total=run.total_steps, initial=run.state.step, desc="uptrain", unit="step",
                    disable=not run.accelerator.is_local_main_process)
    window_time, window_tokens = 0.0, 0  # training time only: evals and checkpoints are not in tokens/s
    run.model.train()
    while run.state.step < run.total_steps:
        started = time.perf_counter()
        result = train_step(run, next_batch(run))
        window_time += time.perf_counter() - started
        window_tokens += run.tokens_per_step
        progress.update(1)
        step = run.state.step
        if step % recipe.train.log_every == 0 or step == run.total_steps:
            record = log_step(run, result, tokens_per_s=window_tokens / window_time)
            progress.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
            window_time, window_tokens = 0.0, 0
        if _due(recipe.eval.every, run):
            evaluate(run)
        if _due(recipe.checkpoint.every, run):
            save_checkpoint(run)
    progress.close()
    if not run.state.evals or run.state.evals[-1]["step"] != run.state.step:
        evaluate(run)
    if run.checkpointed_step != run.state.step:
        save_checkpoint(run)
    out = export(run)
    if recipe.train.report_to:
        run.accelerator.end_training()
    return out


def check_requested_backend(accelerator: Accelerator | None) -> None:
    """accelerate falls back without a word when FSDP or DeepSpeed cannot run on this hardware (on CPU
    processes it sets up plain DDP): a run the user asked to shard must not silently run unsharded. Called
    before the Accelerator exists too (None): without a GPU the answer is known, and accelerate would
    otherwise first fail with a traceback when DeepSpeed is not installed."""
    for backend in ("FSDP", "DEEPSPEED"):
        requested = os.environ.get(f"ACCELERATE_USE_{backend}", "false").lower() in {"1", "true", "yes"}
        if not requested:
            continue
        if accelerator is None and not torch.cuda.is_available():
            raise RecipeError(f"the launch asked for {backend} on a machine without a GPU: {backend} needs GPUs "
                              "(on CPU processes accelerate would run plain DDP). Launch without it, or on GPUs.")
        if accelerator is not None and accelerator.distributed_type.name != backend:
            raise RecipeError(
                f"the launch asked for {backend} but accelerate set up {accelerator.distributed_type.name} on this "
                f"hardware ({accelerator.device}): {backend} needs GPUs. Launch without it, or on GPUs."
            )


def setup(recipe: Recipe, resume: str | None = None, recipe_name: str = "recipe") -> Run:
    """Check everything that needs no weights, then load and build the run: fresh, or restored from ``resume``."""
    blueprint = check_before_work(recipe, resume)
    check_requested_backend(None)
    accelerator = Accelerator(
        # several processes without a GPU (torchrun on CPU): accelerate only sets up gloo when told "cpu"
        cpu=not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1,
        mixed_precision=mixed_precision(recipe),
        log_with=list(recipe.train.report_to) or None,
        project_dir=str(recipe.checkpoint_dir),
    )
    check_requested_backend(accelerator)
    set_seed(recipe.train.seed)
    micro = micro_batch_size(recipe, accelerator.num_processes)
    # set before prepare(): DeepSpeed reads it into its config and steps on its own boundaries
    accelerator.gradient_accumulation_steps = recipe.train.batch_size // (micro * accelerator.num_processes)
    steps = recipe.total_steps

    block_len = blueprint.config.block_len
    # the data before the model: a held-out set too short to score fails before any conversion
    data, eval_sets = _load_data(recipe, blueprint.tokenizer, blueprint.separator_id, block_len)
    plain, tokenizer = load_model(recipe, blueprint)
    resume_path = blueprint.resume_path
    # the source is scored once per run: a resumed run reuses the checkpoint's figures
    references = _saved_references(checkpoint.read_state(resume_path)) if resume_path else {}
    teacher, references = _teacher_and_reference(recipe, blueprint.teacher, references, eval_sets, block_len,
                                                 accelerator.device)

    model = _trainable(plain, recipe)
    parameters = count_parameters(model)
    logger.info("parameters: %s", ", ".join(f"{k} {v:,}" for k, v in parameters.items()))
    groups = parameter_groups(model, recipe)
    t = recipe.train
    optimizer = torch.optim.AdamW(groups, lr=t.lr, betas=t.betas, eps=t.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambdas(groups, recipe, steps))
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)

    run = Run(
        recipe=recipe, recipe_name=recipe_name, accelerator=accelerator, model=model, plain=plain,
        tokenizer=tokenizer, loss=RecoveryLoss(recipe.distill, plain, teacher, blueprint.hidden_layers,
                                               teacher_dtype(accelerator.device, recipe.distill.teacher_dtype)),
        data=data, eval_sets=eval_sets, optimizer=optimizer, scheduler=scheduler,
        state=TrainerState(references=references or None, recipe=recipe.to_yaml()), total_steps=steps,
        micro_batch_size=micro, parameters=parameters,
    )
    if resume_path is not None:
        _restore(run, resume_path)
    _open_metrics(run)
    return run


def next_batch(run: Run) -> Batch:
    """The global batch of the next step (every process builds the same one)."""
    t = run.recipe.train
    if isinstance(run.data, LocalData):
        return run.data.batch_for_step(run.state.step, t.batch_size, t.seed)
    return run.data.next_sequences(t.batch_size)


def train_step(run: Run, batch: Batch) -> StepResult:
    """One optimizer step on the global ``batch``: this process's slice, in micro-batches, then the update.

    Raises :class:`TrainingError`, without applying the update, when the loss or the gradient norm is
    not finite.
    """
    accelerator, world = run.accelerator, run.accelerator.num_processes
    ce_items, align_items = run.loss.normalisers(batch.labels)
    per_rank = batch.input_ids.shape[0] // world
    rows = slice(accelerator.process_index * per_rank, (accelerator.process_index + 1) * per_rank)
    mine = Batch(batch.input_ids[rows], batch.labels[rows]).to(accelerator.device)
    chunks = list(zip(mine.input_ids.split(run.micro_batch_size), mine.labels.split(run.micro_batch_size)))
    sums = torch.zeros(4, device=accelerator.device)  # total, ce, kl, hidden (each already normalised)
    for input_ids, labels in chunks:
        with accelerator.accumulate(run.model):  # gradients are synchronised on the last micro-batch only
            losses = run.loss(run.model, input_ids, labels, ce_items / world, align_items / world,
                              autocast=accelerator.autocast)
            # losses are already normalised by the step's global counts: undo backward()'s 1/accumulation
            accelerator.backward(losses.total * len(chunks))
        sums += losses.stacked()
    sums = accelerator.reduce(sums, reduction="sum")
    max_norm = run.recipe.train.max_grad_norm
    grad_norm = accelerator.clip_grad_norm_(run.model.parameters(), max_norm) if max_norm else None
    if not bool(torch.isfinite(sums).all()) or (grad_norm is not None and not math.isfinite(float(grad_norm))):
        kept = checkpoint.checkpoints(run.recipe.checkpoint_dir)
        raise TrainingError(
            f"the loss became {float(sums[0]):.4g} (gradient norm {float(grad_norm or 0):.4g}) at step "
            f"{run.state.step + 1}: stopped without applying it. Last good checkpoint: {kept[-1] if kept else 'none'}. "
            "Lower train.lr, keep train.max_grad_norm set, or use train.mixed_precision=bf16 instead of fp16."
        )
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.state.step += 1
    run.state.tokens += run.tokens_per_step
    total, ce, kl, hidden = (float(x) for x in sums)
    return StepResult(total, ce, kl, hidden, grad_norm=float(grad_norm) if grad_norm is not None else None)


def log_step(run: Run, result: StepResult, tokens_per_s: float) -> dict:
    """Record the step just taken in the metrics file and the trackers."""
    step = run.state.step
    record = {"step": step, "tokens": run.state.tokens, "loss": result.loss, "ce": result.ce, "kl": result.kl,
              "hidden": result.hidden, "lr": run.recipe.train.lr * run.scheduler.lr_lambdas[-1](step - 1),
              "grad_norm": result.grad_norm, "tokens_per_s": tokens_per_s}
    _log(run, record)
    return record


def evaluate(run: Run) -> dict:
    """Held-out perplexity of the model now on every held-out set: kept in the state (so in checkpoints)
    and in the metrics. ``eval_*`` are the primary set's; ``sets`` has each set's loss and perplexity."""
    state, block_len = run.state, run.plain.config.block_len
    scores = {held.name: _score(run.model, held.ids, run.recipe, block_len, held.name) for held in run.eval_sets}
    result = scores[run.primary.name]
    record = {"step": state.step, "tokens": state.tokens, "eval_loss": result["loss"],
              "eval_ppl": result["perplexity"], "eval_loss_by_block_position": result["loss_by_block_position"],
              "sets": {name: {"loss": r["loss"], "ppl": r["perplexity"]} for name, r in scores.items()}}
    state.evals.append(record)
    _log(run, record)
    logger.info("step %d, %s tokens: held-out perplexity %s", state.step, f"{state.tokens:,}",
                ", ".join(f"{name} {r['perplexity']:.4g}" for name, r in scores.items()))
    return record


def save_checkpoint(run: Run) -> Path:
    """Model, optimizer, scheduler, RNG and the trainer state (with the data position), written atomically."""
    if isinstance(run.data, StreamingData):
        run.state.data = run.data.state_dict()
    recipe = run.recipe
    path = checkpoint.save(run.accelerator, recipe.checkpoint_dir, run.state.step, asdict(run.state),
                           recipe.checkpoint.keep_last)
    run.checkpointed_step = run.state.step
    return path


def export(run: Run) -> Path:
    """Gather the trained weights and write the model folder (pushed to the hub if the recipe says so)."""
    recipe, accelerator = run.recipe, run.accelerator
    replicas = _check_replicas_agree(accelerator, run.model)
    out = Path(recipe.output.dir).expanduser()
    full_state = accelerator.get_state_dict(run.model)
    if accelerator.is_main_process:
        check_output_dir(recipe)  # checked at start too: this is for a folder made since, in the recipe's terms
        model = exportable_model(run.plain.config, full_state, recipe)
        save_uptrained(model, run.tokenizer, out, recipe, summary(run, replicas), run.metrics_path)
        if recipe.output.push_to_hub:
            from ..hub import push_folder

            logger.info("pushed: %s", push_folder(out, recipe.output.push_to_hub, private=recipe.output.private))
    accelerator.wait_for_everyone()
    return out


def save_uptrained(model: BlockTransformerForCausalLM, tokenizer: PreTrainedTokenizerBase, out: Path, recipe: Recipe, summary: dict,
                   metrics_path: Path) -> Path:
    """The model folder, plus how it was made: recipe, summary, metrics, and a row in the card's uptraining table."""
    def finalize(folder: Path) -> None:
        (folder / RECIPE_FILE).write_text(recipe.to_yaml())
        (folder / SUMMARY_FILE).write_text(json.dumps(summary, indent=1))
        if metrics_path.is_file():
            shutil.copyfile(metrics_path, folder / EXPORTED_METRICS_FILE)
        add_uptrain_row(folder, summary)

    save_model_folder(model, tokenizer, out, overwrite=recipe.output.overwrite, finalize=finalize, uptraining=summary)
    logger.info("saved %s", out)
    return out


def summary(run: Run, replicas_checked: int) -> dict:
    """``uptraining_summary.json``: what was trained, how far, the figures, and on what."""
    state, evals, primary = run.state, run.state.evals, run.primary
    return {
        "recipe": run.recipe_name,
        "method": _method(run.recipe),
        "teacher_dtype": None if run.loss.teacher is None else str(next(run.loss.teacher.parameters()).dtype).removeprefix("torch."),
        "steps": state.step,
        "tokens": state.tokens,
        "eval_region": primary.region,
        "step0_ppl": evals[0]["eval_ppl"] if evals and evals[0]["step"] == 0 else None,
        "final_ppl": evals[-1]["eval_ppl"] if evals else None,
        "source_ppl": ((state.references or {}).get(primary.name) or {}).get("perplexity"),
        "primary_eval_set": primary.name,
        "eval_sets": eval_sets_summary(run),
        "parameters": run.parameters,
        "num_processes": run.accelerator.num_processes,
        "replicas_checked": replicas_checked,
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "environment": environment.describe(str(run.accelerator.device)),
    }


def eval_sets_summary(run: Run) -> dict:
    """Per held-out set: where it comes from, its size, the perplexity at step 0 and at the end, the source's,
    and the ratios to the source's (the recovery figure)."""
    evals, references = run.state.evals, run.state.references or {}
    first = evals[0] if evals and evals[0]["step"] == 0 else None
    out = {}
    for held in run.eval_sets:
        step0 = (first or {}).get("sets", {}).get(held.name, {}).get("ppl")
        final = evals[-1].get("sets", {}).get(held.name, {}).get("ppl") if evals else None
        source = (references.get(held.name) or {}).get("perplexity")
        out[held.name] = {
            "region": held.region, "tokens": int(held.ids.numel()), "step0_ppl": step0, "final_ppl": final,
            "source_ppl": source,
            "step0_ratio": step0 / source if step0 is not None and source else None,
            "final_ratio": final / source if final is not None and source else None,
        }
    return out


def mixed_precision(recipe: Recipe) -> str:
    choice = recipe.train.mixed_precision
    if choice != "auto":
        return choice
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


# ----------------------------------------------------------------------------------------------------
# Pieces of setup
# ----------------------------------------------------------------------------------------------------


def _load_data(recipe: Recipe, tokenizer: PreTrainedTokenizerBase, separator_id: int,
               block_len: int) -> tuple[LocalData | StreamingData, list[HeldOut]]:
    """Training data, and every held-out set (each at most its ``max_tokens``) with where it comes from."""
    d = recipe.data
    if d.streamed:
        data: LocalData | StreamingData = StreamingData(d, tokenizer, separator_id, block_len, recipe.train.seed)
        sets = heldout_sets(recipe, None, tokenizer, separator_id)
    else:
        data = load_local(d, tokenizer, separator_id, block_len, recipe.eval.max_tokens)
        sets = heldout_sets(recipe, data, tokenizer, separator_id)
    return data, sets


def _primary(recipe: Recipe, sets: list[HeldOut]) -> HeldOut:
    """The held-out set reported as ``eval_ppl``: ``eval.primary``, else the first."""
    return next((h for h in sets if h.name == recipe.eval.primary), sets[0])


def _saved_references(state: dict) -> dict:
    """The source's scores a checkpoint recorded, by set. A checkpoint from before named sets has one figure,
    on its training data's held-out set: the set named ``held-out`` now (not whatever set is primary now)."""
    if state.get("references"):
        return dict(state["references"])
    return {HELDOUT_SET: state["reference"]} if state.get("reference") else {}


def _teacher_and_reference(recipe: Recipe, source: Source | None, references: dict, eval_sets: list[HeldOut], block_len: int,
                           device: torch.device) -> tuple[nn.Module | None, dict]:
    """The frozen source model when a distillation term needs it, and its score on every held-out set
    (``references``, by name; sets already scored are not scored again).

    The source is loaded to score it even when no term needs it, then dropped.
    """
    dist = recipe.distill
    missing = [h for h in eval_sets if h.name not in references] if recipe.eval.source_reference else []
    if source is None or not (dist.needs_teacher or missing):
        return None, references
    teacher = load_teacher(source).to(device)
    references = dict(references)
    for held in missing:
        references[held.name] = _score(teacher, held.ids, recipe, block_len, f"source: {source.name} on {held.name}")
    return (teacher if dist.needs_teacher else None), references


def _trainable(model: BlockTransformerForCausalLM, recipe: Recipe) -> nn.Module:
    """Gradient checkpointing and LoRA, as the recipe asks."""
    if recipe.train.gradient_checkpointing:
        for decoder in (model.block_decoder, model.token_decoder):
            # transformers >= 5.2x renames it (the old name warns); earlier 5.x only has the old one
            enable = getattr(decoder, "activation_checkpointing_enable", None) or decoder.gradient_checkpointing_enable
            enable()
    return apply_lora(model, recipe) if recipe.lora.enabled else model


def _restore(run: Run, path: Path) -> None:
    """Model, optimizer, scheduler and RNG in place, and the trainer state, from checkpoint ``path``."""
    loaded = checkpoint.load(run.accelerator, path)
    changes = recipe_changes(loaded.get("recipe") or "", run.recipe)
    if changes:
        logger.warning("the recipe differs from the one the checkpoint was made with, in %s: the resumed run is not "
                       "exactly the run it continues", "; ".join(changes))
    run.checkpointed_step = loaded["step"]
    state = run.state
    state.step, state.tokens, state.evals, state.data = (loaded[k] for k in ("step", "tokens", "evals", "data"))
    if isinstance(run.data, StreamingData) and state.data is not None:
        run.data.load_state_dict(state.data)
    logger.info("resumed from %s at step %d (%s tokens)", path, state.step, f"{state.tokens:,}")


# where things are written and how often: a resumed run that changes these still trains the same weights
# and what is evaluated: the held-out sets, which is primary, how much of each
_NO_EFFECT = ("output.", "checkpoint.", "train.log_every", "train.report_to", "eval.every", "eval.sets", "eval.primary",
              "eval.max_tokens")


def recipe_changes(saved: str, recipe: Recipe) -> list[str]:
    """The fields (``train.lr: 0.0003 -> 0.0001``) where ``recipe`` differs from the ``saved`` one in a
    way that changes the result; where things are written, logged, evaluated and checkpointed is not."""
    if not saved:
        return []
    raw = yaml.safe_load(saved)
    try:
        raw = validate(raw).model_dump(mode="json")  # fields added since read as their defaults
    except RecipeError:
        pass
    old, new = _flat(raw), _flat(recipe.model_dump(mode="json"))
    return [f"{key}: {old.get(key, '(unset)')} -> {new.get(key, '(unset)')}" for key in sorted(old.keys() | new.keys())
            if old.get(key) != new.get(key) and not key.startswith(_NO_EFFECT)]


def _open_metrics(run: Run) -> None:
    """The metrics file (cut back to the resumed step: later records are about to be recomputed) and trackers."""
    if run.accelerator.is_main_process:
        run.recipe.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        path = run.metrics_path
        if path.is_file():
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= run.state.step]
            write_text_atomic(path, "".join(line + "\n" for line in kept))
    if run.recipe.train.report_to:
        run.accelerator.init_trackers("block-transformer", config=_flat(run.recipe.model_dump(mode="json")))


# ----------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------


def _due(every: int, run: Run) -> bool:
    """An intermediate evaluation or checkpoint is due now (the end of the run has its own)."""
    return bool(every) and run.state.step % every == 0 and run.state.step < run.total_steps


def _score(model: nn.Module, eval_ids: torch.Tensor, recipe: Recipe, block_len: int, desc: str) -> dict:
    return score(model, eval_ids, recipe.eval_seq_len, batch_size=recipe.eval.batch_size, block_len=block_len, desc=desc).to_dict()


def _log(run: Run, record: dict) -> None:
    if run.accelerator.is_main_process:
        with run.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
    if run.recipe.train.report_to:
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float))}
        scalars.update({f"eval_ppl/{name}": r["ppl"] for name, r in record.get("sets", {}).items()})
        run.accelerator.log(scalars, step=record["step"])


def _check_replicas_agree(accelerator: Accelerator, model: nn.Module) -> int:
    """Data-parallel replicas must end identical; returns how many were compared (1 = nothing to compare)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type not in (DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        return 1
    with torch.no_grad():
        digest = torch.stack([torch.stack([p.double().sum(), p.double().abs().sum()]) for p in model.parameters()])
    digests = accelerator.gather(digest.unsqueeze(0))
    if not all(torch.equal(digests[0], d) for d in digests[1:]):
        raise TrainingError("the data-parallel processes ended with different weights: the run is not usable.")
    return int(digests.shape[0])


def _flat(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flat(value, name + "."))
        else:
            flat[name] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def _method(recipe: Recipe) -> str:
    dist = recipe.distill
    parts = [f"CE x{dist.ce_weight:g}"] if dist.ce_weight else []
    if dist.kl_weight:
        parts.append(f"KL x{dist.kl_weight:g} (T={dist.temperature:g})")
    if dist.hidden_weight:
        parts.append(f"hidden alignment x{dist.hidden_weight:g}")
    if recipe.lora.enabled:
        parts.append(f"LoRA r={recipe.lora.r} (merged)")
    return " + ".join(parts)
