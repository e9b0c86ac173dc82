"""bt-bench on tiny models: real workers, real timings, a complete record (no speed claims here)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from block_transformer import export
from block_transformer.bench.settings import Setting
from block_transformer.bench.throughput import kv_cache_bytes, make_prompts
from block_transformer.cli import bench_cmd
from block_transformer.convert import LayerMapping
from block_transformer.convert.convert import convert_model
from conftest import save_source, tiny_source, tiny_tokenizer


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    source = save_source(root / "src", "llama")
    export.save_model_folder(convert_model(tiny_source("llama"), LayerMapping.partition(2, 2), 2, separator_id=0), tiny_tokenizer(),
                             root / "bt")
    return source, root / "bt"


@pytest.mark.slow  # a worker process per model and setting
def test_bt_bench_end_to_end(folders, tmp_path):
    source, bt = folders
    out = tmp_path / "bench.json"
    args = [str(bt), "--baseline", str(source), "--batch-size", "2", "--prompt-len", "8", "--new-tokens", "5",
            "--repeats", "1", "--threads", "1", "--ragged", "--json", str(out), "--update-card"]
    result = CliRunner().invoke(bench_cmd, args)
    assert result.exit_code == 0, result.output
    record = json.loads(out.read_text())
    assert [row["setting"]["name"] for row in record["rows"]] == ["b2-p8-n5", "b2-p8-n5-ragged"]
    for row in record["rows"]:
        batcher = {"block_transformer_batcher"} if row["setting"]["ragged"] else set()
        assert set(row["results"]) == {"block_transformer", "vanilla_dynamic", "vanilla_static"} | batcher
        for measured in row["results"].values():
            assert measured["whole_call_s"] > 0 and measured["time_to_first_token_s"] > 0
            assert measured["peak_rss_bytes"] > 10 * 2**20
        assert row["ratios"]["vs_vanilla_dynamic"]["whole_call_tokens_per_s"] > 0
        if batcher:
            assert row["ratios"]["batcher_vs_vanilla_static"]["decode_tokens_per_s"] > 0
            assert row["results"]["block_transformer_batcher"]["steps_held"] >= 0
    assert "BT vs_vanilla_static" in result.output
    assert record["environment"]["cpu_count"] >= 1 and record["environment"]["hardware"].startswith("CPU")
    card = (bt / "README.md").read_text()
    assert "Batch-generation throughput (bt-bench)" in card and "| b2-p8-n5-ragged | vanilla_static |" in card


def test_bad_model_folder(tmp_path):
    result = CliRunner().invoke(bench_cmd, [str(tmp_path), "--baseline", "x"])
    assert result.exit_code != 0 and "not a converted model folder" in result.output


@pytest.mark.parametrize("option", ["--batch-size", "--prompt-len", "--new-tokens", "--repeats"])
def test_zero_sizes_are_rejected_by_the_cli(folders, option):
    """Regression: --prompt-len 0 / --batch-size 0 / --new-tokens 0 were accepted."""
    source, bt = folders
    result = CliRunner().invoke(bench_cmd, [str(bt), "--baseline", str(source), option, "0"])
    assert result.exit_code == 2 and "0 is not in the range x>=1" in result.output


def test_a_missing_baseline_fails_before_any_benchmark(folders, tmp_path, monkeypatch):
    """Regression: bt-bench benchmarked the model first and only then found the baseline missing."""
    import block_transformer.bench.run as run

    monkeypatch.setattr(run, "_worker", lambda *a, **k: pytest.fail("a benchmark worker started"))
    _, bt = folders
    result = CliRunner().invoke(bench_cmd, [str(bt), "--baseline", str(tmp_path / "missing")])
    assert result.exit_code == 1 and "no such file or folder" in result.output


def test_kv_cache_bytes_are_block_level():
    source = tiny_source("llama")
    bt = convert_model(source, LayerMapping.partition(2, 2), 4, separator_id=0)
    setting = Setting(1, 1020, 4)
    # vanilla: 4 layers x 1024 positions; BT: 2 layers x (1 + 256) blocks + 2 layers x (2 + 3) local
    kv_heads, head_dim, fp32 = 2, 8, 4
    assert kv_cache_bytes(source, setting) == 2 * fp32 * 4 * kv_heads * head_dim * 1024
    assert kv_cache_bytes(bt, setting) == 2 * fp32 * kv_heads * head_dim * (2 * 257 + 2 * 5)


def test_ragged_prompts_are_left_padded_and_reproducible():
    ids, mask = make_prompts(Setting(16, 20, 1, ragged=True), 100, seed=3)
    again, _ = make_prompts(Setting(16, 20, 1, ragged=True), 100, seed=3)
    lengths = mask.sum(1)
    assert (ids == again).all() and lengths.min() >= 10 and lengths.max() <= 20 and len(set(lengths.tolist())) > 3
    assert (mask[:, -1] == 1).all()


@pytest.mark.slow  # a worker process per model
def test_comparison_measures_the_source_once_for_several_models(folders, tmp_path, monkeypatch):
    from block_transformer.bench import run

    source, bt = folders
    second = tmp_path / "bt-lb4"
    export.save_model_folder(convert_model(tiny_source("llama"), LayerMapping.partition(1, 3), 4, separator_id=0),
                             tiny_tokenizer(), second)
    started = []
    real_worker = run._worker
    monkeypatch.setattr(run, "_worker", lambda kind, spec, *a: started.append(spec) or real_worker(kind, spec, *a))
    record = run.run_comparison({"2/2 L_B 2": str(bt), "1/3 L_B 4": str(second)}, str(source),
                                [Setting(2, 8, 4)], repeats=1, threads=1)
    assert started == [str(source), str(bt), str(second)]
    (row,) = record["rows"]
    assert list(row["results"]) == ["source_dynamic", "2/2 L_B 2", "1/3 L_B 4"]
    for label in ("2/2 L_B 2", "1/3 L_B 4"):
        ratios, measured = row["ratios"][label], row["results"][label]
        assert ratios["whole_call_tokens_per_s"] == pytest.approx(
            measured["whole_call_tokens_per_s"] / row["results"]["source_dynamic"]["whole_call_tokens_per_s"])
        assert set(row["load_before"][label]) >= {"load_avg", "cpu_count"}
    # the two conversions differ in L_B: their block-level KV caches must too
    assert row["results"]["2/2 L_B 2"]["kv_cache_bytes_per_sequence"] != row["results"]["1/3 L_B 4"]["kv_cache_bytes_per_sequence"]


def test_comparison_needs_a_model(folders):
    from block_transformer.bench.run import run_comparison
    from block_transformer.errors import BlockTransformerError

    with pytest.raises(BlockTransformerError, match="at least one converted folder"):
        run_comparison({}, str(folders[0]), [Setting(1, 4, 2)])


@pytest.mark.slow  # a subprocess with real generation
def test_ragged_decode_benchmark_records_every_variant(folders, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    _, bt = folders
    out = tmp_path / "ragged.json"
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "ragged_decode.py"
    done = subprocess.run([sys.executable, str(script), str(bt), "--batch-size", "4", "--prompt-len", "9",
                           "--new-tokens", "6", "--repeats", "1", "--threads", "1", "--device", "cpu", "--json", str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(out.read_text())["results"]
    assert list(results) == ["generate_aligned", "generate_ragged", "batcher_ragged", "batcher_aligned"]
    assert results["generate_aligned"]["decode_vs_generate_aligned"] == 1.0
    assert all(r["whole_call_s"] > r["time_to_first_token_s"] > 0 for r in results.values())
    assert results["generate_ragged"]["steps_held"] == results["batcher_aligned"]["steps_held"] == 0
