"""The cached decode step: one block-decoder call on exactly the rows that complete a block, one
token-decoder call for every row whatever its phase, and each row still computes what it computes alone."""

from __future__ import annotations

import pytest
import torch

from block_transformer.convert import LayerMapping
from block_transformer.convert.convert import convert_model
from block_transformer.convert.coverage import tiny_config
from block_transformer.convert.coverage import tiny_source as source_from_config
from block_transformer.modeling import BlockTransformerCache
from conftest import VOCAB, left_padded, steps_before_near_tie, tiny_source

BLOCK_LEN = 4
EVERY_PHASE = (9, 4, 6, 11, 5, 7, 13, 8, 10)  # rows at every offset in a block, some sharing one


def converted(source, num_prefix_tokens: int = 2, attn: str = "sdpa", block_len: int = BLOCK_LEN):
    mapping = LayerMapping.partition(2, 2)
    model = convert_model(source, mapping, block_len, num_prefix_tokens=num_prefix_tokens, separator_id=0)
    model.set_attn_implementation(attn)
    return model.eval()


def decode(model, prompts: list[torch.Tensor], continuation: torch.Tensor, on_step=None,
           max_length: int | None = None) -> torch.Tensor:
    """Logits of prefill + teacher-forced one-token steps: [B, 1 + steps, V] (``max_length``: the static step's
    cache)."""
    ids, mask = left_padded(prompts)
    cache = BlockTransformerCache(model.config, max_length=max_length)
    logits = [model(ids, attention_mask=mask, past_key_values=cache, logits_to_keep=1).logits[:, -1]]
    for t in range(continuation.shape[1]):
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        if on_step is not None:
            on_step(cache)
        logits.append(model(continuation[:, t : t + 1], attention_mask=mask, past_key_values=cache).logits[:, -1])
    return torch.stack(logits, dim=1)


def assert_cached_equals_full(model, lengths, steps: int = 9, seed: int = 0, max_length: int | None = None) -> None:
    generator = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, model.config.vocab_size, (n,), generator=generator) for n in lengths]
    continuation = torch.randint(1, model.config.vocab_size, (len(prompts), steps), generator=generator)
    with torch.no_grad():
        cached = decode(model, prompts, continuation, max_length=max_length)
        for i, prompt in enumerate(prompts):
            full = model(torch.cat([prompt, continuation[i]])[None]).logits[0, len(prompt) - 1 :]
            torch.testing.assert_close(cached[i], full, atol=2e-5, rtol=1e-5)


class CallRecorder:
    """Counts the decoders' calls and their input shapes, step by step."""

    def __init__(self, model):
        self.calls: dict[str, list[tuple[int, ...]]] = {"block": [], "token": []}
        for name, decoder in (("block", model.block_decoder), ("token", model.token_decoder)):
            decoder.register_forward_pre_hook(self._hook(name), with_kwargs=True)

    def _hook(self, name):
        def record(module, args, kwargs):
            self.calls[name].append(tuple(kwargs["inputs_embeds"].shape[:2]))

        return record

    def reset(self) -> None:
        for calls in self.calls.values():
            calls.clear()


@pytest.mark.parametrize("num_prefix_tokens", [1, 2, 3])
def test_each_decoder_runs_once_per_step_on_the_rows_that_need_it(num_prefix_tokens):
    model = converted(tiny_source("llama"), num_prefix_tokens)
    recorder = CallRecorder(model)
    ids, mask = left_padded([torch.randint(1, VOCAB, (n,)) for n in EVERY_PHASE])
    cache = BlockTransformerCache(model.config)
    with torch.no_grad():
        model(ids, attention_mask=mask, past_key_values=cache, logits_to_keep=1)
        for _ in range(2 * BLOCK_LEN):
            completing = int((cache.num_tokens % BLOCK_LEN == BLOCK_LEN - 1).sum())
            going_on = len(EVERY_PHASE) - completing
            assert completing and going_on, "every step of this batch mixes both kinds of rows"
            recorder.reset()
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            model(torch.randint(1, VOCAB, (len(EVERY_PHASE), 1)), attention_mask=mask, past_key_values=cache)
            assert recorder.calls["block"] == [(completing, 1)]  # exactly the completing rows, one block each
            assert len(recorder.calls["token"]) == 1
            chunks, width = recorder.calls["token"][0]
            needed = completing * num_prefix_tokens + going_on
            assert width == num_prefix_tokens
            assert needed <= chunks * width < needed + width  # padding only fills the last chunk


