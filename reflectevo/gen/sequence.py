"""Sequence: one sample being generated (a request with n > 1 becomes n sequences sharing the prompt)."""
from __future__ import annotations

import enum
from dataclasses import dataclass

from reflectevo.gen.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = 0
    RUNNING = 1
    FINISHED = 2


@dataclass
class CompletionOutput:
    """One finished sample: ``text`` (stop string trimmed), ``token_ids`` and ``finish_reason``."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" | "length"


class Sequence:
    def __init__(self, seq_id: int, request_idx: int, sample_idx: int, prompt_ids: list[int],
                 params: SamplingParams, seed: int):
        self.seq_id = seq_id
        self.request_idx = request_idx
        self.sample_idx = sample_idx
        self.token_ids = list(prompt_ids)
        self.num_prompt_tokens = len(prompt_ids)
        self.params = params
        self.seed = seed  # per-sequence noise key: the request's seed (or a drawn one) with sample_idx mixed in later
        self.status = Status.WAITING
        self.block_table: list[int] = []
        self.block_hashes: list[bytes] = []  # chained hashes of the full blocks, in order
        self.num_cached_tokens = 0  # tokens whose K/V is in the cache when the step starts
        self.text = ""  # settled decoded output, kept only when stop strings are asked for (detokenize.py)
        self.prompt_context = None  # detokenize.PromptContext: where the output's decoding starts in the prompt
        self.text_offsets = (0, 0)  # output tokens: (start of the decode context, < 0 in the prompt; settled end)
        self.text_context: str | None = None  # that context's text decoded alone (set at the first step)
        self.stop_text_end: int | None = None
        self.finish_reason: str | None = None

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == Status.FINISHED

    def num_blocks_needed(self, block_size: int) -> int:
        return (len(self.token_ids) + block_size - 1) // block_size

