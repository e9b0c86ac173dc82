"""Uptraining throughput: a Block Transformer training step vs plain fine-tuning of its source, side by side.

Same batch shape, same optimizer (AdamW), fp32, same thread count; the two models' steps are
interleaved so both see the same machine state, and the median step time is reported. Also times the
recommended recovery step (CE + KL + hidden-state alignment, which adds a teacher forward).

    python benchmarks/uptrain_speed.py --model smollm2-bt \
        --source ~/.cache/block-transformer/demo/SmolLM2-135M-Instruct.Q4_1.gguf

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
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/uptrain_speed_cpu_smollm2.json"))
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    machine = environment.describe("cpu")
    environment.warn_if_busy(machine)
    bt = BlockTransformerForCausalLM.from_pretrained(args.model, dtype=torch.float32).train()
    source = resolve_source(args.source).load_model(torch.float32).train()
    teacher = resolve_source(args.source).load_model(torch.float32).eval().requires_grad_(False)
    recipe = load_recipe(RECIPE, [f"model.path={args.model}", "model.source=null"])
    # the recipe's loss weights, with every token-decoder layer aligned (the most expensive setting)
    recovery = RecoveryLoss(recipe.distill, bt, teacher,
                            hidden_layers=range(1, bt.config.token_decoder_config.num_hidden_layers + 1))

    torch.manual_seed(0)
    ids = torch.randint(100, bt.config.vocab_size, (args.batch_size, args.seq_len))
    items, align_items = recovery.normalisers(ids)
    optimizers = {
        "source": torch.optim.AdamW(source.parameters(), lr=1e-5),
        "bt_ce": torch.optim.AdamW(bt.parameters(), lr=1e-5),
    }
    optimizers["bt_distill"] = optimizers["bt_ce"]

    def step(kind: str) -> float:
        start = time.perf_counter()
        if kind == "source":
            loss = source(input_ids=ids, labels=ids).loss
        elif kind == "bt_ce":
            loss = bt(input_ids=ids, labels=ids, use_cache=False).loss
        else:
            loss = recovery(bt, ids, ids, items, align_items).total
        loss.backward()
        optimizers[kind].step()
        optimizers[kind].zero_grad(set_to_none=True)
        return time.perf_counter() - start

    kinds = ["source", "bt_ce", "bt_distill"]
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
    report = {
        "benchmark": "uptrain_speed",
        "model": str(args.model),
        "source": str(args.source),
        "batch_shape": [args.batch_size, args.seq_len],
        "environment": machine,
        "load_after": environment.machine_load(),
        "figures": figures,
        "ratio_bt_ce_vs_source": figures["bt_ce"]["tokens_per_s"] / figures["source"]["tokens_per_s"],
        "ratio_bt_distill_vs_source": figures["bt_distill"]["tokens_per_s"] / figures["source"]["tokens_per_s"],
        "ratio_ceiling_layers_only": ceiling,
    }
    for kind in kinds:
        print(f"{kind:>11}: {figures[kind]['tokens_per_s']:7.1f} tokens/s (median step {figures[kind]['median_step_s']:.2f} s)")
    print(f"BT CE step vs source fine-tuning: {report['ratio_bt_ce_vs_source']:.2f}x "
          f"(layer-count ceiling {ceiling:.2f}x); with teacher (KL + hidden): {report['ratio_bt_distill_vs_source']:.2f}x")
    write_text_atomic(args.json, json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
