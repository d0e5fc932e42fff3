"""The fully tiled Triton variant of ``linear_logprobs``: no logit tensor at all, not even a chunk of rows.

Same math as :mod:`reflectevo.kernels.linear_logprobs`. Every (token block x vocab block) logit tile lives only in
registers. The forward keeps the row max m_i and log s_i (lse = m + log s, kept apart so that
exp((z - m) - log s) stays accurate for |logits| ~ 1e4, where an fp32 lse has an ulp of ~1e-3), [N] fp32 each,
8 bytes a token; vocab splits run in parallel and are merged in PyTorch. The backward recomputes each logit tile,
turns it into G_ij = g_i (1[j == y_i] - p_ij) and adds G @ W into dH (and G^T @ H into dW) with fp32 atomics.

FLOPs per token: forward 2HV; backward 2HV (recompute) + 2HV (dH) [+ 2HV (dW) when the head trains]: 6HV with
a frozen head, 8HV with a trainable one. Extra memory: 8 bytes a token plus the fp32 dH accumulator (and dW fp32
when the head trains): the least of any variant.

Measured on an H200 (bench/results/2026-11-26-h200-kernels.md): 5x (frozen head) to 17x (trainable) slower than
the naive path, about 12% of the bf16 matmul peak. The backward is bound by its atomics: every vocab tile adds a
BLOCK_N x H partial into dH, N * H * V / BLOCK_V fp32 atomic adds in all. So the default is the row-chunk design
of ``linear_logprobs``; this one is kept, selectable with ``impl="tiles"``, for the smallest memory and as the
starting point of a split-vocab reduction. The atomics make gradients non-deterministic in the last bits.
"""
from __future__ import annotations

import torch

from reflectevo.kernels._dispatch import cdiv, sm_count

try:
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover
    triton = None


def _empty(shape, dtype, device) -> torch.Tensor:
    """Allocation for buffers the code must fully overwrite (tests replace it to poison them with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


if triton is not None:

    @triton.jit
    def _logit_tile(x_ptr, w_ptr, rows, cols, N, V, H, sxn, sxh, swv, swh,
                    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                    PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            hs = h0 + tl.arange(0, BLOCK_H)
            x = tl.load(x_ptr + rows[:, None] * sxn + hs[None, :] * sxh,
                        mask=(rows[:, None] < N) & (hs[None, :] < H), other=0.0)
            wt = tl.load(w_ptr + cols[None, :] * swv + hs[:, None] * swh,
                         mask=(cols[None, :] < V) & (hs[:, None] < H), other=0.0)
            if UPCAST:
                x, wt = x.to(tl.float32), wt.to(tl.float32)
            acc = tl.dot(x, wt, acc, input_precision=PRECISION)
        return acc

    @triton.jit
    def _fwd_kernel(x_ptr, w_ptr, labels_ptr, part_m_ptr, part_s_ptr, part_label_ptr,
                    N, V, H, sxn, sxh, swv, swh, blocks_per_split,
                    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                    PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        labels = tl.load(labels_ptr + rows, mask=rows < N, other=-1)
        m = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
        s = tl.zeros([BLOCK_N], dtype=tl.float32)
        picked = tl.zeros([BLOCK_N], dtype=tl.float32)
        v0 = pid_s * blocks_per_split * BLOCK_V
        # the first block of a split always holds a real column, so m is finite after it
        for b in range(0, blocks_per_split):
            cols = (v0 + b * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
            z = _logit_tile(x_ptr, w_ptr, rows, cols, N, V, H, sxn, sxh, swv, swh,
                            BLOCK_N, BLOCK_V, BLOCK_H, PRECISION, UPCAST)
            z = tl.where(cols[None, :] < V, z, float("-inf"))
            m_new = tl.maximum(m, tl.max(z, axis=1))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
            m = m_new
            picked += tl.sum(tl.where(cols[None, :] == labels[:, None], z, 0.0), axis=1)
        out = pid_s * N + rows
        tl.store(part_m_ptr + out, m, mask=rows < N)
        tl.store(part_s_ptr + out, s, mask=rows < N)
        tl.store(part_label_ptr + out, picked, mask=rows < N)

    @triton.jit
    def _bwd_kernel(x_ptr, w_ptr, labels_ptr, max_ptr, logsum_ptr, g_ptr, dx_ptr, dw_ptr,
                    N, V, H, sxn, sxh, swv, swh, num_v_blocks,
                    COMPUTE_DW: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                    BLOCK_H: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        pid = tl.program_id(0)
        pid_n = pid // num_v_blocks
        pid_v = pid % num_v_blocks
        rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        cols = (pid_v * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
        row_ok = rows < N
        col_ok = cols < V
        labels = tl.load(labels_ptr + rows, mask=row_ok, other=-1)
        row_max = tl.load(max_ptr + rows, mask=row_ok, other=0.0)
        log_sum = tl.load(logsum_ptr + rows, mask=row_ok, other=0.0)
        g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
        z = _logit_tile(x_ptr, w_ptr, rows, cols, N, V, H, sxn, sxh, swv, swh,
                        BLOCK_N, BLOCK_V, BLOCK_H, PRECISION, UPCAST)
        p = tl.where(col_ok[None, :], tl.exp((z - row_max[:, None]) - log_sum[:, None]), 0.0)
        onehot = tl.where(cols[None, :] == labels[:, None], 1.0, 0.0)
        grad_z_op = (g[:, None] * (onehot - p)).to(x_ptr.dtype.element_ty)  # tensor-core operand dtype
        if UPCAST:
            grad_z_op = grad_z_op.to(tl.float32)
        for h0 in range(0, H, BLOCK_H):
            hs = h0 + tl.arange(0, BLOCK_H)
            h_ok = hs < H
            w = tl.load(w_ptr + cols[:, None] * swv + hs[None, :] * swh,
                        mask=col_ok[:, None] & h_ok[None, :], other=0.0)
            if UPCAST:
                w = w.to(tl.float32)
            dx = tl.dot(grad_z_op, w, input_precision=PRECISION)
            tl.atomic_add(dx_ptr + rows[:, None] * H + hs[None, :], dx, mask=row_ok[:, None] & h_ok[None, :])
            if COMPUTE_DW:
                x = tl.load(x_ptr + rows[:, None] * sxn + hs[None, :] * sxh,
                            mask=row_ok[:, None] & h_ok[None, :], other=0.0)
                if UPCAST:
                    x = x.to(tl.float32)
                dw = tl.dot(tl.trans(grad_z_op), x, input_precision=PRECISION)
                tl.atomic_add(dw_ptr + cols[:, None] * H + hs[None, :], dw, mask=col_ok[:, None] & h_ok[None, :])


def _blocks(x: torch.Tensor):
    """(BLOCK_N, BLOCK_V, BLOCK_H, num_warps, target programs) for the device and dtype."""
    if not x.is_cuda:  # interpreter: small tiles, keeps tests quick and exercises the masks
        return 16, 32, 16, 4, 4
    block_h = 32 if x.dtype == torch.float32 else 64
    sms = sm_count(x.device)
    return 64, 128, block_h, 8, 4 * sms


def _upcast(x: torch.Tensor) -> bool:
    """The interpreter's dot mishandles 16-bit floats: feed it fp32 copies (same products, exact in fp32)."""
    return (not x.is_cuda) and x.dtype != torch.float32


