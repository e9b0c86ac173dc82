"""A numerical proof that the surgery kept the source's function, not just its tensors.

With hooks on the source, on a few tokens:

(a) *inputs* — the token embeddings that feed the embedder and the token decoder, plus the position
    signal the decoders add, equal what the source's first layer received for the same tokens (any
    embedding multiplier, offset position table, ... included);
(b) *upper layers* — the converted token decoder, run on the source's own hidden states before its
    first layer t0 (same positions), with its final norm and the LM-head arithmetic (bias, logit
    scaling, soft-capping), reproduces the source's logits. This needs a token decoder made of the
    source's top layers t0..N-1 (a partition, or a duplicate); for other mappings the token decoder
    computes something the source never did, and (b) is skipped (``logits_error`` None);
(c) *every layer* — each layer of both decoders, fed the input its source layer received, returns what
    that source layer returned: a layer rebuilt wrongly under any mapping (a per-layer setting that did
    not follow it, behaviour that depends on its absolute index) shows here. The block decoder is run on
    no more tokens than its window (chunk, ...) in blocks, which is intentionally shorter than the source's.

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
from .mapping import LayerMapping

PROBE_TOKENS = 12
FP32_TOLERANCE = 1e-4  # relative to the largest magnitude compared; fp32 reorderings stay around 1e-6


def tolerance(dtype: torch.dtype) -> float:
    """1e-4 in fp32; a few rounding steps of a half-precision source."""
    return max(FP32_TOLERANCE, 8 * torch.finfo(dtype).eps)


@dataclass(frozen=True)
class ProbeReport:
    input_error: float  # max |ours - source| / max |source| at the first layer's input
    logits_error: float | None  # the same, on the logits of the upper layers run on the source's states
    layers_error: float  # the largest over every decoder layer vs its source layer (check c)
    tokens: int
    tolerance: float

    @property
    def failed(self) -> str | None:
        """Which check failed, in words (None: all passed)."""
        if self.input_error > self.tolerance:
            return "the first layer's inputs"
        if self.logits_error is not None and self.logits_error > self.tolerance:
            return "the upper layers' logits"
        if self.layers_error > self.tolerance:
            return "a decoder layer's output"
        return None

    @property
    def passed(self) -> bool:
        return self.failed is None

    def as_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


@torch.no_grad()
def probe(source: PreTrainedModel, model: BlockTransformerForCausalLM, num_tokens: int = PROBE_TOKENS) -> ProbeReport:
    """Run checks (a), (b) and (c) above; returns the relative errors (see :func:`tolerance`)."""
    source_layers = source.base_model.get_submodule(model.config.decoder_layers)
    mapping = LayerMapping.from_config(model.config)
    first_token_layer = mapping.token[0]
    on_top = mapping.token == tuple(range(first_token_layer, len(source_layers)))
    vocab = min(model.config.vocab_size, source.get_input_embeddings().weight.shape[0])
    ids = torch.randint(0, vocab, (1, num_tokens), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(num_tokens).unsqueeze(0)
    inputs = [LayerInputs(layer) for layer in source_layers]
    outputs = [LayerOutputs(layer) for layer in source_layers]
    try:
        expected = source(input_ids=ids, position_ids=positions, use_cache=False).logits.float()
        source_io = [(i.take(), o.take()) for i, o in zip(inputs, outputs)]
    finally:
        for hook in inputs + outputs:
            hook.close()

    dim, dtype = model.config.hidden_size, model.embed_tokens.weight.dtype
    block_layers = model.block_decoder.get_submodule(model.config.decoder_layers)
    added = position_signal(model.block_decoder, block_layers, positions, dim, dtype)
    ours_input = model.token_embeddings(ids) + added
    logits_error = None
    if on_top:
        layers = model.token_decoder.get_submodule(model.config.decoder_layers)
        token_added = position_signal(model.token_decoder, layers, positions, dim, dtype)
        hidden = model._run_decoder(model.token_decoder, source_io[first_token_layer][0] - token_added, positions)
        logits_error = _relative(model.logits(hidden).float(), expected)
    block_tokens = min([num_tokens, *_block_spans(model.config)])
    layers_error = max(
        _layer_errors(model, model.block_decoder, mapping.block, source_io, block_tokens)
        + _layer_errors(model, model.token_decoder, mapping.token, source_io, num_tokens)
    )
    return ProbeReport(
        input_error=_relative(ours_input.float(), source_io[0][0].float()),
        logits_error=logits_error,
        layers_error=layers_error,
        tokens=num_tokens,
        tolerance=tolerance(dtype),
    )


def _block_spans(config) -> list[int]:
    """The spans the block decoder counts in blocks where its source layers counted tokens (sliding window,
    chunk size, ...; the conversion records each as ``block_decoder_<field>``): within the shortest, both see
    the same positions alike."""
    return [value for key, value in (config.conversion or {}).items()
            if key.startswith("block_decoder_") and isinstance(value, int)]


class LayerOutputs:
    """Captures the hidden states a layer returns (forward hook), for check (c)."""

    def __init__(self, layer: torch.nn.Module):
        self.seen: list[torch.Tensor] = []
        self._handle = layer.register_forward_hook(self._capture)

    def _capture(self, module, args, output):
        self.seen.append((output[0] if isinstance(output, tuple) else output).detach().clone())

    def take(self) -> torch.Tensor:
        seen, self.seen = self.seen, []
        return seen[0]

    def close(self) -> None:
        self._handle.remove()


def _layer_errors(model, decoder, sources: tuple[int, ...], source_io, num_tokens: int) -> list[float]:
    """Run ``decoder`` with every layer's input replaced by what its source layer received; the relative
    error of each layer's output against the source layer's (errors do not compound across layers)."""
    layers = decoder.get_submodule(model.config.decoder_layers)

    def feed(source_index: int):
        def hook(module, args, kwargs):
            given = source_io[source_index][0][:, :num_tokens]
            if args:
                return (given, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": given}

        return hook

    handles = [layer.register_forward_pre_hook(feed(s), with_kwargs=True) for layer, s in zip(layers, sources)]
    outputs = [LayerOutputs(layer) for layer in layers]
    try:
        positions = torch.arange(num_tokens).unsqueeze(0)
        model._run_decoder(decoder, source_io[0][0][:, :num_tokens], positions)
        return [
            _relative(out.take().float(), source_io[s][1][:, :num_tokens].float()) for out, s in zip(outputs, sources)
        ]
    finally:
        for handle in handles:
            handle.remove()
        for out in outputs:
            out.close()


def check(source: PreTrainedModel, model: BlockTransformerForCausalLM) -> ProbeReport:
    """:func:`probe`, raising a ConversionError that names the failed check."""
    report = probe(source, model)
    if not report.passed:
        logits = "skipped" if report.logits_error is None else f"{report.logits_error:.2g}"
        raise ConversionError(
            f"the conversion probe failed: {report.failed} differs from the source (relative errors: inputs "
            f"{report.input_error:.2g}, logits {logits}, layers {report.layers_error:.2g}; tolerance "
            f"{report.tolerance:g}). This family needs "
            "a descriptor in block_transformer/convert/families.yaml; please report it."
        )
    return report


def _relative(ours: torch.Tensor, expected: torch.Tensor) -> float:
    return float((ours - expected).abs().max() / expected.abs().max().clamp(min=1e-12))
