"""The static and compiled decode steps against the eager step, on one converted model, side by side.

Three ways to decode with the same model in one process, interleaved repeat by repeat:

* ``eager``: ``generate()`` as it is (the decode step that runs each decoder on exactly the rows that need it);
* ``static``: ``generate(cache_implementation="static")``, the fixed-shape step, not compiled;
* ``compiled``: the same after ``model.compile_decode_step()`` (``torch.compile``, ``--mode``).

Each is warmed up with a call of the full measured size (the compiled one compiles there), then the
median of ``--repeats`` calls per variant, the variants taking turns.

    python benchmarks/compiled_step.py smollm2-bt --threads 2                      # b32 P256/N64, aligned + ragged
    python benchmarks/compiled_step.py smollm2-bt --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from contextlib import contextmanager

import torch
from transformers import AutoModelForCausalLM

import block_transformer.modeling  # noqa: F401 - registers the Auto classes
from block_transformer.bench.settings import Setting
from block_transformer.bench.throughput import generation_inputs, summarize, timed_generate
from block_transformer.environment import describe, machine_load
from block_transformer.export import write_text_atomic
from decode_args import decode_parser, parse_decode_args  # beside this script

logger = logging.getLogger("compiled_step")
VARIANTS = {"eager": {}, "static": {"cache_implementation": "static"}, "compiled": {"cache_implementation": "static"}}


def parse_args() -> argparse.Namespace:
    parser = decode_parser(__doc__, "compiled_step", repeats=3)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="[default: the folder's]")
    parser.add_argument("--mode", default=None, help="torch.compile mode, e.g. reduce-overhead (CUDA graphs)")
    return parse_decode_args(parser)


@contextmanager
def step_of(model, variant: str, mode: str | None):
    """The static step compiled (once, kept for later calls) for ``compiled``, uncompiled otherwise."""
    compiled = model.compiled_decode_step
    if variant == "compiled" and compiled is None:
        model.compile_decode_step(**({"mode": mode} if mode else {}))
        compiled = model.compiled_decode_step
    model.compiled_decode_step = compiled if variant == "compiled" else None
    try:
        yield
    finally:
        model.compiled_decode_step = compiled


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype) if args.dtype else "auto"
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(args.device).eval()
    before = describe(args.device, torch.get_num_threads())
    rows = []
    for ragged in (False, True):
        setting = Setting(args.batch_size, args.prompt_len, args.new_tokens, ragged=ragged)
        inputs = {name: generation_inputs(model, setting, **kwargs) for name, kwargs in VARIANTS.items()}
        runs: dict[str, list[tuple[float, float]]] = {name: [] for name in VARIANTS}
        warm_up: dict[str, float] = {}
        with torch.inference_mode():
            for name in VARIANTS:  # the compiled variant compiles in its warm-up
                started = time.perf_counter()
                with step_of(model, name, args.mode):
                    timed_generate(model, inputs[name])
                warm_up[name] = time.perf_counter() - started
            for _ in range(args.repeats):
                for name in VARIANTS:
                    with step_of(model, name, args.mode):
                        runs[name].append(timed_generate(model, inputs[name]))
        results = {name: summarize(setting, runs[name]) | {"warm_up_s": warm_up[name]} for name in VARIANTS}
        eager = results["eager"]["decode_tokens_per_s"]
        for name, result in results.items():
            result["decode_vs_eager"] = result["decode_tokens_per_s"] / eager
            logger.info("%s %s: decode %.1f tok/s (%.2fx eager), whole call %.2f s, warm-up %.1f s", setting.name,
                        name, result["decode_tokens_per_s"], result["decode_vs_eager"], result["whole_call_s"],
                        result["warm_up_s"])
        rows.append({"setting": setting.name, "results": results})
    record = {"benchmark": "compiled_step", "model": str(args.model), "device": args.device, "mode": args.mode,
              "repeats": args.repeats, "command": " ".join(["python", *sys.argv]), "environment": before,
              "load_after": machine_load(), "rows": rows}
    write_text_atomic(args.json, json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
