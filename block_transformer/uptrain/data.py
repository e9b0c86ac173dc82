"""Training sequences: tokenised, packed to ``seq_len``, in an order fixed by the seed.

Local corpora are tokenised once, the held-out tail is cut off (it never appears in training) and
the rest is packed into a ``[num_sequences, seq_len]`` tensor. The order of sequences is a fresh
permutation per epoch drawn from ``seed + epoch``; optimizer step k uses global sequences
``[k·B, (k+1)·B)`` of that stream and each process takes its slice. So the data position is just
the step number, resuming is exact, and the order does not depend on the number of processes.

Hub datasets stream through ``datasets`` (shuffle buffer, packing on the fly); their position is
the iterator's ``state_dict()`` plus the packer's leftover tokens. The shuffle buffer itself is not
restored on resume (a ``datasets`` limitation), so streamed runs resume at the right place but not
bit-exactly.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..data_spec import DataSpec
from ..measure.perplexity import HELDOUT_TOKENS, heldout_split, tokenize_corpus
from .recipe import DataSection, RecipeError

logger = logging.getLogger(__name__)

IGNORE = -100


@dataclass
class Batch:
    input_ids: torch.Tensor  # [n, seq_len]
    labels: torch.Tensor  # [n, seq_len]; IGNORE where a token is block-alignment padding

    def to(self, device) -> Batch:
        return Batch(self.input_ids.to(device), self.labels.to(device))


def pack(documents: list[list[int]], separator_id: int, seq_len: int, block_len: int | None) -> Batch:
    """Join documents with the separator and cut into full ``seq_len`` sequences (the ragged tail is dropped).

    With ``block_len`` (block-aligned packing) every document starts on a block boundary: after its
    separator, the last block is filled with separators that are inputs but never targets.
    """
    ids: list[int] = []
    scored: list[bool] = []
    for doc in documents:
        _append_document(ids, scored, doc, separator_id, block_len)
    count = len(ids) // seq_len
    if count == 0:
        raise RecipeError(f"the training data holds {len(ids)} tokens, less than one data.seq_len={seq_len} sequence.")
    return _take_sequences(ids, scored, count, seq_len)


def _append_document(ids: list[int], scored: list[bool], doc: list[int], separator_id: int, block_len: int | None) -> None:
    """Append one document and its separator (then, block-aligned, the unscored fill to the block's end)."""
    piece = [*doc, separator_id]
    ids.extend(piece)
    scored.extend([True] * len(piece))
    if block_len:
        fill = -len(piece) % block_len
        ids.extend([separator_id] * fill)
        scored.extend([False] * fill)


def _take_sequences(ids: list[int], scored: list[bool], count: int, seq_len: int) -> Batch:
    """The first ``count`` sequences of packed ``ids``; tokens that are not ``scored`` get the label IGNORE."""
    input_ids = torch.tensor(ids[: count * seq_len], dtype=torch.long).view(count, seq_len)
    mask = torch.tensor(scored[: count * seq_len]).view(count, seq_len)
    return Batch(input_ids, input_ids.masked_fill(~mask, IGNORE))


def split_documents(ids: torch.Tensor, starts: list[int], end: int) -> list[list[int]]:
    """The documents of a separator-joined corpus that begin before ``end``, cut at ``end``."""
    bounds = [s for s in starts if s < end] + [end + 1]
    return [ids[a : b - 1].tolist() for a, b in zip(bounds, bounds[1:])]


@dataclass
class LocalData:
    """A whole local corpus in memory: packed training sequences + held-out tokens."""

    sequences: Batch
    eval_ids: torch.Tensor
    eval_region: str
    train_tokens: int  # tokens of the corpus used for training (before packing)

    def batch_for_step(self, step: int, batch_size: int, seed: int) -> Batch:
        """The ``batch_size`` global sequences of optimizer step ``step`` (epochs wrap around)."""
        n = self.sequences.input_ids.shape[0]
        picks = []
        for i in range(step * batch_size, (step + 1) * batch_size):
            epoch, index = divmod(i, n)
            picks.append(int(_permutation(n, seed + epoch)[index]))
        index = torch.tensor(picks)
        return Batch(self.sequences.input_ids[index], self.sequences.labels[index])


_PERMUTATIONS: dict[tuple[int, int], torch.Tensor] = {}


def _permutation(n: int, seed: int) -> torch.Tensor:
    key = (n, seed)
    if key not in _PERMUTATIONS:
        _PERMUTATIONS.clear()
        _PERMUTATIONS[key] = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return _PERMUTATIONS[key]


def load_local(
    data: DataSection, tokenizer, separator_id: int, block_len: int, eval_max_tokens: int
) -> LocalData:
    """Tokenise a local corpus, hold out its tail (or read ``data.eval``) and pack the rest."""
    spec = DataSpec.parse(data.train, data.text_field)
    corpus = tokenize_corpus(tokenizer, dict(spec.documents()), separator_id)
    total = corpus.ids.numel()
    if data.eval is not None:
        eval_ids, region = explicit_eval_ids(data, tokenizer, separator_id, eval_max_tokens)
        end = total
    else:
        tail = math.ceil(total * data.heldout_fraction) if data.heldout_fraction else data.heldout_tokens or HELDOUT_TOKENS
        try:
            train_ids, eval_ids = heldout_split(corpus.ids, tail)
        except ValueError as err:
            raise RecipeError(
                f"{data.train}: {err} Set data.heldout_tokens lower, or data.eval to a separate held-out set."
            ) from None
        end, region = train_ids.numel(), f"held-out tail: the last {tail:,} of {total:,} tokens of {data.train}"
    documents = split_documents(corpus.ids, corpus.starts, end)
    sequences = pack(documents, separator_id, data.seq_len, block_len if data.block_aligned else None)
    logger.info("packed %d training tokens into %d sequences of %d", end, sequences.input_ids.shape[0], data.seq_len)
    return LocalData(sequences=sequences, eval_ids=eval_ids, eval_region=region, train_tokens=end)


class StreamingData:
    """Packed sequences from a streamed dataset; position = iterator state + leftover tokens."""

    def __init__(self, data: DataSection, tokenizer, separator_id: int, block_len: int, seed: int):
        self.data, self.tokenizer, self.separator_id, self.seed = data, tokenizer, separator_id, seed
        self.block_len = block_len if data.block_aligned else None
        self.spec = DataSpec.parse(data.train, data.text_field)
        self.dataset = self._open()
        self.iterator: Iterator[dict] | None = None
        self.buffer: list[int] = []
        self.scored: list[bool] = []

    def _open(self):
        import datasets

        spec = self.spec
        if spec.kind == "local":
            files = [str(p) for p in spec.files]
            kinds = {p.suffix for p in spec.files}
            if len(kinds) != 1:
                raise RecipeError(f"streaming {spec.spec} needs files of one type, got {sorted(kinds)}")
            builder = {".txt": "text", ".jsonl": "json", ".parquet": "parquet"}[kinds.pop()]
            kwargs = {"sample_by": "document"} if builder == "text" else {}
            dataset = datasets.load_dataset(builder, data_files=files, split="train", streaming=True, **kwargs)
        else:
            spec.check_available()
            dataset = datasets.load_dataset(spec.name, spec.config, split=spec.split, streaming=True)
        return dataset.shuffle(seed=self.seed, buffer_size=self.data.shuffle_buffer)

    def state_dict(self) -> dict:
        return {"dataset": self.dataset.state_dict(), "buffer": list(self.buffer), "scored": list(self.scored)}

    def load_state_dict(self, state: dict) -> None:
        self.dataset.load_state_dict(state["dataset"])
        self.buffer, self.scored = list(state["buffer"]), list(state["scored"])
        self.iterator = None
        logger.warning("streamed data resumes at its recorded position; the shuffle buffer is not restored")

    def next_sequences(self, count: int) -> Batch:
        seq_len = self.data.seq_len
        while len(self.buffer) < count * seq_len:
            if self.iterator is None:
                self.iterator = iter(self.dataset)
            try:
                example = next(self.iterator)
            except StopIteration:  # another pass over the data, in a new order
                self.iterator = None
                self.dataset.set_epoch(getattr(self.dataset, "epoch", 0) + 1)
                continue
            text = example.get(self.data.text_field)
            if not text:
                continue
            doc = self.tokenizer(str(text), add_special_tokens=False)["input_ids"]
            _append_document(self.buffer, self.scored, doc, self.separator_id, self.block_len)
        batch = _take_sequences(self.buffer, self.scored, count, seq_len)
        del self.buffer[: count * seq_len], self.scored[: count * seq_len]
        return batch


def is_streamed(data: DataSection) -> bool:
    """``data.streaming``; by default hub datasets stream and local files are read whole."""
    return data.streaming if data.streaming is not None else DataSpec.parse(data.train, data.text_field).kind != "local"


def require_heldout_source(data: DataSection) -> None:
    """Streamed training data has no held-out tail: it needs an explicit ``data.eval``."""
    if is_streamed(data) and data.eval is None:
        raise RecipeError(
            f"data.train {data.train} is streamed, so it has no held-out tail: set data.eval to a held-out split "
            "(e.g. the dataset's validation or test split)."
        )


def explicit_eval_ids(data: DataSection, tokenizer, separator_id: int, max_tokens: int) -> tuple[torch.Tensor, str]:
    """The first ``max_tokens`` tokens of ``data.eval`` (set whenever the training data is streamed)."""
    spec = DataSpec.parse(data.eval, data.text_field)
    spec.check_available()
    corpus = tokenize_corpus(tokenizer, spec.first_documents(tokenizer, max_tokens), separator_id)
    return corpus.ids, f"data.eval {data.eval}"