def _precision(x: torch.Tensor) -> str:
    return "ieee" if x.dtype == torch.float32 else "tf32"


def tiles_forward(x, w, labels, valid):
    """logp [N], row max m [N], log s [N] (all fp32) from the tiled forward kernel."""
    n, h = x.shape
    v = w.shape[0]
    block_n, block_v, block_h, warps, target = _blocks(x)
    n_blocks, v_blocks = cdiv(n, block_n), cdiv(v, block_v)
    splits = max(1, min(v_blocks, target // n_blocks))
    per_split = cdiv(v_blocks, splits)
    splits = cdiv(v_blocks, per_split)  # every split starts on a real vocab block
    part_m = _empty((splits, n), torch.float32, x.device)
    part_s = _empty((splits, n), torch.float32, x.device)
    part_label = _empty((splits, n), torch.float32, x.device)
    _fwd_kernel[(n_blocks, splits)](
        x, w, labels, part_m, part_s, part_label, n, v, h,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), per_split,
        BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_H=block_h, PRECISION=_precision(x), UPCAST=_upcast(x),
        num_warps=warps)
    m = part_m.max(dim=0).values
    log_sum = torch.log((part_s * torch.exp(part_m - m)).sum(dim=0))
    logp = torch.where(valid, (part_label.sum(dim=0) - m) - log_sum, 0.0)
    return logp, m, log_sum


def tiles_backward(x, w, labels, row_max, log_sum, g, compute_dw: bool):
    """dH fp32 [N, H] and dW fp32 [V, H] (None unless ``compute_dw``): one kernel over all tiles."""
    n, h = x.shape
    v = w.shape[0]
    block_n, block_v, block_h, warps, _ = _blocks(x)
    n_blocks, v_blocks = cdiv(n, block_n), cdiv(v, block_v)
    dx = torch.zeros((n, h), dtype=torch.float32, device=x.device)
    dw = torch.zeros((v, h), dtype=torch.float32, device=x.device) if compute_dw else None
    _bwd_kernel[(n_blocks * v_blocks,)](
        x, w, labels, row_max, log_sum, g, dx, dw if compute_dw else dx, n, v, h,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), v_blocks,
        COMPUTE_DW=compute_dw, BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_H=block_h,
        PRECISION=_precision(x), UPCAST=_upcast(x), num_warps=warps)
    return dx, dw


class TiledLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, valid):
        logp, row_max, log_sum = tiles_forward(hidden, weight, labels, valid)
        ctx.save_for_backward(hidden, weight, labels, valid, row_max, log_sum)
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        hidden, weight, labels, valid, row_max, log_sum = ctx.saved_tensors
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_dx or need_dw):
            return None, None, None, None
        g = torch.where(valid, grad_logp.float(), 0.0).contiguous()
        dx, dw = tiles_backward(hidden, weight, labels, row_max, log_sum, g, need_dw)
        return (dx.to(hidden.dtype) if need_dx else None), (dw.to(weight.dtype) if need_dw else None), None, None
