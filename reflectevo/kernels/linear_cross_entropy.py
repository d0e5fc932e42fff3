"""Fused lm_head + cross-entropy for SFT, on the ``linear_logprobs`` machinery (no [N, V] logits).

Math: for hidden rows h_i, lm_head W and labels y_i (ignore_index skipped)::

    ce_i = lse_i - h_i . w_{y_i} = -logp_i,   lse_i = log sum_j exp(h_i . w_j)
    "mean": sum_i ce_i / #valid   (0 when no token is valid, never NaN)
    "sum":  sum_i ce_i            "none": ce [...] float32, 0 on ignored tokens

The Triton kernels, the autograd.Function and the chunked CPU path are those of
:mod:`reflectevo.kernels.linear_logprobs` (forward saves only lse [N] fp32; backward recomputes the logit tiles):
the reduction is a handful of elementwise torch ops on [N] floats whose gradient reaches the fused backward as
the per-token upstream gradient (-1/#valid for "mean"). FLOPs per token (see linear_logprobs for why): Triton
6HV with a frozen head, 8HV with a trainable one; CPU chunked path 4HV / 8HV. Memory saved versus the naive path:
the fp32 logits and their log-softmax (8 * N * V bytes each) replaced by 8 * N bytes of row max / log-sum.
"""
from __future__ import annotations

import torch

from reflectevo.kernels.linear_logprobs import linear_logprobs, linear_logprobs_reference

REDUCTIONS = ("mean", "sum", "none")


def linear_cross_entropy_reference(hidden, weight, labels, ignore_index: int = -100, reduction: str = "mean"):
    """Teaching version: full fp32 logits + torch cross_entropy (memory O(N * V))."""
    logits = hidden.float() @ weight.float().T
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).long(),
                                           ignore_index=ignore_index, reduction="none").reshape(labels.shape)
    return _reduce(ce, labels != ignore_index, reduction)


def _reduce(ce: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return ce
    total = ce.sum()
    if reduction == "sum":
        return total
    return total / valid.sum().clamp(min=1).to(total.dtype)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         ignore_index: int = -100, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of softmax(hidden @ weight.T) against labels without materialising the logits.

    hidden [..., H], weight [V, H], labels [...]. reduction "mean" (over non-ignored tokens; 0 if none),
    "sum", or "none" (per-token float32, 0 on ignored tokens). Gradient w.r.t. weight only when it requires grad.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    logp = linear_logprobs(hidden, weight, labels, ignore_index=ignore_index)
    return _reduce(-logp, labels != ignore_index, reduction)


__all__ = ["linear_cross_entropy", "linear_cross_entropy_reference", "linear_logprobs_reference"]
