"""SamplingParams: how one request is sampled (the vLLM names and meanings).

Order of the logits processing, per sequence: repetition penalty (over prompt and output tokens, as
transformers / vLLM), then greedy argmax when the temperature is below ``GREEDY_TEMPERATURE`` (0, or as vLLM
any temperature < 1e-5, where dividing by it would only overflow); otherwise divide by the temperature, keep the
top_k tokens (and every token tied with the k-th), keep the smallest set whose probability reaches top_p, drop
tokens below min_p * max probability, and sample from what is left.

The fields are checked when the object is built and again by ``Engine.generate`` (``validate``), so a field set
afterwards is checked too; ``stop`` given as one string and ``stop_token_ids`` as any sequence are normalised
to lists.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

GREEDY_TEMPERATURE = 1e-5


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no top-k cut
    min_p: float = 0.0
    max_tokens: int = 256
    stop: list[str] | str | None = field(default_factory=list)
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    skip_special_tokens: bool = True

    def __post_init__(self):
        self.validate()

    def validate(self) -> "SamplingParams":
        """Check every field (ValueError naming the first bad one); normalise ``stop`` and ``stop_token_ids``."""
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        elif self.stop is None or isinstance(self.stop, (list, tuple)):
            self.stop = list(self.stop or [])
        ids = self.stop_token_ids
        if ids is None or (isinstance(ids, (list, tuple)) and all(_is_int(t) and t >= 0 for t in ids)):
            self.stop_token_ids = [int(t) for t in ids or []]
        else:
            self._fail("stop_token_ids", "None or a list of non-negative ints")
        checks = [
            (_is_int(self.n) and self.n >= 1, "n", "an int >= 1"),
            (_is_real(self.temperature) and self.temperature >= 0.0, "temperature", "a finite number >= 0"),
            (_is_real(self.top_p) and 0.0 < self.top_p <= 1.0, "top_p", "a number in (0, 1]"),
            (_is_int(self.top_k) and self.top_k >= -1, "top_k", "an int >= -1 (0 or -1 = off)"),
            (_is_real(self.min_p) and 0.0 <= self.min_p <= 1.0, "min_p", "a number in [0, 1]"),
            (_is_int(self.max_tokens) and self.max_tokens >= 1, "max_tokens", "an int >= 1"),
            (_is_real(self.repetition_penalty) and self.repetition_penalty > 0.0, "repetition_penalty",
             "a finite number > 0"),
            (self.seed is None or _is_int(self.seed), "seed", "None or an int"),
            (isinstance(self.stop, list) and all(isinstance(s, str) and s for s in self.stop), "stop",
             "a string or a list of non-empty strings"),
            (isinstance(self.ignore_eos, bool), "ignore_eos", "a bool"),
            (isinstance(self.skip_special_tokens, bool), "skip_special_tokens", "a bool"),
        ]
        for ok, name, what in checks:
            if not ok:
                self._fail(name, what)
        return self

    def _fail(self, name: str, what: str):
        raise ValueError(f"SamplingParams.{name} must be {what}, got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE
