# Convenience targets; each is one plain command you can also run by hand.
# Everything runs in a virtual environment (.venv) made with python3, so a machine without `python` works.
#
# torch: `make install` pins torch==2.13.0 from pip's configured index. On this project's machines that
# index holds the CPU wheel; on an ordinary Linux machine PyPI's torch is the CUDA build (several GB).
# For the CPU build there: make install TORCH_INDEX=https://download.pytorch.org/whl/cpu
.PHONY: install test test-fast demo uptrain-demo step0 coverage

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_INDEX ?=
DEMO_GGUF := ~/.cache/block-transformer/demo/SmolLM2-135M-Instruct.Q4_1.gguf

install:  ## .venv with the pinned torch (see above), then the package with its test and lm-eval extras
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install -e ".[test,lm-eval,corpora]"

test:  ## the whole suite, as CI runs it
	$(BIN)/python -m pytest

test-fast:  ## the inner loop: everything but the end-to-end tests (under a minute)
	$(BIN)/python -m pytest -m "not slow"

demo:  ## the README's main job: fetch SmolLM2-135M + Python docs, convert with L_B 4, split 15/15 (checked)
	$(BIN)/bt-fetch-demo
	$(BIN)/bt-convert $(DEMO_GGUF) --block-len 4 --split 15/15 -o smollm2-bt --overwrite --check

uptrain-demo:  ## uptrain the demo model on the Python docs (CPU, ~1 h); reuses smollm2-bt from `make demo` if present
	$(BIN)/bt-fetch-demo
	$(BIN)/bt-uptrain recipes/smollm2-pydocs.yaml \
		$(if $(wildcard smollm2-bt/config.json),--set model.source=null --set model.path=smollm2-bt --set distill.teacher=$(DEMO_GGUF))

step0:  ## held-out perplexity of the source and each conversion init, before any uptraining
	$(BIN)/python benchmarks/step0_ppl.py

coverage:  ## which of transformers' causal-LM families convert (tiny random models, ~1 min)
	$(BIN)/python benchmarks/coverage.py
