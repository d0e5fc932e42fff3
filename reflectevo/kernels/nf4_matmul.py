"""y = x · dequant(W)ᵀ (+ bias) for an NF4 weight W [N, K], with dx = dy · dequant(W) for the backward pass.

Math. ``W[n, k] = NF4[nibble(n*K + k)] * absmax[(n*K + k) // 64]`` with ``absmax`` decoded from its 8-bit code
(see reflectevo.kernels.nf4). The fused kernels decode a [BLOCK_K, BLOCK_N] tile of W inside the K loop, in
registers, and feed it to ``tl.dot``: the dense weight is never written to memory, so a forward pass reads
0.52 bytes per weight instead of 2 (bf16) and allocates nothing of size N*K. When K is a multiple of the
quantisation block, each tile row lies inside one block and its absmax is decoded once per row (PER_LINE).

Paths (``nf4_matmul(path=...)`` forces one; ``choose_path`` picks one from measured thresholds):
- ``gemv``     up to GEMV_MAX_ROWS (8) rows, the sampler's decode step: programs over (BLOCK_N output features) x
               (a slice of K) writing fp32 partial sums, every row of x handled by broadcasting, no tensor cores.
- ``fused``    tiled tl.dot with in-loop dequantisation.
- ``dequant``  the Triton dequant kernel writes a temporary bf16 W, then cuBLAS (torch.matmul).
Thresholds: ``gemv`` for rows <= AUTO_GEMV_MAX_ROWS, ``fused`` for rows <= AUTO_FUSED_MAX_ROWS, else ``dequant``.
Both are 0, i.e. always ``dequant``: on an H200 (bench/results/2026-11-26-h200-kernels.md, Llama-3-8B shapes)
dequant + cuBLAS beat the GEMV at 1 token by 2.4-7.7x and the fused kernel at 16 and 512 tokens by 2.8-33x; the
kernels are there, tested, for a GPU where they win (set the constants after ``reflectevo bench kernels``).
The GEMV measured there ran one program per 64 output features over all of K (64 programs for a 4096-feature
layer on 132 SMs); it now splits K too (~4 programs per SM, fp32 partial sums) and reads each packed byte once:
not yet measured on a GPU, so the threshold stays 0 until a run shows it winning.
On the CPU (no Triton) every call is dequant + matmul in PyTorch.

The backward (dx = dy · W) uses the fused kernel with W read transposed when the forward took ``gemv`` or
``fused``, else dequant + matmul.
The weight is frozen: no gradient for W; a bias gets its gradient when it requires one.
"""
from __future__ import annotations

import torch

from reflectevo.kernels._dispatch import HAS_TRITON, use_triton
from reflectevo.kernels.nf4 import DOUBLE_QUANT_BLOCKSIZE, NF4_TABLE, NF4Tensor, nf4_dequantize

if HAS_TRITON:
    import triton
    import triton.language as tl

    from reflectevo.kernels.nf4 import cast_rne

GEMV_MAX_ROWS = 8  # what the GEMV kernel handles
AUTO_GEMV_MAX_ROWS = 0  # measured: see the module docstring
AUTO_FUSED_MAX_ROWS = 0
PATHS = ("gemv", "fused", "dequant")


