"""Layer mappings beyond partition: duplicate, interleaved and asymmetric selections of source layers."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, DeepseekV3Config, Qwen2MoeConfig

from block_transformer.cli import convert_cmd
from block_transformer.convert import LayerMapping
from block_transformer.convert.convert import convert_model
from block_transformer.convert.coverage import batch_generates_alone, exact_copies, tiny_source as random_source
from block_transformer.convert.discovery import position_signal
from block_transformer.convert.families import family_for
from block_transformer.convert.mapping import format_layers, parse_layers
from block_transformer.convert.probe import probe
from block_transformer.convert.surgery import _sub_config
from block_transformer.errors import ConversionError
from block_transformer.export import save_model_folder
from conftest import VOCAB, assert_one_line_error, save_source, tiny_recipe, tiny_source, tiny_tokenizer

DUPLICATE = LayerMapping((0, 1, 2, 3), (0, 1, 2, 3))
INTERLEAVED = LayerMapping((0, 2), (1, 3))


@pytest.mark.parametrize(
    ("text", "layers", "formatted"),
    [
        ("0-3,8", (0, 1, 2, 3, 8), "0-3,8"),
        ("5", (5,), "5"),
        (" 0 - 2 , 4 ", (0, 1, 2, 4), "0-2,4"),
        ("0-8:2", (0, 2, 4, 6, 8), "0,2,4,6,8"),
        ([1, 3], (1, 3), "1,3"),
    ],
)
def test_layer_lists_parse(text, layers, formatted):
    assert parse_layers(text, "--block-layers") == layers
    assert format_layers(layers) == formatted
    assert parse_layers(formatted, "--block-layers") == layers


@pytest.mark.parametrize(
    ("text", "message"),
    [("a", "comma-separated layer indices"), ("3-1", "runs backwards"), ("0-4:0", "step"), ("1,,2", "comma-separated"),
     (["1"], "ints")],
)
def test_bad_layer_lists_are_refused(text, message):
    with pytest.raises(ConversionError, match=message):
        parse_layers(text, "--block-layers")


@pytest.mark.parametrize(
    ("mapping", "message"),
    [
        (LayerMapping((0, 1), ()), "--token-layers is empty"),
        (LayerMapping((0, 4), (1,)), "names layer 4, but the source has layers 0-3"),
        (LayerMapping((0, 1), (3, 2)), "ascending order without repeats"),
        (LayerMapping((0, 1, 1), (2, 3)), "ascending order without repeats"),
    ],
)
def test_bad_mappings_are_refused(mapping, message):
    with pytest.raises(ConversionError, match=message):
        mapping.check(4)


def test_options_choose_one_mapping():
    assert LayerMapping.from_options("2/2", None, None) == LayerMapping.partition(2, 2)
    assert LayerMapping.from_options(None, "0-3", "0-3") == DUPLICATE
    assert LayerMapping.from_options(None, None, None) is None
    with pytest.raises(ConversionError, match="not both"):
        LayerMapping.from_options("2/2", "0-1", "2-3")
    with pytest.raises(ConversionError, match="go together"):
        LayerMapping.from_options(None, "0-1", None)
    assert [m.kind(4) for m in (LayerMapping.partition(1, 3), DUPLICATE, INTERLEAVED)] == ["partition", "duplicate", "custom"]


@pytest.mark.parametrize("mapping", [DUPLICATE, INTERLEAVED, LayerMapping((0, 1, 2), (3,)), LayerMapping((0,), (1, 2, 3))])
@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_every_mapping_copies_exactly_and_decodes_exactly(model_type, mapping):
    source = tiny_source(model_type)
    model = convert_model(source, mapping, 2, separator_id=0)
    conv = model.config.conversion
    assert (conv["block_layers"], conv["token_layers"]) == (list(mapping.block), list(mapping.token))
    assert conv["split"] == [len(mapping.block), len(mapping.token)]
    assert exact_copies(source, model)  # a layer in both decoders: two equal tensors, not one shared
    assert batch_generates_alone(model, new_tokens=6)
    assert probe(source, model).passed


def test_duplicated_layers_train_independently():
    model = convert_model(tiny_source("llama"), DUPLICATE, 2, separator_id=0)
    block = model.block_decoder.layers[1].mlp.up_proj.weight
    token = model.token_decoder.layers[1].mlp.up_proj.weight
    with torch.no_grad():
        block.add_(1.0)
    assert not torch.equal(block, token)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
@pytest.mark.parametrize("mapping", [DUPLICATE, INTERLEAVED, LayerMapping((0, 1), (2, 3))])
def test_sink_init_reads_the_state_before_the_first_token_layer(model_type, mapping):
    """The token-decoder input table holds what the source's layer t0 saw for [separator, v] at position 1,
    less the position signal the token decoder adds itself; prefix slot 1 what it saw at position 0."""
    source = tiny_source(model_type)
    model = convert_model(source, mapping, 2, separator_id=0)
    first = mapping.token[0]
    vocab = torch.arange(VOCAB)
    ids = torch.stack([torch.zeros_like(vocab), vocab], dim=1)  # [separator, v]
    with torch.no_grad():
        seen = source(input_ids=ids, output_hidden_states=True).hidden_states[first]  # input of layer t0
        added = position_signal(model.token_decoder, model.token_decoder.get_submodule(model.config.decoder_layers),
                                torch.arange(2).unsqueeze(0), model.config.hidden_size, torch.float32)
    torch.testing.assert_close(model.token_embed_tokens.weight, seen[:, 1] - added[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.prefix.bias[: model.config.hidden_size], seen[0, 0] - added[0], atol=1e-5, rtol=1e-5)


def test_duplicate_probe_compares_the_whole_network_and_interleaved_skips_it():
    source = tiny_source("llama")
    duplicate = probe(source, convert_model(source, DUPLICATE, 2, separator_id=0))
    interleaved = probe(source, convert_model(source, INTERLEAVED, 2, separator_id=0))
    assert duplicate.logits_error is not None and duplicate.passed
    assert interleaved.logits_error is None and interleaved.passed


def test_layer_index_fields_follow_a_selection():
    """MoE thresholds and index lists are renumbered so each kept layer builds as its source layer did."""
    config = Qwen2MoeConfig(num_hidden_layers=6, mlp_only_layers=[1, 4])
    config.first_k_dense_replace, config.moe_layer_start_index, config.moe_layer_end_index = 2, 2, 3
    family = family_for("qwen2_moe")
    sub = _sub_config(config, family, (0, 1, 3, 4))
    assert sub.mlp_only_layers == [1, 3]
    assert sub.first_k_dense_replace == 2 and sub.moe_layer_start_index == 2 and sub.moe_layer_end_index == 2
    assert sub.num_hidden_layers == 4


def test_a_moe_family_converts_with_an_interleaved_mapping():
    """DeepSeek-V3's first layer is dense (first_k_dense_replace=1): each decoder keeps it where it was."""
    config = DeepseekV3Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
        first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
        max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    source = random_source(config)
    model = convert_model(source, LayerMapping((0, 2), (0, 1, 3)), 2, separator_id=0)
    assert model.config.block_decoder_config.first_k_dense_replace == 1
    assert model.config.token_decoder_config.first_k_dense_replace == 1
    assert exact_copies(source, model)


