"""The general uptraining recipe (issue 11, item 1): general English corpora from Debian packages (text
extraction tested on inline samples: nothing is downloaded), training mixtures with weights, several named
held-out sets, and the figures every set gets in the metrics and the summary."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from block_transformer import corpora, demo
from block_transformer.cli import fetch_demo_cmd
from block_transformer.uptrain import checkpoint, load_recipe, loop
from block_transformer.uptrain.command import uptrain_cmd
from block_transformer.uptrain.data import load_local, mixture_draw, mixture_quotas
from block_transformer.uptrain.recipe import MIXTURE_CHUNK, RecipeError
from conftest import TINY_RECIPE, assert_one_line_error, learnable_corpus, tiny_recipe, tiny_tokenizer

REPO = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------------------------------
# Text extraction (inline samples)
# ----------------------------------------------------------------------------------------------------


def test_fortunes_are_split_at_percent_lines_and_grouped():
    text = "A banker lends you his umbrella.\n\t\t-- Mark Twain\n%\nA horse!  A horse!\n%\n\n%\nLast one.\n"
    assert corpora.split_fortunes(text) == ["A banker lends you his umbrella.\n\t\t-- Mark Twain", "A horse!  A horse!",
                                         "Last one."]
    assert corpora.group_texts(["aaaa", "bbbb", "cc", "d" * 20], max_chars=10) == ["aaaa\n\nbbbb", "cc", "d" * 20]
    assert corpora.group_texts([], 10) == []


def test_fortune_documents_skip_index_files_links_and_ascii_art(tmp_path):
    folder = tmp_path / "usr/share/games/fortunes"
    folder.mkdir(parents=True)
    (folder / "love").write_text("one\n%\ntwo\n")
    (folder / "love.dat").write_bytes(b"\x00\x02binary")
    (folder / "love.u8").symlink_to("love")
    (folder / "ascii-art").write_text("  /\\_/\\\n%\n")
    (folder / "zen").write_text("x" * (corpora.DOCUMENT_CHARS - 5) + "\n%\nsecond\n")
    docs = dict(corpora.fortune_documents(tmp_path))
    assert docs == {"000-love": "one\n\ntwo", "000-zen": "x" * (corpora.DOCUMENT_CHARS - 5), "001-zen": "second"}
    # section number first: sorted names interleave the files, so a folder's first and last tokens span many
    assert sorted(docs) == ["000-love", "000-zen", "001-zen"]


MANUAL = """\
GNU Coding Standards
1 About
2 Keeping Free Software Free

GNU Coding Standards
********************

Version line.

1 About the GNU Coding Standards
********************************

The GNU Coding Standards were written by Richard Stallman.

1.1 Trademarks
==============

Please do not include any trademark acknowledgments.
--------
Appendix A GNU Free Documentation License
*****************************************

Licence text.

Index
*****

* Menu:
"""


def test_text_manual_sections_drop_the_contents_the_licence_and_the_index():
    sections = corpora.split_text_manual(MANUAL)
    assert sections == [
        "GNU Coding Standards\n\nVersion line.",
        "1 About the GNU Coding Standards\n\nThe GNU Coding Standards were written by Richard Stallman.",
        "1.1 Trademarks\n\nPlease do not include any trademark acknowledgments.\n--------",
    ]


HTML = """<?xml version="1.0"?><html><head><title>Chapter 3</title><style>p {}</style></head><body>
<div class="navheader"><table><tr><th>Chapter 3. Nav</th></tr></table><div>inner</div><hr/></div>
<div class="chapter"><h1 class="title"><a id="x"/>Chapter 3. The system</h1>
<div class="toc"><p><strong>Table of Contents</strong></p><dl><dt>3.1. Overview</dt></dl></div>
<p>It is wise   for you
to know &amp; understand.</p>
<h2 class="title">3.1. Overview</h2><p>The boot loader.</p>
<table><tr><th>package</th><th>size</th></tr><tr><td>grub-pc</td><td>534</td></tr></table>
<pre class="screen">$ ls -l
  two  spaces</pre>
