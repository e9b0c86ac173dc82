"""The recovery loss of uptraining: cross-entropy, plus terms driven by the frozen source model (the teacher).

:class:`RecoveryLoss` is ``ce_weight·CE + kl_weight·KL + hidden_weight·alignment``, the loss the
uptraining loop, the speed benchmark and the tests all use. Its two teacher terms:

* **KL distillation** — the teacher's next-token distribution on the same tokens, with a temperature.
* **Hidden-state alignment** (MOHAWK's stage 2, adapted): after conversion the token decoder's layer j
  sees raw token embeddings plus a prefix, while in the source the same weights (layer N_b + j) saw the
  residual stream of the lower layers. We pull its hidden state for each predicted token towards the
  source's state after layer N_b + j at the token before it, i.e. the state that predicts the same
  token. The last prefix slot predicts a block's first token, so it is aligned with the source's state
  at the previous block's last token. The error is normalised per token by the target's norm: the
  source's position-0 attention sink (norm ~100x the rest) would otherwise dominate, and position 0 is
  left out altogether.

Layer outputs are read with forward hooks on the family's decoder layers (pre-final-norm states on
both sides, unlike HF's last ``hidden_states`` entry, which is after the final norm). Token-decoder layer
j came from source layer ``config.conversion["token_layers"][j - 1]`` when the conversion recorded a
layer mapping, else from N_b + j - 1 (a partition: the block decoder took layers 0 .. N_b - 1).

The teacher costs as little as the terms allow: no gradient; without KL it stops after the deepest
aligned layer (no upper layers, final norm, LM head or softmax); the KL is summed in row chunks from the
two logit tensors, with a hand-written backward, instead of materialising log-probabilities, copies and
gradients of the whole [tokens, vocabulary] tensor several times; and it may run in bf16
(:func:`teacher_dtype`: where the hardware has native bf16 arithmetic).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from ..convert.mapping import LayerMapping
from ..modeling import BlockTransformerForCausalLM
from .build import decoder_layers
from .data import IGNORE
from .recipe import DistillSection


@dataclass(frozen=True)
class Losses:
    """The terms of the recovery loss, each already normalised by the global count it averages over."""

    total: torch.Tensor  # the weighted sum that is trained
    ce: torch.Tensor
    kl: torch.Tensor
    hidden: torch.Tensor

    def stacked(self) -> torch.Tensor:
        """[total, ce, kl, hidden], detached, in fp32: for summing over micro-batches and processes."""
        return torch.stack([t.detach().float() for t in (self.total, self.ce, self.kl, self.hidden)])


class RecoveryLoss:
    """``ce_weight·CE + kl_weight·KL + hidden_weight·alignment`` of a Block Transformer against its source.

    Built once per run. It holds the frozen teacher (only when a teacher term is weighted) and the
    layer maps of hidden-state alignment: token-decoder layer j of the student and layer N_b + j of the
    source, the same weights before conversion. Every term is a sum divided by a count over the whole
    global batch (:meth:`normalisers`), so micro-batches and processes add up to the batch's mean.
    """

    def __init__(
        self,
        distill: DistillSection,
        student: BlockTransformerForCausalLM,
        teacher: nn.Module | None,
        hidden_layers: Sequence[int],
        teacher_dtype: torch.dtype | None = None,
    ):
        """``teacher_dtype``: cast the teacher to it (e.g. :func:`teacher_dtype`); None keeps its own."""
        self.distill = distill
        cfg = student.config
        self.block_len, self.num_prefix = cfg.block_len, cfg.num_prefix_tokens
        path = cfg.decoder_layers
        self.student_layers = {j: decoder_layers(student.token_decoder, path)[j - 1] for j in hidden_layers}
        self.source_layers = {j: source_layer(cfg, j) for j in hidden_layers}
        self.teacher_layers: dict[int, nn.Module] = {}
        self.stop_after: nn.Module | None = None  # the teacher's forward ends after this layer
        if teacher is not None and not (distill.kl_weight or self.source_layers):
            teacher = None  # no term reads it
        if teacher is not None:
            if teacher_dtype is not None:
                teacher.to(teacher_dtype)
            layers = decoder_layers(teacher.base_model, path)
            self.teacher_layers = {j: layers[i] for j, i in self.source_layers.items()}
            if not distill.kl_weight:  # only layer outputs are read: nothing above the deepest one runs
                self.stop_after = layers[max(self.source_layers.values())]
        self.teacher = teacher

    def normalisers(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scored targets, aligned token-layers) of a whole global batch: what each term is divided by."""
        ce_items = scored_targets(labels).sum().clamp_min(1)
        aligned = alignment_mask(labels, self.block_len, self.distill.align_prefix).sum().clamp_min(1)
        return ce_items, aligned * max(1, len(self.student_layers))

    def __call__(
        self,
        model: nn.Module,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        ce_items: torch.Tensor,
        align_items: torch.Tensor,
        autocast: Callable[[], AbstractContextManager] = nullcontext,
    ) -> Losses:
        """The terms on one micro-batch. ``model`` is the student as it trains (it may be wrapped by
        accelerate or peft); ``autocast`` is the mixed-precision context the teacher runs under.
        """
        dist = self.distill
        zero = torch.zeros((), device=input_ids.device)
        with capture_outputs(self.student_layers if self.teacher_layers else {}) as student_states:
            out = model(input_ids=input_ids, labels=labels, num_items_in_batch=ce_items, use_cache=False)
        ce, kl, hidden = out.loss, zero, zero
        if self.teacher is not None:
            teacher_logits, teacher_states = self.run_teacher(input_ids, autocast)
            if dist.kl_weight:
                kl = kl_sum(out.logits, teacher_logits, scored_targets(labels), dist.temperature) / ce_items
            for j, layer_out in student_states.items():
                student = token_decoder_states(layer_out, *input_ids.shape, self.block_len, self.num_prefix)
                err = alignment_sum(student, teacher_states[j], labels, self.block_len, dist.align_prefix)
                hidden = hidden + err / align_items
        total = dist.ce_weight * ce + dist.kl_weight * kl + dist.hidden_weight * hidden
        return Losses(total=total, ce=ce, kl=kl, hidden=hidden)


    def run_teacher(
        self, input_ids: torch.Tensor, autocast: Callable[[], AbstractContextManager] = nullcontext
    ) -> tuple[torch.Tensor | None, dict[int, torch.Tensor]]:
        """The teacher's logits (None without KL: its forward stopped early) and its aligned layers' outputs."""
        assert self.teacher is not None
        with torch.no_grad(), autocast(), capture_outputs(self.teacher_layers, self.stop_after) as states:
            try:
                return self.teacher(input_ids=input_ids, use_cache=False).logits, states
            except _StopForward:
                return None, states


