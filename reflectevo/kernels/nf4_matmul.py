"""y = x · dequant(W)ᵀ (+ bias) for an NF4 weight W [N, K], with dx = dy · dequant(W) for the backward pass.

Math. ``W[n, k] = NF4[nibble(n*K + k)] * absmax[(n*K + k) // 64]`` with ``absmax`` decoded from its 8-bit code
(see reflectevo.kernels.nf4). The fused kernels decode a tile of W inside the K loop, in registers, and feed it
to ``tl.dot``: the dense weight is never written to memory, so a forward pass reads 0.52 bytes per weight instead
of 2 (bf16) and allocates nothing of size N*K. When K is a multiple of the quantisation block (every real model),
each tile row lies in one block (one absmax per row), each packed byte is loaded once for its two values, and the
tile pointers advance by a constant per step (sm_90 SASS of the 64x64x64 bf16 forward: 108 registers, no spills,
1120 instructions; the per-element addressing it replaced took 174 registers and 2528). The absmax codes are read
as int32 words (``nf4.block_scales``): with Triton 3.6 (the H200 machine's), the loop of every fused CUDA tile has
no load that waits on global memory (before: one per K step, the 1-byte code). Levels come from the 16-entry table
by default, or from the [256, 2] byte-pair table (``nf4.BYTE_TABLE``): the pair table's loops are 15-25 % shorter
(sm_90, Triton 3.6, per K step: 64x64x64 swap tile 444 -> 351 instructions, 128x128x64 442 -> 366, the 16-row
split tile 418 -> 344) but each of its gathers, staged by cp.async, touches ~14 L1 lines against one: per K step
of the 128x128x64 tile (8 warps) ~1800 L1 wavefronts for the pair gathers against ~900 issue cycles and ~570 of
tensor-core work, while the nibble gathers take ~256. Unmeasured; the benchmark times both.

Paths (``nf4_matmul(path=...)`` forces one; ``choose_path`` picks one from measured thresholds):
- ``gemv``     up to GEMV_MAX_ROWS (8) rows, the sampler's decode step, no tensor cores: see nf4_gemv (one row:
               a block kernel with the scale factored out of each block's sum; more rows: an elementwise kernel).
- ``fused``    tiled tl.dot with in-loop dequantisation; on CUDA the tile (rows x features x K step, warps,
               stages) is autotuned per (power-of-two row bucket, N, K, dtype) from ``_tile_configs``. Up to
               SPLIT_MAX_ROWS (64) rows, a decode batch, the grid of row x feature tiles alone would leave most
               SMs idle (64 programs for a 4096-feature layer at 64 rows, 16 for a 1024-feature one, on 132 SMs),
               so a fixed 64-wide tile also splits the reduction dimension (``_split_plan``: about two programs
               per SM): fp32 partial sums [splits, rows, features], summed, biased and cast after the kernel.
- ``dequant``  the Triton dequant kernel writes a temporary bf16 W, then cuBLAS (torch.matmul).
Thresholds: ``gemv`` for rows <= AUTO_GEMV_MAX_ROWS, ``fused`` for rows <= AUTO_FUSED_MAX_ROWS, else ``dequant``.
Both are 0, i.e. always ``dequant``: on an H200 (bench/results/2026-11-30-h200-kernels.md, Llama-3-8B shapes,
the kernels as they are here) dequant + cuBLAS took 0.9-1.2x the time of the GEMV at 1 token and 3-17x less than
the fused kernel, timed eagerly. The GEMV's times hardly change with the layer's size (0.085-0.110 ms), a sign of
launch cost rather than device time; the benchmark now also replays each call from a CUDA graph (device time, what
the sampler's graph-captured decode pays); the split-R launch for decode batches came after that run. The
thresholds stay 0 until such a run shows a kernel winning.
On the CPU (no Triton) every call is dequant + matmul in PyTorch.

The backward (dx = dy · W) uses the fused kernel with W read transposed when the forward took ``gemv`` or
``fused``, else dequant + matmul.
The weight is frozen: no gradient for W; a bias gets its gradient when it requires one.
"""
from __future__ import annotations

