"""bt-bench: run every (model, setting) in its own worker process, then compare side by side."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from .. import environment
from ..errors import BlockTransformerError
from ..sources import resolve_source
from .settings import Setting
from .workload import Workload

logger = logging.getLogger(__name__)

# (label, kind, worker arguments): what a user would otherwise run, next to the converted model
VARIANTS = (
    ("block_transformer", "block_transformer", []),
    ("vanilla_dynamic", "vanilla", []),
    ("vanilla_static", "vanilla", ["--cache-implementation", "static"]),
)
# a ragged setting also serves the converted model's prompts through its continuous batcher (aligned block phases)
BATCHER_VARIANT = ("block_transformer_batcher", "block_transformer", ["--serve", "batcher"])
RATIO_KEYS = ("whole_call_tokens_per_s", "decode_tokens_per_s")
INVERSE_RATIO_KEYS = ("time_to_first_token_s", "peak_rss_bytes", "kv_cache_bytes_per_sequence")


def _worker(kind: str, spec: str, what: list[str], dtype: str, device: str, threads: int, repeats: int) -> dict:
    """Run one measurement in a fresh process; ``what`` is ``--setting JSON`` (plus ``--cache-implementation X``
    or ``--serve batcher``) or ``--workload JSON --mode M [--no-align-blocks]``."""
    cmd = [
        sys.executable, "-m", "block_transformer.bench.worker", "--kind", kind, "--model", spec, *what,
        "--dtype", dtype, "--device", device, "--threads", str(threads), "--repeats", str(repeats),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in result.stdout.splitlines() if line.startswith("BENCH_RESULT ")]
    if result.returncode != 0 or not lines:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise BlockTransformerError(f"benchmark worker for {spec} ({kind}) failed: {tail[0]}")
    return json.loads(lines[-1].removeprefix("BENCH_RESULT "))


def _check_inputs(model: str, baseline: str, dtype: str | None, device: str | None, threads: int | None):
    """Fail on a bad folder or a missing baseline before any benchmark; resolve dtype, device and threads."""
    config_path = Path(model) / "config.json"
    if not config_path.is_file():
        raise BlockTransformerError(f"{model} is not a converted model folder (no config.json): run bt-convert first.")
    config = json.loads(config_path.read_text())
    if config.get("model_type") != "block_transformer":
        raise BlockTransformerError(f"{model} is not a Block Transformer folder (model_type {config.get('model_type')!r}).")
    resolve_source(baseline)  # a missing baseline fails now, not after the model's benchmark
    dtype = dtype or config.get("dtype") or "float32"
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return dtype, device, threads or torch.get_num_threads()


def _record(model: str, baseline: str, dtype: str, device: str, threads: int, repeats: int, before: dict,
            rows: list) -> dict:
    return {
        "benchmark": "bt-bench", "model": model, "baseline": baseline, "dtype": dtype, "device": device,
        "threads": threads, "repeats": repeats, "environment": before, "load_after": environment.machine_load(),
        "rows": rows,
    }


def run_benchmark(
    model: str,
    baseline: str,
    settings: list[Setting],
    repeats: int = 3,
    threads: int | None = None,
    dtype: str | None = None,
    device: str | None = None,
) -> dict:
    """Measure model and baseline on every setting; returns the full record (ratios BT / vanilla)."""
    dtype, device, threads = _check_inputs(model, baseline, dtype, device, threads)
    before = environment.describe(device, threads)
    environment.warn_if_busy(before)
    rows = []
    for setting in settings:
        measured = {}
        for label, kind, how in VARIANTS + ((BATCHER_VARIANT,) if setting.ragged else ()):
            spec = model if kind == "block_transformer" else baseline
            logger.info("%s: %s", setting.name, label)
            measured[label] = _worker(kind, spec, ["--setting", json.dumps(asdict(setting)), *how], dtype, device,
                                      threads, repeats)
        ratios = {f"vs_{label}": _ratios(measured["block_transformer"], measured[label]) for label, _, _ in VARIANTS[1:]}
        if BATCHER_VARIANT[0] in measured:
            ratios |= {f"batcher_vs_{label}": _ratios(measured[BATCHER_VARIANT[0]], measured[label])
                       for label, _, _ in VARIANTS[1:]}
        rows.append({"setting": asdict(setting) | {"name": setting.name}, "results": measured, "ratios": ratios})
    return _record(model, baseline, dtype, device, threads, repeats, before, rows)


def run_comparison(
    models: dict[str, str],
    baseline: str,
    settings: list[Setting],
    repeats: int = 3,
    threads: int | None = None,
    dtype: str | None = None,
    device: str | None = None,
    source_cache: str | None = None,
) -> dict:
    """Several converted models against one measurement of the source per setting (``models``: label -> folder).

    On a CPU the source's calls are most of a benchmark's time, so comparing N conversions this way costs one
    source run instead of N. Per setting the source runs first, then each model in the given order, each in its
    own worker (warm-up of the full size, median of ``repeats``); the load average is recorded before each.
    Ratios are ``_ratios(model, source)``: > 1 means the model is better. ``dtype`` defaults to the models'
    own, which must then agree.
    """
    if not models:
        raise BlockTransformerError("nothing to compare: give at least one converted folder.")
    resolved = {label: _check_inputs(folder, baseline, dtype, device, threads) for label, folder in models.items()}
    if len({r[0] for r in resolved.values()}) > 1:
        raise BlockTransformerError(
            f"the models hold different dtypes ({', '.join(f'{k}: {r[0]}' for k, r in resolved.items())}): "
            "pass one dtype to compare them at.")
    dtype, device, threads = next(iter(resolved.values()))
    before = environment.describe(device, threads)
    environment.warn_if_busy(before)
    source_label = f"source_{source_cache or 'dynamic'}"
    rows = []
    for setting in settings:
        what = ["--setting", json.dumps(asdict(setting))]
        measured, loads = {}, {}
        for label, kind, spec in [(source_label, "vanilla", baseline),
                                  *((label, "block_transformer", folder) for label, folder in models.items())]:
            logger.info("%s: %s", setting.name, label)
            loads[label] = environment.machine_load()
            extra = ["--cache-implementation", source_cache] if kind == "vanilla" and source_cache else []
            measured[label] = _worker(kind, spec, what + extra, dtype, device, threads, repeats)
        rows.append({"setting": asdict(setting) | {"name": setting.name}, "results": measured, "load_before": loads,
                     "ratios": {label: _ratios(measured[label], measured[source_label]) for label in models}})
    record = _record(",".join(models.values()), baseline, dtype, device, threads, repeats, before, rows)
    return record | {"benchmark": "bt-bench comparison", "models": models, "source": source_label}


# (label, kind, worker arguments) for --workload: the converted model's continuous batcher (also without aligned
# block phases, to show what aligning gives) against the source served by transformers' continuous batching
# and by static batching (groups of `rows` requests)
WORKLOAD_VARIANTS = (
    ("block_transformer", "block_transformer", ["--mode", "continuous"]),
    ("block_transformer_unaligned", "block_transformer", ["--mode", "continuous", "--no-align-blocks"]),
    ("vanilla_continuous", "vanilla", ["--mode", "continuous"]),
    ("vanilla_static_batching", "vanilla", ["--mode", "static"]),
)


def run_workload_benchmark(
    model: str,
    baseline: str,
    workload: Workload,
    repeats: int = 3,
    threads: int | None = None,
    dtype: str | None = None,
    device: str | None = None,
) -> dict:
    """Serve the same requests with each variant; ratios BT / vanilla (``vs_best_source``: the source's faster
    way by generated tokens/s)."""
    dtype, device, threads = _check_inputs(model, baseline, dtype, device, threads)
    before = environment.describe(device, threads)
    environment.warn_if_busy(before)
    measured = {}
    for label, kind, how in WORKLOAD_VARIANTS:
        logger.info("%s: %s", workload.name, label)
        what = ["--workload", json.dumps(asdict(workload)), *how]
        measured[label] = _worker(kind, model if kind == "block_transformer" else baseline, what, dtype, device,
                                  threads, repeats)
    sources = [label for label, kind, _ in WORKLOAD_VARIANTS if kind == "vanilla"]
    best = max(sources, key=lambda label: measured[label]["generated_tokens_per_s"])
    ratios = {f"vs_{label}": _workload_ratios(measured["block_transformer"], measured[label]) for label in sources}
    ratios["vs_best_source"] = ratios[f"vs_{best}"] | {"source": best}
    row = {"setting": asdict(workload) | {"name": workload.name}, "results": measured, "ratios": ratios}
    return _record(model, baseline, dtype, device, threads, repeats, before, [row])


def _workload_ratios(bt: dict, vanilla: dict) -> dict:
    """> 1 always means BT is better: throughputs BT / vanilla, latencies and memory vanilla / BT."""
    return {
        "generated_tokens_per_s": bt["generated_tokens_per_s"] / vanilla["generated_tokens_per_s"],
        "requests_per_s": bt["requests_per_s"] / vanilla["requests_per_s"],
        **{f"{key}_{cut}": vanilla[key][cut] / bt[key][cut]
           for key in ("time_to_first_token_s", "inter_token_latency_s") for cut in ("p50", "p95")
           if bt[key][cut] > 0},  # one new token per request: no gaps
        "peak_rss_bytes": vanilla["peak_rss_bytes"] / bt["peak_rss_bytes"],
    }


def _ratios(bt: dict, vanilla: dict) -> dict:
    """BT / vanilla for throughputs, vanilla / BT for times and bytes: > 1 always means BT is better."""
    ratios = {key: bt[key] / vanilla[key] for key in RATIO_KEYS}
    ratios.update({key: vanilla[key] / bt[key] for key in INVERSE_RATIO_KEYS if bt.get(key) and vanilla.get(key)})
    ideal = vanilla["bytes_per_decode_step"]["total_bytes"] / bt["bytes_per_decode_step"]["total_bytes"]
    ratios["ideal_decode_speedup_from_bytes"] = ideal
    return ratios


def format_table(record: dict) -> str:
    """A plain-text table: one line per setting and variant, then BT's ratios against each."""
    if "workload" in record["rows"][0]["results"]["block_transformer"]:
        return _format_workload(record)
    header = f"{'setting':<24} {'model':<18} {'tok/s':>9} {'decode tok/s':>13} {'TTFT s':>8} {'peak MB':>9} {'KV/seq MB':>10}"
    lines = [header, "-" * len(header)]
    for row in record["rows"]:
        for label, result in row["results"].items():
            lines.append(
                f"{row['setting']['name']:<24} {label:<18} {result['whole_call_tokens_per_s']:>9.1f} "
                f"{result['decode_tokens_per_s']:>13.1f} {result['time_to_first_token_s']:>8.2f} "
                f"{result['peak_rss_bytes'] / 2**20:>9.0f} {result['kv_cache_bytes_per_sequence'] / 2**20:>10.2f}"
            )
        for name, ratios in row["ratios"].items():
            lines.append(
                f"{'':<24} BT {name:<15} whole x{ratios['whole_call_tokens_per_s']:.2f}  "
                f"decode x{ratios['decode_tokens_per_s']:.2f}  TTFT x{ratios['time_to_first_token_s']:.2f}  "
                f"ideal decode x{ratios['ideal_decode_speedup_from_bytes']:.2f}"
            )
    return "\n".join(lines)



