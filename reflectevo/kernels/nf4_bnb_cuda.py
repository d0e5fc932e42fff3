"""The arithmetic of bitsandbytes' CUDA blockwise quantisation, so that ``nf4_quantize`` on a CUDA tensor gives the
bytes bitsandbytes' CUDA ``quantize_4bit`` gives.

bitsandbytes builds its CUDA library with ``--use_fast_math``. In ``kQuantizeBlockwise`` (csrc/kernels.cu; blocksize
64 for the 4-bit level, 256 for the 8-bit absmax level) one thread computes ``1.0f / absmax`` per block, which fast
math turns into ``rcp.approx.ftz.f32`` (SASS of libbitsandbytes_cuda130.so, sm_90: a single ``MUFU.RCP``, no
refinement), and every value is multiplied by it with ``FMUL.FTZ``; the absmax reduction is ``FMNMX.FTZ`` (denormal
inputs count as zero). The approximate reciprocal is not always the correctly rounded one, so a value within an ulp
or two of an NF4 threshold can land on the other side of it than with torch's IEEE ``1 / absmax``.

Its NF4 thresholds are fp32 literals in the source, the shortest decimal form of each double-precision midpoint of
two neighbouring levels; nvcc rounds that decimal straight to fp32. torch's fp32 midpoint rounds twice (to double,
then to fp32) and for four of the fifteen lands one ulp away (three above the once-rounded value, one below), so a
value sitting exactly on one of those four goes to a different code on the CPU (bucketize, as bitsandbytes' CPU
path) than on CUDA (``decimal_bounds``).

The 8-bit level does not use a lookup table on CUDA: ``dQuantize`` binary-searches the sorted code (7 halvings from
index 127) and then compares with the fp32 midpoint to each neighbour (``search_code``).
"""
from __future__ import annotations

from fractions import Fraction

import torch

from reflectevo.kernels._dispatch import HAS_TRITON, cdiv, interpreting

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _rcp_approx_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask, other=1.0)
        y = tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True,
                                      pack=1)
        tl.store(out_ptr + offs, y, mask=mask)


_FLT_MIN = torch.finfo(torch.float32).tiny


def hardware_reciprocal_available(x: torch.Tensor) -> bool:
    """True when ``approx_reciprocal`` runs the GPU's own ``rcp.approx.ftz.f32`` for ``x``."""
    return HAS_TRITON and x.is_cuda and not interpreting()


def approx_reciprocal(x: torch.Tensor) -> torch.Tensor:
    """fp32 ``1 / x`` as bitsandbytes' CUDA kernels compute it: the PTX ``rcp.approx.ftz.f32`` on CUDA (via Triton).
    Elsewhere (CPU, the Triton interpreter, no Triton) there is no such instruction: the IEEE reciprocal of the
    denormal-flushed ``x`` (the two can differ in the last bit)."""
    x = x.float().contiguous()
    if not hardware_reciprocal_available(x):
        return 1.0 / flush_denormals(x)
    out = torch.empty_like(x)
    n = x.numel()
    if n:
        block = 1024
        _rcp_approx_kernel[(cdiv(n, block),)](x, out, n, BLOCK=block)
    return out


def flush_denormals(x: torch.Tensor) -> torch.Tensor:
    """``x`` with fp32 denormals replaced by zero, as the ``.ftz`` instructions read them."""
    return torch.where(x.abs() < _FLT_MIN, torch.zeros_like(x), x)


def blockwise_scale(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For flat fp32 ``x``: (``[nb, blocksize]`` values times ``approx_reciprocal(absmax_b)``, the short last block
    padded with zeros as the kernel loads it; ``absmax_b`` per block). An all-zero block has absmax 0 and scales to
    NaN (``0 * inf``), as on the GPU."""
    x = flush_denormals(x)
    n = x.numel()
    nb = -(-n // blocksize)
    padded = torch.nn.functional.pad(x, (0, nb * blocksize - n)).view(nb, blocksize)
    absmax = padded.abs().amax(dim=1)
    return padded * approx_reciprocal(absmax)[:, None], absmax


def decimal_bounds(table: torch.Tensor) -> torch.Tensor:
    """fp32 thresholds between neighbouring ``table`` levels as a C compiler reads ``repr(midpoint)`` + ``f``: the
    double midpoint's shortest decimal string, rounded once to the nearest fp32 (ties to even)."""
    levels = table.double().tolist()
    bounds = []
    for lo, hi in zip(levels, levels[1:]):
        exact = Fraction(repr((lo + hi) / 2))
        guess = torch.tensor(float(exact), dtype=torch.float32)
        near = [guess, torch.nextafter(guess, torch.tensor(-2.0)), torch.nextafter(guess, torch.tensor(2.0))]
        bounds.append(min(near, key=lambda c: (abs(Fraction(c.item()) - exact), c.view(torch.int32).item() & 1)))
    return torch.stack(bounds)


def nf4_indices(x: torch.Tensor, blocksize: int, bounds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(NF4 index per value, int64, with the padding value of an odd count; absmax per block) of flat fp32 ``x`` as
    ``kQuantizeBlockwise`` picks them: the number of ``bounds`` the scaled value is strictly above, so NaN gets 0."""
    scaled, absmax = blockwise_scale(x, blocksize)
    n = x.numel()
    scaled = scaled.reshape(-1)[: n + n % 2]
    idx = torch.bucketize(scaled, bounds)
    return torch.where(scaled.isnan(), 0, idx), absmax


def search_code(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index (int64) of the ``code`` entry (256 sorted fp32 values) that bitsandbytes' CUDA ``dQuantize`` picks for
    each ``x``: binary search from index 127 in steps 64, 32, ..., 1, keeping the closest entries seen below
    (``lo``) and at or above (``hi``) ``x``, then a strict comparison with the fp32 midpoint between the final pivot
    and ``hi`` (when ``x`` lies above the pivot) or ``lo`` (otherwise). NaN goes to index 0."""
    pivot = torch.full_like(x, 127, dtype=torch.int64)
    lo = torch.zeros_like(pivot)
    hi = torch.full_like(pivot, 255)
    for step in (64, 32, 16, 8, 4, 2, 1):
        above = x > code[pivot]
        lo = torch.where(above, pivot, lo)
        hi = torch.where(above, hi, pivot)
        pivot = torch.where(above, pivot + step, pivot - step)
    val = code[pivot]
    above = x > val
    to_hi = x > (code[hi] + val) * 0.5
    to_lo = x < (code[lo] + val) * 0.5
    return torch.where(above, torch.where(to_hi, hi, pivot), torch.where(to_lo, lo, pivot))


def quantize_8bit_cuda_rules(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 8-bit quantisation of flat fp32 ``x`` to ``code`` the way bitsandbytes' CUDA
    ``quantize_blockwise`` does it: (uint8 codes, fp32 absmax per block)."""
    scaled, absmax = blockwise_scale(x, blocksize)
    return search_code(scaled.reshape(-1)[: x.numel()], code).to(torch.uint8), absmax
