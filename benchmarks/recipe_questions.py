"""Recipe questions answered with runs: one ``bt-uptrain`` run per variant of a recipe, side by side.

A variant is a list of ``--set`` overrides of the recipe (``VARIANTS`` below: the questions issue 11 asked —
KL on or off, freezing the moved layers first, the new modules' LR multiplier, N_P 2 vs 4 — and a few
levers beside them). Every run starts from the same recipe, seed and data order, so the only difference
between two rows is the variant's overrides.

    python benchmarks/recipe_questions.py recipes/smollm2-general.yaml                  # every variant, one at a time
    python benchmarks/recipe_questions.py recipes/smollm2-pydocs.yaml --variants baseline,ce+hidden
    python benchmarks/recipe_questions.py recipes/smollm2-general.yaml --jobs 9 --threads 1 --set checkpoint.every=0 \
        --discard-weights                                                    # one H100: all at once, ~6 min
    python benchmarks/recipe_questions.py recipes/smollm2-general.yaml --markdown       # the README table of --json

Each run writes to ``--workdir/<recipe>/<variant>/`` and is skipped when its ``uptraining_summary.json``
exists (made by the same command: recorded beside it), resumed (`--resume`) when it left checkpoints; a failed
run is reported and the others go on.
``--jobs`` runs several at once: a GPU runs several runs of a small model side by side at little cost
each; on a 2-core CPU keep 1. ``--json`` (written atomically after every run) holds, per variant, the
overrides, every held-out set's perplexity at step 0 and at the end with its ratio to the source's, the
curve of every set vs tokens, training tokens/s (median of the logged steps) and wall time.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tradeoff import stage  # noqa: E402

from block_transformer.environment import describe  # noqa: E402
from block_transformer.export import write_text_atomic  # noqa: E402

logger = logging.getLogger("recipe_questions")
ROOT = Path(__file__).resolve().parent.parent


def general_mixture_without(name: str) -> list[dict]:
    """The general recipe's training components but ``name``, read from the recipe (not a copy of it)."""
    raw = yaml.safe_load((ROOT / "recipes" / "smollm2-general.yaml").read_text(encoding="utf-8"))
    return [component for component in raw["data"]["train"] if component["name"] != name]


VARIANTS: dict[str, list[str]] = {
    "baseline": [],
    "ce+hidden": ["distill.kl_weight=0"],  # no KL: the teacher stops after the deepest aligned layer
    "ce+kl": ["distill.hidden_weight=0"],
    "freeze-25": ["train.freeze_pretrained_steps=25"],  # only new modules and norms train for the first 25 steps
    "kl-only": ["distill.ce_weight=0", "distill.hidden_weight=0"],  # the teacher's distribution alone
    "new-lr-x1": ["train.new_modules_lr_multiplier=1"],  # both recipes' setting since the H100 runs
    "new-lr-x3": ["train.new_modules_lr_multiplier=3"],  # their setting before
    "new-lr-x10": ["train.new_modules_lr_multiplier=10"],
    "prefix-1": ["model.num_prefix_tokens=1"],  # a fifth less token-decoder work per token than 2
    "prefix-4": ["model.num_prefix_tokens=4"],
    "lr-1e-3": ["train.lr=1e-3"],
    "lr-1.5e-4": ["train.lr=1.5e-4"],  # half the recipe's: less drift from the source's weights?
    "lr-7.5e-5": ["train.lr=7.5e-5"],
    "block-len-2": ["model.block_len=2"],
    "block-len-2+lr-1e-3": ["model.block_len=2", "train.lr=1e-3"],
    "no-prose": ["data.train=" + json.dumps(general_mixture_without("austen"))],  # the mixture before Austen joined
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", type=Path)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names from VARIANTS")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="a --set for every run (repeatable)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads of each run [default: cores / jobs]")
    parser.add_argument("--workdir", type=Path, default=ROOT / "runs" / "recipe-questions")
    parser.add_argument("--json", type=Path, default=None,
                        help="[default: benchmarks/results/recipe_questions_<recipe>.json]")
    parser.add_argument("--discard-weights", action="store_true",
                        help="after a run, delete its checkpoints and exported weights (its summary and metrics stay): "
                             "the last step's checkpoint alone holds ~2 GB per run of SmolLM2-135M")
    parser.add_argument("--markdown", action="store_true", help="print the table of what --json holds and stop")
    parser.add_argument("--plot", action="store_true",
                        help="also draw the primary set's perplexity over the source's vs tokens, one line per variant, "
                             "as a PNG beside --json (needs pip install -e .[plot]); with --markdown, from --json alone")
    args = parser.parse_args()
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    if args.json is None:
        args.json = ROOT / "benchmarks" / "results" / f"recipe_questions_{args.recipe.stem}.json"
    return args


def command(recipe: Path, variant: str, out: Path, common: list[str]) -> list[str]:
    sets = [*common, *VARIANTS[variant], f"output.dir={out}"]
    return [sys.executable, "-m", "block_transformer.uptrain", str(recipe), *(a for s in sets for a in ("--set", s))]


