"""Where text comes from: one data-spec string, parsed once, read the same way by every command.

A spec is either **local** or a **hub dataset**:

* local — a file, a folder or a glob (``data/*.jsonl``, ``corpus/**/*.txt``). Supported files:
  ``.txt`` (the whole file is one document), ``.jsonl`` (one JSON object per line, the document is
  its ``text`` field) and ``.parquet`` (one row per document, the ``text`` column). A folder means
  every supported file below it. Files are read in sorted relative-path order, so the concatenation
  (and anything cut from it, like a held-out tail) is the same on every machine.
* hub — ``name[:config][:split]`` (e.g. ``wikitext:wikitext-103-raw-v1:test``,
  ``HuggingFaceFW/fineweb-edu:sample-10BT``), read with the ``datasets`` library in streaming mode so
  that nothing is downloaded beyond what is used. The split defaults to ``train``.

A string that names an existing path, contains a glob character or starts with ``.``, ``/`` or ``~``
is local; anything else is a hub dataset. Evaluation and uptraining both take this format.

A local spec is checked when it is parsed, before any model is loaded: every ``.txt``/``.jsonl`` file
must be UTF-8 (the error names the file and the byte offset of the first bad byte) and the files
together must hold some text. The UTF-8 check reads each file once per process (again only if it
changes), so a corpus that is read whole anyway costs one more pass at disk speed.
"""

from __future__ import annotations

import codecs
import functools
import glob
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import BlockTransformerError, first_line

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")
DEFAULT_SPLIT = "train"
DEFAULT_TEXT_FIELD = "text"


class DataError(BlockTransformerError):
    """A data spec that cannot be read: missing files, wrong format, unreachable hub."""


@dataclass(frozen=True)
class DataSpec:
    """A parsed data spec. Local specs resolve to files at parse time, so a typo fails at once."""

    spec: str  # what the user typed
    kind: str  # "local" | "hub"
    files: tuple[Path, ...] = ()  # local: in reading order
    root: Path | None = None  # local: document names are paths relative to it
    name: str | None = None  # hub: dataset name
    config: str | None = None  # hub: dataset config
    split: str = DEFAULT_SPLIT  # hub: split
    text_field: str = DEFAULT_TEXT_FIELD

    @classmethod
    def parse(cls, spec: str, text_field: str = DEFAULT_TEXT_FIELD) -> DataSpec:
        """Classify and resolve ``spec`` (a local one is also checked, see the module docstring);
        raises :class:`DataError` with what to do when it cannot be used."""
        if not spec or not spec.strip():
            raise DataError("empty data spec: pass a file, folder, glob or hub dataset name[:config][:split].")
        if is_local(spec):
            root, files = _local_files(spec)
            parsed = cls(spec=spec, kind="local", files=tuple(files), root=root, text_field=text_field)
            parsed._check_local_text()
            return parsed
        parts = spec.split(":")
        if len(parts) > 3 or not all(parts):
            raise DataError(f"bad hub dataset spec {spec!r}: use name[:config][:split], e.g. wikitext:wikitext-2-raw-v1:test.")
        name, config, split = (parts + [None, None])[:3]
        return cls(spec=spec, kind="hub", name=name, config=config, split=split or DEFAULT_SPLIT, text_field=text_field)

    def describe(self) -> dict:
        """JSON-friendly facts for reports."""
        if self.kind == "local":
            return {"spec": self.spec, "kind": "local", "root": str(self.root), "num_files": len(self.files)}
        return {"spec": self.spec, "kind": "hub", "name": self.name, "config": self.config, "split": self.split}

    def check_available(self) -> None:
        """Fail now, in seconds, if the documents cannot be read (before any expensive work).

        Local files were resolved and checked at parse time; a hub dataset needs the ``datasets``
        library, online mode and a reachable hub.
        """
        if self.kind == "hub":
            _check_hub_available(self)

    def _check_local_text(self) -> None:
        """UTF-8 throughout, and at least one document that is not empty: otherwise the first read of the
        data, after a model is loaded or converted, would fail with a traceback."""
        for path in self.files:
            if path.suffix in (".txt", ".jsonl"):
                stat = path.stat()
                _check_utf8(path, stat.st_size, stat.st_mtime_ns)
        if next(self.documents(), None) is None:
            where = str(self.files[0]) if len(self.files) == 1 else f"{self.spec} ({len(self.files)} files)"
            raise DataError(f"{where} holds no text: every document is empty. Point the data at files with text.")

    def documents(self) -> Iterator[tuple[str, str]]:
        """(name, text) of every document, in a fixed order; empty documents are skipped."""
        if self.kind == "local":
            for path in self.files:
                yield from _read_file(path, _relative_name(path, self.root), self.text_field)
        else:
            yield from _read_hub(self)

    def first_documents(self, tokenizer, tokens: int) -> dict[str, str]:
        """Documents from the first until they hold at least ``tokens`` tokens: a hub split can be any size.

        Each document counts one more token, for the separator it is joined to the next with.
        """
        documents: dict[str, str] = {}
        count = 0
        for name, text in self.documents():
            documents[name] = text
            count += len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1
            if count >= tokens:
                break
        if not documents:
            raise DataError(f"{self.spec} holds no text.")
        return documents


def is_local(spec: str) -> bool:
    """Whether ``spec`` names local data (see the module docstring); anything else is a hub dataset."""
    return Path(spec).expanduser().exists() or glob.has_magic(spec) or spec.startswith((".", "/", "~"))


