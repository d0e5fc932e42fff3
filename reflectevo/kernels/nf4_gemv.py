"""y = x · dequant(W)ᵀ for a few rows of x (1-8: a decode step) and an NF4 weight W [N, K]: the GEMV path of
``nf4_matmul``. No tensor cores: a decode step reads every weight once and does 2 FLOPs per weight and row, so the
floor is the 0.52 bytes/weight of the NF4 layout at the copy bandwidth, and the SMs must decode a weight in a few
instructions to keep up with that stream (4096x4096 on 132 SMs: ~2 us of memory; at 12 instructions a weight,
~6 us of instruction issue).

- ``_gemv_blocks_kernel`` (one row, K a multiple of the block size: a single-sequence decode step). A step is one
  quantisation block of BLOCK_N weight rows; the row's scale multiplies the block's sum once:
  ``y[n] = sum_b absmax[n, b] · sum_{k in b} x[k] · level[n, k]`` in fp32. The packed bytes are read as int32
  words and the nibbles shifted out of them (no per-byte extraction), x is loaded in the same [.., 8] shape as the
  nibbles of a word, and a 256-row tile lets a thread's x values serve two weight rows. sm_90 SASS (Triton 3.6),
  instructions per weight in the loop: 8.6 (BLOCK_N 256), 9.2 (128), 9.9 (64), against 12.1 for the elementwise
  kernel with the pair table and 14.8 with 16 levels (it pads one row to two). W is not rounded to x's dtype first,
  so the result is closer to the exact product than dequant + matmul (which rounds each weight to bf16).
- ``_gemv_kernel`` (any shape, up to 8 rows): each weight decoded, scaled and rounded to x's dtype as the dequant
  path does, products accumulated elementwise in a [ROWS, BLOCK_N, BLOCK_K] tile (one FMA per weight and row) and
  summed over K after the loop. The block kernel's form with several rows (a [ROWS, BLOCK_N, BLOCK_K] product
  reduced every step) compiled to cross-thread shuffles, 41-135 instructions per weight; one unrolled over the rows
  (a sum per row, merged into a [ROWS, BLOCK_N] accumulator) took 11.5 per weight at 2 rows (BLOCK_N 256, 180
  registers) and 26 at 4 rows, against the elementwise kernel's 14.8 and 22, and was not kept.

Both split K over programs and write fp32 partial sums [splits, rows, N], summed (and biased) after the kernel.
All unmeasured on a GPU; ``bench kernels`` times the block kernel against the elementwise one at one token.
"""
from __future__ import annotations

import torch

from reflectevo.kernels import nf4 as nf4_mod
from reflectevo.kernels._dispatch import HAS_TRITON, cdiv, next_power_of_2, sm_count
from reflectevo.kernels.nf4 import NF4Tensor, kernel_args

if HAS_TRITON:
    import triton
    import triton.language as tl

    from reflectevo.kernels.nf4 import block_scales, cast_rne, levels_at, tile_levels, word_levels

GEMV_MAX_ROWS = 8  # what the GEMV kernels handle
GEMV_STAGES = 1  # software-pipeline depth of the elementwise kernel's K loop on CUDA (1: none)
GEMV_BLOCKS = True  # one row: the block kernel where it applies (unmeasured: the benchmark times both)

