"""The conversion inits by name (no torch here: the CLI and the recipe schema read them at start-up)."""

INITS = ("sink", "reference")
DEFAULT_INIT = "sink"  # 85x lower step-0 perplexity on SmolLM2-135M (benchmarks/results/step0_ppl.json)