</div><div class="navfooter"><p>Prev</p></div></body></html>"""


def test_html_is_text_per_section_without_navigation_or_contents():
    sections = corpora.html_sections(HTML)
    assert sections == [
        "Chapter 3. The system\n\nIt is wise for you to know & understand.",
        "3.1. Overview\n\nThe boot loader.\n\npackage\tsize\ngrub-pc\t534\n\n$ ls -l\ntwo  spaces",
    ]


WORDNET = [
    "  1 This software and database is being provided to you, the LICENSEE, by  ",
    "02084071 05 n 03 dog 0 domestic_dog 0 Canis_familiaris 0 023 @ 02083346 n 0000 | a member of the genus Canis; "
    '"the dog barked all night"  ',
    "00021110 00 s 02 complaisant 0 obliging(a) 0 003 & 00020787 a 0000 | showing a cheerful willingness  ",
    "garbage without a gloss",
]


def test_wordnet_glosses_name_words_part_of_speech_and_lexicographer_file():
    parsed = [corpora.wordnet_gloss(line) for line in WORDNET]
    assert parsed[0] is None and parsed[3] is None
    assert parsed[1] == ("noun.animal", 'dog, domestic dog, Canis familiaris (noun): a member of the genus Canis; '
                                        '"the dog barked all night"')
    assert parsed[2] == ("adj.all", "complaisant, obliging (adjective): showing a cheerful willingness")


def test_wordnet_documents_keep_synsets_with_an_example(tmp_path):
    folder = tmp_path / "usr/share/wordnet"
    folder.mkdir(parents=True)
    (folder / "data.noun").write_text("\n".join(WORDNET[:2]) + "\n")
    (folder / "data.adj").write_text(WORDNET[2] + "\n")  # no example sentence: left out
    for pos in ("verb", "adv"):
        (folder / f"data.{pos}").write_text(WORDNET[0] + "\n")
    assert dict(corpora.wordnet_documents(tmp_path)) == {"000-noun.animal": corpora.wordnet_gloss(WORDNET[1])[1]}


NOVEL = [
    "PRIDE AND PREJUDICE", "", "By Jane Austen", "", "VOLUME I", "", "Chapter 1", "",
    "It is a truth universally acknowledged, that a single man in possession",
    "of a good fortune, must be in want of a _wife_.", "", "\"My dear,\" said his lady.", "",
    "VOLUME II", "", "CHAPTER II.", "", "Mr. Bennet was among the earliest", "of those who waited on him.",
    "", "", "THE END",
]


def test_a_novel_is_cut_into_chapters_of_unwrapped_paragraphs():
    """Title pages, volume headings and end marks are dropped; wrapped lines become one line per paragraph."""
    assert corpora.split_novel(NOVEL) == [
        "Chapter 1\n\nIt is a truth universally acknowledged, that a single man in possession of a good fortune, "
        "must be in want of a wife.\n\n\"My dear,\" said his lady.",
        "CHAPTER II.\n\nMr. Bennet was among the earliest of those who waited on him.",
    ]
    assert corpora.split_novel(["A TITLE", "", "no chapter heading at all"]) == []


def _r_lazyload(folder: Path, objects: dict, compressed=True) -> None:
    """Write ``objects`` as R's lazy-load database ``folder/Rdata.rdb`` + ``.rdx``, as R's packages ship data."""
    import gzip
    import struct
    import zlib

    import numpy as np

    rdata = pytest.importorskip("rdata", reason="install the corpora extra: pip install -e '.[corpora]'")
    folder.mkdir(parents=True)
    blob, offsets = b"", {}
    for name, value in objects.items():
        rdata.write_rds(folder / "one.rds", value, compression=None)
        serialized = (folder / "one.rds").read_bytes()
        entry = struct.pack(">I", len(serialized)) + zlib.compress(serialized)
        offsets[name] = np.array([len(blob), len(entry)], dtype=np.int32)
        blob += entry
    (folder / "one.rds").unlink()
    (folder / "Rdata.rdb").write_bytes(blob)
    rdata.write_rds(folder / "Rdata.rdx", {"variables": offsets, "references": {}, "compressed": compressed},
                    compression="gzip")
    assert gzip.decompress((folder / "Rdata.rdx").read_bytes())[:2] == b"X\n"


def test_austen_documents_read_each_novel_from_the_r_package_data(tmp_path):
    import numpy as np

    folder = tmp_path / "usr/lib/R/site-library/janeaustenr/data"
    _r_lazyload(folder, {"prideprejudice": np.array(NOVEL), "emma": np.array(["EMMA", "", "CHAPTER I", "", "Emma",
                                                                                "Woodhouse, handsome."])})
    documents = dict(corpora.austen_documents(tmp_path))
    assert documents == {"000-emma": "CHAPTER I\n\nEmma Woodhouse, handsome.",
                         "000-prideprejudice": corpora.split_novel(NOVEL)[0],
                         "001-prideprejudice": corpora.split_novel(NOVEL)[1]}


def test_r_package_data_compressed_other_than_with_zlib_is_refused(tmp_path, monkeypatch):
    import numpy as np

    _r_lazyload(tmp_path / "data", {"emma": np.array(["CHAPTER I", "", "Emma"])}, compressed=3)  # xz
    with pytest.raises(corpora.BlockTransformerError, match="not zlib-compressed"):
        corpora.read_r_lazyload(tmp_path / "data" / "Rdata")
    monkeypatch.setitem(sys.modules, "rdata", None)  # not installed
    with pytest.raises(corpora.BlockTransformerError, match=r"block-transformer\[corpora\]"):
        corpora.read_r_lazyload(tmp_path / "data" / "Rdata")


def test_a_package_that_yields_nothing_is_an_error(tmp_path):
    with pytest.raises(corpora.BlockTransformerError, match="no documents"):
        corpora.write_documents(tmp_path, iter(()))


def test_fetch_demo_general_prints_paths_sizes_and_licences_from_the_cache(tmp_path, monkeypatch):
    """Cached corpora are used as they are (nothing is downloaded); each line names path, size and licence."""
    monkeypatch.setenv("BLOCK_TRANSFORMER_CACHE", str(tmp_path))
    for name in corpora.GENERAL_CORPORA:
        corpora.write_documents(_mkdir(corpora.general_path(name)),
                             [("000-a", "x" * 400), ("001-a", "y" * 400)])
    monkeypatch.setattr(demo, "fetch_smollm2", lambda: tmp_path / "model.gguf")
    monkeypatch.setattr(demo, "fetch_pydocs", lambda: tmp_path / "python-docs")
    monkeypatch.setattr(corpora, "extract_debs", lambda *a: pytest.fail("a cached corpus was downloaded again"))
    result = CliRunner().invoke(fetch_demo_cmd, ["--general"])
    assert result.exit_code == 0, result.output
    for name, corpus in corpora.GENERAL_CORPORA.items():
        line = next(line for line in result.output.splitlines() if line.startswith(f"{name}:"))
        assert str(tmp_path / "general" / name) in line and "2 documents" in line and corpus.licence in line
    plain = CliRunner().invoke(fetch_demo_cmd, [])
    assert plain.exit_code == 0 and "licence" not in plain.output


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


# ----------------------------------------------------------------------------------------------------
# Recipe format
# ----------------------------------------------------------------------------------------------------


def mixture_recipe(tmp_path: Path, weights=(3, 1), **overrides):
    """The tiny recipe on a mixture of two corpora (lowercase / uppercase walks) plus one extra eval set."""
    lower = learnable_corpus(tmp_path / "lower", docs=16, length=200, seed=0)
    upper = tmp_path / "upper"
    if not upper.exists():
        learnable_corpus(upper, docs=16, length=200, seed=1)
        for path in upper.iterdir():
            path.write_text(path.read_text().upper())
    dev = tmp_path / "dev"
    if not dev.exists():
        dev.mkdir()
        (dev / "d.txt").write_text("the quick brown fox jumps over the lazy dog " * 20)
    train = (f"[{{name: lower, path: {lower}, weight: {weights[0]}}}, "
             f"{{name: upper, path: {upper}, weight: {weights[1]}, heldout_tokens: 256}}]")
    sets = {"data.train": train, "eval.sets": f"[{{name: dev, data: {dev}}}]", **overrides}
    return tiny_recipe(tmp_path, **sets)


def test_single_corpus_recipes_keep_one_held_out_set(tmp_path):
    recipe = tiny_recipe(tmp_path)
    assert recipe.eval_set_names == ["held-out"] and recipe.primary_eval_set == "held-out"
    assert not recipe.data.mixture and recipe.data.train_specs == [str(tmp_path / "corpus")]


def test_mixture_recipe_names_each_tail_and_eval_set(tmp_path):
    recipe = mixture_recipe(tmp_path)
    assert recipe.data.mixture and [c.name for c in recipe.data.components] == ["lower", "upper"]
    assert recipe.eval_set_names == ["lower", "upper", "dev"] and recipe.primary_eval_set == "lower"
    assert mixture_recipe(tmp_path, **{"eval.primary": "dev"}).primary_eval_set == "dev"


@pytest.mark.parametrize(("overrides", "fragment"), [
    ({"data.train": "[{name: a, path: x, wieght: 2}]"}, "unknown key data.train.0.wieght (did you mean data.train.0.weight?)"),
    ({"data.train": "[{name: a, path: x, weight: 0}]"}, "data.train.0.weight: Input should be greater than 0"),
    ({"data.train": "[{name: a, path: x, weight: -1}]"}, "data.train.0.weight"),
    ({"data.train": "[{name: a, path: x, weight: .inf}]"}, "data.train.0.weight"),
    ({"data.train": "[{name: a, path: x}, {name: a, path: y}]"}, "the name 'a' is used twice"),
    ({"data.train": "[{name: a, path: x}]", "eval.sets": "[{name: a, data: y}]"}, "the name 'a' is used twice"),
    ({"eval.sets": "[{name: d, data: y}, {name: d, data: z}]"}, "eval.sets: the name 'd' is used twice"),
    ({"eval.sets": "[{name: d, dta: y}]"}, "unknown key eval.sets.0.dta (did you mean eval.sets.0.data?)"),
    ({"data.train": "[{name: 'a b', path: x}]"}, "data.train.0.name"),
    ({"data.train": "[]"}, "list at least one component"),
    ({"data.train": "[{path: x}]"}, "missing required key data.train.0.name"),
    ({"data.train": "[{name: a, path: x, weight: 1000}, {name: b, path: y}]"},
     "every chunk of 256 sequences draws each component at least once, so it would be drawn 4x as often"),
    ({"data.train": "[{name: a, path: x}]", "data.eval": "y", "data.heldout_tokens": "null"}, "data.eval is for a single"),
    ({"data.train": "[{name: a, path: x}]", "data.streaming": "true"}, "a mixture is read whole"),
    ({"eval.primary": "nothing"}, "eval.primary 'nothing' is not a held-out set"),
    ({"data.train": "3"}, "data.train: Input should be a valid string"),
    # held-out sizes below one eval window (eval.seq_len 32): refused at load, not by a traceback after conversion
    ({"eval.sets": "[{name: d, data: y, max_tokens: 16}]"}, "eval.sets.0.max_tokens 16 is less than one eval window of 32"),
    ({"eval.max_tokens": 16}, "eval.max_tokens 16 is less than one eval window of 32 tokens"),
    ({"data.heldout_tokens": 16, "data.train": "x"}, "raise data.heldout_tokens to at least 32, or lower eval.seq_len"),
    ({"data.train": "[{name: a, path: x}, {name: b, path: y, heldout_tokens: 8}]", "data.heldout_tokens": 64},
     "data.train.1.heldout_tokens 8 is less than one eval window of 32"),
    ({"eval.seq_len": "null", "data.seq_len": 1024}, "eval.max_tokens 256 is less than one eval window of 1024"),
])
def test_bad_mixtures_and_eval_sets_are_one_line_naming_the_key(tmp_path, overrides, fragment):
    with pytest.raises(RecipeError) as err:
        load_recipe(TINY_RECIPE, [f"{k}={v}" for k, v in overrides.items()])
    assert fragment in str(err.value) and "\n" not in str(err.value)
    result = CliRunner().invoke(uptrain_cmd, [str(TINY_RECIPE), *(f"--set={k}={v}" for k, v in overrides.items()),
                                              "--dry-run"])
    assert_one_line_error(result, fragment)


def no_model_work(monkeypatch) -> None:
    """Loading, converting or scoring a model fails the test loudly: what is checked must fail before it."""
    from block_transformer.convert import convert as convert_module

    def fail(*args, **kwargs):
        pytest.fail("model work started before the recipe's error was found")

    for target, name in [(loop, "load_model"), (loop, "load_teacher"), (loop, "score"), (convert_module, "convert")]:
        monkeypatch.setattr(target, name, fail)


def uptrain_args(tmp_path: Path, recipe, *sets: str) -> list[str]:
    return [str(TINY_RECIPE), f"--set=model.source={recipe.model.source}", f"--set=data.train={tmp_path / 'corpus'}",
            f"--set=output.dir={tmp_path / 'out'}", *(f"--set={s}" for s in sets)]


def test_a_missing_component_or_eval_set_file_fails_before_any_model_work(tmp_path, monkeypatch):
    recipe = mixture_recipe(tmp_path)
    no_model_work(monkeypatch)
    for key, value in [("data.train", f"[{{name: a, path: {tmp_path / 'corpus'}}}, {{name: b, path: {tmp_path / 'nope'}}}]"),
                       ("eval.sets", f"[{{name: d, data: {tmp_path / 'nope'}}}]")]:
        for dry_run in ([], ["--dry-run"]):
            result = CliRunner().invoke(uptrain_cmd, [*uptrain_args(tmp_path, recipe, f"{key}={value}"), *dry_run])
            assert_one_line_error(result, "nope")


def test_a_missing_cached_corpus_names_the_command_that_fetches_it(tmp_path, monkeypatch):
    """A cache fetched before the general recipe gained a corpus lacks it: the error says how to fetch it."""
    monkeypatch.setenv("BLOCK_TRANSFORMER_CACHE", str(tmp_path / "cache"))
    recipe = mixture_recipe(tmp_path)
    no_model_work(monkeypatch)
    train = f"[{{name: austen, path: {tmp_path / 'cache' / 'general' / 'austen'}}}]"
    result = CliRunner().invoke(uptrain_cmd, uptrain_args(tmp_path, recipe, f"data.train={train}"))
    assert_one_line_error(result, "`bt-fetch-demo --general` fetches the general corpora")
    result = CliRunner().invoke(uptrain_cmd, uptrain_args(tmp_path, recipe, f"eval.sets=[{{name: d, data: {tmp_path / 'nope'}}}]"))
    assert_one_line_error(result, "nope")
    assert "bt-fetch-demo" not in result.output  # outside the cache: no hint


def test_a_hub_dataset_as_a_mixture_component_is_refused_before_any_model_work(tmp_path, monkeypatch):
    """Regression: a hub component was read whole into memory, without the hub check, after conversion."""
    recipe = mixture_recipe(tmp_path)
    no_model_work(monkeypatch)
    train = f"[{{name: a, path: {tmp_path / 'corpus'}}}, {{name: web, path: someorg/corpus:cfg}}]"
    for dry_run in ([], ["--dry-run"]):
        result = CliRunner().invoke(uptrain_cmd, [*uptrain_args(tmp_path, recipe, f"data.train={train}"), *dry_run])
        assert_one_line_error(result, "data.train web: someorg/corpus:cfg is a hub dataset",
                              "a mixture component must be a local file/folder/glob",
                              "stream it as the single data.train")


@pytest.mark.parametrize(("sets", "fragments"), [
    # a small eval folder: 8 tokens
    (["eval.sets=[{name: tiny, data: TINY}]"], ["held-out set tiny holds 8 tokens, less than one eval window of 32",
                                                 "point eval.sets.0.data at more text", "or lower eval.seq_len"]),
    # a tail that is a fraction of a small corpus: ceil(4823 * 0.001) = 5 tokens
    (["data.heldout_tokens=null", "data.heldout_fraction=0.001"], ["held-out set held-out holds 5 tokens",
                                                                   "raise data.heldout_fraction"]),
    # data.eval that holds less than one window
    (["data.heldout_tokens=null", "data.eval=TINY"], ["held-out set held-out holds 8 tokens",
                                                      "point data.eval at more text"]),
])
def test_a_held_out_set_shorter_than_the_eval_window_fails_before_any_model_work(tmp_path, monkeypatch, sets, fragments):
    """Regression: ``score`` raised a bare ValueError (a traceback) after the conversion, at the step-0 evaluation."""
    recipe = mixture_recipe(tmp_path)
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    (tiny / "t.txt").write_text("abcdefgh")  # 8 tokens
    no_model_work(monkeypatch)
    result = CliRunner().invoke(uptrain_cmd, uptrain_args(tmp_path, recipe, *(s.replace("TINY", str(tiny)) for s in sets)))
    assert_one_line_error(result, *fragments)


def test_the_held_out_tail_length_has_one_rule_for_a_corpus_and_each_component(tmp_path):
    from block_transformer.uptrain.data import heldout_length

    single = tiny_recipe(tmp_path, **{"data.heldout_tokens": None, "data.heldout_fraction": 0.1}).data
    assert heldout_length(single, 0, 1000) == (100, "data.heldout_fraction")
    mixture = mixture_recipe(tmp_path).data  # upper sets its own tail, lower takes data.heldout_tokens
    assert heldout_length(mixture, 0, 10_000) == (512, "data.heldout_tokens")
    assert heldout_length(mixture, 1, 10_000) == (256, "data.train.1.heldout_tokens")


def test_the_general_recipe_validates():
    recipe = load_recipe(REPO / "recipes" / "smollm2-general.yaml")
    assert [c.name for c in recipe.data.components] == ["python-docs", "gnu-standards", "debian-reference", "wordnet",
                                                       "austen"]
    assert "fortunes" in recipe.eval_set_names and "fortunes" not in [c.name for c in recipe.data.components]
    assert recipe.primary_eval_set == "fortunes" and recipe.model.split == "15/15" and recipe.model.block_len == 4
    assert recipe.total_steps * recipe.train.batch_size * recipe.data.seq_len >= 300_000


# ----------------------------------------------------------------------------------------------------
# Mixture sampling
# ----------------------------------------------------------------------------------------------------


def test_mixture_quotas_follow_the_weights_and_fill_the_chunk():
    assert mixture_quotas((3.0, 1.0)) == [192, 64]
    quotas = mixture_quotas((0.25, 0.15, 0.25, 0.35))
    assert sum(quotas) == MIXTURE_CHUNK and quotas == [64, 38, 64, 90]
    assert mixture_quotas((1.0, 1.0, 1.0)) == [86, 85, 85]
    assert min(mixture_quotas((500.0, 1.0))) == 1  # a small share is drawn at least once per chunk


def test_mixture_draws_follow_the_weights_and_the_seed():
    weights = (0.5, 0.3, 0.2)
    draws = [mixture_draw(weights, i, seed=0) for i in range(4 * MIXTURE_CHUNK)]
    counts = Counter(k for k, _ in draws)
    assert [counts[k] for k in range(3)] == [4 * q for q in mixture_quotas(weights)]
    for k in range(3):  # each component's draws are numbered 0, 1, 2, ... in stream order
        assert [j for c, j in draws if c == k] == list(range(counts[k]))
    assert draws == [mixture_draw(weights, i, seed=0) for i in range(4 * MIXTURE_CHUNK)]
    assert draws != [mixture_draw(weights, i, seed=1) for i in range(4 * MIXTURE_CHUNK)]
    first = [k for k, _ in draws[:MIXTURE_CHUNK]]
    assert first != sorted(first)  # shuffled within the chunk, not one component after the other


def test_each_component_keeps_its_pass_order_however_many_components(monkeypatch):
    """Regression: a 32-entry FIFO cache of orders re-drew a permutation at nearly every pick with more than 32
    components. Now each component's order is drawn once per pass over it."""
    from block_transformer.uptrain.data import Batch, Component, LocalData

    n, per = 40, 3  # 40 components of 3 sequences: every chunk passes over each about twice
    ids = torch.arange(n * per).view(n * per, 1)
    data = LocalData(Batch(ids, ids), train_tokens=n * per, heldout=[],
                     components=[Component(str(k), 1 / n, k * per, per, per) for k in range(n)])
    real, drawn = torch.randperm, []

    def counting(size, *args, **kwargs):
        if size == per:
            drawn.append(size)
        return real(size, *args, **kwargs)

    monkeypatch.setattr(torch, "randperm", counting)
    picks = [data.sequence_index(i, seed=0) for i in range(MIXTURE_CHUNK)]
    passes = {(k, j // per) for k, j in (mixture_draw(tuple(c.weight for c in data.components), i, 0)
                                         for i in range(MIXTURE_CHUNK))}
    assert len(drawn) == len(passes)
    for k in range(n):  # and a pass reads each of the component's sequences once
        own = [p for p in picks if k * per <= p < (k + 1) * per]
        assert sorted(own[:per]) == list(range(k * per, (k + 1) * per))


