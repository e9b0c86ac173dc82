"""Saved folders are self-contained Hugging Face models: they load with transformers alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from block_transformer import export
from block_transformer.convert import LayerMapping
from block_transformer.convert.convert import convert_model
from block_transformer.errors import BlockTransformerError
from conftest import FAMILIES, VOCAB, tiny_source, tiny_tokenizer

IDS = torch.tensor([[5, 17, 3, 44, 9, 81, 23, 7, 60, 2, 11], [0, 0, 0, 12, 40, 33, 8, 19, 90, 1, 4]])
MASK = torch.tensor([[1] * 11, [0, 0, 0] + [1] * 8])


def _convert(model_type: str):
    return convert_model(tiny_source(model_type), LayerMapping.partition(2, 2), 3, separator_id=0, source_info={"source": "tiny"})


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Every family converted and saved once: {model_type: (folder, logits in this process)}."""
    root = tmp_path_factory.mktemp("saved")
    folders = {}
    for model_type in FAMILIES:
        model = _convert(model_type)
        with torch.no_grad():
            logits = model(IDS, attention_mask=MASK).logits
        folders[model_type] = (export.save_model_folder(model, tiny_tokenizer(), root / model_type), logits)
    return folders


def test_folder_has_everything_a_hub_model_needs(saved):
    folder, _ = saved["llama"]
    names = {p.name for p in folder.iterdir()}
    expected = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "README.md"}
    assert expected | set(export.MODELING_FILES) <= names
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_block_transformer.BlockTransformerForCausalLM"
    assert config["block_len"] == 3 and config["num_prefix_tokens"] == 2
    assert config["conversion"]["split"] == [2, 2] and config["conversion"]["init"] == "sink"
    card = (folder / "README.md").read_text()
    assert "library_name: transformers" in card and "block-transformer" in card and "trust_remote_code=True" in card
    assert not any(name.startswith(".") for name in names)
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")], "temporary folders left behind"


@pytest.mark.slow
def test_load_in_a_process_without_block_transformer(saved, tmp_path):
    """trust_remote_code loads the copied modeling files; block_transformer itself is not importable."""
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["block_transformer"] = None  # any import of the package now fails
        import torch
        from safetensors.torch import save_file
        from transformers import AutoModelForCausalLM
        ids, mask = torch.tensor({IDS.tolist()}), torch.tensor({MASK.tolist()})
        out = {{}}
        for name, folder in {{{", ".join(f"{k!r}: {str(v[0])!r}" for k, v in saved.items())}}}.items():
            model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
            assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
            with torch.no_grad():
                out[name] = model(ids, attention_mask=mask).logits.contiguous()
        save_file(out, {str(tmp_path / "logits.safetensors")!r})
        """
    )
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = load_file(tmp_path / "logits.safetensors")
    for name, (_, logits) in saved.items():
        torch.testing.assert_close(loaded[name], logits, rtol=0, atol=0, msg=f"{name} logits differ after reload")


def test_load_in_process_keeps_weights_tying_and_generates(saved):
    folder, logits = saved["qwen2"]
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.lm_head.weight is model.embed_tokens.weight
    with torch.no_grad():
        torch.testing.assert_close(model(IDS, attention_mask=MASK).logits, logits, rtol=0, atol=0)
    tok = AutoTokenizer.from_pretrained(folder)
    out = model.generate(**tok(["abc"], return_tensors="pt"), max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 8) and int(out.max()) < VOCAB


def test_large_models_are_sharded(tmp_path):
    folder = export.save_model_folder(_convert("gpt2"), tiny_tokenizer(), tmp_path / "out", max_shard_size="20KB")
    assert (folder / "model.safetensors.index.json").is_file()
    assert len(list(folder.glob("model-*.safetensors"))) > 1
    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    assert torch.equal(reloaded.embedder.weight, _convert("gpt2").embedder.weight)


def test_failed_save_leaves_nothing_and_keeps_the_old_folder(tmp_path):
    class Broken:
        def save_pretrained(self, path):
            raise RuntimeError("disk full")

    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="disk full"):
        export.save_model_folder(_convert("gpt2"), Broken(), out)
    assert list(tmp_path.iterdir()) == []

    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(BlockTransformerError, match="--overwrite"):
        export.save_model_folder(_convert("gpt2"), tiny_tokenizer(), out)
    with pytest.raises(RuntimeError, match="disk full"):
        export.save_model_folder(_convert("gpt2"), Broken(), out, overwrite=True)
    assert (out / "keep.txt").read_text() == "old"
    export.save_model_folder(_convert("gpt2"), tiny_tokenizer(), out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_saved_files_are_readable_by_others(saved):
    folder, _ = saved["gpt2"]
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.iterdir()]:
        expected = (0o777 if path.is_dir() else 0o666) & ~umask
        assert path.stat().st_mode & 0o777 == expected, path


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c["token_decoder_config"].update(num_hidden_layers=3), "records a 2/2 conversion"),
        (lambda c: c["conversion"].update(split=[2, 3]) or c["token_decoder_config"].update(num_hidden_layers=3),
         "weights in this folder do not match"),
        (lambda c: c.update(separate_token_embeddings=False), "unexpected keys"),
        (lambda c: c.update(lm_head_bias=True), "missing keys"),
    ],
)
def test_an_edited_config_refuses_to_load(saved, tmp_path, edit, message):
    """Regression: a tampered config.json loaded with re-initialised or dropped weights and only a report."""
    import shutil

    folder = tmp_path / "edited"
    shutil.copytree(saved["llama"][0], folder)
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