def _format_workload(record: dict) -> str:
    row = record["rows"][0]
    header = (f"{'served by':<30} {'req/s':>7} {'gen tok/s':>10} {'TTFT p50':>9} {'TTFT p95':>9} {'ITL p50':>8} "
              f"{'ITL p95':>8} {'peak MB':>8}")
    lines = [row["setting"]["name"], header, "-" * len(header)]
    for label, result in row["results"].items():
        ttft, itl = result["time_to_first_token_s"], result["inter_token_latency_s"]
        lines.append(f"{label:<30} {result['requests_per_s']:>7.2f} {result['generated_tokens_per_s']:>10.1f} "
                     f"{ttft['p50']:>8.2f}s {ttft['p95']:>8.2f}s {itl['p50'] * 1e3:>6.0f}ms {itl['p95'] * 1e3:>6.0f}ms "
                     f"{result['peak_rss_bytes'] / 2**20:>8.0f}")
    for name, ratios in row["ratios"].items():
        lines.append(f"BT {name:<27} gen tok/s x{ratios['generated_tokens_per_s']:.2f}  "
                     f"TTFT p95 x{ratios['time_to_first_token_s_p95']:.2f}  ITL p50 x{ratios.get('inter_token_latency_s_p50', float('nan')):.2f}"
                     + (f"  ({ratios['source']})" if "source" in ratios else ""))
    return "\n".join(lines)
