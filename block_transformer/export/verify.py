"""Is a folder a complete, loadable Block Transformer folder? Checked cheaply, before it is published."""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import first_line
from .atomic import ExportError
from .card import CARD, card_metadata

if TYPE_CHECKING:
    from transformers import PretrainedConfig

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")


def verify_folder(folder: Path) -> dict:
    """Check that ``folder`` is complete and loadable; raise :class:`ExportError` listing every problem.

    Cheap on purpose (nothing is read beyond headers): the config is parsed, the model is built on
    the meta device and its parameter names and shapes are compared with the safetensors headers, the
    modeling files must parse, the tokenizer must load and the card must carry hub metadata. A folder
    that passes loads with ``from_pretrained(folder, trust_remote_code=True)``. Returns the files a
    push would upload (hidden files and ``__pycache__`` left out) and the number of tensors.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ExportError(f"no such folder: {folder}")
    problems: list[str] = []
    config = _check_config(folder, problems)
    weight_shapes = _check_weight_files(folder, problems)
    if config is not None and weight_shapes:
        _check_weights_match(folder, weight_shapes, problems)
    _check_tokenizer(folder, problems)
    card = folder / CARD
    if not card.is_file():
        problems.append(f"no {CARD} model card")
    elif card_metadata(card.read_text(encoding="utf-8")).get("library_name") != "transformers":
        problems.append(f"{CARD} has no hub metadata (library_name: transformers)")
    if problems:
        raise ExportError(
            f"{folder} is not ready to publish: {'; '.join(problems)}. Re-create it with bt-convert (or fix it) first."
        )
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and not _hidden(p, folder))
    return {"files": files, "num_tensors": len(weight_shapes)}


def _hidden(path: Path, folder: Path) -> bool:
    return any(part.startswith(".") or part == "__pycache__" for part in path.relative_to(folder).parts)


def _check_config(folder: Path, problems: list[str]) -> PretrainedConfig | None:
    path = folder / "config.json"
    if not path.is_file():
        problems.append("no config.json")
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        problems.append(f"config.json is not valid JSON ({err.msg}, line {err.lineno})")
        return None
    auto_map = raw.get("auto_map") or {}
    for auto in ("AutoConfig", "AutoModelForCausalLM"):
        if auto not in auto_map:
            problems.append(f"config.json has no auto_map entry for {auto}")
    modules = [str(reference).split("--")[-1].rsplit(".", 1)[0] for reference in auto_map.values()]
    checked: set[str] = set()
    while modules:  # the auto_map modules and every module they import relatively (it must ship too)
        module = modules.pop()
        if module in checked:
            continue
        checked.add(module)
        code = folder / f"{module}.py"
        if not code.is_file():
            problems.append(f"modeling file {code.name} (named in auto_map or imported by its code) is missing")
            continue
        try:
            tree = ast.parse(code.read_text(encoding="utf-8"))
        except SyntaxError as err:
            problems.append(f"{code.name} does not parse (line {err.lineno})")
            continue
        modules += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 1 and n.module]
    for name, value in raw.items():  # a nested auto_map names remote code that never ships with this folder
        if isinstance(value, dict) and "auto_map" in value:
            problems.append(f"config.json's {name} has an auto_map naming modules the folder does not ship")
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(folder)
    except Exception as err:  # noqa: BLE001 - any failure means from_pretrained would fail too
        problems.append(f"config.json does not load ({first_line(err)})")
        return None


def _check_weight_files(folder: Path, problems: list[str]) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} from the safetensors headers (no tensor data is read)."""
    from safetensors import safe_open

    if (folder / WEIGHTS_INDEX).is_file():
        try:
            shards = sorted(set(json.loads((folder / WEIGHTS_INDEX).read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as err:
            problems.append(f"{WEIGHTS_INDEX} is unreadable ({type(err).__name__})")
            return {}
    elif (folder / WEIGHTS).is_file():
        shards = [WEIGHTS]
    else:
        problems.append(f"no weights ({WEIGHTS} or {WEIGHTS_INDEX})")
        return {}
    shapes: dict[str, tuple[int, ...]] = {}
    for shard in shards:
        if not (folder / shard).is_file():
            problems.append(f"weight shard {shard} is missing")
            continue
        try:
            with safe_open(folder / shard, "pt") as f:
                shapes.update({key: tuple(f.get_slice(key).get_shape()) for key in f.keys()})
        except Exception as err:  # noqa: BLE001 - a truncated or foreign file
            problems.append(f"{shard} is not a readable safetensors file ({first_line(err)})")
    return shapes


def _check_weights_match(folder: Path, shapes: dict[str, tuple[int, ...]], problems: list[str]) -> None:
    """Build the model on the meta device and compare its tensors with the saved ones."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    except Exception as err:  # noqa: BLE001
        problems.append(f"the model cannot be built from config.json ({first_line(err)})")
        return
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    by_tensor: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_tensor.setdefault(id(param), []).append(name)
    tied = {name for names in by_tensor.values() if len(names) > 1 for name in names}
    missing = [n for n in expected if n not in shapes and not (n in tied and any(t in shapes for t in _tied_with(n, by_tensor)))]
    unexpected = [n for n in shapes if n not in expected]
    wrong = [n for n in shapes if n in expected and shapes[n] != expected[n]]
    for what, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape for", wrong)):
        if names:
            problems.append(f"weights {what} {', '.join(sorted(names)[:5])}{' ...' if len(names) > 5 else ''}")


def _tied_with(name: str, by_tensor: dict[int, list[str]]) -> list[str]:
    return next((names for names in by_tensor.values() if name in names), [])


def _check_tokenizer(folder: Path, problems: list[str]) -> None:
    if not (folder / "tokenizer_config.json").is_file() or not any((folder / f).is_file() for f in TOKENIZER_FILES):
        problems.append("no tokenizer (tokenizer_config.json plus tokenizer.json or a vocabulary file)")
        return
    try:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(folder)
    except Exception as err:  # noqa: BLE001
        problems.append(f"the tokenizer does not load ({first_line(err)})")
