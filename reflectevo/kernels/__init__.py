"""Triton kernels, each next to its PyTorch reference (one file per op)."""
from __future__ import annotations

import importlib

from reflectevo.kernels._dispatch import kernel_backend, use_triton  # noqa: F401

_EXPORTS = {
    "linear_logprobs": "reflectevo.kernels.linear_logprobs",
    "linear_cross_entropy": "reflectevo.kernels.linear_cross_entropy",
    "dpo_loss": "reflectevo.kernels.dpo_loss",
    "sequence_logps": "reflectevo.kernels.dpo_loss",
    "nf4_quantize": "reflectevo.kernels.nf4",
    "nf4_dequantize": "reflectevo.kernels.nf4",
    "NF4Tensor": "reflectevo.kernels.nf4",
    "nf4_matmul": "reflectevo.kernels.nf4_matmul",
    "rms_norm": "reflectevo.kernels.rmsnorm",
    "apply_rope": "reflectevo.kernels.rope",
    "swiglu": "reflectevo.kernels.swiglu",
    "paged_attention_decode": "reflectevo.kernels.paged_attention",
    "store_kv": "reflectevo.kernels.paged_attention",
}

__all__ = sorted(_EXPORTS) + ["kernel_backend", "use_triton"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'reflectevo.kernels' has no attribute {name!r}")
