"""Input that is wrong in ways a careful user would not think of: each is one ``Error:`` line before any work."""

from __future__ import annotations

import logging

import pytest
from click.testing import CliRunner

from block_transformer.cli import eval_cmd
from block_transformer.data_spec import DataSpec
from block_transformer.modeling import BlockTransformerForCausalLM
from block_transformer.sources import Source
from block_transformer.uptrain import load_recipe
from block_transformer.uptrain.command import uptrain_cmd
from conftest import TINY_RECIPE, assert_one_line_error, save_source


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
    (["train.freeze_pretrained_steps=9"], ["train.freeze_pretrained_steps 9 is longer than the run (8 steps)"]),
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


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return save_source(tmp_path_factory.mktemp("src"), "llama")


@pytest.fixture
def no_model_work(monkeypatch):
    """Loading a model (a source to convert or score, or a converted folder) fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the data was checked")

    monkeypatch.setattr(Source, "load_model", refuse)
    monkeypatch.setattr(BlockTransformerForCausalLM, "from_pretrained", refuse)


_CHUNK = 1 << 20  # the UTF-8 check reads in chunks of this size: a character cut by a chunk's end is no error

BAD_DATA = {
    "empty.txt": ({"empty.txt": b""}, ["empty.txt holds no text"]),
    "empty.jsonl": ({"empty.jsonl": b""}, ["empty.jsonl holds no text"]),
    "blank texts.jsonl": ({"blank.jsonl": b'{"text": ""}\n\n{"text": ""}\n'}, ["blank.jsonl holds no text"]),
    "a folder of empty files": ({"a.txt": b"", "b.jsonl": b""}, ["(2 files) holds no text"]),
    "latin-1.txt": ({"ok.txt": "déjà vu".encode(), "latin.txt": "naïve".encode("latin-1")},
                    ["latin.txt is not UTF-8 text: byte 2 (line 1)", "iconv"]),
    "bad line.jsonl": ({"bad.jsonl": b'{"text": "ok"}\n{"text": "\xc3("}\n'},
                       ["bad.jsonl is not UTF-8 text: byte 25 (line 2)"]),
    "cut at the end.txt": ({"cut.txt": b"ab\ncd\xe2\x82"}, ["cut.txt is not UTF-8 text: byte 5 (line 2)"]),
    "bad in the second chunk.txt": ({"big.txt": b"x" * (_CHUNK - 1) + "€".encode() + b"\n\xff"},
                                    [f"big.txt is not UTF-8 text: byte {_CHUNK + 3:,} (line 2)"]),
}


def _write(folder, files: dict[str, bytes]):
    folder.mkdir()
    for name, content in files.items():
        (folder / name).write_bytes(content)
    return folder / next(iter(files)) if len(files) == 1 else folder


@pytest.mark.parametrize("case", BAD_DATA)
def test_unreadable_data_is_one_error_before_any_model_work(source, tmp_path, no_model_work, case):
    """Regression: empty data and invalid UTF-8 were an IndexError or UnicodeDecodeError traceback in
    bt-uptrain (after conversion) and a UnicodeDecodeError in bt-eval."""
    files, fragments = BAD_DATA[case]
    data = _write(tmp_path / "data", files)
    sets = [f"model.source={source}", f"data.train={data}", f"output.dir={tmp_path / 'out'}"]
    uptrain = CliRunner().invoke(uptrain_cmd, [str(TINY_RECIPE), *(a for item in sets for a in ("--set", item))])
    assert_one_line_error(uptrain, *fragments)
    assert not (tmp_path / "out").exists()
    evaluation = CliRunner().invoke(eval_cmd, [str(source), "--data", str(data), "--seq-len", "16"])
    assert_one_line_error(evaluation, *fragments)


def test_data_that_is_utf8_throughout_reads_whole(tmp_path):
    """The chunked check passes a character cut by a chunk's end, and empty files beside text ones."""
    data = _write(tmp_path / "data", {"big.txt": b"x" * (_CHUNK - 1) + "€ü".encode(), "empty.txt": b""})
    assert [name for name, _ in DataSpec.parse(str(data)).documents()] == ["big.txt"]


def test_eval_batch_size_zero_is_refused_by_the_cli(tmp_path):
    result = CliRunner().invoke(eval_cmd, ["some-model", "--data", str(tmp_path), "--batch-size", "0"])
    assert result.exit_code == 2 and "--batch-size" in result.output and "x>=1" in result.output, result.output
