"""Uptraining throughput: a Block Transformer training step vs plain fine-tuning of its source, side by side.

Same batch shape, same optimizer (AdamW), fp32, same thread count; the models' steps are interleaved so
all see the same machine state, and the median step time is reported. Also times the recovery steps
with a teacher: the recipe's (CE + KL + hidden-state alignment: a full teacher forward) and CE + hidden
alignment without KL (the teacher stops after the deepest aligned layer). The teacher runs in the dtype
uptraining picks for this machine (``--teacher-dtype auto``: bf16 where the hardware has native bf16);
``--compare-teacher-dtypes`` also times both recovery steps with the other dtype.

    python benchmarks/uptrain_speed.py --model smollm2-bt \
        --source ~/.cache/block-transformer/demo/SmolLM2-135M-Instruct.Q4_1.gguf

Runs against older revisions too (PYTHONPATH=<worktree>), whose RecoveryLoss has no teacher dtype: the
teacher is loaded in the chosen dtype here.

Ceiling of the ratio (CE step): the token decoder processes (N_P + L_B - 1) / L_B positions per token
and the block decoder 1 / L_B, against 1 + 1 for the source's two halves; the tied LM head costs the same.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from block_transformer import environment
from block_transformer.export import write_text_atomic
from block_transformer.modeling import BlockTransformerForCausalLM
from block_transformer.sources import resolve_source
from block_transformer.uptrain import load_recipe
from block_transformer.uptrain.losses import RecoveryLoss

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "smollm2-pydocs.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="A converted Block Transformer folder.")
    parser.add_argument("--source", required=True, help="Its source model (folder, .gguf or cached hub id).")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5, help="Timed steps per model (after one warm-up step).")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--teacher-dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    parser.add_argument("--compare-teacher-dtypes", action="store_true",
                        help="Also time the recovery steps with the teacher in the other dtype.")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/uptrain_speed_cpu_smollm2.json"))
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    machine = environment.describe("cpu")
    environment.warn_if_busy(machine)
    bt = BlockTransformerForCausalLM.from_pretrained(args.model, dtype=torch.float32).train()
    source = resolve_source(args.source).load_model(torch.float32).train()
    dtype = _teacher_dtype(args.teacher_dtype)
    dtypes = [dtype] + ([torch.float32 if dtype == torch.bfloat16 else torch.bfloat16] if args.compare_teacher_dtypes else [])
    # the recipe's loss weights, with every token-decoder layer aligned (the most expensive setting)
    recipe = load_recipe(RECIPE, [f"model.path={args.model}", "model.source=null", "model.split=null"])
    every_layer = range(1, bt.config.token_decoder_config.num_hidden_layers + 1)
    without_kl = recipe.distill.model_copy(update={"kl_weight": 0.0})
    recoveries = {}
    for d in dtypes:
        teacher = resolve_source(args.source).load_model(d).eval().requires_grad_(False)
        suffix = "" if d == dtype else f"_{str(d).removeprefix('torch.')}"
        recoveries["bt_distill" + suffix] = RecoveryLoss(recipe.distill, bt, teacher, hidden_layers=every_layer)
        recoveries["bt_hidden" + suffix] = RecoveryLoss(without_kl, bt, teacher, hidden_layers=every_layer)

    torch.manual_seed(0)
    ids = torch.randint(100, bt.config.vocab_size, (args.batch_size, args.seq_len))
    items, align_items = recoveries["bt_distill"].normalisers(ids)
    optimizers = {"source": torch.optim.AdamW(source.parameters(), lr=1e-5),
                  "bt": torch.optim.AdamW(bt.parameters(), lr=1e-5)}

    def step(kind: str) -> float:
        start = time.perf_counter()
        if kind == "source":
            loss = source(input_ids=ids, labels=ids).loss
        elif kind == "bt_ce":
            loss = bt(input_ids=ids, labels=ids, use_cache=False).loss
        else:
            loss = recoveries[kind](bt, ids, ids, items, align_items).total
        loss.backward()
        optimizer = optimizers["source" if kind == "source" else "bt"]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    kinds = ["source", "bt_ce", *recoveries]
    for kind in kinds:
        step(kind)  # warm-up
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for _ in range(args.steps):
        for kind in kinds:
            times[kind].append(step(kind))
    tokens = args.batch_size * args.seq_len
    figures = {k: {"median_step_s": statistics.median(v), "tokens_per_s": tokens / statistics.median(v),
                   "step_s": v} for k, v in times.items()}
    cfg = bt.config
    ceiling = 2 / (1 / cfg.block_len + (cfg.num_prefix_tokens + cfg.block_len - 1) / cfg.block_len)
    source_speed = figures["source"]["tokens_per_s"]
    report = {
        "benchmark": "uptrain_speed",
        "model": str(args.model),
        "source": str(args.source),
        "batch_shape": [args.batch_size, args.seq_len],
        "teacher_dtype": str(dtype).removeprefix("torch."),
        "environment": machine,
        "load_after": environment.machine_load(),
        "figures": figures,
        **{f"ratio_{kind}_vs_source": figures[kind]["tokens_per_s"] / source_speed for kind in kinds[1:]},
        "ratio_ceiling_layers_only": ceiling,
    }
    for kind in kinds:
        print(f"{kind:>20}: {figures[kind]['tokens_per_s']:7.1f} tokens/s (median step {figures[kind]['median_step_s']:.2f} s)"
              + ("" if kind == "source" else f", {figures[kind]['tokens_per_s'] / source_speed:.2f}x the source's fine-tuning"))
    print(f"layer-count ceiling of the CE step: {ceiling:.2f}x; teacher in {report['teacher_dtype']}; "
          f"load {machine['load_avg']} -> {report['load_after']['load_avg']}")
    write_text_atomic(args.json, json.dumps(report, indent=1))


def _teacher_dtype(choice: str) -> torch.dtype:
    try:
        from block_transformer.uptrain.losses import teacher_dtype
    except ImportError:  # a revision before the teacher had a dtype of its own: fp32
        return torch.bfloat16 if choice == "bfloat16" else torch.float32
    return teacher_dtype(torch.device("cpu"), choice)


if __name__ == "__main__":
    main()
