"""Checkpoints: accelerate's full state (model as safetensors, optimizer, scheduler, RNG) + the trainer state.

Each checkpoint is written to a hidden temporary folder and renamed to ``step-NNNNNNN`` only when it
is complete, so a run killed mid-save leaves the previous checkpoint intact. The trainer state
(``trainer_state.json``) holds the step, tokens seen, the eval history and the data position.

A run holds :func:`run_lock` on its checkpoint folder from start to end, so that a second run into the
same folders fails at once instead of interleaving its checkpoints and metrics with the first's.
"""

from __future__ import annotations

import datetime
import fcntl
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
LOCK_FILE = ".bt-uptrain.lock"  # in the checkpoint folder while a run uses it: who holds it
_NAME = re.compile(r"^step-(\d+)$")


class RunLockedError(BlockTransformerError):
    """Another run uses the checkpoint folder, or may: its lock cannot be proven stale."""


def checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _NAME.match(p.name) and (p / STATE_FILE).is_file()]
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
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
        replace_folder(tmp, final)
        for old in checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        logger.info("checkpoint: %s", final)
    accelerator.wait_for_everyone()
    return final


def resolve(resume: str | Path, default_root: Path) -> Path:
    """``--resume`` without a value means the latest checkpoint of the recipe's checkpoint dir."""
    path = Path(resume).expanduser() if resume else default_root
    if (path / STATE_FILE).is_file():
        return path
    found = checkpoints(path)
    if not found:
        raise RecipeError(f"no checkpoint to resume from in {path}: start without --resume, or point to a step-N folder.")
    return found[-1]


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
