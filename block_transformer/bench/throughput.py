"""Batch-generation throughput of a Block Transformer against its source model, measured honestly.

Each model is measured in its own process (``worker``) so that its peak memory is its own. Within a
process: same random prompts (same seed), eos disabled (``min_new_tokens = max_new_tokens``), a
warm-up call of the full measured size first, then ``repeats`` timed calls; the median is reported.

* whole call: ``generate(max_new_tokens=N)``, prefill + decode, as the paper reports throughput;
* time to first token: from the call's start until prefill's logits exist (timed inside the same call);
* decode only: (whole call - time to first token) over the remaining N - 1 steps.

A ragged setting is also served by the Block Transformer's continuous batcher (``measure_batcher``): the same
prompts as requests arriving together, one row each, which aligns the rows' block phases (``align_blocks``);
``generate()`` cannot, as it takes one token for every row at every step.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from dataclasses import asdict

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from .settings import Setting

logger = logging.getLogger(__name__)


def make_prompts(setting: Setting, vocab_size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token prompts (ids in [10, vocab) to steer clear of special tokens) and their attention mask."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, vocab_size, (setting.batch_size, setting.prompt_len), generator=generator)
    mask = torch.ones_like(ids)
    if setting.ragged:
        lengths = torch.randint(setting.prompt_len // 2, setting.prompt_len + 1, (setting.batch_size,), generator=generator)
        for row, length in enumerate(lengths.tolist()):
            mask[row, : setting.prompt_len - length] = 0
    return ids, mask


class StepClock(LogitsProcessor):
    """Notes when each step's logits exist (one time per generated token; the first is prefill's), for the
    first ``limit`` steps (None: all; each costs a device sync on GPUs); a no-op on the scores."""

    def __init__(self, limit: int | None = None):
        self.limit = limit
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.limit is None or len(self.times) < self.limit:
            _sync()
            self.times.append(time.perf_counter())
        return scores


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def generation_inputs(model, setting: Setting, seed: int = 0, **generate_kwargs) -> dict:
    """The keyword arguments of one measured ``generate`` call: the setting's prompts on the model's device,
    greedy, eos never reached (``min_new_tokens = max_new_tokens``)."""
    device = next(model.parameters()).device
    ids, mask = (t.to(device) for t in make_prompts(setting, model.config.vocab_size, seed))
    pad = model.generation_config.pad_token_id
    return dict(input_ids=ids, attention_mask=mask, max_new_tokens=setting.new_tokens, min_new_tokens=setting.new_tokens,
                do_sample=False, pad_token_id=0 if pad is None else pad, **generate_kwargs)


def timed_generate(model, inputs: dict) -> tuple[float, float]:
    """One ``generate(**inputs)``: (time to first token, whole call) in seconds; a logits processor notes
    when prefill has produced the first logits."""
    clock = StepClock(limit=1)
    _sync()
    started = time.perf_counter()
    model.generate(logits_processor=LogitsProcessorList([clock]), **inputs)
    _sync()
    return clock.times[0] - started, time.perf_counter() - started


def summarize(setting: Setting, runs: list[tuple[float, float]]) -> dict:
    """Median whole call and time to first token of ``runs`` and the throughputs they give."""
    ttft = statistics.median(r[0] for r in runs)
    total = statistics.median(r[1] for r in runs)
    decode_s = max(total - ttft, 1e-9)
    return {
        "setting": asdict(setting) | {"name": setting.name},
        "whole_call_s": total,
        "whole_call_tokens_per_s": setting.batch_size * setting.new_tokens / total,
        "time_to_first_token_s": ttft,
        "decode_tokens_per_s": setting.batch_size * (setting.new_tokens - 1) / decode_s,
        "runs": [{"time_to_first_token_s": a, "whole_call_s": b} for a, b in runs],
    }


def measure_generation(model, setting: Setting, repeats: int = 3, seed: int = 0, **generate_kwargs) -> dict:
    """Median whole-call time, time to first token and the derived throughputs for one setting."""
    inputs = generation_inputs(model, setting, seed, **generate_kwargs)
    with torch.inference_mode():
        # warm-up of the full measured size: the first large prefill in a process runs ~1.5x slower on CPU
        # (a cold allocator), which a short warm-up does not pay for
        timed_generate(model, inputs)
        runs = [timed_generate(model, inputs) for _ in range(repeats)]
    return summarize(setting, runs) | {"kv_cache_bytes_per_sequence": kv_cache_bytes(model, setting)}


def timed_batcher(model, prompts: list[list[int]], new_tokens: int) -> tuple[float, float, int]:
    """``prompts`` served by the Block Transformer's continuous batcher, arriving together, a row each,
    ``new_tokens`` each (greedy, no eos): (time to first token, whole call, row-steps held to align block
    phases). Prefill is one call, so every first token exists at the same time."""
    manager = model.init_continuous_batching(GenerationConfig(do_sample=False, eos_token_id=-1),
                                             max_batch_size=len(prompts))
    _sync()
    started = time.perf_counter()
    manager.add_requests(prompts, max_new_tokens=new_tokens, record_timestamps=True)
    manager.run()
    _sync()
    outputs = []
    while (output := manager.get_result()) is not None:
        outputs.append(output)
    if len(outputs) != len(prompts) or any(len(o.generated_tokens) != new_tokens for o in outputs):
        raise RuntimeError(f"the batcher returned {len(outputs)} of {len(prompts)} requests, not all of "
                           f"{new_tokens} tokens")
    first = max(o.timestamps[0] for o in outputs) - started
    return first, max(o.timestamps[-1] for o in outputs) - started, manager.steps_held


def measure_batcher(model, setting: Setting, repeats: int = 3, seed: int = 0) -> dict:
    """``measure_generation``'s figures for the setting's prompts served by the continuous batcher."""
    ids, mask = make_prompts(setting, model.config.vocab_size, seed)
    prompts = [row[keep.bool()].tolist() for row, keep in zip(ids, mask)]
    with torch.inference_mode():
        timed_batcher(model, prompts, setting.new_tokens)  # warm-up of the full measured size
        runs = [timed_batcher(model, prompts, setting.new_tokens) for _ in range(repeats)]
    return summarize(setting, [run[:2] for run in runs]) | {
        "served_by": "continuous batcher (align_blocks)",
        "steps_held": runs[0][2],  # the same in every run: it depends only on the prompt lengths
        "kv_cache_bytes_per_sequence": kv_cache_bytes(model, setting),
    }


def _attention_shape(config) -> tuple[int, int]:
    """(key/value heads, head dim) of a family config."""
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return kv_heads, head_dim


def _kv_width(config) -> int:
    """Key (= value) numbers per position summed over the layers; a heterogeneous config's layers differ."""
    if getattr(config, "is_heterogeneous", False):
        return sum(math.prod(_attention_shape(config.per_layer_config[i])) for i in range(config.num_hidden_layers))
    return config.num_hidden_layers * math.prod(_attention_shape(config))


