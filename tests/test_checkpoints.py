"""Runs and their checkpoints: one run per folder (a lock), verified checkpoints, and resuming a finished run."""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from block_transformer.uptrain import checkpoint, loop, preflight
from block_transformer.uptrain.command import uptrain_cmd
from block_transformer.uptrain.loop import uptrain
from block_transformer.uptrain.recipe import RecipeError
from conftest import TINY_RECIPE, assert_one_line_error, tiny_recipe

TESTS = Path(__file__).resolve().parent
QUICK = {"eval.every": 0, "eval.source_reference": False}


def cli(tmp_path: Path, *args: str, **overrides) -> list[str]:
    """bt-uptrain arguments: the tiny recipe pointed at the files :func:`tiny_recipe` made under ``tmp_path``."""
    sets = {"model.source": tmp_path / "src-llama", "data.train": tmp_path / "corpus", "output.dir": tmp_path / "out",
            **overrides}
    return [str(TINY_RECIPE), *(f"--set={k}={v}" for k, v in sets.items()), *args]


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def crash_after_checkpoint(monkeypatch, at_step: int) -> None:
    """The run is killed right after checkpoint ``at_step`` is written (the caller undoes it)."""
    real = checkpoint.save

    def save_then_crash(accelerator, root, step, state, keep_last):
        path = real(accelerator, root, step, state, keep_last)
        if step == at_step:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(checkpoint, "save", save_then_crash)


# ----------------------------------------------------------------------------------------------------
# One run per checkpoint folder (issue 13, item 2)
# ----------------------------------------------------------------------------------------------------


