"""Write a tiny random model as a .gguf file, the way llama.cpp's converter lays one out.

Metadata keys come from transformers' own GGUF config mapping (read in reverse) and tensor names from
the ``gguf`` package's name map, so the file is what transformers' GGUF loader expects for the family.
"""

from __future__ import annotations

from pathlib import Path

import gguf
from transformers import PreTrainedModel
from transformers.integrations.ggml import GGUF_CONFIG_MAPPING


def write_tiny_gguf(model: PreTrainedModel, tokenizer, path: Path, arch: str) -> Path:
    """``arch`` is the GGUF architecture name (e.g. ``qwen2``); weights are written in fp32."""
    config = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    for key, attr in GGUF_CONFIG_MAPPING[arch].items():
        value = getattr(config, attr, None) if attr else None
        if isinstance(value, bool) or value is None:
            continue
        (writer.add_float32 if isinstance(value, float) else writer.add_uint32)(f"{arch}.{key}", value)
    rope_theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta")
    if rope_theta:
        writer.add_float32(f"{arch}.rope.freq_base", float(rope_theta))
    tokens = [token for token, _ in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.NORMAL] * len(tokens))
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_merges([])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    architecture = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == arch)
    names = gguf.get_tensor_name_map(architecture, config.num_hidden_layers)
    for key, tensor in model.state_dict().items():
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None and "." in key:  # some map entries omit the base model's prefix (BLOOM's embedding norm)
            name = names.get_name(key.split(".", 1)[1], try_suffixes=(".weight", ".bias"))
        if name is None:
            raise KeyError(f"no GGUF name for {key}")
        writer.add_tensor(name, tensor.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
