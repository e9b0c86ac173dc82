"""Surgery on tiny models of every family: exact copies, the forward contract, padding, inits."""

from __future__ import annotations

import pytest
import torch

from block_transformer.convert import LayerMapping
from block_transformer.convert.convert import convert_model
from block_transformer.convert.discovery import find_structure
from block_transformer.convert.families import family_for
from block_transformer.errors import ConversionError
from conftest import VOCAB, tiny_source

BLOCK_LEN = 3


def converted(model_type: str, init: str = "sink", split: LayerMapping = LayerMapping.partition(2, 2), block_len: int = BLOCK_LEN, **kw):
    source = tiny_source(model_type)
    return source, convert_model(source, split, block_len, init=init, separator_id=0, **kw)


@pytest.mark.parametrize("init", ["sink", "reference"])
def test_every_copied_tensor_equals_the_source(model_type, init):
    source, model = converted(model_type, init)
    structure = find_structure(source, family_for(model_type))
    src = dict(source.base_model.named_parameters())
    src.update(dict(source.base_model.named_buffers()))
    ours = dict(model.named_parameters(remove_duplicate=False))
    ours.update(dict(model.named_buffers()))
    checked = 0
    for name, tensor in src.items():
        if name.startswith(f"{structure.layers}."):
            index, rest = name[len(structure.layers) + 1 :].split(".", 1)
            index = int(index)
            target = (
                f"block_decoder.{structure.layers}.{index}.{rest}"
                if index < 2
                else f"token_decoder.{structure.layers}.{index - 2}.{rest}"
            )
            targets = [target]
        elif name.startswith(structure.final_norm):
            targets = [f"token_decoder.{name}"]
        elif tensor is source.get_input_embeddings().weight:
            targets = ["embed_tokens.weight"]
        else:
            targets = [f"block_decoder.{name}", f"token_decoder.{name}"]
        for target in targets:
            assert torch.equal(ours[target], tensor), f"{name} -> {target} differs"
            checked += 1
    assert torch.equal(model.lm_head.weight, source.get_output_embeddings().weight)
    assert checked >= 4 * 4  # every layer's tensors, at least
    tied = source.get_output_embeddings().weight is source.get_input_embeddings().weight
    assert (model.lm_head.weight is model.embed_tokens.weight) == tied
    assert model.config.tie_word_embeddings == tied


def test_no_second_vocabulary_table_unless_the_init_asks(model_type):
    _, reference = converted(model_type, "reference")
    _, sink = converted(model_type, "sink")
    def tables(m):
        return {id(p) for p in m.parameters() if p.shape == (VOCAB, m.config.hidden_size)}
    assert len(tables(reference)) == len(tables(sink)) - 1
    assert reference.token_embed_tokens is None and sink.token_embed_tokens is not None
    for decoder in (reference.block_decoder, reference.token_decoder):
        assert all(p.shape != (VOCAB, decoder.config.hidden_size) for p in decoder.parameters())


@pytest.mark.parametrize("seq_len", [1, 2, 7, 9, 13])
def test_forward_shapes_and_finite_loss(model_type, seq_len):
    _, model = converted(model_type)
    ids = torch.randint(0, VOCAB, (2, seq_len))
    out = model(ids, labels=ids)
    assert out.logits.shape == (2, seq_len, VOCAB)
    assert out.first_token_logits.shape == (2, VOCAB)
    assert torch.isfinite(out.logits).all()
    if seq_len > 1:
        assert torch.isfinite(out.loss)
        manual = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        torch.testing.assert_close(out.loss, manual)
    out.loss.backward() if seq_len > 1 else None


