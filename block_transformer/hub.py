"""Export and publishing: the self-contained Hugging Face folder, its model card, and the push to a hub.

Nothing is written to the output path until the folder is complete: it is built in a temporary
sibling directory and renamed into place, so a failure never leaves a half-written model behind.
Nothing is sent to a hub until the folder is verified complete and loadable, and the token is only
ever handed to ``huggingface_hub``: never logged, printed or written.
"""

from __future__ import annotations

import ast
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from . import __version__
from .errors import BlockTransformerError, first_line
from .modeling import BlockTransformerForCausalLM

if TYPE_CHECKING:
    from transformers import PretrainedConfig

logger = logging.getLogger(__name__)

MAX_SHARD_SIZE = "2GB"
MODELING_DIR = Path(__file__).parent / "modeling"
MODELING_FILES = ("configuration_block_transformer.py", "modeling_block_transformer.py")


def check_output(out: Path, overwrite: bool) -> None:
    """Fail before any work when the output exists and may not be replaced."""
    if out.exists() and not overwrite:
        raise BlockTransformerError(f"output {out} already exists: pass --overwrite to replace it, or pick another -o.")
    if out.exists() and not out.is_dir():
        raise BlockTransformerError(f"output {out} exists and is not a folder: remove it or pick another -o.")


@contextmanager
def atomic_folder(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces ``out``, on failure it is deleted."""
    out = Path(out)
    check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _default_permissions(tmp)
    if out.exists():
        old = out.with_name(f".{out.name}.old-{tmp.name.rsplit('-', 1)[-1]}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def _default_permissions(folder: Path) -> None:
    """mkdtemp and some writers create private files; the finished folder gets the usual umask modes."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def save_model_folder(
    model: BlockTransformerForCausalLM,
    tokenizer,
    out: Path,
    overwrite: bool = False,
    finalize: Callable[[Path], None] | None = None,
) -> Path:
    """Write model + tokenizer + modeling code + model card to ``out`` atomically.

    ``finalize`` adds to the folder (extra files, card sections) before it is renamed into place.
    """
    out = Path(out)
    with atomic_folder(out, overwrite) as tmp:
        logger.info("saving weights to %s", out)
        model.save_pretrained(tmp, max_shard_size=MAX_SHARD_SIZE)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name in MODELING_FILES:  # save_pretrained copies them via auto_map; make sure, whatever the caller did
            shutil.copy2(MODELING_DIR / name, tmp / name)
        (tmp / "README.md").write_text(model_card(model, out.name))
        if finalize is not None:
            finalize(tmp)
    return out


HUB_PROBE_TIMEOUT_S = 3.0
CARD = "README.md"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")
MEASURED_HEADING = "## Measured results"
EVAL_SECTION = "eval"
_NO_FIGURES = "No figures measured yet."


class HubError(BlockTransformerError):
    """A folder that may not be published, or a hub that refused or could not be reached."""


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temp file beside ``path`` and rename it into place: never half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = path.stat().st_mode & 0o777 if path.exists() else None
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False) as f:
        f.write(text)
    tmp = Path(f.name)
    if mode is None:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    tmp.chmod(mode)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------
# Model card
# ----------------------------------------------------------------------------------------------------


def model_card(model: BlockTransformerForCausalLM, name: str) -> str:
    """A hub model card: metadata, what the model is, how it was made, measured figures, how to load it.

    The "Measured results" section starts empty on purpose: a card only shows figures that were
    actually measured on the folder (``bt-eval ... --update-card`` adds them, with the hardware).
    """
    cfg = model.config
    conv = cfg.conversion or {}
    source = conv.get("source", "unknown")
    split = conv.get("split", ["?", "?"])
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
| split (block / token decoder layers) | {split[0]} / {split[1]} |
| block length L_B | {cfg.block_len} |
| prefix tokens N_P | {cfg.num_prefix_tokens} |
| init of the new modules | `{conv.get("init")}` |
| separator token id | {conv.get("separator_id")} |
| dtype | {conv.get("dtype")} |
| parameters | {n_params:,} |
| max length (tokens) | {cfg.max_position_embeddings} |
| made with | block-transformer {conv.get("block_transformer_version", __version__)} |

