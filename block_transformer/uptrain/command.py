"""``bt-uptrain``: the command, also run as ``python -m block_transformer.uptrain`` under
``accelerate launch -m`` and ``torchrun -m`` (see ``__main__``)."""

from __future__ import annotations

import os
from pathlib import Path

import click

from ..commands import command, friendly_errors
from ..logs import setup_logging


@command(
    epilog="""\b
Examples:
  bt-uptrain recipes/smollm2-pydocs.yaml
  bt-uptrain recipes/smollm2-pydocs.yaml --set train.max_tokens=20000 --set distill.kl_weight=0 --dry-run
  bt-uptrain recipes/smollm2-pydocs.yaml --resume            # latest checkpoint of the recipe's run
  accelerate launch --num_processes 8 -m block_transformer.uptrain recipes/pile.yaml
"""
)
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe field, e.g. --set train.lr=1e-4 (value parsed as YAML). Repeatable.")
@click.option("--resume", is_flag=False, flag_value="", default=None, metavar="[DIR]",
              help="Continue from a checkpoint folder, or the latest one of the recipe's checkpoint dir.")
@click.option("--dry-run", is_flag=True, help="Validate, print the resolved recipe, parameter counts and token budget.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@friendly_errors
def uptrain_cmd(recipe, overrides, resume, dry_run, verbose):
    """Uptrain a Block Transformer with a YAML RECIPE (validated before any work starts).

    Runs on whatever `accelerate launch` / torchrun sets up: one CPU, one GPU, DDP, FSDP, DeepSpeed.
    Writes checkpoints to checkpoint.dir and the final model folder (safetensors) to output.dir.
    """
    from .loop import uptrain
    from .preflight import plan
    from .recipe import load_recipe

    setup_logging(verbose)
    parsed = load_recipe(recipe, list(overrides))
    if dry_run:
        click.echo(parsed.to_yaml())
        facts = plan(parsed)
        counts = facts["parameters"]
        click.echo(f"parameters: {counts['total']:,} total, {counts['trainable']:,} trainable, "
                   f"{counts['frozen']:,} frozen, {counts['new']:,} new (not in the source)")
        click.echo(f"budget: {facts['steps']:,} steps x {facts['tokens_per_step']:,} tokens = "
                   f"{facts['token_budget']:,} tokens")
        if parsed.data.mixture:
            total = sum(c.weight for c in parsed.data.components)
            click.echo("mixture: " + ", ".join(f"{c.name} {c.weight / total:.0%}" for c in parsed.data.components))
        click.echo(f"held-out sets: {', '.join(parsed.eval_set_names)} (primary: {parsed.primary_eval_set})")
        return
    out = uptrain(parsed, resume=resume, recipe_name=Path(recipe).name)
    if os.environ.get("RANK", "0") == "0":
        click.echo(f"wrote {out}")