def test_mixture_batches_respect_weights_tails_and_seed(tmp_path):
    recipe = mixture_recipe(tmp_path)
    data = load_local(recipe.data, tiny_tokenizer(), 0, 4, 256)
    assert [c.name for c in data.components] == ["lower", "upper"] and [h.name for h in data.heldout] == ["lower", "upper"]
    assert data.heldout[0].ids.numel() == 512 and data.heldout[1].ids.numel() == 256  # data.heldout_tokens; its own
    steps = 2 * MIXTURE_CHUNK // 4
    batches = [data.batch_for_step(s, 4, seed=0) for s in range(steps)]
    rows = torch.cat([b.input_ids for b in batches])
    upper = (rows >= 1 + ord("A") - 32) & (rows <= 1 + ord("Z") - 32)
    per_row_upper = upper.any(dim=1)
    assert int(per_row_upper[:MIXTURE_CHUNK].sum()) == MIXTURE_CHUNK // 4  # weight 1 of 4, exactly, per chunk
    assert int(per_row_upper.sum()) == 2 * MIXTURE_CHUNK // 4
    assert not (upper.any(dim=1) & ((rows >= 1 + ord("a") - 32) & (rows <= 1 + ord("z") - 32)).any(dim=1)).any()
    again = data.batch_for_step(3, 4, seed=0)
    assert torch.equal(again.input_ids, batches[3].input_ids)
    assert not torch.equal(torch.cat([data.batch_for_step(s, 4, seed=1).input_ids for s in range(4)]), rows[:16])
    # a component's sequences are each read once per pass over it
    upper_comp = data.components[1]
    seen = [tuple(r) for r in rows[per_row_upper].tolist()]
    own = data.sequences.input_ids[upper_comp.first: upper_comp.first + upper_comp.count]
    assert len(seen) >= upper_comp.count
    assert sorted(seen[: upper_comp.count]) == sorted(map(tuple, own.tolist()))
    # each tail is the end of its own component, cut off before packing (so never trained on)
    from block_transformer.data_spec import DataSpec
    from block_transformer.measure.perplexity import tokenize_corpus

    for held, comp, spec in zip(data.heldout, data.components, recipe.data.train_specs):
        ids = tokenize_corpus(tiny_tokenizer(), dict(DataSpec.parse(spec).documents()), 0).ids
        assert comp.train_tokens + held.ids.numel() == ids.numel() and torch.equal(held.ids, ids[comp.train_tokens:])
        assert comp.count == comp.train_tokens // 32  # packed from the part before the tail only


