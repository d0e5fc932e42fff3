"""Learning-rate schedule: linear warm-up, then cosine / linear decay or constant. A pure function of the step,
so a resumed run needs only the step number to continue it exactly."""
from __future__ import annotations

import math


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    return int(math.ceil(warmup_ratio * total_steps))


def lr_at(step: int, total_steps: int, base_lr: float, warmup_ratio: float, kind: str = "cosine") -> float:
    """Learning rate of optimizer step ``step`` (0-based) out of ``total_steps``.

    warm-up (step < W):  base * (step + 1) / W          (never 0, so the first step already learns)
    then p = (step - W) / (total - W) in [0, 1):
        cosine   base * 0.5 * (1 + cos(pi p))
        linear   base * (1 - p)
        constant base
    """
    w = warmup_steps(total_steps, warmup_ratio)
    if step < w:
        return base_lr * (step + 1) / w
    if kind == "constant":
        return base_lr
    p = (step - w) / max(1, total_steps - w)
    if kind == "linear":
        return base_lr * (1.0 - p)
    if kind == "cosine":
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * p))
    raise ValueError(f"scheduler: unknown kind {kind!r}")
