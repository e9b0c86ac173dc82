"""Which of transformers' causal-LM families convert: checked on tiny random models, not claimed.

For a model type, :func:`check_family` builds a tiny random config from the library's own config class
(4 layers, small widths, small vocabulary), then runs conversion → exact tensor copies → the probe of
:mod:`block_transformer.convert.probe` → a padded batch generates what each prompt generates alone
(greedy, cached) → save and reload. ``benchmarks/coverage.py`` runs it over the whole mapping; the test
suite runs it on a representative subset.
"""

from __future__ import annotations

import tempfile
import traceback
from dataclasses import dataclass, field

import torch
from transformers import CONFIG_MAPPING, AutoModelForCausalLM, PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from ..errors import BlockTransformerError, Refused, first_line
from .convert import convert_model
from .discovery import check_architecture, find_structure
from .families import family_for
from .mapping import LayerMapping
from .probe import probe

TINY_VOCAB = 128
# Shrinks applied where the config class has the field: small enough for a CPU sweep, large enough for
# GQA (4 query / 2 KV heads), MoE routing (4 experts, top 2) and MLA latents.
_TINY = dict(
    hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=4,
    vocab_size=TINY_VOCAB, max_position_embeddings=256, head_dim=16, num_experts=4, num_local_experts=4,
    n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32,
    n_shared_experts=1, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
    n_group=1, topk_group=1, sliding_window=8, index_topk=4, pad_token_id=0, bos_token_id=1, eos_token_id=2, rotary_dim=8,
)
# Where the library's defaults cannot be shrunk field by field (nested configs, validators).
_PER_FAMILY = {
    "gpt_neo": dict(attention_types=[[["global", "local"], 2]], num_layers=4, window_size=2),  # window must bite
    "dbrx": dict(
        attn_config={"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},  # DBRX checkpoints clip QKV
        ffn_config={"hidden_size": 64, "ffn_hidden_size": 96, "moe_num_experts": 4, "moe_top_k": 2},
    ),
    "zaya": dict(num_experts_per_tok=1),
    # chunks must bite within the checks' few tokens (the NoPE temperature scale is tested in test_families)
    "llama4_text": dict(attention_chunk_size=8, no_rope_layer_interval=2),
    "longcat_flash": dict(num_layers=4, num_hidden_layers=8),  # two attention sub-layers per layer
    "glm_moe_dsa": dict(indexer_types=["full", "shared", "full", "shared"]),  # layers reusing a top-k move too
    # the library's default has no RoPE parameters for its only layer type (its own default cannot build)
    "cohere_compass_text": dict(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
}
# Nested sub-configs that ignore the shrink passed to them: (field path, the top-level field it must equal).
_NESTED = {"dbrx": [("ffn_config.hidden_size", "d_model")]}
_MLA = dict(num_key_value_heads=4, head_dim=16, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16)
_DROPOUTS = ("resid_pdrop", "embd_pdrop", "attn_pdrop", "attention_dropout", "hidden_dropout", "dropout",
             "embedding_dropout", "hidden_dropout_prob", "attention_probs_dropout_prob", "summary_first_dropout")


def causal_lm_types() -> list[str]:
    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def tiny_config(model_type: str, **overrides) -> PretrainedConfig:
    """The library's own config for ``model_type``, shrunk (fields it lacks are left alone)."""
    config_class = CONFIG_MAPPING[model_type]
    defaults = config_class()
    mla = _MLA if _settable(defaults, "kv_lora_rank") else {}
    shrink = {**_TINY, **mla, **_PER_FAMILY.get(model_type, {}), **overrides}
    fields = {k: v for k, v in shrink.items() if _settable(defaults, k) or k in _PER_FAMILY.get(model_type, {})}
    fields.update({k: 0.0 for k in _DROPOUTS if isinstance(getattr(defaults, k, None), float)})
    config = config_class(**fields)
    for path, source in _NESTED.get(model_type, []):
        parent, name = path.split(".")
        setattr(getattr(config, parent), name, getattr(config, source))
    return config


def _settable(config: PretrainedConfig, name: str) -> bool:
    """The config has the field and takes a value for it (some expose derived read-only properties)."""
    try:
        if not hasattr(config, name):
            return False
    except Exception:  # noqa: BLE001 - per-layer attributes raise on a global read
        return False
    attribute = getattr(type(config), name, None)
    return not (isinstance(attribute, property) and attribute.fset is None)


def tiny_source(config: PretrainedConfig, seed: int = 0) -> torch.nn.Module:
    """A random causal LM; norms perturbed so a wrongly placed norm would show."""
    torch.manual_seed(seed)
    try:
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    except ValueError:  # families without an SDPA path; cached generation also supports eager
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or "ln" in name:
                param.add_(torch.randn_like(param) * 0.1)
    return model.eval()


@dataclass
class FamilyResult:
    model_type: str
    converts: bool = False
    exact_copies: bool = False
    probe: bool = False
    generate: bool = False
    reloads: bool = False
    refused: str | None = None  # the one-line reason a family is refused by design
    refused_kind: str | None = None  # not_decoder_only | recurrent | unsupported
    failure: str | None = None  # where an accepted family failed (a bug, not a design decision)
    details: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.converts and self.exact_copies and self.probe and self.generate and self.reloads


def check_family(model_type: str, *, reload: bool = True) -> FamilyResult:
    """Convert a tiny random ``model_type`` and run every check; never raises."""
    result = FamilyResult(model_type)
    try:
        family_for(model_type)  # refusals that need no config
    except Refused as err:
        result.refused, result.refused_kind = str(err), err.kind
        return result
    try:
        config = tiny_config(model_type)
    except Exception as err:  # noqa: BLE001 - the library cannot build this config in a small size
        result.failure = f"tiny config: {first_line(err)}"
        return result
    try:
        check_architecture(config)
    except Refused as err:
        result.refused, result.refused_kind = str(err), err.kind
        return result
    stage = "source"
    try:
        source = tiny_source(config)
        stage = "convert"
        model = convert_model(source, LayerMapping.partition(2, 2), 3, separator_id=0)
        result.converts = True
        stage = "exact copies"
        result.exact_copies = exact_copies(source, model)
        stage = "probe"
        report = probe(source, model)
        result.details["probe"] = report.as_dict()
        result.probe = report.passed
        stage = "generate"
        result.generate = batch_generates_alone(model)
        stage = "reload"
        result.reloads = reloads_identically(model) if reload else True
    except Refused as err:
        result.refused, result.refused_kind = str(err), err.kind
    except BlockTransformerError as err:
        result.failure = f"{stage}: {first_line(err)}"
    except Exception as err:  # noqa: BLE001 - a report, not a crash: record where it broke
        frame = traceback.extract_tb(err.__traceback__)[-1]
        result.failure = f"{stage}: {type(err).__name__}: {first_line(err)[:160]} ({frame.filename.rsplit('/', 1)[-1]}:{frame.lineno})"
    return result


def exact_copies(source: torch.nn.Module, model) -> bool:
    """Every source tensor sits, bit for bit, wherever the recorded layer mapping puts it (copies, not shared)."""
    structure = find_structure(source, check_architecture(source.config))
    mapping = LayerMapping.from_config(model.config)
    ours = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers())
    embedding = source.get_input_embeddings().weight
    for name, tensor in source.base_model.state_dict(keep_vars=True).items():
        if name.startswith(f"{structure.layers}."):
            index, rest = name[len(structure.layers) + 1 :].split(".", 1)
            targets = [
                f"{side}.{structure.layers}.{new}.{rest}"
                for side, layers in (("block_decoder", mapping.block), ("token_decoder", mapping.token))
                for new, old in enumerate(layers)
                if old == int(index)
            ]
            if len({ours[t].data_ptr() for t in targets}) != len(targets):
                return False  # a layer in both decoders must be two tensors, not one shared
        elif tensor is embedding:
            targets = ["embed_tokens.weight"]
        elif structure.embedding_norm and name.startswith(f"{structure.embedding_norm}."):
            targets = [f"embedding_norm.{name[len(structure.embedding_norm) + 1:]}"]
        elif structure.final_norm and name.startswith(f"{structure.final_norm}."):
            targets = [f"token_decoder.{name}"]
        else:
            targets = [f"block_decoder.{name}", f"token_decoder.{name}"]
        if not all(torch.equal(ours[t], tensor) for t in targets):
            return False
    if structure.head_transform:
        theirs = source.get_submodule(structure.head_transform).state_dict()
        if not all(torch.equal(tensor, theirs[name]) for name, tensor in model.head_transform.state_dict().items()):
            return False
    head = source.get_output_embeddings()
    return torch.equal(model.lm_head.weight, head.weight) and (
        head.bias is None or torch.equal(model.lm_head.bias, head.bias)
    )


@torch.no_grad()
def batch_generates_alone(model, new_tokens: int = 10, atol: float = 1e-4) -> bool:
    """Greedy, cached, left-padded ragged batch: each row generates what it generates alone, and every
    step's logits equal a full recompute of that row alone (so a wrong cached mask cannot hide behind
    an unchanged argmax)."""
    generator = torch.Generator().manual_seed(1)
    lengths = [9, 4, 6, 11, 5]
    prompts = [torch.randint(3, model.config.vocab_size, (n,), generator=generator) for n in lengths]
    width = max(lengths)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, prompt in enumerate(prompts):
        ids[i, width - len(prompt) :], mask[i, width - len(prompt) :] = prompt, 1
    settings = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None)
    out = model.generate(ids, attention_mask=mask, output_scores=True, return_dict_in_generate=True, **settings)
    scores = torch.stack(out.scores, dim=1)  # [B, new_tokens, V]
    for i, prompt in enumerate(prompts):
        alone = model.generate(prompt[None], attention_mask=torch.ones(1, len(prompt), dtype=torch.long), **settings)
        if not torch.equal(alone[0, len(prompt) :], out.sequences[i, width:]):
            return False
        recomputed = model(alone).logits[0, len(prompt) - 1 : -1]
        if not torch.allclose(recomputed, scores[i], atol=atol, rtol=atol):
            return False
    return True


@torch.no_grad()
def reloads_identically(model) -> bool:
    """save_pretrained + AutoModelForCausalLM.from_pretrained(trust_remote_code) gives the same logits."""
    from ..export import save_model_folder

    ids = torch.randint(0, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(2))
    with tempfile.TemporaryDirectory() as tmp:
        folder = f"{tmp}/model"
        save_model_folder(model, None, folder)
        loaded = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
        return torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)
