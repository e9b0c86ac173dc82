"""Continuous batching: many requests share a fixed number of rows, finished rows are refilled at once, joining
rows decode at their own block phase, and every request generates what it generates alone."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from block_transformer import export
from block_transformer.convert import LayerMapping
from block_transformer.convert.convert import convert_model
from block_transformer.modeling import BlockTransformerCache
from block_transformer.modeling.batching_block_transformer import RequestStatus
from conftest import VOCAB, tiny_source, tiny_tokenizer

PROMPT_LENGTHS = (1, 23, 5, 40, 2, 9, 14, 3, 31, 7, 4, 18)  # every phase for L_B 3 and 4, very different lengths
MAX_NEW_TOKENS = (9, 3, 21, 5, 14, 1, 8, 12, 4, 17, 6, 10)


def converted(family: str, block_len: int, num_prefix_tokens: int = 2):
    model = convert_model(
        tiny_source(family), LayerMapping.partition(2, 2), block_len, num_prefix_tokens=num_prefix_tokens, separator_id=0
    )
    return model.eval()


def prompts(seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (n,), generator=generator).tolist() for n in PROMPT_LENGTHS]


def alone(model, prompt: list[int], **settings) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), do_sample=False, pad_token_id=0, **settings)[0, len(prompt) :]
    return out.tolist()


def requests_with_eos_stops(model, seed: int = 0) -> list[dict]:
    """Each request with its own max_new_tokens; every other one has an eos id that stops it early (a token
    its unconstrained greedy output produces half-way), the others none (-1)."""
    requests = []
    for i, (prompt, new) in enumerate(zip(prompts(seed), MAX_NEW_TOKENS)):
        eos = -1
        if i % 2 == 0 and new > 2:
            free_run = alone(model, prompt, max_new_tokens=new, eos_token_id=None)
            eos = free_run[new // 2]
        requests.append(dict(input_ids=prompt, max_new_tokens=new, eos_token_id=eos))
    return requests


@pytest.mark.parametrize(("family", "block_len", "num_prefix_tokens", "rows"), [
    ("llama", 4, 2, 3),
    ("gpt2", 3, 2, 4),  # learned absolute positions
    ("mistral", 4, 3, 5),  # sliding window
])
def test_every_request_generates_what_it_generates_alone(family, block_len, num_prefix_tokens, rows):
    model = converted(family, block_len, num_prefix_tokens)
    requests = requests_with_eos_stops(model)
    results = model.generate_batch(requests, max_batch_size=rows)
    assert list(results) == [f"req_{i}" for i in range(len(requests))]
    stopped_by_eos = 0
    for request, result in zip(requests, results.values()):
        eos = request["eos_token_id"]
        expected = alone(model, request["input_ids"], max_new_tokens=request["max_new_tokens"],
                         eos_token_id=None if eos < 0 else eos)
        if eos >= 0:
            expected = expected[: expected.index(eos) + 1] if eos in expected else expected
            stopped_by_eos += len(expected) < request["max_new_tokens"]
        assert result.generated_tokens == expected, result.request_id
        assert result.status == RequestStatus.FINISHED and result.error is None
        assert result.prompt_ids == request["input_ids"]
    assert stopped_by_eos >= 3


class StepRecorder:
    """Wraps a manager's prefill and decode to record what each call saw."""

    def __init__(self, manager):
        self.events: list[tuple] = []
        prefill, decode = manager._prefill, manager._decode

        def recorded_prefill(joining):
            self.events.append(("prefill", len(joining), manager._cache.batch_size if manager._cache else 0))
            return prefill(joining)

        def recorded_decode():
            cache = manager._cache
            phases = (cache.num_tokens % cache.config.block_len).tolist()
            self.events.append(("decode", cache.batch_size, phases, cache.block.num_slots()))
            decode()

        manager._prefill, manager._decode = recorded_prefill, recorded_decode


def test_finished_rows_are_refilled_at_once_and_joining_rows_keep_their_phase():
    model = converted("llama", block_len=4)
    manager = model.init_continuous_batching(max_batch_size=3)
    recorder = StepRecorder(manager)
    requests = [dict(input_ids=p, max_new_tokens=n, eos_token_id=-1) for p, n in zip(prompts(), MAX_NEW_TOKENS)]
    ids = manager.add_requests(requests)
    while manager.step():
        # between steps every row is running and the row budget holds
        assert manager._cache is None or manager._cache.batch_size == len(manager._rows) <= 3
        assert all(row is not None for row in manager._rows)
    decodes = [e for e in recorder.events if e[0] == "decode"]
    joins_while_running = [e for e in recorder.events if e[0] == "prefill" and e[2] > 0]
    assert max(e[1] for e in decodes) == 3
    assert joins_while_running, "waiting requests join a running batch"
    assert any(len(set(e[2])) > 1 for e in decodes), "rows decode at different block phases"
    results = {}
    while (result := manager.get_result()) is not None:
        results[result.request_id] = result
    assert [len(results[i].generated_tokens) for i in ids] == list(MAX_NEW_TOKENS)
    assert manager._cache is None and not manager.has_pending_requests()  # nothing held once idle


