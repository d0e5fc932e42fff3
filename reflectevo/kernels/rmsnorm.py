"""RMSNorm (Llama / Hugging Face semantics), a PyTorch reference and Triton forward/backward kernels.

Math, per row x of length N (any leading shape, normalised over the last dim):

    rstd = 1 / sqrt(mean(x^2) + eps)                 (in fp32; fp64 for fp64 inputs)
    xhat = x * rstd
    y    = weight * xhat.to(x.dtype)                  (the product rounded once to x.dtype)

Hugging Face's LlamaRMSNorm normalises in fp32, casts back to the input dtype and then multiplies by the weight;
we do the same. One departure: the result is always returned in ``x.dtype`` (HF would promote a bf16 input with
an fp32 weight to fp32).

Backward (g = dy * weight):

    dx      = rstd * (g - xhat * mean(g * xhat))
    dweight = sum over rows of dy * xhat.to(x.dtype)

Memory: the forward kernel reads x once and writes y and one fp32 ``rstd`` per row. Autograd keeps only x,
weight and rstd [rows]; autograd of the reference keeps an fp32 copy of x and the fp32 rounded-normalised x (two
fp32 tensors of x's shape: four times the bytes of a bf16 x). The backward kernel recomputes xhat from x and
rstd, writes dx in one pass and reduces dweight through per-program partial sums (no atomics); it skips dweight
entirely when the weight is frozen (LoRA / QLoRA).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from reflectevo.kernels import cpu_compiled
from reflectevo.kernels._dispatch import HAS_TRITON, cdiv, next_power_of_2, sm_count, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

_MAX_BLOCK = 65536  # one row must fit in one program; wider rows take the PyTorch path


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Plain PyTorch RMSNorm, the same operations as Hugging Face's LlamaRMSNorm (output in x.dtype)."""
    compute = _compute_dtype(x.dtype)
    xc = x.to(compute)
    rstd = torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)
    normed = (xc * rstd).to(x.dtype)
    return (weight.to(compute) * normed.to(compute)).to(x.dtype)


