"""Recovery curves: held-out perplexity vs training tokens for uptraining runs, as JSON + PNG.

Each run is NAME=PATH where PATH is an exported folder (uptraining_metrics.jsonl) or a checkpoint dir
(metrics.jsonl). The source model's perplexity on the same held-out tokens (scored once per run) is
drawn as a horizontal line.

    python benchmarks/plot_uptrain.py "CE + KL + hidden=runs/kd-align-300k" "CE=runs/ce-100k" \
        --out benchmarks/results/uptrain_smollm2_pydocs
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# Quoted, not measured here: the naive-init plain-CE prototype (reference init, plain CE), same corpus tail.
PROTOTYPE = {"tokens": [0, 20_000, 41_000, 102_000, 164_000, 225_000], "eval_ppl": [2.7e5, 1618, 1006, 441, 305, 249]}


def read_run(path: Path) -> dict:
    metrics = path / "uptraining_metrics.jsonl" if (path / "uptraining_metrics.jsonl").is_file() else path / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line]
    evals = [r for r in records if "eval_ppl" in r]
    train = [r for r in records if "loss" in r]
    summary_file = path / "uptraining_summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else None
    return {
        "path": str(path),
        "finished": summary is not None,
        "summary": summary,
        "tokens": [e["tokens"] for e in evals],
        "eval_ppl": [e["eval_ppl"] for e in evals],
        "eval_loss_by_block_position": [e["eval_loss_by_block_position"] for e in evals],
        "train_tokens_per_s": [r["tokens_per_s"] for r in train],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="NAME=PATH")
    parser.add_argument("--source-ppl", type=float, default=None, help="The source model's held-out perplexity.")
    parser.add_argument("--out", type=Path, required=True, help="Output path without suffix (.json and .png).")
    args = parser.parse_args()

    runs = {}
    for item in args.runs:
        name, _, path = item.partition("=")
        runs[name] = read_run(Path(path))
    source_ppl = args.source_ppl or next(
        (r["summary"]["source_ppl"] for r in runs.values() if r["summary"] and r["summary"].get("source_ppl")), None)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(
        {"source_ppl": source_ppl, "runs": runs, "prototype_quoted": PROTOTYPE}, indent=1))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, run in runs.items():
        ax.plot([t / 1000 for t in run["tokens"]], run["eval_ppl"], marker="o", ms=3, label=name)
    ax.plot([t / 1000 for t in PROTOTYPE["tokens"]], PROTOTYPE["eval_ppl"], ls=":", color="grey",
            label="prototype: naive init, CE (quoted)")
    if source_ppl:
        ax.axhline(source_ppl, color="black", ls="--", lw=1, label=f"source model ({source_ppl:.1f})")
    ax.set_yscale("log")
    ax.set_xlabel("training tokens (thousands)")
    ax.set_ylabel("held-out perplexity (log)")
    ax.set_title("SmolLM2-135M -> Block Transformer (L_B 4, 15/15), Python-docs tail")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=120)
    for name, run in runs.items():
        print(f"{name}: " + ", ".join(f"{t/1000:.0f}k: {p:.4g}" for t, p in zip(run["tokens"], run["eval_ppl"])))


if __name__ == "__main__":
    main()