Layers [0, {split[0]}) of the source form the block decoder and the remaining {split[1]} the token
decoder; their weights, the token embedding, final norm and LM head are exact copies of the source's.
The block embedder, start vector and prefix projection are new. **This model has not been uptrained:**
expect a much higher perplexity than the source until it is (`bt-uptrain`).

{MEASURED_HEADING}

Only figures measured on this folder, each with the hardware it was measured on.

{_section(EVAL_SECTION, _NO_FIGURES + " Add held-out perplexity with "
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


def _markers(section: str) -> tuple[str, str]:
    return f"<!-- bt:{section}:start -->", f"<!-- bt:{section}:end -->"


def _section(section: str, body: str) -> str:
    start, end = _markers(section)
    return f"{start}\n{body}\n{end}"


def _escape_cell(value: object) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def update_card_table(
    folder: Path, section: str, title: str, columns: Sequence[str], row: Sequence[object], key_columns: int
) -> Path:
    """Add ``row`` to the measured-results table ``section`` of ``folder``'s card, atomically.

    A row whose first ``key_columns`` cells equal the new row's is replaced (re-measuring the same
    thing updates the figure instead of listing it twice). A card without the section (made by an
    older version, or by hand) gets it appended under "Measured results".
    """
    card_path = Path(folder) / CARD
    if not card_path.is_file():
        raise HubError(f"{folder} has no {CARD} model card: is it a folder written by bt-convert?")
    text = card_path.read_text(encoding="utf-8")
    start, end = _markers(section)
    if start not in text or end not in text:
        block = _section(section, "")
        if MEASURED_HEADING not in text:
            block = f"{MEASURED_HEADING}\n\nOnly figures measured on this folder, each with the hardware it was measured on.\n\n{block}"
        usage = text.find("\n## Usage")
        text = f"{text[:usage]}\n{block}\n{text[usage:]}" if usage >= 0 else f"{text.rstrip()}\n\n{block}\n"
    head, rest = text.split(start, 1)
    body, tail = rest.split(end, 1)
    cells = [_escape_cell(c) for c in row]
    if len(cells) != len(columns):
        raise ValueError(f"row has {len(cells)} cells for {len(columns)} columns")
    rows = [line for line in body.splitlines() if line.startswith("| ") and not line.startswith("| " + columns[0])]
    kept = [line for line in rows if _split_row(line)[:key_columns] != cells[:key_columns]]
    table = [
        f"### {title}",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
        *kept,
        "| " + " | ".join(cells) + " |",
    ]
    write_text_atomic(card_path, f"{head}{start}\n" + "\n".join(table) + f"\n{end}{tail}")
    return card_path


def _split_row(line: str) -> list[str]:
    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]


# ----------------------------------------------------------------------------------------------------
# Verify and push
# ----------------------------------------------------------------------------------------------------


def verify_folder(folder: Path) -> dict:
    """Check that ``folder`` is a complete, loadable Block Transformer folder; raise HubError listing every problem.

    Cheap on purpose (nothing is read beyond headers): the config is parsed, the model is built on
    the meta device and its parameter names and shapes are compared with the safetensors headers, the
    modeling files must parse, the tokenizer must load and the card must carry hub metadata. A folder
    that passes loads with ``from_pretrained(folder, trust_remote_code=True)``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise HubError(f"no such folder: {folder}")
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
        raise HubError(
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
    for reference in auto_map.values():
        module = str(reference).split("--")[-1].rsplit(".", 1)[0]
        code = folder / f"{module}.py"
        if not code.is_file():
            problems.append(f"modeling file {code.name} (named in auto_map) is missing")
            continue
        try:
            ast.parse(code.read_text(encoding="utf-8"))
        except SyntaxError as err:
            problems.append(f"{code.name} does not parse (line {err.lineno})")
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


def hub_token() -> str:
    """The user's token (``HF_TOKEN`` or the ``hf auth login`` file); never logged or printed."""
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise HubError("no Hugging Face token: set HF_TOKEN to a write token, or run `hf auth login`.")
    return token


def probe_hub(why: str, timeout: float = HUB_PROBE_TIMEOUT_S) -> None:
    """Fail in seconds (not after the ~25 s default) when the hub cannot be reached.

    Goes through huggingface_hub's own HTTP session, so proxies, certificates and client factories
    configured for it apply here too. ``why`` ends the error message: what the user should do instead.
    """
    from huggingface_hub import constants, get_session
    from huggingface_hub.errors import OfflineModeIsEnabled

    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except OfflineModeIsEnabled as err:
        raise HubError(f"HF_HUB_OFFLINE is set, so the hub is not contacted {why}.") from err
    except _transport_error() as err:
        raise HubError(f"cannot reach the Hugging Face hub at {constants.ENDPOINT} ({first_line(err)}) {why}.") from err


def check_push_possible() -> str:
    """The cheap checks of a push (token present, hub reachable): run them before long work. Returns the token."""
    token = hub_token()
    probe_hub("to push; check your network or HF_ENDPOINT, then push the folder with bt-push")
    return token


def push_folder(
    folder: Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Verify ``folder``, then create ``repo_id`` (if needed) and upload the folder as one commit.

    Returns the commit URL. Nothing is sent before the folder passes :func:`verify_folder`, and the
    local folder is only read. Hidden files and ``__pycache__`` are not uploaded.
    """
    from huggingface_hub import HfApi

    folder = Path(folder)
    summary = verify_folder(folder)
    token = check_push_possible()
    _refuse_leaked_token(folder, summary["files"], token)
    api = HfApi(token=token)
    message = commit_message or f"Upload {folder.name} (Block Transformer, block-transformer {__version__})"
    with _hub_errors(repo_id, token):
        role = (api.whoami().get("auth", {}).get("accessToken") or {}).get("role")
        if role == "read":
            raise HubError(f"your Hugging Face token is read-only and cannot push to {repo_id}: use a write token.")
        # not private: None, so an organization whose default is private keeps it
        url = api.create_repo(repo_id, private=True if private else None, exist_ok=True, repo_type="model")
        if revision and revision != "main":
            api.create_branch(url.repo_id, branch=revision, exist_ok=True)
        logger.info("uploading %d files from %s to %s", len(summary["files"]), folder, url.repo_id)
        info = api.upload_folder(
            repo_id=url.repo_id,
            folder_path=folder,
            revision=revision,
            commit_message=message,
            ignore_patterns=[".*", "**/.*", "__pycache__", "**/__pycache__/*"],
        )
    return info.commit_url


def _refuse_leaked_token(folder: Path, files: list[str], token: str) -> None:
    """A token pasted into a card or config would be published: refuse, without printing it."""
    needle = token.encode()
    for name in files:
        path = folder / name
        if path.suffix == ".safetensors" or path.stat().st_size > 50_000_000:
            continue
        if needle in path.read_bytes():
            raise HubError(f"{path} contains your Hugging Face token: remove it before pushing.")


@contextmanager
def _hub_errors(repo_id: str, token: str) -> Iterator[None]:
    """Turn huggingface_hub / transport failures into one actionable line (with the token masked)."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    try:
        yield
    except OfflineModeIsEnabled as err:
        raise HubError("HF_HUB_OFFLINE is set: unset it to push.") from err
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else None
        if status == 401:
            text = "the hub rejected your token (401 Unauthorized): set HF_TOKEN to a valid write token, or run `hf auth login`."
        elif status == 403:
            text = (
                f"your token may not write to {repo_id} (403 Forbidden): use a write token that has access to "
                "that namespace, or push to your own namespace."
            )
        elif status == 404:
            text = f"{repo_id} or its namespace was not found (404): check the owner part of the repo id."
        else:
            text = f"the hub refused the push to {repo_id} ({status}: {first_line(err)})."
        raise HubError(text.replace(token, "***")) from err
    except ValueError as err:  # huggingface_hub's own validation, e.g. "Invalid metadata in README.md"
        text = f"the hub rejected the folder: {' '.join(str(err).split())}"
        raise HubError(text.replace(token, "***")) from err
    except _transport_error() as err:
        raise HubError(f"lost the connection to the Hugging Face hub while pushing to {repo_id} ({first_line(err)}): "
                       "the local folder is unchanged; run bt-push again.") from err


def _transport_error() -> type[Exception]:
    """The HTTP client's network-failure base class: huggingface_hub 2.x uses httpx2, 1.x httpx."""
    try:
        import httpx2 as httpx
    except ImportError:
        import httpx
    return httpx.TransportError



def check_repo_id(repo_id: str) -> None:
    """A malformed repo id is a typo: say so before any network traffic."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise HubError(f"{repo_id!r} is not a valid hub repo id ({first_line(err)}): use OWNER/NAME.") from err
