"""``bt-eval``: held-out perplexity of a model, and optionally of a baseline, on exactly the same tokens.

Both models are read with the conversion's source rules (local folder, ``.gguf`` file or hub id; a
Block Transformer folder is a local folder), the data once with one tokenizer, and both are scored by
:func:`block_transformer.measure.perplexity.score`, so their numbers differ only by the model.

Which tokens are scored:

* a **local** corpus is tokenised whole (sorted files joined by the separator token) and its
  held-out tail (the last :data:`HELDOUT_TOKENS` tokens, see :func:`heldout_split`) is scored from
  its start, as ``benchmarks/step0_ppl.py`` does, so the figures match. ``heldout_tokens=0`` scores
  the corpus from its first token instead (a file that is a test set by itself); a corpus no longer
  than the tail is scored whole.
* a **hub** split is streamed from its first example until enough tokens are read
  (``max_tokens``, default :data:`HELDOUT_TOKENS`): name the held-out split in the spec.
"""

from __future__ import annotations

import datetime
import gc
import logging
from dataclasses import dataclass

import torch

from .. import environment
from ..convert.convert import resolve_separator
from ..data_spec import DataSpec
from ..errors import BlockTransformerError
from ..sources import Source, resolve_source
from .perplexity import HELDOUT_TOKENS, TokenizedCorpus, heldout_split, score, tokenize_corpus

logger = logging.getLogger(__name__)

BLOCK_TRANSFORMER_TYPE = "block_transformer"
_TOKENIZER_PROBE_TOKENS = 4096


class EvaluationError(BlockTransformerError):
    """Models or data that cannot be compared (different tokenizers, windows longer than a model allows)."""


@dataclass(frozen=True)
class ScoredTokens:
    """The token ids to score and where they come from."""

    ids: torch.Tensor
    corpus: TokenizedCorpus
    begin: int  # offset of ids[0] in corpus.ids
    region: str  # human-readable: which part of the data is scored


def evaluate(
    model: str,
    data: str | DataSpec,
    *,
    baseline: str | None = None,
    seq_len: int = 512,
    max_tokens: int | None = None,
    batch_size: int = 4,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    heldout_tokens: int | None = None,
) -> dict:
    """Score ``model`` (and ``baseline``) on the same held-out tokens of ``data``; returns a JSON-ready report.

    Everything cheap is checked before any weights are read: the data spec (a missing path, an
    unreachable hub), both model specs, the window length against each model's maximum.
    """
    spec = data if isinstance(data, DataSpec) else DataSpec.parse(data)
    if seq_len < 2:
        raise EvaluationError("--seq-len must be at least 2: a window's first token is only context.")
    if max_tokens is not None and max_tokens < seq_len:
        raise EvaluationError(f"--max-tokens {max_tokens} does not fill one window of --seq-len {seq_len}.")
    spec.check_available()
    sources = {"model": resolve_source(model)}
    if baseline:
        sources["baseline"] = resolve_source(baseline)
    for src in sources.values():
        _check_seq_len(src, seq_len)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")

    tokenizer = sources["model"].load_tokenizer()
    bt = next((s for s in sources.values() if _is_block_transformer(s)), None)
    separator_id = resolve_separator(tokenizer, (bt or sources["model"]).config)
    tokens = scored_tokens(spec, tokenizer, separator_id, heldout_tokens, max_tokens)
    if baseline:
        _check_same_tokenizer(tokenizer, sources["baseline"].load_tokenizer(), tokens, model, baseline)
    block_len = bt.config.block_len if bt is not None else None

    results = {}
    for role, src in sources.items():
        results[role] = {
            "spec": src.spec,
            "name": src.name,
            "kind": BLOCK_TRANSFORMER_TYPE if _is_block_transformer(src) else "causal_lm",
            "source_kind": src.kind,
            **_score_one(src, tokens.ids, seq_len, batch_size, max_tokens, block_len, device, dtype, role),
        }
    first = results["model"]
    end = tokens.begin + first["num_windows"] * seq_len
    report = {
        "command": "bt-eval",
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "data": {
            **spec.describe(),
            "total_tokens": tokens.corpus.ids.numel(),
            "num_documents": len(tokens.corpus.paths),
            "separator_id": separator_id,
            "region": tokens.region,
            "scored_token_range": [tokens.begin, end],
            "scored_documents": _truncate(tokens.corpus.files_in(tokens.begin, end)),
        },
        "settings": {"seq_len": seq_len, "max_tokens": max_tokens, "batch_size": batch_size, "device": device,
                     "dtype": str(dtype).removeprefix("torch.") if dtype else "model default"},
        "model": first,
        "baseline": results.get("baseline"),
        "ppl_ratio": first["perplexity"] / results["baseline"]["perplexity"] if baseline else None,
        "environment": environment.describe(device),
    }
    return report