# ----------------------------------------------------------------------------------------------------
# Runs: every set in the metrics and the summary; resume with a mixture
# ----------------------------------------------------------------------------------------------------


def metrics(recipe) -> list[dict]:
    return [json.loads(line) for line in (recipe.checkpoint_dir / loop.METRICS_FILE).read_text().splitlines()]


def test_every_held_out_set_is_scored_logged_and_summarised(tmp_path):
    recipe = mixture_recipe(tmp_path, **{"train.max_steps": 6, "eval.every": 3, "checkpoint.every": 0,
                                         "eval.primary": "dev"})
    out = loop.uptrain(recipe)
    evals = [r for r in metrics(recipe) if "sets" in r]
    assert [e["step"] for e in evals] == [0, 3, 6]
    for record in evals:
        assert list(record["sets"]) == ["lower", "upper", "dev"]
        assert record["eval_ppl"] == record["sets"]["dev"]["ppl"]  # the primary set's, as before
    summary = json.loads((out / loop.SUMMARY_FILE).read_text())
    assert summary["primary_eval_set"] == "dev" and list(summary["eval_sets"]) == ["lower", "upper", "dev"]
    for name, figures in summary["eval_sets"].items():
        assert figures["step0_ppl"] == evals[0]["sets"][name]["ppl"] and figures["final_ppl"] == evals[-1]["sets"][name]["ppl"]
        assert figures["source_ppl"] > 0 and figures["step0_ratio"] == pytest.approx(figures["step0_ppl"] / figures["source_ppl"])
        assert figures["final_ratio"] == pytest.approx(figures["final_ppl"] / figures["source_ppl"])
    assert summary["eval_sets"]["upper"]["tokens"] == 256 and summary["eval_sets"]["dev"]["tokens"] == 256
    assert summary["final_ppl"] == summary["eval_sets"]["dev"]["final_ppl"]
    assert summary["source_ppl"] == summary["eval_sets"]["dev"]["source_ppl"]