class _StopForward(Exception):
    """Raised by a forward hook to end a forward pass whose remaining layers nothing reads."""


@contextmanager
def capture_outputs(layers: dict[int, torch.nn.Module], stop_after: torch.nn.Module | None = None):
    """Record the hidden-state output of each given layer during the forward passes inside the block.

    With ``stop_after``, the forward pass ends right after that module (a :class:`_StopForward` that the
    caller catches): generic over model families, whatever their base model does after its layers.
    """
    captured: dict[int, torch.Tensor] = {}
    handles = []
    for key, layer in layers.items():
        def hook(_module, _args, output, key=key):
            captured[key] = output[0] if isinstance(output, tuple) else output

        handles.append(layer.register_forward_hook(hook))
    if stop_after is not None:  # registered last: its layer's output is captured first
        def stop(_module, _args, _output):
            raise _StopForward

        handles.append(stop_after.register_forward_hook(stop))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def source_layer(config, j: int) -> int:
    """The source layer whose weights became token-decoder layer j (1-based): the recorded layer mapping
    (``conversion["token_layers"]``), else the partition's N_b + j - 1."""
    return LayerMapping.from_config(config).token[j - 1]


@cache
def _cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return frozenset(line.partition(":")[2].split())


def teacher_dtype(device: torch.device, choice: str = "auto") -> torch.dtype:
    """The dtype the frozen teacher runs in: bf16 where the hardware computes in it natively (a CUDA GPU
    with bf16, a CPU with AVX512-BF16 or AMX), else fp32; ``choice`` "float32"/"bfloat16" forces one.

    Measured on a 2-thread AMD EPYC with AVX512-BF16 (SmolLM2-135M, 4x256 tokens): the teacher's forward
    takes about half the time in bf16. CPUs without native bf16 emulate it, slower than fp32.
    """
    if choice != "auto":
        return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}[choice]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu" and _cpu_flags() & {"avx512_bf16", "amx_bf16"}:
        return torch.bfloat16
    return torch.float32


