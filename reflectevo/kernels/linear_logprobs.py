"""Fused lm_head + log-softmax + label gather: per-token log p(label) without the [N, V] logits.

Math, for hidden rows ``h_i`` (H), lm_head ``W`` (V x H) and labels ``y_i``::

    z_ij   = h_i . w_j                                  (logits, never stored)
    lse_i  = log sum_j exp(z_ij)                        (online, fp32: running max m and sum s over vocab tiles)
    logp_i = z_{i,y_i} - lse_i                          (0 where y_i == ignore_index)

    backward, for an upstream gradient g_i (g_i = 0 on ignored tokens):
    G_ij   = g_i * (1[j == y_i] - exp(z_ij - lse_i))    (d logp / d z, recomputed per tile)
    dH     = G @ W          dW = G^T @ H               (dW only when the weight requires grad)

Design (Triton): recompute in backward. The forward keeps only the row max m_i and log s_i (lse = m + log s, kept
apart so that exp((z - m) - log s) stays accurate for |logits| ~ 1e4, where an fp32 lse has an ulp of ~1e-3), [N]
fp32 each, 8 bytes a token; the backward recomputes each (token block x vocab block) logit tile, turns it into ``G`` and adds ``G @ W`` into dH (and
``G^T @ H`` into dW) with fp32 atomics. Computing the whole gradient inside the forward (Liger's design) is not
possible here: ``logp`` is an intermediate whose upstream gradient g (sequence sums, DPO, SFT mean...) is unknown
until the backward runs, and it would force a [V, H] dW buffer even for a frozen head. Only the g-independent part
E below can be precomputed (the CPU path does).

FLOPs per token (H hidden, V vocab), Triton path: forward 2HV; backward 2HV (recompute) + 2HV (dH) [+ 2HV (dW)
when the head trains]. Total 6HV per token with a frozen head (QLoRA), 8HV with a trainable one; the frozen path
skips the dW matmuls entirely (COMPUTE_DW is a constexpr) and never allocates a weight gradient.

CPU chunked path, a different split of the same math: dH_i = g_i (w_{y_i} - E_i) with E = softmax(Z) @ W, and E
does not depend on the upstream gradient, so the forward accumulates it per chunk (online rescaled like the
log-sum-exp, [N, H] fp32 saved) and the backward's dH is elementwise. Frozen head: forward 4HV, backward ~0 (4HV
per token, the same as the naive path, which is what makes the CPU time target reachable); trainable head: the
backward recomputes the logits for dW = (onehot - P)^T (g * H): +4HV, 8HV total. A forward under no_grad (the
reference model) does 2HV. On the GPU the same trick would need a [BLOCK_N, H] accumulator per program (too big
for registers at H = 4096) or a read-modify-write of E per vocab tile, so the kernels recompute instead.

Memory beyond inputs/grads: m, log s [N] fp32, forward partials [splits, N] x 3 fp32, and an fp32 dH accumulator [N, H]
(plus dW fp32 [V, H] only when the head trains); the CPU path adds one CHUNK_N x CHUNK_V fp32 tile (a few copies
of it while exp runs) and E [N, H] fp32. The naive path stores fp32 logits and log-softmax, 8NV bytes each.

Precision: inputs bf16 / fp16 / fp32; every logit tile is accumulated in fp32 and never rounded to the input dtype
before the log-sum-exp. fp32 inputs use IEEE fp32 dots (no TF32). In backward ``G`` is cast to the input dtype for
the tensor-core dots (bf16/fp16 inputs only). The atomics make gradients non-deterministic in the last bits.

CPU: the chunked PyTorch path above (token chunk x vocab chunk, online log-sum-exp; the backward recomputes chunk by
chunk for dW only), extra memory bounded by the chunk sizes plus E. ``use_triton`` from ``_dispatch`` picks.
"""
from __future__ import annotations

import torch

from reflectevo.kernels._dispatch import use_triton

try:
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover
    triton = None

# Torch-path chunk sizes (tokens x vocab): one fp32 tile is at most CHUNK_N * CHUNK_V * 4 bytes (16 MiB).
CHUNK_N = 1024
CHUNK_V = 4096