@pytest.mark.slow
def test_a_resumed_mixture_run_equals_an_uninterrupted_one(tmp_path, monkeypatch):
    base = {"train.max_steps": 8, "checkpoint.every": 4, "eval.every": 4}
    reference = loop.uptrain(mixture_recipe(tmp_path / "a", **base))

    interrupted = mixture_recipe(tmp_path / "b", **base)
    real_save = checkpoint.save

    def save_then_crash(accelerator, root, step, state, keep_last):
        path = real_save(accelerator, root, step, state, keep_last)
        if step == 4:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(checkpoint, "save", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        loop.uptrain(interrupted)
    monkeypatch.setattr(checkpoint, "save", real_save)
    scored = []
    real_reference = loop._teacher_and_reference

    def spy(recipe, source, references, eval_sets, *args):
        scored.append(sorted(set(h.name for h in eval_sets) - set(references)))
        return real_reference(recipe, source, references, eval_sets, *args)

    monkeypatch.setattr(loop, "_teacher_and_reference", spy)
    resumed = loop.uptrain(interrupted, resume="")
    assert scored == [[]]  # the source's figures on every set come from the checkpoint

    from safetensors.torch import load_file

    a, b = load_file(reference / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    records_a = metrics(mixture_recipe(tmp_path / "a", **base))
    records_b = metrics(interrupted)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rs]  # noqa: E731
    assert strip(records_a) == strip(records_b)
    figures = lambda out: {name: {k: v for k, v in f.items() if k != "region"}  # noqa: E731 (regions name the folder)
                           for name, f in json.loads((out / loop.SUMMARY_FILE).read_text())["eval_sets"].items()}
    assert figures(reference) == figures(resumed) and list(figures(reference)) == ["lower", "upper", "dev"]


def test_a_checkpoint_from_before_named_sets_keeps_its_source_figure_on_its_own_set():
    """Regression: the old single figure was attached to whatever set the resumed recipe made primary (an
    eval.sets entry, say), though it was scored on the training data's held-out set."""
    assert loop._saved_references({"reference": {"perplexity": 5.0}}) == {"held-out": {"perplexity": 5.0}}
    assert loop._saved_references({"reference": None}) == {}
    both = {"reference": {"perplexity": 5.0}, "references": {"a": {"perplexity": 5.0}, "b": {"perplexity": 7.0}}}
    assert loop._saved_references(both) == both["references"]


def test_adding_an_eval_set_on_resume_is_not_a_recipe_change(tmp_path, caplog):
    import logging

    settings = {"train.max_steps": 2, "checkpoint.every": 0, "eval.every": 0}
    recipe = tiny_recipe(tmp_path, **settings)
    loop.uptrain(recipe)
    dev = tmp_path / "dev"
    dev.mkdir()
    (dev / "d.txt").write_text("the quick brown fox jumps over the lazy dog " * 20)
    more = {"eval.sets": f"[{{name: dev, data: {dev}, max_tokens: 64}}]", "eval.primary": "dev",
            "eval.max_tokens": 128, "output.overwrite": True}
    resumed = tiny_recipe(tmp_path, **settings, **more)
    assert loop.recipe_changes(recipe.to_yaml(), resumed) == []
    with caplog.at_level(logging.WARNING):
        out = loop.uptrain(resumed, resume="")
    assert not [r for r in caplog.records if "recipe differs" in r.getMessage()], caplog.text
    summary = json.loads((out / loop.SUMMARY_FILE).read_text())
    assert summary["primary_eval_set"] == "dev" and summary["eval_sets"]["dev"]["tokens"] == 64
    # the source's figure on the new set is scored now; the old set keeps the checkpoint's
    assert summary["source_ppl"] == summary["eval_sets"]["dev"]["source_ppl"] > 0
    assert summary["eval_sets"]["held-out"]["source_ppl"] > 0


def test_the_plot_script_reads_every_set_and_the_source_on_each(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("plot_uptrain", REPO / "benchmarks" / "plot_uptrain.py")
    plot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot)
    records = [{"step": 0, "tokens": 0, "eval_ppl": 9.0, "eval_loss_by_block_position": [],
                "sets": {"a": {"ppl": 9.0}, "dev": {"ppl": 90.0}}},
               {"step": 1, "tokens": 128, "loss": 2.0, "tokens_per_s": 5.0},
               {"step": 1, "tokens": 128, "eval_ppl": 3.0, "eval_loss_by_block_position": [],
                "sets": {"a": {"ppl": 3.0}, "dev": {"ppl": 30.0}}}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / loop.SUMMARY_FILE).write_text(json.dumps(
        {"source_ppl": 2.0, "eval_sets": {"a": {"source_ppl": 2.0}, "dev": {"source_ppl": 10.0}}}))
    run = plot.read_run(tmp_path)
    assert run["sets"] == {"a": [9.0, 3.0], "dev": [90.0, 30.0]} and run["source_ppl_by_set"] == {"a": 2.0, "dev": 10.0}
    assert run["tokens"] == [0, 128] and run["eval_ppl"] == [9.0, 3.0]
    (tmp_path / "old").mkdir()  # a run from before named sets: no sets, the single curve as before
    (tmp_path / "old" / "metrics.jsonl").write_text(json.dumps({k: v for k, v in records[0].items() if k != "sets"}) + "\n")
    assert plot.read_run(tmp_path / "old")["sets"] == {}


def plot_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("plot_uptrain", REPO / "benchmarks" / "plot_uptrain.py")
    plot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot)
    return plot


