"""The model card (``README.md``) of a Block Transformer folder, and every table of measured figures in it.

A card is written once with the folder (:func:`model_card`); its "Measured results" section starts
empty on purpose: a card only shows figures that were actually measured on the folder, each with the
hardware it was measured on. ``bt-eval``, ``bt-bench`` and ``bt-uptrain`` each own one table there
(:data:`EVAL_TABLE`, :data:`BENCH_TABLE`, :data:`UPTRAIN_TABLE`), and this module is the only place
that knows their columns and how a report becomes a row.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from .. import __version__
from ..convert.mapping import format_layers
from .atomic import ExportError, write_text_atomic

if TYPE_CHECKING:
    from ..modeling import BlockTransformerForCausalLM

CARD = "README.md"
MEASURED_HEADING = "## Measured results"
_MEASURED_INTRO = "Only figures measured on this folder, each with the hardware it was measured on."
_NO_FIGURES = "No figures measured yet."


@dataclass(frozen=True)
class CardTable:
    """One table of measured figures: its card section, heading, columns and identity.

    A new row replaces the row whose first ``key_columns`` cells are equal (re-measuring the same
    thing updates the figure instead of listing it twice).
    """

    section: str
    title: str
    columns: tuple[str, ...]
    key_columns: int


EVAL_TABLE = CardTable(
    "eval", "Held-out perplexity (bt-eval)",
    ("data", "seq len", "tokens scored", "baseline", "perplexity", "baseline perplexity", "ratio",
     "first-token loss", "hardware", "date"),
    key_columns=4,
)
BENCH_TABLE = CardTable(
    "bench", "Batch-generation throughput (bt-bench)",
    ("setting", "vs", "whole call", "decode", "time to first token", "dtype", "hardware", "date"),
    key_columns=2,
)
UPTRAIN_TABLE = CardTable(
    "uptraining", "Uptraining (bt-uptrain)",
    ("recipe", "method", "tokens", "held-out ppl at step 0", "final held-out ppl", "source ppl", "hardware"),
    key_columns=1,
)


def _layer_list(layers: list[int] | None, count) -> str:
    """Source layers as ``0-14`` (``count`` layers when an older record has no list)."""
    return f"source layers {format_layers(layers)}" if layers else f"{count} layers"


def _layers_text(conv: dict, split: list) -> str:
    kind = conv.get("mapping", "partition")
    if kind == "duplicate":
        return (f"Both decoders start from all {split[0]} layers of the source (the token decoder is the full source "
                "network on local context; a layer in both is copied, not shared)")
    if kind == "custom":
        return (f"The block decoder starts from source layers {format_layers(conv['block_layers'])} and the token "
                f"decoder from {format_layers(conv['token_layers'])} (a layer in both is copied)")
    return f"Layers [0, {split[0]}) of the source form the block decoder and the remaining {split[1]} the token decoder"


def model_card(model: BlockTransformerForCausalLM, name: str, uptraining: dict | None = None) -> str:
    """A hub model card: metadata, what the model is, how it was made, measured figures, how to load it.

    ``uptraining`` is the summary of the run that produced these weights (``bt-uptrain``), or None for
    a fresh conversion: the card says which of the two its weights are.
    """
    cfg = model.config
    conv = cfg.conversion or {}
    source = conv.get("source", "unknown")
    split = conv.get("split", ["?", "?"])
    layers_text = _layers_text(conv, split)
    n_params = sum(p.numel() for p in model.parameters())
    license_ = source_license(conv)
    metadata: dict = {"library_name": "transformers", "pipeline_tag": "text-generation"}
    if conv.get("source_kind") == "hub":
        metadata["base_model"] = source
    metadata.update(_license_metadata(license_))
    metadata["tags"] = ["block-transformer", "text-generation"]
    front_matter = yaml.safe_dump(metadata, sort_keys=False).strip()
    license_row = f"| source license | {license_} |\n" if license_ else ""
    return f"""---
{front_matter}
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
{license_row}| family / model type | {conv.get("family")} / {conv.get("model_type")} |
| layer mapping ({conv.get("mapping", "partition")}) | block decoder: {_layer_list(conv.get("block_layers"), split[0])}; token decoder: {_layer_list(conv.get("token_layers"), split[1])} |
| block length L_B | {cfg.block_len} |
| prefix tokens N_P | {cfg.num_prefix_tokens} |
| init of the new modules | `{conv.get("init")}` |
| separator token id | {conv.get("separator_id")} |
| dtype | {conv.get("dtype")} |
| parameters | {n_params:,} |
| max length (tokens) | {cfg.max_position_embeddings} |
| made with | block-transformer {conv.get("block_transformer_version", __version__)} |