KL_CHUNK_ROWS = 32  # rows of [rows, vocabulary] processed at once: a few MB, cache-sized


def kl_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, scored: torch.Tensor, temperature: float) -> torch.Tensor:
    """Summed KL(teacher || student) over scored positions, times T² (so its gradient scale matches CE).

    ``*_logits``: [B, T, V] (HF convention: position t predicts t + 1); ``scored``: [B, T - 1] (the last
    position predicts nothing). Computed in fp32 in row chunks (:class:`_ChunkedKL`); equal to
    ``T²·kl_div(log_softmax(s/T), log_softmax(t/T), log_target=True, reduction="sum")`` over the scored rows.
    """
    rows = F.pad(scored, (0, 1)).flatten().nonzero().squeeze(1)
    return _ChunkedKL.apply(student_logits, teacher_logits.detach(), rows, temperature)


class _ChunkedKL(torch.autograd.Function):
    """T²·Σ_rows Σ_v p_t·(log p_t - log p_s), p = softmax(logits / T), a chunk of rows at a time.

    Per row, Σ_v p_t·(log p_t - log p_s) = Σ_v p_t·(t - s)/T - lse(t/T) + lse(s/T); the backward,
    T·(softmax(s/T) - p_t) per row, is recomputed from the logits and the saved per-row log-sum-exps.
    Nothing of size [rows, vocabulary] is kept but the gradient itself.
    """

    @staticmethod
    def forward(ctx, student: torch.Tensor, teacher: torch.Tensor, rows: torch.Tensor, temperature: float) -> torch.Tensor:
        with torch.autocast(student.device.type, enabled=False):  # fp32 arithmetic, under mixed precision too
            total, lse_s, lse_t = _kl_rows(student, teacher, rows, temperature)
        ctx.save_for_backward(student, teacher, rows, lse_s, lse_t)
        ctx.temperature = temperature
        return total * temperature**2

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        student, teacher, rows, lse_s, lse_t = ctx.saved_tensors
        temperature = ctx.temperature
        vocab = student.shape[-1]
        s_flat, t_flat = student.reshape(-1, vocab), teacher.reshape(-1, vocab)
        out = student.new_empty(student.shape)
        out_flat = out.view(-1, vocab)
        unscored = torch.ones(out_flat.shape[0], dtype=torch.bool, device=out.device)
        unscored[rows] = False
        out_flat[unscored] = 0  # every other row is written below: no zero-fill of the whole tensor
        scale = grad.float() * temperature
        for start in range(0, rows.numel(), KL_CHUNK_ROWS):
            index = rows[start : start + KL_CHUNK_ROWS]
            stop = start + len(index)
            q = _scaled_rows(s_flat, index, temperature).sub_(lse_s[start:stop].unsqueeze(1)).exp_()
            p = _scaled_rows(t_flat, index, temperature).sub_(lse_t[start:stop].unsqueeze(1)).exp_()
            out_flat.index_copy_(0, index, q.sub_(p).mul_(scale).to(out.dtype))
        return out, None, None, None