def _empty(shape, dtype, device) -> torch.Tensor:
    """Allocation for buffers the code must fully overwrite (tests replace it to poison them with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


# ----------------------------------------------------------------------------------------------------------------
# Plain PyTorch reference (readable, materialises the logits)
# ----------------------------------------------------------------------------------------------------------------
def linear_logprobs_reference(hidden, weight, labels, ignore_index: int = -100) -> torch.Tensor:
    """Teaching version: full fp32 logits, log_softmax, gather. Memory O(N * V)."""
    logits = hidden.float() @ weight.float().T
    logprobs = torch.log_softmax(logits, dim=-1)
    valid = labels != ignore_index
    picked = logprobs.gather(-1, torch.where(valid, labels, 0).long().unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, picked, torch.zeros_like(picked))


# ----------------------------------------------------------------------------------------------------------------
# Chunked PyTorch path (CPU): memory bounded by CHUNK_N x CHUNK_V fp32 tiles
# ----------------------------------------------------------------------------------------------------------------
def _torch_forward(x, w, labels, valid, want_expect: bool, chunk_n: int, chunk_v: int):
    """logp, row max m, log s, and (when want_expect) E = softmax(z) @ W [N, H] fp32, chunk by chunk."""
    n, v = x.shape[0], w.shape[0]
    logp = _empty((n,), torch.float32, x.device)
    row_max = _empty((n,), torch.float32, x.device)
    log_sum = _empty((n,), torch.float32, x.device)
    expect = _empty(x.shape, torch.float32, x.device) if want_expect else None
    safe_labels = torch.where(valid, labels, 0)
    for r0 in range(0, n, chunk_n):
        xc = x[r0:r0 + chunk_n].float()
        lab = safe_labels[r0:r0 + chunk_n]
        m = torch.full((xc.shape[0],), float("-inf"), device=x.device)
        s = torch.zeros(xc.shape[0], device=x.device)
        picked = torch.zeros(xc.shape[0], device=x.device)
        acc = torch.zeros(xc.shape, device=x.device) if want_expect else None
        for c0 in range(0, v, chunk_v):
            wc = w[c0:c0 + chunk_v].float()
            z = xc @ wc.T
            m_new = torch.maximum(m, z.max(dim=1).values)
            scale = torch.exp(m - m_new)
            p = torch.exp(z - m_new[:, None])
            s = s * scale + p.sum(dim=1)
            if acc is not None:
                acc = acc * scale[:, None] + p @ wc
            m = m_new
            inside = (lab >= c0) & (lab < c0 + z.shape[1])
            local = (lab - c0).clamp(0, z.shape[1] - 1)
            picked += torch.where(inside, z.gather(1, local[:, None]).squeeze(1), 0.0)
        row_max[r0:r0 + chunk_n] = m
        log_sum[r0:r0 + chunk_n] = torch.log(s)
        logp[r0:r0 + chunk_n] = torch.where(valid[r0:r0 + chunk_n], (picked - m) - torch.log(s), 0.0)
        if acc is not None:
            expect[r0:r0 + chunk_n] = acc / s[:, None]
    return logp, row_max, log_sum, expect


def _torch_backward(x, w, labels, row_max, log_sum, g, compute_dw: bool, expect, chunk_n: int, chunk_v: int):
    """dX = g * (w_y - E) from the forward's E (no matmul); dW recomputes the logits chunk by chunk."""
    safe_labels = labels.clamp(min=0)
    dx = None
    if expect is not None:
        dx = g[:, None] * (w.float().index_select(0, safe_labels) - expect)
    if not compute_dw:
        return dx, None
    n, v = x.shape[0], w.shape[0]
    dw = torch.zeros(w.shape, dtype=torch.float32, device=x.device)
    for r0 in range(0, n, chunk_n):
        xc = x[r0:r0 + chunk_n].float()
        gc, lab = g[r0:r0 + chunk_n], safe_labels[r0:r0 + chunk_n]
        mc, lc = row_max[r0:r0 + chunk_n, None], log_sum[r0:r0 + chunk_n, None]
        gx = gc[:, None] * xc
        for c0 in range(0, v, chunk_v):
            wc = w[c0:c0 + chunk_v]
            p = torch.exp((xc @ wc.float().T - mc) - lc)
            dw[c0:c0 + chunk_v] -= p.T @ gx
        dw.index_add_(0, lab, gx)  # the one-hot part: dW[y_i] += g_i x_i (g_i = 0 on ignored tokens)
    return dx, dw


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------
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
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    return 64, 128, block_h, 8, 4 * sms


def _upcast(x: torch.Tensor) -> bool:
    """The interpreter's dot mishandles 16-bit floats: feed it fp32 copies (same products, exact in fp32)."""
    return (not x.is_cuda) and x.dtype != torch.float32


def _precision(x: torch.Tensor) -> str:
    return "ieee" if x.dtype == torch.float32 else "tf32"


