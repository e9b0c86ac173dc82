"""Recovery curves: held-out perplexity vs training tokens for uptraining runs, as JSON + PNG.

Each run is NAME=PATH where PATH is an exported folder (uptraining_metrics.jsonl) or a checkpoint dir
(metrics.jsonl). The source model's perplexity on the same held-out tokens (scored once per run) is
drawn as a horizontal line.

Runs with several named held-out sets (a mixture's tails, ``eval.sets``) have one curve per set (``--sets``
picks some), each with the source's perplexity on that set as a dashed line of the same colour;
``--ratio`` plots perplexity / the source's instead, so sets of different difficulty share one axis (a
set without the source's figure is left out, with a warning). ``--source-ppl`` gives the source's figure
for runs without named sets; it is an error beside a run that has them (each set has its own figure).

    python benchmarks/plot_uptrain.py "CE + KL + hidden=runs/kd-align-300k" "CE=runs/ce-100k" \
        --out benchmarks/results/uptrain_smollm2_pydocs
    python benchmarks/plot_uptrain.py "general=smollm2-bt-general" --sets python-docs fortunes --ratio \
        --no-prototype --title "general recipe" --out benchmarks/results/uptrain_smollm2_general
"""

from __future__ import annotations

import argparse
import json
import sys
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
        # named held-out sets (runs since issue 11): perplexity per evaluation, and the source's on each
        "sets": {name: [e.get("sets", {}).get(name, {}).get("ppl") for e in evals]
                 for name in dict.fromkeys(n for e in evals for n in e.get("sets", {}))},
        "source_ppl_by_set": {name: figures.get("source_ppl")
                              for name, figures in ((summary or {}).get("eval_sets") or {}).items()},
    }


def curves(runs: dict[str, dict], sets: list[str] | None, ratio: bool, source_ppl: float | None) -> list[dict]:
    """What to draw: per run (and per named set) a curve ``{label, tokens, values, source}`` in thousands of
    tokens; ``source`` is the source's perplexity on it (a dashed line), None with ``ratio``. Curves that
    ``ratio`` cannot divide (no source figure) are left out with a warning on stderr."""
    out = []
    for name, run in runs.items():
        if run["sets"]:
            pairs = [(f"{name}: {s}", run["sets"].get(s), run["source_ppl_by_set"].get(s), s)
                     for s in sets or list(run["sets"])]
        else:
            own = source_ppl or ((run["summary"] or {}).get("source_ppl"))
            pairs = [(name, run["eval_ppl"], own, None)]
        for label, ppl, source, set_name in pairs:
            if ppl is None:
                continue
            if ratio and not source:
                print(f"warning: {label} has no source perplexity to divide by: left out of --ratio", file=sys.stderr)
                continue
            points = [(t / 1000, p / source if ratio else p) for t, p in zip(run["tokens"], ppl) if p]
            out.append({"label": label, "tokens": [t for t, _ in points], "values": [v for _, v in points],
                        "source": None if ratio or set_name is None else source, "set": set_name})
    return out


def check_source_ppl(runs: dict[str, dict], source_ppl: float | None) -> None:
    """``--source-ppl`` is one figure, for runs without named sets: an error beside runs that have them."""
    named = [name for name, run in runs.items() if run["sets"]]
    if source_ppl is not None and named:
        raise SystemExit(f"error: --source-ppl is one figure for runs without named held-out sets, but "
                         f"{', '.join(named)} has them (each set with the source's figure from its summary): "
                         "drop --source-ppl.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="NAME=PATH")
    parser.add_argument("--source-ppl", type=float, default=None, help="The source model's held-out perplexity.")
    parser.add_argument("--out", type=Path, required=True, help="Output path without suffix (.json and .png).")
    parser.add_argument("--sets", nargs="+", default=None, help="Named held-out sets to draw [default: all a run has].")
    parser.add_argument("--ratio", action="store_true", help="Plot perplexity / the source's on the same set.")
    parser.add_argument("--no-prototype", action="store_true", help="Leave out the quoted Python-docs prototype curve.")
    parser.add_argument("--title", default="SmolLM2-135M -> Block Transformer (L_B 4, 15/15), Python-docs tail")
    args = parser.parse_args()

    runs = {}
    for item in args.runs:
        name, _, path = item.partition("=")
        runs[name] = read_run(Path(path))
    check_source_ppl(runs, args.source_ppl)
    source_ppl = args.source_ppl or next(
        (r["summary"]["source_ppl"] for r in runs.values() if r["summary"] and r["summary"].get("source_ppl")), None)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(
        {"source_ppl": source_ppl, "runs": runs, "prototype_quoted": PROTOTYPE}, indent=1))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for curve in curves(runs, args.sets, args.ratio, args.source_ppl):
        line, = ax.plot(curve["tokens"], curve["values"], marker="o", ms=3, label=curve["label"])
        if curve["source"]:
            ax.axhline(curve["source"], color=line.get_color(), ls="--", lw=1,
                       label=f"source on {curve['set']} ({curve['source']:.1f})")
    if args.ratio and not args.no_prototype:
        print("warning: the quoted prototype has no source perplexity to divide by: left out of --ratio", file=sys.stderr)
    elif not args.no_prototype:
        ax.plot([t / 1000 for t in PROTOTYPE["tokens"]], PROTOTYPE["eval_ppl"], ls=":", color="grey",
                label="prototype: naive init, CE (quoted)")
    if args.ratio:
        ax.axhline(1.0, color="black", ls="--", lw=1, label="the source model")
    elif source_ppl and not any(run["sets"] for run in runs.values()):
        ax.axhline(source_ppl, color="black", ls="--", lw=1, label=f"source model ({source_ppl:.1f})")
    ax.set_yscale("log")
    ax.set_xlabel("training tokens (thousands)")
    ax.set_ylabel("perplexity / the source's (log)" if args.ratio else "held-out perplexity (log)")
    ax.set_title(args.title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=120)
    for name, run in runs.items():
        print(f"{name}: " + ", ".join(f"{t/1000:.0f}k: {p:.4g}" for t, p in zip(run["tokens"], run["eval_ppl"])))
        for set_name, ppl in run["sets"].items():
            source = run["source_ppl_by_set"].get(set_name)
            print(f"  {set_name}" + (f" (source {source:.4g})" if source else "") + ": "
                  + ", ".join(f"{t/1000:.0f}k: {p:.4g}" for t, p in zip(run["tokens"], ppl) if p is not None))


if __name__ == "__main__":
    main()
