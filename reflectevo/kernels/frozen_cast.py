"""16-bit copies of frozen fp32 weights, converted once instead of at every use.

Under CPU autocast every F.linear casts its fp32 weight to the autocast dtype, and autocast keeps that cast only
for leaves that require grad: a frozen base (LoRA) or head is converted again at every forward, one read of 4 and
one write of 2 bytes a parameter (SmolLM2-135M: ~60 ms a step on a 2-core CPU). ``cast_frozen`` keeps the copy
while the weight is alive and unchanged (its ``_version`` and storage checked at each call, so an in-place update
or a new storage converts again) and drops it with the weight. The copy is exactly ``w.to(dtype)``.
Memory: 2 bytes a cached parameter, for as long as the weight lives. Used for the frozen head
(``linear_logprobs``); frozen LoRA bases keep a wider buffer of their own ([W | s B], ``model/lora_node16.py``).
"""
from __future__ import annotations

import weakref

import torch

_COPIES: dict = {}  # (id(weight), dtype) -> (weakref, _version, data_ptr, copy)


def cast_frozen(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``w.to(dtype)`` (detached), kept while ``w`` is alive and unchanged."""
    if w.dtype == dtype:
        return w
    key = (id(w), dtype)
    hit = _COPIES.get(key)
    if hit is not None and hit[0]() is w and hit[1] == w._version and hit[2] == w.data_ptr():
        return hit[3]
    copy = w.detach().to(dtype)
    if hit is None:
        weakref.finalize(w, _COPIES.pop, key, None)
    _COPIES[key] = (weakref.ref(w), w._version, w.data_ptr(), copy)
    return copy
