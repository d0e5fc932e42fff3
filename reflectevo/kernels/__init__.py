"""Triton kernels, each next to its PyTorch reference (one file per op).

Every op dispatches on its inputs: CUDA tensors run the Triton kernel, CPU tensors a PyTorch path, and with
``TRITON_INTERPRET=1`` (how the tests run on a CPU) the Triton kernels run under the interpreter. The choice can
be forced with ``REFLECTEVO_KERNELS=torch|triton`` or the ``kernel_backend`` context manager.
"""
from __future__ import annotations

from reflectevo.kernels._dispatch import kernel_backend, use_triton
from reflectevo.kernels.dpo_loss import dpo_loss, sequence_logps
from reflectevo.kernels.linear_cross_entropy import linear_cross_entropy
from reflectevo.kernels.linear_logprobs import linear_logprobs
from reflectevo.kernels.nf4 import NF4Tensor, nf4_dequantize, nf4_quantize
from reflectevo.kernels.nf4_matmul import nf4_matmul
from reflectevo.kernels.paged_attention import paged_attention_decode, store_kv
from reflectevo.kernels.rmsnorm import rms_norm
from reflectevo.kernels.rope import apply_rope
from reflectevo.kernels.swiglu import swiglu

__all__ = [
    "NF4Tensor", "apply_rope", "dpo_loss", "kernel_backend", "linear_cross_entropy", "linear_logprobs",
    "nf4_dequantize", "nf4_matmul", "nf4_quantize", "paged_attention_decode", "rms_norm", "sequence_logps",
    "store_kv", "swiglu", "use_triton",
]
