"""Causal attention for 16-bit training on the CPU: PyTorch's fused CPU kernel forward in 16 bits, its backward
in fp32.

Math (per head, scale s = 1/sqrt(D)): P = softmax(s Q Kᵀ + causal mask), O = P V, with lse the row log-sum-exps.
Backward, with P recomputed from lse and D_i = rowsum(dO ∘ O):

    dV = Pᵀ dO,   dP = dO Vᵀ,   dS = P ∘ (dP - D),   dQ = s dS K,   dK = s dSᵀ Q

Why: ``scaled_dot_product_attention`` on bf16 CPU tensors runs the backward of
``_scaled_dot_product_flash_attention_for_cpu`` in bf16, which is both slower than the same kernel in fp32 and
less exact. Here the forward is that kernel's 16-bit call (at a padded length, below), and the backward upcasts
dO, Q, K, V and O (each [heads, tokens, D], small next to the attention work) and runs the kernel's fp32
backward with the forward's fp32 lse; the gradients are rounded once to the input dtype. Measured on a 2-core
AMX Xeon, one sequence of 460 tokens, 9 query heads over 3 KV heads, D = 64, torch 2.13: backward 8.3-8.6 ms vs
9.8 ms, and the relative error of dK / dV against fp64 0.24 % vs 1.3-1.7 % (dQ 0.21 % vs 0.26 %).
Memory: saves the same tensors as SDPA's own backward (Q, K, V, O, lse); the fp32 copies live only inside the
backward call.

Packed rows (``packed_causal_attention``: several sequences back to back, no attention across them): the same
forward, one call per sequence; the backward of all of them in ONE fp32 kernel call over a batch of the sequences
zero-padded to the longest. The kernel's backward shares out its work by (batch, head) only, so one sequence of 9
heads on 2 threads leaves a thread idle for a ninth of the call (measured at 460 tokens: 9 heads 9.9 ms, 8 heads
7.0 ms, 10 heads 10.1 ms); the batch gives it B x 9 items. Padding is exact: a padded query has dO = O = 0, so
D = 0, dP = 0 and dS = 0 (it adds nothing to dK / dV), and no real query sees a padded key (they come after it).
Taken while the padded work B * max(L)^2 stays within 1.15 x sum(L^2); otherwise one call per sequence.
Four sequences of 435-466 tokens: 40-41 ms vs 45 ms in four calls. Memory: the padded fp32 batch of dO, Q, K, V,
O and the gradients, transient (4 x 466 tokens, 9 + 3 + 3 heads of 64: ~25 MB).

Padded forward: the 16-bit forward kernel's time jumps with the sequence length in a way the work does not
explain (torch 2.13, 2-core AMX Xeon, one sequence of 9 over 3 heads: 464 tokens 1.8 ms, 466 tokens 5.8 ms, 480
tokens 1.8 ms; 253 tokens 2.3 ms, 256 tokens 0.55 ms), while lengths that are multiples of 16 run smoothly. So the
16-bit forward runs on q / k / v zero-padded at the end to a multiple of 16 (exact for causal attention: no real
query sees a later key) and returns the first L rows of O and lse. Over 24 random lengths from 40 to 1100: 51.7 vs
70.6 ms in all; the packed SFT batch of the CPU bench (466, 435, 460, 461 tokens): 5.0 vs 6.9 ms a layer. The
padded copies (L x 15 heads x 64 x 2 bytes, ~0.9 MB at 466 tokens) live only inside the call.
"""
from __future__ import annotations

import torch

_FWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_BWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


PAD_MULTIPLE = 16


