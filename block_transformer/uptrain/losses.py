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
both sides, unlike HF's last ``hidden_states`` entry, which is after the final norm).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

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
    ):
        self.distill = distill
        self.teacher = teacher
        cfg = student.config
        self.block_len, self.num_prefix = cfg.block_len, cfg.num_prefix_tokens
        path = cfg.decoder_layers
        self.student_layers = {j: decoder_layers(student.token_decoder, path)[j - 1] for j in hidden_layers}
        split_at = cfg.block_decoder_config.num_hidden_layers
        self.teacher_layers = {} if teacher is None else {
            j: decoder_layers(teacher.base_model, path)[split_at + j - 1] for j in hidden_layers
        }

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
            with torch.no_grad(), autocast(), capture_outputs(self.teacher_layers) as teacher_states:
                teacher_logits = self.teacher(input_ids=input_ids, use_cache=False).logits
            if dist.kl_weight:
                kl = kl_sum(out.logits[:, :-1], teacher_logits[:, :-1], scored_targets(labels), dist.temperature) / ce_items
            for j, layer_out in student_states.items():
                student = token_decoder_states(layer_out, *input_ids.shape, self.block_len, self.num_prefix)
                err = alignment_sum(student, teacher_states[j], labels, self.block_len, dist.align_prefix)
                hidden = hidden + err / align_items
        total = dist.ce_weight * ce + dist.kl_weight * kl + dist.hidden_weight * hidden
        return Losses(total=total, ce=ce, kl=kl, hidden=hidden)


@contextmanager
def capture_outputs(layers: dict[int, torch.nn.Module]):
    """Record the hidden-state output of each given layer during the forward passes inside the block."""
    captured: dict[int, torch.Tensor] = {}
    handles = []
    for key, layer in layers.items():
        def hook(_module, _args, output, key=key):
            captured[key] = output[0] if isinstance(output, tuple) else output

        handles.append(layer.register_forward_hook(hook))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def kl_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, scored: torch.Tensor, temperature: float) -> torch.Tensor:
    """Summed KL(teacher || student) over scored positions, times T² (so its gradient scale matches CE)."""
    s = student_logits[scored].float() / temperature
    t = teacher_logits[scored].float() / temperature
    kl = F.kl_div(F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1), log_target=True, reduction="sum")
    return kl * temperature**2


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
