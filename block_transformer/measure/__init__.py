"""Measurements: held-out perplexity (and, later, throughput)."""

from .perplexity import (
    HELDOUT_TOKENS,
    PerplexityResult,
    TokenizedCorpus,
    heldout_split,
    load_text_corpus,
    score,
    tokenize_corpus,
)

__all__ = [
    "HELDOUT_TOKENS",
    "PerplexityResult",
    "TokenizedCorpus",
    "heldout_split",
    "load_text_corpus",
    "score",
    "tokenize_corpus",
]
