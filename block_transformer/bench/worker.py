"""Measure one model on one setting in this process, and print one JSON line (run by ``bench.run``).

A process per (model, setting) keeps peak memory attributable: ``ru_maxrss`` is a lifetime peak.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import sys

import torch

from block_transformer.dtypes import DTYPES, torch_dtype


def load(kind: str, spec: str, dtype: torch.dtype, device: str):
    if kind == "block_transformer":
        from transformers import AutoModelForCausalLM

        import block_transformer.modeling  # noqa: F401 - registers the Auto classes

        model = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype)
    else:
        from block_transformer.sources import resolve_source

        model = resolve_source(spec).load_model(dtype)
    return model.to(device).eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kind", choices=["block_transformer", "vanilla"], required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--setting", help="JSON of a Setting")
    parser.add_argument("--workload", help="JSON of a Workload (instead of --setting)")
    parser.add_argument("--mode", choices=["continuous", "static"], default="continuous", help="how a workload is served")
    parser.add_argument("--dtype", choices=DTYPES, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache-implementation", default=None)
    parser.add_argument("--no-align-blocks", dest="align_blocks", action="store_false",
                        help="a workload through the Block Transformer's batcher without aligned block phases")
    parser.add_argument("--serve", choices=["generate", "batcher"], default="generate",
                        help="a setting through generate(), or (Block Transformer) its continuous batcher")
    args = parser.parse_args(argv)

    from block_transformer.bench.settings import Setting
    from block_transformer.bench.throughput import bytes_per_decode_step, measure_batcher, measure_generation

    from block_transformer.bench.workload import Workload, measure_workload

    torch.set_num_threads(args.threads)
    model = load(args.kind, args.model, torch_dtype(args.dtype), args.device)
    if args.workload:
        result = measure_workload(model, Workload(**json.loads(args.workload)), args.mode, repeats=args.repeats,
                                  align_blocks=args.align_blocks)
    else:
        setting = Setting(**json.loads(args.setting))
        if args.serve == "batcher":
            result = measure_batcher(model, setting, repeats=args.repeats)
            # its rows complete blocks together: the block decoder's weights are read one step in L_B
            result["bytes_per_decode_step"] = bytes_per_decode_step(model, dataclasses.replace(setting, ragged=False))
        else:
            extra = {"cache_implementation": args.cache_implementation} if args.cache_implementation else {}
            result = measure_generation(model, setting, repeats=args.repeats, **extra)
            result["bytes_per_decode_step"] = bytes_per_decode_step(model, setting)
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if args.device.startswith("cuda"):
        result["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    result["parameters"] = sum(p.numel() for p in model.parameters())
    sys.stdout.write("BENCH_RESULT " + json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