def kv_cache_bytes(model, setting: Setting) -> int:
    """KV-cache bytes one sequence holds at the end of a call (analytic, from the architecture).

    Vanilla: every layer keeps K and V for every position. Block Transformer: the block decoder keeps
    one entry per complete block plus the start vector, the token decoder at most N_P + L_B - 1.
    """
    dtype_bytes = next(model.parameters()).element_size()
    length = setting.prompt_len + setting.new_tokens
    cfg = model.config
    if cfg.model_type == "block_transformer":
        block = _kv_width(cfg.block_decoder_config) * (1 + length // cfg.block_len)
        token = _kv_width(cfg.token_decoder_config) * cfg.token_decoder_len
        return 2 * dtype_bytes * (block + token)
    return 2 * dtype_bytes * _kv_width(cfg) * length


def _weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of weights a forward step reads: embedding tables only contribute the rows they look up,
    unless the table doubles as the LM head (tied), which is read whole."""
    head = module.get_output_embeddings() if hasattr(module, "get_output_embeddings") else None
    head = head.weight if head is not None else None
    lookups = {
        id(m.weight) for m in module.modules() if isinstance(m, torch.nn.Embedding) and m.weight is not head
    }
    unique = {id(p): p for p in module.parameters() if id(p) not in lookups}
    return sum(p.numel() * p.element_size() for p in unique.values())


def bytes_per_decode_step(model, setting: Setting, context: int | None = None) -> dict:
    """Bytes a decode step must read at ``context`` tokens: the weights it uses plus the batch's KV cache.

    Memory-bound decoding runs at roughly bandwidth / these bytes, so the ratio of the two models is the
    ideal speed-up to set the measured one against. In a Block Transformer only the rows that complete
    a block (1 in L_B on average) read the block decoder's KV cache, and its weights are read on the
    steps where any row does: 1 in L_B steps when prompts are aligned, almost every step when ragged.
    """
    context = context or setting.prompt_len + setting.new_tokens // 2
    cfg = model.config
    batch = setting.batch_size
    if cfg.model_type != "block_transformer":
        weights = _weight_bytes(model)
        kv = kv_cache_bytes(model, Setting(batch, context, 0)) * batch
        return {"context": context, "weights_bytes": weights, "kv_bytes": int(kv), "total_bytes": int(weights + kv)}
    dtype_bytes = next(model.parameters()).element_size()
    block_kv, block_hd = _attention_shape(cfg.block_decoder_config)
    token_kv, token_hd = _attention_shape(cfg.token_decoder_config)
    p_block_step = 1 - (1 - 1 / cfg.block_len) ** batch if setting.ragged else 1 / cfg.block_len
    block_weights = _weight_bytes(model.block_decoder) + model.embedder.weight.numel() * dtype_bytes
    weights = _weight_bytes(model) - block_weights + p_block_step * block_weights
    block = 2 * cfg.block_decoder_config.num_hidden_layers * block_kv * block_hd * (1 + context // cfg.block_len)
    token = 2 * cfg.token_decoder_config.num_hidden_layers * token_kv * token_hd * cfg.token_decoder_len
    kv = dtype_bytes * (batch / cfg.block_len * block + batch * token)
    return {"context": context, "weights_bytes": int(weights), "kv_bytes": int(kv), "total_bytes": int(weights + kv)}
