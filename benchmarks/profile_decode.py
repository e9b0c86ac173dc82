"""Where a Block Transformer's cached decode step spends its time on this CPU, and what compiling it could save.

Prefills a batch (bt-bench's prompts: batch 32, P256, aligned or ragged), then runs N decode steps of
``forward`` with the cache, first unprofiled (warm-up and the step's wall time), then under
``torch.profiler``. Every operator's *self* CPU time is put in one group: matrix multiplications,
attention kernels, memory movement (copies, indexing, concatenation), element-wise arithmetic and the rest;
the profiled step's wall time minus the time inside operators is the Python and dispatch overhead (with the
profiler's own, which is why the unprofiled wall time is reported too). A compiler can
fuse element-wise work, drop memory movement and remove Python overhead, but on a CPU it does not speed up
the matrix multiplications (oneDNN/BLAS either way): ``compile_bound`` = wall / (matmul + attention) is the
most any compiled step could gain.

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

ROOT = Path(__file__).resolve().parent.parent
GROUPS = {  # operator -> group; anything else is "other"
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear",
               "aten::_mkldnn", "mkldnn"),
    "attention": ("aten::_scaled_dot_product", "aten::scaled_dot_product", "aten::_flash_attention",
                  "aten::_efficient_attention", "aten::softmax", "aten::_softmax"),
    "memory": ("aten::copy_", "aten::index", "aten::index_put", "aten::_index_put", "aten::cat", "aten::gather",
               "aten::scatter", "aten::clone", "aten::contiguous", "aten::to", "aten::_to_copy", "aten::empty",
               "aten::zeros", "aten::new_zeros", "aten::fill_", "aten::zero_", "aten::masked_fill",
               "aten::where", "aten::repeat", "aten::expand", "aten::nonzero", "aten::item",
               "aten::_local_scalar_dense", "aten::resolve", "aten::select", "aten::slice", "aten::view",
               "aten::reshape", "aten::transpose", "aten::unsqueeze", "aten::squeeze", "aten::flatten",
               "aten::unflatten", "aten::permute", "aten::as_strided", "aten::t", "aten::embedding",
               "aten::arange", "aten::ones", "aten::full", "aten::empty_like", "aten::zeros_like"),
    "elementwise": ("aten::add", "aten::mul", "aten::sub", "aten::div", "aten::neg", "aten::pow", "aten::rsqrt",
                    "aten::mean", "aten::silu", "aten::sigmoid", "aten::gelu", "aten::tanh", "aten::exp",
                    "aten::cos", "aten::sin", "aten::sum", "aten::remainder", "aten::floor_divide", "aten::eq",
                    "aten::lt", "aten::le", "aten::gt", "aten::ge", "aten::ne", "aten::bitwise", "aten::__and__",
                    "aten::__or__", "aten::logical", "aten::max", "aten::min", "aten::argmax", "aten::clamp",
                    "aten::sqrt", "aten::layer_norm", "aten::native_layer_norm", "aten::rms_norm",
                    "aten::_fused_rms_norm", "aten::float", "aten::type_as"),
}


def group_of(name: str) -> str:
    for group, prefixes in GROUPS.items():
        if name.startswith(prefixes):
            return group
    return "other"


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
    for _ in range(3):
        decode_steps(model, ids, mask, args.steps, walls)
    step_s = statistics.median(walls)

    prof = profile(activities=[ProfilerActivity.CPU])
    profiled: list[float] = []
    decode_steps(model, ids, mask, args.steps, profiled, prof)
    self_us: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        self_us[group_of(event.key)] += event.self_cpu_time_total
    per_step = {group: us / 1e6 / args.steps for group, us in self_us.items()}
    profiled_step = sum(profiled) / len(profiled)  # the profiler's own overhead is in here, not in step_s
    per_step["python_and_dispatch"] = max(profiled_step - sum(per_step.values()), 0.0)
    kernels = per_step.get("matmul", 0.0) + per_step.get("attention", 0.0)
    report = {
        "benchmark": "profile_decode",
        "model": args.model,
        "setting": {"batch": args.batch, "prompt": args.prompt, "ragged": args.ragged, "steps": args.steps},
        "step_wall_s": step_s,
        "profiled_step_wall_s": profiled_step,
        "per_step_s": per_step,
        "shares": {group: seconds / profiled_step for group, seconds in per_step.items()},
        # the profiler's per-operator overhead lands outside the operators: the unprofiled step is the wall time
        "compile_bound": step_s / kernels if kernels else None,
        "load_average": {"before": load_before, "after": os.getloadavg()[0]},
        "threads": torch.get_num_threads(),
        "environment": environment.describe(threads=torch.get_num_threads()),
        "top_ops": [
            {"op": e.key, "group": group_of(e.key), "self_s_per_step": e.self_cpu_time_total / 1e6 / args.steps}
            for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:15]
        ],
    }
    print(f"decode step (median of {len(walls)}): {step_s * 1e3:.1f} ms; profiled {profiled_step * 1e3:.1f} ms "
          f"(load {load_before:.2f})")
    for group, share in sorted(report["shares"].items(), key=lambda kv: -kv[1]):
        print(f"  {group:20s} {share:6.1%}  {per_step[group] * 1e3:7.2f} ms")
    print(f"most a compiled step could gain (unprofiled wall / (matmul + attention)): {report['compile_bound']:.2f}x")
    if args.json:
        write_text_atomic(args.json, json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
