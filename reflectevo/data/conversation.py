"""Prompts of one growing chat conversation: the rendered text and the tokenizer's own ids of it.

Every phase of the loop sends the previous phase's prompt + what the model wrote + a new user turn, rendered
with the chat template. The ids sent are ``encode(text)``: the records save the text and the trainer encodes
that text, so a model is asked at evaluation with exactly the ids it was trained on (paper.md defect 4), and
the same text gets the same ids whether or not its start was generated (e.g. trial 1 from a cache). The
sampler's prefix cache hashes full blocks of ids, so a later prompt reuses every block of the earlier prompt and
generated tokens up to the first id where the encodings differ: none where the tokenizer splits at the seams
as the model generated (our SmolLM2 runs); with Llama-3's pre-tokeniser often the line break after the trial-1
action ("]" and "\n" are one token in "Finish[9]\nObservation"); a sampled split of a word the tokenizer would
not produce.

Nothing here knows a particular chat template: the text is what ``tokenizer.apply_chat_template`` renders.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

__all__ = ["Prompt", "PromptBuilder"]


@dataclass(frozen=True)
class Prompt:
    text: str                       # exactly what the model sees: the records save this
    ids: list[int]                  # what the engine receives: encode(text)


class PromptBuilder:
    """Renders chat messages and turns the text into a token-id prompt (see the module docstring)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer

    def render(self, messages: list[dict], opener: str = "") -> str:
        """The conversation as the chat template renders it (generation prompt added) + ``opener``, the start of
        the assistant turn the prompt already holds (e.g. "Thought:")."""
        return self.tok.apply_chat_template(messages, add_generation_prompt=True) + opener

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def start(self, text: str) -> Prompt:
        return Prompt(text, self.encode(text))