if HAS_TRITON:

    @triton.jit
    def _levels(data_ptr, table_ptr, flat, mask):
        """NF4 levels (fp32, in [-1, 1]) at flat element indices ``flat`` (any tile shape)."""
        byte = tl.load(data_ptr + (flat >> 1), mask=mask, other=0).to(tl.int32)
        nib = (byte >> ((1 - (flat & 1)) * 4).to(tl.int32)) & 0xF
        return tl.load(table_ptr + nib, mask=mask, other=0.0)

    @triton.jit
    def _scales(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, blk, mask, DOUBLE: tl.constexpr):
        """fp32 absmax of blocks ``blk``: ``code2[qabsmax] * absmax2[blk // 256] + offset`` (or stored fp32)."""
        if DOUBLE:
            qa = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
            c = tl.load(code2_ptr + qa, mask=mask, other=0.0)
            a2 = tl.load(absmax2_ptr + blk // 256, mask=mask, other=0.0)
            return c * a2 + tl.load(offset_ptr)
        else:
            return tl.load(absmax_ptr + blk, mask=mask, other=0.0)

    @triton.jit
    def _fused_kernel(a_ptr, data_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, table_ptr, bias_ptr, out_ptr,
                      M, P, R, stride_am, stride_om, w_stride_r, w_stride_p,
                      BLOCKSIZE: tl.constexpr, DOUBLE: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
                      DOT_FP32: tl.constexpr, TRANS: tl.constexpr, PER_LINE: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr):
        """out[M, P] = a[M, R] · B[R, P] with B[r, p] = W_flat[r * w_stride_r + p * w_stride_p] decoded in-loop.
        Forward (TRANS=0): R = K, P = N, strides (1, K). Input gradient (TRANS=1): R = N, P = K, strides (K, 1).
        Either way the tile is decoded with W's contiguous axis as the fast one, so the packed-byte loads coalesce.
        PER_LINE: K % BLOCKSIZE == 0 and the tile's K extent divides BLOCKSIZE, so each W row of the tile lies in
        one quantisation block and the absmax is decoded once per row instead of once per element."""
        pid_m = tl.program_id(0)
        pid_p = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rp = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        acc = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            rr = r0 + tl.arange(0, BLOCK_R)
            a_mask = (rm[:, None] < M) & (rr[None, :] < R)
            a = tl.load(a_ptr + rm[:, None].to(tl.int64) * stride_am + rr[None, :], mask=a_mask, other=0.0)
            if TRANS:  # B[r, p] = W[r, p]: p runs along W's rows in memory, as the tile's fast axis does
                w_mask = (rr[:, None] < R) & (rp[None, :] < P)
                flat = rr[:, None].to(tl.int64) * w_stride_r + rp[None, :].to(tl.int64) * w_stride_p
                level = _levels(data_ptr, table_ptr, flat, w_mask)
                if PER_LINE:
                    blk = (rr.to(tl.int64) * w_stride_r + pid_p * BLOCK_P) // BLOCKSIZE
                    scale = _scales(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, blk, rr < R, DOUBLE)[:, None]
                else:
                    scale = _scales(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, flat // BLOCKSIZE, w_mask, DOUBLE)
                w = cast_rne(level * scale, a_ptr.dtype.element_ty)
            else:  # B = W^T: decode the [P, R] tile of W with r (= k, contiguous) fast, then transpose in registers
                w_mask = (rp[:, None] < P) & (rr[None, :] < R)
                flat = rp[:, None].to(tl.int64) * w_stride_p + rr[None, :].to(tl.int64) * w_stride_r
                level = _levels(data_ptr, table_ptr, flat, w_mask)
                if PER_LINE:
                    blk = (rp.to(tl.int64) * w_stride_p + r0) // BLOCKSIZE
                    scale = _scales(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, blk, rp < P, DOUBLE)[:, None]
                else:
                    scale = _scales(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, flat // BLOCKSIZE, w_mask, DOUBLE)
                w = tl.trans(cast_rne(level * scale, a_ptr.dtype.element_ty))
            if DOT_FP32:  # the interpreter's tl.dot mishandles bf16 operands: same products, in fp32
                acc += tl.dot(a.to(tl.float32), w.to(tl.float32), input_precision="ieee")
            elif IEEE:  # fp32 inputs: no TF32 rounding
                acc += tl.dot(a, w, input_precision="ieee")
            else:
                acc += tl.dot(a, w)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rp, mask=rp < P, other=0.0).to(tl.float32)[None, :]
        o_mask = (rm[:, None] < M) & (rp[None, :] < P)
        tl.store(out_ptr + rm[:, None].to(tl.int64) * stride_om + rp[None, :],
                 cast_rne(acc, out_ptr.dtype.element_ty), mask=o_mask)

    @triton.jit
    def _gemv_kernel(x_ptr, data_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, table_ptr, part_ptr,
                     M, N, K, stride_xm, k_per_split,
                     BLOCKSIZE: tl.constexpr, DOUBLE: tl.constexpr, PAIRS: tl.constexpr, PER_LINE: tl.constexpr,
                     ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """part[split, m, n] = sum over k in this split's range of x[m, k] · W[n, k], fp32, for M <= ROWS (a power
        of two <= 8). Programs cover (BLOCK_N features) x (one K range): a decode step's few output features still
        spread over every SM. Each W tile is decoded once for all rows; with K even (PAIRS) each packed byte is
        read once for its two values."""
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        split = tl.program_id(1)
        rm = tl.arange(0, ROWS)
        n_ok = rn < N
        k_lo = split * k_per_split
        k_hi = tl.minimum(k_lo + k_per_split, K)
        acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            flat = rn[:, None].to(tl.int64) * K + rk[None, :]
            w_mask = n_ok[:, None] & (rk[None, :] < k_hi)
            if PAIRS:
                rb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
                byte = tl.load(data_ptr + rn[:, None].to(tl.int64) * (K // 2) + rb[None, :],
                               mask=n_ok[:, None] & (rb[None, :] * 2 < k_hi), other=0).to(tl.int32)
                level = tl.reshape(tl.join(tl.load(table_ptr + (byte >> 4)), tl.load(table_ptr + (byte & 0xF))),
                                   (BLOCK_N, BLOCK_K))
            else:
                level = _levels(data_ptr, table_ptr, flat, w_mask)
            if PER_LINE:
                blk = (rn.to(tl.int64) * K + k0) // BLOCKSIZE
                scale = _scales(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, blk, n_ok, DOUBLE)[:, None]
            else:
                scale = _scales(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, flat // BLOCKSIZE, w_mask, DOUBLE)
            w = cast_rne(level * scale, x_ptr.dtype.element_ty).to(tl.float32)
            x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < k_hi),
                        other=0.0).to(tl.float32)
            acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)  # masked k: x is 0 there
        tl.store(part_ptr + (split * M + rm[:, None]).to(tl.int64) * N + rn[None, :], acc,
                 mask=(rm[:, None] < M) & n_ok[None, :])


def _q_args(q: NF4Tensor):
    dq = q.double_quant
    a = q.absmax
    return (q.data, a, q.absmax2 if dq else a, q.code2 if dq else a, q.offset if dq else a, NF4_TABLE.to(q.device))


def _fused(a2d: torch.Tensor, q: NF4Tensor, bias, transpose_w: bool) -> torch.Tensor:
    n_out, k_in = q.shape
    M, R = a2d.shape
    P = k_in if transpose_w else n_out
    strides = (k_in, 1) if transpose_w else (1, k_in)
    out = torch.empty(M, P, dtype=a2d.dtype, device=a2d.device)
    if a2d.is_cuda:
        bm, bp, br = (16 if M <= 16 else 64), 64, 64
    else:
        bm, bp, br = 16, 16, 32
    grid = (triton.cdiv(M, bm), triton.cdiv(P, bp))
    _fused_kernel[grid](
        a2d, *_q_args(q), bias if bias is not None else a2d, out, M, P, R, a2d.stride(0), out.stride(0), *strides,
        BLOCKSIZE=q.blocksize, DOUBLE=q.double_quant, HAS_BIAS=bias is not None,
        IEEE=a2d.dtype == torch.float32, DOT_FP32=not a2d.is_cuda, TRANS=transpose_w,
        PER_LINE=k_in % q.blocksize == 0 and q.blocksize % (bp if transpose_w else br) == 0,
        BLOCK_M=bm, BLOCK_P=bp, BLOCK_R=br, enable_fp_fusion=False,
    )
    return out


def _gemv_plan(n_out: int, k_in: int, rows: int, blocksize: int, cuda: bool, sms: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, K per split): about four programs per SM, each with at least four K tiles."""
    bk = min(64, blocksize)
    if cuda:
        bn = max(16, 4096 // (rows * bk))  # rows * bn * bk <= 4096 products in registers per tile
        target = 4 * sms
    else:  # interpreter: small tiles, and a K split on small test shapes so both paths are exercised
        bk, bn, target = min(32, blocksize), 16, 8
    n_blocks = triton.cdiv(n_out, bn)
    splits = max(1, min(target // n_blocks, triton.cdiv(k_in, 2 * bk if not cuda else 4 * bk)))
    k_per_split = triton.cdiv(triton.cdiv(k_in, splits), bk) * bk
    return bn, bk, k_per_split


def _gemv(x2d: torch.Tensor, q: NF4Tensor, bias) -> torch.Tensor:
    n_out, k_in = q.shape
    M = x2d.shape[0]
    rows = max(2, triton.next_power_of_2(M))
    sms = torch.cuda.get_device_properties(x2d.device).multi_processor_count if x2d.is_cuda else 0
    bn, bk, k_per_split = _gemv_plan(n_out, k_in, rows, q.blocksize, x2d.is_cuda, sms)
    splits = triton.cdiv(k_in, k_per_split)
    part = torch.empty(splits, M, n_out, dtype=torch.float32, device=x2d.device)
    _gemv_kernel[(triton.cdiv(n_out, bn), splits)](
        x2d, *_q_args(q), part, M, n_out, k_in, x2d.stride(0), k_per_split,
        BLOCKSIZE=q.blocksize, DOUBLE=q.double_quant, PAIRS=k_in % 2 == 0,
        PER_LINE=k_in % q.blocksize == 0 and q.blocksize % bk == 0, ROWS=rows, BLOCK_N=bn, BLOCK_K=bk,
        enable_fp_fusion=False,
    )
    out = part[0] if splits == 1 else part.sum(0)
    if bias is not None:
        out = out + bias.float()
    return out.to(x2d.dtype)


def nf4_matmul_reference(x: torch.Tensor, q: NF4Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantise to x's dtype, then a dense matmul (PyTorch)."""
    return torch.nn.functional.linear(x, nf4_dequantize(q, x.dtype), bias)


def choose_path(x2d: torch.Tensor) -> str:
    """The auto path: ``gemv`` up to AUTO_GEMV_MAX_ROWS, ``fused`` up to AUTO_FUSED_MAX_ROWS, else ``dequant``
    (always ``dequant`` on the CPU)."""
    rows = x2d.shape[0]
    if not use_triton(x2d):
        return "dequant"
    if rows <= min(AUTO_GEMV_MAX_ROWS, GEMV_MAX_ROWS):
        return "gemv"
    return "fused" if rows <= AUTO_FUSED_MAX_ROWS else "dequant"


def _forward(x2d, q, bias, path):
    if path == "dequant" or not use_triton(x2d):
        return torch.nn.functional.linear(x2d, nf4_dequantize(q, x2d.dtype), bias)
    if path == "gemv":
        return _gemv(x2d, q, bias)
    return _fused(x2d, q, bias, transpose_w=False)


class _NF4Matmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2d, bias, q, path):
        ctx.q, ctx.path = q, path
        ctx.has_bias = bias is not None
        return _forward(x2d, q, bias, path)

    @staticmethod
    def backward(ctx, dy):
        q = ctx.q
        dx = dbias = None
        if ctx.needs_input_grad[0]:
            dy = dy.contiguous()
            if ctx.path != "dequant" and use_triton(dy):
                dx = _fused(dy, q, None, transpose_w=True)
            else:
                dx = dy @ nf4_dequantize(q, dy.dtype)
        if ctx.has_bias and ctx.needs_input_grad[1]:
            dbias = dy.sum(0)
        return dx, dbias, None, None


def nf4_matmul(x: torch.Tensor, q: NF4Tensor, bias: torch.Tensor | None = None,
               path: str | None = None) -> torch.Tensor:
    """x [..., K] · dequant(q)ᵀ [K, N] (+ bias) -> [..., N] in x's dtype; differentiable w.r.t. x (and bias).
    ``path`` forces ``gemv`` / ``fused`` / ``dequant`` (default: ``choose_path``)."""
    if len(q.shape) != 2:
        raise ValueError(f"nf4_matmul: weight must be 2-D [out, in], got shape {tuple(q.shape)}")
    if x.shape[-1] != q.shape[1]:
        raise ValueError(f"nf4_matmul: x has {x.shape[-1]} features, weight expects {q.shape[1]}")
    if path is not None and path not in PATHS:
        raise ValueError(f"nf4_matmul: path={path!r}, expected one of {PATHS}")
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1])
    if not x2d.is_contiguous():
        x2d = x2d.contiguous()
    path = path or choose_path(x2d)
    if x2d.shape[0] == 0:
        path = "dequant"
    elif path == "gemv" and x2d.shape[0] > GEMV_MAX_ROWS:
        path = "fused"
    if bias is not None:
        bias = bias.to(x.dtype)
    out = _NF4Matmul.apply(x2d, bias, q, path)
    return out.reshape(*lead, q.shape[0])


def llama3_8b_nf4_bytes_per_param() -> dict:
    """Storage of the NF4 base (every linear except lm_head) for Llama-3-8B shapes, computed from the layout."""
    hidden, inter, kv, layers = 4096, 14336, 1024, 32
    shapes = [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden), (inter, hidden), (inter, hidden),
              (hidden, inter)]
    params = nbytes = 0
    for n, k in shapes:
        numel = n * k
        blocks = -(-numel // 64)
        # data, qabsmax, absmax2, offset
        nbytes += (numel + 1) // 2 + blocks + 4 * -(-blocks // DOUBLE_QUANT_BLOCKSIZE) + 4
        params += numel
    nbytes += 256 * 4 * len(shapes)  # one 8-bit code table per tensor
    return {"linear_params": params * layers, "nf4_bytes": nbytes * layers,
            "bytes_per_param": nbytes / params}
