"""Checkpoints: accelerate's full state (model as safetensors, optimizer, scheduler, RNG) + the trainer state.

Each checkpoint is written to a hidden temporary folder and renamed to ``step-NNNNNNN`` only when it
is complete, so a run killed mid-save leaves the previous checkpoint intact. The trainer state
(``trainer_state.json``) holds the step, tokens seen, the eval history and the data position. The
manifest (``manifest.json``), written last, records every file's size and sha256: a checkpoint is
trusted only when its files still match it, because a disk that filled up or a copy that was cut
short leaves files that load as garbage or as a traceback minutes into a resumed run.

A run holds :func:`run_lock` on its checkpoint folder from start to end, so that a second run into the
same folders fails at once instead of interleaving its checkpoints and metrics with the first's.
"""

from __future__ import annotations

import datetime
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from accelerate import Accelerator

from ..errors import BlockTransformerError
from ..export import replace_folder
from ..export.atomic import process_alive
from .recipe import RecipeError

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"  # written last: the size and sha256 of every other file
LOCK_FILE = ".bt-uptrain.lock"  # in the checkpoint folder while a run uses it: who holds it
_NAME = re.compile(r"^step-(\d+)$")


class RunLockedError(BlockTransformerError):
    """Another run uses the checkpoint folder, or may: its lock cannot be proven stale."""


