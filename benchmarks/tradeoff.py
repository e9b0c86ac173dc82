"""The quality/speed trade-off of layer mappings, measured with the project's own commands.

For every mapping in ``benchmarks/mappings.py`` (or those named with ``--mappings``), on the demo
SmolLM2-135M and the Python-docs corpus:

1. ``bt-convert`` with the mapping's ``--block-layers/--token-layers/--block-len``;
2. ``bt-uptrain`` of the converted folder with the default recipe (``recipes/smollm2-pydocs.yaml``)
   for each ``--tokens`` budget: its summary gives held-out perplexity at step 0 and at the end, on
   the recipe's held-out tail (the source's perplexity on the same tokens is scored by the run too);
3. ``bt-eval`` of every uptrained folder on the general recipe's out-of-domain dev set (fortunes, the first
   8,192 tokens in windows of 512, as ``recipes/smollm2-general.yaml`` scores it; the source once, on the
   same tokens): how much of the source's general function a mapping keeps after in-domain uptraining;
4. generation throughput of every converted folder against one measurement of the source per
   setting (bt-bench's workers via ``block_transformer.bench.run.run_comparison``; throughput does not
   depend on the weights, so the fresh conversions are benchmarked): whole-call and decode ratios;
   and the parameter count and KV cache per sequence.

Every stage writes its own output under ``--workdir`` and is skipped when that output exists and was
made by the same command (recorded beside it; a different one is an error), so an interrupted run
resumes where it stopped; ``--json`` collects what exists so far (written atomically).
``--plot`` draws perplexity vs whole-call speed-up (needs ``pip install -e .[plot]``).

    python benchmarks/tradeoff.py --tokens 100000                       # every mapping, hours on a CPU
    python benchmarks/tradeoff.py --mappings "duplicate 30/30" --tokens 100000,300000
    python benchmarks/tradeoff.py --skip bench --tokens 25600 --plot    # quality only
    python benchmarks/tradeoff.py --skip uptrain                        # speed only: ~1 h for all on 2 cores
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mappings import DEFAULT, MAPPINGS  # noqa: E402

from block_transformer.corpora import general_path  # noqa: E402
from block_transformer.demo import pydocs_path, smollm2_path  # noqa: E402
from block_transformer.export import write_text_atomic  # noqa: E402
from block_transformer.uptrain import checkpoint  # noqa: E402

logger = logging.getLogger("tradeoff")
SPEED_KEYS = ("whole_call_tokens_per_s", "decode_tokens_per_s", "time_to_first_token_s")
ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
OOD_SET = "fortunes"  # the general recipe's dev set: a kind of text neither recipe trains on


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mappings", default=",".join(MAPPINGS), help="comma-separated names from benchmarks/mappings.py")
    parser.add_argument("--tokens", default="100000", help="comma-separated uptraining budgets (train.max_tokens)")
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "smollm2-pydocs.yaml")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="extra bt-uptrain --set (repeatable)")
    parser.add_argument("--bench", default="32:1024/128,32:128/512", help="batch:prompt/new settings for bt-bench")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads of each measured model [default: all cores]")
    parser.add_argument("--source-cache", choices=["dynamic", "static"], default="dynamic",
                        help="the source's cache in the speed comparison")
    parser.add_argument("--skip", default="", help="comma-separated stages to skip: uptrain, ood, bench")
    parser.add_argument("--workdir", type=Path, default=ROOT / "runs" / "tradeoff")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "tradeoff.json")
    parser.add_argument("--plot", action="store_true", help="also write the PNG next to --json")
    parser.add_argument("--markdown", action="store_true",
                        help="print the README table of what --json holds and stop (nothing is run; with --plot, the PNG too)")
    return parser.parse_args()


def stage(cmd: list[str], done: Path, log: Path, checkpoints: Path | None = None) -> None:
    """Run one project command unless ``done`` exists from the same command; its output is kept in ``log``.

    A failure stops the benchmark with the log's tail; an output made by another command is refused
    rather than silently reused as this one's result. An interrupted uptraining run (``checkpoints`` holds
    some) continues with ``--resume``, which the recorded command leaves out: it is the same run.
    """
    recorded = log.with_suffix(".command")
    if done.exists():
        if recorded.is_file() and recorded.read_text() != " ".join(cmd):
            sys.exit(f"{done} was made by another command ({recorded}); delete it or pass another --workdir.")
        return
    run = [*cmd, "--resume"] if checkpoints is not None and checkpoint.checkpoints(checkpoints) else cmd
    logger.info("$ %s", " ".join(run))
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a" if run is not cmd else "w") as out:
        code = subprocess.run(run, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"}).returncode
    if code:
        tail = log.read_text().strip().splitlines()[-3:]
        sys.exit(f"{cmd[0]} failed (exit {code}), see {log}:\n" + "\n".join(tail))
    recorded.write_text(" ".join(cmd))


def bench_settings(bench: str) -> list[tuple[int, int, int]]:
    """``"32:1024/128,32:128/512"`` -> [(batch, prompt, new), ...]."""
    settings = []
    for setting in bench.split(","):
        batch, shape = setting.split(":")
        prompt, new = shape.split("/")
        settings.append((int(batch), int(prompt), int(new)))
    return settings


def kv_per_sequence(model, bench: str) -> dict[str, int]:
    """KV-cache bytes one sequence holds at the end of each bench setting (bt-bench's analytic formula)."""
    from block_transformer.bench.settings import Setting
    from block_transformer.bench.throughput import kv_cache_bytes

    return {f"p{p}-n{n}": kv_cache_bytes(model, Setting(b, p, n)) for b, p, n in bench_settings(bench)}


def slug(name: str) -> str:
    return name.replace(" ", "-").replace("/", "-").replace(",", "")


def measure(name: str, args: argparse.Namespace, source: Path) -> dict:
    block, token, block_len = MAPPINGS[name]
    here = args.workdir / slug(name)
    converted = here / "converted"
    convert = [str(BIN / "bt-convert"), str(source), "--block-len", str(block_len), "--block-layers", block,
               "--token-layers", token, "-o", str(converted)]
    stage(convert, converted / "config.json", here / "convert.log")
    config = json.loads((converted / "config.json").read_text())
    row: dict = {"mapping": name, "block_layers": block, "token_layers": token, "block_len": block_len,
                 "commands": {"convert": " ".join(convert)}, "uptraining": {}}

    skip = set(args.skip.split(","))
    for tokens in (int(t) for t in args.tokens.split(",") if t) if "uptrain" not in skip else ():
        out = here / f"uptrained-{tokens}"
        cmd = [str(BIN / "bt-uptrain"), str(args.recipe), "--set", "model.source=null", "--set", f"model.path={converted}",
               "--set", f"distill.teacher={source}", "--set", f"train.max_tokens={tokens}", "--set", f"output.dir={out}",
               *(arg for s in args.sets for arg in ("--set", s))]
        stage(cmd, out / "uptraining_summary.json", here / f"uptrain-{tokens}.log", Path(f"{out}.checkpoints"))
        summary = json.loads((out / "uptraining_summary.json").read_text())
        row["uptraining"][str(tokens)] = {
            key: summary.get(key) for key in ("tokens", "step0_ppl", "final_ppl", "source_ppl", "method", "hardware")
        }
        row["commands"][f"uptrain {tokens}"] = " ".join(cmd)

    if "ood" not in skip:
        row["ood_ppl"] = {folder.parent.name.removeprefix("uptrained-"): ood_perplexity(folder.parent, here, args)
                          for folder in sorted(here.glob("uptrained-*/uptraining_summary.json"))}
    row["parameters"] = _parameters(converted)
    row["kv_cache_bytes_per_sequence"] = _kv_bytes(converted, args.bench)
    row["conversion"] = {k: config["conversion"].get(k) for k in ("mapping", "split", "block_layers", "token_layers")}
    return row


def ood_perplexity(model: Path, here: Path, args: argparse.Namespace) -> float:
    """Perplexity of ``model`` on the first 8,192 tokens of the out-of-domain set (bt-eval, kept under ``here``)."""
    name = model.name.removeprefix("uptrained-") if model.name.startswith("uptrained-") else model.name
    out = here / f"ood-{name}.json"
    cmd = [str(BIN / "bt-eval"), str(model), "--data", str(general_path(OOD_SET)), "--seq-len", "512",
           "--max-tokens", "8192", "--heldout-tokens", "0", "--json", str(out)]
    stage(cmd, out, here / f"ood-{name}.log")
    return json.loads(out.read_text())["model"]["perplexity"]


def bench_all(names: list[str], args: argparse.Namespace, source: Path) -> tuple[dict[str, dict], dict]:
    """Speed of every mapping's conversion against one source run per setting -> ({mapping: figures}, how).

    The record is kept in ``--workdir/bench.json`` and reused when it measured these mappings (or more) with
    the same settings; one that does not fit is refused rather than mixed with new figures.
    """
    from block_transformer.bench.run import run_comparison
    from block_transformer.bench.settings import Setting

    settings = [Setting(*s) for s in bench_settings(args.bench)]
    models = {name: str(args.workdir / slug(name) / "converted") for name in names}
    cache = None if args.source_cache == "dynamic" else args.source_cache
    path = args.workdir / "bench.json"
    if path.is_file():
        record = json.loads(path.read_text())
        same = ([row["setting"]["name"] for row in record["rows"]] == [s.name for s in settings]
                and record["repeats"] == args.repeats and record["source"] == f"source_{args.source_cache}"
                and args.threads in (None, record["threads"]) and record["models"].items() >= models.items())
        if not same:
            held = f"{', '.join(record['models'])} at {', '.join(row['setting']['name'] for row in record['rows'])}"
            sys.exit(f"{path} holds another measurement ({held}, {record['repeats']} repeats, {record['source']}); "
                     "delete it to re-measure.")
        logger.info("speed: reusing %s", path)
    else:
        logger.info("speed: %s and the source, %s", ", ".join(names), args.bench)
        record = run_comparison(models, str(source), settings, repeats=args.repeats, threads=args.threads,
                                source_cache=cache)
        record["command"] = shlex.join(["python", *sys.argv])
        write_text_atomic(path, json.dumps(record, indent=2) + "\n")
    speed: dict[str, dict] = {}
    for row in record["rows"]:
        setting = row["setting"]["name"]
        for label, measured in row["results"].items():
            figures = {key: measured[key] for key in SPEED_KEYS}
            if label in row["ratios"]:
                figures["vs_source"] = {key: row["ratios"][label][key] for key in SPEED_KEYS}
            figures["load_before"] = row["load_before"][label]["load_avg"][0]
            speed.setdefault("source" if label == record["source"] else label, {})[setting] = figures
    meta = {"source": record["source"], "repeats": record["repeats"], "threads": record["threads"],
            "hardware": record["environment"]["hardware"], "command": record.get("command")}
    return speed, meta


def _parameters(folder: Path) -> int:
    """Parameters stored in the folder's safetensors (a tied head is stored once)."""
    from safetensors import safe_open

    total = 0
    for path in folder.glob("*.safetensors"):
        with safe_open(path, "pt") as f:
            total += sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())
    return total


