"""Writing a model folder: atomic writes, the folder itself, its model card, and its verification.

Nothing here talks to a hub (that is :mod:`block_transformer.hub`): a folder is written and checked
locally, and can then be loaded with ``from_pretrained`` or published with ``bt-push``.
"""

from .atomic import ExportError, atomic_file, atomic_folder, check_output, replace_folder, write_text_atomic
from .card import (
    BENCH_TABLE,
    CARD,
    EVAL_TABLE,
    UPTRAIN_TABLE,
    CardTable,
    add_bench_rows,
    add_eval_row,
    add_uptrain_row,
    card_metadata,
    model_card,
    source_license,
    update_card_table,
)
from .folder import MODELING_FILES, save_model_folder
from .verify import verify_folder

__all__ = [
    "BENCH_TABLE",
    "CARD",
    "EVAL_TABLE",
    "MODELING_FILES",
    "UPTRAIN_TABLE",
    "CardTable",
    "ExportError",
    "add_bench_rows",
    "add_eval_row",
    "add_uptrain_row",
    "atomic_file",
    "atomic_folder",
    "card_metadata",
    "check_output",
    "model_card",
    "replace_folder",
    "save_model_folder",
    "source_license",
    "update_card_table",
    "verify_folder",
]
