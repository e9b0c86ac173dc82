"""Serving-like traffic for ``bt-bench --workload``: many requests of different sizes, served with a row budget.

The distribution is stated and seeded, so both models get the same requests:

* prompt lengths log-normal with median ``prompt_len`` and sigma ``prompt_sigma``, clipped to [8, 4 x median];
* ``max_new_tokens`` uniform over [max(1, new_tokens // 8), new_tokens]; eos disabled, so each request
  generates exactly its own count;
* arrivals all at t = 0 in random order (an offline queue), or Poisson at ``arrival_rate`` requests/s.

Served by (a) continuous batching (the Block Transformer's manager, or transformers' own for the source:
both have ``init_continuous_batching`` / ``add_request`` / ``get_result``), or (b) static batching: groups of
``rows`` requests in arrival order, each group one left-padded ``generate()`` call run until its longest
request is done. Per request: time to first token (from its arrival) and the gaps between its tokens.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from dataclasses import asdict, dataclass

import torch
from transformers import GenerationConfig, LogitsProcessorList

from .throughput import StepClock

MODES = ("continuous", "static")


@dataclass(frozen=True)
class Workload:
    requests: int = 64
    rows: int = 32  # row budget: requests decoding at once
    prompt_len: int = 256  # median prompt length
    prompt_sigma: float = 0.75
    new_tokens: int = 128  # the longest max_new_tokens
    arrival_rate: float | None = None  # requests/s (Poisson); None: all arrive at t = 0
    seed: int = 0

    @property
    def name(self) -> str:
        arrivals = "offline" if self.arrival_rate is None else f"{self.arrival_rate:g}rps"
        return f"workload-r{self.requests}-b{self.rows}-p{self.prompt_len}-n{self.new_tokens}-{arrivals}"


@dataclass(frozen=True)
class Request:
    request_id: str
    prompt: list[int]
    max_new_tokens: int
    arrival_s: float


def draw_requests(workload: Workload, vocab_size: int) -> list[Request]:
    """The workload's requests in arrival order (ids in [10, vocab) to steer clear of special tokens)."""
    generator = torch.Generator().manual_seed(workload.seed)
    n = workload.requests
    lengths = torch.exp(math.log(workload.prompt_len) + workload.prompt_sigma * torch.randn(n, generator=generator))
    lengths = lengths.round().clamp(8, 4 * workload.prompt_len).long().tolist()
    new = torch.randint(max(1, workload.new_tokens // 8), workload.new_tokens + 1, (n,), generator=generator).tolist()
    if workload.arrival_rate is None:
        arrivals = [0.0] * n
    else:
        gaps = torch.empty(n).exponential_(workload.arrival_rate, generator=generator)
        arrivals = (gaps.cumsum(0) - gaps[0]).tolist()
    order = torch.randperm(n, generator=generator).tolist()
    return [
        Request(f"req_{i}", torch.randint(10, vocab_size, (lengths[i],), generator=generator).tolist(), new[i], arrival)
        for arrival, i in zip(arrivals, order)
    ]


def _wait_until(deadline: float) -> None:
    delay = deadline - time.perf_counter()
    if delay > 0:
        time.sleep(delay)


def _pass_ids(requests: list[Request], tag: str) -> list[Request]:
    """The same requests under ids unique to one pass (a reused manager never sees an id twice)."""
    return [dataclasses.replace(r, request_id=f"{r.request_id}@{tag}") for r in requests]


def continuous_manager(model, workload: Workload, requests: list[Request], align_blocks: bool = True):
    """A continuous-batching manager for ``model`` with a row budget of ``workload.rows``.

    The source's is transformers' own, with a paged cache sized for the ``rows`` longest requests at once
    (what the row budget can hold), no prefix sharing (every pass repeats the same prompts) and no
    scheduler safety margin (the pool is sized already); the Block Transformer's takes the row budget and
    ``align_blocks``.
    """
    generation = GenerationConfig(max_new_tokens=workload.new_tokens, eos_token_id=-1)
    if model.config.model_type == "block_transformer":
        return model.init_continuous_batching(generation, max_batch_size=workload.rows, align_blocks=align_blocks)
    from transformers import ContinuousBatchingConfig

    page = 32
    pages = sorted((-(-(len(r.prompt) + r.max_new_tokens) // page) for r in requests), reverse=True)
    config = ContinuousBatchingConfig(
        max_requests_per_batch=workload.rows, page_size=page, num_blocks=sum(pages[: workload.rows]) + workload.rows,
        max_blocks_per_request=pages[0] + 1, max_batch_tokens=2048, allow_block_sharing=False, safety_margin=0.0)
    return model.init_continuous_batching(generation, config)


def serve_continuous(manager, requests: list[Request]) -> dict[str, tuple[list[int], list[float]]]:
    """(tokens, token timestamps in seconds from the pass's start) per request, from a started manager.

    Requests that have arrived are handed over together (``add_requests``, for the Block Transformer's
    manager, prefills them together; transformers' queues them one by one, as its own ``add_requests`` does).
    """
    from ..modeling.batching_block_transformer import BlockTransformerBatchingManager

    ours = isinstance(manager, BlockTransformerBatchingManager)
    start = time.perf_counter()
    pending = list(requests)
    while pending:
        _wait_until(start + pending[0].arrival_s)
        now = time.perf_counter() - start
        arrived = [r for r in pending if r.arrival_s <= now]
        pending = pending[len(arrived) :]
        if ours:
            manager.add_requests([dict(input_ids=r.prompt, request_id=r.request_id, max_new_tokens=r.max_new_tokens)
                                  for r in arrived], record_timestamps=True)
            continue
        for r in arrived:
            if manager.add_request(r.prompt, request_id=r.request_id, max_new_tokens=r.max_new_tokens,
                                   record_timestamps=True) is None:
                raise RuntimeError(f"the continuous-batching manager refused request {r.request_id}")
    done = {}
    while len(done) < len(requests):
        output = manager.get_result(timeout=1.0)
        if output is None:
            if not manager.is_running():
                raise RuntimeError("the continuous-batching manager stopped before every request finished")
            continue
        if output.error:
            raise RuntimeError(f"request {output.request_id} failed: {output.error}")
        if output.is_finished():
            done[output.request_id] = (list(output.generated_tokens), [t - start for t in output.timestamps])
    return done


def serve_static(model, workload: Workload, requests: list[Request]) -> dict[str, tuple[list[int], list[float]]]:
    """(tokens, token timestamps) per request, served as groups of ``rows`` requests in arrival order."""
    device = next(model.parameters()).device
    done = {}
    start = time.perf_counter()
    for first in range(0, len(requests), workload.rows):
        group = requests[first : first + workload.rows]
        _wait_until(start + max(r.arrival_s for r in group))
        width = max(len(r.prompt) for r in group)
        ids = torch.zeros(len(group), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, request in enumerate(group):
            ids[row, width - len(request.prompt) :] = torch.tensor(request.prompt)
            mask[row, width - len(request.prompt) :] = 1
        steps = max(r.max_new_tokens for r in group)
        clock = StepClock()
        # eos stays the model's (generate() warns about -1); min_new_tokens keeps it from stopping a row early
        out = model.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=steps,
                             min_new_tokens=steps, logits_processor=LogitsProcessorList([clock]))
        for row, request in enumerate(group):
            n = request.max_new_tokens
            done[request.request_id] = (out[row, width : width + n].tolist(), [t - start for t in clock.times[:n]])
    return done


def summarise(requests: list[Request], served: dict[str, tuple[list[int], list[float]]]) -> dict:
    """Requests/s and generated tokens/s over the makespan; TTFT and inter-token latency p50/p95 (seconds).

    A request that did not generate exactly its ``max_new_tokens`` (or got no timestamp per token) is an
    error, not a figure."""
    for request in requests:
        tokens, times = served.get(request.request_id, ([], []))
        if len(tokens) != request.max_new_tokens or len(times) != len(tokens):
            raise RuntimeError(f"{request.request_id} generated {len(tokens)} tokens ({len(times)} timestamps), "
                               f"expected {request.max_new_tokens}")
    timestamps = {request_id: times for request_id, (_, times) in served.items()}
    makespan = max(times[-1] for times in timestamps.values())
    ttft = [timestamps[r.request_id][0] - r.arrival_s for r in requests]
    gaps = [b - a for times in timestamps.values() for a, b in zip(times, times[1:])]
    generated = sum(r.max_new_tokens for r in requests)
    return {
        "makespan_s": makespan,
        "requests_per_s": len(requests) / makespan,
        "generated_tokens_per_s": generated / makespan,
        "generated_tokens": generated,
        "prompt_tokens": sum(len(r.prompt) for r in requests),
        "time_to_first_token_s": _percentiles(ttft),
        "inter_token_latency_s": _percentiles(gaps or [0.0]),
    }


def _percentiles(values: list[float]) -> dict:
    cuts = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else values * 99
    return {"p50": cuts[49], "p95": cuts[94], "mean": statistics.fmean(values)}


def measure_workload(model, workload: Workload, mode: str, repeats: int = 3, align_blocks: bool = True) -> dict:
    """Serve the workload once to warm up (full size: the same requests), then ``repeats`` times; the pass
    with the median makespan is reported, with every pass's makespan.

    Every way of serving runs with the same explicit generation settings (greedy, nothing from the model's
    own ``generation_config`` such as a repetition penalty); a continuous-batching manager is started once
    and reused, so its setup (e.g. the source's paged cache) is paid in the warm-up pass.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    requests = draw_requests(workload, model.config.vocab_size)
    saved = model.generation_config
    pad = saved.pad_token_id
    model.generation_config = GenerationConfig(do_sample=False, pad_token_id=0 if pad is None else pad,
                                               eos_token_id=saved.eos_token_id)
    manager = continuous_manager(model, workload, requests, align_blocks) if mode == "continuous" else None

    def serve(tag: str) -> dict:
        tagged = _pass_ids(requests, tag)
        served = serve_continuous(manager, tagged) if manager is not None else serve_static(model, workload, tagged)
        return summarise(tagged, served)

    try:
        with torch.inference_mode():
            if manager is not None:
                manager.start()
            serve("warm-up")
            runs = [serve(str(i)) for i in range(repeats)]
    finally:
        if manager is not None:
            manager.stop(block=True)
        model.generation_config = saved
    runs.sort(key=lambda run: run["makespan_s"])
    # the Block Transformer's row-steps held to align block phases, summed over every pass (warm-up included)
    held = {"steps_held": manager.steps_held, "align_blocks": align_blocks} if hasattr(manager, "steps_held") else {}
    return {"workload": asdict(workload) | {"name": workload.name}, "mode": mode, **runs[len(runs) // 2],
            "makespans_s": [run["makespan_s"] for run in runs], **held}
