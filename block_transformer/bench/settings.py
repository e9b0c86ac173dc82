"""What ``bt-bench`` measures: a setting (batch, prompt length, new tokens, ragged prompts) and the
named presets. Imports nothing heavy, so the command line lists the presets without loading torch."""

from __future__ import annotations

from dataclasses import dataclass

PRESETS: dict[str, list[tuple[int, int]]] = {
    # (prompt length, new tokens); named after the paper's settings
    "prefill-heavy": [(2048, 128)],
    "decode-heavy": [(128, 2048)],
    # sized for a 2-core CPU
    "cpu": [(1024, 128), (128, 512)],
}


@dataclass(frozen=True)
class Setting:
    batch_size: int
    prompt_len: int
    new_tokens: int
    ragged: bool = False  # prompt lengths spread over [prompt_len / 2, prompt_len], left-padded

    @property
    def name(self) -> str:
        return f"b{self.batch_size}-p{self.prompt_len}-n{self.new_tokens}{'-ragged' if self.ragged else ''}"