def test_the_plot_ratio_leaves_out_sets_without_a_source_figure_and_source_ppl_is_not_ignored(capsys):
    """Regression: --ratio drew raw perplexity for a set the source was not scored on (on the ratio axis), and
    --source-ppl was silently ignored for runs with named sets."""
    plot = plot_module()
    named = {"tokens": [0, 1000], "eval_ppl": [9.0, 3.0], "summary": {}, "sets": {"a": [9.0, 3.0], "dev": [90.0, 30.0]},
             "source_ppl_by_set": {"a": 2.0, "dev": None}}
    old = {"tokens": [0, 1000], "eval_ppl": [8.0, 4.0], "summary": {"source_ppl": 2.0}, "sets": {},
           "source_ppl_by_set": {}}
    ratio = plot.curves({"run": named, "old": old}, None, ratio=True, source_ppl=None)
    assert [(c["label"], c["values"]) for c in ratio] == [("run: a", [4.5, 1.5]), ("old", [4.0, 2.0])]
    assert "run: dev has no source perplexity" in capsys.readouterr().err
    plain = plot.curves({"run": named}, ["dev"], ratio=False, source_ppl=None)
    assert [(c["label"], c["values"], c["source"]) for c in plain] == [("run: dev", [90.0, 30.0], None)]
    assert plot.curves({"old": old}, None, ratio=True, source_ppl=4.0)[0]["values"] == [2.0, 1.0]  # --source-ppl applies
    with pytest.raises(SystemExit, match="--source-ppl is one figure for runs without named held-out sets"):
        plot.check_source_ppl({"run": named, "old": old}, 4.0)
    plot.check_source_ppl({"old": old}, 4.0)
    plot.check_source_ppl({"run": named}, None)


def test_fortune_folders_are_skipped_and_unknown_corpora_are_one_line(tmp_path):
    """Regression: a folder in the fortunes directory (Debian ships ``off/``) failed with IsADirectoryError;
    an unknown corpus name was a KeyError."""
    folder = tmp_path / "usr/share/games/fortunes"
    (folder / "off").mkdir(parents=True)
    (folder / "off" / "art").write_text("x\n%\n")
    (folder / "love").write_text("one\n%\ntwo\n")
    assert dict(corpora.fortune_documents(tmp_path)) == {"000-love": "one\n\ntwo"}
    with pytest.raises(corpora.BlockTransformerError) as err:
        corpora.fetch_general(["fortunes", "nope"])
    assert str(err.value) == ("no general corpus named nope: choose from fortunes, gnu-standards, debian-reference, "
                              "wordnet, austen.")
