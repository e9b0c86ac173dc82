"""The self-contained Hugging Face folder of a Block Transformer: weights, tokenizer, modeling code, card."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path

from ..modeling import BlockTransformerForCausalLM
from .atomic import atomic_folder, check_free_space
from .card import CARD, model_card

logger = logging.getLogger(__name__)

MAX_SHARD_SIZE = "2GB"
MODELING_DIR = Path(__file__).resolve().parent.parent / "modeling"
MODELING_FILES = ("configuration_block_transformer.py", "modeling_block_transformer.py", "batching_block_transformer.py")


def save_model_folder(
    model: BlockTransformerForCausalLM,
    tokenizer,
    out: Path,
    overwrite: bool = False,
    finalize: Callable[[Path], None] | None = None,
    max_shard_size: str = MAX_SHARD_SIZE,
    uptraining: dict | None = None,
) -> Path:
    """Write model + tokenizer + modeling code + model card to ``out`` atomically.

    ``finalize`` adds to the folder (extra files, card rows) before it is renamed into place, so
    those are part of the same all-or-nothing write.
    """
    out = Path(out)
    check_free_space(out, sum(t.numel() * t.element_size() for t in model.state_dict().values()))
    with atomic_folder(out, overwrite) as tmp:
        logger.info("saving weights to %s", out)
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name in MODELING_FILES:  # save_pretrained copies them via auto_map; make sure, whatever the caller did
            shutil.copy2(MODELING_DIR / name, tmp / name)
        (tmp / CARD).write_text(model_card(model, out.name, uptraining))
        if finalize is not None:
            finalize(tmp)
    return out
