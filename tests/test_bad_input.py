"""Input that is wrong in ways a careful user would not think of: each is one ``Error:`` line before any work."""

from __future__ import annotations

import logging

import pytest
from click.testing import CliRunner

from block_transformer.uptrain import load_recipe
from block_transformer.uptrain.command import uptrain_cmd
from conftest import TINY_RECIPE, assert_one_line_error


@pytest.mark.parametrize("sets, fragments", [
    (["train.lr=.inf"], ["train.lr", "finite"]),
    (["train.eps=.nan"], ["train.eps", "finite"]),
    (["distill.temperature=.inf"], ["distill.temperature", "finite"]),
    (["train.betas=[2, -1]"], ["train.betas.0", "less than 1", "train.betas.1", "greater than or equal to 0"]),
    (["train.batch_size=true"], ["train.batch_size", "valid integer"]),
    (["train.max_steps=8.0"], ["train.max_steps", "valid integer"]),
    (["train.lr=true"], ["train.lr", "valid number"]),
    (["lora.enabled=1"], ["lora.enabled", "valid boolean"]),
    (["train.warmup_steps=9"], ["train.warmup_steps 9 is longer than the run (8 steps)"]),
    (["train.max_steps=null", "train.max_tokens=256", "train.warmup_steps=3"],  # 256 tokens = 2 steps of 4 x 32
     ["train.warmup_steps 3 is longer than the run (2 steps)"]),
])
def test_recipe_values_a_run_would_reject_fail_the_dry_run(sets, fragments):
    """Regression: an infinite lr, out-of-range betas and a warmup longer than the run were accepted (the
    betas failed as a traceback after conversion); a bool was coerced to a batch size of 1."""
    args = [str(TINY_RECIPE), "--dry-run"]
    for item in sets:
        args += ["--set", item]
    assert_one_line_error(CliRunner().invoke(uptrain_cmd, args), *fragments)


def test_numbers_in_yaml_1_2_form_still_parse():
    """Strict floats take no strings: ``1e-4`` (a string in YAML 1.1) must still read as a number."""
    recipe = load_recipe(TINY_RECIPE, ["train.lr=1e-4", "train.eps=1E-8", "train.betas=[0.8, 0.99]"])
    assert recipe.train.lr == 1e-4 and recipe.train.eps == 1e-8 and recipe.train.betas == (0.8, 0.99)


def test_intervals_longer_than_the_run_warn(caplog):
    with caplog.at_level(logging.WARNING):
        load_recipe(TINY_RECIPE, ["eval.every=8", "checkpoint.every=8"])
    assert not caplog.records
    with caplog.at_level(logging.WARNING):
        load_recipe(TINY_RECIPE, ["eval.every=9", "checkpoint.every=20"])
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("eval.every 9 is longer than the run (8 steps)") for m in messages), messages
    assert any(m.startswith("checkpoint.every 20 is longer than the run (8 steps)") for m in messages), messages