def _source_figures(source: Path, bench: str) -> dict:
    """Parameters and KV cache of the source (built on the meta device: nothing is loaded)."""
    import torch
    from transformers import AutoModelForCausalLM

    from block_transformer.sources import resolve_source

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(resolve_source(str(source)).config, dtype=torch.float32)
    unique = {id(p): p.numel() for p in model.parameters()}
    return {"parameters": sum(unique.values()), "kv_cache_bytes_per_sequence": kv_per_sequence(model, bench)}


def _kv_bytes(folder: Path, bench: str) -> dict[str, int]:
    import torch

    from block_transformer.modeling import BlockTransformerConfig, BlockTransformerForCausalLM

    with torch.device("meta"):
        model = BlockTransformerForCausalLM(BlockTransformerConfig.from_pretrained(folder))
    return kv_per_sequence(model, bench)


def plot(rows: list[dict], path: Path) -> None:
    """Perplexity (largest budget measured) vs whole-call speed-up at the first bench setting; source at (1x, its ppl)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    source_ppl, setting = None, None
    for row in rows:
        if not row["uptraining"] or "speed" not in row:
            continue
        budget = max(row["uptraining"], key=int)
        result = row["uptraining"][budget]
        setting = setting or next(iter(row["speed"]))
        speedup = row["speed"][setting]["vs_source"]["whole_call_tokens_per_s"]
        ax.scatter([speedup], [result["final_ppl"]])
        ax.annotate(f"{row['mapping']} ({int(budget) // 1000}k)", (speedup, result["final_ppl"]), fontsize=8,
                    xytext=(4, 4), textcoords="offset points")
        source_ppl = result["source_ppl"]
    if source_ppl is not None:
        ax.scatter([1.0], [source_ppl], marker="*", s=120, color="black")
        ax.annotate("source", (1.0, source_ppl), xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel(f"whole-call generation throughput vs source (x, {setting})")
    ax.set_ylabel("held-out perplexity (Python-docs tail)")
    ax.set_yscale("log")
    ax.margins(x=0.2)  # room for the labels of the rightmost points
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def markdown(rows: list[dict], step0_json: Path = ROOT / "benchmarks" / "results" / "step0_ppl.json") -> str:
    """The README table: one line per mapping, every figure read from the rows (nothing typed by hand); the
    step-0 perplexity of a mapping not uptrained yet comes from ``benchmarks/step0_ppl.py``'s results."""
    scored = {r["mapping"]: r["perplexity"] for r in json.loads(step0_json.read_text())["results"]
              if r.get("init") in (None, "sink")} if step0_json.is_file() else {}
    source = next(row for row in rows if row["mapping"] == "source")
    budgets = sorted({int(b) for row in rows for b in row["uptraining"]})
    settings = list(source.get("speed", {}))
    source_ppl = next((r["source_ppl"] for row in rows for r in row["uptraining"].values()), None)
    kv_key = next(iter(source["kv_cache_bytes_per_sequence"]))
    ood_source = source.get("ood_ppl", {}).get("source")
    ood_budgets = sorted({int(b) for row in rows for b in row.get("ood_ppl", {}) if b != "source"}) if ood_source else []
    header = ["mapping (`--block-layers` / `--token-layers`, L_B)", "parameters", f"KV cache / seq ({kv_key})",
              "step-0 ppl", *(f"ppl after {b // 1000}k (× source)" for b in budgets),
              *(f"{OOD_SET} ppl after {b // 1000}k (× source)" for b in ood_budgets),
              *(f"whole-call speed-up {s}" for s in settings), *(f"decode speed-up {s}" for s in settings)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        if row["mapping"] == "source":
            name, step0 = "source (vanilla)", f"{source_ppl:.1f}" if source_ppl else "—"
        else:
            name = f"{row['mapping']} (`{row['block_layers']}` / `{row['token_layers']}`, {row['block_len']})"
            first = next((r["step0_ppl"] for r in row["uptraining"].values()), scored.get(row["mapping"]))
            step0 = "—" if first is None else f"{first:.3g}"
        cells = [name, f"{row['parameters'] / 1e6:.0f}M", f"{row['kv_cache_bytes_per_sequence'][kv_key] / 2**20:.1f} MB", step0]
        for budget in budgets:
            result = row["uptraining"].get(str(budget))
            cells.append(f"{result['final_ppl']:.1f} ({result['final_ppl'] / result['source_ppl']:.1f}×)" if result else
                         ("—" if row["mapping"] == "source" else "not run"))
        for budget in ood_budgets:
            ppl = row.get("ood_ppl", {}).get(str(budget))
            cells.append(f"{ood_source:.1f}" if row["mapping"] == "source" else
                         f"{ppl:.1f} ({ppl / ood_source:.1f}×)" if ppl else "not run")
        for key in ("whole_call_tokens_per_s", "decode_tokens_per_s"):
            for setting in settings:
                figures = row.get("speed", {}).get(setting)
                cells.append("1×" if row["mapping"] == "source" else
                             f"{figures['vs_source'][key]:.2f}×" if figures else "not measured")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    names = [name.strip() for name in args.mappings.split(",") if name.strip()]
    unknown = [name for name in names if name not in MAPPINGS]
    if unknown:
        sys.exit(f"unknown mapping {unknown[0]!r}: choose from {', '.join(MAPPINGS)}")
    previous = json.loads(args.json.read_text()) if args.json.is_file() else {"rows": []}
    rows = {row["mapping"]: row for row in previous["rows"]}
    if args.markdown:  # a report of what was measured: nothing runs
        if not rows:
            sys.exit(f"{args.json} holds no measurement yet.")
        if args.plot:
            plot(list(rows.values()), args.json.with_suffix(".png"))
        print(markdown(list(rows.values())))
        return 0
    source, corpus = smollm2_path(), pydocs_path()
    if not source.exists() or not corpus.exists():
        sys.exit("missing demo assets: run `bt-fetch-demo` first.")
    if "source" not in rows:  # the reference row: the source's own KV cache and size
        rows["source"] = {"mapping": "source", "uptraining": {}, **_source_figures(source, args.bench)}
    if "ood" not in args.skip.split(",") and general_path(OOD_SET).exists():
        rows["source"]["ood_ppl"] = {"source": ood_perplexity(source, args.workdir, args)}

    def write() -> None:
        report = {"benchmark": "tradeoff", "default": DEFAULT, "rows": list(rows.values())}
        write_text_atomic(args.json, json.dumps(report, indent=2) + "\n")

    for name in names:
        before, row = rows.get(name, {}), measure(name, args, source)
        for key in ("uptraining", "commands", "ood_ppl"):  # budgets and commands of earlier runs stay
            row[key] = {**before.get(key, {}), **row[key]}
        rows[name] = {**before, **row}
        write()
        logger.info("%s measured; wrote %s", name, args.json)
    if "bench" not in args.skip.split(","):
        speed, meta = bench_all(names, args, source)
        for row in rows.values():  # speed figures of one source run only: none left from another
            row.pop("speed", None)
            row.pop("speed_measurement", None)
            if row["mapping"] in speed:
                row["speed"], row["speed_measurement"] = speed[row["mapping"]], meta
        write()
        logger.info("speed measured; wrote %s", args.json)
    if args.plot:
        plot(list(rows.values()), args.json.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
