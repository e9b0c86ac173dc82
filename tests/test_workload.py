"""bt-bench --workload on tiny models: the stated request distribution, both ways of serving it, the record."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from block_transformer.bench.workload import (
    Request, Workload, continuous_manager, draw_requests, measure_workload, serve_continuous, summarise,
)
from block_transformer.cli import bench_cmd
from block_transformer.convert import LayerMapping
from block_transformer.convert.convert import convert_model
from conftest import VOCAB, tiny_source


def test_requests_follow_the_stated_distribution():
    workload = Workload(requests=400, prompt_len=64, new_tokens=40, seed=3)
    requests = draw_requests(workload, VOCAB)
    lengths = sorted(len(r.prompt) for r in requests)
    assert 8 <= lengths[0] and lengths[-1] <= 256
    assert 54 <= lengths[len(lengths) // 2] <= 74  # log-normal around the median
    assert {r.max_new_tokens for r in requests} <= set(range(5, 41)) and len({r.max_new_tokens for r in requests}) > 20
    assert all(r.arrival_s == 0 for r in requests) and len({r.request_id for r in requests}) == 400
    assert requests == draw_requests(workload, VOCAB)  # seeded: both models get the same requests
    assert [r.request_id for r in requests] != sorted((r.request_id for r in requests), key=lambda i: int(i[4:]))
    assert all(10 <= t < VOCAB for r in requests for t in r.prompt)

    poisson = draw_requests(Workload(requests=200, arrival_rate=50.0), VOCAB)
    arrivals = [r.arrival_s for r in poisson]
    assert arrivals[0] == 0 and arrivals == sorted(arrivals)
    assert 2.0 < arrivals[-1] < 6.0  # 199 gaps of mean 1/50 s


@pytest.fixture(scope="module")
def models():
    source = tiny_source("llama").eval()
    return source, convert_model(tiny_source("llama"), LayerMapping.partition(2, 2), 2, separator_id=0).eval()


@pytest.mark.parametrize("which", ["source", "block_transformer"])
@pytest.mark.parametrize("mode", ["continuous", "static"])
def test_every_request_gets_its_own_token_count_and_latencies(models, which, mode):
    model = models[which == "block_transformer"]
    workload = Workload(requests=7, rows=3, prompt_len=12, new_tokens=9)
    result = measure_workload(model, workload, mode, repeats=2)
    assert result["generated_tokens"] == sum(r.max_new_tokens for r in draw_requests(workload, VOCAB))
    assert result["requests_per_s"] > 0 and result["generated_tokens_per_s"] > result["requests_per_s"]
    ttft, itl = result["time_to_first_token_s"], result["inter_token_latency_s"]
    assert 0 < ttft["p50"] <= ttft["p95"] and 0 < itl["p50"] <= itl["p95"]
    assert len(result["makespans_s"]) == 2 and result["makespan_s"] in result["makespans_s"]


def _first_greedy_token(model, prompt: list[int]) -> int:
    return int(model(torch.tensor([prompt])).logits[0, -1].argmax())


@pytest.mark.parametrize("which", ["source", "block_transformer"])
@pytest.mark.parametrize("mode", ["continuous", "static"])
def test_eos_does_not_cut_a_request_short(models, which, mode):
    """The model's eos is the token greedy decoding emits first for the first request: every way of serving
    must still generate each request's full count (summarise raises otherwise)."""
    model = models[which == "block_transformer"]
    workload = Workload(requests=4, rows=2, prompt_len=10, new_tokens=6)
    first = draw_requests(workload, VOCAB)[0]
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = int(model(torch.tensor([first.prompt])).logits[0, -1].argmax())
    try:
        result = measure_workload(model, workload, mode, repeats=1)
    finally:
        model.generation_config.eos_token_id = saved
    assert result["generated_tokens"] == sum(r.max_new_tokens for r in draw_requests(workload, VOCAB))


def test_continuous_batching_serves_poisson_arrivals_after_they_arrive(models):
    _, bt = models
    workload = Workload(requests=5, rows=2, prompt_len=10, new_tokens=6, arrival_rate=20.0)
    requests = draw_requests(workload, VOCAB)
    manager = continuous_manager(bt, workload, requests)
    manager.start()
    try:
        served = serve_continuous(manager, requests)
    finally:
        manager.stop(block=True)
    assert all(served[r.request_id][1][0] > r.arrival_s for r in requests)
    assert summarise(requests, served)["time_to_first_token_s"]["p95"] < max(t[-1] for _, t in served.values())


def test_a_short_request_is_an_error_not_a_figure():
    requests = [Request("req_0", [11, 12], 3, 0.0)]
    with pytest.raises(RuntimeError, match="req_0 generated 2 tokens"):
        summarise(requests, {"req_0": ([5, 6], [0.1, 0.2])})


@pytest.mark.slow  # a worker process per variant
def test_bt_bench_workload_end_to_end(tmp_path):
    from block_transformer import export
    from conftest import save_source, tiny_tokenizer

    source = save_source(tmp_path / "src", "llama")
    bt = tmp_path / "bt"
    export.save_model_folder(convert_model(tiny_source("llama"), LayerMapping.partition(2, 2), 2, separator_id=0),
                             tiny_tokenizer(), bt)
    out = tmp_path / "workload.json"
    args = [str(bt), "--baseline", str(source), "--workload", "--requests", "6", "--batch-size", "3",
            "--prompt-len", "10", "--new-tokens", "6", "--repeats", "1", "--threads", "1", "--json", str(out)]
    result = CliRunner().invoke(bench_cmd, args)
    assert result.exit_code == 0, result.output
    record = json.loads(out.read_text())
    row = record["rows"][0]
    assert row["setting"]["name"] == "workload-r6-b3-p10-n6-offline"
    assert set(row["results"]) == {"block_transformer", "block_transformer_unaligned", "vanilla_continuous",
                                   "vanilla_static_batching"}
    assert row["results"]["block_transformer"]["align_blocks"] is True
    assert row["results"]["block_transformer_unaligned"]["align_blocks"] is False
    assert row["results"]["block_transformer_unaligned"]["steps_held"] == 0
    assert row["ratios"]["vs_best_source"]["source"] in {"vanilla_continuous", "vanilla_static_batching"}
    assert all(r["peak_rss_bytes"] > 10 * 2**20 for r in row["results"].values())
    assert "BT vs_best_source" in result.output and "TTFT p95" in result.output


def test_workload_takes_one_size_of_each(tmp_path):
    bt = tmp_path / "bt"
    bt.mkdir()
    result = CliRunner().invoke(bench_cmd, [str(bt), "--baseline", "x", "--workload", "--batch-size", "2",
                                            "--batch-size", "4", "--ragged"])
    assert result.exit_code == 2 and "drop --ragged, --batch-size (more than once)" in result.output


def test_workload_options_need_workload(tmp_path):
    bt = tmp_path / "bt"
    bt.mkdir()
    result = CliRunner().invoke(bench_cmd, [str(bt), "--baseline", "x", "--requests", "8"])
    assert result.exit_code == 2 and "add --workload" in result.output