def test_aligned_rows_go_through_unpacked():
    """All rows in one phase: the token decoder sees [B, 1] or [B, N_P], never a packed layout."""
    model = converted(tiny_source("llama"), num_prefix_tokens=2)
    recorder = CallRecorder(model)
    prompts = [torch.randint(1, VOCAB, (6,)) for _ in range(3)]
    continuation = torch.randint(1, VOCAB, (3, 6))
    with torch.no_grad():
        decode(model, prompts, continuation, on_step=lambda cache: None)
    decode_calls = recorder.calls["token"][1:]  # after prefill
    assert decode_calls == [(3, 1), (3, 2), (3, 1), (3, 1), (3, 1), (3, 2)]
    assert recorder.calls["block"][1:] == [(3, 1), (3, 1)]


@pytest.mark.parametrize(("family", "num_prefix_tokens", "attn"), [
    ("llama", 1, "sdpa"),
    ("llama", 2, "eager"),
    ("llama", 3, "sdpa"),
    ("gpt2", 3, "sdpa"),  # learned absolute positions
    ("gpt_neox", 2, "eager"),  # partial rotary
    ("mistral", 2, "sdpa"),  # sliding window
])
def test_packed_steps_equal_full_forward(family, num_prefix_tokens, attn):
    model = converted(tiny_source(family), num_prefix_tokens, attn)
    assert_cached_equals_full(model, EVERY_PHASE)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_steps_with_a_window_shorter_than_the_local_cache(attn):
    """A token-decoder window of 3 positions (N_P + L_B - 1 = 5 are cached): the window is applied per row
    inside a packed chunk."""
    config = tiny_config("mistral", sliding_window=3)
    model = converted(source_from_config(config), num_prefix_tokens=2, attn=attn)
    assert model.config.token_decoder_config.sliding_window == 3
    assert_cached_equals_full(model, EVERY_PHASE)


def test_packed_steps_with_sliding_and_global_layers():
    """gemma2 alternates sliding and global layers: each layer type gets its own packed mask."""
    config = tiny_config("gemma2", sliding_window=3)
    model = converted(source_from_config(config), num_prefix_tokens=2, attn=config._attn_implementation or "eager")
    assert len(set(model.config.token_decoder_config.layer_types)) == 2
    assert_cached_equals_full(model, EVERY_PHASE, steps=6)


@pytest.mark.parametrize("num_prefix_tokens", [2, 3])
def test_greedy_batch_at_every_phase_equals_each_row_alone(num_prefix_tokens):
    model = converted(tiny_source("qwen2"), num_prefix_tokens)
    torch.manual_seed(3)
    prompts = [torch.randint(1, VOCAB, (n,)) for n in EVERY_PHASE]
    ids, mask = left_padded(prompts)
    settings = dict(max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)
    batched = model.generate(ids, attention_mask=mask, **settings)
    compared = 0
    for i, prompt in enumerate(prompts):
        alone = model.generate(prompt[None], **settings)[0]
        steps = steps_before_near_tie(model, alone, len(prompt))
        assert torch.equal(batched[i, ids.shape[1] :][:steps], alone[len(prompt) :][:steps])
        compared += steps
    assert compared >= 60, "too many near-ties to compare: pick another seed"


@pytest.mark.parametrize("num_prefix_tokens", [1, 2])
def test_rows_that_sit_out_a_step_are_left_as_they_were(num_prefix_tokens):
    """A step taken by some rows only (the continuous batcher holds rows to align block phases): each row's
    logits, whenever it steps, equal the full forward of its own sequence, and a row that sat out is unchanged."""
    model = converted(tiny_source("llama"), num_prefix_tokens)
    generator = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, VOCAB, (n,), generator=generator) for n in EVERY_PHASE]
    ids, mask = left_padded(prompts)
    sequences = list(prompts)
    cache = BlockTransformerCache(model.config)
    schedule = [[2, 0, 5], [1, 3, 4, 6, 7, 8], [8], None, [0, 1, 2, 3, 4, 5, 6, 7], [4, 8, 6], None]
    with torch.no_grad():
        model(ids, attention_mask=mask, past_key_values=cache, logits_to_keep=1)
        for rows in schedule:
            stepping = list(range(len(prompts))) if rows is None else rows
            before = cache.num_tokens.clone()
            tokens = torch.randint(1, VOCAB, (len(stepping), 1), generator=generator)
            index = None if rows is None else torch.tensor(rows)
            logits = model._decode_step(tokens, None, cache, rows=index).logits[:, -1]
            for j, i in enumerate(stepping):
                sequences[i] = torch.cat([sequences[i], tokens[j]])
                torch.testing.assert_close(logits[j], model(sequences[i][None]).logits[0, -1], atol=2e-5, rtol=1e-5)
            sat_out = [i for i in range(len(prompts)) if i not in stepping]
            assert cache.num_tokens[sat_out].tolist() == before[sat_out].tolist()
            assert cache.num_tokens.tolist() == [len(s) for s in sequences]
