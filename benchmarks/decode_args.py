"""The command line the decode benchmarks share (``compiled_step.py``, ``ragged_decode.py``): a converted
folder, the batch and lengths, repeats, threads, device, and a result file named after the benchmark, the
device kind and the folder."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def decode_parser(doc: str, benchmark: str, repeats: int) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="a converted folder")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, default=None,
                        help=f"[default: benchmarks/results/{benchmark}_<cpu|cuda>_<folder name>.json]")
    parser.set_defaults(benchmark=benchmark)
    return parser


def parse_decode_args(parser: argparse.ArgumentParser) -> argparse.Namespace:
    args = parser.parse_args()
    if args.json is None:
        kind = "cuda" if args.device.startswith("cuda") else "cpu"
        args.json = RESULTS / f"{args.benchmark}_{kind}_{args.model.resolve().name}.json"
    return args
