"""Training sequences: tokenised, packed to ``seq_len``, in an order fixed by the seed.

Local corpora are tokenised once, the held-out tail is cut off (it never appears in training) and
the rest is packed into a ``[num_sequences, seq_len]`` tensor. The order of sequences is a fresh
permutation per epoch drawn from ``seed + epoch``; optimizer step k uses global sequences
``[k·B, (k+1)·B)`` of that stream and each process takes its slice. So the data position is just
the step number, resuming is exact, and the order does not depend on the number of processes.

A mixture (``data.train`` a list of ``{name, path, weight}``) packs each component on its own (a
sequence never mixes two components; each keeps its own held-out tail) and draws the components in
chunks of ``MIXTURE_CHUNK`` global sequences: each chunk holds every component's share of the chunk
(largest remainder, at least one), in an order shuffled by ``seed`` and the chunk number. The
component's own sequences are then read in a fresh permutation per pass over it, as for one corpus.
Every pick is a function of (seed, global sequence index) alone, so a mixture resumes exactly too.

Hub datasets stream through ``datasets`` (shuffle buffer, packing on the fly); their position is
the iterator's ``state_dict()`` plus the packer's leftover tokens. The shuffle buffer itself is not
restored on resume (a ``datasets`` limitation), so streamed runs resume at the right place but not
bit-exactly.
"""

from __future__ import annotations

import functools
import logging
import math
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from ..data_spec import DataSpec
from ..measure.perplexity import HELDOUT_TOKENS, heldout_split, tokenize_corpus
from .recipe import HELDOUT_SET, MIXTURE_CHUNK, DataSection, Recipe, RecipeError, TrainComponent

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
class HeldOut:
    """One named held-out set: the tokens every evaluation scores, and where they come from in words."""

    name: str
    ids: torch.Tensor
    region: str


@dataclass
class Component:
    """A mixture component's place in :attr:`LocalData.sequences` and its share of the draws."""

    name: str
    weight: float  # normalised over the components
    first: int  # index of its first packed sequence
    count: int  # packed sequences
    train_tokens: int


@dataclass
class LocalData:
    """A whole local corpus (or a mixture of them) in memory: packed training sequences + held-out tokens."""

    sequences: Batch
    eval_ids: torch.Tensor  # the first held-out set's tokens (a single corpus: its tail)
    eval_region: str
    train_tokens: int  # tokens of the corpus used for training (before packing); a mixture: all components'
    components: list[Component] = field(default_factory=list)  # a mixture's; empty for a single corpus
    heldout: list[HeldOut] = field(default_factory=list)  # each corpus's held-out tail (or data.eval)

    def batch_for_step(self, step: int, batch_size: int, seed: int) -> Batch:
        """The ``batch_size`` global sequences of optimizer step ``step`` (epochs wrap around)."""
        picks = [self.sequence_index(i, seed) for i in range(step * batch_size, (step + 1) * batch_size)]
        index = torch.tensor(picks)
        return Batch(self.sequences.input_ids[index], self.sequences.labels[index])

    def sequence_index(self, i: int, seed: int) -> int:
        """The packed sequence that global sequence ``i`` of the training stream reads."""
        if not self.components:
            n = self.sequences.input_ids.shape[0]
            epoch, index = divmod(i, n)
            return int(_permutation(n, seed + epoch)[index])
        k, j = mixture_draw(tuple(c.weight for c in self.components), i, seed)
        c = self.components[k]
        epoch, index = divmod(j, c.count)
        return c.first + int(_permutation(c.count, seed + epoch + 1_000_003 * (k + 1))[index])


def mixture_quotas(weights: tuple[float, ...], chunk: int = MIXTURE_CHUNK) -> list[int]:
    """Sequences of each component in a chunk: ``weight * chunk`` rounded by largest remainder, at least one each."""
    total = sum(weights)
    raw = [w / total * chunk for w in weights]
    quotas = [math.floor(r) for r in raw]
    by_remainder = sorted(range(len(raw)), key=lambda k: (quotas[k] - raw[k], k))
    for k in by_remainder[: chunk - sum(quotas)]:
        quotas[k] += 1
    for k in range(len(quotas)):
        if quotas[k] == 0:
            quotas[k] = 1
            quotas[max(range(len(quotas)), key=lambda m: quotas[m])] -= 1
    return quotas


