"""Resolve a model spec (hub id, local folder or ``.gguf`` file) into config, model and tokenizer.

Every command reads models this way: the source ``bt-convert`` converts, the models ``bt-eval`` and
``bt-bench`` score, the teacher uptraining distils from. The config is read first and on its own, so
that an unsupported architecture or an impossible split fails in a second, before gigabytes of
weights are read.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

from .errors import ConversionError, first_line

logger = logging.getLogger(__name__)

def expose_base_model(model: torch.nn.Module) -> torch.nn.Module:
    """Make ``model.base_model`` the decoder stack for LMs whose ``base_model_prefix`` names no attribute.

    Llama 4's text LM says ``language_model`` but keeps its stack in ``model``, so ``base_model`` is the whole
    LM; conversion, probe and teacher all reach the stack through ``base_model``. The one pretrained child is
    taken, on this instance only.
    """
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel) and model.base_model is model:
        children = [name for name, child in model.named_children() if isinstance(child, PreTrainedModel)]
        if len(children) == 1:
            model.base_model_prefix = children[0]
    return model


@dataclass
class Source:
    """Where a model comes from, and what to record about it in the converted folder."""

    spec: str  # what the user typed
    kind: str  # "hub" | "folder" | "gguf"
    name: str  # readable model name for config and card
    revision: str | None  # hub revision, or the sha256 of a .gguf file
    config: PretrainedConfig
    local_files_only: bool = False
    metadata: dict = field(default_factory=dict)  # extra facts for config and card (e.g. license)

    def _load_kwargs(self) -> dict:
        if self.kind == "gguf":
            path = Path(self.spec).expanduser()
            return {"pretrained_model_name_or_path": str(path.parent), "gguf_file": path.name}
        return {
            "pretrained_model_name_or_path": self.spec,
            "revision": self.revision,
            "local_files_only": self.local_files_only,
        }

    def load_model(self, dtype: torch.dtype | None) -> torch.nn.Module:
        """The source causal LM in ``dtype`` (default: the source's own; fp32 for GGUF, which dequantises)."""
        if dtype is None:
            dtype = torch.float32 if self.kind == "gguf" else "auto"
        try:
            model = AutoModelForCausalLM.from_pretrained(**self._load_kwargs(), dtype=dtype)
        except Exception as err:  # noqa: BLE001 - any loader failure here means unreadable weights
            if "weights only load failed" in str(err).lower() or "weights_only" in str(err):
                raise ConversionError(
                    f"{self.spec} holds pickle weights (.bin/.pt) that would run code when loaded; they are refused "
                    "for safety. Convert them to safetensors where you trust the files (transformers: "
                    "from_pretrained, then save_pretrained(..., safe_serialization=True)) and convert that folder."
                ) from err
            raise ConversionError(
                f"could not load the weights of {self.spec}: {first_line(err)}. "
                "The weight files may be truncated or corrupt: download them again."
            ) from err
        return expose_base_model(model.eval())

    def skeleton(self) -> torch.nn.Module:
        """The source's architecture on the meta device: its modules, head and weight tying, no weights read."""
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(self.config)

    def load_tokenizer(self):
        try:
            return AutoTokenizer.from_pretrained(**self._load_kwargs())
        except Exception as err:  # noqa: BLE001
            raise ConversionError(f"could not load the tokenizer of {self.spec}: {first_line(err)}") from err


def resolve_source(spec: str, revision: str | None = None) -> Source:
    """Classify ``spec`` and read its config (cheap): hub id, local folder or .gguf file."""
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ConversionError(f"no such GGUF file: {spec}. Check the path (bt-fetch-demo fetches the demo model).")
        return _gguf_source(spec, path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConversionError(f"{spec} is a folder without config.json: point to a Hugging Face model folder.")
        config = _read_config(spec, pretrained_model_name_or_path=str(path))
        return Source(spec=spec, kind="folder", name=config.name_or_path or path.name, revision=revision, config=config)
    if path.exists():
        raise ConversionError(f"{spec} is neither a model folder nor a .gguf file.")
    if _looks_like_path(spec):
        raise ConversionError(f"no such file or folder: {spec}")
    return _hub_source(spec, revision)


def _gguf_source(spec: str, path: Path) -> Source:
    config = _read_config(spec, pretrained_model_name_or_path=str(path.parent), gguf_file=path.name)
    return Source(
        spec=spec,
        kind="gguf",
        name=path.name,
        revision=f"sha256:{_sha256(path)}",
        config=config,
        metadata=_gguf_metadata(path),
    )


def _hub_source(repo_id: str, revision: str | None) -> Source:
    """Prefer the local cache; only then go to the hub, after a fast reachability probe."""
    try:
        config = AutoConfig.from_pretrained(repo_id, revision=revision, local_files_only=True)
        return Source(repo_id, "hub", repo_id, revision, config, local_files_only=True)
    except OSError:
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes", "on"}:
        raise ConversionError(
            f"{repo_id} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: "
            "download it first or pass a local folder / .gguf file."
        )
    from .hub import probe_hub

    probe_hub(f"to read {repo_id}; pass a local model folder or .gguf file, or set HF_HUB_OFFLINE=1 to use the local cache")
    config = _read_config(repo_id, pretrained_model_name_or_path=repo_id, revision=revision)
    return Source(repo_id, "hub", repo_id, revision, config)


def _read_config(spec: str, **kwargs) -> PretrainedConfig:
    try:
        return AutoConfig.from_pretrained(**kwargs)
    except ConversionError:
        raise
    except Exception as err:  # noqa: BLE001
        raise ConversionError(f"could not read the model config of {spec}: {first_line(err)}") from err


def _looks_like_path(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or spec.count("/") > 1 or os.sep in spec and os.sep != "/"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _gguf_metadata(path: Path) -> dict:
    """Readable facts from the GGUF header (``general.*``): model name, organization, license."""
    from gguf import GGUFReader

    wanted = {"general.name": "gguf_name", "general.organization": "organization", "general.license": "license"}
    try:
        reader = GGUFReader(path)
        found = {key: reader.get_field(name) for name, key in wanted.items()}
        return {key: f.contents() for key, f in found.items() if f is not None}
    except Exception:  # noqa: BLE001 - metadata is informational; conversion reports real read errors
        logger.debug("could not read the GGUF metadata of %s", path)
        return {}

