"""benchmarks/tradeoff.py's stages: skipped when done by the same command, resumed when interrupted."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import tradeoff  # noqa: E402

# A stand-in for bt-uptrain: writes its arguments to the file named first.
WRITE_ARGS = "import sys, pathlib; pathlib.Path(sys.argv[1]).write_text(' '.join(sys.argv[2:]))"


def test_an_interrupted_uptraining_stage_resumes(tmp_path):
    """Regression: a stage whose run left checkpoints was started again without --resume, which bt-uptrain refuses
    (the docstring promised that an interrupted run resumes)."""
    done, checkpoints = tmp_path / "summary.json", tmp_path / "out.checkpoints"
    (checkpoints / "step-0000050").mkdir(parents=True)
    cmd = [sys.executable, "-c", WRITE_ARGS, str(done), "recipe.yaml"]
    tradeoff.stage(cmd, done, tmp_path / "uptrain.log", checkpoints)
    assert done.read_text() == "recipe.yaml --resume"
    assert (tmp_path / "uptrain.command").read_text() == " ".join(cmd)  # the same run: recorded without it
    tradeoff.stage(cmd, done, tmp_path / "uptrain.log", checkpoints)  # done by the same command: skipped


def test_a_fresh_stage_runs_without_resume(tmp_path):
    done = tmp_path / "summary.json"
    cmd = [sys.executable, "-c", WRITE_ARGS, str(done), "recipe.yaml"]
    tradeoff.stage(cmd, done, tmp_path / "uptrain.log", tmp_path / "none.checkpoints")
    assert done.read_text() == "recipe.yaml"
