"""The atomic-write helpers every writer shares, and the card tables' one owner."""

from __future__ import annotations

import os
import stat

import pytest

from block_transformer import export


def test_write_text_atomic_replaces_whole_and_keeps_the_mode(tmp_path):
    path = tmp_path / "sub" / "report.json"
    export.write_text_atomic(path, "first")
    umask = os.umask(0)
    os.umask(umask)
    assert path.read_text() == "first" and stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    path.chmod(0o600)
    export.write_text_atomic(path, "second")
    assert path.read_text() == "second" and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in path.parent.iterdir()) == ["report.json"]


def test_a_failed_atomic_file_leaves_the_old_one(tmp_path):
    path = tmp_path / "data.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError), export.atomic_file(path, "wb") as f:
        f.write(b"half")
        raise RuntimeError("interrupted")
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["data.bin"]


def test_atomic_folder_and_replace_folder(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), export.atomic_folder(out) as tmp:
        (tmp / "a").write_text("a")
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    with export.atomic_folder(out) as tmp:
        (tmp / "a").write_text("a")
    with pytest.raises(export.ExportError, match="--overwrite"):
        with export.atomic_folder(out):
            pass
    complete = tmp_path / ".out.tmp"
    complete.mkdir()
    (complete / "b").write_text("b")
    export.replace_folder(complete, out)
    assert sorted(p.name for p in out.iterdir()) == ["b"] and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_card_tables_replace_the_row_of_the_same_key(tmp_path):
    (tmp_path / export.CARD).write_text("---\nlibrary_name: transformers\n---\n\n# m\n\n## Usage\n\nload it\n")
    summary = {"recipe": "r.yaml", "method": "CE x1", "tokens": 1000, "step0_ppl": 50.0, "final_ppl": 9.0,
               "source_ppl": None, "environment": {"hardware": "cpu"}}
    export.add_uptrain_row(tmp_path, summary)
    export.add_uptrain_row(tmp_path, {**summary, "final_ppl": 8.0})
    export.add_uptrain_row(tmp_path, {**summary, "recipe": "other.yaml"})
    text = (tmp_path / export.CARD).read_text()
    assert text.count("### " + export.UPTRAIN_TABLE.title) == 1 and "## Measured results" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "recipe" not in line]
    assert rows == ["| r.yaml | CE x1 | 1,000 | 50 | 8 | - | cpu |", "| other.yaml | CE x1 | 1,000 | 50 | 9 | - | cpu |"]
    assert text.index("## Measured results") < text.index("## Usage")


def test_sigterm_while_a_folder_is_written_leaves_nothing(tmp_path):
    """Regression: SIGTERM during bt-convert's save left a hidden full-size temporary folder forever."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        f"""
        import os, signal
        from block_transformer import export
        with export.atomic_folder({str(tmp_path / 'out')!r}) as tmp:
            (tmp / "weights.bin").write_bytes(b"x" * 1000)
            os.kill(os.getpid(), signal.SIGTERM)
            raise SystemExit("SIGTERM was ignored")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "SIGTERM was ignored" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_killed_writers_temporary_folder_is_removed_by_the_next_write(tmp_path, caplog):
    """Regression: SIGKILL left `.OUT.tmp-*` behind; its pid names a process that no longer runs."""
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".out.tmp-{int(dead.stdout)}-abc123"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    alive = tmp_path / f".out.tmp-{os.getpid()}-def456"  # a live writer's folder is left alone
    alive.mkdir()
    with export.atomic_folder(tmp_path / "out") as tmp:
        (tmp / "config.json").write_text("{}")
    assert not stale.exists() and alive.exists()
    assert "no longer runs" in caplog.text
    assert (tmp_path / "out" / "config.json").is_file()


def _tiny_model():
    from block_transformer.convert import LayerMapping
    from block_transformer.convert.convert import convert_model
    from conftest import tiny_source

    return convert_model(tiny_source("gpt2"), LayerMapping.partition(2, 2), 3, separator_id=0)


@pytest.mark.parametrize(
    "error",
    [OSError(28, "No space left on device"), RuntimeError("Error while serializing: IoError(Os { code: 28 })")],
)
def test_a_full_disk_is_one_error_naming_the_folder_and_nothing_is_left(tmp_path, error):
    """Regression: ENOSPC surfaced as an OSError / SafetensorError traceback."""

    class FullDisk:
        def save_pretrained(self, path):
            raise error

    with pytest.raises(export.ExportError, match=r"could not write .*out: .*GB free"):
        export.save_model_folder(_tiny_model(), FullDisk(), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_not_enough_free_space_is_refused_before_writing(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(export.ExportError, match="needs about .* GB but its disk has 0.00 GB free"):
        export.save_model_folder(_tiny_model(), None, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_a_read_only_parent_is_refused_before_any_work(tmp_path, monkeypatch):
    """Regression: a read-only output disk failed only after the whole conversion (root ignores modes: fake it)."""
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if str(path) == str(tmp_path) else real_access(path, mode))
    with pytest.raises(export.ExportError, match="is not writable"):
        export.check_output(tmp_path / "out", overwrite=False)
