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

import math
import statistics
import time
from dataclasses import asdict, dataclass

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

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


def _generation_config(model, **settings) -> GenerationConfig:
    pad = model.generation_config.pad_token_id
    return GenerationConfig(do_sample=False, pad_token_id=0 if pad is None else pad, **settings)


def serve_continuous(model, workload: Workload, requests: list[Request]) -> dict[str, list[float]]:
    """Token timestamps per request (seconds from the workload's start), served by continuous batching."""
    config = _generation_config(model, max_new_tokens=workload.new_tokens, eos_token_id=-1)  # -1: no eos
    if getattr(model.config, "model_type", None) == "block_transformer":
        manager = model.init_continuous_batching(config, max_batch_size=workload.rows)
    else:
        from transformers import ContinuousBatchingConfig

        longest = max(len(r.prompt) + r.max_new_tokens for r in requests)
        page = 32
        manager = model.init_continuous_batching(config, ContinuousBatchingConfig(
            max_requests_per_batch=workload.rows, page_size=page,
            num_blocks=workload.rows * -(-longest // page) + workload.rows, max_batch_tokens=2048))
    manager.start()
    try:
        start = time.perf_counter()
        for request in requests:
            _wait_until(start + request.arrival_s)
            manager.add_request(request.prompt, request_id=request.request_id, max_new_tokens=request.max_new_tokens,
                                record_timestamps=True)
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
                done[output.request_id] = [t - start for t in output.timestamps]
    finally:
        manager.stop(block=True)
    return done


class _StepClock(LogitsProcessor):
    """Notes when each step's logits exist (one timestamp per generated token of the group)."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        return scores


def serve_static(model, workload: Workload, requests: list[Request]) -> dict[str, list[float]]:
    """Token timestamps per request, served as groups of ``rows`` requests in arrival order."""
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
        # eos stays the model's; min_new_tokens keeps it from stopping a row early
        config = _generation_config(model, max_new_tokens=steps, min_new_tokens=steps)
        clock = _StepClock()
        model.generate(ids.to(device), attention_mask=mask.to(device), generation_config=config,
                       logits_processor=LogitsProcessorList([clock]))
        for request in group:
            done[request.request_id] = [t - start for t in clock.times[: request.max_new_tokens]]
    return done


def summarise(requests: list[Request], timestamps: dict[str, list[float]]) -> dict:
    """Requests/s and generated tokens/s over the makespan; TTFT and inter-token latency p50/p95 (seconds)."""
    for request in requests:
        got = len(timestamps.get(request.request_id, []))
        if got != request.max_new_tokens:
            raise RuntimeError(f"{request.request_id} generated {got} tokens, expected {request.max_new_tokens}")
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


def measure_workload(model, workload: Workload, mode: str, repeats: int = 3) -> dict:
    """Serve the workload once to warm up (full size: the same requests), then ``repeats`` times; the repeat
    with the median makespan is reported, with every repeat's makespan."""
    serve = {"continuous": serve_continuous, "static": serve_static}[mode]
    requests = draw_requests(workload, model.config.vocab_size)
    with torch.inference_mode():
        serve(model, workload, requests)
        runs = [summarise(requests, serve(model, workload, requests)) for _ in range(repeats)]
    runs.sort(key=lambda run: run["makespan_s"])
    return {"workload": asdict(workload) | {"name": workload.name}, "mode": mode, **runs[len(runs) // 2],
            "makespans_s": [run["makespan_s"] for run in runs]}
