"""Continuous batching for the Block Transformer: a manager that keeps a fixed number of rows decoding.

The entry points mirror transformers' own (``generate_batch``, ``init_continuous_batching``,
``continuous_batching_context_manager`` on the model, and a manager with ``add_request`` / ``get_result`` /
``request_id_iter``), whose paged-attention machinery does not apply to the block-level and local caches.
Travels with every saved model next to ``modeling_block_transformer.py`` (torch + transformers only).
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import itertools
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from transformers import GenerationConfig, LogitsProcessorList

from .modeling_block_transformer import BlockTransformerCache

if TYPE_CHECKING:
    from .modeling_block_transformer import BlockTransformerForCausalLM


class RequestStatus(IntEnum):
    """Where a request stands (the values of transformers' continuous-batching ``RequestStatus``)."""

    PENDING = 0
    PREFILLING = 1
    DECODING = 2
    FINISHED = 3
    FAILED = 4


@dataclass
class GenerationOutput:
    """One request's result, with the fields of transformers' continuous-batching ``GenerationOutput``.

    ``generated_tokens`` includes the end-of-sequence token when one stopped the request, as ``generate``
    does; ``logprobs`` stays empty (not computed).
    """

    request_id: str
    prompt_ids: list[int] = field(default_factory=list)
    generated_tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    error: str | None = None
    status: RequestStatus = RequestStatus.PENDING
    created_time: float = field(default_factory=time.perf_counter)
    lifespan: tuple[float, float] = (-1, -1)  # (time prefilled, time finished)
    timestamps: list[float] | None = None  # one per generated token, when asked for

    def is_finished(self) -> bool:
        return self.status >= RequestStatus.FINISHED


@dataclass
class _Request:
    output: GenerationOutput
    max_new_tokens: int
    eos_token_ids: frozenset[int]
    do_sample: bool
    processors: LogitsProcessorList
    generator: torch.Generator | None
    streaming: bool
    callback: Callable[[GenerationOutput], None] | None


class BlockTransformerBatchingManager:
    """Keeps up to ``max_batch_size`` requests decoding together, each at its own block phase.

    A request that finishes (end-of-sequence or ``max_new_tokens``) leaves its row at once; waiting requests
    are prefilled together in a cache of their own (left-padded, which computes what each computes alone)
    and their rows are copied into the freed rows of the running cache (``BlockTransformerCache.admit``).
    Rows nobody takes are dropped (``keep_rows``), which also cuts the block cache back when the longest
    request has left, and the cache is dropped entirely when no request is running.

    With ``align_blocks`` (the default) rows complete their blocks on the same steps: a row whose next token
    would complete a block on another step sits out (at most L_B - 1 steps, once per request: from then on it
    is in phase). The block decoder then runs once every L_B steps on all rows, instead of at almost every
    step on the few rows that complete a block there, which on a memory-bound device reads its weights
    L_B times as often. What each request generates does not change, only when.

    Drive it from a background thread (``start`` / ``stop``, or ``model.continuous_batching_context_manager``)
    or synchronously with ``step()``. Each request has its own generation settings (any ``GenerationConfig``
    field: ``max_new_tokens``, ``eos_token_id``, ``do_sample``, ``temperature``, ``top_k``, ``top_p``, ...) and,
    when sampling, its own random generator seeded by ``seed``: a request produces what
    ``torch.manual_seed(seed); model.generate(prompt, ...)`` produces alone (up to float ties).
    """

    def __init__(self, model: "BlockTransformerForCausalLM", generation_config: GenerationConfig | None, max_batch_size: int,
                 align_blocks: bool = True):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}.")
        self.model = model
        self.generation_config = generation_config
        self.max_batch_size = max_batch_size
        self.align_blocks = align_blocks
        self._to_block_step: int | None = None  # steps until the rows' common block step (0: this one); None: unset
        self.steps_held = 0  # row-steps sat out to align block phases, over the manager's life
        self.input_queue: queue.Queue[_Request] = queue.Queue()
        self.output_queue: queue.Queue[GenerationOutput] = queue.Queue()
        self._cancelled: queue.Queue[str] = queue.Queue()
        self._waiting: deque[_Request] = deque()
        self._rows: list[_Request | None] = []  # row i of the cache; None: freed, to refill or drop
        self._cache: BlockTransformerCache | None = None
        self._counter = itertools.count()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._handlers: dict[str, tuple[Callable, object]] = {}  # request id -> (callback, event loop)
        self.background_thread_status = _ThreadStatus()  # .fatal_error: what stopped the background thread

    # -- requests ---------------------------------------------------------------------------------------------

    def add_request(
        self,
        input_ids: list[int],
        request_id: str | None = None,
        max_new_tokens: int | None = None,
        streaming: bool = False,
        record_timestamps: bool = False,
        eos_token_id: int | list[int] | None = None,
        seed: int | None = None,
        callback: Callable[[GenerationOutput], None] | None = None,
        **generation_kwargs,
    ) -> str:
        """Queue one prompt; returns its request id.

        ``generation_kwargs`` override the manager's ``GenerationConfig`` for this request only. With
        ``streaming`` every new token delivers a ``GenerationOutput`` (status DECODING), then the final one;
        ``callback`` receives the outputs (on the generation thread) instead of the output queue.
        """
        request = self._request(input_ids, request_id, max_new_tokens, streaming, record_timestamps, eos_token_id,
                                seed, callback, **generation_kwargs)
        self._enqueue([request])
        return request.output.request_id

    def _request(self, input_ids, request_id, max_new_tokens, streaming, record_timestamps, eos_token_id, seed,
                 callback, **generation_kwargs) -> _Request:
        """A checked request with its own generation settings, logits processors and random generator."""
        prompt = [int(t) for t in (input_ids.tolist() if isinstance(input_ids, torch.Tensor) else input_ids)]
        if not prompt:
            raise ValueError("a request needs at least one prompt token.")
        overrides = {k: v for k, v in dict(max_new_tokens=max_new_tokens, eos_token_id=eos_token_id).items() if v is not None}
        # generate()'s own merge: these settings > the manager's config > the model's > transformers' defaults
        config = copy.deepcopy(self.generation_config) if self.generation_config is not None else GenerationConfig()
        unused = config.update(**overrides, **generation_kwargs)
        config, _ = self.model._prepare_generation_config(config)
        if unused:
            raise ValueError(f"unknown generation settings for a request: {sorted(unused)}.")
        config.validate()
        if (config.num_beams or 1) > 1 or (config.num_return_sequences or 1) > 1:
            raise ValueError("continuous batching supports greedy search and sampling (num_beams=1, one sequence).")
        limit = config.max_new_tokens if config.max_new_tokens is not None else config.max_length - len(prompt)
        if limit < 1:
            raise ValueError(f"nothing to generate: max_new_tokens is {limit} for a prompt of {len(prompt)} tokens.")
        eos = config.eos_token_id
        eos = [t for t in ([] if eos is None else [eos] if isinstance(eos, int) else eos) if t >= 0]  # -1: none
        config.eos_token_id = eos or None
        device = self.model.device
        self.model._prepare_special_tokens(config, kwargs_has_attention_mask=True, device=device)
        processors = self.model._get_logits_processor(
            generation_config=config, input_ids_seq_length=len(prompt), device=device, model_kwargs={}
        )
        generator = None
        if config.do_sample:
            if seed is None:
                seed = int(torch.randint(2**62, (1,)))
            generator = torch.Generator(device=device).manual_seed(seed)
        if request_id is None:
            with self._lock:
                request_id = f"req_{next(self._counter)}"
        output = GenerationOutput(request_id=request_id, prompt_ids=prompt, timestamps=[] if record_timestamps else None)
        return _Request(output, limit, frozenset(eos), bool(config.do_sample), processors, generator, streaming, callback)

    def _enqueue(self, requests: list[_Request]) -> None:
        """Queue requests together and wake the generation thread once, so they are prefilled together."""
        for request in requests:
            self.input_queue.put(request)
        self._wake.set()

    def add_requests(self, inputs: list, max_new_tokens: int | None = None, streaming: bool = False,
                     record_timestamps: bool = False, **generation_kwargs) -> list[str]:
        """``add_request`` for each prompt, with shared settings; an input may also be a dict of ``add_request``
        arguments (``{"input_ids": [...], "max_new_tokens": 8, "do_sample": True, "seed": 3}``) to override them."""
        defaults = dict(request_id=None, eos_token_id=None, seed=None, callback=None)
        shared = dict(max_new_tokens=max_new_tokens, streaming=streaming, record_timestamps=record_timestamps,
                      **generation_kwargs)
        requests = [  # all checked first: one bad input queues none
            self._request(**{**defaults, **shared, **(item if isinstance(item, dict) else {"input_ids": item})})
            for item in inputs
        ]
        self._enqueue(requests)
        return [request.output.request_id for request in requests]

    def cancel_request(self, request_id: str) -> None:
        """Stop a request: it is delivered as it stands, with status FAILED and error "cancelled"."""
        self._cancelled.put(request_id)
        self._wake.set()

    def get_result(self, request_id: str | None = None, timeout: float | None = None) -> GenerationOutput | None:
        """One delivered output (of ``request_id`` if given, others are put back), or None after ``timeout``."""
        try:
            result = self.output_queue.get(block=self.is_running(), timeout=timeout)
        except queue.Empty:
            return None
        if request_id is not None and result.request_id != request_id:
            self.output_queue.put(result)
            return None
        return result

    def __iter__(self) -> Iterator[GenerationOutput]:
        """Outputs as they are delivered, while the background thread runs."""
        while self.is_running() or not self.output_queue.empty():
            result = self.get_result(timeout=0.1)
            if result is not None:
                yield result

    def request_id_iter(self, request_id: str) -> Iterator[GenerationOutput]:
        """The outputs of one request (its stream if ``streaming``), until it is finished."""
        while self.is_running() or not self.output_queue.empty():
            result = self.get_result(request_id=request_id, timeout=0.1)
            if result is not None:
                yield result
                if result.is_finished():
                    return

    def register_result_handler(self, request_id: str, callback: Callable[[GenerationOutput], None]) -> None:
        """Deliver a request's outputs to ``callback`` on the running asyncio event loop (as transformers'
        manager does; ``transformers serve --continuous-batching`` relies on it). Outputs already queued for
        the request are handed over too; the handler is dropped once the request is finished."""
        loop = asyncio.get_running_loop()
        with self._lock:
            self._handlers[request_id] = (callback, loop)
            queued = []
            while True:
                try:
                    queued.append(self.output_queue.get_nowait())
                except queue.Empty:
                    break
            for output in queued:
                if output.request_id == request_id:
                    self._dispatch(output)
                else:
                    self.output_queue.put(output)

    def has_pending_requests(self) -> bool:
        return bool(self._rows) or bool(self._waiting) or not self.input_queue.empty()

    # -- the background thread ------------------------------------------------------------------------------

    def start(self) -> None:
        if self.is_running():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="block-transformer-batching", daemon=True)
        self._thread.start()

    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, block: bool = True, timeout: float | None = None) -> None:
        """Stop the background thread (requests not finished stay queued for a later ``start`` or ``step``)."""
        self._stop.set()
        self._wake.set()
        if block and self._thread is not None:
            self._thread.join(timeout)
        if not self.is_running():
            self._thread = None

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        with torch.inference_mode():
            while not self._stop.is_set():
                if not self.has_pending_requests() and self._cancelled.empty():
                    self._wake.wait(0.1)
                    self._wake.clear()
                    continue
                try:
                    self.step()
                except Exception as error:  # a failed step fails every request it holds, not silently
                    self.background_thread_status.fatal_error = error
                    self._fail_all(error)
                    return

    def _fail_all(self, error: BaseException) -> None:
        self._take_inputs()
        for request in [*(r for r in self._rows if r is not None), *self._waiting]:
            request.output.error = f"{type(error).__name__}: {error}"
            request.output.status = RequestStatus.FAILED
            self._deliver(request)
        self._rows, self._waiting, self._cache, self._to_block_step = [], deque(), None, None

    # -- one step -------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> bool:
        """Admit waiting requests into free rows, decode one token for every running row, free the rows that
        finished (and refill them). Returns whether requests remain."""
        self._take_inputs()
        self._fill()
        if self._rows:
            self._decode()
            self._fill()
        return self.has_pending_requests()

    def run(self) -> None:
        """Step until every queued request is finished (synchronous use)."""
        while self.step():
            pass

    def _take_inputs(self) -> None:
        while True:
            try:
                self._waiting.append(self.input_queue.get_nowait())
            except queue.Empty:
                break
        cancelled = set()
        while True:
            try:
                cancelled.add(self._cancelled.get_nowait())
            except queue.Empty:
                break
        if not cancelled:
            return
        for request in [r for r in self._waiting if r.output.request_id in cancelled]:
            self._waiting.remove(request)
            self._finish(request, cancelled=True)
        for i, request in enumerate(self._rows):
            if request is not None and request.output.request_id in cancelled:
                self._rows[i] = None
                self._finish(request, cancelled=True)

    def _fill(self) -> None:
        """Prefill waiting requests into freed and free rows, then drop the rows nobody took."""
        while self._waiting and (free := self.max_batch_size - sum(r is not None for r in self._rows)) > 0:
            joining = [self._waiting.popleft() for _ in range(min(free, len(self._waiting)))]
            joined, logits = self._prefill(joining)
            staying = [i for i, (request, token) in enumerate(zip(joining, self._choose(joining, logits)))
                       if not self._emit(request, token)]
            if not staying:
                continue
            if len(staying) < len(joining):
                joined.keep_rows(torch.tensor(staying, device=joined.num_tokens.device))
            if self._cache is None:
                self._cache, self._rows = joined, [joining[i] for i in staying]
                continue
            freed = [i for i, r in enumerate(self._rows) if r is None][: len(staying)]
            into = freed + list(range(len(self._rows), len(self._rows) + len(staying) - len(freed)))
            self._cache.admit(joined, torch.tensor(into))
            self._rows += [None] * (len(into) - len(freed))
            for row, i in zip(into, staying):
                self._rows[row] = joining[i]
        keep = [i for i, r in enumerate(self._rows) if r is not None]
        if len(keep) == len(self._rows):
            return
        if keep:
            self._cache.keep_rows(torch.tensor(keep, device=self._cache.num_tokens.device))
            self._rows = [self._rows[i] for i in keep]
        else:
            self._cache, self._rows, self._to_block_step = None, [], None

    def _prefill(self, joining: list[_Request]) -> tuple[BlockTransformerCache, torch.Tensor]:
        prompts = [r.output.prompt_ids for r in joining]
        width = max(map(len, prompts))
        device = self.model.device
        ids = torch.zeros(len(prompts), width, dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :] = torch.tensor(prompt, device=device)
            mask[row, width - len(prompt) :] = 1
        now = time.perf_counter()
        for request in joining:
            request.output.status = RequestStatus.PREFILLING
            request.output.lifespan = (now, -1)
        cache = BlockTransformerCache(self.model.config)
        logits = self.model(input_ids=ids, attention_mask=mask, past_key_values=cache, logits_to_keep=1).logits[:, -1]
        return cache, logits

    def _decode(self) -> None:
        device = self._cache.num_tokens.device
        stepping = self._stepping_rows()
        newest = torch.tensor([[self._rows[i].output.generated_tokens[-1]] for i in stepping], device=device)
        rows = None if len(stepping) == len(self._rows) else torch.tensor(stepping, device=device)
        logits = self.model._decode_step(newest, None, self._cache, rows=rows).logits[:, -1]
        for i, token in zip(stepping, self._choose([self._rows[i] for i in stepping], logits)):
            if self._emit(self._rows[i], token):
                self._rows[i] = None

    def _stepping_rows(self) -> list[int]:
        """The rows that take this step: all of them, except (``align_blocks``) those whose newest token would
        complete a block before the rows' common block step. That step is first put where the rows wait
        least, and moved to now when every row would wait (nobody would step)."""
        block_len = self.model.config.block_len
        everyone = list(range(len(self._rows)))
        if not self.align_blocks or block_len == 1:
            return everyone
        # steps until each row's newest token completes a block (0: this one); the cache holds every token but it
        until = [(block_len - 1 - (len(r.output.prompt_ids) + len(r.output.generated_tokens) - 1)) % block_len
                 for r in self._rows]
        if self._to_block_step is None:
            self._to_block_step = min(range(block_len), key=lambda k: sum((k - u) % block_len for u in until))
        stepping = [i for i in everyone if until[i] or not self._to_block_step]
        if not stepping:
            self._to_block_step, stepping = 0, everyone
        self.steps_held += len(everyone) - len(stepping)
        self._to_block_step = (self._to_block_step - 1) % block_len
        return stepping

    def _choose(self, requests: list[_Request], logits: torch.Tensor) -> list[int]:
        """Each request's next token, as ``generate`` picks it (its logits processors, then argmax or sampling
        with the request's own generator)."""
        logits = logits.to(torch.float32)
        tokens = logits.argmax(dim=-1).tolist()
        for i, request in enumerate(requests):
            if not request.processors and not request.do_sample:
                continue
            ids = torch.tensor([request.output.prompt_ids + request.output.generated_tokens], device=logits.device)
            scores = request.processors(ids, logits[i : i + 1].clone())
            if request.do_sample:
                probs = F.softmax(scores, dim=-1)
                tokens[i] = int(torch.multinomial(probs, num_samples=1, generator=request.generator))
            else:
                tokens[i] = int(scores.argmax(dim=-1))
        return tokens

    def _emit(self, request: _Request, token: int) -> bool:
        """Record a generated token and deliver what is due; returns whether the request is finished."""
        output = request.output
        output.generated_tokens.append(token)
        output.status = RequestStatus.DECODING
        if output.timestamps is not None:
            output.timestamps.append(time.perf_counter())
        if token in request.eos_token_ids or len(output.generated_tokens) >= request.max_new_tokens:
            self._finish(request)
            return True
        if request.streaming:
            self._deliver(request, snapshot=True)
        return False

    def _finish(self, request: _Request, cancelled: bool = False) -> None:
        output = request.output
        output.status = RequestStatus.FAILED if cancelled else RequestStatus.FINISHED
        output.error = "cancelled" if cancelled else None
        output.lifespan = (output.lifespan[0], time.perf_counter())
        self._deliver(request)

    def _deliver(self, request: _Request, snapshot: bool = False) -> None:
        output = request.output
        if snapshot:
            output = dataclasses.replace(output, generated_tokens=list(output.generated_tokens),
                                         timestamps=None if output.timestamps is None else list(output.timestamps))
        if request.callback is not None:
            request.callback(output)
            return
        with self._lock:
            if output.request_id in self._handlers:
                self._dispatch(output)
            else:
                self.output_queue.put(output)

    def _dispatch(self, output: GenerationOutput) -> None:
        """To the request's registered handler, on its event loop (caller holds the lock)."""
        callback, loop = self._handlers[output.request_id]
        if output.is_finished():
            del self._handlers[output.request_id]
        loop.call_soon_threadsafe(callback, output)


@dataclass
class _ThreadStatus:
    fatal_error: BaseException | None = None


__all__ = ["BlockTransformerBatchingManager", "GenerationOutput", "RequestStatus"]