import torch

from reflectevo.kernels._dispatch import HAS_TRITON, cdiv, next_power_of_2, sm_count, use_triton
from reflectevo.kernels import nf4 as nf4_mod
from reflectevo.kernels.nf4 import (DOUBLE_QUANT_BLOCKSIZE, NF4Tensor, _dequantize_triton, kernel_args, nf4_dequantize,
                                    nf4_dequantize_reference)
from reflectevo.kernels.nf4_gemv import GEMV_MAX_ROWS, gemv

if HAS_TRITON:
    import triton
    import triton.language as tl

    from reflectevo.kernels.nf4 import block_scales, cast_rne, levels_at, tile_levels

SPLIT_MAX_ROWS = 64  # the fused kernel splits R over programs up to this many rows (decode batches), on CUDA
SPLIT_SWAP = True  # the split (decode) tile computes outᵀ = W · xᵀ: see _tile_configs
AUTO_GEMV_MAX_ROWS = 0  # measured: see the module docstring
AUTO_FUSED_MAX_ROWS = 0
PATHS = ("gemv", "fused", "dequant")


if HAS_TRITON:

    @triton.jit
    def _dot(acc, a, b, IEEE: tl.constexpr, DOT_FP32: tl.constexpr):
        if DOT_FP32:  # the interpreter's tl.dot mishandles bf16 operands: same products, in fp32
            return acc + tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        elif IEEE:  # fp32 inputs: no TF32 rounding
            return acc + tl.dot(a, b, input_precision="ieee")
        else:
            return acc + tl.dot(a, b)

    @triton.jit
    def _fused_kernel(a_ptr, data_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, pairs_ptr, bias_ptr, out_ptr,
                      M, N, K, stride_am, stride_om, m_bucket, r_per_split,
                      BLOCKSIZE: tl.constexpr, DOUBLE: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
                      DOT_FP32: tl.constexpr, TRANS: tl.constexpr, K_ALIGNED: tl.constexpr, SPLIT: tl.constexpr,
                      WORDS: tl.constexpr, BYTE_TABLE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr,
                      SWAP: tl.constexpr):
        """out[M, P] = a[M, R] · B[R, P], B decoded from the NF4 weight W [N, K] inside the R loop.
        Forward (TRANS=0): a = x, R = K, P = N, B = Wᵀ. Input gradient (TRANS=1): a = dy, R = N, P = K, B = W.
        The W tile is decoded as [W rows, K] (K, contiguous in memory, fast) and transposed in registers when B = Wᵀ.
        Aligned path (K_ALIGNED: K % BLOCKSIZE == 0, and the tile's K extent divides BLOCKSIZE): each tile row lies
        in one quantisation block, so one absmax per row; each packed byte is loaded once for its two values; the
        pointers advance by a constant per step. Otherwise every element is addressed on its own (odd K, blocks
        straddling rows). ``m_bucket`` is unused here: the autotuner's key.
        Split R (SPLIT): program (m, p, s) sums R range [s * r_per_split, (s + 1) * r_per_split) and writes fp32
        partial sums to out[s] ([splits, M, P]; bias and the cast come after the sum over s)."""
        pid_m = tl.program_id(0)
        pid_p = tl.program_id(1)
        r_lo = tl.program_id(2) * r_per_split
        r_hi = tl.minimum(r_lo + r_per_split, N if TRANS else K)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = rm < M
        acc = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)
        P = K if TRANS else N
        R = N if TRANS else K
        dtype = a_ptr.dtype.element_ty
        KT: tl.constexpr = BLOCK_P if TRANS else BLOCK_R  # the tile's extent along K
        if K_ALIGNED and BLOCKSIZE % KT == 0:
            half = tl.arange(0, KT // 2)
            if TRANS:  # fixed K columns [k0, k0 + BLOCK_P), W rows advance with r
                k0 = pid_p * BLOCK_P
                rr = tl.arange(0, BLOCK_R)
                a_ptrs = a_ptr + rm[:, None].to(tl.int64) * stride_am + (r_lo + rr)[None, :]
                byte_ptrs = data_ptr + (r_lo + rr)[:, None].to(tl.int64) * (K // 2) + (k0 // 2 + half)[None, :]
                for r0 in range(r_lo, r_hi, BLOCK_R):
                    n_ok = r0 + rr < R
                    a = tl.load(a_ptrs, mask=m_ok[:, None] & n_ok[None, :], other=0.0)
                    blk = (r0 + rr).to(tl.int64) * (K // BLOCKSIZE) + k0 // BLOCKSIZE
                    scale = block_scales(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, blk, n_ok, DOUBLE, WORDS)
                    level = tile_levels(byte_ptrs, pairs_ptr, n_ok[:, None], BLOCK_R, BLOCK_P, BYTE_TABLE)
                    acc = _dot(acc, a, cast_rne(level * scale[:, None], dtype), IEEE, DOT_FP32)
                    a_ptrs += BLOCK_R
                    byte_ptrs += BLOCK_R * (K // 2)
            else:  # fixed W rows [n0, n0 + BLOCK_P), K advances with r
                rn = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
                n_ok = rn < N
                rk = tl.arange(0, BLOCK_R)
                a_ptrs = a_ptr + rm[:, None].to(tl.int64) * stride_am + (r_lo + rk)[None, :]
                byte_ptrs = data_ptr + rn[:, None].to(tl.int64) * (K // 2) + (r_lo // 2 + half)[None, :]
                blk0 = rn.to(tl.int64) * (K // BLOCKSIZE)
                acc_t = tl.zeros((BLOCK_P, BLOCK_M), dtype=tl.float32)  # SWAP: outᵀ = W · aᵀ
                for r0 in range(r_lo, r_hi, BLOCK_R):
                    a = tl.load(a_ptrs, mask=m_ok[:, None], other=0.0)
                    scale = block_scales(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, blk0 + r0 // BLOCKSIZE, n_ok,
                                    DOUBLE, WORDS)
                    level = tile_levels(byte_ptrs, pairs_ptr, n_ok[:, None], BLOCK_P, BLOCK_R, BYTE_TABLE)
                    w = cast_rne(level * scale[:, None], dtype)
                    if SWAP:
                        acc_t = _dot(acc_t, w, tl.trans(a), IEEE, DOT_FP32)
                    else:
                        acc = _dot(acc, a, tl.trans(w), IEEE, DOT_FP32)
                    a_ptrs += BLOCK_R
                    byte_ptrs += BLOCK_R // 2
                if SWAP:
                    acc = tl.trans(acc_t)
        else:
            rp = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
            for r0 in range(r_lo, r_hi, BLOCK_R):
                rr = r0 + tl.arange(0, BLOCK_R)
                a = tl.load(a_ptr + rm[:, None].to(tl.int64) * stride_am + rr[None, :],
                            mask=m_ok[:, None] & (rr[None, :] < R), other=0.0)
                w_mask = (rr[:, None] < R) & (rp[None, :] < P)
                if TRANS:  # B[r, p] = W[r, p]
                    flat = rr[:, None].to(tl.int64) * K + rp[None, :]
                else:  # B[r, p] = W[p, r]
                    flat = rp[None, :].to(tl.int64) * K + rr[:, None]
                level = levels_at(data_ptr, pairs_ptr, flat, w_mask)
                scale = block_scales(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, flat // BLOCKSIZE, w_mask, DOUBLE,
                                WORDS)
                acc = _dot(acc, a, cast_rne(level * scale, dtype), IEEE, DOT_FP32)
        rp = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        out_mask = m_ok[:, None] & (rp[None, :] < P)
        if SPLIT:
            tl.store(out_ptr + (tl.program_id(2) * M + rm[:, None]).to(tl.int64) * P + rp[None, :], acc, mask=out_mask)
        else:
            if HAS_BIAS:
                acc += tl.load(bias_ptr + rp, mask=rp < P, other=0.0).to(tl.float32)[None, :]
            tl.store(out_ptr + rm[:, None].to(tl.int64) * stride_om + rp[None, :],
                     cast_rne(acc, out_ptr.dtype.element_ty), mask=out_mask)


def _tile_configs(trans: bool) -> list:
    """CUDA tile shapes the autotuner tries, (BLOCK_M, BLOCK_P, BLOCK_R, warps, stages, SWAP). The tile's K
    extent (BLOCK_R forward, BLOCK_P for the input gradient) stays <= 64 so a tile row lies in one quantisation
    block. SWAP (forward only) computes outᵀ = W · xᵀ: the decoded weight tile is the MMA's first operand, which
    sm_90's wgmma takes from registers, so it is not staged through shared memory (sm_90 SASS, Triton 3.6, per K
    step: 128x128x32 tile 230 -> 213 instructions, 64x64x64 365 -> 351, no fence), and the weights fill the MMA's
    64-row side while the tokens fill its narrow side (a 16-token decode tile: wgmma 64x16x16 instead of mma.sync)."""
    if trans:
        shapes = [(16, 32, 64, 4, 4), (16, 64, 64, 4, 3), (32, 64, 64, 4, 3), (64, 64, 64, 4, 3),
                  (64, 64, 128, 4, 3), (128, 64, 64, 4, 3), (128, 64, 128, 8, 3)]
        shapes = [s + (False,) for s in shapes]
    else:
        shapes = [(16, 32, 64, 4, 4), (16, 64, 64, 4, 3), (32, 64, 64, 4, 3), (64, 64, 64, 4, 3),
                  (128, 64, 64, 4, 3), (64, 128, 64, 4, 3), (128, 128, 64, 8, 3), (128, 128, 32, 8, 4)]
        swapped = [(16, 64, 64, 4, 3), (64, 64, 64, 4, 3), (64, 128, 64, 4, 3), (128, 128, 64, 8, 3),
                   (128, 128, 32, 8, 4)]
        shapes = [s + (False,) for s in shapes] + [s + (True,) for s in swapped]
    return [triton.Config(dict(BLOCK_M=m, BLOCK_P=p, BLOCK_R=r, SWAP=swap), num_warps=w, num_stages=s)
            for m, p, r, w, s, swap in shapes]


def _unaligned_tile():
    """The fixed CUDA tile of the element-wise path (64-wide, two stages: ~72 KB of shared memory at sm_90)."""
    return triton.Config(dict(BLOCK_M=64, BLOCK_P=64, BLOCK_R=64, SWAP=False), num_warps=4, num_stages=2)


def _prune_by_rows(configs, named_args, **kwargs):
    """Row tiles no taller than the rows (rounded up to a power of two, at least 16)."""
    rows = named_args["m_bucket"]
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= rows and (rows > 32 or c.kwargs["BLOCK_M"] <= 32)]
    return kept or configs[:1]


if HAS_TRITON:
    # one autotuner per direction, keyed on (rows bucket, N, K) and the dtypes: a new token count in the same
    # power-of-two bucket reuses the tuned tile
    _fused_tuned = {trans: triton.autotune(_tile_configs(trans), key=["m_bucket", "N", "K"],
                                           prune_configs_by={"early_config_prune": _prune_by_rows})(_fused_kernel)
                    for trans in (False, True)}


def _split_plan(rows: int, p: int, r: int, block_m: int, block_p: int, block_r: int, sms: int) -> int:
    """R per split for decode-sized inputs: enough (m, p, s) programs for two per SM, at least four R tiles each."""
    tiles = cdiv(rows, block_m) * cdiv(p, block_p)
    splits = max(1, min(cdiv(2 * sms, tiles), r // (4 * block_r)))
    return cdiv(cdiv(r, splits), block_r) * block_r


def _fused(a2d: torch.Tensor, q: NF4Tensor, bias, transpose_w: bool, tile=None, r_per_split=None,
           split_swap: bool = None, byte_table: bool | None = None) -> torch.Tensor:
    """Launch the fused kernel. CUDA, K a multiple of the block size of 64: up to SPLIT_MAX_ROWS rows a fixed tile
    with R split over programs (``_split_plan``), more rows the autotuned tile. Otherwise ``tile`` (a
    triton.Config) or a fixed one (``_unaligned_tile`` on CUDA; small tiles in the interpreter), with
    ``r_per_split`` (a multiple of the tile's BLOCK_R) splitting R when given. ``split_swap`` overrides SPLIT_SWAP
    for the split tile and ``byte_table`` nf4.BYTE_TABLE (the benchmark times both)."""
    n_out, k_in = q.shape
    M = a2d.shape[0]
    P, R = (k_in, n_out) if transpose_w else (n_out, k_in)
    q_args, words = kernel_args(q)
    flags = dict(BLOCKSIZE=q.blocksize, DOUBLE=q.double_quant, WORDS=words, HAS_BIAS=bias is not None,
                 IEEE=a2d.dtype == torch.float32, DOT_FP32=not a2d.is_cuda, TRANS=transpose_w,
                 K_ALIGNED=k_in % q.blocksize == 0, BYTE_TABLE=nf4_mod.BYTE_TABLE if byte_table is None else byte_table,
                 enable_fp_fusion=False)
    m_bucket = max(16, min(4096, next_power_of_2(M)))
    # every tile's K extent (<= 64) divides a block size that is a multiple of 64: the aligned path
    aligned_cuda = tile is None and a2d.is_cuda and flags["K_ALIGNED"] and q.blocksize % 64 == 0
    if aligned_cuda and M <= SPLIT_MAX_ROWS:
        swap = SPLIT_SWAP if split_swap is None else split_swap
        tile = triton.Config(dict(BLOCK_M=m_bucket, BLOCK_P=64, BLOCK_R=64, SWAP=swap), num_warps=4, num_stages=3)
        r_per_split = _split_plan(M, P, R, m_bucket, 64, 64, sm_count(a2d.device))
    elif aligned_cuda:
        out = torch.empty(M, P, dtype=a2d.dtype, device=a2d.device)
        grid = lambda meta: (cdiv(M, meta["BLOCK_M"]), cdiv(P, meta["BLOCK_P"]), 1)  # noqa: E731
        _fused_tuned[transpose_w][grid](a2d, *q_args, bias if bias is not None else a2d, out, M, n_out, k_in,
                                        a2d.stride(0), out.stride(0), m_bucket, R, SPLIT=False, **flags)
        return out
    if tile is None:
        tile = (_unaligned_tile() if a2d.is_cuda
                else triton.Config(dict(BLOCK_M=16, BLOCK_P=16, BLOCK_R=32, SWAP=False)))
    splits = cdiv(R, r_per_split) if r_per_split else 1
    split = splits > 1
    out = (torch.empty(splits, M, P, dtype=torch.float32, device=a2d.device) if split
           else torch.empty(M, P, dtype=a2d.dtype, device=a2d.device))
    launch = dict(num_warps=tile.num_warps, num_stages=tile.num_stages) if a2d.is_cuda else {}
    grid = (cdiv(M, tile.kwargs["BLOCK_M"]), cdiv(P, tile.kwargs["BLOCK_P"]), splits)
    _fused_kernel[grid](a2d, *q_args, bias if bias is not None else a2d, out, M, n_out, k_in, a2d.stride(0),
                        out.stride(-2), m_bucket, r_per_split if split else R, SPLIT=split, **flags,
                        **{"SWAP": False, **tile.kwargs},
                        **launch)
    if not split:
        return out
    total = out.sum(0)
    if bias is not None:
        total += bias.float()
    return total.to(a2d.dtype)


def nf4_matmul_reference(x: torch.Tensor, q: NF4Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantise to x's dtype, then a dense matmul (PyTorch)."""
    return torch.nn.functional.linear(x, nf4_dequantize(q, x.dtype), bias)


def choose_path(x2d: torch.Tensor) -> str:
    """The auto path: ``gemv`` up to AUTO_GEMV_MAX_ROWS, ``fused`` up to AUTO_FUSED_MAX_ROWS, else ``dequant``
    (always ``dequant`` on the CPU)."""
    return _auto_path(x2d.shape[0], use_triton(x2d))


def _auto_path(rows: int, triton_ok: bool) -> str:
    if not triton_ok:
        return "dequant"
    if rows <= min(AUTO_GEMV_MAX_ROWS, GEMV_MAX_ROWS):
        return "gemv"
    return "fused" if rows <= AUTO_FUSED_MAX_ROWS else "dequant"


def _dense(q: NF4Tensor, dtype: torch.dtype, triton_ok: bool) -> torch.Tensor:
    """nf4_dequantize with the backend already decided (x and q share a device)."""
    return _dequantize_triton(q, dtype) if triton_ok else nf4_dequantize_reference(q, dtype)


def forward_2d(x2d, q, bias, path, triton_ok):
    """y = x2d · dequant(q)ᵀ + bias on a planned path (``plan``), outside autograd."""
    if path == "dequant":
        return torch.nn.functional.linear(x2d, _dense(q, x2d.dtype, triton_ok), bias)
    if path == "gemv":
        return gemv(x2d, q, bias)
    return _fused(x2d, q, bias, transpose_w=False)


def input_grad(dy2d, q, path, triton_ok):
    """dx = dy2d · dequant(q) for a forward that took ``path``, outside autograd."""
    if path != "dequant":
        return _fused(dy2d.contiguous(), q, None, transpose_w=True)
    return dy2d @ _dense(q, dy2d.dtype, triton_ok)


class _NF4Matmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2d, bias, q, path, triton_ok):
        ctx.q, ctx.path, ctx.triton_ok = q, path, triton_ok
        ctx.has_bias = bias is not None
        return forward_2d(x2d, q, bias, path, triton_ok)

    @staticmethod
    def backward(ctx, dy):
        dx = dbias = None
        if ctx.needs_input_grad[0]:
            dx = input_grad(dy, ctx.q, ctx.path, ctx.triton_ok)
        if ctx.has_bias and ctx.needs_input_grad[1]:
            dbias = dy.sum(0)
        return dx, dbias, None, None, None


def nf4_matmul(x: torch.Tensor, q: NF4Tensor, bias: torch.Tensor | None = None,
               path: str | None = None) -> torch.Tensor:
    """x [..., K] · dequant(q)ᵀ [K, N] (+ bias) -> [..., N] in x's dtype; differentiable w.r.t. x (and bias).
    ``path`` forces ``gemv`` / ``fused`` / ``dequant`` (default: ``choose_path``)."""
    x2d, path, triton_ok = plan(x, q, path)
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    out = _NF4Matmul.apply(x2d, bias, q, path, triton_ok)
    return out if x.dim() == 2 else out.view(*x.shape[:-1], q.shape[0])


def plan(x: torch.Tensor, q: NF4Tensor, path: str | None = None) -> tuple[torch.Tensor, str, bool]:
    """(x as a contiguous [rows, K] matrix, the path, whether Triton runs), checked and decided once per call:
    the forward, the backward and the dequantisation follow it."""
    if len(q.shape) != 2:
        raise ValueError(f"nf4_matmul: weight must be 2-D [out, in], got shape {tuple(q.shape)}")
    k_in = q.shape[1]
    if x.shape[-1] != k_in:
        raise ValueError(f"nf4_matmul: x has {x.shape[-1]} features, weight expects {k_in}")
    if path is not None and path not in PATHS:
        raise ValueError(f"nf4_matmul: path={path!r}, expected one of {PATHS}")
    x2d = x if x.dim() == 2 else x.reshape(-1, k_in)
    if not x2d.is_contiguous():
        x2d = x2d.contiguous()
    rows = x2d.shape[0]
    triton_ok = use_triton(x2d)
    if not triton_ok or rows == 0:
        path = "dequant"  # the only path without Triton
    elif path is None:
        path = _auto_path(rows, True)
    elif path == "gemv" and rows > GEMV_MAX_ROWS:
        path = "fused"
    return x2d, path, triton_ok


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
