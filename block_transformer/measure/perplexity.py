"""Held-out perplexity of a causal LM, vanilla or Block Transformer, on exactly the same tokens.

The corpus is a folder of text files read in sorted path order and concatenated, one separator token
between documents (the separator a model was pretrained with, recorded at conversion as
``config.conversion["separator_id"]``). **The held-out set is the tail of that concatenation: its
last ``HELDOUT_TOKENS`` tokens** (see :func:`heldout_split`). Perplexity is measured on held-out
tokens only; anything that trains on the same corpus (uptraining) must use ``heldout_split(...)[0]``
so that the two never overlap.

Scoring follows Hugging Face causal LMs: the ids are cut into non-overlapping windows of ``seq_len``
tokens and ``logits[:, t]`` is scored against token ``t + 1`` of its window, so every window scores
``seq_len - 1`` tokens and a vanilla model gets the loss of ``model(window, labels=window)``. A Block
Transformer also predicts each window's first token from its start vector (``first_token_logits``);
that loss is reported on its own and never enters the figure compared with the vanilla model.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

HELDOUT_TOKENS = 65_536
"""Size of the held-out tail (in tokens of the model's tokenizer): room for 128 windows of 512."""


@dataclass(frozen=True)
class TokenizedCorpus:
    """Token ids of a whole corpus plus where each document starts, to say which files a range covers."""

    ids: torch.Tensor  # 1-D int64: doc_0, sep, doc_1, sep, ..., doc_{n-1}
    paths: list[str]  # document names (paths relative to the corpus root), in order
    starts: list[int]  # token offset of each document's first token in ``ids``

    def files_in(self, begin: int, end: int) -> list[str]:
        """Documents that have at least one token in ``ids[begin:end]`` (a separator alone does not count)."""
        ends = [*(s - 1 for s in self.starts[1:]), self.ids.numel()]  # each document's end, before its separator
        return [p for p, s, e in zip(self.paths, self.starts, ends) if s < end and e > begin and s < e]


@dataclass(frozen=True)
class PerplexityResult:
    """Token-level loss of one model on a set of windows; every loss is a mean negative log-likelihood in nats."""

    nll_sum: float  # summed over all scored tokens
    num_tokens: int  # scored tokens: num_windows * (seq_len - 1)
    loss: float  # nll_sum / num_tokens
    perplexity: float  # exp(loss)
    num_windows: int
    seq_len: int
    block_len: int
    loss_by_block_position: list[float]  # mean loss of predicted tokens at position u % block_len of their window
    tokens_by_block_position: list[int]
    first_token_loss: float | None = None  # Block Transformer only: start vector -> each window's first token
    first_token_count: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def tokenize_corpus(tokenizer, documents: Mapping[str, str], separator_id: int) -> TokenizedCorpus:
    """Tokenise each document on its own (no special tokens) and join them with ``separator_id``.

    Documents are tokenised separately so a token never spans two files, and the separator is the one
    the model saw between packed documents in pretraining, so the boundary looks familiar to it.
    """
    paths = list(documents)
    encoded = tokenizer([documents[p] for p in paths], add_special_tokens=False)["input_ids"]
    ids: list[int] = []
    starts: list[int] = []
    for i, doc in enumerate(encoded):
        if i:
            ids.append(separator_id)
        starts.append(len(ids))
        ids.extend(doc)
    logger.info("tokenised %d documents into %d tokens", len(paths), len(ids))
    return TokenizedCorpus(ids=torch.tensor(ids, dtype=torch.long), paths=paths, starts=starts)


def heldout_split(token_ids: torch.Tensor, heldout_tokens: int = HELDOUT_TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out): the held-out set is the last ``heldout_tokens`` tokens, the rest is for training.

    A tail (rather than a random sample) is deterministic, contiguous (so windows are real running text)
    and easy to exclude from training: train on the first part only.
    """
    if not 0 < heldout_tokens < token_ids.numel():
        raise ValueError(f"cannot hold out {heldout_tokens:,} of {token_ids.numel():,} tokens and train on the rest.")
    return token_ids[:-heldout_tokens], token_ids[-heldout_tokens:]


@torch.no_grad()
def score(
    model: torch.nn.Module,
    token_ids: torch.Tensor,
    seq_len: int,
    batch_size: int = 4,
    max_tokens: int | None = None,
    block_len: int | None = None,
    desc: str = "perplexity",
) -> PerplexityResult:
    """Mean token loss of ``model`` on non-overlapping ``seq_len`` windows of ``token_ids``.

    Windows start at ``token_ids[0]``; at most ``max_tokens`` ids are read and the ragged remainder is
    dropped, so no window crosses the end of the data and every model sees identical windows.
    ``block_len`` (default: the model's ``config.block_len``, else 1) groups the loss by the position of
    the predicted token within its block; pass the Block Transformer's value for a vanilla model too, to
    see where within a block the converted model loses quality. ``desc`` labels the progress bar.
    """
    if token_ids.dim() != 1:
        raise ValueError(f"token_ids must be 1-D, got shape {tuple(token_ids.shape)}.")
    if seq_len < 2:
        raise ValueError("seq_len must be at least 2: a window's first token is only context.")
    block_len = block_len or getattr(model.config, "block_len", None) or 1
    available = token_ids.numel() if max_tokens is None else min(token_ids.numel(), max_tokens)
    num_windows = available // seq_len
    if num_windows == 0:
        raise ValueError(f"{available} tokens do not fill one window of {seq_len}: lower seq_len or add data.")
    windows = token_ids[: num_windows * seq_len].view(num_windows, seq_len)

    device = next(model.parameters()).device
    position = torch.arange(1, seq_len) % block_len  # block position of each predicted token
    nll_by_position = torch.zeros(block_len, dtype=torch.float64)
    first_nll, first_count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with tqdm(total=num_windows, desc=desc, unit="window", leave=False) as progress:
            for batch in windows.split(batch_size):
                batch = batch.to(device)
                out = model(input_ids=batch, use_cache=False)
                logits = out.logits[:, :-1].float()
                nll = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="none")
                per_position = nll.view(batch.shape[0], seq_len - 1).double().sum(dim=0).cpu()
                nll_by_position.index_add_(0, position, per_position)
                first_logits = getattr(out, "first_token_logits", None)
                if first_logits is not None:
                    first_nll += F.cross_entropy(first_logits.float(), batch[:, 0], reduction="sum").item()
                    first_count += batch.shape[0]
                progress.update(batch.shape[0])
    finally:
        model.train(was_training)

    count_by_position = torch.bincount(position, minlength=block_len) * num_windows
    nll_sum = float(nll_by_position.sum())
    num_tokens = num_windows * (seq_len - 1)
    loss = nll_sum / num_tokens
    result = PerplexityResult(
        nll_sum=nll_sum,
        num_tokens=num_tokens,
        loss=loss,
        perplexity=math.exp(loss) if loss < 700 else math.inf,
        num_windows=num_windows,
        seq_len=seq_len,
        block_len=block_len,
        loss_by_block_position=[
            float(s / c) if c else math.nan for s, c in zip(nll_by_position.tolist(), count_by_position.tolist())
        ],
        tokens_by_block_position=count_by_position.tolist(),
        first_token_loss=first_nll / first_count if first_count else None,
        first_token_count=first_count,
    )
    logger.info("perplexity %.4g (loss %.4f) over %d tokens", result.perplexity, loss, num_tokens)
    return result
