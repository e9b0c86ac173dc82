"""The uptraining loop: plain, on accelerate, readable top to bottom.

``accelerate launch`` (or torchrun) decides the hardware: one CPU, one GPU, DDP, FSDP, DeepSpeed.
Every process builds the same global batch for a step and trains on its own slice of it, so losses
are normalised by the global number of scored tokens and the result does not depend on the number of
processes. Only the main process writes files.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import logging
import math
import os
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from .. import __version__
from ..errors import BlockTransformerError
from ..export import add_uptrain_row, check_output, save_model_folder, write_text_atomic
from ..measure.evaluation import hardware
from ..measure.perplexity import score
from . import checkpoint
from .build import (
    apply_lora,
    count_parameters,
    decoder_layers,
    family_of,
    load_model,
    load_teacher,
    lr_lambdas,
    parameter_groups,
)
from .data import Batch, LocalData, StreamingData, explicit_eval_ids, load_local
from .losses import alignment_mask, alignment_sum, capture_outputs, kl_sum, scored_targets, token_decoder_states
from .recipe import Recipe, RecipeError

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
_TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


class TrainingError(BlockTransformerError):
    """The run cannot go on (non-finite loss); the last good checkpoint is kept."""


def total_steps(recipe: Recipe) -> int:
    t = recipe.train
    return t.max_steps or math.ceil(t.max_tokens / (t.batch_size * recipe.data.seq_len))


def micro_batch_size(recipe: Recipe, world_size: int) -> int:
    t = recipe.train
    micro = t.micro_batch_size or t.batch_size // world_size
    if micro == 0 or t.batch_size % (micro * world_size):
        raise RecipeError(
            f"train.batch_size {t.batch_size} must be a multiple of train.micro_batch_size ({micro}) x "
            f"{world_size} processes: change one of them."
        )
    return micro


def mixed_precision(recipe: Recipe) -> str:
    choice = recipe.train.mixed_precision
    if choice != "auto":
        return choice
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def check_before_work(recipe: Recipe, resume: str | None) -> None:
    """Everything cheap that could fail later: data paths, output folder, push credentials."""
    from ..data_spec import DataSpec

    DataSpec.parse(recipe.data.train, recipe.data.text_field)
    if recipe.data.eval:
        DataSpec.parse(recipe.data.eval, recipe.data.text_field)
    if resume is None and not recipe.output.overwrite:
        check_output(Path(recipe.output.dir).expanduser(), overwrite=False)
    if resume is None and checkpoint.checkpoints(recipe.checkpoint_dir):
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


def uptrain(recipe: Recipe, resume: str | None = None, recipe_name: str = "recipe") -> Path:
    """Run ``recipe`` (optionally resuming a checkpoint) and export the trained model folder."""
    check_before_work(recipe, resume)
    t, d = recipe.train, recipe.data
    accelerator = Accelerator(
        # several processes without a GPU (torchrun on CPU): accelerate only sets up gloo when told "cpu"
        cpu=not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1,
        mixed_precision=mixed_precision(recipe),
        log_with=list(t.report_to) or None,
        project_dir=str(recipe.checkpoint_dir),
    )
    set_seed(t.seed)
    micro = micro_batch_size(recipe, accelerator.num_processes)
    # set before prepare(): DeepSpeed reads it into its config and steps on its own boundaries
    accelerator.gradient_accumulation_steps = t.batch_size // (micro * accelerator.num_processes)
    steps = total_steps(recipe)

    # --- model, data, teacher ------------------------------------------------------------------------
    model, tokenizer, source = load_model(recipe)
    cfg = model.config
    block_len, num_prefix = cfg.block_len, cfg.num_prefix_tokens
    if d.seq_len % block_len:
        raise RecipeError(f"data.seq_len {d.seq_len} is not a multiple of the model's block length {block_len}.")
    family = family_of(model)
    separator_id = _separator_id(recipe, tokenizer, cfg)
    streaming = d.streaming if d.streaming is not None else not _is_local(d.train)
    eval_seq_len = recipe.eval.seq_len or d.seq_len
    if streaming:
        data: LocalData | StreamingData = StreamingData(d, tokenizer, separator_id, block_len, t.seed)
        eval_ids, eval_region = explicit_eval_ids(d, tokenizer, separator_id, recipe.eval.max_tokens)
    else:
        data = load_local(d, tokenizer, separator_id, block_len, recipe.eval.max_tokens)
        eval_ids, eval_region = data.eval_ids, data.eval_region
    eval_ids = eval_ids[: recipe.eval.max_tokens]

    ckpt_root = recipe.checkpoint_dir
    resume_path = checkpoint.resolve(resume, ckpt_root) if resume is not None else None
    reference = checkpoint.read_state(resume_path).get("reference") if resume_path else None  # scored once per run
    dist = recipe.distill
    wants_reference = recipe.eval.source_reference and reference is None
    teacher = load_teacher(source).to(accelerator.device) if source is not None and (
        dist.needs_teacher or wants_reference) else None
    if dist.needs_teacher and teacher is None:
        raise RecipeError("distillation needs a teacher: set distill.teacher to the source model.")
    if teacher is not None and wants_reference:
        reference = _evaluate(teacher, eval_ids, eval_seq_len, recipe, block_len, f"source: {source.name}")
    if not dist.needs_teacher:
        teacher = None

    if t.gradient_checkpointing:
        model.block_decoder.gradient_checkpointing_enable()
        model.token_decoder.gradient_checkpointing_enable()
    plain = model
    if recipe.lora.enabled:
        model = apply_lora(model, recipe)
    params = count_parameters(model)
    logger.info("parameters: %s", ", ".join(f"{k} {v:,}" for k, v in params.items()))

    groups = parameter_groups(model, recipe)
    optimizer = torch.optim.AdamW(groups, lr=t.lr, betas=t.betas, eps=t.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambdas(groups, recipe, steps))
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)

    hidden_layers = _hidden_layers(recipe, cfg.token_decoder_config.num_hidden_layers)
    student_layers = {j: decoder_layers(plain.token_decoder, family)[j - 1] for j in hidden_layers}
    teacher_layers = {}
    if teacher is not None and hidden_layers:
        split_at = cfg.block_decoder_config.num_hidden_layers
        teacher_layers = {j: decoder_layers(teacher.base_model, family)[split_at + j - 1] for j in hidden_layers}

    # --- state: fresh or resumed ---------------------------------------------------------------------
    state = {"step": 0, "tokens": 0, "evals": [], "reference": reference, "data": None, "recipe": recipe.to_yaml()}
    if resume_path is not None:
        loaded = checkpoint.load(accelerator, resume_path)
        _warn_recipe_changes(loaded.get("recipe"), recipe)
        state.update({k: loaded[k] for k in ("step", "tokens", "evals", "data")})
        if isinstance(data, StreamingData) and state["data"] is not None:
            data.load_state_dict(state["data"])
        logger.info("resumed from %s at step %d (%s tokens)", resume_path, state["step"], f"{state['tokens']:,}")
    metrics_path = ckpt_root / METRICS_FILE
    if accelerator.is_main_process:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        _truncate_metrics(metrics_path, state["step"])
    if t.report_to:
        accelerator.init_trackers("block-transformer", config=_flat(recipe.model_dump(mode="json")))

    def log(record: dict) -> None:
        if accelerator.is_main_process:
            with metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        if t.report_to:
            accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record["step"])

    def evaluate_now() -> None:
        result = _evaluate(model, eval_ids, eval_seq_len, recipe, block_len, "held-out")
        record = {"step": state["step"], "tokens": state["tokens"], "eval_loss": result["loss"],
                  "eval_ppl": result["perplexity"], "eval_loss_by_block_position": result["loss_by_block_position"]}
        state["evals"].append(record)
        log(record)
        logger.info("step %d, %s tokens: held-out perplexity %.4g", state["step"], f"{state['tokens']:,}",
                    result["perplexity"])

    if state["step"] == 0:
        evaluate_now()

    # --- the loop ------------------------------------------------------------------------------------
    tokens_per_step = t.batch_size * d.seq_len
    rank, world = accelerator.process_index, accelerator.num_processes
    per_rank = t.batch_size // world
    progress = tqdm(total=steps, initial=state["step"], desc="uptrain", unit="step",
                    disable=not accelerator.is_local_main_process)
    model.train()
    window_time, window_tokens = 0.0, 0  # training time only: evals and checkpoints are not in tokens/s
    while state["step"] < steps:
        step = state["step"]
        step_start = time.perf_counter()
        batch = data.batch_for_step(step, t.batch_size, t.seed) if isinstance(data, LocalData) else \
            data.next_sequences(t.batch_size)
        ce_items = scored_targets(batch.labels).sum().clamp_min(1)
        align_items = alignment_mask(batch.labels, block_len, dist.align_prefix).sum().clamp_min(1) * max(1, len(hidden_layers))
        mine = Batch(batch.input_ids[rank * per_rank : (rank + 1) * per_rank],
                     batch.labels[rank * per_rank : (rank + 1) * per_rank]).to(accelerator.device)
        sums = torch.zeros(4, device=accelerator.device)  # total, ce, kl, hidden (each already normalised)
        chunks = list(zip(mine.input_ids.split(micro), mine.labels.split(micro)))
        for input_ids, labels in chunks:
            with accelerator.accumulate(model):  # gradients are synchronised on the last micro-batch only
                parts = _losses(model, teacher, input_ids, labels, recipe, student_layers, teacher_layers,
                                ce_items / world, align_items / world, block_len, num_prefix, accelerator)
                # losses are already normalised by the step's global counts: undo backward()'s 1/accumulation
                accelerator.backward(parts[0] * len(chunks))
            sums += torch.stack([p.detach().float() for p in parts])
        sums = accelerator.reduce(sums, reduction="sum")
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm) if t.max_grad_norm else None
        if not bool(torch.isfinite(sums).all()) or (grad_norm is not None and not math.isfinite(float(grad_norm))):
            kept = checkpoint.checkpoints(ckpt_root)
            raise TrainingError(
                f"the loss became {float(sums[0]):.4g} (gradient norm {float(grad_norm or 0):.4g}) at step {step + 1}: "
                f"stopped without applying it. Last good checkpoint: {kept[-1] if kept else 'none'}. "
                "Lower train.lr, keep train.max_grad_norm set, or use train.mixed_precision=bf16 instead of fp16."
            )
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] += 1
        state["tokens"] += tokens_per_step
        window_tokens += tokens_per_step
        window_time += time.perf_counter() - step_start
        progress.update(1)

        if state["step"] % t.log_every == 0 or state["step"] == steps:
            record = {"step": state["step"], "tokens": state["tokens"], "loss": float(sums[0]), "ce": float(sums[1]),
                      "kl": float(sums[2]), "hidden": float(sums[3]), "lr": t.lr * scheduler.lr_lambdas[-1](state["step"] - 1),
                      "grad_norm": float(grad_norm) if grad_norm is not None else None,
                      "tokens_per_s": window_tokens / window_time}
            log(record)
            progress.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
            window_time, window_tokens = 0.0, 0
        if recipe.eval.every and state["step"] % recipe.eval.every == 0 and state["step"] < steps:
            evaluate_now()
        if recipe.checkpoint.every and state["step"] % recipe.checkpoint.every == 0 and state["step"] < steps:
            if isinstance(data, StreamingData):
                state["data"] = data.state_dict()
            checkpoint.save(accelerator, ckpt_root, state["step"], state, recipe.checkpoint.keep_last)
    progress.close()
    if not state["evals"] or state["evals"][-1]["step"] != state["step"]:
        evaluate_now()

    # --- export --------------------------------------------------------------------------------------
    state["replicas_checked"] = _check_replicas_agree(accelerator, model)
    out = Path(recipe.output.dir).expanduser()
    full_state = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        final = _exportable(plain.config, full_state, recipe)
        summary = _summary(recipe, recipe_name, state, params, eval_region, accelerator)
        _export(final, tokenizer, out, recipe, summary, metrics_path)
        if recipe.output.push_to_hub:
            from ..hub import push_folder

            logger.info("pushed: %s", push_folder(out, recipe.output.push_to_hub, private=recipe.output.private))
    accelerator.wait_for_everyone()
    if t.report_to:
        accelerator.end_training()
    return out


def _losses(model, teacher, input_ids, labels, recipe, student_layers, teacher_layers, ce_items, align_items,
            block_len, num_prefix, accelerator) -> list[torch.Tensor]:
    """[total, ce, kl, hidden] for one micro-batch, each normalised by the global count it averages over."""
    dist = recipe.distill
    zero = torch.zeros((), device=input_ids.device)
    with capture_outputs(student_layers if teacher_layers else {}) as student_states:
        out = model(input_ids=input_ids, labels=labels, num_items_in_batch=ce_items, use_cache=False)
    ce, kl, hidden = out.loss, zero, zero
    if teacher is not None:
        with torch.no_grad(), accelerator.autocast(), capture_outputs(teacher_layers) as teacher_states:
            teacher_logits = teacher(input_ids=input_ids, use_cache=False).logits
        if dist.kl_weight:
            scored = scored_targets(labels)
            kl = kl_sum(out.logits[:, :-1], teacher_logits[:, :-1], scored, dist.temperature) / ce_items
        for j, layer_out in student_states.items():
            student = token_decoder_states(layer_out, input_ids.shape[0], input_ids.shape[1], block_len, num_prefix)
            err = alignment_sum(student, teacher_states[j], labels, block_len, dist.align_prefix)
            hidden = hidden + err / align_items
    total = dist.ce_weight * ce + dist.kl_weight * kl + dist.hidden_weight * hidden
    return [total, ce, kl, hidden]


def _check_replicas_agree(accelerator: Accelerator, model) -> int:
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


def _evaluate(model, eval_ids, seq_len, recipe, block_len, desc) -> dict:
    return score(model, eval_ids, seq_len, batch_size=recipe.eval.batch_size, block_len=block_len, desc=desc).to_dict()


def _hidden_layers(recipe: Recipe, num_token_layers: int) -> list[int]:
    dist = recipe.distill
    if not dist.hidden_weight:
        return []
    layers = list(range(1, num_token_layers + 1)) if dist.hidden_layers == "all" else list(dist.hidden_layers)
    bad = [j for j in layers if not 1 <= j <= num_token_layers]
    if bad:
        raise RecipeError(f"distill.hidden_layers {bad} out of range: the token decoder has layers 1..{num_token_layers}.")
    return layers


def _separator_id(recipe: Recipe, tokenizer, cfg) -> int:
    token = recipe.data.separator
    if token is None:
        recorded = (cfg.conversion or {}).get("separator_id")
        if recorded is None:
            raise RecipeError("the model records no document separator: set data.separator to a token.")
        return int(recorded)
    token_id = tokenizer.get_vocab().get(token)
    if token_id is None:
        raise RecipeError(f"data.separator {token!r} is not a token of the model's tokenizer.")
    return int(token_id)


def _is_local(spec: str) -> bool:
    from ..data_spec import DataSpec

    return DataSpec.parse(spec).kind == "local"


def _warn_recipe_changes(saved: str | None, recipe: Recipe) -> None:
    if saved and saved != recipe.to_yaml():
        logger.warning("the recipe differs from the one the checkpoint was made with: the run is not exact")


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop records past the checkpoint (they are about to be recomputed)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    write_text_atomic(path, "".join(line + "\n" for line in kept))


def _flat(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flat(value, name + "."))
        else:
            flat[name] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def _exportable(config, full_state: dict, recipe: Recipe):
    """The trained weights in a fresh plain BlockTransformerForCausalLM (LoRA merged into the base weights).

    ``full_state`` comes from ``accelerator.get_state_dict``, which gathers FSDP / DeepSpeed shards.
    """
    from ..modeling import BlockTransformerForCausalLM

    model = BlockTransformerForCausalLM(config)
    if recipe.lora.enabled:
        model = apply_lora(model, recipe)
    model.load_state_dict(full_state)
    if recipe.lora.enabled:
        model = model.merge_and_unload()
    dtype = recipe.output.dtype
    return (model.to(getattr(torch, dtype)) if dtype else model).eval()


def _summary(recipe, recipe_name, state, params, eval_region, accelerator) -> dict:
    evals = state["evals"]
    return {
        "recipe": recipe_name,
        "method": _method(recipe),
        "steps": state["step"],
        "tokens": state["tokens"],
        "eval_region": eval_region,
        "step0_ppl": evals[0]["eval_ppl"] if evals and evals[0]["step"] == 0 else None,
        "final_ppl": evals[-1]["eval_ppl"] if evals else None,
        "source_ppl": (state["reference"] or {}).get("perplexity"),
        "parameters": params,
        "hardware": hardware(str(accelerator.device)),
        "num_processes": accelerator.num_processes,
        "replicas_checked": state["replicas_checked"],
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "block_transformer": __version__,
    }


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


def _export(model, tokenizer, out: Path, recipe: Recipe, summary: dict, metrics_path: Path) -> None:
    def finalize(folder: Path) -> None:
        (folder / "uptraining_recipe.yaml").write_text(recipe.to_yaml())
        (folder / "uptraining_summary.json").write_text(json.dumps(summary, indent=1))
        if metrics_path.is_file():
            (folder / "uptraining_metrics.jsonl").write_text(metrics_path.read_text())
        add_uptrain_row(folder, summary)

    save_model_folder(model, tokenizer, out, overwrite=recipe.output.overwrite, finalize=finalize)
    logger.info("saved %s", out)


def plan(recipe: Recipe) -> dict:
    """What ``--dry-run`` prints: parameter counts (model built on the meta device, no weights read) and budget."""
    from transformers import AutoConfig

    from ..convert import Split, resolve_source
    from ..convert.surgery import build_config, check_conversion
    from ..modeling import BlockTransformerConfig, BlockTransformerForCausalLM

    check_before_work(recipe, resume="")
    m = recipe.model
    if m.path is not None:
        config = AutoConfig.from_pretrained(Path(m.path).expanduser(), trust_remote_code=True)
        if not isinstance(config, BlockTransformerConfig):
            config = BlockTransformerConfig.from_dict(config.to_dict())
    else:
        source_config = resolve_source(m.source, revision=m.revision).config
        layers = source_config.num_hidden_layers
        split = Split.parse(m.split) if m.split else Split(layers // 2, layers - layers // 2)
        family = check_conversion(source_config, split, m.block_len, m.num_prefix_tokens)
        tied = bool(getattr(source_config, "tie_word_embeddings", False))
        config = build_config(source_config, family, split, m.block_len, m.num_prefix_tokens, tied, {"init": m.init})
    if recipe.data.seq_len % config.block_len:
        raise RecipeError(f"data.seq_len {recipe.data.seq_len} is not a multiple of the model's block length {config.block_len}.")
    with torch.device("meta"):
        model = BlockTransformerForCausalLM(config)
        if recipe.lora.enabled:
            model = apply_lora(model, recipe)
    steps = total_steps(recipe)
    return {
        "parameters": count_parameters(model),
        "steps": steps,
        "tokens_per_step": recipe.train.batch_size * recipe.data.seq_len,
        "token_budget": steps * recipe.train.batch_size * recipe.data.seq_len,
    }