def scored_tokens(
    spec: DataSpec, tokenizer, separator_id: int, heldout_tokens: int | None, max_tokens: int | None
) -> ScoredTokens:
    """Tokenise the data and pick what is scored (see the module docstring)."""
    if spec.kind == "hub":
        corpus = tokenize_corpus(tokenizer, spec.first_documents(tokenizer, max_tokens or HELDOUT_TOKENS), separator_id)
        return ScoredTokens(corpus.ids, corpus, 0, f"split {spec.split!r} from its first example")
    corpus = tokenize_corpus(tokenizer, dict(spec.documents()), separator_id)  # parsing checked it holds text
    total = corpus.ids.numel()
    tail = HELDOUT_TOKENS if heldout_tokens is None else heldout_tokens
    if tail < 0:
        raise EvaluationError("--heldout-tokens must be >= 0 (0 scores the data from its first token).")
    if tail == 0 or tail >= total:
        if tail:
            logger.warning("the data has only %d tokens, no more than the %d-token held-out tail: scoring all of it",
                           total, tail)
        return ScoredTokens(corpus.ids, corpus, 0, f"all {total:,} tokens, from the first")
    rest, heldout = heldout_split(corpus.ids, tail)
    return ScoredTokens(heldout, corpus, rest.numel(), f"held-out tail: the last {tail:,} of {total:,} tokens")


def _score_one(
    src: Source,
    ids: torch.Tensor,
    seq_len: int,
    batch_size: int,
    max_tokens: int | None,
    block_len: int | None,
    device: str,
    dtype: torch.dtype | None,
    role: str,
) -> dict:
    """Load one model, score it, free it: two models never have to fit in memory together."""
    logger.info("loading %s (%s) on %s", src.name, role, device)
    model = src.load_model(dtype).to(device)
    try:
        result = score(model, ids, seq_len, batch_size=batch_size, max_tokens=max_tokens, block_len=block_len,
                       desc=f"{role}: {src.name}")
    except ValueError as err:
        raise EvaluationError(str(err)) from err
    finally:
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return result.to_dict()


def _is_block_transformer(src: Source) -> bool:
    return getattr(src.config, "model_type", None) == BLOCK_TRANSFORMER_TYPE


def _check_seq_len(src: Source, seq_len: int) -> None:
    limit = getattr(src.config, "max_position_embeddings", None) or getattr(src.config, "n_positions", None)
    if limit and seq_len > limit:
        raise EvaluationError(f"--seq-len {seq_len} is longer than {src.name} allows ({limit} tokens): lower it.")


def _check_same_tokenizer(a, b, tokens: ScoredTokens, model: str, baseline: str) -> None:
    """Perplexities are only comparable on identical token ids: same vocabulary, same encoding of the data."""
    sample = a.decode(tokens.ids[:_TOKENIZER_PROBE_TOKENS].tolist())
    same = a.get_vocab() == b.get_vocab() and (
        a(sample, add_special_tokens=False)["input_ids"] == b(sample, add_special_tokens=False)["input_ids"]
    )
    if not same:
        raise EvaluationError(
            f"{model} and {baseline} tokenize text differently, so their perplexities are not comparable: "
            "compare a converted model with its own source."
        )


def _truncate(items: list[str], limit: int = 100) -> list[str]:
    return items if len(items) <= limit else [*items[:limit], f"... and {len(items) - limit} more"]
