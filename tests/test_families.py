"""Architecture coverage: descriptors as validated data, discovery, the probe, refusals with a reason.

The whole causal-LM mapping is swept by ``benchmarks/coverage.py``; here a representative subset runs
the same checks (convert → exact copies → probe → padded batch generates alone → reload), plus every
family whose arithmetic is special.
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from block_transformer.cli import convert_cmd
from block_transformer.convert import LayerMapping
from block_transformer.convert.convert import convert_model
from block_transformer.convert.coverage import check_family, tiny_config, tiny_source
from block_transformer.convert.families import families, parse_families
from block_transformer.convert.probe import probe
from block_transformer.convert.discovery import check_architecture, find_structure
from block_transformer.convert.surgery import check_conversion
from block_transformer.errors import ConversionError
from block_transformer.modeling.modeling_block_transformer import DecoderKV, KVLayout, _keys_for_alibi
from conftest import assert_one_line_error, tiny_tokenizer

# What each family brings that another does not (why it is in the subset).
SUBSET = {
    "gemma": "input embeddings scaled by sqrt(D)",
    "gemma2": "final-logit soft-capping, alternating sliding/global layers",
    "gemma3_text": "scaled embedding module, layer_types, QK-norm",
    "cohere": "logit scale, parallel attention/MLP",
    "granite": "embedding, residual and logit multipliers",
    "phi": "partial rotary, parallel residual, LM head with a bias",
    "phi3": "fused QKV and gate/up projections",
    "opt": "learned positions with an offset, layers nested in .decoder",
    "gpt_bigcode": "multi-query attention, learned positions",
    "qwen3": "QK-norm",
    "olmo2": "post-norm residuals",
    "smollm3": "layers without RoPE (per-layer list)",
    "mixtral": "mixture of experts",
    "qwen2_moe": "MoE with a shared expert",
    "deepseek_v3": "multi-head latent attention, dense first layers (threshold shifted)",
    "deepseek_v2": "MLA whose values are narrower than its keys (cache regression)",
    "ctrl": "scales inputs_embeds in place inside the base model (measurement regression)",
    "codegen": "config without pad_token_id (regression)",
    "minicpm3": "residual scale depends on the layer count (a families.yaml entry)",
    "starcoder2": "sliding window, biases",
    "llama4_text": "chunked attention layers, NoPE layers, interleaved MoE layers (a families.yaml entry)",
    "deepseek_v32": "indexer-sparse attention (its own key cache, top-k in blocks), MLA",
    "glm_moe_dsa": "indexer layers that reuse their predecessor's top-k (a families.yaml entry)",
    "diffllama": "a per-layer constant derived from the layer's depth (restored as layer_scalars)",
    "dots3_note_text": "a heterogeneous config (per_layer_config overrides), indexer and sliding layers",
    "beam": "depth-scaled residuals indexed by the layer's depth (restored as layer_scalars)",
    "gpt_neox_japanese": "only the last layer has a bias: the block decoder's last gains a zero one (zero_bias_params)",
    "bloom": "a LayerNorm on the token embeddings (embedding norm), ALiBi built from a padding mask",
    "nanochat": "one parameter-free norm both before the first layer and after the last",
    "longcat_flash": "two attention sub-layers per decoder layer: num_hidden_layers counts those (depth_attr)",
    "modernbert-decoder": "an embedding norm inside an embeddings module, an MLP before the LM head, layer 0 built "
                          "without an attention norm (layer_modules)",
}


@pytest.mark.parametrize("model_type", sorted(SUBSET))
def test_family_converts_and_passes_every_check(model_type):
    result = check_family(model_type)
    assert result.refused is None and result.failure is None, result
    assert result.converts and result.exact_copies and result.generate and result.reloads, result
    assert result.probe, result.details


@pytest.mark.parametrize(
    ("model_type", "reason"),
    [
        ("bart", "encoder-decoder"),
        ("gemma3", "multimodal"),
        ("qwen3_next", "linear_attention layers"),
        ("mamba2", "state-space"),
        ("bert", "encoder stack"),
        ("openai-gpt", "no KV cache"),
        ("hy_v4", "hyper-connections"),
        ("gpt_neo", "per-row cache slots"),
    ],
)
def test_refused_families_say_why(model_type, reason):
    result = check_family(model_type, reload=False)
    assert result.refused and reason in result.refused, result
    assert "\n" not in result.refused


def test_a_variant_of_a_family_is_refused_by_its_config():
    """Regression: Falcon-RW (alibi=true) converted, then its first cached generation step raised a traceback."""
    with pytest.raises(ConversionError, match="alibi=true"):
        check_conversion(tiny_config("falcon", alibi=True), LayerMapping.partition(2, 2), 3, 2)
    check_conversion(tiny_config("falcon"), LayerMapping.partition(2, 2), 3, 2)  # the rest of the family converts


def test_a_refused_family_is_refused_from_its_config_alone():
    with pytest.raises(ConversionError, match="encoder-decoder"):
        check_conversion(tiny_config("bart"), LayerMapping.partition(2, 2), 3, 2)


def test_descriptor_typo_is_an_error_that_names_it():
    raw = {"default": {"separators": ["eos"]}, "mine": {"model_types": ["x"], "layrs": "h"}}
    with pytest.raises(ConversionError, match="'mine': layrs"):
        parse_families(raw)
    with pytest.raises(ConversionError, match="refuse_when needs refuse"):
        parse_families({"default": {"separators": ["eos"]}, "a": {"model_types": ["x"], "refuse_when": {"alibi": True}}})
    with pytest.raises(ConversionError, match="listed twice"):
        parse_families({"default": {"separators": ["eos"]}, "a": {"model_types": ["x"]}, "b": {"model_types": ["x"]}})


def test_shipped_descriptors_inherit_the_defaults():
    table = families()
    assert table["gpt2"].separators == ("<|endoftext|>", "eos")
    assert table["minicpm3"].separators == table["default"].separators
    assert "first_k_dense_replace" in table["minicpm3"].layer_threshold_attrs
    assert all(f.refuse is None or f.refuse.strip() for f in table.values())


def _converted(model_type: str):
    source = tiny_source(tiny_config(model_type))
    return source, convert_model(source, LayerMapping.partition(2, 2), 3, separator_id=0)


def test_probe_catches_a_lost_embedding_multiplier():
    """Exact copies hold either way; only the probe sees Gemma's sqrt(D) go missing."""
    source, model = _converted("gemma")
    assert model.config.embedding_multiplier == pytest.approx(model.config.hidden_size**0.5, rel=1e-3)
    assert probe(source, model).passed
    model.config.embedding_multiplier = 1.0
    report = probe(source, model)
    assert not report.passed and report.input_error > 0.5


