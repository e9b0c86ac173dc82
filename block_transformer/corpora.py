"""General English corpora for the general uptraining recipe, from Debian packages (nothing installed).

Each corpus (:data:`GENERAL_CORPORA`) is downloaded as .deb files, unpacked and turned into a folder of
.txt documents in the cache (``bt-fetch-demo --general``): quotations, jokes and verse
(``fortunes``), technical prose (``gnu-standards``), a system administration manual
(``debian-reference``), dictionary glosses with example sentences (``wordnet``) and narrative prose: Jane
Austen's six novels (``austen``). Each folder also
holds the package's ``COPYRIGHT`` file and a ``SOURCE`` note (neither is read as data: only
.txt/.jsonl/.parquet files are).

Document files are named ``<section>-<part>.txt`` (section number first), so the sorted order the
data specs read interleaves the parts: the first tokens of a folder (an explicit eval set) and its
last tokens (a held-out tail) each span many parts instead of one.
"""

from __future__ import annotations

import gzip
import re
import shutil
import tempfile
import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

from .demo import cache_dir, extract_debs, require_dpkg
from .errors import BlockTransformerError
from .export import atomic_folder

DOCUMENT_CHARS = 4000  # documents are grouped up to about this size (fortunes, wordnet glosses)


def general_path(name: str) -> Path:
    return cache_dir() / "general" / name


@dataclass(frozen=True)
class GeneralCorpus:
    name: str
    packages: tuple[str, ...]
    licence: str  # as the package's /usr/share/doc/<package>/copyright states it
    what: str
    build: Callable[[Path], Iterator[tuple[str, str]]]  # extracted package root -> (document name, text)


def fortune_documents(root: Path) -> Iterator[tuple[str, str]]:
    """Every fortune file (but ``ascii-art``), its fortunes grouped into documents of ~DOCUMENT_CHARS."""
    folder = root / "usr/share/games/fortunes"
    for path in sorted(folder.iterdir()):
        if path.is_symlink() or not path.is_file() or path.suffix or path.name in FORTUNES_SKIPPED:
            continue
        groups = group_texts(split_fortunes(_read_text(path)), DOCUMENT_CHARS)
        yield from ((f"{i:03d}-{path.name}", text) for i, text in enumerate(groups))


FORTUNES_SKIPPED = {"ascii-art"}


def split_fortunes(text: str) -> list[str]:
    """The fortunes of a fortune file: entries separated by lines holding only ``%``."""
    entries = re.split(r"^%[ \t]*$", text.replace("\r\n", "\n"), flags=re.MULTILINE)
    return [entry.strip("\n") for entry in entries if entry.strip()]


def group_texts(texts: Iterable[str], max_chars: int, joiner: str = "\n\n") -> list[str]:
    """Consecutive texts joined into groups of at most ``max_chars`` (a longer text is a group of its own)."""
    groups: list[str] = []
    current: list[str] = []
    size = 0
    for text in texts:
        if current and size + len(joiner) + len(text) > max_chars:
            groups.append(joiner.join(current))
            current, size = [], 0
        size += len(text) + (len(joiner) if current else 0)
        current.append(text)
    if current:
        groups.append(joiner.join(current))
    return groups


def gnu_standards_documents(root: Path) -> Iterator[tuple[str, str]]:
    """The GNU Coding Standards and Information for GNU Maintainers (plain-text manuals), one document per section."""
    doc = root / "usr/share/doc/gnu-standards"
    for manual in ("maintain", "standards"):
        with gzip.open(doc / f"{manual}.text.gz", "rt", encoding="utf-8", errors="replace") as f:
            sections = split_text_manual(f.read())
        yield from ((f"{i:03d}-{manual}", text) for i, text in enumerate(sections))


_UNDERLINE = re.compile(r"^([*=\-.])\1{2,}$")
MANUAL_SKIPPED = re.compile(r"GNU Free Documentation License|ADDENDUM: How to use this License|^Index$")