{layers_text}; their weights, the token embedding, final norm and LM head are exact copies of the source's.
{_weights_status(uptraining)}

{MEASURED_HEADING}

{_MEASURED_INTRO}

{_section(EVAL_TABLE.section, _NO_FIGURES + " Add held-out perplexity with "
          f"`bt-eval {name} --data CORPUS --baseline {source if conv.get('source_kind') == 'hub' else 'SOURCE'} --update-card`.")}

## Usage

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tok = AutoTokenizer.from_pretrained("{name}", trust_remote_code=True)  # it reads config.json
model = AutoModelForCausalLM.from_pretrained("{name}", trust_remote_code=True)
inputs = tok("The Python tutorial", return_tensors="pt")
print(tok.decode(model.generate(**inputs, max_new_tokens=20)[0]))
```

With [lm-evaluation-harness](https://github.com/EleutherAI/lm-evaluation-harness):
`lm_eval --model hf --model_args pretrained={name},trust_remote_code=True --tasks TASK`.
"""


def _weights_status(uptraining: dict | None) -> str:
    if uptraining is None:
        return (
            "The block embedder, start vector and prefix projection are new. **This model has not been "
            "uptrained:** expect a much higher perplexity than the source until it is (`bt-uptrain`)."
        )
    ppl = uptraining.get("final_ppl")
    figure = f", ending at held-out perplexity {ppl:.1f}" if isinstance(ppl, (int, float)) else ""
    return (
        f"These weights were then **uptrained** with `bt-uptrain` (recipe `{uptraining.get('recipe')}`, "
        f"{uptraining.get('method')}): {uptraining.get('steps')} steps, {uptraining.get('tokens'):,} tokens"
        f"{figure}; all weights moved from their converted values (see the uptraining table below)."
    )


def source_license(conversion: dict) -> str | None:
    """The source's license when it is known here, without any network access.

    GGUF sources record it at conversion (``general.license``); for local folders and hub ids it is
    read from the source's own model card (the folder's README.md, or the cached hub README.md).
    """
    if conversion.get("license"):
        return str(conversion["license"])
    source, kind = conversion.get("source"), conversion.get("source_kind")
    card: Path | None = None
    if kind == "folder" and source:
        card = Path(source).expanduser() / CARD
    elif kind == "hub" and source:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(source, CARD, revision=conversion.get("revision"))
        card = Path(cached) if isinstance(cached, str) else None
    if card is None or not card.is_file():
        return None
    value = card_metadata(card.read_text(encoding="utf-8")).get("license")
    return str(value) if value else None


def card_metadata(card_text: str) -> dict:
    """The YAML front matter of a model card ({} when it has none or it does not parse)."""
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", card_text, flags=re.DOTALL)
    if not match:
        return {}
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def _license_metadata(license_: str | None) -> dict:
    """Hub license ids are lowercase slugs (apache-2.0, mit, llama3.1, ...); anything else is ``other``."""
    if not license_:
        return {}
    slug = license_.strip().lower()
    return {"license": slug} if re.fullmatch(r"[a-z0-9][a-z0-9.\-]*", slug) else {"license": "other"}


# ----------------------------------------------------------------------------------------------------
# Measured-results tables
# ----------------------------------------------------------------------------------------------------


def add_eval_row(folder: Path, report: dict) -> Path:
    """Add (or refresh) a ``bt-eval`` report's row.

    Local data are named by their folder/file name and the scored region, not by the local path, which
    means nothing to a reader of the card.
    """
    data = report["data"]
    where = Path(data["spec"]).name if data["kind"] == "local" else data["spec"]
    model, baseline = report["model"], report["baseline"]
    first = model["first_token_loss"]
    row = (
        f"{where} ({data['region']})",
        model["seq_len"],
        f"{model['num_tokens']:,}",
        Path(baseline["spec"]).name if baseline else "-",
        f"{model['perplexity']:.4g}",
        f"{baseline['perplexity']:.4g}" if baseline else "-",
        f"{report['ppl_ratio']:.3g}x" if baseline else "-",
        f"{first:.3f}" if first is not None else "-",
        report["environment"]["hardware"],
        report["timestamp"][:10],
    )
    return update_card_table(folder, EVAL_TABLE, row)


def add_bench_rows(folder: Path, record: dict) -> Path:
    """One row per (setting, baseline cache) of a ``bt-bench`` record: BT/vanilla ratios, with the hardware."""
    today = datetime.date.today().isoformat()
    path = Path(folder) / CARD
    for row in record["rows"]:
        for name, ratios in row["ratios"].items():
            path = update_card_table(
                folder, BENCH_TABLE,
                (row["setting"]["name"], name.removeprefix("vs_"), f"{ratios['whole_call_tokens_per_s']:.2f}x",
                 f"{ratios['decode_tokens_per_s']:.2f}x", f"{ratios['time_to_first_token_s']:.2f}x",
                 record["dtype"], record["environment"]["hardware"], today),
            )
    return path


def add_uptrain_row(folder: Path, summary: dict) -> Path:
    """The row of a ``bt-uptrain`` run (its ``uptraining_summary.json``), keyed by the recipe."""
    def fmt(value: object) -> str:
        return f"{value:.4g}" if isinstance(value, float) else "-"

    row = (summary["recipe"], summary["method"], f"{summary['tokens']:,}", fmt(summary["step0_ppl"]),
           fmt(summary["final_ppl"]), fmt(summary["source_ppl"]), summary["environment"]["hardware"])
    return update_card_table(folder, UPTRAIN_TABLE, row)


def update_card_table(folder: Path, table: CardTable, row: Sequence[object]) -> Path:
    """Add ``row`` to ``table`` in ``folder``'s card, atomically.

    A card without the table's section (made by an older version, or by hand) gets it appended under
    "Measured results".
    """
    card_path = Path(folder) / CARD
    if not card_path.is_file():
        raise ExportError(f"{folder} has no {CARD} model card: is it a folder written by bt-convert?")
    text = card_path.read_text(encoding="utf-8")
    start, end = _markers(table.section)
    if start not in text or end not in text:
        block = _section(table.section, "")
        if MEASURED_HEADING not in text:
            block = f"{MEASURED_HEADING}\n\n{_MEASURED_INTRO}\n\n{block}"
        usage = text.find("\n## Usage")
        text = f"{text[:usage]}\n{block}\n{text[usage:]}" if usage >= 0 else f"{text.rstrip()}\n\n{block}\n"
    head, rest = text.split(start, 1)
    body, tail = rest.split(end, 1)
    cells = [_escape_cell(c) for c in row]
    if len(cells) != len(table.columns):
        raise ValueError(f"row has {len(cells)} cells for {len(table.columns)} columns")
    header = "| " + " | ".join(table.columns) + " |"
    rows = [line for line in body.splitlines() if line.startswith("| ") and not line.startswith("| " + table.columns[0])]
    kept = [line for line in rows if _split_row(line)[: table.key_columns] != cells[: table.key_columns]]
    lines = [f"### {table.title}", "", header, "|" + "---|" * len(table.columns), *kept, "| " + " | ".join(cells) + " |"]
    write_text_atomic(card_path, f"{head}{start}\n" + "\n".join(lines) + f"\n{end}{tail}")
    return card_path


def _markers(section: str) -> tuple[str, str]:
    return f"<!-- bt:{section}:start -->", f"<!-- bt:{section}:end -->"


def _section(section: str, body: str) -> str:
    start, end = _markers(section)
    return f"{start}\n{body}\n{end}"


def _escape_cell(value: object) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _split_row(line: str) -> list[str]:
    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
