"""bt-eval and the data spec: same tokens and scoring as measure.score, clear failures, cards updated in place."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import assert_one_line_error, save_source, tiny_source, tiny_tokenizer

from block_transformer import export, hub
from block_transformer.cli import eval_cmd
from block_transformer.convert import LayerMapping
from block_transformer.convert.convert import convert_model
from block_transformer.data_spec import DataError, DataSpec
from block_transformer.measure import heldout_split, score, tokenize_corpus

BLOCK_LEN = 3
SEQ_LEN = 16
TEXT = "The quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs. "


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny llama source folder and its Block Transformer conversion, saved once."""
    root = tmp_path_factory.mktemp("eval")
    source = save_source(root / "source", "llama")
    model = convert_model(tiny_source("llama"), LayerMapping.partition(2, 2), BLOCK_LEN, separator_id=0,
                          source_info={"source": str(source), "source_kind": "folder"})
    bt = export.save_model_folder(model, tiny_tokenizer(), root / "bt")
    return source, bt


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    (root / "b").mkdir()
    (root / "a.txt").write_text(TEXT * 3)
    (root / "b" / "c.txt").write_text(TEXT[::-1] * 2)
    (root / "d.jsonl").write_text("".join(json.dumps({"text": TEXT[i:] * 2, "id": i}) + "\n" for i in range(3)))
    return root


def run_eval(*args):
    return CliRunner().invoke(eval_cmd, [str(a) for a in args])


def expected_ids(corpus_root: Path, tail: int) -> torch.Tensor:
    """What bt-eval should score: the held-out tail of the sorted, separator-joined corpus."""
    docs = dict(DataSpec.parse(str(corpus_root)).documents())
    return heldout_split(tokenize_corpus(tiny_tokenizer(), docs, 0).ids, tail)[1]


# -- data spec ----------------------------------------------------------------------------------------


def test_local_specs_read_files_folders_and_globs_in_sorted_order(corpus):
    folder = DataSpec.parse(str(corpus))
    assert folder.kind == "local" and len(folder.files) == 3
    names = [name for name, _ in folder.documents()]
    assert names == ["a.txt", "b/c.txt", "d.jsonl:1", "d.jsonl:2", "d.jsonl:3"]
    glob = DataSpec.parse(str(corpus / "**" / "*.txt"))
    assert [name for name, _ in glob.documents()] == ["a.txt", "b/c.txt"]
    single = DataSpec.parse(str(corpus / "d.jsonl"))
    assert [text for _, text in single.documents()] == [TEXT[i:] * 2 for i in range(3)]


def test_parquet_rows_are_documents(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["one", "", "three"]}), tmp_path / "x.parquet")
    spec = DataSpec.parse(str(tmp_path / "x.parquet"), text_field="body")
    assert list(spec.documents()) == [("x.parquet:0", "one"), ("x.parquet:2", "three")]
    with pytest.raises(DataError, match="no 'text' column"):
        list(DataSpec.parse(str(tmp_path / "x.parquet")).documents())


def test_hub_specs_parse_name_config_split():
    spec = DataSpec.parse("wikitext:wikitext-2-raw-v1:test")
    assert (spec.kind, spec.name, spec.config, spec.split) == ("hub", "wikitext", "wikitext-2-raw-v1", "test")
    spec = DataSpec.parse("HuggingFaceFW/fineweb-edu")
    assert (spec.name, spec.config, spec.split) == ("HuggingFaceFW/fineweb-edu", None, "train")