def _triton_forward(x, w, labels, valid):
    n, h = x.shape
    v = w.shape[0]
    block_n, block_v, block_h, warps, target = _blocks(x)
    n_blocks, v_blocks = triton.cdiv(n, block_n), triton.cdiv(v, block_v)
    splits = max(1, min(v_blocks, target // n_blocks))
    per_split = triton.cdiv(v_blocks, splits)
    splits = triton.cdiv(v_blocks, per_split)  # every split starts on a real vocab block
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


def _launch_backward(x, w, labels, row_max, log_sum, g, compute_dw: bool):
    """One kernel over all (token block x vocab block) tiles; dW matmuls compiled out when not needed."""
    n, h = x.shape
    v = w.shape[0]
    block_n, block_v, block_h, warps, _ = _blocks(x)
    n_blocks, v_blocks = triton.cdiv(n, block_n), triton.cdiv(v, block_v)
    dx = torch.zeros((n, h), dtype=torch.float32, device=x.device)
    dw = torch.zeros((v, h), dtype=torch.float32, device=x.device) if compute_dw else None
    _bwd_kernel[(n_blocks * v_blocks,)](
        x, w, labels, row_max, log_sum, g, dx, dw if compute_dw else dx, n, v, h,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), v_blocks,
        COMPUTE_DW=compute_dw, BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_H=block_h,
        PRECISION=_precision(x), UPCAST=_upcast(x), num_warps=warps)
    return dx, dw


# ----------------------------------------------------------------------------------------------------------------
# autograd + dispatcher
# ----------------------------------------------------------------------------------------------------------------
class LinearLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, valid, triton_path: bool, want_expect: bool):
        if triton_path:
            logp, row_max, log_sum = _triton_forward(hidden, weight, labels, valid)
            expect = None
        else:
            logp, row_max, log_sum, expect = _torch_forward(hidden, weight, labels, valid, want_expect, CHUNK_N,
                                                            CHUNK_V)
        ctx.save_for_backward(hidden, weight, labels, valid, row_max, log_sum, expect)
        ctx.triton_path = triton_path
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        hidden, weight, labels, valid, row_max, log_sum, expect = ctx.saved_tensors
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_dx or need_dw):
            return None, None, None, None, None, None
        g = torch.where(valid, grad_logp.float(), 0.0).contiguous()
        if ctx.triton_path:
            dx, dw = _launch_backward(hidden, weight, labels, row_max, log_sum, g, need_dw)
        else:
            dx, dw = _torch_backward(hidden, weight, labels, row_max, log_sum, g, need_dw, expect, CHUNK_N, CHUNK_V)
        dx = dx.to(hidden.dtype) if need_dx else None
        dw = dw.to(weight.dtype) if need_dw else None
        return dx, dw, None, None, None, None


def _check(hidden, weight, labels, ignore_index):
    if not isinstance(hidden, torch.Tensor) or hidden.dim() < 1:
        raise ValueError("hidden: expected a tensor [..., H]")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight: expected a 2-D tensor [V, H], got shape {tuple(getattr(weight, 'shape', ()))}")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden/weight: hidden size {hidden.shape[-1]} != weight.shape[1] {weight.shape[1]}")
    if not isinstance(labels, torch.Tensor) or labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels: expected shape {tuple(hidden.shape[:-1])}, got {tuple(getattr(labels, 'shape', ()))}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels: expected an integer tensor, got {labels.dtype}")
    for name, t in (("hidden", hidden), ("weight", weight)):
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"{name}: dtype {t.dtype} not supported (float32, float16, bfloat16)")
    if hidden.device != weight.device or hidden.device != labels.device:
        raise ValueError("hidden, weight, labels: must be on the same device")
    v = weight.shape[0]
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= v))
    if labels.numel() and bool(bad.any()):
        raise ValueError(f"labels: values must lie in [0, {v}) or equal ignore_index={ignore_index}")


def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                    ignore_index: int = -100) -> torch.Tensor:
    """log_softmax(hidden @ weight.T)[i, labels[i]] as float32, 0 where labels == ignore_index.

    hidden [..., H], weight [V, H] (lm_head), labels [...] -> logp [...] float32. Differentiable w.r.t. hidden,
    and w.r.t. weight only when it requires grad (a frozen head costs no dW work or memory). Mixed input dtypes
    are promoted to a common dtype first. Never materialises the [N, V] logits.
    """
    _check(hidden, weight, labels, ignore_index)
    dtype = torch.promote_types(hidden.dtype, weight.dtype)
    lead = labels.shape
    x = hidden.reshape(-1, hidden.shape[-1]).to(dtype)
    w = weight.to(dtype)
    flat_labels = labels.reshape(-1).long()
    if x.shape[0] == 0:
        return (x.sum(-1) * 0).float().reshape(lead)
    valid = flat_labels != ignore_index
    triton_path = use_triton(x)
    if triton_path:
        x = x if x.stride(-1) == 1 or x.stride(0) == 1 else x.contiguous()
        w = w if w.stride(-1) == 1 or w.stride(0) == 1 else w.contiguous()
        flat_labels = flat_labels.contiguous()
    want_expect = x.requires_grad and torch.is_grad_enabled()  # torch path: E = softmax @ W only if dX is needed
    logp = LinearLogprobsFunction.apply(x, w, flat_labels, valid, triton_path, want_expect)
    return logp.reshape(lead)