def checkpoints(root: Path) -> list[Path]:
    """The checkpoint folders under ``root`` (intact or not: see :func:`problem`), oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _NAME.match(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def save(accelerator: Accelerator, root: Path, step: int, state: dict, keep_last: int) -> Path:
    """Write checkpoint ``step`` atomically (every process takes part; only the main one writes files)."""
    final = root / f"step-{step:07d}"
    tmp = root / f".step-{step:07d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()  # every process's files (RNG states, shards) are in before the manifest
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
        _write_manifest(tmp)
        replace_folder(tmp, final)
        for old in checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        logger.info("checkpoint: %s", final)
    accelerator.wait_for_everyone()
    return final


def problem(path: Path) -> str | None:
    """Why checkpoint ``path`` cannot be trusted, or None when every file is as it was saved."""
    try:
        files = json.loads((path / MANIFEST_FILE).read_text())["files"]
        entries = [(name, int(entry["size"]), str(entry["sha256"])) for name, entry in files.items()]
    except FileNotFoundError:
        return f"no {MANIFEST_FILE}: it was not completely saved"
    except (ValueError, KeyError, TypeError, AttributeError):
        return f"its {MANIFEST_FILE} is unreadable"
    if STATE_FILE not in files:
        return f"its {MANIFEST_FILE} does not list {STATE_FILE}"
    for name, size, sha256 in entries:
        file = path / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            return f"its {MANIFEST_FILE} names {name}, outside the checkpoint"
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} is {file.stat().st_size:,} bytes, {size:,} when saved (truncated?)"
        if _sha256(file) != sha256:
            return f"{name} no longer matches the sha256 recorded when it was saved (corrupt)"
    return None


def resolve(resume: str | Path, default_root: Path) -> Path:
    """The checkpoint to resume, verified: ``--resume`` without a value means the newest intact one.

    A damaged newest checkpoint is skipped with a warning that names it and why; a damaged checkpoint
    named explicitly is an error. Only files are read (and hashed): no weights are loaded.
    """
    path = Path(resume).expanduser() if resume else default_root
    if _NAME.match(path.name) or (path / MANIFEST_FILE).is_file() or (path / STATE_FILE).is_file():
        why = problem(path)
        if why:
            raise RecipeError(f"checkpoint {path} cannot be resumed: {why}. Resume another one: --resume with no "
                              "folder takes the newest intact checkpoint of the recipe's run.")
        return path
    found = checkpoints(path)
    if not found:
        raise RecipeError(f"no checkpoint to resume from in {path}: start without --resume, or point to a step-N folder.")
    skipped = []
    for candidate in reversed(found):
        why = problem(candidate)
        if why is None:
            if skipped:
                logger.warning("resuming from %s, the newest intact checkpoint: skipped %s", candidate.name,
                               "; ".join(skipped))
            return candidate
        skipped.append(f"{candidate.name} ({why})")
    raise RecipeError(f"no intact checkpoint to resume from in {path}: {'; '.join(skipped)}. Start a new run with "
                      "--set checkpoint.dir=<a new folder> (without --resume).")


def read_state(path: Path) -> dict:
    """The trainer state of checkpoint ``path`` (cheap: no weights are read)."""
    return json.loads((path / STATE_FILE).read_text())


def load(accelerator: Accelerator, path: Path) -> dict:
    """Restore model, optimizer, scheduler and RNG in place; returns the trainer state."""
    accelerator.load_state(str(path))
    return read_state(path)


@contextmanager
def run_lock(root: Path) -> Iterator[None]:
    """Hold ``root`` (a run's checkpoint folder) exclusively until the block ends.

    The lock is a ``flock`` on ``root/.bt-uptrain.lock``, which records the holder (pid, host, start
    time) for the error a second run reports. The kernel drops a ``flock`` when its process dies, so
    a lock file left by a killed run is taken over with a warning naming that run; one that names a
    process still running, or a process on another host, is refused: it cannot be proven stale.
    A folder the lock created is removed again when the run leaves nothing else in it.
    """
    created = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    path = root / LOCK_FILE
    fd = _lock_file(path, root)
    try:
        _check_previous_holder(_read_holder(fd), path)
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        try:
            yield
        finally:
            path.unlink(missing_ok=True)
    finally:
        os.close(fd)
        if created and not any(root.iterdir()):
            root.rmdir()


def _lock_file(path: Path, root: Path) -> int:
    """An open descriptor of ``path`` holding its ``flock``; fails at once when another process holds it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunLockedError(
                f"{root} is in use by another bt-uptrain run ({_describe(holder)}): wait for it to end, or give this "
                "run its own folders with --set output.dir=<new folder> (checkpoints go beside it)."
            ) from None
        except BaseException:
            os.close(fd)
            raise
        try:  # the holder may have ended and removed the file between our open and our lock
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _read_holder(fd: int) -> dict | None:
    """The holder recorded in the lock file; None when it is empty, {} when unreadable."""
    raw = os.pread(fd, 4096, 0)
    if not raw.strip():
        return None
    try:
        holder = json.loads(raw)
        return holder if isinstance(holder, dict) else {}
    except ValueError:
        return {}


def _check_previous_holder(holder: dict | None, path: Path) -> None:
    """A lock file that nobody holds: take it over with a warning when its run is provably gone, else refuse."""
    if holder is None or holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        return
    pid, host = holder.get("pid"), holder.get("host")
    if isinstance(pid, int) and host == socket.gethostname():
        if process_alive(pid):
            raise RunLockedError(
                f"{path} names pid {pid}, which is still running but holds no lock (a filesystem without locks, or "
                f"the pid was reused): if pid {pid} is not a bt-uptrain run on these folders, delete {path}."
            )
        logger.warning("taking over a stale lock: the run that held %s (%s) is no longer running; it ended without "
                       "releasing it (killed?)", path, _describe(holder))
        return
    if isinstance(pid, int):
        raise RunLockedError(
            f"{path} was taken by a run on another machine ({_describe(holder)}), which cannot be checked from "
            f"here: if that run is over, delete {path}."
        )
    logger.warning("taking over a stale lock: %s is unreadable and nobody holds it", path)


def _describe(holder: dict | None) -> str:
    if not holder or not isinstance(holder.get("pid"), int):
        return "holder unknown"
    return f"pid {holder['pid']} on {holder.get('host', '?')}, started {holder.get('started', '?')}"


def _write_manifest(folder: Path) -> None:
    """``manifest.json``: size and sha256 of every file of the finished checkpoint, written last."""
    files = {str(f.relative_to(folder)): {"size": f.stat().st_size, "sha256": _sha256(f)}
             for f in sorted(folder.rglob("*")) if f.is_file()}
    (folder / MANIFEST_FILE).write_text(json.dumps({"files": files}, indent=1))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