if HAS_TRITON:

    @triton.jit
    def _rms_norm_fwd_kernel(X, W, Y, RSTD, stride_x, stride_y, N, eps,
                             BLOCK: tl.constexpr, COMPUTE: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < N
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(COMPUTE)
        w = tl.load(W + cols, mask=mask, other=0.0).to(COMPUTE)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps)
        xhat = (x * rstd).to(X.dtype.element_ty).to(COMPUTE)
        tl.store(Y + row * stride_y + cols, (xhat * w).to(Y.dtype.element_ty), mask=mask)
        tl.store(RSTD + row, rstd)

    @triton.jit
    def _rms_norm_bwd_kernel(DY, X, W, RSTD, DX, DW_PARTIAL, stride_dy, stride_x, stride_dx, M, N,
                             rows_per_program,
                             BLOCK: tl.constexpr, COMPUTE: tl.constexpr, HAS_DW: tl.constexpr):
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < N
        w = tl.load(W + cols, mask=mask, other=0.0).to(COMPUTE)
        dw_acc = tl.zeros([BLOCK], dtype=COMPUTE)
        row_start = pid.to(tl.int64) * rows_per_program
        row_end = tl.minimum(row_start + rows_per_program, M)
        for r in range(row_start, row_end):
            x = tl.load(X + r * stride_x + cols, mask=mask, other=0.0).to(COMPUTE)
            dy = tl.load(DY + r * stride_dy + cols, mask=mask, other=0.0).to(COMPUTE)
            rstd = tl.load(RSTD + r)
            xhat = x * rstd
            g = dy * w
            c = tl.sum(g * xhat, axis=0) / N
            dx = (g - xhat * c) * rstd
            tl.store(DX + r * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
            if HAS_DW:
                dw_acc += dy * xhat.to(X.dtype.element_ty).to(COMPUTE)
        if HAS_DW:
            tl.store(DW_PARTIAL + pid.to(tl.int64) * N + cols, dw_acc, mask=mask)


def _tl_compute(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _num_warps(block: int) -> int:
    return 4 if block <= 1024 else (8 if block <= 4096 else 16)


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """[..., N] -> [M, N] with unit stride along N (copies only when it must)."""
    t2 = t.reshape(-1, n)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _bwd_programs(rows: int, device: torch.device) -> int:
    if device.type == "cuda":
        return max(1, min(rows, 4 * sm_count(device)))
    return max(1, min(rows, 4))


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float):
        n = x.shape[-1]
        x2 = _rows(x, n)
        w = weight.contiguous()
        m = x2.shape[0]
        compute = _compute_dtype(x.dtype)
        y = torch.empty((m, n), dtype=x.dtype, device=x.device)
        rstd = torch.empty(m, dtype=compute, device=x.device)
        block = next_power_of_2(n)
        if m > 0:
            _rms_norm_fwd_kernel[(m,)](x2, w, y, rstd, x2.stride(0), y.stride(0), n, eps,
                                       BLOCK=block, COMPUTE=_tl_compute(x.dtype), num_warps=_num_warps(block))
        ctx.save_for_backward(x2, w, rstd)
        ctx.x_shape = x.shape
        ctx.weight_dtype = weight.dtype
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, w, rstd = ctx.saved_tensors
        m, n = x2.shape
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dy2 = _rows(dy, n)
        dx = torch.empty_like(x2, memory_format=torch.contiguous_format)
        programs = _bwd_programs(m, x2.device)
        rows_per_program = cdiv(m, programs) if m > 0 else 1
        programs = cdiv(m, rows_per_program) if m > 0 else 0
        # every program writes its whole row of partial sums; a frozen weight gets a 1-element placeholder (no
        # fill kernel either way)
        alloc = torch.empty if m > 0 else torch.zeros
        dw_partial = alloc((max(programs, 1), n) if need_dw else (1,), dtype=rstd.dtype, device=x2.device)
        block = next_power_of_2(n)
        if m > 0:
            _rms_norm_bwd_kernel[(programs,)](dy2, x2, w, rstd, dx, dw_partial, dy2.stride(0), x2.stride(0),
                                              dx.stride(0), m, n, rows_per_program,
                                              BLOCK=block, COMPUTE=_tl_compute(x2.dtype), HAS_DW=need_dw,
                                              num_warps=_num_warps(block))
        dweight = dw_partial.sum(0).to(ctx.weight_dtype) if need_dw else None
        return (dx.view(ctx.x_shape) if need_dx else None), dweight, None


class _RMSNormCastCPU(torch.autograd.Function):
    """fp32 RMSNorm on the CPU whose output is written in a 16-bit dtype: y = round(weight * x * rstd), the
    value an autocast linear would cast the fp32 output to, without the fp32 output tensor or the cast (once per
    consuming linear under autocast). Backward in fp32 from the 16-bit dy, with xhat recomputed:
    dx = rstd * (g - xhat * mean(g * xhat)), g = dy * weight; dweight = sum of dy * xhat over rows.
    Inside ``cpu_compiled.compiled_cpu_kernels`` each direction is one compiled loop (a trained weight: eager)."""

    @staticmethod
    def forward(ctx, x, weight, eps: float, out_dtype: torch.dtype):
        ctx.compiled = cpu_compiled.active(x)
        if ctx.compiled:
            y, rstd = cpu_compiled.rmsnorm_cast_fwd(x, weight, eps, out_dtype)
        else:
            rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
            y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
            torch.mul(x * rstd, weight, out=y)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        if ctx.compiled and not ctx.needs_input_grad[1]:
            return cpu_compiled.rmsnorm_cast_bwd(dy, x, weight, rstd), None, None, None
        xhat = x * rstd
        g = dy * weight
        dx = dweight = None
        if ctx.needs_input_grad[1]:
            dweight = (dy * xhat).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            dot = torch.linalg.vecdot(g, xhat).unsqueeze(-1).div_(x.shape[-1])
            dx = g.addcmul_(xhat, dot, value=-1).mul_(rstd)
        return dx, dweight, None, None


class _AddRMSNormCastCPU(torch.autograd.Function):
    """s = x + y (fp32 x, y of any float dtype) and h = round(RMSNorm(s)) in a 16-bit dtype, as one compiled loop
    each way (``cpu_compiled.add_rmsnorm_cast_*``): the residual add and the norm read x and y once, and the
    backward writes dx = ds + dnorm and its rounding to y's dtype in the same pass (the eager graph: the norm's
    backward, the sum of the two gradients of s, the cast for y: three passes). Frozen weight only."""

    @staticmethod
    def forward(ctx, x, y, weight, eps: float, out_dtype: torch.dtype):
        s, h, rstd = cpu_compiled.add_rmsnorm_cast_fwd(x, y, weight, eps, out_dtype)
        ctx.save_for_backward(s, weight, rstd)
        ctx.y_dtype = y.dtype
        return s, h

    @staticmethod
    def backward(ctx, ds, dh):
        s, weight, rstd = ctx.saved_tensors
        dx, dy = cpu_compiled.add_rmsnorm_cast_bwd(ds, dh, s, weight, rstd, ctx.y_dtype)
        return dx, dy, None, None, None


def add_rms_norm(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float,
                 out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + y, rms_norm(x + y, weight, eps, out_dtype)): one fused node for fp32 CPU x, a frozen fp32 weight and
    a 16-bit out_dtype inside ``cpu_compiled.compiled_cpu_kernels``; otherwise the two ops."""
    if (cpu_compiled.active(x) and x.dtype == weight.dtype == torch.float32 and not weight.requires_grad
            and y.device == x.device and y.is_floating_point() and y.dtype != torch.float64 and y.shape == x.shape
            and out_dtype in (torch.bfloat16, torch.float16) and not use_triton(x)):
        return _AddRMSNormCastCPU.apply(x, y, weight, float(eps), out_dtype)
    s = x + y
    return s, rms_norm(s, weight, eps, out_dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6,
             out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """RMSNorm over the last dim of ``x`` (any leading shape), Llama/HF semantics, result in ``x.dtype``.

    Triton on CUDA (and on CPU under the interpreter when forced); otherwise torch's rms_norm for fp32 and the
    PyTorch reference for other dtypes. ``out_dtype`` (16-bit, for fp32 CPU tensors): the result rounded to it
    in the same pass, as the 16-bit input of autocast linears (``_RMSNormCastCPU``); other cases cast after.
    """
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"rms_norm: weight shape {tuple(weight.shape)} does not match x's last dim {x.shape[-1]}")
    if weight.device != x.device:
        raise ValueError(f"rms_norm: weight is on {weight.device}, x on {x.device}")
    if out_dtype is not None and out_dtype != x.dtype:
        if (x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
                and out_dtype in (torch.bfloat16, torch.float16) and not use_triton(x)):
            return _RMSNormCastCPU.apply(x, weight, float(eps), out_dtype)
        return rms_norm(x, weight, eps).to(out_dtype)
    if use_triton(x) and x.shape[-1] <= _MAX_BLOCK and x.is_floating_point():
        return _RMSNormFunction.apply(x, weight, float(eps))
    if x.dtype == weight.dtype == torch.float32:
        # PyTorch's own op: in fp32 on the CPU (torch 2.13) bitwise the reference's output and gradients, in fewer
        # passes ([1826, 576] forward + backward, 2 threads: 7.0 ms vs 10.4 ms)
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return rms_norm_reference(x, weight, eps)