@functools.lru_cache(maxsize=64)
def _chunk_order(weights: tuple[float, ...], chunk_index: int, seed: int) -> tuple[tuple[int, int], ...]:
    """(component, rank within the chunk) of every slot of one chunk."""
    quotas = mixture_quotas(weights)
    slots = torch.tensor([k for k, q in enumerate(quotas) for _ in range(q)])
    generator = torch.Generator().manual_seed(seed * 1_000_003 + chunk_index)
    order = slots[torch.randperm(len(slots), generator=generator)].tolist()
    seen = [0] * len(quotas)
    out = []
    for k in order:
        out.append((k, seen[k]))
        seen[k] += 1
    return tuple(out)


def mixture_draw(weights: tuple[float, ...], i: int, seed: int) -> tuple[int, int]:
    """(component, how many of that component's draws came before) for global sequence ``i``."""
    chunk_index, slot = divmod(i, MIXTURE_CHUNK)
    k, rank = _chunk_order(weights, chunk_index, seed)[slot]
    return k, chunk_index * mixture_quotas(weights)[k] + rank


_PERMUTATIONS: OrderedDict[tuple[int, int], torch.Tensor] = OrderedDict()


def _permutation(n: int, seed: int) -> torch.Tensor:
    key = (n, seed)
    if key not in _PERMUTATIONS:
        while len(_PERMUTATIONS) >= 32:  # a mixture reads several components' permutations in turn
            _PERMUTATIONS.popitem(last=False)
        _PERMUTATIONS[key] = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return _PERMUTATIONS[key]


def load_local(
    data: DataSection, tokenizer, separator_id: int, block_len: int, eval_max_tokens: int
) -> LocalData:
    """Tokenise a local corpus (or each component of a mixture), hold out its tail (or read ``data.eval``)
    and pack the rest."""
    if data.mixture:
        return _load_mixture(data, tokenizer, separator_id, block_len)
    spec = DataSpec.parse(data.train, data.text_field)
    corpus = tokenize_corpus(tokenizer, dict(spec.documents()), separator_id)
    total = corpus.ids.numel()
    if data.eval is not None:
        eval_ids, region = explicit_eval_ids(data, tokenizer, separator_id, eval_max_tokens)
        end = total
    else:
        tail = math.ceil(total * data.heldout_fraction) if data.heldout_fraction else data.heldout_tokens or HELDOUT_TOKENS
        end, eval_ids, region = _cut_tail(corpus.ids, tail, data.train, "data.heldout_tokens")
    documents = split_documents(corpus.ids, corpus.starts, end)
    sequences = pack(documents, separator_id, data.seq_len, block_len if data.block_aligned else None)
    logger.info("packed %d training tokens into %d sequences of %d", end, sequences.input_ids.shape[0], data.seq_len)
    return LocalData(sequences=sequences, eval_ids=eval_ids, eval_region=region, train_tokens=end,
                     heldout=[HeldOut(HELDOUT_SET, eval_ids, region)])


def _cut_tail(ids: torch.Tensor, tail: int, where: str, knob: str) -> tuple[int, torch.Tensor, str]:
    try:
        train_ids, eval_ids = heldout_split(ids, tail)
    except ValueError as err:
        raise RecipeError(f"{where}: {err} Set {knob} lower, or hold out separate data.") from None
    total = ids.numel()
    return train_ids.numel(), eval_ids, f"held-out tail: the last {tail:,} of {total:,} tokens of {where}"


def _load_mixture(data: DataSection, tokenizer, separator_id: int, block_len: int) -> LocalData:
    """Each component tokenised and packed on its own, its tail held out; sequences concatenated."""
    total_weight = sum(c.weight for c in data.components)
    packed, components, heldout, first = [], [], [], 0
    for c in data.components:
        sequences, held, train_tokens = _load_component(c, data, tokenizer, separator_id, block_len)
        count = sequences.input_ids.shape[0]
        packed.append(sequences)
        components.append(Component(c.name, c.weight / total_weight, first, count, train_tokens))
        heldout.append(held)
        first += count
        logger.info("mixture component %s: %d training tokens in %d sequences (weight %.3g)", c.name, train_tokens,
                    count, c.weight / total_weight)
    sequences = Batch(torch.cat([b.input_ids for b in packed]), torch.cat([b.labels for b in packed]))
    return LocalData(sequences=sequences, eval_ids=heldout[0].ids, eval_region=heldout[0].region,
                     train_tokens=sum(c.train_tokens for c in components), components=components, heldout=heldout)


