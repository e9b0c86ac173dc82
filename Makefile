# Convenience targets; each is one plain command you can also run by hand.
.PHONY: install test demo uptrain-demo step0

install:  ## CPU torch wheel first (an unpinned torch pulls a CUDA build), then the package
	python -m pip install torch==2.13.0
	python -m pip install -e ".[test,lm-eval]"

test:
	python -m pytest

demo:  ## the README's main job: fetch SmolLM2-135M + Python docs, convert with L_B 4, split 15/15
	bt-fetch-demo
	bt-convert ~/.cache/block-transformer/demo/SmolLM2-135M-Instruct.Q4_1.gguf --block-len 4 --split 15/15 -o smollm2-bt --overwrite

uptrain-demo:  ## uptrain the demo model on the Python docs (CPU, ~1 h): KL + hidden-state alignment + CE
	bt-fetch-demo
	bt-uptrain recipes/smollm2-pydocs.yaml

step0:  ## held-out perplexity of the source and each conversion init, before any uptraining
	python benchmarks/step0_ppl.py
