"""Measurements: held-out perplexity (and, later, throughput)."""

from .perplexity import (
    HELDOUT_TOKENS,
    PerplexityResult,
    TokenizedCorpus,
    heldout_split,
    score,
    tokenize_corpus,
)

__all__ = [
    "HELDOUT_TOKENS",
    "PerplexityResult",
    "TokenizedCorpus",
    "heldout_split",
    "score",
    "tokenize_corpus",
]