def test_a_second_run_into_the_same_folders_fails_at_once_naming_the_holder(tmp_path, monkeypatch):
    """Regression: two runs into one output trained together, wiping each other's metrics and checkpoints."""
    settings = {"train.max_steps": 2, "checkpoint.every": 0, **QUICK}
    tiny_recipe(tmp_path)  # the source and corpus both runs read
    holder_script = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from block_transformer.uptrain import loop
        from conftest import tiny_recipe

        real = loop.train_step

        def slow_step(run, batch):
            result = real(run, batch)
            print("training", flush=True)
            time.sleep(120)
            return result

        loop.train_step = slow_step
        loop.uptrain(tiny_recipe(Path(sys.argv[1]), **{settings!r}))
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    with (tmp_path / "holder.log").open("w") as log:
        holder = subprocess.Popen([sys.executable, "-c", holder_script, str(tmp_path)], env=env,
                                  stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        assert holder.stdout.readline().strip() == "training", (tmp_path / "holder.log").read_text()[-3000:]
        checked = []
        monkeypatch.setattr(loop, "check_before_work", lambda *a: checked.append(a) or pytest.fail("ran on"))
        result = CliRunner().invoke(uptrain_cmd, cli(tmp_path, **settings))
        assert_one_line_error(result, "in use by another bt-uptrain run", f"pid {holder.pid} ", "output.dir")
        assert not checked, "it failed before any check or model work"
        assert holder.poll() is None, "the first run goes on"
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_is_exclusive_and_released(tmp_path):
    root = tmp_path / "ckpt"
    with checkpoint.run_lock(root):
        record = json.loads((root / checkpoint.LOCK_FILE).read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        with pytest.raises(checkpoint.RunLockedError, match=f"in use by another bt-uptrain run \\(pid {os.getpid()} on "):
            with checkpoint.run_lock(root):
                pass
    assert not root.exists(), "a folder the lock made and nothing else used is removed"
    root.mkdir()
    with checkpoint.run_lock(root):
        pass
    assert root.is_dir() and not (root / checkpoint.LOCK_FILE).exists()


def test_a_stale_lock_of_a_dead_run_is_reported_and_taken_over(tmp_path, caplog):
    recipe = tiny_recipe(tmp_path, **{"train.max_steps": 2, "checkpoint.every": 0, **QUICK})
    pid = dead_pid()
    recipe.checkpoint_dir.mkdir(parents=True)
    (recipe.checkpoint_dir / checkpoint.LOCK_FILE).write_text(
        json.dumps({"pid": pid, "host": socket.gethostname(), "started": "2026-01-01T00:00:00+00:00"}))
    with caplog.at_level(logging.WARNING):
        uptrain(recipe)
    stale = [r.getMessage() for r in caplog.records if "stale lock" in r.getMessage()]
    assert len(stale) == 1 and f"pid {pid} " in stale[0] and "no longer running" in stale[0], caplog.text
    assert not (recipe.checkpoint_dir / checkpoint.LOCK_FILE).exists()


@pytest.mark.parametrize("host, fragment", [(socket.gethostname(), "still running but holds no lock"),
                                            ("elsewhere.example", "on another machine")])
def test_a_lock_file_that_cannot_be_proven_stale_is_refused(tmp_path, host, fragment):
    root = tmp_path / "ckpt"
    root.mkdir()
    lock = root / checkpoint.LOCK_FILE
    lock.write_text(json.dumps({"pid": os.getppid(), "host": host, "started": "2026-01-01T00:00:00+00:00"}))
    with pytest.raises(checkpoint.RunLockedError, match=fragment) as err:
        with checkpoint.run_lock(root):
            pass
    assert f"delete {lock}" in str(err.value)
    assert json.loads(lock.read_text())["pid"] == os.getppid(), "the lock file is left as it was"


# ----------------------------------------------------------------------------------------------------
# Verified checkpoints (issue 13, item 3)
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("damaged", ["model.safetensors", "optimizer.bin", checkpoint.STATE_FILE])
def test_a_corrupt_newest_checkpoint_is_skipped_before_any_model_work(tmp_path, monkeypatch, caplog, damaged):
    """Regression: a truncated newest checkpoint gave a traceback after conversion; the intact one was not used."""
    recipe = tiny_recipe(tmp_path, **{"train.max_steps": 6, "checkpoint.every": 2, "checkpoint.keep_last": 3, **QUICK})
    with monkeypatch.context() as patched, pytest.raises(KeyboardInterrupt):
        crash_after_checkpoint(patched, at_step=4)
        uptrain(recipe)
    newest = recipe.checkpoint_dir / "step-0000004"
    file = newest / damaged
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])

    with caplog.at_level(logging.WARNING):
        blueprint = preflight.check_before_work(recipe, "")  # configs and tokenizer only: no weights
    assert blueprint.resume_path == recipe.checkpoint_dir / "step-0000002"
    warning = next(r.getMessage() for r in caplog.records if "skipped" in r.getMessage())
    assert "step-0000002" in warning and f"skipped step-0000004 ({damaged} is" in warning, warning

    caplog.clear()
    with caplog.at_level(logging.INFO):
        uptrain(recipe, resume="")
    assert any("resumed from" in r.getMessage() and "step-0000002 at step 2" in r.getMessage() for r in caplog.records)
    assert (Path(recipe.output.dir) / "model.safetensors").is_file()
    assert checkpoint.problem(recipe.checkpoint_dir / "step-0000004") is None, "rewritten by the resumed run"


def test_checkpoint_verification_names_what_is_wrong(tmp_path, monkeypatch):
    recipe = tiny_recipe(tmp_path, **{"train.max_steps": 4, "checkpoint.every": 1, **QUICK})
    with monkeypatch.context() as patched, pytest.raises(KeyboardInterrupt):
        crash_after_checkpoint(patched, at_step=2)
        uptrain(recipe)
    first, last = checkpoint.checkpoints(recipe.checkpoint_dir)
    assert checkpoint.problem(first) is None and checkpoint.problem(last) is None
    manifest = json.loads((last / checkpoint.MANIFEST_FILE).read_text())["files"]
    assert {"model.safetensors", "optimizer.bin", checkpoint.STATE_FILE} <= set(manifest)

    weights = last / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, different content
    weights.write_bytes(bytes(data))
    assert "no longer matches the sha256" in checkpoint.problem(last)
    with pytest.raises(RecipeError, match="step-0000002 cannot be resumed: model.safetensors no longer matches"):
        checkpoint.resolve(last, recipe.checkpoint_dir)  # named explicitly: an error, not a fallback
    (first / "optimizer.bin").unlink()
    assert checkpoint.problem(first) == "optimizer.bin is missing"
    with pytest.raises(RecipeError, match="no intact checkpoint to resume from .*step-0000002 .*step-0000001 "):
        checkpoint.resolve("", recipe.checkpoint_dir)
    (first / checkpoint.MANIFEST_FILE).unlink()
    assert "no manifest.json" in checkpoint.problem(first)


