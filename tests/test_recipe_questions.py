"""benchmarks/recipe_questions.py: one run per variant, a failed one reported while the others go on, finished
runs skipped, figures read from each run's summary and metrics."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import recipe_questions  # noqa: E402

# A stand-in for bt-uptrain: fails for ce+hidden, else writes what a finished run leaves, and counts its runs.
FAKE_RUN = """
import json, pathlib, sys
out, variant = pathlib.Path(sys.argv[1]), sys.argv[2]
if variant == "ce+hidden":
    sys.exit("Error: the teacher ran out of memory")
out.mkdir(parents=True)
if variant == "ce+kl":  # finished, but its metrics are missing: reading its figures fails
    (out / "uptraining_summary.json").write_text("{}")
    sys.exit(0)
(out.parent / "runs").open("a").write(variant + "\\n")
ppl = {"baseline": 40.0, "new-lr-x1": 30.0}.get(variant, 35.0)
sets = {"held-out": {"step0_ppl": 3000.0, "final_ppl": ppl, "source_ppl": 15.0, "step0_ratio": 200.0,
                     "final_ratio": ppl / 15.0}}
(out / "uptraining_summary.json").write_text(json.dumps({
    "method": "CE", "tokens": 1024, "steps": 2, "primary_eval_set": None, "eval_sets": sets,
    "environment": {"device": "cpu", "hardware": "CPU"}}))
(out / "uptraining_metrics.jsonl").write_text("\\n".join(json.dumps(r) for r in [
    {"step": 0, "tokens": 0, "sets": {"held-out": {"ppl": 3000.0}}},
    {"step": 1, "tokens": 512, "tokens_per_s": 90.0}, {"step": 2, "tokens": 1024, "tokens_per_s": 110.0},
    {"step": 2, "tokens": 1024, "sets": {"held-out": {"ppl": ppl}}}]))
"""


def sweep(tmp_path, monkeypatch, variants: str) -> dict:
    monkeypatch.setattr(recipe_questions, "command",
                        lambda recipe, variant, out, common: [sys.executable, "-c", FAKE_RUN, str(out), variant])
    out = tmp_path / "rq.json"
    monkeypatch.setattr(sys, "argv", ["recipe_questions.py", "recipes/tiny.yaml", "--variants", variants,
                                      "--workdir", str(tmp_path / "runs"), "--json", str(out)])
    try:
        recipe_questions.main()
    except SystemExit as stop:
        assert stop.code.startswith("failed: ")
    return json.loads(out.read_text())


def test_a_failed_variant_is_reported_and_the_others_run(tmp_path, monkeypatch):
    record = sweep(tmp_path, monkeypatch, "baseline,ce+hidden,ce+kl,new-lr-x1")
    assert record["failed"] == ["ce+hidden", "ce+kl"]  # a run that failed, a run whose figures cannot be read
    baseline, lr = record["runs"]
    assert (baseline["variant"], lr["variant"]) == ("baseline", "new-lr-x1")
    assert lr["overrides"] == ["train.new_modules_lr_multiplier=1"]
    assert lr["sets"]["held-out"]["final_ppl"] == 30.0
    assert lr["curve"] == [{"tokens": 0, "held-out": 3000.0}, {"tokens": 1024, "held-out": 30.0}]
    assert lr["train_tokens_per_s_median"] == 100.0 and lr["wall_s"] > 0
    assert "(2.0×)" in recipe_questions.markdown(record)  # 30 / 15 in the new-lr-x1 row
    assert "ran out of memory" in (tmp_path / "runs" / "tiny" / "ce+hidden.log").read_text()  # the log is kept


def test_finished_runs_are_skipped(tmp_path, monkeypatch):
    sweep(tmp_path, monkeypatch, "baseline")
    record = sweep(tmp_path, monkeypatch, "baseline,new-lr-x1")
    assert (tmp_path / "runs" / "tiny" / "runs").read_text().split() == ["baseline", "new-lr-x1"]
    assert record["runs"][0]["wall_s"] is None  # read back, not run


def test_running_more_variants_adds_to_the_record(tmp_path, monkeypatch):
    sweep(tmp_path, monkeypatch, "baseline")
    record = sweep(tmp_path, monkeypatch, "new-lr-x1")
    assert [run["variant"] for run in record["runs"]] == ["baseline", "new-lr-x1"]


def test_a_variant_named_with_a_dot_keeps_its_whole_name_in_its_log(tmp_path, monkeypatch):
    sweep(tmp_path, monkeypatch, "lr-1.5e-4")
    assert (tmp_path / "runs" / "tiny" / "lr-1.5e-4.log").is_file()
    assert (tmp_path / "runs" / "tiny" / "lr-1.5e-4.command").is_file()


def test_unknown_variants_are_refused(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["recipe_questions.py", "recipes/tiny.yaml", "--variants", "baseline,fast"])
    with pytest.raises(SystemExit):
        recipe_questions.parse_args()