def _kl_rows(student: torch.Tensor, teacher: torch.Tensor, rows: torch.Tensor, temperature: float):
    """(Σ_rows KL(teacher || student) at temperature T, per-row lse(s/T), per-row lse(t/T)), in fp32."""
    vocab = student.shape[-1]
    s_flat, t_flat = student.reshape(-1, vocab), teacher.reshape(-1, vocab)
    lse_s = torch.empty(rows.numel(), dtype=torch.float32, device=student.device)
    lse_t = torch.empty_like(lse_s)
    total = torch.zeros((), dtype=torch.float32, device=student.device)
    for start in range(0, rows.numel(), KL_CHUNK_ROWS):
        index = rows[start : start + KL_CHUNK_ROWS]
        s, t = _scaled_rows(s_flat, index, temperature), _scaled_rows(t_flat, index, temperature)
        ls, lt = torch.logsumexp(s, -1), torch.logsumexp(t, -1)
        lse_s[start : start + len(index)], lse_t[start : start + len(index)] = ls, lt
        diff = torch.sub(t, s, out=s)
        p = t.sub_(lt.unsqueeze(1)).exp_()
        total += (p.mul_(diff).sum(-1) - lt + ls).sum()  # torch's sum is pairwise: as exact as kl_div's
    return total, lse_s, lse_t


def _scaled_rows(flat: torch.Tensor, index: torch.Tensor, temperature: float) -> torch.Tensor:
    """flat[index] / T, as a new fp32 tensor."""
    rows = flat.index_select(0, index).float()  # a copy, even when already fp32
    return rows.div_(temperature) if temperature != 1 else rows


def scored_targets(labels: torch.Tensor) -> torch.Tensor:
    """[B, T-1] bool: logits[:, t] is scored against labels[:, t + 1] (HF shift; IGNORE never counts)."""
    return labels[:, 1:] != IGNORE


def token_decoder_states(output: torch.Tensor, batch: int, seq_len: int, block_len: int, num_prefix: int) -> torch.Tensor:
    """Token-decoder layer output -> [B, T, D], index u = the state that predicts token u.

    Training batches are full rows (no padding), so the token decoder ran on every (row, block) pair in
    row-major order, plus the partial block after the last one: [B·(T/L_B + 1), N_P + L_B - 1, D].
    """
    blocks = seq_len // block_len
    states = output.view(batch, blocks + 1, output.shape[1], output.shape[2])[:, :blocks]
    return states[:, :, num_prefix - 1 : num_prefix - 1 + block_len].flatten(1, 2)


def alignment_mask(labels: torch.Tensor, block_len: int, align_prefix: bool) -> torch.Tensor:
    """[B, T - 2] bool: which predicted tokens u = 2 .. T-1 are aligned (see :func:`alignment_sum`)."""
    keep = labels[:, 2:] != IGNORE
    if not align_prefix:
        keep &= torch.arange(2, labels.shape[1], device=labels.device) % block_len != 0
    return keep


def alignment_sum(
    student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, block_len: int, align_prefix: bool
) -> torch.Tensor:
    """Summed normalised squared error of one layer over the aligned tokens.

    ``student[:, u]`` predicts token u; its target is ``teacher[:, u - 1]``. Position u = 1 (target = the
    source's attention sink at position 0) and u = 0 are left out; so are unscored targets, and the
    prefix slots (u % L_B == 0) unless ``align_prefix``. Each token's error is ||s - t||² / (||s||² + ||t||²),
    in [0, 2]: normalised by the target alone, the few positions where only one side is a sink-like
    outlier (e.g. a separator's sink-init input embedding: 100x the usual norm) swamped the rest.
    """
    s, t = student[:, 2:].float(), teacher[:, 1:-1].float()
    err = (s - t).pow(2).sum(-1) / (s.pow(2).sum(-1) + t.pow(2).sum(-1)).clamp_min(1e-6)
    return (err * alignment_mask(labels, block_len, align_prefix)).sum()
