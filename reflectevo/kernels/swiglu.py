"""SwiGLU gate of the Llama MLP, a PyTorch reference and Triton forward/backward kernels.

Math (elementwise, computed in fp32 — fp64 for fp64 inputs — and rounded once to the input dtype):

    y = silu(gate) * up,   silu(g) = g * sigmoid(g)

Backward, with s = sigmoid(g):

    d_up   = dy * g * s
    d_gate = dy * up * s * (1 + g * (1 - s))

Memory: the forward kernel writes only y. Autograd keeps gate and up (which the MLP has anyway) and the
backward kernel recomputes sigmoid from them, so no [tokens, ffn] intermediate is stored. The reference keeps
fp32 copies of gate and up plus silu(gate) for backward (three extra [tokens, ffn] tensors, each twice the bytes
of a bf16 input), and Hugging Face's bf16 path keeps silu(gate).

16-bit inputs on the CPU (bf16 autocast training there) take ``_SwiGLUHalfCPU``: Hugging Face's bf16 rounding
points instead of one rounding (silu(gate) rounded to the input dtype, then the product; backward: dy * up
rounded, then silu's derivative), bitwise its forward and autograd. The reference's fp32 round trip is five
passes over [tokens, ffn] in forward and seven in backward; this is two and three, and it keeps only gate and up
(silu is recomputed in backward). Forward + backward at [1822, 1536] bf16 on a 2-core AMX Xeon: 7 ms vs 25 ms.
Inside ``cpu_compiled.compiled_cpu_kernels`` each direction is one compiled loop with the same roundings.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from reflectevo.kernels import cpu_compiled
from reflectevo.kernels._dispatch import HAS_TRITON, cdiv, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

_BLOCK = 1024


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch silu(gate) * up in fp32 (fp64 for fp64 inputs), returned in gate's dtype."""
    compute = _compute_dtype(gate.dtype)
    return (F.silu(gate.to(compute)) * up.to(compute)).to(gate.dtype)


if HAS_TRITON:

    @triton.jit
    def _sigmoid(g):
        e = tl.exp(-tl.abs(g))  # never overflows
        return tl.where(g >= 0, 1.0 / (1.0 + e), e / (1.0 + e))

    @triton.jit
    def _swiglu_fwd_kernel(G, U, Y, numel, BLOCK: tl.constexpr, COMPUTE: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        g = tl.load(G + offs, mask=mask, other=0.0).to(COMPUTE)
        u = tl.load(U + offs, mask=mask, other=0.0).to(COMPUTE)
        s = _sigmoid(g)
        tl.store(Y + offs, (g * s * u).to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_bwd_kernel(DY, G, U, DG, DU, numel, BLOCK: tl.constexpr, COMPUTE: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(COMPUTE)
        g = tl.load(G + offs, mask=mask, other=0.0).to(COMPUTE)
        u = tl.load(U + offs, mask=mask, other=0.0).to(COMPUTE)
        s = _sigmoid(g)
        tl.store(DU + offs, (dy * g * s).to(DU.dtype.element_ty), mask=mask)
        tl.store(DG + offs, (dy * u * s * (1.0 + g * (1.0 - s))).to(DG.dtype.element_ty), mask=mask)


def _tl_compute(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


class _SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor):
        g, u = gate.contiguous(), up.contiguous()
        y = torch.empty(g.shape, dtype=gate.dtype, device=g.device)
        n = y.numel()
        if n:
            _swiglu_fwd_kernel[(cdiv(n, _BLOCK),)](g, u, y, n, BLOCK=_BLOCK,
                                                         COMPUTE=_tl_compute(gate.dtype), num_warps=4)
        ctx.save_for_backward(g, u)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        g, u = ctx.saved_tensors
        dy = dy.contiguous()
        dg = torch.empty_like(g, memory_format=torch.contiguous_format)
        du = torch.empty_like(u, memory_format=torch.contiguous_format)
        n = g.numel()
        if n:
            _swiglu_bwd_kernel[(cdiv(n, _BLOCK),)](dy, g, u, dg, du, n, BLOCK=_BLOCK,
                                                         COMPUTE=_tl_compute(g.dtype), num_warps=4)
        return (dg if ctx.needs_input_grad[0] else None), (du if ctx.needs_input_grad[1] else None)


class _SwiGLUHalfCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor):
        ctx.save_for_backward(gate, up)
        ctx.compiled = cpu_compiled.active(gate)
        return cpu_compiled.swiglu16_fwd(gate, up) if ctx.compiled else F.silu(gate).mul_(up)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        gate, up = ctx.saved_tensors
        if ctx.compiled:
            return cpu_compiled.swiglu16_bwd(dy, gate, up)
        dg = torch.ops.aten.silu_backward(dy * up, gate) if ctx.needs_input_grad[0] else None
        du = F.silu(gate).mul_(dy) if ctx.needs_input_grad[1] else None
        return dg, du


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up (same shapes), returned in gate's dtype: computed in fp32, except 16-bit CPU tensors
    without Triton, which round as Hugging Face's bf16 MLP does (see the module docstring)."""
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate shape {tuple(gate.shape)} and up shape {tuple(up.shape)} differ")
    if gate.device != up.device:
        raise ValueError(f"swiglu: gate is on {gate.device}, up on {up.device}")
    if use_triton(gate) and gate.is_floating_point():
        return _SwiGLUFunction.apply(gate, up)
    if gate.dtype == up.dtype == torch.float32 and not (torch.is_grad_enabled() and (gate.requires_grad or
                                                                                       up.requires_grad)):
        return F.silu(gate).mul_(up)  # the reference's result with one [T, I] buffer instead of two
    if gate.dtype == up.dtype and gate.dtype in (torch.bfloat16, torch.float16) and gate.device.type == "cpu":
        return _SwiGLUHalfCPU.apply(gate, up)
    return swiglu_reference(gate, up)
