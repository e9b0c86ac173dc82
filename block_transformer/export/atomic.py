"""Atomic writes: nothing appears at an output path until it is complete.

Files and folders are written beside their target under a hidden temporary name and renamed into
place, so a crash, a full disk or Ctrl-C never leaves half a file or half a model folder behind, and a
folder being replaced stays readable until the new one is complete.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from ..errors import BlockTransformerError

logger = logging.getLogger(__name__)


class ExportError(BlockTransformerError):
    """An output that may not be written, or a folder that is not a complete Block Transformer folder."""


def check_output(out: Path, overwrite: bool, inputs: Sequence[Path | str] = (), *,
                 elsewhere: str = "Pick another -o", replace: str = "pass --overwrite to replace it") -> None:
    """Fail before any work when the output exists and may not be replaced, or would replace an input.

    ``inputs`` are local paths the job reads (a source model, data): an output that is one of them or
    contains one would destroy it when renamed into place, with or without ``--overwrite``.
    ``elsewhere`` and ``replace`` tell the user how to pick another output or allow replacing it (a
    recipe has fields where a command has options).
    """
    other = elsewhere[0].lower() + elsewhere[1:]
    target = Path(out).expanduser().resolve()
    for source in inputs:
        path = Path(source).expanduser()
        if path.exists() and (path.resolve() == target or target in path.resolve().parents):
            raise ExportError(
                f"output {out} {'is' if path.resolve() == target else 'contains'} the input {source}: "
                f"writing it would destroy the input. {elsewhere}."
            )
    parent = next((p for p in target.parents if p.exists()), None)
    if parent is not None and not os.access(parent, os.W_OK | os.X_OK):
        raise ExportError(f"cannot write {out}: {parent} is not writable (read-only disk or permissions). {elsewhere}.")
    if out.exists() and not overwrite:
        raise ExportError(f"output {out} already exists: {replace}, or {other}.")
    if out.exists() and not out.is_dir():
        raise ExportError(f"output {out} exists and is not a folder: remove it or {other}.")


@contextmanager
def atomic_file(path: Path, mode: str = "w") -> Iterator[IO]:
    """Yield a temporary file beside ``path`` open in ``mode``; on success it replaces ``path``.

    A replaced file keeps its permissions; a new one gets the usual umask modes (not mkstemp's 0600).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    keep_mode = path.stat().st_mode & 0o777 if path.exists() else None
    f = tempfile.NamedTemporaryFile(mode, dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False)
    tmp = Path(f.name)
    try:
        with f:
            yield f
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.chmod(keep_mode if keep_mode is not None else 0o666 & ~_umask())
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically: readers see the old file or the new one, never half of it."""
    with atomic_file(path) as f:
        f.write(text)


@contextmanager
def atomic_folder(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; on success it replaces ``out``, on failure it is deleted.

    The temporary name carries the writer's pid: a folder left by a writer that was killed outright
    (SIGKILL, power loss) is removed by the next write to the same output. SIGTERM is handled like
    Ctrl-C while the folder is being written, so ``kill`` cleans up too.
    """
    out = Path(out)
    check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    try:
        with _sigterm_as_interrupt():
            yield tmp
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if _disk_full_or_read_only(err):
            free = shutil.disk_usage(out.parent).free
            raise ExportError(
                f"could not write {out}: {err.strerror if isinstance(err, OSError) else 'no space left on device'} "
                f"({free / 1e9:.1f} GB free on its disk). Free some space or pick another -o; nothing was written."
            ) from err
        raise
    _default_permissions(tmp)
    replace_folder(tmp, out)


def check_free_space(out: Path, needed_bytes: int) -> None:
    """Fail before writing when the output's disk cannot hold ``needed_bytes`` (plus 5%)."""
    parent = next(p for p in Path(out).expanduser().resolve().parents if p.exists())
    free = shutil.disk_usage(parent).free
    if free < needed_bytes * 1.05:
        raise ExportError(
            f"{out} needs about {needed_bytes / 1e9:.2f} GB but its disk has {free / 1e9:.2f} GB free: "
            "free some space or pick another -o."
        )


def _disk_full_or_read_only(err: BaseException) -> bool:
    """ENOSPC / EROFS as an OSError, or inside a library's own error (safetensors reports them as text)."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EROFS, errno.EDQUOT):
        return True
    text = str(err)
    markers = ("No space left on device", "Read-only file system", "code: 28", "code: 30", "os error 28")
    return any(marker in text for marker in markers)


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Delete temporary siblings of ``out`` whose writer process is gone; returns what was removed."""
    removed = []
    for candidate in out.parent.glob(f".{out.name}.tmp-*-*"):
        pid = candidate.name[len(f".{out.name}.tmp-") :].split("-", 1)[0]
        if candidate.is_dir() and pid.isdigit() and not process_alive(int(pid)):
            logger.warning("removing %s, left half-written by a process that no longer runs (pid %s)", candidate, pid)
            shutil.rmtree(candidate, ignore_errors=True)
            removed.append(candidate)
    return removed


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises KeyboardInterrupt (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"terminated by signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def replace_folder(complete: Path, out: Path) -> None:
    """Rename the finished folder ``complete`` to ``out``, replacing any folder there.

    The old folder is first renamed aside, so ``out`` is never missing while both exist on disk.
    For writers that cannot use :func:`atomic_folder` because several processes fill one folder whose
    name they all know (accelerate checkpoints).
    """
    if out.exists():
        old = out.with_name(f".{out.name}.old-{complete.name.rsplit('-', 1)[-1]}")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        complete.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        complete.rename(out)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _default_permissions(folder: Path) -> None:
    """mkdtemp and some writers create private files; the finished folder gets the usual umask modes."""
    umask = _umask()
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