def test_a_long_request_leaving_releases_its_block_cache():
    """The block cache grows by doubling with the longest row; when that row leaves, the kept rows are copied
    into buffers sized for what they need."""
    model = converted("llama", block_len=4)
    manager = model.init_continuous_batching(max_batch_size=2)
    recorder = StepRecorder(manager)
    generator = torch.Generator().manual_seed(1)
    long_prompt = torch.randint(1, VOCAB, (120,), generator=generator).tolist()
    manager.add_request(long_prompt, max_new_tokens=2, eos_token_id=-1)
    manager.add_request([5, 6], max_new_tokens=40, eos_token_id=-1)
    manager.run()
    slots = [e[3] for e in recorder.events if e[0] == "decode"]
    assert slots[0] >= 1 + 120 // 4
    assert slots[-1] <= 2 * (1 + (2 + 40) // 4) < slots[0]


def test_admitted_rows_decode_as_a_fresh_cache():
    """Cache level: rows prefilled on their own and admitted into freed and new rows of a running cache give
    the logits of the full forward."""
    model = converted("gpt2", block_len=3)
    generator = torch.Generator().manual_seed(2)
    running = [torch.randint(1, VOCAB, (n,), generator=generator) for n in (7, 3, 11)]
    joining = [torch.randint(1, VOCAB, (n,), generator=generator) for n in (5, 1, 9)]

    def prefill(rows):
        width = max(map(len, rows))
        ids, mask = torch.zeros(len(rows), width, dtype=torch.long), torch.zeros(len(rows), width, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, width - len(row) :], mask[i, width - len(row) :] = row, 1
        cache = BlockTransformerCache(model.config)
        model(ids, attention_mask=mask, past_key_values=cache, logits_to_keep=1)
        return cache

    with torch.no_grad():
        cache = prefill(running)
        for _ in range(4):  # advance the running rows
            step = torch.randint(1, VOCAB, (3, 1), generator=generator)
            model(step, past_key_values=cache)
            running = [torch.cat([r, s]) for r, s in zip(running, step)]
        cache.admit(prefill(joining), torch.tensor([1, 3, 4]))  # into row 1 (its request left) and two new rows
        sequences = [running[0], joining[0], running[2], joining[1], joining[2]]
        cache.keep_rows(torch.tensor([4, 0, 1, 3]))  # row 2 leaves, the others are reordered
        sequences = [sequences[i] for i in (4, 0, 1, 3)]
        for _ in range(5):
            step = torch.randint(1, VOCAB, (4, 1), generator=generator)
            logits = model(step, past_key_values=cache).logits[:, -1]
            sequences = [torch.cat([r, s]) for r, s in zip(sequences, step)]
            for i, sequence in enumerate(sequences):
                torch.testing.assert_close(logits[i], model(sequence[None]).logits[0, -1], atol=2e-5, rtol=1e-5)


def test_sampling_is_reproducible_per_request():
    """A sampling request with a seed draws what generate() draws alone after torch.manual_seed(seed),
    whatever the other requests and the row budget."""
    model = converted("llama", block_len=4)
    settings = [dict(do_sample=True, temperature=0.7, top_k=20, seed=11),
                dict(do_sample=True, top_p=0.8, seed=12),
                dict(do_sample=False),
                dict(do_sample=True, temperature=1.3, seed=13)]
    requests = [dict(input_ids=p, max_new_tokens=n, eos_token_id=-1, **s)
                for p, n, s in zip(prompts(3), (12, 7, 9, 15), settings)]
    first = model.generate_batch(requests, max_batch_size=2)
    second = model.generate_batch(requests[::-1], max_batch_size=3)
    for request, a, b in zip(requests, first.values(), reversed(second.values())):
        assert a.generated_tokens == b.generated_tokens
        generate_settings = {k: v for k, v in request.items() if k not in ("input_ids", "seed")}
        torch.manual_seed(request.get("seed", 0))
        with torch.no_grad():
            expected = model.generate(torch.tensor([request["input_ids"]]), pad_token_id=0,
                                      **{**generate_settings, "eos_token_id": None})
        assert a.generated_tokens == expected[0, len(request["input_ids"]) :].tolist()


def test_streaming_from_the_background_thread():
    model = converted("gpt2", block_len=3)
    requests = [dict(input_ids=p, max_new_tokens=n, eos_token_id=-1) for p, n in zip(prompts(4)[:5], MAX_NEW_TOKENS)]
    expected = model.generate_batch(requests, max_batch_size=2)
    seen_by_callback = []
    with model.continuous_batching_context_manager(max_batch_size=2) as manager:
        streamed = manager.add_request(**requests[0], streaming=True, record_timestamps=True)
        called = manager.add_request(**requests[2], streaming=True, callback=seen_by_callback.append)
        others = [manager.add_request(**r) for r in (requests[1], requests[3], requests[4])]
        stream = list(manager.request_id_iter(streamed))
        finals = {}
        while len(finals) < len(others):
            result = manager.get_result(timeout=30)
            assert result is not None and result.is_finished()
            finals[result.request_id] = result
    assert [len(s.generated_tokens) for s in stream] == list(range(1, MAX_NEW_TOKENS[0] + 1))
    assert [s.status for s in stream] == [RequestStatus.DECODING] * (len(stream) - 1) + [RequestStatus.FINISHED]
    assert stream[-1].generated_tokens == expected["req_0"].generated_tokens
    assert len(stream[-1].timestamps) == MAX_NEW_TOKENS[0]
    assert seen_by_callback[-1].generated_tokens == expected["req_2"].generated_tokens
    assert {s.request_id for s in seen_by_callback} == {called}
    assert [len(s.generated_tokens) for s in seen_by_callback] == list(range(1, MAX_NEW_TOKENS[2] + 1))
    for request_id, index in zip(others, (1, 3, 4)):
        assert finals[request_id].generated_tokens == expected[f"req_{index}"].generated_tokens
    assert not manager.is_running()


def test_cancel_and_bad_requests():
    model = converted("llama", block_len=4)
    manager = model.init_continuous_batching(max_batch_size=1)
    running = manager.add_request([3, 4, 5], max_new_tokens=50, eos_token_id=-1)
    waiting = manager.add_request([6, 7], max_new_tokens=50, eos_token_id=-1)
    manager.step()
    manager.cancel_request(running)
    manager.cancel_request(waiting)
    assert not manager.step()
    results = {r.request_id: r for r in iter(manager.get_result, None)}
    assert results[running].status == RequestStatus.FAILED and results[running].error == "cancelled"
    assert 0 < len(results[running].generated_tokens) < 50 and results[waiting].generated_tokens == []
    with pytest.raises(ValueError, match="at least one prompt token"):
        manager.add_request([])
    with pytest.raises(ValueError, match="num_beams"):
        manager.add_request([1, 2], num_beams=2)
    with pytest.raises(ValueError, match="unknown generation settings"):
        manager.add_request([1, 2], not_a_setting=3)


def test_generate_batch_with_remote_code(tmp_path):
    """The batcher lives in the modeling file, so a folder loaded with trust_remote_code (block_transformer not
    importable) serves generate_batch too."""
    model = converted("llama", block_len=4)
    folder = export.save_model_folder(model, tiny_tokenizer(), tmp_path / "model")
    requests = [dict(input_ids=p, max_new_tokens=n, eos_token_id=-1) for p, n in zip(prompts()[:4], MAX_NEW_TOKENS)]
    expected = [r.generated_tokens for r in model.generate_batch(requests, max_batch_size=2).values()]
    script = textwrap.dedent(f"""
        import sys
        sys.modules["block_transformer"] = None
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True)
        out = model.generate_batch({requests!r}, max_batch_size=2)
        print([r.generated_tokens for r in out.values()])
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == repr(expected)


def test_result_handlers_on_an_event_loop():
    """register_result_handler, as `transformers serve --continuous-batching` uses it: outputs reach the
    callback on the asyncio loop, also those delivered before the handler was registered."""
    import asyncio

    model = converted("llama", block_len=4)
    requests = [dict(input_ids=p, max_new_tokens=n, eos_token_id=-1) for p, n in zip(prompts(5)[:3], (6, 2, 9))]
    expected = [r.generated_tokens for r in model.generate_batch(requests, max_batch_size=2).values()]

    async def serve():
        loop = asyncio.get_running_loop()
        with model.continuous_batching_context_manager(max_batch_size=2) as manager:
            futures, streamed = [], {}
            for i, request in enumerate(requests):
                future = loop.create_future()
                request_id = manager.add_request(**request, request_id=f"r{i}", streaming=True)
                streamed[request_id] = []

                def on_output(output, future=future, seen=streamed[request_id]):
                    seen.append(len(output.generated_tokens))
                    if output.is_finished():
                        future.set_result(output)

                manager.register_result_handler(request_id, on_output)
                futures.append(future)
            return await asyncio.wait_for(asyncio.gather(*futures), timeout=60), streamed

    results, streamed = asyncio.run(serve())
    assert [r.generated_tokens for r in results] == expected
    assert [streamed[f"r{i}"] for i in range(3)] == [list(range(1, n + 1)) for n in (6, 2, 9)]


def test_requests_added_together_are_prefilled_together():
    """add_requests hands its requests over together, so a running generation thread prefills them in one
    call (not the first alone and the rest later), however eagerly the GIL switches threads."""
    model = converted("llama", 4)
    manager = model.init_continuous_batching(max_batch_size=8)
    prefills = []
    prefill = manager._prefill
    manager._prefill = lambda joining: prefills.append(len(joining)) or prefill(joining)
    manager.start()
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # hand the GIL to the generation thread as often as possible
    try:
        ids = manager.add_requests(prompts()[:6], max_new_tokens=3)
        sys.setswitchinterval(interval)
        results = {}
        while len(results) < len(ids):
            output = manager.get_result(timeout=30)
            assert output is not None, "no result within 30 s"
            results[output.request_id] = output
    finally:
        sys.setswitchinterval(interval)
        manager.stop()
    assert prefills == [6]


def test_a_bad_request_in_add_requests_queues_none():
    """Regression: add_requests queued the requests before a bad one, then raised."""
    model = converted("llama", 4)
    manager = model.init_continuous_batching(max_batch_size=4)
    with pytest.raises(ValueError, match="at least one prompt token"):
        manager.add_requests([[5, 6, 7], []], max_new_tokens=3)
    assert manager.input_queue.empty()


def test_sparse_attention_indexer_cache_follows_its_rows():
    """DeepSeek-V3.2's indexer keeps a key cache of its own: rows that finish, move and join carry it along
    with the attention keys and values (each request still generates what it generates alone)."""
    from block_transformer.convert.coverage import tiny_config
    from block_transformer.convert.coverage import tiny_source as coverage_source

    model = convert_model(coverage_source(tiny_config("deepseek_v32")), LayerMapping.partition(2, 2), 3,
                          separator_id=0).eval()
    requests = [dict(input_ids=p, max_new_tokens=n, eos_token_id=-1) for p, n in zip(prompts(5), MAX_NEW_TOKENS)]
    results = model.generate_batch(requests, max_batch_size=3)
    for request, result in zip(requests, results.values()):
        assert result.generated_tokens == alone(model, request["input_ids"], max_new_tokens=request["max_new_tokens"],
                                                eos_token_id=None), result.request_id


def test_aligned_rows_complete_their_blocks_on_the_same_steps():
    """With align_blocks (the default) rows at every phase are brought into phase by sitting out at most
    L_B - 1 steps each, once: the block decoder then runs on one step in L_B, on every row, and each request
    still generates what it generates alone. Without, it runs on almost every step."""
    model = converted("llama", block_len=4)
    lengths = (9, 4, 6, 11, 5, 7, 13, 8)  # every phase, twice
    generator = torch.Generator().manual_seed(4)
    requests = [dict(input_ids=torch.randint(1, VOCAB, (n,), generator=generator).tolist(), max_new_tokens=24,
                     eos_token_id=-1) for n in lengths]
    block_calls = []
    model.block_decoder.register_forward_pre_hook(
        lambda module, args, kwargs: block_calls.append(kwargs["inputs_embeds"].shape[0]), with_kwargs=True)
    runs = {}
    for align in (True, False):
        manager = model.init_continuous_batching(max_batch_size=len(lengths), align_blocks=align)
        recorder = StepRecorder(manager)
        ids = manager.add_requests(requests)
        block_calls.clear()
        manager.run()
        decodes = sum(e[0] == "decode" for e in recorder.events)
        results = {}
        while (result := manager.get_result()) is not None:
            results[result.request_id] = result.generated_tokens
        runs[align] = (block_calls[1:], decodes, manager.steps_held, [results[i] for i in ids])  # [0]: prefill
    (aligned_calls, aligned_steps, held, aligned_out), (free_calls, free_steps, free_held, free_out) = runs[True], runs[False]
    assert aligned_out == free_out == [alone(model, r["input_ids"], max_new_tokens=24, eos_token_id=None) for r in requests]
    assert free_held == 0 and free_steps == 23 and len(free_calls) >= 20
    assert 0 < held <= 3 * len(lengths) and aligned_steps <= 23 + 3
    # once aligned, one step in L_B runs the block decoder, on every row (until the rows held least finish)
    assert aligned_calls[1:-1] == [len(lengths)] * (len(aligned_calls) - 2)
    assert len(aligned_calls) <= aligned_steps // 4 + 1