@pytest.mark.parametrize(
    ("make", "spec", "fragment"),
    [
        (None, "./no/such/corpus", "no such file or folder"),
        (None, "a::b", "name[:config][:split]"),
        (lambda d: (d / "x.md").write_text("hi"), "{d}/x.md", "unsupported type"),
        (lambda d: (d / "x.jsonl").write_text('{"body": "hi"}\n'), "{d}/x.jsonl", "x.jsonl:1 is not a JSON object"),
        (None, "{d}/*.txt", "matches no"),
    ],
)
def test_bad_local_specs(tmp_path, make, spec, fragment):
    if make:
        make(tmp_path)
    with pytest.raises(DataError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        list(DataSpec.parse(spec.format(d=tmp_path)).documents())


def test_hub_dataset_is_streamed_until_enough_tokens(folders, monkeypatch):
    """The hub path, offline: datasets.load_dataset is replaced by a local streaming dataset."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(hub, "probe_hub", lambda why: None)
    rows = [{"text": f"{i} {TEXT}"} for i in range(50)]
    calls = []

    def fake_load_dataset(name, config, split, streaming):
        calls.append((name, config, split, streaming))
        return datasets.Dataset.from_list(rows).to_iterable_dataset()

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    _, bt = folders
    result = run_eval(bt, "--data", "someorg/corpus:cfg:test", "--seq-len", SEQ_LEN, "--max-tokens", 200,
                      "--json", bt.parent / "hub.json")
    assert result.exit_code == 0, result.output
    assert calls == [("someorg/corpus", "cfg", "test", True)]
    report = json.loads((bt.parent / "hub.json").read_text())
    assert report["data"]["kind"] == "hub" and report["model"]["num_windows"] == 200 // SEQ_LEN
    assert report["data"]["num_documents"] < len(rows), "streamed everything instead of stopping early"
    ids = tokenize_corpus(tiny_tokenizer(), {str(i): r["text"] for i, r in enumerate(rows)}, 0).ids
    expected = score(convert_bt(bt), ids, SEQ_LEN, max_tokens=200)
    assert report["model"]["nll_sum"] == pytest.approx(expected.nll_sum, rel=1e-5)


def convert_bt(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder)


def test_hub_dataset_offline_is_a_clear_error(folders):
    _, bt = folders  # conftest sets HF_HUB_OFFLINE=1
    assert_one_line_error(run_eval(bt, "--data", "wikitext:wikitext-2-raw-v1:test"), "HF_HUB_OFFLINE", "local file")


@pytest.mark.slow
def test_hub_dataset_unreachable_fails_fast(folders, tmp_path):
    _, bt = folders
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9",
           "HF_HOME": str(tmp_path / "hf")}
    started = time.perf_counter()
    result = subprocess.run([str(Path(sys.executable).parent / "bt-eval"), str(bt), "--data", "wikitext:raw:test"],
                            env=env, capture_output=True, text=True, timeout=60)
    seconds = time.perf_counter() - started
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and "cannot reach the Hugging Face hub" in errors[0], result.stderr[-2000:]
    assert "local file" in errors[0]
    assert seconds < 20, f"took {seconds:.1f} s"


# -- bt-eval --------------------------------------------------------------------------------------------


def test_bt_eval_with_baseline_scores_the_same_heldout_tokens(folders, corpus, tmp_path):
    source, bt = folders
    out = tmp_path / "eval.json"
    result = run_eval(bt, "--baseline", source, "--data", corpus, "--seq-len", SEQ_LEN, "--heldout-tokens", 100,
                      "--batch-size", 3, "--json", out)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    ids = expected_ids(corpus, 100)
    model, baseline = report["model"], report["baseline"]
    want_bt = score(convert_bt(bt), ids, SEQ_LEN)
    want_src = score(tiny_source("llama"), ids, SEQ_LEN, block_len=BLOCK_LEN)
    assert model["num_tokens"] == baseline["num_tokens"] == (100 // SEQ_LEN) * (SEQ_LEN - 1)
    assert model["loss"] == pytest.approx(want_bt.loss, rel=1e-5)
    assert baseline["loss"] == pytest.approx(want_src.loss, rel=1e-5)
    assert model["first_token_loss"] == pytest.approx(want_bt.first_token_loss, rel=1e-5)
    assert baseline["first_token_loss"] is None and baseline["block_len"] == BLOCK_LEN
    assert report["ppl_ratio"] == pytest.approx(model["perplexity"] / baseline["perplexity"])
    total = report["data"]["total_tokens"]
    assert report["data"]["scored_token_range"] == [total - 100, total - 100 + (100 // SEQ_LEN) * SEQ_LEN]
    assert "held-out tail: the last 100" in report["data"]["region"]
    assert report["environment"]["hardware"].startswith("CPU") and report["settings"]["device"] == "cpu"
    for fragment in ("perplexity", "first-token loss", "reported apart", "ratio", f"{model['num_tokens']:,} scored"):
        assert fragment in result.output


def test_default_tail_and_whole_data(folders, corpus, tmp_path):
    """Default: the 65,536-token tail, which is all of a small corpus; --heldout-tokens 0 scores from the start."""
    _, bt = folders
    result = run_eval(bt, "--data", corpus, "--seq-len", SEQ_LEN, "--max-tokens", 64, "--json", tmp_path / "a.json")
    assert result.exit_code == 0, result.output
    default = json.loads((tmp_path / "a.json").read_text())
    assert default["data"]["scored_token_range"] == [0, 64] and default["baseline"] is None
    result = run_eval(bt, "--data", corpus, "--seq-len", SEQ_LEN, "--max-tokens", 64, "--heldout-tokens", 0,
                      "--json", tmp_path / "b.json")
    assert result.exit_code == 0, result.output
    whole = json.loads((tmp_path / "b.json").read_text())
    assert whole["model"]["nll_sum"] == pytest.approx(default["model"]["nll_sum"], rel=1e-9)
    assert math.isfinite(whole["model"]["perplexity"])


def test_update_card_adds_and_refreshes_rows(folders, corpus, tmp_path):
    source, bt = folders
    card = bt / "README.md"
    before = card.read_text()
    assert "No figures measured yet" in before
    args = ["--data", corpus, "--seq-len", SEQ_LEN, "--max-tokens", 48, "--update-card"]
    for extra in ([], [], ["--baseline", source]):
        result = run_eval(bt, *args, *extra)
        assert result.exit_code == 0, result.output
    text = card.read_text()
    rows = [line for line in text.splitlines() if line.startswith(f"| {corpus.name} (")]
    assert len(rows) == 2, text  # the repeated run replaced its row; the baseline run added one
    assert rows[1].split(" | ")[3] == "source" and rows[1].split(" | ")[6].endswith("x")
    assert "CPU" in rows[0] and "No figures measured yet" not in text
    assert text.index("Measured results") < text.index("| data | seq len") < text.index("## Usage")
    assert export.card_metadata(text)["library_name"] == "transformers"
    assert not [p for p in bt.iterdir() if p.name.startswith(".")], "temporary files left behind"


def test_update_card_on_a_card_without_the_section(folders, corpus, tmp_path):
    _, bt = folders
    copy = tmp_path / "old"
    copy.mkdir()
    for path in bt.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    (copy / "README.md").write_text("---\nlibrary_name: transformers\n---\n\n# old\n\n## Usage\n\nload it\n")
    result = run_eval(copy, "--data", corpus, "--seq-len", SEQ_LEN, "--max-tokens", 48, "--update-card")
    assert result.exit_code == 0, result.output
    text = (copy / "README.md").read_text()
    assert text.index("# old") < text.index("## Measured results") < text.index("| data |") < text.index("## Usage")


def test_different_tokenizers_are_refused(folders, corpus, tmp_path):
    _, bt = folders
    other = save_source(tmp_path / "other", "gpt2")
    vocab = json.loads((other / "tokenizer.json").read_text())
    vocab["model"]["vocab"] = {k: (v + 1) % len(vocab["model"]["vocab"]) for k, v in vocab["model"]["vocab"].items()}
    (other / "tokenizer.json").write_text(json.dumps(vocab))
    result = run_eval(bt, "--baseline", other, "--data", corpus, "--seq-len", SEQ_LEN, "--max-tokens", 48)
    assert_one_line_error(result, "tokenize text differently", "its own source")


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--seq-len", 1000], "longer than"),
        (["--seq-len", 1], "at least 2"),
        (["--max-tokens", 8], "does not fill one window"),
        (["--heldout-tokens", -1], ">= 0"),
        (["--baseline", "./nope"], "no such file or folder"),
    ],
)
def test_bad_arguments(folders, corpus, args, fragment):
    _, bt = folders
    assert_one_line_error(run_eval(bt, "--data", corpus, "--seq-len", SEQ_LEN, *args), fragment)


def test_update_card_needs_a_local_folder(corpus, tmp_path):
    gguf = tmp_path / "model.gguf"
    assert_one_line_error(run_eval(gguf, "--data", corpus, "--update-card"), "--update-card needs MODEL")