def _fetch_hint(path: Path) -> str:
    """What fetches a missing demo asset (a cache fetched before a recipe gained a corpus lacks it)."""
    from .demo import cache_dir

    try:
        folder = path.absolute().relative_to(cache_dir().expanduser().absolute()).parts[0]
    except (ValueError, IndexError):
        return ""
    return {"general": ": `bt-fetch-demo --general` fetches the general corpora (those cached are kept)",
            "demo": ": `bt-fetch-demo` fetches the demo model and corpus"}.get(folder, "")


def _local_files(spec: str) -> tuple[Path, list[Path]]:
    path = Path(spec).expanduser()
    if glob.has_magic(spec):
        root = Path(*_static_prefix(path.parts))
        files = [Path(p) for p in glob.glob(str(path), recursive=True)]
    elif path.is_dir():
        root = path
        files = [p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES]
    elif path.is_file():
        root = path.parent
        files = [path]
    else:
        raise DataError(f"no such file or folder: {spec}{_fetch_hint(path)}")
    # sorted by path components, as pathlib sorts: "a/b" before "a-b/c"
    files = sorted((p for p in files if p.is_file()), key=lambda p: Path(_relative_name(p, root)).parts)
    unsupported = sorted({p.suffix or p.name for p in files if p.suffix not in TEXT_SUFFIXES})
    if unsupported:
        raise DataError(f"{spec} matches files of unsupported type {unsupported}: use {', '.join(TEXT_SUFFIXES)} files.")
    if not files:
        raise DataError(f"{spec} matches no {'/'.join(TEXT_SUFFIXES)} files: point to a file, folder or glob of text.")
    return root, files


def _static_prefix(parts: tuple[str, ...]) -> list[str]:
    """The folders of a glob before its first wildcard: document names are relative to them."""
    prefix = []
    for part in parts[:-1]:
        if glob.has_magic(part):
            break
        prefix.append(part)
    return prefix or ["."]


def _relative_name(path: Path, root: Path) -> str:
    return Path(os.path.relpath(path, root)).as_posix()


@functools.lru_cache(maxsize=None)
def _check_utf8(path: Path, size: int, mtime_ns: int) -> None:
    """Raise :class:`DataError` at the first byte of ``path`` that is not UTF-8. Read in chunks, so a large
    file never sits in memory; ``size`` and ``mtime_ns`` key the cache, so a changed file is read again."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, newlines = 0, 0  # bytes and line ends before the current chunk
    with path.open("rb") as f:
        while True:
            chunk = f.read(1 << 20)
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as err:  # err.object: the bytes held back from the last chunk, then this one
                at = offset - (len(err.object) - len(chunk)) + err.start
                line = newlines + err.object[: err.start].count(b"\n") + 1
                raise DataError(
                    f"{path} is not UTF-8 text: byte {at:,} (line {line:,}) is invalid ({err.reason}). "
                    "Re-encode the file as UTF-8 (e.g. iconv -f LATIN1 -t UTF-8) or leave it out of the data."
                ) from None
            if not chunk:
                return
            offset += len(chunk)
            newlines += chunk.count(b"\n")


def _read_file(path: Path, name: str, text_field: str) -> Iterator[tuple[str, str]]:
    if path.suffix == ".txt":
        text = path.read_text(encoding="utf-8")
        if text:
            yield name, text
    elif path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)[text_field]
                except (json.JSONDecodeError, KeyError, TypeError) as err:
                    raise DataError(
                        f"{path}:{lineno} is not a JSON object with a {text_field!r} field ({type(err).__name__}): "
                        "fix the line or pass the right --text-field."
                    ) from err
                if text:
                    yield f"{name}:{lineno}", str(text)
    else:
        yield from _read_parquet(path, name, text_field)


def _read_parquet(path: Path, name: str, text_field: str) -> Iterator[tuple[str, str]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise DataError("reading .parquet needs pyarrow: pip install 'block-transformer[data]'.") from err
    parquet = pq.ParquetFile(path)
    if text_field not in parquet.schema_arrow.names:
        raise DataError(f"{path} has no {text_field!r} column (columns: {parquet.schema_arrow.names}): pass --text-field.")
    row = 0
    for batch in parquet.iter_batches(columns=[text_field]):
        for text in batch.column(0).to_pylist():
            if text:
                yield f"{name}:{row}", str(text)
            row += 1


def _check_hub_available(spec: DataSpec) -> None:
    from .hub import HubError, probe_hub

    if any(os.environ.get(v, "0").lower() in {"1", "true", "yes", "on"} for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        raise DataError(
            f"{spec.spec} is a hub dataset but HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set: "
            "use a local file, folder or glob (txt/jsonl/parquet) instead."
        )
    try:
        import datasets  # noqa: F401 - only checking that it is installed
    except ImportError as err:
        raise DataError("hub datasets need the datasets library: pip install 'block-transformer[data]'.") from err
    try:
        probe_hub(f"to read the dataset {spec.spec}: use a local file, folder or glob (txt/jsonl/parquet) instead")
    except HubError as err:
        raise DataError(str(err)) from err


def _read_hub(spec: DataSpec) -> Iterator[tuple[str, str]]:
    """Stream a hub dataset split; fail in seconds when the hub cannot be reached."""
    import datasets

    _check_hub_available(spec)
    try:
        stream = datasets.load_dataset(spec.name, spec.config, split=spec.split, streaming=True)
    except Exception as err:
        raise DataError(f"could not open the hub dataset {spec.spec}: {first_line(err)}") from err
    for row, example in enumerate(stream):
        if spec.text_field not in example:
            raise DataError(f"{spec.spec} has no {spec.text_field!r} field (fields: {list(example)}): pass --text-field.")
        text = example[spec.text_field]
        if text:
            yield f"{spec.split}:{row}", str(text)

