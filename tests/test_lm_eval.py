"""A saved folder under lm-evaluation-harness's HF backend, offline: the answers equal the model's own.

``lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True`` builds exactly this HFLM
(in this process the package's registered class is used; test_save_load covers loading the folder's
own code with trust_remote_code in a clean process). Requests are built here or read from a local task
file, never from hub datasets.
"""

from __future__ import annotations

import json
import os
import textwrap

import pytest
import torch

pytestmark = pytest.mark.slow  # lm-evaluation-harness end to end
lm_eval = pytest.importorskip("lm_eval", reason="install the lm-eval extra: pip install -e '.[lm-eval]'")

from conftest import tiny_source, tiny_tokenizer
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from transformers import AutoModelForCausalLM, AutoTokenizer

from block_transformer import export
from block_transformer.convert import LayerMapping
from block_transformer.convert.convert import convert_model

BLOCK_LEN = 3


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    model = convert_model(tiny_source("llama"), LayerMapping.partition(2, 2), BLOCK_LEN, separator_id=0,
                          source_info={"source": "tiny"})
    return export.save_model_folder(model, tiny_tokenizer(), tmp_path_factory.mktemp("lm-eval") / "bt")


@pytest.fixture(scope="module")
def lm(folder, tmp_path_factory):
    os.environ["HF_MODULES_CACHE"] = str(tmp_path_factory.mktemp("modules"))  # module scope: no monkeypatch
    return HFLM(pretrained=str(folder), trust_remote_code=True, device="cpu", batch_size=3, max_length=64)


@pytest.fixture(scope="module")
def reference(folder):
    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def continuation_logprob(model, ids: list[int], n: int) -> tuple[float, bool]:
    """log p(last n tokens | the ones before) and whether each is the argmax, one row, no padding."""
    with torch.no_grad():
        logprobs = model(torch.tensor([ids])).logits[0].log_softmax(-1)
    targets = torch.tensor(ids[-n:])
    picked = logprobs[len(ids) - n - 1 : len(ids) - 1]
    return picked.gather(1, targets[:, None]).sum().item(), bool((picked.argmax(-1) == targets).all())


def test_loglikelihood_equals_the_models_own(lm, reference):
    model, tok = reference
    pairs = [("The quick brown", " fox"), ("ab", "cdefgh"), ("x" * 20, " jumps over"), ("hello world, a", "b")]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    answers = lm.loglikelihood(requests)  # batched: right-padded rows of different lengths
    for (context, continuation), (logprob, greedy) in zip(pairs, answers):
        ids = tok(context + continuation)["input_ids"]
        n = len(tok(continuation)["input_ids"])
        want, want_greedy = continuation_logprob(model, ids, n)
        assert logprob == pytest.approx(want, rel=1e-4, abs=1e-4)
        assert greedy == want_greedy


def test_loglikelihood_rolling_scores_every_token(lm, reference):
    model, tok = reference
    text = "Block transformers cut the KV cache by the block length."
    (total,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    ids = [lm.prefix_token_id, *tok(text)["input_ids"]]  # one window: the text after the eot token
    want, _ = continuation_logprob(model, ids, len(ids) - 1)
    assert total == pytest.approx(want, rel=1e-4)


def test_generate_until_is_greedy_generation(lm, reference):
    model, tok = reference
    prompts = ["The quick", "a much longer prompt, padded on the left"]
    requests = [Instance("generate_until", {}, (p, {"until": ["\n"], "max_gen_toks": 7, "do_sample": False}), i)
                for i, p in enumerate(prompts)]
    answers = lm.generate_until(requests)
    for prompt, answer in zip(prompts, answers):
        ids = tok(prompt, return_tensors="pt")
        out = model.generate(**ids, max_new_tokens=7, do_sample=False)
        want = tok.decode(out[0, ids["input_ids"].shape[1]:]).split("\n")[0]
        assert answer == want and len(answer) > 0


def test_simple_evaluate_on_a_local_task(lm, reference, tmp_path):
    """The harness's evaluator end to end (what `lm_eval --tasks` runs) on a multiple-choice task read from a
    local file: each choice's score is the model's own log-likelihood and acc follows from them."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    rows = [
        {"question": "2 + 2 =", "choices": ["4", "5", "22"], "answer": 0},
        {"question": "The sky is", "choices": ["green", "blue"], "answer": 1},
        {"question": "Block transformers are", "choices": ["fast", "slow"], "answer": 0},
    ]
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny_qa.yaml").write_text(textwrap.dedent(f"""\
        task: tiny_qa
        dataset_path: json
        dataset_kwargs:
          data_files: {{test: {data}}}
        test_split: test
        output_type: multiple_choice
        doc_to_text: "{{{{question}}}}"
        doc_to_choice: "{{{{choices}}}}"
        doc_to_target: answer
        metric_list:
          - metric: acc
            aggregation: mean
            higher_is_better: true
        """))
    manager = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)
    out = simple_evaluate(model=lm, tasks=["tiny_qa"], task_manager=manager, log_samples=True)

    model, tok = reference
    correct = []
    for row in rows:
        scores = []
        for choice in row["choices"]:
            continuation = f" {choice}"  # the task's target_delimiter, then the choice
            ids = tok(row["question"] + continuation)["input_ids"]
            scores.append(continuation_logprob(model, ids, len(tok(continuation)["input_ids"]))[0])
        correct.append(max(range(len(scores)), key=scores.__getitem__) == row["answer"])
        sample = next(s for s in out["samples"]["tiny_qa"] if s["doc"]["question"] == row["question"])
        got = [logprob for logprob, _ in sample["filtered_resps"]]
        assert got == pytest.approx(scores, rel=1e-4, abs=1e-4)
    assert out["results"]["tiny_qa"]["acc,none"] == pytest.approx(sum(correct) / len(rows))
