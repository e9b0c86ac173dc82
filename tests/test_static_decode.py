"""The static decode step (fixed shapes, no host sync: what torch.compile and CUDA graphs need) computes what
the eager step computes, through generate() too, compiles without graph breaks, and refuses to overrun."""

from __future__ import annotations

import pytest
import torch

from block_transformer.convert.coverage import tiny_config
from block_transformer.convert.coverage import tiny_source as source_from_config
from block_transformer.modeling import BlockTransformerCache
from conftest import VOCAB, left_padded, tiny_source
from test_decode_step import EVERY_PHASE, assert_cached_equals_full, converted, decode

MAX_LENGTH = 32  # longest prompt (13) + the steps below, with room to spare


@pytest.mark.parametrize(("family", "num_prefix_tokens", "attn"), [
    ("llama", 1, "sdpa"),
    ("llama", 2, "eager"),
    ("llama", 3, "sdpa"),
    ("gpt2", 2, "sdpa"),  # learned absolute positions
    ("mistral", 2, "sdpa"),  # sliding window
])
def test_the_static_step_equals_a_full_forward_at_every_phase(family, num_prefix_tokens, attn):
    model = converted(tiny_source(family), num_prefix_tokens, attn)
    assert_cached_equals_full(model, EVERY_PHASE, max_length=MAX_LENGTH)


def test_the_static_step_with_alibi():
    """BLOOM builds ALiBi from the key slots: every slot of the fixed-size caches is read."""
    config = tiny_config("bloom")
    model = converted(source_from_config(config), num_prefix_tokens=2, attn=config._attn_implementation or "eager")
    assert_cached_equals_full(model, EVERY_PHASE, max_length=MAX_LENGTH)


def test_the_static_step_with_sliding_and_global_layers():
    config = tiny_config("gemma2", sliding_window=3)
    model = converted(source_from_config(config), num_prefix_tokens=2, attn=config._attn_implementation or "eager")
    assert_cached_equals_full(model, EVERY_PHASE, steps=6, max_length=MAX_LENGTH)


def test_generate_with_a_static_cache_equals_generate():
    """generate(cache_implementation="static") sizes the caches for max_length and runs the static step."""
    model = converted(tiny_source("qwen2"))
    torch.manual_seed(3)
    ids, mask = left_padded([torch.randint(1, VOCAB, (n,)) for n in EVERY_PHASE])
    settings = dict(max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None,
                    output_scores=True, return_dict_in_generate=True)
    eager = model.generate(ids, attention_mask=mask, **settings)
    static = model.generate(ids, attention_mask=mask, cache_implementation="static", **settings)
    assert static.past_key_values.block.fixed_len == 2 + (ids.shape[1] + 10) // model.config.block_len
    torch.testing.assert_close(torch.stack(static.scores), torch.stack(eager.scores), atol=2e-5, rtol=1e-5)
    assert torch.equal(static.sequences, eager.sequences)


def test_the_static_step_compiles_without_graph_breaks():
    """fullgraph=True makes any graph break an error; aot_eager traces as inductor does without its codegen."""
    model = converted(tiny_source("llama"))
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, VOCAB, (n,), generator=generator) for n in EVERY_PHASE]
    continuation = torch.randint(1, VOCAB, (len(prompts), 6), generator=generator)
    with torch.no_grad():
        eager = decode(model, prompts, continuation)
        model.compile_decode_step(fullgraph=True, backend="aot_eager")
        compiled = decode(model, prompts, continuation, max_length=MAX_LENGTH)
    torch.testing.assert_close(compiled, eager, atol=2e-5, rtol=1e-5)


def test_a_static_cache_refuses_to_run_past_its_max_length():
    model = converted(tiny_source("llama"))
    ids = torch.randint(1, VOCAB, (2, 6))
    cache = BlockTransformerCache(model.config, max_length=8)
    with torch.no_grad():
        model(ids, past_key_values=cache, logits_to_keep=1)
        for _ in range(2):
            model(ids[:, :1], past_key_values=cache)
        with pytest.raises(ValueError, match="max_length"):
            model(ids[:, :1], past_key_values=cache)


def test_a_static_cache_cannot_change_rows():
    """Continuous batching frees and admits rows; a fixed-size cache would read past or lose them."""
    model = converted(tiny_source("llama"))
    ids = torch.randint(1, VOCAB, (2, 6))
    static, joining = BlockTransformerCache(model.config, max_length=16), BlockTransformerCache(model.config)
    with torch.no_grad():
        model(ids, past_key_values=static, logits_to_keep=1)
        model(ids[:1], past_key_values=joining, logits_to_keep=1)
    with pytest.raises(ValueError, match="static"):
        static.keep_rows(torch.tensor([0]))
    with pytest.raises(ValueError, match="static"):
        static.admit(joining, torch.tensor([1]))
