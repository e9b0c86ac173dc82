"""Ragged prompts against aligned ones, on one converted model, side by side in one process.

Four ways to decode the same batch size, interleaved repeat by repeat:

* ``generate_aligned``: ``generate()`` on prompts of one length (every row completes a block on the same step);
* ``generate_ragged``: ``generate()`` on prompt lengths spread over [P/2, P], left-padded (rows complete blocks
  on different steps, so the block decoder runs at almost every step);
* ``batcher_ragged``: the same ragged prompts as requests to the continuous batcher, arriving together, a row
  each: it aligns the rows' block phases (``align_blocks``);
* ``batcher_aligned``: the aligned prompts through the batcher (what the batcher itself costs).

Each is warmed up with a call of the full measured size, then the median of ``--repeats`` calls per variant.
Separate processes move the ragged figures by up to ±15 % on this shared CPU (bt-bench runs each model in its
own process), which is why this ratio is measured in one.

    python benchmarks/ragged_decode.py smollm2-bt --threads 2          # batch 32, P256 / N64
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

import torch
from transformers import AutoModelForCausalLM

import block_transformer.modeling  # noqa: F401 - registers the Auto classes
from block_transformer.bench.settings import Setting
from block_transformer.bench.throughput import generation_inputs, make_prompts, summarize, timed_batcher, timed_generate
from block_transformer.environment import describe, machine_load
from block_transformer.export import write_text_atomic
from decode_args import decode_parser, parse_decode_args  # beside this script

logger = logging.getLogger("ragged_decode")
VARIANTS = ("generate_aligned", "generate_ragged", "batcher_ragged", "batcher_aligned")


def parse_args() -> argparse.Namespace:
    return parse_decode_args(decode_parser(__doc__, "ragged_decode", repeats=5))


def callers(model, args) -> dict:
    """variant -> (Setting, a function running one timed call: (time to first token, whole call, steps held))."""
    calls = {}
    for ragged in (False, True):
        setting = Setting(args.batch_size, args.prompt_len, args.new_tokens, ragged=ragged)
        inputs = generation_inputs(model, setting)
        ids, mask = make_prompts(setting, model.config.vocab_size)
        prompts = [row[keep.bool()].tolist() for row, keep in zip(ids, mask)]
        kind = "ragged" if ragged else "aligned"
        calls[f"generate_{kind}"] = (setting, lambda inputs=inputs: (*timed_generate(model, inputs), 0))
        calls[f"batcher_{kind}"] = (setting, lambda prompts=prompts: timed_batcher(model, prompts, args.new_tokens))
    return {name: calls[name] for name in VARIANTS}


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.model).to(args.device).eval()
    before = describe(args.device, torch.get_num_threads())
    calls = callers(model, args)
    runs: dict[str, list[tuple[float, float, int]]] = {name: [] for name in calls}
    with torch.inference_mode():
        for name, (_, call) in calls.items():
            call()  # warm-up of the full measured size
        for _ in range(args.repeats):
            for name, (_, call) in calls.items():
                runs[name].append(call())
    results = {}
    for name, (setting, _) in calls.items():
        results[name] = summarize(setting, [run[:2] for run in runs[name]]) | {"steps_held": runs[name][0][2]}
    aligned = results["generate_aligned"]["decode_tokens_per_s"]
    for name, result in results.items():
        result["decode_vs_generate_aligned"] = result["decode_tokens_per_s"] / aligned
        logger.info("%s: decode %.1f tok/s (%.2fx generate aligned), whole call %.2f s, TTFT %.2f s, %d row-steps held",
                    name, result["decode_tokens_per_s"], result["decode_vs_generate_aligned"], result["whole_call_s"],
                    result["time_to_first_token_s"], result["steps_held"])
    record = {"benchmark": "ragged_decode", "model": str(args.model), "device": args.device, "repeats": args.repeats,
              "command": " ".join(["python", *sys.argv]), "environment": before, "load_after": machine_load(),
              "results": results}
    write_text_atomic(args.json, json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