def split_text_manual(text: str) -> list[str]:
    """Sections of a makeinfo plain-text manual: a heading is a line underlined with ``***``, ``===``,
    ``---`` or ``...`` of its length. The table of contents before the first heading, the licence
    appendix and the index are dropped."""
    lines = text.replace("\r\n", "\n").split("\n")
    heads = [i for i in range(len(lines) - 1)
             if lines[i].strip() and _UNDERLINE.match(lines[i + 1]) and len(lines[i + 1]) == len(lines[i].rstrip())]
    sections = []
    for start, end in zip(heads, heads[1:] + [len(lines)]):
        title = lines[start].strip()
        if MANUAL_SKIPPED.search(re.sub(r"^(Appendix [A-Z]|[0-9.]+) ", "", title)):
            continue
        body = "\n".join(lines[start + 2 : end]).strip("\n")
        if body.strip():
            sections.append(f"{title}\n\n{body}")
    return sections


def debian_reference_documents(root: Path) -> Iterator[tuple[str, str]]:
    """The Debian Reference (HTML chapters, preface and appendix), one document per section."""
    folder = root / "usr/share/debian-reference"
    for path in sorted(folder.glob("*.en.html")):
        if path.name.startswith("index."):
            continue  # the table of contents
        part = path.name.removesuffix(".en.html")
        sections = html_sections(path.read_text(encoding="utf-8", errors="replace"))
        yield from ((f"{i:03d}-{part}", text) for i, text in enumerate(sections))


class _HTMLText(HTMLParser):
    """Text of an HTML page, cut into sections at h1-h3; navigation, tables of contents, scripts dropped."""

    BLOCKS = {"p", "div", "br", "li", "dt", "dd", "table", "pre", "h1", "h2", "h3", "h4", "h5", "h6",
              "ul", "ol", "dl", "blockquote", "hr", "title"}
    SKIP_TAGS = {"script", "style", "head"}
    SKIP_CLASSES = {"navheader", "navfooter", "toc"}
    HEADINGS = {"h1", "h2", "h3"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.sections: list[list[str]] = [[]]
        self.skip_tag: str | None = None  # the open tag whose content is dropped (a tag inside it opens no other)
        self.open_divs = 0  # divs opened inside a skipped div
        self.pre = 0

    def handle_starttag(self, tag, attrs):
        if self.skip_tag:
            if tag == "div" and self.skip_tag == "div":
                self.open_divs += 1
            return
        classes = set((dict(attrs).get("class") or "").split())
        if tag in self.SKIP_TAGS or (tag == "div" and classes & self.SKIP_CLASSES):
            self.skip_tag = tag
            return
        if tag in self.HEADINGS:
            self.sections.append([])
        if tag == "pre":
            self.pre += 1
        if tag in self.BLOCKS:
            self.sections[-1].append("\n")
        elif tag in ("td", "th"):
            self.sections[-1].append("\t")

    def handle_endtag(self, tag):
        if self.skip_tag:
            if tag == "div" and self.skip_tag == "div" and self.open_divs:
                self.open_divs -= 1
            elif tag == self.skip_tag:
                self.skip_tag = None
            return
        if tag == "pre":
            self.pre = max(0, self.pre - 1)
        if tag in self.BLOCKS or tag == "tr":  # table rows: one line each
            self.sections[-1].append("\n")

    def handle_data(self, data):
        if self.skip_tag:
            return
        self.sections[-1].append(data if self.pre else re.sub(r"\s+", " ", data))


def html_sections(html: str) -> list[str]:
    """The text of each section of an HTML page (cut before every h1-h3 heading), whitespace tidied."""
    parser = _HTMLText()
    parser.feed(html)
    parser.close()
    sections = []
    for parts in parser.sections:
        lines = [re.sub(r" *\t *", "\t", line).strip() for line in "".join(parts).split("\n")]
        text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
        if text:
            sections.append(text)
    return sections


# lexicographer file numbers of WordNet 3.0 (lexnames(5WN))
WORDNET_LEXFILES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body noun.cognition "
    "noun.communication noun.event noun.feeling noun.food noun.group noun.location noun.motive noun.object noun.person "
    "noun.phenomenon noun.plant noun.possession noun.process noun.quantity noun.relation noun.shape noun.state "
    "noun.substance noun.time verb.body verb.change verb.cognition verb.communication verb.competition verb.consumption "
    "verb.contact verb.creation verb.emotion verb.motion verb.perception verb.possession verb.social verb.stative "
    "verb.weather adj.ppl"
).split()
_WORDNET_POS = {"n": "noun", "v": "verb", "a": "adjective", "s": "adjective", "r": "adverb"}