def test_logits_follow_the_block_structure(model_type):
    """logits[t] may only depend on x_0..x_t: changing x_{t+1} leaves logits[0..t] unchanged."""
    _, model = converted(model_type)
    ids = torch.randint(1, VOCAB, (1, 10))
    with torch.no_grad():
        base = model(ids).logits
        for t in range(9):
            changed = ids.clone()
            changed[0, t + 1] = (changed[0, t + 1] % (VOCAB - 1)) + 1
            other = model(changed).logits
            torch.testing.assert_close(other[:, : t + 1], base[:, : t + 1])
            assert not torch.allclose(other[:, t + 1 :], base[:, t + 1 :])


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_each_row_alone(model_type, side):
    _, model = converted(model_type)
    lengths = [11, 7, 3, 1, 6]
    width = max(lengths)
    rows = [torch.randint(0, VOCAB, (n,)) for n in lengths]
    ids = torch.full((len(rows), width), 5)  # pad id is irrelevant: padding is the attention mask
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        where = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[i, where], mask[i, where] = row, 1
    with torch.no_grad():
        batch = model(ids, attention_mask=mask)
        for i, row in enumerate(rows):
            alone = model(row[None])
            where = slice(width - len(row), width) if side == "left" else slice(0, len(row))
            torch.testing.assert_close(batch.logits[i, where], alone.logits[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(batch.first_token_logits[i], alone.first_token_logits[0], atol=1e-5, rtol=1e-5)


def test_loss_ignores_padding_by_mask_not_by_token_id():
    _, model = converted("llama")
    ids = torch.randint(1, VOCAB, (1, 8))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)  # pad id 0 == separator id
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 8, dtype=torch.long)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(model(padded, attention_mask=mask, labels=padded).loss, model(ids, labels=ids).loss)


