"""SamplingParams: how one request is sampled (the vLLM names and meanings).

Order of the logits processing, per sequence: repetition penalty (over prompt and output tokens, as
transformers / vLLM), then temperature 0 -> argmax; otherwise divide by the temperature, keep the top_k
tokens, keep the smallest set whose probability reaches top_p, drop tokens below min_p * max probability,
and sample from what is left.
"""
from __future__ import annotations

from dataclasses import dataclass, field


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
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        try:
            self.stop_token_ids = [int(t) for t in (self.stop_token_ids or [])]
        except (TypeError, ValueError):
            raise ValueError(f"SamplingParams.stop_token_ids must be None or a list of ints, "
                             f"got {self.stop_token_ids!r}") from None
        checks = [
            (isinstance(self.n, int) and self.n >= 1, "n", "an int >= 1"),
            (self.temperature >= 0.0, "temperature", ">= 0"),
            (0.0 < self.top_p <= 1.0, "top_p", "in (0, 1]"),
            (isinstance(self.top_k, int) and self.top_k >= -1, "top_k", "an int >= -1 (0 or -1 = off)"),
            (0.0 <= self.min_p <= 1.0, "min_p", "in [0, 1]"),
            (isinstance(self.max_tokens, int) and self.max_tokens >= 1, "max_tokens", "an int >= 1"),
            (self.repetition_penalty > 0.0, "repetition_penalty", "> 0"),
            (self.seed is None or isinstance(self.seed, int), "seed", "None or an int"),
            (all(isinstance(s, str) and s for s in self.stop), "stop", "a list of non-empty strings"),
        ]
        for ok, name, what in checks:
            if not ok:
                raise ValueError(f"SamplingParams.{name} must be {what}, got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