if HAS_TRITON:

    @triton.jit
    def _gemv_blocks_kernel(x_ptr, data_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, pairs_ptr, part_ptr,
                            N, K, k_per_split, BLOCKSIZE: tl.constexpr, DOUBLE: tl.constexpr, WORDS: tl.constexpr,
                            BLOCK_N: tl.constexpr):
        """part[split, n] = sum over the blocks b of this split's K range of absmax[n, b] · (x[b] · levels[n, b]),
        one row of x, K % BLOCKSIZE == 0, k_per_split a multiple of BLOCKSIZE, packed bytes 4-byte aligned.
        A step decodes one block of BLOCK_N weight rows from int32 words, [BLOCK_N, BLOCKSIZE // 8, 8] nibbles, and
        x is loaded in the same [BLOCKSIZE // 8, 8] shape, so a thread's nibbles and x values line up in registers
        and most of each block's sum is the thread's own FMAs."""
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        k_lo = tl.program_id(1) * k_per_split
        k_hi = tl.minimum(k_lo + k_per_split, K)
        word_ptrs = (data_ptr.to(tl.pointer_type(tl.int32)) + rn[:, None].to(tl.int64) * (K // 8)
                     + (k_lo // 8 + tl.arange(0, BLOCKSIZE // 8))[None, :])
        x_ptrs = x_ptr + k_lo + (8 * tl.arange(0, BLOCKSIZE // 8))[:, None] + tl.arange(0, 8)[None, :]
        blk = rn.to(tl.int64) * (K // BLOCKSIZE) + k_lo // BLOCKSIZE
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for _ in range(k_lo, k_hi, BLOCKSIZE):
            level = word_levels(word_ptrs, pairs_ptr, n_ok[:, None])
            scale = block_scales(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, blk, n_ok, DOUBLE, WORDS)
            x = tl.load(x_ptrs).to(tl.float32)
            acc += tl.sum(tl.sum(level * x[None, :, :], axis=2), axis=1) * scale
            word_ptrs += BLOCKSIZE // 8
            x_ptrs += BLOCKSIZE
            blk += 1
        tl.store(part_ptr + tl.program_id(1).to(tl.int64) * N + rn, acc, mask=n_ok)

    @triton.jit
    def _gemv_kernel(x_ptr, data_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, pairs_ptr, part_ptr,
                     M, N, K, stride_xm, k_per_split,
                     BLOCKSIZE: tl.constexpr, DOUBLE: tl.constexpr, WORDS: tl.constexpr, PAIRS: tl.constexpr,
                     PER_LINE: tl.constexpr, BYTE_TABLE: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, STAGES: tl.constexpr):
        """part[split, m, n] = sum over k in this split's range of x[m, k] · W[n, k], fp32, W rounded to x's dtype,
        for M <= ROWS (a power of two <= 8). Each W tile is decoded once for all rows; with K even (PAIRS) each
        packed byte is read once for its two values. Products accumulate elementwise in a [ROWS, BLOCK_N, BLOCK_K]
        tile (one FMA each) and are summed over K once, after the loop. STAGES > 1 software-pipelines the loads
        (cp.async, STAGES - 1 tiles ahead)."""
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        split = tl.program_id(1)
        rm = tl.arange(0, ROWS)
        rk = tl.arange(0, BLOCK_K)
        half = tl.arange(0, BLOCK_K // 2)
        n_ok = rn < N
        k_lo = split * k_per_split
        k_hi = tl.minimum(k_lo + k_per_split, K)
        x_ptrs = x_ptr + rm[:, None] * stride_xm + (k_lo + rk)[None, :]
        byte_ptrs = data_ptr + rn[:, None].to(tl.int64) * (K // 2) + (k_lo // 2 + half)[None, :]
        acc = tl.zeros((ROWS, BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in tl.range(k_lo, k_hi, BLOCK_K, num_stages=STAGES):
            k_ok = k0 + rk < k_hi
            if PER_LINE:  # whole K tiles: masks along K would hide the runs of bytes from the vectoriser
                level = tile_levels(byte_ptrs, pairs_ptr, n_ok[:, None], BLOCK_N, BLOCK_K, BYTE_TABLE)
                byte_ptrs += BLOCK_K // 2
            elif PAIRS:
                level = tile_levels(byte_ptrs, pairs_ptr, n_ok[:, None] & (k0 + 2 * half < k_hi)[None, :],
                                    BLOCK_N, BLOCK_K, BYTE_TABLE)
                byte_ptrs += BLOCK_K // 2
            else:
                flat = rn[:, None].to(tl.int64) * K + (k0 + rk)[None, :]
                level = levels_at(data_ptr, pairs_ptr, flat, n_ok[:, None] & k_ok[None, :])
            if PER_LINE:
                blk = rn.to(tl.int64) * (K // BLOCKSIZE) + k0 // BLOCKSIZE
                scale = block_scales(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, blk, n_ok, DOUBLE, WORDS)[:, None]
            else:
                flat = rn[:, None].to(tl.int64) * K + (k0 + rk)[None, :]
                scale = block_scales(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, flat // BLOCKSIZE,
                                     n_ok[:, None] & k_ok[None, :], DOUBLE, WORDS)
            w = cast_rne(level * scale, x_ptr.dtype.element_ty).to(tl.float32)
            if PER_LINE:
                x = tl.load(x_ptrs, mask=rm[:, None] < M, other=0.0).to(tl.float32)
            else:
                x = tl.load(x_ptrs, mask=(rm[:, None] < M) & k_ok[None, :], other=0.0).to(tl.float32)
            x_ptrs += BLOCK_K
            acc = tl.fma(x[:, None, :], w[None, :, :], acc)  # masked k: x is 0 there
        tl.store(part_ptr + (split * M + rm[:, None]).to(tl.int64) * N + rn[None, :], tl.sum(acc, axis=2),
                 mask=(rm[:, None] < M) & n_ok[None, :])


def _gemv_plan(n_out: int, k_in: int, rows: int, block_k: int, cuda: bool, sms: int) -> tuple[int, int]:
    """(BLOCK_N, K per split) for the elementwise kernel's K step of ``block_k``: rows * BLOCK_N * block_k <= 4096
    products per step, about four programs per SM on CUDA, each with at least four K steps."""
    if cuda:
        bn, target, min_steps = max(16, 4096 // (rows * block_k)), 4 * sms, 4
    else:  # interpreter: small tiles, and a K split on small test shapes so both paths are exercised
        bn, target, min_steps = 16, 8, 2
    splits = max(1, min(target // cdiv(n_out, bn), cdiv(k_in, min_steps * block_k)))
    return bn, cdiv(cdiv(k_in, splits), block_k) * block_k


def _blocks_plan(n_out: int, k_in: int, blocksize: int, cuda: bool, sms: int) -> tuple[int, int]:
    """(BLOCK_N, K per split) for the block kernel: the widest of 256 / 128 / 64 weight rows (a thread's x values
    serve more rows) that still gives two programs per SM, at most four per SM, at least two blocks each."""
    if not cuda:
        return 16, cdiv(cdiv(k_in, blocksize), 2) * blocksize  # interpreter: two splits on the test shapes
    max_splits = max(1, k_in // (2 * blocksize))
    for bn in (256, 128, 64):
        if cdiv(n_out, bn) * max_splits >= 2 * sms:
            break
    splits = max(1, min(4 * sms // cdiv(n_out, bn), max_splits))
    return bn, cdiv(cdiv(k_in, splits), blocksize) * blocksize


def gemv(x2d: torch.Tensor, q: NF4Tensor, bias, blocks: bool | None = None, stages: int = GEMV_STAGES,
         byte_table: bool | None = None) -> torch.Tensor:
    """x2d [M <= 8, K] · dequant(q)ᵀ (+ bias) in x2d's dtype. ``blocks`` (default: one row, K a multiple of the
    block size, the packed bytes 4-byte aligned) picks ``_gemv_blocks_kernel``, else ``_gemv_kernel``; ``stages``
    and ``byte_table`` (default nf4.BYTE_TABLE) are the elementwise kernel's options the benchmark times."""
    n_out, k_in = q.shape
    M = x2d.shape[0]
    if M > GEMV_MAX_ROWS:
        raise ValueError(f"gemv: at most {GEMV_MAX_ROWS} rows, got {M}")
    fits = (M == 1 and k_in % q.blocksize == 0 and 8 <= q.blocksize <= 256 and q.data.data_ptr() % 4 == 0
            and q.data.is_contiguous())
    blocks = fits and (GEMV_BLOCKS if blocks is None else blocks)
    cuda = x2d.is_cuda
    sms = sm_count(x2d.device) if cuda else 0
    q_args, words = kernel_args(q)
    if blocks:
        bn, k_per_split = _blocks_plan(n_out, k_in, q.blocksize, cuda, sms)
        splits = cdiv(k_in, k_per_split)
        part = torch.empty(splits, 1, n_out, dtype=torch.float32, device=x2d.device)
        _gemv_blocks_kernel[(cdiv(n_out, bn), splits)](
            x2d, *q_args, part, n_out, k_in, k_per_split, BLOCKSIZE=q.blocksize, DOUBLE=q.double_quant,
            WORDS=words, BLOCK_N=bn)
    else:
        rows = max(2, next_power_of_2(M))
        bk = min(64 if cuda else 32, q.blocksize)
        bn, k_per_split = _gemv_plan(n_out, k_in, rows, bk, cuda, sms)
        splits = cdiv(k_in, k_per_split)
        part = torch.empty(splits, M, n_out, dtype=torch.float32, device=x2d.device)
        _gemv_kernel[(cdiv(n_out, bn), splits)](
            x2d, *q_args, part, M, n_out, k_in, x2d.stride(0), k_per_split,
            BLOCKSIZE=q.blocksize, DOUBLE=q.double_quant, WORDS=words, PAIRS=k_in % 2 == 0,
            PER_LINE=k_in % q.blocksize == 0 and q.blocksize % bk == 0 and k_in % 2 == 0,
            BYTE_TABLE=nf4_mod.BYTE_TABLE if byte_table is None else byte_table,
            ROWS=rows, BLOCK_N=bn, BLOCK_K=bk, STAGES=stages if cuda else 1, enable_fp_fusion=False,
        )
    out = part[0] if splits == 1 else part.sum(0)
    if bias is not None:
        out = out + bias.float()
    return out.to(x2d.dtype)