def wordnet_documents(root: Path) -> Iterator[tuple[str, str]]:
    """WordNet 3.0 synsets that have an example sentence, grouped by lexicographer file into documents."""
    groups: dict[str, list[str]] = {}
    for pos in ("noun", "verb", "adj", "adv"):
        path = root / "usr/share/wordnet" / f"data.{pos}"
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            entry = wordnet_gloss(line)
            if entry is not None and '"' in entry[1]:
                groups.setdefault(entry[0], []).append(entry[1])
    for lexfile, glosses in sorted(groups.items()):
        for i, text in enumerate(group_texts(glosses, DOCUMENT_CHARS, joiner="\n")):
            yield f"{i:03d}-{lexfile}", text


def wordnet_gloss(line: str) -> tuple[str, str] | None:
    """``(lexicographer file, "word, other word (noun): gloss; \\"example\\"")`` of one line of a WordNet
    data file; None for the licence header (lines that start with two spaces) and malformed lines."""
    if line.startswith("  ") or "|" not in line:
        return None
    fields, _, gloss = line.partition(" | ")
    parts = fields.split()
    try:
        lexfile, pos, count = int(parts[1]), parts[2], int(parts[3], 16)
    except (IndexError, ValueError):
        return None
    words = [re.sub(r"\([a-z]+\)$", "", w).replace("_", " ") for w in parts[4 : 4 + 2 * count : 2]]
    if not words or lexfile >= len(WORDNET_LEXFILES):
        return None
    return WORDNET_LEXFILES[lexfile], f"{', '.join(words)} ({_WORDNET_POS.get(pos, pos)}): {gloss.strip()}"


def austen_documents(root: Path) -> Iterator[tuple[str, str]]:
    """Jane Austen's six novels, one document per chapter, from the R package janeaustenr (each novel is a
    character vector of the Project Gutenberg text's lines in its data)."""
    novels = read_r_lazyload(root / "usr/lib/R/site-library/janeaustenr/data/Rdata")
    for novel, lines in sorted(novels.items()):
        chapters = split_novel([str(line) for line in lines])
        yield from ((f"{i:03d}-{novel}", text) for i, text in enumerate(chapters))


_CHAPTER = re.compile(r"^chapter\s+[0-9ivxlc]+\.?$", re.IGNORECASE)
_NOVEL_HEADING = re.compile(r"^(VOLUME [IVX]+|FINIS|Finis|THE END)$")


def split_novel(lines: list[str]) -> list[str]:
    """Chapters of a novel given as hard-wrapped lines: a chapter starts at a ``CHAPTER XII`` / ``Chapter 12``
    line (the title pages before the first are dropped, as are volume headings and end marks). Paragraphs are
    unwrapped into one line each, and ``_emphasis_`` marks dropped."""
    chapters: list[list[str]] = []
    paragraph: list[str] = []

    def end_paragraph() -> None:
        if paragraph and chapters:
            chapters[-1].append(re.sub(r"_([^_]+)_", r"\1", " ".join(paragraph)))
        paragraph.clear()

    for line in lines:
        text = line.strip()
        if _CHAPTER.match(text):
            end_paragraph()
            chapters.append([text])
        elif not text or _NOVEL_HEADING.match(text):
            end_paragraph()
        else:
            paragraph.append(text)
    end_paragraph()
    return ["\n\n".join(chapter) for chapter in chapters if len(chapter) > 1]