def test_probe_catches_a_lost_logit_softcap():
    source, model = _converted("gemma2")
    assert model.config.final_logit_softcapping == source.config.final_logit_softcapping
    model.config.final_logit_softcapping = None
    source.config.final_logit_softcapping = 0.5  # make the cap bite on a random model's small logits
    assert not probe(source, model).passed


def test_probe_catches_a_lost_embedding_norm():
    """BLOOM normalises token embeddings before its first layer; the model holds that norm and applies it once."""
    source, model = _converted("bloom")
    assert model.config.embedding_norm == "word_embeddings_layernorm" and model.config.block_decoder_final_norm == "ln_f"
    assert isinstance(model.block_decoder.word_embeddings_layernorm, torch.nn.Identity)
    assert isinstance(model.token_decoder.word_embeddings_layernorm, torch.nn.Identity)
    assert torch.equal(model.embedding_norm.weight, source.transformer.word_embeddings_layernorm.weight)
    assert probe(source, model).passed
    model.embedding_norm = torch.nn.Identity()
    assert probe(source, model).input_error > 0.1


def test_one_norm_at_both_ends_is_applied_at_both(monkeypatch):
    """NanoChat runs one parameter-free norm on the embeddings and on the last layer's output."""
    source, model = _converted("nanochat")
    assert model.config.embedding_norm == model.config.block_decoder_final_norm == "norm" and model.shares_final_norm
    assert probe(source, model).passed
    monkeypatch.setattr(type(model), "shares_final_norm", property(lambda self: False))
    report = probe(source, model)
    assert report.input_error == 0 and report.logits_error > report.tolerance


def test_a_module_built_by_depth_is_rebuilt_as_its_source_layer_had_it(tmp_path):
    """ModernBERT-decoder builds layer 0 without an attention norm: the token decoder's first layer (source
    layer 2) needs one, copied from a sibling built alike, after save and load too."""
    source, model = _converted("modernbert-decoder")
    assert model.config.layer_modules == {"token": {"0": {"attn_norm": "mlp_norm"}}}
    assert isinstance(model.block_decoder.layers[0].attn_norm, torch.nn.Identity)
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path)
    norm = reloaded.token_decoder.layers[0].attn_norm
    assert isinstance(norm, torch.nn.LayerNorm) and torch.equal(norm.weight, source.model.layers[2].attn_norm.weight)
    assert model.config.head_transform.endswith("ModernBertDecoderPredictionHead")
    assert torch.equal(reloaded.head_transform.dense.weight, source.lm_head.dense.weight)


