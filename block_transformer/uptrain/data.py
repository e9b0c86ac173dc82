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
    remedy: str = ""  # what makes it longer, in recipe keys ("raise data.heldout_tokens")


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
    train_tokens: int  # tokens of the corpus used for training (before packing); a mixture: all components'
    heldout: list[HeldOut]  # each component's held-out tail; a single corpus: its tail (or data.eval)
    components: list[Component] = field(default_factory=list)  # a mixture's; empty for a single corpus
    _orders: dict[int, tuple[int, torch.Tensor]] = field(default_factory=dict, repr=False, compare=False)

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
            return int(self._order(-1, n, seed + epoch)[index])
        k, j = mixture_draw(tuple(c.weight for c in self.components), i, seed)
        c = self.components[k]
        epoch, index = divmod(j, c.count)
        return c.first + int(self._order(k, c.count, seed + epoch + 1_000_003 * (k + 1))[index])

    def _order(self, k: int, n: int, seed: int) -> torch.Tensor:
        """Component ``k``'s (-1: the single corpus's) order for the pass seeded by ``seed``, kept until its next pass."""
        cached = self._orders.get(k)
        if cached is None or cached[0] != seed:
            cached = self._orders[k] = (seed, torch.randperm(n, generator=torch.Generator().manual_seed(seed)))
        return cached[1]


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


def load_local(
    data: DataSection, tokenizer, separator_id: int, block_len: int, eval_max_tokens: int
) -> LocalData:
    """Tokenise a local corpus (or each component of a mixture), hold out its tail (or read ``data.eval``)
    and pack the rest."""
    if data.mixture:
        return _load_mixture(data, tokenizer, separator_id, block_len)
    if data.eval is None:
        sequences, held, end = _load_component(0, data, tokenizer, separator_id, block_len)
    else:  # explicit held-out data: the whole corpus trains
        corpus = _tokenize(data.train, data, tokenizer, separator_id)
        end = corpus.ids.numel()
        ids, region = explicit_eval_ids(data, tokenizer, separator_id, eval_max_tokens)
        held = HeldOut(HELDOUT_SET, ids, region, "point data.eval at more text")
        sequences = _pack(corpus, end, data, separator_id, block_len)
    logger.info("packed %d training tokens into %d sequences of %d", end, sequences.input_ids.shape[0], data.seq_len)
    return LocalData(sequences=sequences, train_tokens=end, heldout=[held])


def heldout_length(data: DataSection, index: int, total: int) -> tuple[int, str]:
    """How many tokens training component ``index`` (0 for a single corpus) of ``total`` holds out, and
    the recipe key that says so: its own ``heldout_tokens``, else ``data.heldout_fraction``, else
    ``data.heldout_tokens`` (default :data:`HELDOUT_TOKENS`)."""
    own = data.components[index].heldout_tokens
    if own:
        return own, f"data.train.{index}.heldout_tokens"
    if data.heldout_fraction:
        return math.ceil(total * data.heldout_fraction), "data.heldout_fraction"
    return data.heldout_tokens or HELDOUT_TOKENS, "data.heldout_tokens"


def _tokenize(spec_text: str, data: DataSection, tokenizer, separator_id: int):
    return tokenize_corpus(tokenizer, dict(DataSpec.parse(spec_text, data.text_field).documents()), separator_id)


def _pack(corpus, end: int, data: DataSection, separator_id: int, block_len: int) -> Batch:
    """The documents of ``corpus`` before token ``end``, packed into training sequences."""
    documents = split_documents(corpus.ids, corpus.starts, end)
    return pack(documents, separator_id, data.seq_len, block_len if data.block_aligned else None)