def test_mapping_survives_save_load_and_reaches_the_card(tmp_path):
    model = convert_model(tiny_source("llama"), INTERLEAVED, 2, separator_id=0)
    save_model_folder(model, tiny_tokenizer(), tmp_path / "out")
    conv = json.loads((tmp_path / "out" / "config.json").read_text())["conversion"]
    assert (conv["mapping"], conv["block_layers"], conv["token_layers"]) == ("custom", [0, 2], [1, 3])
    card = (tmp_path / "out" / "README.md").read_text()
    assert "block decoder: source layers 0,2; token decoder: source layers 1,3" in card
    assert "source layers 0,2 and the token decoder from 1,3" in card
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True).eval()
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


@pytest.fixture(scope="module")
def source_folder(tmp_path_factory):
    return save_source(tmp_path_factory.mktemp("src-llama"), "llama")


def test_cli_takes_layer_lists(tmp_path, source_folder):
    out = tmp_path / "dup"
    result = CliRunner().invoke(
        convert_cmd, [str(source_folder), "--block-len", "2", "--block-layers", "0-3", "--token-layers", "0-3", "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    conv = json.loads((out / "config.json").read_text())["conversion"]
    assert conv["mapping"] == "duplicate" and conv["split"] == [4, 4]


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--block-layers", "0-1"], ["--block-layers and --token-layers go together"]),
        (["--split", "2/2", "--block-layers", "0-1", "--token-layers", "2-3"], ["not both"]),
        (["--block-layers", "0-1", "--token-layers", "2-9"], ["--token-layers names layer 4", "layers 0-3"]),
        ([], ["give --split A/B"]),
    ],
)
def test_cli_rejects_bad_mappings(tmp_path, source_folder, args, fragments):
    result = CliRunner().invoke(convert_cmd, [str(source_folder), "--block-len", "2", *args, "-o", str(tmp_path / "x")])
    assert result.exit_code != 0
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "x").exists()


def test_recipes_take_the_same_mappings(tmp_path):
    from block_transformer.uptrain.preflight import read_blueprint

    recipe = tiny_recipe(tmp_path, **{"model.split": None, "model.block_layers": "0-3", "model.token_layers": "[0, 1, 2, 3]"})
    blueprint = read_blueprint(recipe)
    assert blueprint.mapping == DUPLICATE
    built = convert_model(tiny_source("llama"), DUPLICATE, 4, separator_id=0).config
    assert blueprint.config.conversion == built.conversion
    with pytest.raises(ConversionError, match="model.block_layers and model.token_layers go together"):
        read_blueprint(tiny_recipe(tmp_path, **{"model.split": None, "model.block_layers": "0-3"}))
    with pytest.raises(ConversionError, match="either model.split or model.block_layers"):
        read_blueprint(tiny_recipe(tmp_path, **{"model.block_layers": "0-3", "model.token_layers": "0-3"}))


def test_probe_checks_every_layer_of_any_mapping():
    """Check (c): each decoder layer, fed what its source layer saw, returns what it returned — so a per-layer
    setting that did not follow its layer is caught even where the logits check cannot run (interleaved)."""
    from block_transformer.convert.coverage import tiny_config

    source = random_source(tiny_config("gemma2"))  # alternating sliding (window 8) and global layers
    model = convert_model(source, INTERLEAVED, 3, separator_id=0)
    report = probe(source, model)
    assert report.passed and report.logits_error is None and report.layers_error < 1e-4
    assert model.token_decoder.config.layer_types == ["full_attention"] * 2  # source layers 1 and 3
    model.token_decoder.config.layer_types = ["sliding_attention", "full_attention"]  # as a wrong slicing would
    report = probe(source, model)
    assert not report.passed and report.failed == "a decoder layer's output"
