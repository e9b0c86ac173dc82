"""Step-0 perplexity: the source model vs. each conversion init and layer mapping, before any uptraining.

Scores the source SmolLM2 GGUF, then its in-memory Block Transformer conversions on the same held-out
windows of the Python-docs corpus (the tail of the sorted, separator-joined files; see
``block_transformer.measure.perplexity``): every init in ``block_transformer.convert.INITS`` at the
default mapping (L_B 4, split 15/15, N_P 2), and the sink init at every other mapping in
``benchmarks/mappings.py``. Writes every figure plus the settings to a JSON file.

    python benchmarks/step0_ppl.py                       # 16 x 512 tokens, ~15 min on 2 CPU cores
    python benchmarks/step0_ppl.py --mappings "partition 15/15"   # the inits only, ~5 min
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local

import torch  # noqa: E402

from block_transformer import environment  # noqa: E402
from block_transformer.convert import INITS, LayerMapping  # noqa: E402
from block_transformer.convert.init_names import DEFAULT_INIT  # noqa: E402
from block_transformer.convert.convert import convert_model, resolve_separator  # noqa: E402
from block_transformer.data_spec import DataSpec  # noqa: E402
from block_transformer.demo import pydocs_path, smollm2_path  # noqa: E402
from block_transformer.export import write_text_atomic  # noqa: E402
from block_transformer.measure import HELDOUT_TOKENS, heldout_split, score, tokenize_corpus  # noqa: E402
from block_transformer.sources import resolve_source  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mappings import DEFAULT, MAPPINGS  # noqa: E402

NUM_PREFIX_TOKENS = 2

logger = logging.getLogger("step0_ppl")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", type=Path, default=smollm2_path(), help="source model (default: the demo GGUF)")
    parser.add_argument("--corpus", type=Path, default=pydocs_path(), help="folder of *.txt files (default: demo)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--num-windows", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (set explicitly)")
    parser.add_argument("--mappings", default=",".join(MAPPINGS),
                        help=f"comma-separated names from benchmarks/mappings.py (default: all); {DEFAULT!r} runs every init")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/step0_ppl.json"))
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    names = [name.strip() for name in args.mappings.split(",") if name.strip()]
    unknown = [name for name in names if name not in MAPPINGS]
    if unknown:
        sys.exit(f"unknown mapping {unknown[0]!r}: choose from {', '.join(MAPPINGS)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    missing = [str(p) for p in (args.gguf, args.corpus) if not p.exists()]
    if missing:
        sys.exit(f"missing demo assets: {', '.join(missing)}. Run `bt-fetch-demo` first (or pass --gguf/--corpus).")
    if args.num_windows * args.seq_len > HELDOUT_TOKENS:
        sys.exit(f"--num-windows x --seq-len exceeds the {HELDOUT_TOKENS}-token held-out tail.")

    torch.set_num_threads(args.threads)
    machine = environment.describe("cpu")
    environment.warn_if_busy(machine)
    started = time.perf_counter()

    source = resolve_source(str(args.gguf))
    tokenizer = source.load_tokenizer()
    source_model = source.load_model(None)
    separator_id = resolve_separator(tokenizer, source_model.config)
    source_info = {"source": source.name, "source_kind": source.kind, "revision": source.revision, **source.metadata}

    corpus = tokenize_corpus(tokenizer, dict(DataSpec.parse(str(args.corpus)).documents()), separator_id)
    train, heldout = heldout_split(corpus.ids, HELDOUT_TOKENS)
    scored_tokens = args.num_windows * args.seq_len
    begin, end = len(train), len(train) + scored_tokens
    ids = heldout[:scored_tokens]

    runs = []
    t0 = time.perf_counter()
    result = score(source_model, ids, args.seq_len, args.batch_size, block_len=MAPPINGS[DEFAULT][2])
    runs.append({"model": "source", "init": None, "mapping": None, "convert_s": 0.0,
                 "score_s": time.perf_counter() - t0, **result.to_dict()})
    for name in names:
        block, token, block_len = MAPPINGS[name]
        mapping = LayerMapping.from_options(None, block, token)
        for init in INITS if name == DEFAULT else (DEFAULT_INIT,):
            t0 = time.perf_counter()
            model = convert_model(source_model, mapping, block_len, num_prefix_tokens=NUM_PREFIX_TOKENS, init=init,
                                  separator_id=separator_id, source_info=source_info)
            convert_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            result = score(model, ids, args.seq_len, args.batch_size)
            runs.append({"model": "block_transformer", "init": init, "mapping": name, "block_layers": block,
                         "token_layers": token, "block_len": block_len, "convert_s": convert_s,
                         "parameters": sum(p.numel() for p in model.parameters()),
                         "score_s": time.perf_counter() - t0, **result.to_dict()})
            logger.info("%s (%s): step-0 perplexity %.4g", name, init, result.perplexity)
            del model
    for run in runs:
        run["ppl_ratio_to_source"] = run["perplexity"] / runs[0]["perplexity"]

    print_table(runs)
    report = {
        "benchmark": "step0_ppl",
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "settings": {
            "seq_len": args.seq_len, "num_windows": args.num_windows, "batch_size": args.batch_size,
            "mappings": {name: MAPPINGS[name] for name in names}, "num_prefix_tokens": NUM_PREFIX_TOKENS,
            "dtype": str(source_model.dtype).removeprefix("torch."),
        },
        "source": {"path": str(args.gguf), **source_info},
        "corpus": {
            "root": str(args.corpus),
            "description": (
                "sorted **/*.txt files joined by the separator token; held-out set = the last "
                f"{HELDOUT_TOKENS} tokens of the concatenation; scored = its first {scored_tokens} tokens"
            ),
            "num_files": len(corpus.paths), "total_tokens": corpus.ids.numel(), "separator_id": separator_id,
            "heldout_token_range": [len(train), corpus.ids.numel()],
            "heldout_files": corpus.files_in(len(train), corpus.ids.numel()),
            "scored_token_range": [begin, end],
            "scored_files": corpus.files_in(begin, end),
        },
        "results": runs,
        "environment": {**machine, "load_after": environment.machine_load(), "wall_s": time.perf_counter() - started},
    }
    write_text_atomic(args.json, json.dumps(report, indent=2) + "\n")  # never half a result
    logger.info("wrote %s (%.0f s in all)", args.json, report["environment"]["wall_s"])
    return 0


def print_table(runs: list[dict]) -> None:
    header = (f"{'model':<18} {'mapping':<24} {'init':<10} {'ppl':>10} {'x source':>9} {'first-tok loss':>14}  "
              "loss by position in block")
    print(header)
    print("-" * len(header))
    for run in runs:
        first = "-" if run["first_token_loss"] is None else f"{run['first_token_loss']:.3f}"
        by_pos = " ".join(f"{x:.3f}" for x in run["loss_by_block_position"])
        print(f"{run['model']:<18} {run['mapping'] or '-':<24} {run['init'] or '-':<10} {run['perplexity']:>10.4g} "
              f"{run['ppl_ratio_to_source']:>9.3g} {first:>14}  {by_pos}")


if __name__ == "__main__":
    sys.exit(main())
