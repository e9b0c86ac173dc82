"""Cached generation: block-level + local KV caches reproduce the full forward, row by row."""

from __future__ import annotations

import pytest
import torch
from transformers import TextIteratorStreamer

from block_transformer.convert import LayerMapping
from block_transformer.convert.convert import convert_model
from block_transformer.modeling import BlockTransformerCache
from conftest import VOCAB, left_padded, steps_before_near_tie, tiny_source, tiny_tokenizer

BLOCK_LEN = 3


def converted(model_type: str, block_len: int = BLOCK_LEN, attn: str = "sdpa"):
    source = tiny_source(model_type)
    source.config._attn_implementation = attn
    model = convert_model(source, LayerMapping.partition(2, 2), block_len, separator_id=0)
    model.set_attn_implementation(attn)
    return model


def teacher_forced(model, prompts: list[torch.Tensor], continuation: torch.Tensor):
    """Logits of prefill + one-token steps, and the cache; continuation is [B, steps]."""
    ids, mask = left_padded(prompts)
    cache = BlockTransformerCache(model.config)
    steps = [model(ids, attention_mask=mask, past_key_values=cache, logits_to_keep=1).logits[:, -1]]
    lengths = []
    for t in range(continuation.shape[1]):
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        steps.append(model(continuation[:, t : t + 1], attention_mask=mask, past_key_values=cache).logits[:, -1])
        lengths.append((cache.block_cache_lengths().clone(), cache.token_cache_lengths().clone()))
    return torch.stack(steps, dim=1), cache, lengths


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_incremental_decoding_equals_full_forward(model_type, attn):
    model = converted(model_type, attn=attn)
    torch.manual_seed(1)
    prompts = [torch.randint(0, VOCAB, (n,)) for n in (7, 1, 5, 9, 3)]  # every offset within a block
    continuation = torch.randint(0, VOCAB, (len(prompts), 8))
    with torch.no_grad():
        cached, _, _ = teacher_forced(model, prompts, continuation)
        for i, prompt in enumerate(prompts):
            full = model(torch.cat([prompt, continuation[i]])[None]).logits[0]
            expected = full[len(prompt) - 1 :]
            torch.testing.assert_close(cached[i], expected, atol=2e-5, rtol=1e-5)


def test_cache_sizes_follow_the_design():
    model = converted("llama")
    cfg = model.config
    prompts = [torch.randint(0, VOCAB, (n,)) for n in (4, 8)]
    continuation = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        _, cache, lengths = teacher_forced(model, prompts, continuation)
    for step, (block, token) in enumerate(lengths, start=1):
        seen = torch.tensor([4, 8]) + step
        assert torch.equal(block, 1 + seen // BLOCK_LEN)
        assert torch.equal(token, cfg.num_prefix_tokens + seen % BLOCK_LEN)
    limit = cfg.num_prefix_tokens + BLOCK_LEN - 1
    assert all(k.shape[2] == limit for k in cache.token.keys)  # the local cache never holds more
    assert all(k.shape[2] <= 2 * int(cache.block_cache_lengths().max()) for k in cache.block.keys)
    assert len(cache.block.keys) == cfg.block_decoder_config.num_hidden_layers


def test_sliding_window_in_the_cache():
    model = converted("mistral", block_len=2)  # window 8 tokens -> 4 block positions
    prompts = [torch.randint(0, VOCAB, (n,)) for n in (11, 4)]
    continuation = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        cached, _, _ = teacher_forced(model, prompts, continuation)
        for i, prompt in enumerate(prompts):
            full = model(torch.cat([prompt, continuation[i]])[None]).logits[0]
            torch.testing.assert_close(cached[i], full[len(prompt) - 1 :], atol=2e-5, rtol=1e-5)


def test_greedy_batched_equals_one_by_one(model_type):
    model = converted(model_type)
    torch.manual_seed(2)
    prompts = [torch.randint(1, VOCAB, (n,)) for n in (5, 2, 9, 6)]
    ids, mask = left_padded(prompts)
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    compared = 0
    for i, prompt in enumerate(prompts):
        alone = model.generate(prompt[None], max_new_tokens=10, do_sample=False, pad_token_id=0)[0]
        steps = steps_before_near_tie(model, alone, len(prompt))
        assert torch.equal(batched[i, ids.shape[1] :][:steps], alone[len(prompt) :][:steps])
        compared += steps
    assert compared >= 30, "too many near-ties to compare: pick another seed"


def test_cached_generate_equals_uncached(model_type):
    model = converted(model_type)
    prompt = torch.randint(1, VOCAB, (2, 5))
    cached = model.generate(prompt, max_new_tokens=9, do_sample=False, pad_token_id=0)
    uncached = model.generate(prompt, max_new_tokens=9, do_sample=False, pad_token_id=0, use_cache=False)
    assert torch.equal(cached, uncached)


def test_sampling_streamer_and_stopping():
    model = converted("gpt2")
    tok = tiny_tokenizer()
    inputs = tok(["abcd", "xy"], return_tensors="pt", padding=True, padding_side="left")
    torch.manual_seed(0)
    a = model.generate(**inputs, do_sample=True, temperature=0.7, top_k=20, top_p=0.9, max_new_tokens=6)
    torch.manual_seed(0)
    b = model.generate(**inputs, do_sample=True, temperature=0.7, top_k=20, top_p=0.9, max_new_tokens=6)
    assert torch.equal(a, b) and a.shape == (2, inputs.input_ids.shape[1] + 6)

    streamer = TextIteratorStreamer(tok)
    model.generate(**tok(["abc"], return_tensors="pt"), max_new_tokens=4, do_sample=False, streamer=streamer)
    assert "".join(streamer).replace(" ", "").startswith("abc")

    eos = int(model.generate(**tok(["abc"], return_tensors="pt"), max_new_tokens=1, do_sample=False)[0, -1])
    out = model.generate(**tok(["abc"], return_tensors="pt"), max_new_tokens=8, min_new_tokens=0, eos_token_id=eos,
                         pad_token_id=0, do_sample=False)
    assert out.shape[1] == 4  # stopped at the eos it produced first


def test_unsupported_generation_modes_are_rejected():
    model = converted("llama")
    prompt = torch.randint(1, VOCAB, (1, 4))
    with pytest.raises(ValueError, match="only supports"):
        model.generate(prompt, num_beams=2, max_new_tokens=3)
    with pytest.raises(ValueError, match="cache_implementation"):
        model.generate(prompt, cache_implementation="offloaded", max_new_tokens=3)
    started = BlockTransformerCache(model.config)
    model(prompt, past_key_values=started, logits_to_keep=1)
    with pytest.raises(ValueError, match="only the newest token"):
        model(prompt, past_key_values=started)
