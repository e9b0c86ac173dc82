"""Recipes: every bad recipe is one clear error before any work starts; --set and --dry-run."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from block_transformer.convert import LayerMapping
from block_transformer.convert.convert import convert_model
from block_transformer.modeling import BlockTransformerForCausalLM
from block_transformer.sources import Source
from block_transformer.uptrain import RecipeError, load_recipe
from block_transformer.uptrain.command import uptrain_cmd
from block_transformer.uptrain.data import require_heldout_source
from block_transformer.uptrain.preflight import check_seq_len, micro_batch_size, read_blueprint
from conftest import FAMILIES, TINY_RECIPE, assert_one_line_error, learnable_corpus, save_source, tiny_recipe, tiny_source

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


@pytest.fixture
def recipe_file(tmp_path):
    """The tiny recipe with real paths, written out as a user would have it."""
    raw = yaml.safe_load(TINY_RECIPE.read_text())
    raw["model"]["source"] = str(save_source(tmp_path / "src", "llama"))
    raw["data"]["train"] = str(learnable_corpus(tmp_path / "corpus"))
    raw["output"]["dir"] = str(tmp_path / "out")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def run(*args):
    return CliRunner().invoke(uptrain_cmd, [str(a) for a in args])


@pytest.mark.parametrize("sets, fragments", [
    (["train.max_step=5"], ["unknown key train.max_step", "did you mean train.max_steps?"]),
    (["trian.lr=1"], ["unknown key trian", "did you mean train?"]),
    (["lora.rank=8"], ["unknown key lora.rank", "(valid: enabled, r, alpha, dropout)"]),
    (["train.lr=fast"], ["train.lr", "valid number"]),
    (["train.lr=-1e-4"], ["train.lr", "greater than 0"]),
    (["data.seq_len=30"], ["data.seq_len 30 is not a multiple of model.block_len 4"]),
    (["train.max_tokens=1000"], ["exactly one budget"]),
    (["model.path=somewhere"], ["exactly one of model.path", "model.source"]),
    (["data.heldout_fraction=1.5"], ["data.heldout_fraction", "less than 1"]),
    (["distill.hidden_layers=[0]"], ["distill: hidden_layers: list token-decoder layers as 1, 2"]),
    (["train.mixed_precision=fp8"], ["train.mixed_precision", "'auto', 'no', 'bf16' or 'fp16'"]),
    (["train.batch_size=3"], ["train.batch_size 3 must be a multiple of train.micro_batch_size (2)"]),
    (["data.separator=<nope>"], ["data.separator '<nope>' is not a token"]),
    (["model.init=zero"], ["model.init", "'sink' or 'reference'"]),
    (["distill.hidden_weight=1", "distill.hidden_layers=[3]"], ["distill.hidden_layers [3] out of range", "1..2"]),
    (["lr=1"], ["unknown key lr", "did you mean"]),
    (["train.lr"], ["use --set section.key=value"]),
])
def test_bad_recipes_fail_before_work(recipe_file, tmp_path, sets, fragments):
    args = [recipe_file]
    for item in sets:
        args += ["--set", item]
    assert_one_line_error(run(*args), *fragments)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.checkpoints").exists()


@pytest.mark.parametrize("args, fragment", [
    (["--set", "data.separator=<nope>"], "data.separator '<nope>' is not a token"),
    (["--set", "model.separator=<nope>"], "model.separator '<nope>' is not a token"),
    (["--set", "distill.hidden_weight=1", "--set", "distill.hidden_layers=[3]"], "distill.hidden_layers [3] out of range"),
    (["--set", "model.split=3/2"], "split"),
    (["--resume"], "no checkpoint to resume from"),
])
def test_what_needs_no_weights_is_checked_before_any_weights_load(recipe_file, monkeypatch, args, fragment):
    def no_weights(*args, **kwargs):
        raise AssertionError("weights were loaded before the recipe was checked")

    monkeypatch.setattr(Source, "load_model", no_weights)
    monkeypatch.setattr(BlockTransformerForCausalLM, "from_pretrained", no_weights)
    assert_one_line_error(run(recipe_file, *args), fragment)


def test_missing_data_and_model_files(recipe_file, tmp_path):
    assert_one_line_error(run(recipe_file, "--set", f"data.train={tmp_path / 'nothing'}"), "no such file or folder")
    assert_one_line_error(run(recipe_file, "--set", f"model.source={tmp_path / 'no-model'}"), "no such file or folder")
    assert_one_line_error(run(tmp_path / "missing.yaml"), "no such recipe file")
    (tmp_path / "bad.yaml").write_text("model: [1, 2\n")
    assert_one_line_error(run(tmp_path / "bad.yaml"), "not valid YAML")


def test_existing_output_is_refused_and_resume_needs_a_checkpoint(recipe_file, tmp_path):
    (tmp_path / "out").mkdir()
    assert_one_line_error(run(recipe_file), "already exists", "overwrite")
    assert_one_line_error(run(recipe_file, "--resume"), "no checkpoint to resume from")


def test_dry_run_prints_recipe_counts_and_budget(recipe_file, tmp_path):
    result = run(recipe_file, "--dry-run", "--set", "train.max_steps=10", "--set", "lora.enabled=true")
    assert result.exit_code == 0, result.output
    assert "max_steps: 10" in result.output and "enabled: true" in result.output
    assert "budget: 10 steps x 128 tokens = 1,280 tokens" in result.output
    counts = result.output.split("parameters: ")[1].splitlines()[0]
    assert "trainable" in counts and "frozen" in counts and "new" in counts
    assert not (tmp_path / "out").exists()


def test_overrides_are_parsed_as_yaml(recipe_file):
    recipe = load_recipe(recipe_file, ["train.lr=1e-4", "distill.hidden_layers=[1, 2]", "lora.enabled=yes"])
    assert recipe.train.lr == 1e-4 and recipe.distill.hidden_layers == [1, 2] and recipe.lora.enabled


def test_mixed_precision_no_is_not_read_as_false(recipe_file, tmp_path):
    """YAML reads a bare `no` as false; `mixed_precision: no` was refused with "should be 'auto', 'no', ..."."""
    assert load_recipe(recipe_file, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    written = tmp_path / "no.yaml"
    written.write_text(recipe_file.read_text().replace("train:\n", "train:\n  mixed_precision: no\n", 1))
    assert load_recipe(written).train.mixed_precision == "no"
    with pytest.raises(RecipeError, match="mixed_precision"):
        load_recipe(recipe_file, ["train.mixed_precision=true"])


@pytest.mark.parametrize("name, processes, steps", [
    ("smollm2-pydocs.yaml", 1, 293),  # the CPU demo
    ("pile.yaml", 8, 14_306),  # accelerate launch --num_processes 8
])
def test_shipped_recipes_fit_the_runs_they_document(name, processes, steps):
    """What the schema cannot check: the budget in steps, the batch split over the documented processes,
    sequences of whole blocks, a held-out set for streamed data (each raises when it does not hold)."""
    recipe = load_recipe(RECIPES / name)
    assert recipe.total_steps == steps
    micro_batch_size(recipe, processes)
    check_seq_len(recipe, recipe.model.block_len)
    require_heldout_source(recipe.data)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_dry_run_plans_the_config_the_conversion_builds(tmp_path, model_type):
    """The dry run plans the conversion on the meta device (no weights read): same layout, same tying."""
    planned = read_blueprint(tiny_recipe(tmp_path, model_type)).config
    built = convert_model(tiny_source(model_type), LayerMapping.partition(2, 2), 4, separator_id=0).config
    for name in ("tie_word_embeddings", "decoder_layers", "block_decoder_final_norm", "lm_head_bias",
                 "separate_token_embeddings", "conversion", "embedding_norm", "head_transform"):
        assert getattr(planned, name) == getattr(built, name), name
    window = [getattr(c.block_decoder_config, "sliding_window", None) for c in (planned, built)]
    assert window[0] == window[1]


def test_recipe_error_type():
    with pytest.raises(RecipeError):
        load_recipe(TINY_RECIPE, ["train.nope=1"])


def test_a_converted_folder_finds_its_local_source_as_the_teacher(recipe_file, tmp_path):
    """Regression: a folder converted from a local source could not name its teacher; --dry-run passed and
    the run failed later. Conversion now records the source's resolved path and the plan resolves it."""
    from block_transformer.cli import convert_cmd

    source = yaml.safe_load(recipe_file.read_text())["model"]["source"]
    folder = tmp_path / "converted"
    converted = CliRunner().invoke(convert_cmd, [source, "--block-len", "4", "--split", "2/2", "-o", str(folder)])
    assert converted.exit_code == 0, converted.output
    sets = ["--set", "model.source=null", "--set", f"model.path={folder}", "--set", "distill.hidden_weight=1.0"]
    result = run(recipe_file, "--dry-run", *sets)
    assert result.exit_code == 0, result.output
    Path(source).rename(tmp_path / "moved")  # once the source is gone, the error says what to set, before any work
    assert_one_line_error(run(recipe_file, "--dry-run", *sets), "set distill.teacher")


@pytest.mark.parametrize("field", ["data.train", "model.source"])
def test_an_output_that_is_or_contains_an_input_is_refused(recipe_file, field):
    """Regression: bt-uptrain's output could be the model, teacher or data folder it reads."""
    value = yaml.safe_load(recipe_file.read_text())[field.split(".")[0]][field.split(".")[1]]
    result = run(recipe_file, "--dry-run", "--set", f"output.dir={value}", "--set", "output.overwrite=true")
    assert_one_line_error(result, "would destroy the input")
