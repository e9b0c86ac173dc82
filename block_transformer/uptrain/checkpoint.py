"""Checkpoints: accelerate's full state (model as safetensors, optimizer, scheduler, RNG) + the trainer state.

Each checkpoint is written to a hidden temporary folder and renamed to ``step-NNNNNNN`` only when it
is complete, so a run killed mid-save leaves the previous checkpoint intact. The trainer state
(``trainer_state.json``) holds the step, tokens seen, the eval history and the data position.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

from accelerate import Accelerator

from ..export import replace_folder
from .recipe import RecipeError

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"^step-(\d+)$")


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
