"""Fused lm_head + cross-entropy for SFT, on the ``linear_logprobs`` machinery (no [N, V] logits).

Math: for hidden rows h_i, lm_head W and labels y_i (ignore_index skipped)::

    ce_i = lse_i - h_i . w_{y_i} = -logp_i,   lse_i = log sum_j exp(h_i . w_j)
    "mean": sum_i ce_i / #valid   (0 when no token is valid, never NaN)
    "sum":  sum_i ce_i            "none": ce [...] float32, 0 on ignored tokens

Design: gradients in forward for "mean" and "sum". The loss is sum_i r_i logp_i with r_i known before the
backward (-1/#valid or -1 on valid tokens, 0 elsewhere), so one sweep of ``chunked_pass`` with those row weights
gives the loss, dH = G @ W and (trainable head) dW = G^T @ H; the backward only scales them by the upstream
scalar. FLOPs per token: 4HV with a frozen head, 6HV with a trainable one, the same matmuls as the naive path
(logits, dH, dW) without its [N, V] log-softmax and gradient tensors. Memory: dH [N, H] and dW [V, H] are held
from forward to backward (they are the gradients the naive path creates anyway), plus one chunk of logits.
"none" (and ``impl="tiles"``) goes through ``linear_logprobs``, whose backward gets per-token gradients.
"""
from __future__ import annotations

import torch

from reflectevo.kernels._dispatch import use_triton
from reflectevo.kernels.linear_logprobs import (chunked_pass, cpu_bf16_products, empty_batch_zeros,
                                                linear_logprobs, linear_logprobs_reference, prepare)

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


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, valid, scale, triton_rows: bool, want_dx: bool, want_dw: bool,
                low_precision: bool, bf16_products: bool = False):
        loss_weight = valid.float() * scale  # loss = -sum_i loss_weight_i logp_i
        logp, dx, dw = chunked_pass(hidden, weight, labels, valid, -loss_weight, want_dx, want_dw, triton_rows,
                                    low_precision, bf16_products)
        ctx.grads = (dx, dw)  # scaled in place by the backward: no second [V, H] buffer
        ctx.hidden_dtype, ctx.weight_dtype = hidden.dtype, weight.dtype
        return -(logp * loss_weight).sum()

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.grads is None:
            raise RuntimeError("linear_cross_entropy: its gradients are computed in the forward and handed out once; "
                               "backward through the same loss twice (retain_graph) is not supported")
        dx, dw = ctx.grads
        ctx.grads = None
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gx = dx.mul_(grad_loss.to(dx.dtype)).to(ctx.hidden_dtype) if need_dx else None
        gw = dw.mul_(grad_loss.to(dw.dtype)).to(ctx.weight_dtype) if need_dw else None
        return gx, gw, None, None, None, None, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         ignore_index: int = -100, reduction: str = "mean", impl: str = "auto") -> torch.Tensor:
    """Cross-entropy of softmax(hidden @ weight.T) against labels without materialising the logits.

    hidden [..., H], weight [V, H], labels [...]. reduction "mean" (over non-ignored tokens; 0 if none),
    "sum", or "none" (per-token float32, 0 on ignored tokens). Gradient w.r.t. weight only when it requires grad.
    ``impl`` as in ``linear_logprobs``.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    if reduction == "none" or impl == "tiles":
        logp = linear_logprobs(hidden, weight, labels, ignore_index=ignore_index, impl=impl)
        return _reduce(-logp, labels != ignore_index, reduction)
    x, w, flat_labels, valid, _ = prepare(hidden, weight, labels, ignore_index, impl)
    if x.shape[0] == 0:
        return empty_batch_zeros(x, w)
    scale = 1.0 / valid.sum().clamp(min=1).float() if reduction == "mean" else torch.ones((), device=x.device)
    grad_on = torch.is_grad_enabled()
    return LinearCrossEntropyFunction.apply(x, w, flat_labels, valid, scale, use_triton(x),
                                            grad_on and x.requires_grad, grad_on and w.requires_grad,
                                            impl == "chunks16", cpu_bf16_products(x))


__all__ = ["linear_cross_entropy", "linear_cross_entropy_reference", "linear_logprobs_reference"]