def read_r_lazyload(base: Path) -> dict[str, object]:
    """The objects of an R lazy-load database (``base.rdx``: a gzip'd serialized index of offsets;
    ``base.rdb``: each object serialized and zlib-compressed behind a 4-byte length), converted by rdata."""
    try:
        import rdata
    except ImportError as err:
        raise BlockTransformerError(
            "reading R package data (the austen corpus) needs the rdata package: "
            "pip install 'block-transformer[corpora]'") from err

    def parse(serialized: bytes):
        with warnings.catch_warnings():  # the bytes carry no .rds header: rdata says so, and reads them right
            warnings.simplefilter("ignore", UserWarning)
            return rdata.conversion.convert(rdata.parser.parse_data(serialized))

    index = parse(gzip.decompress(base.with_suffix(".rdx").read_bytes()))
    if index["compressed"].dtype != bool or not index["compressed"][0]:  # TRUE is zlib; 2 and 3 bzip2 and xz
        raise BlockTransformerError(f"{base}.rdb is not zlib-compressed: the package layout has changed.")
    data = base.with_suffix(".rdb").read_bytes()
    return {str(name): parse(zlib.decompress(data[int(offset) + 4 : int(offset) + int(length)]))
            for name, (offset, length) in index["variables"].items()}


GENERAL_CORPORA: dict[str, GeneralCorpus] = {c.name: c for c in (
    GeneralCorpus("fortunes", ("fortunes", "fortunes-min"), "BSD-3-Clause (fortune-mod; the files are collections of quotations)",
                  "quotations, jokes, verse and literature snippets (fortune(6) files, %-separated)", fortune_documents),
    GeneralCorpus("gnu-standards", ("gnu-standards",), "GFDL-1.3+ (no invariant sections)",
                  "the GNU Coding Standards and Information for GNU Maintainers: technical prose", gnu_standards_documents),
    GeneralCorpus("debian-reference", ("debian-reference-en",), "GPL-2+",
                  "the Debian Reference manual (HTML chapters as text): system administration prose", debian_reference_documents),
    GeneralCorpus("wordnet", ("wordnet-base",), "WordNet 3.0 licence (BSD-like, Princeton University)",
                  "WordNet 3.0 dictionary glosses with example sentences (synsets that have one)", wordnet_documents),
    GeneralCorpus("austen", ("r-cran-janeaustenr",), "MIT (the R package); the novels are in the public domain",
                  "Jane Austen's six novels (Project Gutenberg texts): narrative prose, one document per chapter",
                  austen_documents),
)}


def fetch_general(names: Iterable[str] | None = None) -> dict[str, Path]:
    """Each general corpus (all by default) as a folder of .txt documents in the cache; cached folders are kept."""
    names = list(names or GENERAL_CORPORA)
    unknown = [name for name in names if name not in GENERAL_CORPORA]
    if unknown:
        raise BlockTransformerError(f"no general corpus named {', '.join(unknown)}: choose from {', '.join(GENERAL_CORPORA)}.")
    paths = {}
    for name in names:
        corpus = GENERAL_CORPORA[name]
        target = general_path(name)
        if not target.is_dir():
            require_dpkg(f"the {name} corpus", target)
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp, atomic_folder(target) as out:
                root = extract_debs(list(corpus.packages), Path(tmp))
                write_documents(out, corpus.build(root))
                package = corpus.packages[0]
                shutil.copyfile(root / "usr/share/doc" / package / "copyright", out / "COPYRIGHT")
                (out / "SOURCE").write_text(
                    f"{corpus.what}\nfrom the Debian package(s) {', '.join(corpus.packages)}\nlicence: {corpus.licence} "
                    "(see COPYRIGHT, the package's copyright file)\n")
        paths[name] = target
    return paths


def write_documents(folder: Path, documents: Iterable[tuple[str, str]]) -> int:
    """Write each (name, text) as ``folder/name.txt``; returns how many were written."""
    count = 0
    for name, text in documents:
        (folder / f"{name}.txt").write_text(text.rstrip("\n") + "\n", encoding="utf-8")
        count += 1
    if not count:
        raise BlockTransformerError(f"no documents were extracted into {folder}: the package layout has changed.")
    return count


def corpus_facts(folder: Path) -> dict:
    """Documents and bytes of a corpus folder (its .txt files), and a rough token count (bytes / 4)."""
    files = sorted(folder.rglob("*.txt"))
    size = sum(p.stat().st_size for p in files)
    return {"documents": len(files), "bytes": size, "approx_tokens": size // 4}


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")
