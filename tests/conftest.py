"""Tiny randomly initialised source models of every supported family, built offline in the tests."""

from __future__ import annotations

import os
import random
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the hub

import pytest
import torch

from block_transformer.convert.coverage import tiny_source as random_source
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

VOCAB = 101
SEPARATOR = "<|endoftext|>"

_COMMON = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=0, pad_token_id=0)
_LLAMA_LIKE = dict(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
                   num_hidden_layers=4, max_position_embeddings=128, **_COMMON)

TINY_CONFIGS = {
    "gpt2": lambda: GPT2Config(n_embd=32, n_head=4, n_layer=4, n_positions=128, **_COMMON),
    "llama": lambda: LlamaConfig(**_LLAMA_LIKE, tie_word_embeddings=True),
    "mistral": lambda: MistralConfig(**_LLAMA_LIKE, sliding_window=8, tie_word_embeddings=False),
    "qwen2": lambda: Qwen2Config(**_LLAMA_LIKE, tie_word_embeddings=True),
    "gpt_neox": lambda: GPTNeoXConfig(hidden_size=32, intermediate_size=48, num_attention_heads=4,
                                      num_hidden_layers=4, max_position_embeddings=128, rotary_pct=0.5,
                                      tie_word_embeddings=False, **_COMMON),
}
FAMILIES = sorted(TINY_CONFIGS)


def tiny_source(model_type: str, seed: int = 0) -> torch.nn.Module:
    """A random source causal LM; dropout off so outputs are deterministic, norms perturbed."""
    config = TINY_CONFIGS[model_type]()
    for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop", "attention_dropout", "hidden_dropout"):
        if hasattr(config, name):
            setattr(config, name, 0.0)
    return random_source(config, seed)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer over VOCAB ids (id 0 is the separator)."""
    chars = [chr(c) for c in range(32, 32 + VOCAB - 1)]
    vocab = {SEPARATOR: 0, **{c: i + 1 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SEPARATOR))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=SEPARATOR, bos_token=SEPARATOR, pad_token=SEPARATOR, unk_token=SEPARATOR
    )


def left_padded(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different lengths as one left-padded batch (pad id 7): (input_ids, attention_mask)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), 7)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :], mask[i, width - len(row) :] = row, 1
    return ids, mask


def steps_before_near_tie(model, sequence: torch.Tensor, prompt_len: int, margin: float = 1e-4) -> int:
    """Greedy steps before the first near-tie: past one, batched and single runs may legitimately differ."""
    with torch.no_grad():
        logits = model(sequence[None]).logits[0, prompt_len - 1 : -1]
    top2 = logits.topk(2, dim=-1).values
    near_ties = ((top2[:, 0] - top2[:, 1]) <= margin).nonzero()
    return int(near_ties[0]) if len(near_ties) else logits.shape[0]


def assert_one_line_error(result, *fragments: str) -> None:
    """A CLI failure is exactly one ``Error:`` line (containing each fragment) and a non-zero exit code."""
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(lines) == 1, result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(params=FAMILIES)
def model_type(request) -> str:
    return request.param


def save_source(path, model_type: str):
    """A tiny source model + tokenizer saved as a local Hugging Face folder."""
    tiny_source(model_type).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def source_folder(tmp_path_factory, model_type):
    return save_source(tmp_path_factory.mktemp(f"src-{model_type}"), model_type)


@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "hf_modules"))


TINY_RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "tiny.yaml"


def learnable_corpus(path: Path, docs: int = 24, length: int = 200, seed: int = 0) -> Path:
    """Documents that walk the alphabet from a random letter: next-token prediction is easy to learn."""
    rng = random.Random(seed)
    path.mkdir(parents=True, exist_ok=True)
    for i in range(docs):
        start = rng.randrange(26)
        (path / f"doc{i:03d}.txt").write_text("".join(chr(97 + (start + k) % 26) for k in range(length)))
    return path


def tiny_recipe(tmp_path: Path, model_type: str = "llama", **overrides):
    """The shipped tiny recipe pointed at a fresh tiny source + learnable corpus under ``tmp_path``."""
    from block_transformer.uptrain import load_recipe

    source = tmp_path / f"src-{model_type}"
    if not source.exists():
        save_source(source, model_type)
    corpus = tmp_path / "corpus"
    if not corpus.exists():
        learnable_corpus(corpus)
    sets = {"model.source": source, "data.train": corpus, "output.dir": tmp_path / "out", **overrides}
    return load_recipe(TINY_RECIPE, [f"{k}={'null' if v is None else v}" for k, v in sets.items()])