# ----------------------------------------------------------------------------------------------------
# Resuming a finished run (issue 13, item 5)
# ----------------------------------------------------------------------------------------------------


def test_resuming_a_finished_run_stops_at_start_up_in_recipe_terms(tmp_path, monkeypatch):
    """Regression: it retrained from the last intermediate checkpoint, then failed naming -o/--overwrite."""
    settings = {"train.max_steps": 4, "checkpoint.every": 3, **QUICK}
    recipe = tiny_recipe(tmp_path, **settings)
    uptrain(recipe)
    assert checkpoint.checkpoints(recipe.checkpoint_dir)[-1].name == "step-0000004", "the last step is checkpointed"

    with monkeypatch.context() as patched:
        patched.setattr(loop, "load_model", lambda *a: pytest.fail("loaded a model"))
        result = CliRunner().invoke(uptrain_cmd, cli(tmp_path, "--resume", **settings))
    assert_one_line_error(result, f"output {recipe.output.dir} already exists", "--set output.overwrite=true",
                          "--set output.dir=")
    assert not re.search(r"\s(-o|--overwrite)\b", result.output), result.output

    monkeypatch.setattr(loop, "train_step", lambda *a: pytest.fail("trained again"))
    before = (recipe.checkpoint_dir / loop.METRICS_FILE).read_text()
    result = CliRunner().invoke(uptrain_cmd, cli(tmp_path, "--resume", **settings, **{"output.overwrite": "true"}))
    assert result.exit_code == 0, result.output
    assert (recipe.checkpoint_dir / loop.METRICS_FILE).read_text() == before
    assert json.loads((Path(recipe.output.dir) / loop.SUMMARY_FILE).read_text())["steps"] == 4


def test_the_last_step_is_checkpointed_without_intermediate_checkpoints(tmp_path):
    recipe = tiny_recipe(tmp_path, **{"train.max_steps": 3, "checkpoint.every": 0, **QUICK})
    uptrain(recipe)
    assert [p.name for p in checkpoint.checkpoints(recipe.checkpoint_dir)] == ["step-0000003"]


def test_the_resume_warning_names_only_the_fields_that_change_the_result(tmp_path, caplog):
    settings = {"train.max_steps": 2, "checkpoint.every": 0, **QUICK}
    recipe = tiny_recipe(tmp_path, **settings)
    uptrain(recipe)

    harmless = {"output.dir": tmp_path / "elsewhere", "output.dtype": "bfloat16", "train.log_every": 5,
                "eval.every": 1, "checkpoint.keep_last": 1, "checkpoint.dir": recipe.checkpoint_dir}
    with caplog.at_level(logging.WARNING):
        uptrain(tiny_recipe(tmp_path, **{**settings, **harmless}), resume="")
    assert not [r for r in caplog.records if "recipe differs" in r.getMessage()], caplog.text

    changed = tiny_recipe(tmp_path, **{**settings, "train.lr": 1e-3, "data.seq_len": 64, "output.overwrite": True})
    with caplog.at_level(logging.WARNING):
        uptrain(changed, resume="")
    warning = next(r.getMessage() for r in caplog.records if "recipe differs" in r.getMessage())
    assert "train.lr: 0.003 -> 0.001" in warning and "data.seq_len: 32 -> 64" in warning
    assert "output." not in warning and "log_every" not in warning

    assert loop.recipe_changes(recipe.to_yaml(), recipe) == []
    assert loop.recipe_changes("", recipe) == []