def test_a_parameter_free_final_norm_is_found():
    """Regression: OLMo's final LayerNorm has no parameters, so it was not found and the block decoder kept it,
    feeding normed states to the prefix (and to the sink init's token-decoder table)."""
    _, model = _converted("olmo")
    assert model.config.block_decoder_final_norm == "norm" and model.config.embedding_norm is None
    assert isinstance(model.block_decoder.norm, torch.nn.Identity)
    assert not isinstance(model.token_decoder.norm, torch.nn.Identity)


def test_alibi_under_the_cache_is_built_from_the_key_slots():
    """Under the cache, BLOOM's ALiBi is slope x the key's slot (its position in its row), also when two rows
    share one packed call, where a key's index in the call is not its slot: per row, what BLOOM builds itself."""
    _, model = _converted("bloom")
    decoder = model.token_decoder
    kv = DecoderKV(batch_size=2)
    layout = KVLayout(rows=torch.tensor([[0, 1]]), slots=torch.tensor([[2, 1]]),
                      key_rows=torch.tensor([[0, 1]]), members=torch.tensor([[0, 1]]))
    mask = kv.prepare(layout, "eager", torch.float32)  # [1 chunk, 1, 2 positions, 2 rows x 3 slots]
    heads = decoder.config.num_attention_heads
    with _keys_for_alibi(decoder, kv):
        bias = decoder.build_alibi_tensor(mask, heads, torch.float32)
    own = type(decoder).build_alibi_tensor(decoder, torch.ones(1, 3, dtype=torch.long), heads, torch.float32)
    assert torch.equal(bias, torch.cat([own, own], dim=-1))  # [heads, 1, 2 x 3]: each row's keys from slot 0
    with pytest.raises(ValueError, match="slots"):
        decoder.build_alibi_tensor(mask, heads, torch.float32)  # outside a cached call of the model


def test_a_skeleton_finds_the_embedding_norm_too():
    """bt-uptrain --dry-run plans from a source on the meta device: discovery runs the hooks there as well."""
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(tiny_config("bloom"))
    structure = find_structure(skeleton, check_architecture(skeleton.config))
    assert (structure.embedding_norm, structure.final_norm) == ("word_embeddings_layernorm", "ln_f")


def test_sliding_layers_keep_their_window_in_tokens():
    """gemma2 alternates sliding and global layers: only sliding layers get ceil(W / L_B) in the block decoder."""
    _, model = _converted("gemma2")
    block = model.config.block_decoder_config
    assert block.layer_types == tiny_config("gemma2").layer_types[:2]
    assert block.sliding_window == 3  # ceil(8 / 3)
    assert model.config.token_decoder_config.sliding_window == 8
    # regression: restoring depth-derived layer constants put the source's window (8) back on the layer
    assert model.block_decoder.layers[0].self_attn.sliding_window == 3 and not model.config.layer_scalars


def test_chunked_layers_keep_their_chunk_in_tokens():
    """Llama 4: chunked layers of the block decoder attend within ceil(C / L_B) blocks; the MoE layer list
    and the NoPE temperature span follow each layer into its decoder."""
    source, model = _converted("llama4_text")
    block, token = model.config.block_decoder_config, model.config.token_decoder_config
    assert block.attention_chunk_size == 3 and token.attention_chunk_size == 8  # ceil(8 / 3) blocks; tokens
    assert block.floor_scale == -(-source.config.floor_scale // 3) and token.floor_scale == source.config.floor_scale
    assert block.layer_types == source.config.layer_types[:2] and token.layer_types == source.config.layer_types[2:]
    assert "chunked_attention" in block.layer_types
    moe = set(source.config.moe_layers)
    assert block.moe_layers == [i for i in range(2) if i in moe]
    assert token.moe_layers == [i - 2 for i in range(2, 4) if i in moe]


def test_depth_derived_constants_follow_each_layer_through_save_and_load(tmp_path):
    """DiffLlama builds lambda_init from the layer's index: a moved layer keeps its source value, in memory
    and after a reload with transformers alone (it was refused before: the probe saw the new index's)."""
    from transformers import AutoModelForCausalLM

    from block_transformer import export

    source, model = _converted("diffllama")
    expected = [source.model.layers[i].self_attn.lambda_init for i in (2, 3)]
    assert [layer.self_attn.lambda_init for layer in model.token_decoder.layers] == expected
    export.save_model_folder(model, tiny_tokenizer(), tmp_path / "bt")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "bt", trust_remote_code=True)
    assert [layer.self_attn.lambda_init for layer in reloaded.token_decoder.layers] == expected