def _load_mixture(data: DataSection, tokenizer, separator_id: int, block_len: int) -> LocalData:
    """Each component tokenised and packed on its own, its tail held out; sequences concatenated."""
    total_weight = sum(c.weight for c in data.components)
    packed, components, heldout, first = [], [], [], 0
    for index, c in enumerate(data.components):
        sequences, held, train_tokens = _load_component(index, data, tokenizer, separator_id, block_len)
        count = sequences.input_ids.shape[0]
        packed.append(sequences)
        components.append(Component(c.name, c.weight / total_weight, first, count, train_tokens))
        heldout.append(held)
        first += count
        logger.info("mixture component %s: %d training tokens in %d sequences (weight %.3g)", c.name, train_tokens,
                    count, c.weight / total_weight)
    sequences = Batch(torch.cat([b.input_ids for b in packed]), torch.cat([b.labels for b in packed]))
    return LocalData(sequences=sequences, train_tokens=sum(c.train_tokens for c in components), heldout=heldout,
                     components=components)


def _load_component(index: int, data: DataSection, tokenizer, separator_id: int,
                    block_len: int) -> tuple[Batch, HeldOut, int]:
    """Training component ``index`` (a single corpus: 0): packed sequences before its held-out tail, the
    tail, and how many tokens train."""
    c = data.components[index]
    corpus = _tokenize(c.path, data, tokenizer, separator_id)
    tail, knob = heldout_length(data, index, corpus.ids.numel())
    where = f"{c.name} ({c.path})" if data.mixture else c.path
    try:
        train_ids, eval_ids = heldout_split(corpus.ids, tail)
    except ValueError as err:
        raise RecipeError(f"{where}: {err} Set {knob} lower, or hold out separate data.") from None
    end = train_ids.numel()
    region = f"held-out tail: the last {tail:,} of {corpus.ids.numel():,} tokens of {where}"
    try:
        sequences = _pack(corpus, end, data, separator_id, block_len)
    except RecipeError as err:
        if not data.mixture:
            raise
        raise RecipeError(f"data.train {c.name}: {err}") from None
    return sequences, HeldOut(c.name, eval_ids, region, f"raise {knob}"), end


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


def require_heldout_source(data: DataSection, other_sets: int = 0) -> None:
    """Streamed training data has no held-out tail: it needs an explicit ``data.eval`` (or ``eval.sets``)."""
    if data.streamed and data.eval is None and not other_sets:
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
    the training data's own (``data``'s tails, or ``data.eval`` for streamed data), then ``eval.sets``.

    Raises :class:`RecipeError` for a set shorter than one eval window (it could not be scored), saying what
    makes it longer.
    """
    d, e = recipe.data, recipe.eval
    own: list[HeldOut] = []
    if data is not None:
        own = data.heldout
    elif d.eval is not None:
        ids, region = explicit_eval_ids(d, tokenizer, separator_id, e.max_tokens)
        own = [HeldOut(HELDOUT_SET, ids, region, "point data.eval at more text")]
    sets = [_cut(h, e.max_tokens, "eval.max_tokens") for h in own]
    for i, extra in enumerate(e.sets):
        limit = extra.max_tokens or e.max_tokens
        ids = first_tokens(extra.data, extra.text_field or d.text_field, tokenizer, separator_id, limit)
        region = f"eval.sets {extra.name}: the first {limit:,} tokens of {extra.data}"
        held = HeldOut(extra.name, ids, region, f"point eval.sets.{i}.data at more text")
        sets.append(_cut(held, limit, f"eval.sets.{i}.max_tokens" if extra.max_tokens else "eval.max_tokens"))
    window = recipe.eval_seq_len
    for held in sets:
        if held.ids.numel() < window:
            raise RecipeError(
                f"the held-out set {held.name} holds {held.ids.numel():,} tokens, less than one eval window of "
                f"{window} (eval.seq_len, else data.seq_len), so it cannot be scored: {held.remedy}, or lower eval.seq_len."
            )
    return sets


def _cut(held: HeldOut, limit: int, key: str) -> HeldOut:
    """``held``'s first ``limit`` tokens; when the limit cuts it, ``key`` is what makes it longer."""
    if held.ids.numel() <= limit:
        return held
    return HeldOut(held.name, held.ids[:limit], held.region, f"raise {key}")
