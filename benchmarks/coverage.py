"""Coverage report: every causal-LM model type in the installed transformers, converted and checked.

    python benchmarks/coverage.py                      # all types -> benchmarks/results/coverage.{json,md}
    python benchmarks/coverage.py qwen3 gemma2         # just these (printed, nothing written)

Each type gets a tiny random model built from the library's own config class; see
``block_transformer.convert.coverage`` for the checks. Each type runs in a child process with a memory
cap, so a family whose default config is huge cannot take the sweep down.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import platform
import resource
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
import transformers

from block_transformer.convert.coverage import FamilyResult, causal_lm_types, check_family

RESULTS = Path(__file__).resolve().parent / "results"
MEMORY_CAP = 6 << 30
TIMEOUT_S = 240


def _child(model_type: str, queue) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    os.environ["TQDM_DISABLE"] = "1"
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(1)
    queue.put(asdict(check_family(model_type)))


def run_one(model_type: str) -> dict:
    queue = multiprocessing.get_context("fork").Queue()
    process = multiprocessing.get_context("fork").Process(target=_child, args=(model_type, queue))
    process.start()
    process.join(TIMEOUT_S)
    if process.is_alive():
        process.kill()
        return asdict(FamilyResult(model_type, failure=f"timed out after {TIMEOUT_S} s"))
    if queue.empty():
        return asdict(FamilyResult(model_type, failure=f"the check process died (exit code {process.exitcode})"))
    return queue.get()


def status(row: dict) -> str:
    if row["refused"]:
        return "refused"
    checks = ("converts", "exact_copies", "probe", "generate", "reloads")
    return "passes" if all(row[c] for c in checks) else "fails"


def markdown(rows: list[dict], summary: dict) -> str:
    mark = {True: "yes", False: "no"}
    kinds = summary["refused_by_kind"]
    lines = [
        f"transformers {summary['transformers']}: {summary['types']} causal-LM model types. "
        f"**{summary['passes']} of {summary['decoder_only_text_types']} decoder-only text types pass every check** "
        f"({summary['fails']} fail, {kinds['unsupported']} are refused as not supported yet); "
        f"{kinds['not_decoder_only']} encoder-decoder, multimodal or encoder types and {kinds['recurrent']} "
        "state-space, hybrid-recurrent or looped types are refused by design.",
        "",
        "| model type | converts | exact copies | probe | generate | reload | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row["refused"]:
            note = row["refused"].split(": ", 1)[-1]
            lines.append(f"| {row['model_type']} | refused ({row['refused_kind'].replace('_', ' ')}) | | | | | {note} |")
            continue
        cells = [mark[row[c]] for c in ("converts", "exact_copies", "probe", "generate", "reloads")]
        lines.append(f"| {row['model_type']} | {' | '.join(cells)} | {row['failure'] or ''} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_types", nargs="*", help="only these (default: the whole causal-LM mapping)")
    args = parser.parse_args()
    types = args.model_types or causal_lm_types()
    rows = []
    started = time.perf_counter()
    for model_type in types:
        row = run_one(model_type)
        rows.append(row)
        print(f"{model_type:28s} {status(row):8s} {row['refused'] or row['failure'] or ''}"[:220], flush=True)
    counts = {s: sum(status(r) == s for r in rows) for s in ("passes", "fails", "refused")}
    kinds = {k: sum(r["refused_kind"] == k for r in rows) for k in ("not_decoder_only", "recurrent", "unsupported")}
    # Decoder-only text LMs: everything but encoder-decoder / multimodal / encoder and recurrent models.
    decoder_only = counts["passes"] + counts["fails"] + kinds["unsupported"]
    summary = {
        **counts,
        "refused_by_kind": kinds,
        "types": len(rows),
        "decoder_only_text_types": decoder_only,
        "pass_rate_of_decoder_only": round(counts["passes"] / decoder_only, 3) if decoder_only else None,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(summary, indent=1))
    if args.model_types:
        return
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "coverage.json").write_text(json.dumps({"summary": summary, "families": rows}, indent=1) + "\n")
    (RESULTS / "coverage.md").write_text(markdown(rows, summary))
    print(f"wrote {RESULTS / 'coverage.json'} and coverage.md", file=sys.stderr)


if __name__ == "__main__":
    main()
