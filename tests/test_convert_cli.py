"""bt-convert end to end, and every bad input: one clear line, exit code != 0, nothing left behind."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, BartConfig

from block_transformer.cli import convert_cmd
from block_transformer.convert import LayerMapping
from block_transformer.convert.convert import convert_model
from conftest import VOCAB, assert_one_line_error, save_source, tiny_source


def run(*args: str):
    return CliRunner().invoke(convert_cmd, [str(a) for a in args])


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "gpt_neox"])
def test_convert_end_to_end(source_folder, tmp_path, model_type):
    out = tmp_path / "bt"
    result = run(source_folder, "--block-len", 2, "--split", "1/3", "-o", out)
    assert result.exit_code == 0, result.output
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.conversion["source"] == str(source_folder)
    assert model.config.conversion["split"] == [1, 3] and model.config.block_len == 2
    expected = convert_model(tiny_source(model_type), LayerMapping.partition(1, 3), 2, separator_id=0)
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected(ids).logits, rtol=0, atol=0)


def test_dtype_and_overwrite(source_folder, tmp_path):
    out = tmp_path / "bt"
    assert run(source_folder, "--block-len", 4, "--split", "2/2", "-o", out).exit_code == 0
    result = run(source_folder, "--block-len", 4, "--split", "2/2", "-o", out, "--dtype", "bfloat16", "--overwrite")
    assert result.exit_code == 0, result.output
    model = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert model.dtype == torch.bfloat16 and model.config.conversion["dtype"] == "bfloat16"


def test_help_has_examples():
    result = CliRunner().invoke(convert_cmd, ["--help"])
    assert result.exit_code == 0 and "bt-convert gpt2 --block-len 4 --split 6/6 -o gpt2-bt" in result.output


@pytest.fixture
def gpt2_folder(tmp_path_factory):
    return save_source(tmp_path_factory.mktemp("src-gpt2"), "gpt2")


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--block-len", 4, "--split", "3/2"], ["split 3/2 does not fit a 4-layer model", "e.g. 2/2"]),
        (["--block-len", 4, "--split", "0/4"], ["both sides >= 1"]),
        (["--block-len", 4, "--split", "4/0"], ["both sides >= 1"]),
        (["--block-len", 4, "--split", "two/two"], ["--split must look like A/B"]),
        (["--block-len", 0, "--split", "2/2"], ["--block-len must be >= 1"]),
        (["--block-len", 4, "--split", "2/2", "--prefix-tokens", 0], ["--prefix-tokens must be >= 1"]),
        (["--block-len", 4, "--split", "2/2", "--separator", "<nope>"], ["--separator '<nope>' is not a token"]),
        (["--block-len", 4, "--split", "2/2", "--init", "zero"], ["'zero' is not one of 'sink', 'reference'"]),
    ],
)
def test_bad_parameters(gpt2_folder, tmp_path, args, fragments):
    out = tmp_path / "out"
    assert_one_line_error(run(gpt2_folder, *args, "-o", out), *fragments)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == []


def test_unsupported_architecture(tmp_path):
    src = tmp_path / "bart"
    BartConfig(d_model=16, encoder_layers=2, decoder_layers=2, vocab_size=64).save_pretrained(src)
    result = run(src, "--block-len", 4, "--split", "1/1", "-o", tmp_path / "out")
    assert_one_line_error(result, "cannot convert 'bart'", "encoder-decoder")
    assert not (tmp_path / "out").exists()


def test_output_exists(gpt2_folder, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    assert_one_line_error(run(gpt2_folder, "--block-len", 4, "--split", "2/2", "-o", out), "--overwrite")
    assert (out / "mine.txt").read_text() == "keep me"


@pytest.mark.parametrize("spec", ["./does-not-exist", "/no/such/model.gguf", "a/b/c"])
def test_missing_source_path(tmp_path, spec):
    result = run(spec, "--block-len", 4, "--split", "2/2", "-o", tmp_path / "out")
    assert_one_line_error(result, "no such")
    assert not (tmp_path / "out").exists()


def test_corrupt_weights(gpt2_folder, tmp_path):
    weights = gpt2_folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    result = run(gpt2_folder, "--block-len", 4, "--split", "2/2", "-o", tmp_path / "out")
    assert_one_line_error(result, "could not load the weights", "truncated or corrupt")
    assert not (tmp_path / "out").exists()


class _Payload:
    """Stands for whatever code a malicious pickle would run; weights_only loading refuses its global."""


def test_pickle_weights_are_refused_for_safety_not_called_corrupt(gpt2_folder, tmp_path):
    """Regression: a refused pickle was reported as 'truncated or corrupt'."""
    import torch
    from safetensors.torch import load_file

    state = {**load_file(gpt2_folder / "model.safetensors"), "payload": _Payload()}
    (gpt2_folder / "model.safetensors").unlink()
    torch.save(state, gpt2_folder / "pytorch_model.bin")
    result = run(gpt2_folder, "--block-len", 4, "--split", "2/2", "-o", tmp_path / "out")
    assert_one_line_error(result, "pickle weights", "refused for safety", "safetensors")
    assert not (tmp_path / "out").exists()


def _cli_subprocess(tmp_path, env_overrides: dict, *args: str):
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), **env_overrides}
    started = time.perf_counter()
    cmd = [str(Path(sys.executable).parent / "bt-convert"), *args]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    return result, time.perf_counter() - started


@pytest.mark.slow
def test_unreachable_hub_fails_fast(tmp_path):
    result, seconds = _cli_subprocess(
        tmp_path,
        {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"},  # port 9 (discard): nothing listens
        "someorg/some-model", "--block-len", "4", "--split", "2/2", "-o", str(tmp_path / "out"),
    )
    assert result.returncode != 0
    assert "cannot reach the Hugging Face hub" in result.stderr and "HF_HUB_OFFLINE=1" in result.stderr
    assert seconds < 20, f"took {seconds:.1f} s"
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_offline_and_not_cached(tmp_path):
    result, _ = _cli_subprocess(
        tmp_path, {"HF_HUB_OFFLINE": "1"}, "gpt2", "--block-len", "4", "--split", "6/6", "-o", str(tmp_path / "out")
    )
    assert result.returncode != 0 and "not in the local Hugging Face cache" in result.stderr


@pytest.mark.slow
def test_hub_id_from_the_local_cache(tmp_path):
    """A hub id that is already in the Hugging Face cache converts without touching the network."""
    commit = "0" * 40
    repo = tmp_path / "hf" / "hub" / "models--someorg--tiny-llama"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    save_source(snapshot, "llama")
    result, _ = _cli_subprocess(
        tmp_path,
        {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"},
        "someorg/tiny-llama", "--block-len", "4", "--split", "2/2", "-o", str(tmp_path / "out"),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.conversion["source"] == "someorg/tiny-llama"
    assert model.config.conversion["source_kind"] == "hub"
    assert "base_model: someorg/tiny-llama" in (tmp_path / "out" / "README.md").read_text()


@pytest.mark.parametrize("where", ["same", "parent"])
def test_output_that_is_or_contains_the_source_is_refused(gpt2_folder, where):
    """Regression: `bt-convert SRC -o SRC --overwrite` replaced the source model with the converted one."""
    before = sorted(p.name for p in gpt2_folder.iterdir())
    out = gpt2_folder if where == "same" else gpt2_folder.parent
    result = run(gpt2_folder, "--block-len", 4, "--split", "2/2", "-o", out, "--overwrite")
    assert_one_line_error(result, "would destroy the input")
    assert sorted(p.name for p in gpt2_folder.iterdir()) == before