def causal_forward16(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(O, lse) of the fused CPU kernel for q [B, Hq, L, D], k / v [B, Hkv, L, D], run at L rounded up to a
    multiple of ``PAD_MULTIPLE`` (see the module docstring); O and lse are views of the first L rows."""
    length = q.shape[2]
    padded = -(-length // PAD_MULTIPLE) * PAD_MULTIPLE
    if padded == length:
        return _FWD(q, k, v, 0.0, True)[:2]
    ins = []
    for t in (q, k, v):
        p = t.new_empty(t.shape[0], t.shape[1], padded, t.shape[3])
        p[:, :, :length] = t
        p[:, :, length:] = 0
        ins.append(p)
    out, lse = _FWD(*ins, 0.0, True)[:2]
    return out[:, :, :length], lse[:, :, :length].contiguous()


def _fp32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32)  # strides kept: the model's [B, H, T, D] views of [B, T, H, D] memory suit the kernel


class _CausalAttention16(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v):
        out, lse = causal_forward16(q, k, v)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _BWD(_fp32(dout), _fp32(q), _fp32(k), _fp32(v), _fp32(out), lse, 0.0, True)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _padded_fp32(parts: list[torch.Tensor], length: int) -> torch.Tensor:
    """[L_i, h, D] pieces (any dtype) -> [n, h, length, D] fp32, zero beyond each L_i: a view of [n, length, h, D]
    memory, the layout the kernel works in (given [n, h, length, D] memory, it copies one input to its own)."""
    out = torch.empty(len(parts), length, *parts[0].shape[1:], dtype=torch.float32, device=parts[0].device)
    for i, t in enumerate(parts):
        out[i, :t.shape[0]] = t
        out[i, t.shape[0]:] = 0
    return out.transpose(1, 2)


class _PackedCausalAttention16(torch.autograd.Function):
    """q [R, T, Hq, D], k / v [R, T, Hkv, D] (16-bit) holding sequences at ``spans`` = ((row, start, end), ...)
    covering every position -> out [R, T, Hq, D]."""

    @staticmethod
    def forward(ctx, q, k, v, spans):
        out = torch.empty_like(q)
        lses = []
        for r, s, e in spans:
            o, lse = causal_forward16(*(t[r:r + 1, s:e].transpose(1, 2) for t in (q, k, v)))
            out[r:r + 1, s:e] = o.transpose(1, 2)
            lses.append(lse)
        ctx.save_for_backward(q, k, v, out, *lses)
        ctx.spans = spans
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, *lses = ctx.saved_tensors
        spans, length = ctx.spans, max(e - s for _, s, e in ctx.spans)
        grads = [torch.empty_like(t) for t in (q, k, v)]
        padded = [_padded_fp32([t[r, s:e] for r, s, e in spans], length) for t in (dout, q, k, v, out)]
        lse = torch.zeros(len(spans), lses[0].shape[1], length, dtype=torch.float32, device=q.device)
        for i, x in enumerate(lses):
            lse[i, :, :x.shape[2]] = x[0]
        dq, dk, dv = _BWD(*padded, lse, 0.0, True)[:3]
        for i, (r, s, e) in enumerate(spans):
            for g, d in zip(grads, (dq, dk, dv)):
                g[r, s:e] = d[i, :, :e - s].transpose(0, 1)
        return (*grads, None)


def packed_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spans) -> torch.Tensor | None:
    """Causal attention inside each span (row, start, end) of q [R, T, Hq, D], k / v [R, T, Hkv, D], with the
    stacked fp32 backward above; None where padding to the longest span would cost over 15 % more work (the
    caller then runs one call per span)."""
    lengths = [e - s for _, s, e in spans]
    if len(spans) < 2 or len(spans) * max(lengths) ** 2 > 1.15 * sum(n * n for n in lengths):
        return None
    return _PackedCausalAttention16.apply(q, k, v, tuple(spans))


def is_cpu16(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """16-bit CPU tensors of one dtype: the fused kernel's forward runs padded (``causal_forward16``)."""
    return q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16) and q.dtype == k.dtype == v.dtype


def wants_fp32_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """True for 16-bit CPU tensors of a causal call that autograd will differentiate."""
    return is_cpu16(q, k, v) and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)


def causal_attention_fp32_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention over q [B, Hq, T, D], k / v [B, Hkv, T, D] (Hq a multiple of Hkv, grouped as SDPA's
    enable_gqa): the 16-bit forward of PyTorch's fused CPU kernel, its fp32 backward."""
    return _CausalAttention16.apply(q, k, v)
