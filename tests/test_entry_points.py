"""Every command-line tool: -h/--help and --version, answered without importing torch."""

from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner

from block_transformer import __version__, cli

COMMANDS = [cli.convert_cmd, cli.uptrain_cmd, cli.eval_cmd, cli.bench_cmd, cli.push_cmd, cli.fetch_demo_cmd]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.name)
def test_help_and_version(command):
    runner = CliRunner()
    assert runner.invoke(command, ["-h"]).exit_code == 0
    assert "Usage:" in runner.invoke(command, ["--help"]).output
    result = runner.invoke(command, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output


def test_the_tools_start_without_torch_or_transformers():
    """Regression: every CLI, even --help, took ~7 s importing torch and transformers' modeling stack."""
    code = "import sys, block_transformer.cli; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_model_classes_load_on_first_use_and_register_with_the_auto_classes():
    code = (
        "import block_transformer as bt; from transformers import AutoConfig; "
        "cls = bt.BlockTransformerForCausalLM; print(AutoConfig.for_model('block_transformer').__class__.__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "BlockTransformerConfig"
