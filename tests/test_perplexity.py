"""Held-out perplexity: HF-exact scoring for vanilla models, the same windows for Block Transformers."""

from __future__ import annotations

import math

import pytest
import torch

from block_transformer.convert import LayerMapping
from block_transformer.convert.convert import convert_model
from block_transformer.data_spec import DataError, DataSpec
from block_transformer.measure import heldout_split, score, tokenize_corpus
from conftest import VOCAB, tiny_source, tiny_tokenizer

SEQ_LEN = 9
BLOCK_LEN = 3


@pytest.fixture(scope="module")
def vanilla():
    return tiny_source("llama")


@pytest.fixture(scope="module")
def block_transformer(vanilla):
    return convert_model(vanilla, LayerMapping.partition(2, 2), BLOCK_LEN, init="sink", separator_id=0)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, VOCAB, (5 * SEQ_LEN + 4,), generator=torch.Generator().manual_seed(0))


def hf_losses(model, windows: torch.Tensor) -> torch.Tensor:
    """The model's own loss, one window at a time."""
    with torch.no_grad():
        return torch.stack([model(w[None], labels=w[None]).loss for w in windows])


def test_vanilla_matches_the_models_own_loss(vanilla, ids):
    result = score(vanilla, ids, SEQ_LEN, batch_size=2, block_len=BLOCK_LEN)
    windows = ids[: 5 * SEQ_LEN].view(5, SEQ_LEN)
    expected = hf_losses(vanilla, windows).mean().item()  # equal token count per window
    assert result.num_windows == 5
    assert result.num_tokens == 5 * (SEQ_LEN - 1)
    assert result.loss == pytest.approx(expected, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(expected), rel=1e-5)
    assert result.nll_sum == pytest.approx(expected * result.num_tokens, rel=1e-5)
    assert result.first_token_loss is None and result.first_token_count == 0


def test_block_transformer_reports_the_first_token_separately(block_transformer, ids):
    result = score(block_transformer, ids, SEQ_LEN, batch_size=3)
    windows = ids[: 5 * SEQ_LEN].view(5, SEQ_LEN)
    assert result.block_len == BLOCK_LEN  # taken from the model's config
    assert result.num_tokens == 5 * (SEQ_LEN - 1)
    assert result.loss == pytest.approx(hf_losses(block_transformer, windows).mean().item(), rel=1e-5)
    with torch.no_grad():
        first = block_transformer(windows).first_token_logits
    expected_first = torch.nn.functional.cross_entropy(first, windows[:, 0]).item()
    assert result.first_token_count == 5
    assert result.first_token_loss == pytest.approx(expected_first, rel=1e-5)


def test_windows_never_cross_the_end_of_the_data(vanilla, ids):
    base = score(vanilla, ids, SEQ_LEN)
    changed_tail = ids.clone()
    changed_tail[5 * SEQ_LEN :] = (changed_tail[5 * SEQ_LEN :] + 1) % VOCAB  # the ragged remainder
    assert score(vanilla, changed_tail, SEQ_LEN).nll_sum == pytest.approx(base.nll_sum, rel=1e-6)
    capped = score(vanilla, ids, SEQ_LEN, max_tokens=3 * SEQ_LEN - 1)
    assert capped.num_windows == 2
    with pytest.raises(ValueError, match="window"):
        score(vanilla, ids[: SEQ_LEN - 1], SEQ_LEN)


def test_batching_does_not_change_the_result(block_transformer, ids):
    one = score(block_transformer, ids, SEQ_LEN, batch_size=1)
    many = score(block_transformer, ids, SEQ_LEN, batch_size=5)
    assert many.nll_sum == pytest.approx(one.nll_sum, rel=1e-5)


@pytest.mark.parametrize("which", ["vanilla", "block_transformer"])
def test_loss_by_block_position_averages_back_to_the_loss(which, request, ids):
    result = score(request.getfixturevalue(which), ids, SEQ_LEN, block_len=BLOCK_LEN)
    counts = result.tokens_by_block_position
    # predicted token u = 1 .. SEQ_LEN - 1 of each window: positions 1, 2, 0, 1, 2, 0, 1, 2
    assert counts == [5 * 2, 5 * 3, 5 * 3]
    weighted = sum(l * c for l, c in zip(result.loss_by_block_position, counts)) / sum(counts)
    assert weighted == pytest.approx(result.loss, rel=1e-9)


def test_corpus_is_sorted_joined_by_the_separator_and_held_out_at_the_tail(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "two.txt").write_text("cd")
    (tmp_path / "a.txt").write_text("ab")
    (tmp_path / "c.txt").write_text("efg")
    (tmp_path / "ignored.md").write_text("zz")
    docs = dict(DataSpec.parse(str(tmp_path)).documents())
    assert list(docs) == ["a.txt", "b/two.txt", "c.txt"]
    tokenizer = tiny_tokenizer()
    corpus = tokenize_corpus(tokenizer, docs, separator_id=0)
    expected = tokenizer("ab", add_special_tokens=False)["input_ids"] + [0]
    expected += tokenizer("cd", add_special_tokens=False)["input_ids"] + [0]
    expected += tokenizer("efg", add_special_tokens=False)["input_ids"]
    assert corpus.ids.tolist() == expected
    assert corpus.starts == [0, 3, 6]
    train, heldout = heldout_split(corpus.ids, 5)
    assert torch.equal(torch.cat([train, heldout]), corpus.ids) and heldout.numel() == 5
    assert corpus.files_in(len(train), len(corpus.ids)) == ["b/two.txt", "c.txt"]
    assert corpus.files_in(5, 6) == []  # the separator alone belongs to no file
    with pytest.raises(ValueError, match="hold out"):
        heldout_split(corpus.ids, corpus.ids.numel())
    with pytest.raises(DataError):
        DataSpec.parse(str(tmp_path / "b" / "*.rst"))
