"""Where a Block Transformer's cached decode step spends its time on this CPU, and what compiling it could save.

Prefills a batch (bt-bench's prompts: batch 32, P256, aligned or ragged), then runs N decode steps of
``forward`` with the cache, first unprofiled (warm-up and the step's wall time), then under
``torch.profiler``. Every operator's *self* CPU time is put in one group: the leaf matrix-multiplication
and attention kernels, copies (indexing, concatenation, allocation), views and composite ops (dispatch only),
element-wise arithmetic and the rest; the profiled step's time minus the time inside operators is spent
outside them (Python, module calls, and the profiler's own bookkeeping, which is why the unprofiled time is
reported too). A compiler can fuse element-wise work, drop copies, views and Python overhead; with default
Inductor on a CPU it calls the same oneDNN/BLAS kernels (weight prepacking with ``freezing=True`` or
max-autotune's GEMM templates could speed those up too). ``compile_bound`` = profiled step time / kernel
time (both from the same run: absolute times drift between runs on a shared CPU, shares do not) is what a
compiled step would gain if every non-kernel cost vanished: an upper bound, not an estimate
(this step also has host syncs — rows completing a block, the cache length — that split a compiled graph).

    python benchmarks/profile_decode.py runs/tradeoff/partition-15-15/converted            # aligned
    python benchmarks/profile_decode.py runs/tradeoff/partition-15-15/converted --ragged
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from block_transformer import environment  # noqa: E402
from block_transformer.bench.settings import Setting  # noqa: E402
from block_transformer.bench.throughput import make_prompts  # noqa: E402
from block_transformer.bench.worker import load  # noqa: E402
from block_transformer.export import write_text_atomic  # noqa: E402
from block_transformer.modeling import BlockTransformerCache  # noqa: E402

# Operator -> group, by exact name (a trailing "_", the in-place variant, is dropped first). "kernels" are the
# leaf matrix and attention kernels: a compiler on this CPU calls the same oneDNN/BLAS routines for them. The
# composite ops above them (aten::linear, aten::matmul, aten::scaled_dot_product_attention) only dispatch.
GROUPS = {
    "kernels": {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_softmax",
                "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_attention_math"},
    "copies": {"aten::copy", "aten::index", "aten::index_put", "aten::_index_put_impl", "aten::cat", "aten::gather",
               "aten::scatter", "aten::clone", "aten::contiguous", "aten::_to_copy", "aten::empty", "aten::zeros",
               "aten::new_zeros", "aten::fill", "aten::zero", "aten::masked_fill", "aten::where", "aten::repeat",
               "aten::nonzero", "aten::_local_scalar_dense", "aten::embedding", "aten::index_select", "aten::arange",
               "aten::ones", "aten::full", "aten::empty_like", "aten::zeros_like", "aten::empty_strided",
               "aten::resize", "aten::new_empty", "aten::_unsafe_view", "aten::triu", "aten::tril"},
    "views": {"aten::view", "aten::reshape", "aten::transpose", "aten::select", "aten::slice", "aten::expand",
              "aten::as_strided", "aten::t", "aten::unsqueeze", "aten::squeeze", "aten::flatten", "aten::unflatten",
              "aten::permute", "aten::alias", "aten::detach", "aten::lift_fresh", "aten::narrow", "aten::split",
              "aten::chunk", "aten::unbind", "aten::expand_as", "aten::view_as", "aten::to", "aten::item",
              "aten::linear", "aten::matmul", "aten::scaled_dot_product_attention", "aten::softmax"},
    "elementwise": {"aten::add", "aten::mul", "aten::sub", "aten::div", "aten::neg", "aten::pow", "aten::rsqrt",
                    "aten::mean", "aten::silu", "aten::sigmoid", "aten::gelu", "aten::tanh", "aten::exp", "aten::cos",
                    "aten::sin", "aten::sum", "aten::remainder", "aten::floor_divide", "aten::eq", "aten::lt",
                    "aten::le", "aten::gt", "aten::ge", "aten::ne", "aten::bitwise_and", "aten::bitwise_or",
                    "aten::bitwise_not", "aten::logical_and", "aten::logical_not", "aten::max", "aten::min",
                    "aten::argmax", "aten::clamp", "aten::sqrt", "aten::native_layer_norm", "aten::_fused_rms_norm",
                    "aten::type_as", "aten::topk", "aten::cumsum", "aten::rms_norm", "aten::layer_norm"},
}


def group_of(name: str) -> str:
    name = name[:-1] if name.endswith("_") and not name.endswith("__") else name
    return next((group for group, names in GROUPS.items() if name in names), "other")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a converted model folder")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--steps", type=int, default=16, help="decode steps profiled (a multiple of L_B)")
    parser.add_argument("--ragged", action="store_true", help="prompt lengths over [P/2, P], left-padded")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None)
    return parser.parse_args()


@torch.inference_mode()
def decode_steps(model, ids: torch.Tensor, mask: torch.Tensor, steps: int, timed: list[float] | None = None,
                 profiler: profile | None = None) -> None:
    """Prefill, then ``steps`` greedy decode steps through ``forward`` with the cache (only those are profiled)."""
    cache = BlockTransformerCache(model.config)
    out = model(ids, attention_mask=mask, past_key_values=cache, logits_to_keep=1)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    if profiler is not None:
        profiler.start()
    for _ in range(steps):
        started = time.perf_counter()
        out = model(token, past_key_values=cache)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        if timed is not None:
            timed.append(time.perf_counter() - started)
    if profiler is not None:
        profiler.stop()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load("block_transformer", args.model, torch.float32, "cpu")
    setting = Setting(args.batch, args.prompt, args.steps, ragged=args.ragged)
    ids, mask = make_prompts(setting, model.config.vocab_size)
    load_before = os.getloadavg()[0]

    decode_steps(model, ids, mask, args.steps)  # warm-up of the full size (cold allocator)
    walls: list[float] = []
    runs = []
    for _ in range(3):  # a step that completes a block also runs the block decoder: whole runs, per step
        before = len(walls)
        decode_steps(model, ids, mask, args.steps, walls)
        runs.append(sum(walls[before:]) / args.steps)
    step_s = statistics.median(runs)

    prof = profile(activities=[ProfilerActivity.CPU])
    profiled: list[float] = []
    decode_steps(model, ids, mask, args.steps, profiled, prof)
    events = prof.key_averages()
    self_us: dict[str, float] = defaultdict(float)
    for event in events:
        self_us[group_of(event.key)] += event.self_cpu_time_total
    per_step = {group: us / 1e6 / args.steps for group, us in self_us.items()}
    profiled_step = sum(profiled) / len(profiled)  # the profiler's own overhead is in here, not in step_s
    per_step["outside_operators"] = max(profiled_step - sum(per_step.values()), 0.0)
    kernels = per_step.get("kernels", 0.0)
    report = {
        "benchmark": "profile_decode",
        "model": args.model,
        "setting": {"batch": args.batch, "prompt": args.prompt, "ragged": args.ragged, "steps": args.steps},
        "step_wall_s": step_s,
        "profiled_step_wall_s": profiled_step,
        "per_step_s": per_step,
        "shares": {group: seconds / profiled_step for group, seconds in per_step.items()},
        # within the profiled run (absolute times drift between runs on a shared CPU); the profiler's own overhead
        # lands outside the operators, which only raises this bound
        "compile_bound": profiled_step / kernels if kernels else None,
        "load_average": {"before": load_before, "after": os.getloadavg()[0]},
        "threads": torch.get_num_threads(),
        "environment": environment.describe(threads=torch.get_num_threads()),
        "top_ops": [
            {"op": e.key, "group": group_of(e.key), "self_s_per_step": e.self_cpu_time_total / 1e6 / args.steps}
            for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:15]
        ],
    }
    print(f"decode step (mean over {args.steps} steps, median of {len(runs)} runs): {step_s * 1e3:.1f} ms; "
          f"profiled {profiled_step * 1e3:.1f} ms (load {load_before:.2f})")
    for group, share in sorted(report["shares"].items(), key=lambda kv: -kv[1]):
        print(f"  {group:20s} {share:6.1%}  {per_step[group] * 1e3:7.2f} ms")
    if kernels:
        print(f"a compiled step's gain if every non-kernel cost vanished (profiled step / kernels): "
              f"{report['compile_bound']:.2f}x")
    if args.json:
        write_text_atomic(args.json, json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
