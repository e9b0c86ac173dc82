"""A numerical proof that the surgery kept the source's function, not just its tensors.

With hooks on the source, on a few tokens:

(a) *inputs* — the token embeddings that feed the embedder and the token decoder, plus the position
    signal the decoders add, equal what the source's first layer received for the same tokens (any
    embedding multiplier, offset position table, ... included);
(b) *upper layers* — the converted token decoder, run on the source's own hidden states before its
    first layer t0 (same positions), with its final norm and the LM-head arithmetic (bias, logit
    scaling, soft-capping), reproduces the source's logits. This needs a token decoder made of the
    source's top layers t0..N-1 (a partition, or a duplicate with t0 = 0); for other mappings the
    token decoder computes something the source never did, and (b) is skipped (``logits_error`` None).

Exact-copy tests cannot catch a layer that was copied right but is run differently (a rescaled input,
a lost window, a missing logit transform): this does.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from transformers import PreTrainedModel

from ..errors import ConversionError
from ..modeling import BlockTransformerForCausalLM
from .discovery import LayerInputs, position_signal

PROBE_TOKENS = 12
FP32_TOLERANCE = 1e-4  # relative to the largest magnitude compared; fp32 reorderings stay around 1e-6


def tolerance(dtype: torch.dtype) -> float:
    """1e-4 in fp32; a few rounding steps of a half-precision source."""
    return max(FP32_TOLERANCE, 8 * torch.finfo(dtype).eps)


@dataclass(frozen=True)
class ProbeReport:
    input_error: float  # max |ours - source| / max |source| at the first layer's input
    logits_error: float | None  # the same, on the logits of the upper layers run on the source's states
    tokens: int
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.input_error <= self.tolerance and (self.logits_error is None or self.logits_error <= self.tolerance)

    def as_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


@torch.no_grad()
def probe(source: PreTrainedModel, model: BlockTransformerForCausalLM, num_tokens: int = PROBE_TOKENS) -> ProbeReport:
    """Run checks (a) and (b) above; returns the relative errors (see :func:`tolerance`)."""
    base = source.base_model
    source_layers = base.get_submodule(model.config.decoder_layers)
    num_layers = len(source_layers)
    split_at = model.config.block_decoder_config.num_hidden_layers
    token_layers = (model.config.conversion or {}).get("token_layers") or list(range(split_at, num_layers))
    first_token_layer = token_layers[0]
    on_top = list(token_layers) == list(range(first_token_layer, num_layers))
    vocab = min(model.config.vocab_size, source.get_input_embeddings().weight.shape[0])
    ids = torch.randint(0, vocab, (1, num_tokens), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(num_tokens).unsqueeze(0)
    first, upper = LayerInputs(source_layers[0]), LayerInputs(source_layers[first_token_layer])
    try:
        expected = source(input_ids=ids, position_ids=positions, use_cache=False).logits.float()
        first_input, upper_input = first.take(), upper.take()
    finally:
        first.close()
        upper.close()

    dim, dtype = model.config.hidden_size, model.embed_tokens.weight.dtype
    block_layers = model.block_decoder.get_submodule(model.config.decoder_layers)
    added = position_signal(model.block_decoder, block_layers, positions, dim, dtype)
    ours_input = model.token_embeddings(ids) + added
    logits_error = None
    if on_top:
        layers = model.token_decoder.get_submodule(model.config.decoder_layers)
        token_added = position_signal(model.token_decoder, layers, positions, dim, dtype)
        hidden = model._run_decoder(model.token_decoder, upper_input - token_added, positions)
        logits_error = _relative(model.logits(hidden).float(), expected)
    return ProbeReport(
        input_error=_relative(ours_input.float(), first_input.float()),
        logits_error=logits_error,
        tokens=num_tokens,
        tolerance=tolerance(dtype),
    )


def check(source: PreTrainedModel, model: BlockTransformerForCausalLM) -> ProbeReport:
    """:func:`probe`, raising a ConversionError that names the failed check."""
    report = probe(source, model)
    if not report.passed:
        failed = "the first layer's inputs" if report.input_error > report.tolerance else "the upper layers' logits"
        logits = "skipped" if report.logits_error is None else f"{report.logits_error:.2g}"
        raise ConversionError(
            f"the conversion probe failed: {failed} differ from the source's (relative errors: inputs "
            f"{report.input_error:.2g}, logits {logits}; tolerance {report.tolerance:g}). This family needs "
            "a descriptor in block_transformer/convert/families.yaml; please report it."
        )
    return report


def _relative(ours: torch.Tensor, expected: torch.Tensor) -> float:
    return float((ours - expected).abs().max() / expected.abs().max().clamp(min=1e-12))
