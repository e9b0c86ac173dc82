"""The frozen teacher of the recovery loss: cheaper (early stop, chunked KL, bf16) without changing results.

Every case is checked against a straightforward computation of the same loss (a full teacher forward,
``F.kl_div`` on materialised log-probabilities), and one optimizer step's weights against that of the
reference loss.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from block_transformer.convert import LayerMapping
from block_transformer.convert.convert import convert_model
from block_transformer.uptrain import losses
from block_transformer.uptrain.build import decoder_layers
from block_transformer.uptrain.data import IGNORE
from block_transformer.uptrain.losses import RecoveryLoss, kl_sum, source_layer, teacher_dtype
from block_transformer.uptrain.recipe import DistillSection
from conftest import VOCAB, tiny_source

LAYERS = 4  # the tiny llama source's depth


@pytest.fixture(scope="module")
def pair():
    source = tiny_source("llama").requires_grad_(False).eval()
    assert source.config.num_hidden_layers == LAYERS
    student = convert_model(source, LayerMapping.partition(2, 2), 4, separator_id=0)
    return source, student


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    ids = torch.randint(1, VOCAB, (2, 16))
    labels = ids.clone()
    labels[0, 6:8] = IGNORE  # block-alignment padding: never a target
    return ids, labels


def outputs(layers: dict[int, torch.nn.Module]):
    captured, handles = {}, []
    for key, layer in layers.items():
        handles.append(layer.register_forward_hook(
            lambda _m, _a, out, key=key: captured.__setitem__(key, out[0] if isinstance(out, tuple) else out)))
    return captured, handles


def reference_losses(distill: DistillSection, student, teacher, token_layers: dict[int, int], ids, labels):
    """The recovery loss computed the plain way: full teacher forward, kl_div on log-probabilities."""
    path = student.config.decoder_layers
    block_len, num_prefix = student.config.block_len, student.config.num_prefix_tokens
    scored = labels[:, 1:] != IGNORE
    ce_items = scored.sum()
    s_states, s_handles = outputs({j: decoder_layers(student.token_decoder, path)[j - 1] for j in token_layers})
    t_states, t_handles = outputs({j: decoder_layers(teacher.base_model, path)[i] for j, i in token_layers.items()})
    out = student(input_ids=ids, labels=labels, num_items_in_batch=ce_items, use_cache=False)
    with torch.no_grad():
        t_logits = teacher(input_ids=ids, use_cache=False).logits
    for handle in s_handles + t_handles:
        handle.remove()
    temp = distill.temperature
    log_s = F.log_softmax(out.logits[:, :-1][scored].float() / temp, -1)
    log_t = F.log_softmax(t_logits[:, :-1][scored].float() / temp, -1)
    kl = F.kl_div(log_s, log_t, log_target=True, reduction="sum") * temp**2 / ce_items
    # alignment: the state predicting token u (u >= 2) against the teacher's state at u - 1
    aligned = labels[:, 2:] != IGNORE
    hidden = torch.zeros(())
    blocks = ids.shape[1] // block_len
    for j, state in s_states.items():
        grid = state.view(ids.shape[0], blocks + 1, num_prefix + block_len - 1, -1)[:, :blocks]
        s = grid[:, :, num_prefix - 1:].flatten(1, 2)[:, 2:]
        t = t_states[j][:, 1:-1]
        err = ((s - t) ** 2).sum(-1) / ((s**2).sum(-1) + (t**2).sum(-1))
        hidden = hidden + (err * aligned).sum() / (aligned.sum() * len(token_layers))
    total = distill.ce_weight * out.loss + distill.kl_weight * kl + distill.hidden_weight * hidden
    return total, out.loss, kl, hidden


def one_step(student, loss_fn) -> dict[str, torch.Tensor]:
    student = copy.deepcopy(student).train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    loss_fn(student).backward()
    optimizer.step()
    return {name: p.detach().clone() for name, p in student.named_parameters()}


@pytest.mark.parametrize("kl_weight", [0.5, 0.0], ids=["kl-on", "kl-off"])
def test_losses_and_one_step_equal_the_plain_computation(pair, kl_weight):
    source, student = pair
    ids, labels = batch()
    distill = DistillSection(kl_weight=kl_weight, hidden_weight=2.0, temperature=2.0)
    recovery = RecoveryLoss(distill, student, source, hidden_layers=[1, 2])
    ce_items, align_items = recovery.normalisers(labels)
    got = recovery(student, ids, labels, ce_items, align_items)
    total, ce, kl, hidden = reference_losses(distill, student, source, {1: 2, 2: 3}, ids, labels)
    torch.testing.assert_close(got.ce, ce)
    torch.testing.assert_close(got.kl, kl if kl_weight else torch.zeros(()))
    torch.testing.assert_close(got.hidden, hidden)
    torch.testing.assert_close(got.total, total)
    assert float(got.hidden.detach()) > 0 and (float(got.kl.detach()) > 0) == bool(kl_weight)

    # one AdamW step from each (on copies of the student: a RecoveryLoss hooks the copy's layers)
    mine = one_step(student, lambda m: RecoveryLoss(distill, m, source, [1, 2])(m, ids, labels, ce_items, align_items).total)
    expected = one_step(student, lambda m: reference_losses(distill, m, source, {1: 2, 2: 3}, ids, labels)[0])
    assert mine.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(mine[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
    assert not any(p.grad is not None for p in source.parameters())


def test_without_kl_the_teacher_stops_after_the_deepest_aligned_layer(pair):
    source, student = pair
    ids, labels = batch(1)
    layers = decoder_layers(source.base_model, student.config.decoder_layers)
    ran: list[str] = []
    watched = {f"layer {i}": layer for i, layer in enumerate(layers)} | {"norm": source.model.norm, "head": source.lm_head}
    handles = [m.register_forward_hook(lambda *_a, name=name: ran.append(name)) for name, m in watched.items()]
    try:
        recovery = RecoveryLoss(DistillSection(hidden_weight=1.0), student, source, hidden_layers=[1])
        logits, states = recovery.run_teacher(ids)
        assert logits is None and list(states) == [1]
        assert ran == ["layer 0", "layer 1", "layer 2"]  # token layer 1 = source layer 2 (partition 2/2)
        full, full_handles = outputs({1: layers[2]})
        handles += full_handles
        with torch.no_grad():
            source(input_ids=ids, use_cache=False)
        torch.testing.assert_close(states[1], full[1])
        # with KL the whole model runs, LM head included
        ran.clear()
        recovery = RecoveryLoss(DistillSection(kl_weight=1.0, hidden_weight=1.0), student, source, hidden_layers=[1])
        logits, _ = recovery.run_teacher(ids)
        assert logits is not None and ran[-2:] == ["norm", "head"] and "layer 3" in ran
    finally:
        for handle in handles:
            handle.remove()
    # the capture and stop hooks are gone: a later plain forward runs to the end
    assert all(not layer._forward_hooks for layer in layers)
    assert source(input_ids=ids).logits.shape == (2, 16, VOCAB)


def test_no_term_reads_the_teacher_so_it_is_not_kept(pair):
    source, student = pair
    assert RecoveryLoss(DistillSection(), student, source, hidden_layers=[]).teacher is None


def test_alignment_follows_the_recorded_layer_mapping(pair):
    """conversion["token_layers"][j - 1] is token-decoder layer j's source layer; else the partition's."""
    source, student = pair
    mapped = copy.deepcopy(student)
    recorded = {k: v for k, v in (student.config.conversion or {}).items() if k != "token_layers"}
    mapped.config.conversion = recorded  # a folder converted before mappings were recorded
    assert [source_layer(mapped.config, j) for j in (1, 2)] == [2, 3]  # partition 2/2: N_b + j - 1
    mapped.config.conversion = None
    assert [source_layer(mapped.config, j) for j in (1, 2)] == [2, 3]
    ids, labels = batch(2)
    layers = decoder_layers(source.base_model, student.config.decoder_layers)
    for token_layers, deepest in (([1, 3], 3), ([0, 1], 1)):  # interleaved; a "duplicate"-style lower pair
        mapped.config.conversion = {**recorded, "token_layers": token_layers}
        assert [source_layer(mapped.config, j) for j in (1, 2)] == token_layers
        distill = DistillSection(hidden_weight=1.0)
        recovery = RecoveryLoss(distill, mapped, source, hidden_layers=[1, 2])
        assert recovery.teacher_layers == {1: layers[token_layers[0]], 2: layers[token_layers[1]]}
        assert recovery.stop_after is layers[deepest]
        with torch.no_grad():
            got = recovery(mapped, ids, labels, *recovery.normalisers(labels))
            expected = reference_losses(distill, mapped, source, dict(zip((1, 2), token_layers)), ids, labels)
        torch.testing.assert_close(got.hidden, expected[3])
        torch.testing.assert_close(got.total, expected[0])


def plain_kl(student, teacher, scored, temperature):
    s = F.log_softmax(student[:, :-1][scored].float() / temperature, -1)
    t = F.log_softmax(teacher[:, :-1][scored].float() / temperature, -1)
    return F.kl_div(s, t, log_target=True, reduction="sum") * temperature**2


@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_kl_and_its_gradient_equal_kl_div(monkeypatch, temperature, dtype):
    monkeypatch.setattr(losses, "KL_CHUNK_ROWS", 5)  # several chunks, the last one partial
    torch.manual_seed(0)
    student = (torch.randn(3, 9, 50) * 4).to(dtype).requires_grad_(True)
    teacher = (torch.randn(3, 9, 50) * 4).to(dtype)
    scored = torch.rand(3, 8) > 0.3
    got = kl_sum(student, teacher, scored, temperature)
    got.backward()
    grad = student.grad.clone()
    student.grad = None
    expected = plain_kl(student, teacher, scored, temperature)
    expected.backward()
    torch.testing.assert_close(got, expected)
    assert grad.dtype == dtype
    torch.testing.assert_close(grad.float(), student.grad.float(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-6)
    assert grad[:, -1].abs().sum() == 0 and grad[:, :-1][~scored].abs().sum() == 0  # unscored rows get none


def test_chunked_kl_of_equal_distributions_is_zero():
    logits = torch.randn(2, 6, 40) * 5
    kl = kl_sum(logits, logits.clone(), torch.ones(2, 5, dtype=torch.bool), 1.0)
    assert abs(float(kl)) < 1e-4


def test_teacher_dtype_is_bf16_only_with_native_bf16(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(losses, "_cpu_flags", lambda: frozenset({"avx2", "avx512f", "avx512bw"}))
    assert teacher_dtype(cpu) == torch.float32  # emulated bf16 is slower than fp32
    monkeypatch.setattr(losses, "_cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    assert teacher_dtype(cpu) == torch.bfloat16
    assert teacher_dtype(cpu, "float32") == torch.float32
    assert teacher_dtype(torch.device("meta")) == torch.float32
    assert teacher_dtype(torch.device("meta"), "bfloat16") == torch.bfloat16


def test_a_bf16_teacher_gives_nearly_the_fp32_losses(pair):
    source, student = pair
    ids, labels = batch(3)
    distill = DistillSection(kl_weight=1.0, hidden_weight=1.0)
    with torch.no_grad():
        recovery = RecoveryLoss(distill, student, source, [1, 2])
        fp32 = recovery(student, ids, labels, *recovery.normalisers(labels))
        bf16_teacher = copy.deepcopy(source)
        recovery = RecoveryLoss(distill, student, bf16_teacher, [1, 2], teacher_dtype=torch.bfloat16)
        assert next(bf16_teacher.parameters()).dtype == torch.bfloat16
        bf16 = recovery(student, ids, labels, *recovery.normalisers(labels))
    torch.testing.assert_close(bf16.ce, fp32.ce)
    torch.testing.assert_close(bf16.kl, fp32.kl, rtol=0.05, atol=1e-3)
    torch.testing.assert_close(bf16.hidden, fp32.hidden, rtol=0.05, atol=1e-3)


@pytest.mark.parametrize("choice", ["float32", "bfloat16"])
def test_the_recipe_chooses_the_teacher_dtype_and_the_summary_records_it(tmp_path, choice):
    """Regression: distill.teacher_dtype did not exist (loop.py read it with a getattr default), so a run could
    not opt out of the bf16 teacher, and nothing recorded which dtype the teacher ran in."""
    from block_transformer.uptrain import loop
    from conftest import tiny_recipe

    recipe = tiny_recipe(tmp_path, **{"distill.hidden_weight": 1.0, "distill.teacher_dtype": choice})
    run = loop.setup(recipe)
    assert next(run.loss.teacher.parameters()).dtype == getattr(torch, choice)
    assert loop.summary(run, 1)["teacher_dtype"] == choice
