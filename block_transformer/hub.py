"""Export: the self-contained Hugging Face folder (weights, config, tokenizer, modeling code, card).

Nothing is written to the output path until the folder is complete: it is built in a temporary
sibling directory and renamed into place, so a failure never leaves a half-written model behind.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import BlockTransformerError
from .modeling import BlockTransformerForCausalLM

logger = logging.getLogger(__name__)

MAX_SHARD_SIZE = "2GB"
MODELING_DIR = Path(__file__).parent / "modeling"
MODELING_FILES = ("configuration_block_transformer.py", "modeling_block_transformer.py")


def check_output(out: Path, overwrite: bool) -> None:
    """Fail before any work when the output exists and may not be replaced."""
    if out.exists() and not overwrite:
        raise BlockTransformerError(f"output {out} already exists: pass --overwrite to replace it, or pick another -o.")
    if out.exists() and not out.is_dir():
        raise BlockTransformerError(f"output {out} exists and is not a folder: remove it or pick another -o.")


@contextmanager
def atomic_folder(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces ``out``, on failure it is deleted."""
    out = Path(out)
    check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _default_permissions(tmp)
    if out.exists():
        old = out.with_name(f".{out.name}.old-{tmp.name.rsplit('-', 1)[-1]}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def _default_permissions(folder: Path) -> None:
    """mkdtemp and some writers create private files; the finished folder gets the usual umask modes."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def save_model_folder(model: BlockTransformerForCausalLM, tokenizer, out: Path, overwrite: bool = False) -> Path:
    """Write model + tokenizer + modeling code + model card to ``out`` atomically."""
    out = Path(out)
    with atomic_folder(out, overwrite) as tmp:
        logger.info("saving weights to %s", out)
        model.save_pretrained(tmp, max_shard_size=MAX_SHARD_SIZE)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name in MODELING_FILES:  # save_pretrained copies them via auto_map; make sure, whatever the caller did
            shutil.copy2(MODELING_DIR / name, tmp / name)
        (tmp / "README.md").write_text(model_card(model, out.name))
    return out


def model_card(model: BlockTransformerForCausalLM, name: str) -> str:
    """A hub model card: metadata, what the model is, how it was made, how to load it."""
    cfg = model.config
    conv = cfg.conversion or {}
    source = conv.get("source", "unknown")
    split = conv.get("split", ["?", "?"])
    n_params = sum(p.numel() for p in model.parameters())
    base_model = f"base_model: {source}\n" if conv.get("source_kind") == "hub" else ""
    return f"""---
library_name: transformers
pipeline_tag: text-generation
{base_model}tags:
- block-transformer
- text-generation
---

# {name}

A **Block Transformer** (Ho et al., NeurIPS 2024, [arXiv 2406.02657](https://arxiv.org/abs/2406.02657))
converted from `{source}` with the block-transformer toolkit (`bt-convert`).
The lower layers attend globally over blocks of {cfg.block_len} tokens (a {cfg.block_len}x shorter KV
cache), the upper layers attend locally inside a block.

## How it was made

| | |
|---|---|
| source | `{source}` ({conv.get("source_kind", "?")}) |
| source revision | `{conv.get("revision")}` |
| family / model type | {conv.get("family")} / {conv.get("model_type")} |
| split (block / token decoder layers) | {split[0]} / {split[1]} |
| block length L_B | {cfg.block_len} |
| prefix tokens N_P | {cfg.num_prefix_tokens} |
| init of the new modules | `{conv.get("init")}` |
| separator token id | {conv.get("separator_id")} |
| dtype | {conv.get("dtype")} |
| parameters | {n_params:,} |
| max length (tokens) | {cfg.max_position_embeddings} |

Layers [0, {split[0]}) of the source form the block decoder and the remaining {split[1]} the token
decoder; their weights, the token embedding, final norm and LM head are exact copies of the source's.
The block embedder, start vector and prefix projection are new. **This model has not been uptrained:**
expect a much higher perplexity than the source until it is (`bt-uptrain`).

## Usage

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tok = AutoTokenizer.from_pretrained("{name}", trust_remote_code=True)  # it reads config.json
model = AutoModelForCausalLM.from_pretrained("{name}", trust_remote_code=True)
inputs = tok("The Python tutorial", return_tensors="pt")
print(tok.decode(model.generate(**inputs, max_new_tokens=20)[0]))
```
"""