def test_mask_with_holes_is_rejected():
    _, model = converted("gpt2")
    ids = torch.randint(0, VOCAB, (2, 6))
    mask = torch.tensor([[1, 1, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with pytest.raises(ValueError, match="holes"):
        model(ids, attention_mask=mask)
    with pytest.raises(ValueError, match="without any real token"):
        model(ids, attention_mask=torch.zeros_like(ids))


def test_sliding_window_is_kept_in_tokens():
    """Mistral's window of 8 tokens becomes ceil(8 / L_B) block positions in the block decoder."""
    _, model = converted("mistral", block_len=4)
    assert model.config.block_decoder_config.sliding_window == 2
    assert model.config.token_decoder_config.sliding_window == 8
    ids = torch.randint(0, VOCAB, (1, 40))
    with torch.no_grad():
        windowed = model(ids).logits
        model.config.block_decoder_config.sliding_window = 1000
        full = model(ids).logits
    torch.testing.assert_close(windowed[:, :7], full[:, :7])  # contexts h_0, h_1: within 2 block positions
    assert not torch.allclose(windowed[:, 20:], full[:, 20:])


def test_inits_are_recorded_and_shaped(model_type):
    _, ref = converted(model_type, "reference")
    source, sink = converted(model_type, "sink")
    dim = ref.config.hidden_size
    eye = torch.eye(dim)
    torch.testing.assert_close(ref.embedder.weight, torch.cat([eye / BLOCK_LEN] * BLOCK_LEN, dim=1))
    torch.testing.assert_close(ref.prefix.weight, torch.cat([eye, eye]))
    assert ref.config.conversion["init"] == "reference" and sink.config.conversion["init"] == "sink"
    # sink: slot 1 is a constant (the sink state), slot 2 the context; start = separator embedding
    assert torch.equal(sink.prefix.weight[:dim], torch.zeros(dim, dim))
    assert torch.equal(sink.start, source.get_input_embeddings().weight[0])
    # The token table holds the lower layers' state of [separator, v] at position 1.
    with torch.no_grad():
        hidden = source(torch.tensor([[0, 17]]), output_hidden_states=True).hidden_states[2][0, 1]
    if model_type == "gpt2":
        hidden = hidden - source.transformer.wpe.weight[1]
    torch.testing.assert_close(sink.token_embed_tokens.weight[17], hidden, atol=1e-5, rtol=1e-5)


def test_sink_init_feeds_the_token_decoder_the_states_the_upper_layers_were_trained_on():
    """On a source whose layer-N_b state is a function of the token alone (attention off in its lower
    layers), the sink init's token-input table is exactly that state: with attention off in the upper
    layers too, the converted model predicts every token inside a block as the source does, which the
    reference init (plain embeddings into the upper layers) does not; with the upper layers' attention
    on, the sink init is still the closer of the two to the source."""
    source = tiny_source("llama")
    attention_out = [layer.self_attn.o_proj.weight for layer in source.model.layers]
    upper = [w.detach().clone() for w in attention_out[2:]]
    ids = torch.randint(1, VOCAB, (4, 24), generator=torch.Generator().manual_seed(0))
    inside = torch.arange(24) % BLOCK_LEN != BLOCK_LEN - 1  # the block's last token is predicted by the next prefix

    def logprobs(init: str | None) -> torch.Tensor:
        model = source if init is None else convert_model(source, LayerMapping.partition(2, 2), BLOCK_LEN, init=init, separator_id=0)
        return model(ids).logits.log_softmax(-1)

    def kl_to_source(init: str) -> float:
        return torch.nn.functional.kl_div(logprobs(init), logprobs(None), log_target=True, reduction="batchmean").item()

    with torch.no_grad():
        for weight in attention_out:
            weight.zero_()
        torch.testing.assert_close(logprobs("sink")[:, inside], logprobs(None)[:, inside], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(logprobs("reference")[:, inside], logprobs(None)[:, inside], atol=1e-3)
        for weight, trained in zip(attention_out[2:], upper):
            weight.copy_(trained)
        assert kl_to_source("sink") < kl_to_source("reference")  # 0.070 vs 0.091


@pytest.mark.parametrize(
    ("split", "block_len", "prefix", "message"),
    [
        (LayerMapping.partition(3, 2), 4, 2, "does not fit a 4-layer model"),
        (LayerMapping.partition(0, 4), 4, 2, "both sides >= 1"),
        (LayerMapping.partition(4, 0), 4, 2, "both sides >= 1"),
        (LayerMapping.partition(2, 2), 0, 2, "--block-len must be >= 1"),
        (LayerMapping.partition(2, 2), 4, 0, "--prefix-tokens must be >= 1"),
    ],
)
def test_bad_conversion_parameters(split, block_len, prefix, message):
    with pytest.raises(ConversionError, match=message):
        convert_model(tiny_source("gpt2"), split, block_len, num_prefix_tokens=prefix, separator_id=0)


def test_split_parsing():
    assert LayerMapping.parse_split("6/6") == LayerMapping.partition(6, 6)
    with pytest.raises(ConversionError, match="A/B"):
        LayerMapping.parse_split("6")


def test_block_len_one_and_long_prefix():
    source = tiny_source("gpt_neox")
    model = convert_model(source, LayerMapping.partition(1, 3), 1, num_prefix_tokens=3, separator_id=0)
    ids = torch.randint(0, VOCAB, (2, 5))
    out = model(ids, labels=ids)
    assert out.logits.shape == (2, 5, VOCAB) and torch.isfinite(out.loss)
    assert model.config.max_position_embeddings == 127


def test_block_len_beyond_the_source_positions_is_refused_up_front():
    """Regression: GPT-2 (128 positions here) failed on every forward with an IndexError after converting."""
    with pytest.raises(ConversionError, match="needs 129 token-decoder positions, but the source has 128"):
        convert_model(tiny_source("gpt2"), LayerMapping.partition(2, 2), 128, separator_id=0)
    model = convert_model(tiny_source("gpt2"), LayerMapping.partition(2, 2), 127, separator_id=0)  # 2 + 127 - 1 = 128 fits
    ids = torch.randint(0, VOCAB, (1, 130))
    assert torch.isfinite(model(ids).logits).all()


def test_source_auto_map_does_not_travel_into_the_decoder_configs():
    """Regression: the source's auto_map named remote-code modules the output folder does not ship."""
    source = tiny_source("llama")
    source.config.auto_map = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    model = convert_model(source, LayerMapping.partition(2, 2), BLOCK_LEN, separator_id=0)
    for sub in (model.config.block_decoder_config, model.config.token_decoder_config):
        assert "auto_map" not in sub.to_dict()