def run_variant(variant: str, args: argparse.Namespace) -> dict | None:
    """Run one variant unless it finished before (an interrupted one resumes); its figures, or None when it failed."""
    out = args.workdir / args.recipe.stem / variant
    summary = out / "uptraining_summary.json"
    ran_before = summary.is_file()
    start = time.perf_counter()
    try:
        log = out.parent / f"{variant}.log"  # not with_suffix: "lr-1.5e-4" would log to "lr-1.log"
        stage(command(args.recipe, variant, out, args.sets), summary, log, Path(f"{out}.checkpoints"))
        result = figures(variant, out, None if ran_before else time.perf_counter() - start)
    except (SystemExit, Exception) as failure:  # stage's message names the log; the other variants go on
        logger.error("%s: %s", variant, failure)
        return None
    if args.discard_weights:
        shutil.rmtree(Path(f"{out}.checkpoints"), ignore_errors=True)  # checkpoint.dir's default
        for weights in out.glob("*.safetensors"):
            weights.unlink()
    return result


def figures(variant: str, out: Path, seconds: float | None) -> dict:
    """What the run's summary and metrics say: every set at step 0 and at the end, the curve, tokens/s."""
    summary = json.loads((out / "uptraining_summary.json").read_text())
    rows = [json.loads(line) for line in (out / "uptraining_metrics.jsonl").read_text().splitlines() if line.strip()]
    curve = [{"tokens": r["tokens"], **{name: s["ppl"] for name, s in r["sets"].items()}} for r in rows if "sets" in r]
    speeds = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
    return {
        "variant": variant,
        "overrides": VARIANTS[variant],
        "method": summary["method"],
        "tokens": summary["tokens"],
        "steps": summary["steps"],
        "primary": summary.get("primary_eval_set"),
        "sets": summary["eval_sets"],
        "curve": curve,
        "train_tokens_per_s_median": statistics.median(speeds) if speeds else None,
        "wall_s": seconds,
        "device": summary["environment"].get("device"),
        "hardware": summary["environment"].get("hardware"),
    }


def markdown(record: dict) -> str:
    """One row per variant: each set's final perplexity and its ratio to the source's."""
    runs = record["runs"]
    if not runs:
        return "(no finished runs)"
    names = list(runs[0]["sets"])
    head = "| variant | overrides | " + " | ".join(names) + " | train tok/s |"
    lines = [head, "|" + "---|" * (len(names) + 3)]
    source = "| source | | " + " | ".join(f"{runs[0]['sets'][n]['source_ppl']:.1f}" for n in names) + " | |"
    lines.append(source)
    for run in runs:
        cells = [f"{run['sets'][n]['final_ppl']:.1f} ({run['sets'][n]['final_ratio']:.1f}×)" for n in names]
        speed = run["train_tokens_per_s_median"]
        speed_cell = f"{speed:.0f}" if speed else ""
        lines.append(f"| {run['variant']} | {' '.join(run['overrides']) or '(recipe)'} | " + " | ".join(cells)
                     + f" | {speed_cell} |")
    return "\n".join(lines)


def plot(record: dict, path: Path) -> None:
    """The primary set (the first when the recipe names none) over the source's, vs tokens, per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    name = None
    for run in record["runs"]:
        name = run["primary"] or next(iter(run["sets"]))
        source = run["sets"][name]["source_ppl"]
        ax.plot([p["tokens"] for p in run["curve"]], [p[name] / source for p in run["curve"]], label=run["variant"],
                linewidth=2.5 if run["variant"] == "baseline" else 1.2)
    ax.set_yscale("log")
    ax.set_xlabel("training tokens")
    ax.set_ylabel(f"{name} perplexity / source's")
    ax.set_title(f"{Path(record['recipe']).name}: {record['environment']['hardware']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    logger.info("wrote %s", path)


def earlier_runs(args: argparse.Namespace, variants: list[str]) -> list[dict]:
    """The other variants' runs that ``--json`` holds for the same recipe and common overrides: kept, so that
    running a few variants adds to the record instead of replacing it."""
    if not args.json.is_file():
        return []
    record = json.loads(args.json.read_text())
    if record.get("recipe") != str(args.recipe) or record.get("common_overrides") != args.sets:
        logger.warning("%s holds runs of another recipe or other common overrides: replacing it", args.json)
        return []
    return [run for run in record["runs"] if run["variant"] not in variants]


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = parse_args()
    if args.markdown:
        print(markdown(json.loads(args.json.read_text())))
        if args.plot:
            plot(json.loads(args.json.read_text()), args.json.with_suffix(".png"))
        return
    variants = args.variants.split(",")
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    os.environ.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))  # every run's torch threads
    done: dict[str, dict] = {}
    kept = earlier_runs(args, variants)
    before = describe("cuda" if torch.cuda.is_available() else "cpu", threads)  # the machine as the runs start

    def save() -> None:
        record = {
            "recipe": str(args.recipe), "common_overrides": args.sets, "jobs": args.jobs, "threads_per_run": threads,
            "command": " ".join(["python", *sys.argv]), "environment": before,
            "runs": kept + [done[v] for v in variants if v in done],
            "failed": [v for v in variants if v in failed],
        }
        write_text_atomic(args.json, json.dumps(record, indent=1) + "\n")

    failed: set[str] = set()

    lock = threading.Lock()  # runs finish in their own threads: one record update and write at a time

    def one(variant: str) -> None:
        result = run_variant(variant, args)
        with lock:
            if result is None:
                failed.add(variant)
            else:
                done[variant] = result
            save()

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(one, variants))
    print(markdown(json.loads(args.json.read_text())))
    if args.plot:
        plot(json.loads(args.json.read_text()), args.json.with_suffix(".png"))
    if failed:
        sys.exit(f"failed: {', '.join(sorted(failed))}")


if __name__ == "__main__":
    main()