def test_per_layer_overrides_follow_their_layers():
    """A heterogeneous config's per_layer_config is keyed by layer index: each decoder renumbers it, and the
    analytic KV-cache size reads each layer's own shape (the global one is ambiguous and raises)."""
    from block_transformer.bench.settings import Setting
    from block_transformer.bench.throughput import kv_cache_bytes

    source, model = _converted("dots3_note_text")
    overrides = source.config.to_dict()["per_layer_config"]
    assert set(overrides) == {"2", "3"}
    assert model.config.token_decoder_config.to_dict()["per_layer_config"] == {"0": overrides["2"], "1": overrides["3"]}
    assert not model.config.block_decoder_config.to_dict().get("per_layer_config")
    # K and V numbers per position, layer by layer: source layers 0-1 in the block decoder, 2-3 (overridden)
    # in the token decoder; fp32, 12 positions: 1 + 12 // 3 block entries, N_P + L_B - 1 = 4 token entries
    width = [source.config.per_layer_config[i].num_key_value_heads * source.config.per_layer_config[i].head_dim
             for i in range(4)]
    assert width[2] == overrides["2"]["num_key_value_heads"] * overrides["2"]["head_dim"] != width[0]
    expected = 2 * 4 * ((width[0] + width[1]) * (1 + 12 // 3) + (width[2] + width[3]) * 4)
    assert kv_cache_bytes(model, Setting(1, 8, 4)) == expected


def test_per_layer_overrides_of_a_deep_model_keep_their_layers():
    """Regression: a config with ten layers or more writes its per_layer_config keys zero-padded ("07"), and
    the renumbering looked them up as "7": the overrides were dropped and the copy failed on shapes."""
    small = dict(num_attention_heads=2, num_key_value_heads=2, head_dim=24, q_lora_rank=8, kv_lora_rank=8,
                 qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=8)
    layer_types = ["indexed_attention", "sliding_attention"] * 6
    config = tiny_config("dots3_note_text", num_hidden_layers=12, layer_types=layer_types,
                         per_layer_config={i: small for i in range(1, 12, 2)})  # every sliding layer
    source = tiny_source(config)
    model = convert_model(source, LayerMapping.partition(4, 8), 3, separator_id=0)  # source 11 -> token 7
    assert set(source.config.to_dict()["per_layer_config"]) >= {"01", "11"}
    assert {int(k) for k in model.config.block_decoder_config.to_dict()["per_layer_config"]} == {1, 3}
    assert {int(k) for k in model.config.token_decoder_config.to_dict()["per_layer_config"]} == {1, 3, 5, 7}
    assert probe(source, model).passed


@pytest.mark.parametrize("mapping", [LayerMapping.partition(2, 2), LayerMapping.from_options(None, "0-3", "0-3")])
def test_a_bias_only_the_last_layer_had_starts_at_zero_elsewhere(mapping):
    """GPT-NeoX-Japanese builds an attention-output bias on its last layer only: a decoder's last layer that
    was not the source's last gets a zero one (same function), the source's own bias is copied."""
    source = tiny_source(tiny_config("gpt_neox_japanese"))
    bias = source.gpt_neox_japanese.layers[3].attention.dense_bias
    with torch.no_grad():
        bias.normal_()  # the family initialises it to zero: make a lost or misplaced copy show
    model = convert_model(source, mapping, 3, separator_id=0)
    block_bias = model.block_decoder.layers[-1].attention.dense_bias
    assert torch.equal(block_bias, bias) if mapping.block[-1] == 3 else not block_bias.any()
    assert torch.equal(model.token_decoder.layers[-1].attention.dense_bias, bias)
    assert probe(source, model).passed


def test_sparse_attention_top_k_is_counted_in_blocks():
    source, model = _converted("deepseek_v32")
    assert source.config.index_topk == 4
    assert model.config.block_decoder_config.index_topk == 2 and model.config.token_decoder_config.index_topk == 4


@pytest.mark.parametrize(("mapping", "where"), [
    (LayerMapping.partition(1, 3), "source layer 1 reuses layer 0's result .* cannot open the token decoder"),
    (LayerMapping.from_options(None, "0,3", "1-2"), "source layer 3 reuses layer 2's result .* cannot follow layer 0 in the block decoder"),
])
def test_a_layer_reusing_its_predecessor_must_follow_it(mapping, where):
    """GLM-DSA's "shared" layers reuse the previous layer's top-k: a decoder may not open with one, or put
    another layer before it (the family's own code fails, or silently reuses the wrong selection)."""
    config = tiny_config("glm_moe_dsa")
    with pytest.raises(ConversionError, match=where + ".* start each decoder at a layer that computes its own \\(0, 2\\)"):
        check_conversion(config, mapping, 3, 2)


def test_nope_temperature_reads_each_calls_past_length():
    """Regression: the block/token caches reported the length *after* the call as the past length, so
    Llama 4's NoPE layers scaled queries for the wrong positions once ``floor_scale`` bites (cached
    logits differed from a recompute by ~5e-4)."""
    config = tiny_config("llama4_text", attention_chunk_size=8, floor_scale=4, no_rope_layer_interval=2)
    model = convert_model(tiny_source(config), LayerMapping.partition(2, 2), 3, separator_id=0)
    for length in (4, 9):
        prompt = torch.randint(3, config.vocab_size, (1, length), generator=torch.Generator().manual_seed(length))
        with torch.no_grad():
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10, do_sample=False,
                                 pad_token_id=0, eos_token_id=None, output_scores=True, return_dict_in_generate=True)
            recomputed = model(out.sequences).logits[0, length - 1 : -1]
        torch.testing.assert_close(torch.stack(out.scores, 1)[0], recomputed, atol=1e-5, rtol=1e-5)


def test_bt_convert_check_records_the_probe(tmp_path):
    source = tmp_path / "src"
    tiny_source(tiny_config("gemma")).save_pretrained(source)
    tiny_tokenizer().save_pretrained(source)
    out = tmp_path / "out"
    result = CliRunner().invoke(convert_cmd, [str(source), "--block-len", "3", "--split", "2/2", "-o", str(out), "--check"])
    assert result.exit_code == 0, result.output
    recorded = json.loads((out / "config.json").read_text())["conversion"]["probe"]
    assert recorded["passed"] and recorded["logits_error"] <= recorded["tolerance"]


def test_bt_convert_refuses_a_hybrid_with_one_line(tmp_path):
    source = tmp_path / "src"
    tiny_config("qwen3_next").save_pretrained(source)
    result = CliRunner().invoke(convert_cmd, [str(source), "--block-len", "3", "--split", "2/2", "-o", str(tmp_path / "o")])
    assert_one_line_error(result, "linear_attention")
    assert not (tmp_path / "o").exists()


@torch.no_grad()
def test_embedding_multiplier_feeds_embedder_and_token_decoder():
    _, model = _converted("gemma")
    ids = torch.tensor([[5, 6, 7]])
    scaled = model.embed_tokens(ids) * model.config.embedding_multiplier
    torch.testing.assert_close(model.token_embeddings(ids), scaled)


# transformers' GGUF loader reads no head size for Qwen3 and assumes 128, as in every released Qwen3.
GGUF_OVERRIDES = {"qwen2": {}, "qwen3": {"head_dim": 128}, "starcoder2": {}, "stablelm": {}, "bloom": {}}


@pytest.mark.parametrize("arch", sorted(GGUF_OVERRIDES))
def test_converts_from_a_gguf_file_of_another_family(tmp_path, arch):
    """Families beyond Llama convert from .gguf (dequantised by transformers), and the probe passes on it."""
    from tiny_gguf import write_tiny_gguf

    from conftest import VOCAB

    config = tiny_config(arch, vocab_size=VOCAB, tie_word_embeddings=False, **GGUF_OVERRIDES[arch])
    source = tiny_source(config)
    path = write_tiny_gguf(source, tiny_tokenizer(), tmp_path / f"{arch}.gguf", arch)
    out = tmp_path / "out"
    result = CliRunner().invoke(convert_cmd, [str(path), "--block-len", "3", "--split", "2/2", "-o", str(out), "--check"])
    assert result.exit_code == 0, result.output
    conversion = json.loads((out / "config.json").read_text())["conversion"]
    assert conversion["source_kind"] == "gguf" and conversion["model_type"] == arch
    assert conversion["probe"]["passed"]
