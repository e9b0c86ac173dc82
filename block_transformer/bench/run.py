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

logger = logging.getLogger(__name__)

# (label, kind, cache_implementation): what a user would otherwise run, next to the converted model
VARIANTS = (
    ("block_transformer", "block_transformer", None),
    ("vanilla_dynamic", "vanilla", None),
    ("vanilla_static", "vanilla", "static"),
)
RATIO_KEYS = ("whole_call_tokens_per_s", "decode_tokens_per_s")
INVERSE_RATIO_KEYS = ("time_to_first_token_s", "peak_rss_bytes", "kv_cache_bytes_per_sequence")


def _worker(kind: str, spec: str, setting: Setting, dtype: str, device: str, threads: int, repeats: int,
            cache_implementation: str | None) -> dict:
    cmd = [
        sys.executable, "-m", "block_transformer.bench.worker",
        "--kind", kind, "--model", spec, "--setting", json.dumps(asdict(setting)), "--dtype", dtype,
        "--device", device, "--threads", str(threads), "--repeats", str(repeats),
    ]
    if cache_implementation:
        cmd += ["--cache-implementation", cache_implementation]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in result.stdout.splitlines() if line.startswith("BENCH_RESULT ")]
    if result.returncode != 0 or not lines:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise BlockTransformerError(f"benchmark worker for {spec} ({kind}) failed: {tail[0]}")
    return json.loads(lines[-1].removeprefix("BENCH_RESULT "))


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
    config_path = Path(model) / "config.json"
    if not config_path.is_file():
        raise BlockTransformerError(f"{model} is not a converted model folder (no config.json): run bt-convert first.")
    config = json.loads(config_path.read_text())
    if config.get("model_type") != "block_transformer":
        raise BlockTransformerError(f"{model} is not a Block Transformer folder (model_type {config.get('model_type')!r}).")
    resolve_source(baseline)  # a missing baseline fails now, not after the model's benchmark
    dtype = dtype or config.get("dtype") or "float32"
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    threads = threads or torch.get_num_threads()
    before = environment.describe(device, threads)
    environment.warn_if_busy(before)
    rows = []
    for setting in settings:
        measured = {}
        for label, kind, cache in VARIANTS:
            spec = model if kind == "block_transformer" else baseline
            logger.info("%s: %s", setting.name, label)
            measured[label] = _worker(kind, spec, setting, dtype, device, threads, repeats, cache)
        rows.append({"setting": asdict(setting) | {"name": setting.name}, "results": measured,
                     "ratios": {f"vs_{label}": _ratios(measured["block_transformer"], measured[label])
                                for label, _, _ in VARIANTS[1:]}})
    return {
        "benchmark": "bt-bench",
        "model": model,
        "baseline": baseline,
        "dtype": dtype,
        "device": device,
        "threads": threads,
        "repeats": repeats,
        "environment": before,
        "load_after": environment.machine_load(),
        "rows": rows,
    }


def _ratios(bt: dict, vanilla: dict) -> dict:
    """BT / vanilla for throughputs, vanilla / BT for times and bytes: > 1 always means BT is better."""
    ratios = {key: bt[key] / vanilla[key] for key in RATIO_KEYS}
    ratios.update({key: vanilla[key] / bt[key] for key in INVERSE_RATIO_KEYS if bt.get(key) and vanilla.get(key)})
    ideal = vanilla["bytes_per_decode_step"]["total_bytes"] / bt["bytes_per_decode_step"]["total_bytes"]
    ratios["ideal_decode_speedup_from_bytes"] = ideal
    return ratios


def format_table(record: dict) -> str:
    """A plain-text table: one line per setting and variant, ratios against vanilla with the dynamic cache."""
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