def _load_component(c: TrainComponent, data: DataSection, tokenizer, separator_id: int,
                    block_len: int) -> tuple[Batch, HeldOut, int]:
    spec = DataSpec.parse(c.path, data.text_field)
    corpus = tokenize_corpus(tokenizer, dict(spec.documents()), separator_id)
    total = corpus.ids.numel()
    if c.heldout_tokens:
        tail, knob = c.heldout_tokens, f"data.train {c.name} heldout_tokens"
    elif data.heldout_fraction:
        tail, knob = math.ceil(total * data.heldout_fraction), "data.heldout_fraction"
    else:
        tail, knob = data.heldout_tokens or HELDOUT_TOKENS, "data.heldout_tokens"
    end, eval_ids, region = _cut_tail(corpus.ids, tail, f"{c.name} ({c.path})", knob)
    documents = split_documents(corpus.ids, corpus.starts, end)
    try:
        sequences = pack(documents, separator_id, data.seq_len, block_len if data.block_aligned else None)
    except RecipeError as err:
        raise RecipeError(f"data.train {c.name}: {err}") from None
    return sequences, HeldOut(c.name, eval_ids, region), end


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
    """``data.streaming``; by default hub datasets stream and local files are read whole. A mixture is read whole."""
    if data.mixture:
        return False
    return data.streaming if data.streaming is not None else DataSpec.parse(data.train, data.text_field).kind != "local"


def require_heldout_source(data: DataSection, other_sets: int = 0) -> None:
    """Streamed training data has no held-out tail: it needs an explicit ``data.eval`` (or ``eval.sets``)."""
    if is_streamed(data) and data.eval is None and not other_sets:
        raise RecipeError(
            f"data.train {data.train} is streamed, so it has no held-out tail: set data.eval to a held-out split "
            "(e.g. the dataset's validation or test split), or list held-out sets in eval.sets."
        )


def explicit_eval_ids(data: DataSection, tokenizer, separator_id: int, max_tokens: int) -> tuple[torch.Tensor, str]:
    """The first ``max_tokens`` tokens of ``data.eval`` (set whenever the training data is streamed)."""
    return first_tokens(data.eval, data.text_field, tokenizer, separator_id, max_tokens), f"data.eval {data.eval}"


def first_tokens(spec_text: str, text_field: str, tokenizer, separator_id: int, max_tokens: int) -> torch.Tensor:
    """The first ``max_tokens`` tokens (at least) of a data spec's documents, joined with the separator."""
    spec = DataSpec.parse(spec_text, text_field)
    spec.check_available()
    return tokenize_corpus(tokenizer, spec.first_documents(tokenizer, max_tokens), separator_id).ids


def heldout_sets(recipe: Recipe, data: LocalData | None, tokenizer, separator_id: int) -> list[HeldOut]:
    """Every held-out set of ``recipe`` in :attr:`Recipe.eval_set_names` order, each cut to its ``max_tokens``:
    the training data's own (``data``'s tails, or ``data.eval`` for streamed data), then ``eval.sets``."""
    d, e = recipe.data, recipe.eval
    own: list[HeldOut] = []
    if data is not None:
        own = data.heldout
    elif d.eval is not None:
        ids, region = explicit_eval_ids(d, tokenizer, separator_id, e.max_tokens)
        own = [HeldOut(HELDOUT_SET, ids, region)]
    sets = [HeldOut(h.name, h.ids[: e.max_tokens], h.region) for h in own]
    for extra in e.sets:
        limit = extra.max_tokens or e.max_tokens
        ids = first_tokens(extra.data, extra.text_field or d.text_field, tokenizer, separator_id, limit)
        sets.append(HeldOut(extra.name, ids[:limit], f"eval.sets {extra.name}: the first {limit:,} tokens of {extra.data}"))
    return sets
