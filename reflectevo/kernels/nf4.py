"""NF4 (4-bit NormalFloat) block quantisation with double quantisation, laid out exactly as bitsandbytes does.

Math. The weight is flattened (row-major) and cut into blocks of ``blocksize`` (64) values. Per block
``absmax_b = max |w|``; each value is scaled to ``w / absmax_b`` in [-1, 1] and rounded to the nearest of the 16
NF4 levels (``NF4_TABLE``; ties go to the lower level). Two 4-bit indices share a byte: element 2j in the high
nibble, element 2j+1 in the low nibble (an odd count is padded with a zero nibble).

Double quantisation stores ``absmax`` itself in 8 bits: ``offset = mean(absmax)``; ``absmax - offset`` is cut into
blocks of 256, each scaled by its own fp32 ``absmax2`` and mapped to the 256-entry signed dynamic code ``code2``
(bitsandbytes' 8-bit dynamic map). Dequantisation: ``absmax_b = code2[qabsmax_b] * absmax2[b // 256] + offset``,
``w = NF4_TABLE[nibble] * absmax_b`` in fp32, then cast to the output dtype.

Memory: 0.5 byte per weight for the nibbles + 1 byte per 64 weights for ``qabsmax`` + 4 bytes per 64*256 weights
for ``absmax2`` = 0.5159 bytes/parameter, against 2 for bf16 (3.9x less) and 0.5625 without double quantisation.

Bytes follow bitsandbytes 0.50 on the tensor's device, and the two devices round differently, so a CPU and a CUDA
quantisation of the same weight can differ in a few codes. CPU (``quantize_4bit``'s torch path,
bitsandbytes/backends/default/ops.py, and its C++ ``quantize_blockwise``): IEEE ``1 / absmax`` (a division for the
short last block); the 8-bit level rounds the scaled value ``v`` to the nearest of 65536 grid points
``-1 + 2i/65535`` (``i = floor((v + 1) * 0.5 * 65535 + 0.5)``) and each grid point to its nearest code value.
CUDA (``nf4_bnb_cuda``): the fast-math approximate reciprocal of absmax for every block, denormals flushed, and a
binary search of the 8-bit code. So a 4-bit code can differ between the devices only where the scaled value is
within an ulp or two of an NF4 threshold, or in an all-zero block (code 0 on CUDA, 7 on the CPU; both decode to 0).
Decoding is the same for every layout.

The Triton kernel decodes both levels (8-bit absmax and 4-bit values) in one launch.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from reflectevo.kernels import nf4_bnb_cuda as bnb_cuda
from reflectevo.kernels._dispatch import HAS_TRITON, cdiv, interpreting, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

# The 16 NF4 levels (quantiles of N(0, 1) normalised to [-1, 1]), as float32 values bitsandbytes uses.
NF4_TABLE = torch.tensor(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=torch.float32,
)
NF4_BOUNDS = (NF4_TABLE[:-1] + NF4_TABLE[1:]) / 2
NF4_BOUNDS_CUDA = bnb_cuda.decimal_bounds(NF4_TABLE)  # four differ by one ulp: see nf4_bnb_cuda
DOUBLE_QUANT_BLOCKSIZE = 256
VALID_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
_LUT_BINS = 65536


def dynamic_code() -> torch.Tensor:
    """The signed 8-bit dynamic map (7 exponent bits): 256 sorted float32 values in [-0.993, 1]."""
    values = [0.0, 1.0]
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        scale = 10 ** (i - 6)
        values += (scale * mids).tolist() + (-scale * mids).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


_CODE2 = dynamic_code()
_luts: dict = {}


def _code_lut(code: torch.Tensor) -> torch.Tensor:
    """For each of 65536 bins of [-1, 1], the index of the code value nearest to the bin's left edge."""
    key = (str(code.device), tuple(code.tolist()))
    if key not in _luts:
        mids = 0.5 * (code[:-1] + code[1:])
        i = torch.arange(_LUT_BINS, dtype=torch.float32, device=code.device)
        left = -1.0 + (2.0 * i) / float(_LUT_BINS - 1)
        _luts[key] = torch.searchsorted(mids, left).clamp(max=255).to(torch.uint8)
    return _luts[key]


@dataclasses.dataclass
class NF4Tensor:
    """A frozen NF4 weight: ``data`` packed nibbles (uint8, ceil(numel/2)), ``absmax`` per block (uint8 codes when
    double-quantised, else float32), ``absmax2``/``code2``/``offset`` for the second level, the logical ``shape``,
    the ``dtype`` dequantisation returns by default and the ``blocksize``."""

    data: torch.Tensor
    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype = torch.bfloat16
    blocksize: int = 64
    absmax2: torch.Tensor | None = None
    code2: torch.Tensor | None = None
    offset: torch.Tensor | None = None

    @property
    def double_quant(self) -> bool:
        return self.absmax2 is not None

    @property
    def device(self) -> torch.device:
        return self.data.device

    def numel(self) -> int:
        return math.prod(self.shape)

    def nbytes(self) -> int:
        """Bytes of the quantised storage (data + absmax + second level)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"data": self.data, "absmax": self.absmax}
        if self.double_quant:
            out.update(absmax2=self.absmax2, code2=self.code2, offset=self.offset)
        return out

    def to(self, device=None, dtype=None) -> "NF4Tensor":
        """Moves the storage to ``device``; ``dtype`` only changes the default dequantisation dtype."""
        moved = {k: v.to(device) if device is not None else v for k, v in self.tensors().items()}
        return dataclasses.replace(self, dtype=dtype or self.dtype, **moved)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only (safetensors-friendly); ``from_state_dict`` rebuilds the object."""
        meta = torch.tensor([self.blocksize, *self.shape], dtype=torch.int64)
        dt = torch.tensor([_DTYPE_IDS.index(self.dtype)], dtype=torch.int64)
        return {**self.tensors(), "meta": meta, "dtype": dt}

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor]) -> "NF4Tensor":
        meta = sd["meta"].tolist()
        return cls(data=sd["data"], absmax=sd["absmax"], shape=torch.Size(meta[1:]), blocksize=int(meta[0]),
                   dtype=_DTYPE_IDS[int(sd["dtype"][0])], absmax2=sd.get("absmax2"), code2=sd.get("code2"),
                   offset=sd.get("offset"))


_DTYPE_IDS = [torch.float32, torch.bfloat16, torch.float16]


def _blockwise_absmax(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(full blocks as [nb, blocksize], absmax per block incl. the short tail, number of full-block values)."""
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    if full < n:
        absmax = torch.cat([absmax, flat[full:].abs().amax().reshape(1)])
    return blocks, absmax, full


def _quantize_8bit_dynamic(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 8-bit quantisation of fp32 ``x`` to ``code`` (bitsandbytes' CPU lookup-table rounding)."""
    n = x.numel()
    nb = -(-n // blocksize)
    padded = torch.nn.functional.pad(x, (0, nb * blocksize - n)).view(nb, blocksize)
    absmax = padded.abs().amax(dim=1)
    inv = torch.where(absmax == 0, torch.zeros_like(absmax), 1.0 / absmax)
    # a denormal absmax has an infinite inverse: 0 * inf is nan, which bitsandbytes' CPU code maps to code 0
    v = torch.nan_to_num((padded * inv[:, None]).clamp(-1.0, 1.0), nan=-1.0)
    bins = ((((v + 1.0) * 0.5) * float(_LUT_BINS - 1)) + 0.5).to(torch.int64)
    q = _code_lut(code)[bins]
    q = torch.where((absmax == 0)[:, None], torch.zeros_like(q), q)
    return q.reshape(-1)[:n].contiguous(), absmax


@torch.no_grad()
def nf4_quantize(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Tensor:
    """NF4-quantise ``weight`` (any shape, fp32/bf16/fp16) on its device; bitsandbytes' byte layout."""
    if blocksize not in VALID_BLOCKSIZES:
        raise ValueError(f"blocksize={blocksize}: expected one of {VALID_BLOCKSIZES}")
    if weight.dtype not in _DTYPE_IDS:
        raise ValueError(f"weight dtype {weight.dtype}: expected float32, bfloat16 or float16")
    if weight.numel() == 0:
        raise ValueError("weight is empty")
    flat = weight.detach().reshape(-1).float()
    if not bool(torch.isfinite(flat).all()):
        bad = int((~torch.isfinite(flat)).sum())
        raise ValueError(f"nf4_quantize: the weight holds {bad} nan / inf values (of {flat.numel()}); NF4 needs "
                         f"finite weights")
    cuda_rules = flat.is_cuda
    if cuda_rules:
        idx, absmax = bnb_cuda.nf4_indices(flat, blocksize, NF4_BOUNDS_CUDA.to(flat.device))
    else:
        blocks, absmax, full = _blockwise_absmax(flat, blocksize)
        scaled = (blocks * (1.0 / absmax[: blocks.shape[0]].clamp(min=1e-38))[:, None]).clamp(-1, 1).reshape(-1)
        if full < flat.numel():
            tail = (flat[full:] / absmax[-1].clamp(min=1e-38)).clamp(-1, 1)
            scaled = torch.cat([scaled, tail])
        if scaled.numel() % 2:
            scaled = torch.nn.functional.pad(scaled, (0, 1))
        idx = torch.bucketize(scaled, NF4_BOUNDS.to(flat.device))
    idx = idx.to(torch.uint8)
    data = (idx[0::2] << 4) | idx[1::2]
    q = NF4Tensor(data=data, absmax=absmax, shape=torch.Size(weight.shape), dtype=weight.dtype, blocksize=blocksize)
    if double_quant:
        offset = absmax.mean()
        code2 = _CODE2.to(flat.device)
        quantize_8bit = bnb_cuda.quantize_8bit_cuda_rules if cuda_rules else _quantize_8bit_dynamic
        q.absmax, q.absmax2 = quantize_8bit(absmax - offset, code2, DOUBLE_QUANT_BLOCKSIZE)
        q.code2, q.offset = code2.clone(), offset
    return q


def nf4_from_bnb(packed: torch.Tensor, state) -> NF4Tensor:
    """An NF4Tensor sharing the storage of bitsandbytes' ``quantize_4bit`` output (``packed``, its QuantState)."""
    if getattr(state, "quant_type", "nf4") != "nf4":
        raise ValueError(f"nf4_from_bnb: quant_type {state.quant_type!r} is not nf4")
    q = NF4Tensor(data=packed.reshape(-1).view(torch.uint8), absmax=state.absmax, shape=torch.Size(state.shape),
                  dtype=state.dtype, blocksize=int(state.blocksize))
    if state.nested:
        q.absmax2, q.code2, q.offset = state.state2.absmax, state.state2.code, state.offset
    return q


def _absmax_fp32(q: NF4Tensor) -> torch.Tensor:
    """Per-block absmax in fp32: ``code2[qabsmax] * absmax2[b // 256] + offset`` (or the stored fp32 values)."""
    if not q.double_quant:
        return q.absmax.float()
    nb = q.absmax.numel()
    groups = -(-nb // DOUBLE_QUANT_BLOCKSIZE)
    codes = torch.nn.functional.pad(q.code2[q.absmax.long()], (0, groups * DOUBLE_QUANT_BLOCKSIZE - nb))
    return ((codes.view(groups, -1) * q.absmax2[:, None]).reshape(-1)[:nb]) + q.offset


_BYTE_PAIRS: dict = {}


def nf4_byte_pairs(device) -> torch.Tensor:
    """[256, 2] fp32: the two NF4 levels a packed byte holds, element 2j (high nibble) first; entry (v, 1) is level
    v. The Triton kernels look bytes up in it. Made once per device: a per-call ``.to(device)`` would be a
    host-to-device copy that synchronises with the host and costs more than a small kernel's launch."""
    key = str(device)
    if key not in _BYTE_PAIRS:
        b = torch.arange(256)
        _BYTE_PAIRS[key] = torch.stack([NF4_TABLE[b >> 4], NF4_TABLE[b & 0xF]], dim=1).to(device)
    return _BYTE_PAIRS[key]


def nf4_dequantize_reference(q: NF4Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Plain PyTorch decode: both levels, fp32 math, one cast at the end."""
    dtype = dtype or q.dtype
    n, bs = q.numel(), q.blocksize
    # byte -> (high-nibble level, low-nibble level); index_select is much faster than advanced indexing
    pairs = nf4_byte_pairs(q.device).index_select(0, q.data.int()).reshape(-1)
    absmax = _absmax_fp32(q)
    nb = absmax.numel()
    if nb * bs != pairs.numel():
        pairs = torch.nn.functional.pad(pairs[:n], (0, nb * bs - n))
    return (pairs.view(nb, bs) * absmax[:, None]).reshape(-1)[:n].to(dtype).reshape(q.shape)


if HAS_TRITON and interpreting():

    @triton.jit
    def cast_rne(x, dtype: tl.constexpr):
        """fp32 -> dtype, round-to-nearest-even for bf16: the interpreter's own cast truncates."""
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16) << 16
            x = bits.to(tl.float32, bitcast=True)
        return x.to(dtype)

elif HAS_TRITON:

    @triton.jit
    def cast_rne(x, dtype: tl.constexpr):
        """fp32 -> dtype: compiled, the cast rounds to nearest even in one instruction (F2FP on sm_90); the
        interpreter's bit arithmetic above costs ~4 more integer instructions per value in the decode loops."""
        return x.to(dtype)

# Level lookups in the kernels. BYTE_TABLE: each packed byte is looked up once in the [256, 2] table of level pairs
# (``nf4_byte_pairs``, 2 KiB, one 8-byte gather), else each nibble on its own in the 16 levels, entries (v, 1) of the
# same table, which lie in one 128-byte line (two 4-byte gathers). The pair table takes fewer instructions (sm_90,
# Triton 3.6: fused K loops 15-25 % shorter) but a warp's 32 random bytes touch ~14 of its 16 lines, and L1 serves
# a gather one line (wavefront) at a time: ~14 L1 wavefronts per load against one per nibble load, i.e. ~7x the L1
# traffic per decoded value. NF4 codes are quantiles, so bytes are close to uniform in real weights. Unmeasured:
# ``bench kernels`` times both ("other table" columns); the default is the one the L1 arithmetic favours.
BYTE_TABLE = False

if HAS_TRITON:

    @triton.jit
    def levels_at(data_ptr, pairs_ptr, flat, mask):
        """NF4 levels (fp32, in [-1, 1]) at flat element indices ``flat`` (any tile shape)."""
        byte = tl.load(data_ptr + (flat >> 1), mask=mask, other=0).to(tl.int32)
        nib = (byte >> ((1 - (flat & 1)) * 4).to(tl.int32)) & 0xF
        return tl.load(pairs_ptr + nib * 2 + 1, mask=mask, other=0.0)

    @triton.jit
    def byte_levels(byte, pairs_ptr, BYTE_TABLE: tl.constexpr):
        """[R, C, 2] fp32 levels of the packed bytes ``byte`` (int32 [R, C]), high nibble (element 2j) first."""
        if BYTE_TABLE:
            return tl.load(pairs_ptr + byte[:, :, None] * 2 + tl.arange(0, 2)[None, None, :])
        else:
            high = tl.load(pairs_ptr + (byte >> 4) * 2 + 1)
            low = tl.load(pairs_ptr + (byte & 0xF) * 2 + 1)
            return tl.join(high, low)

    @triton.jit
    def tile_levels(byte_ptrs, pairs_ptr, mask, ROWS: tl.constexpr, COLS: tl.constexpr, BYTE_TABLE: tl.constexpr):
        """[ROWS, COLS] NF4 levels from a [ROWS, COLS // 2] tile of packed-byte pointers, each byte loaded once."""
        byte = tl.load(byte_ptrs, mask=mask, other=0).to(tl.int32)
        return tl.reshape(byte_levels(byte, pairs_ptr, BYTE_TABLE), (ROWS, COLS))

    @triton.jit
    def word_levels(word_ptrs, pairs_ptr, mask):
        """[ROWS, COLS // 8, 8] NF4 levels from a [ROWS, COLS // 8] tile of pointers to the packed bytes read as int32
        words (little-endian: byte j of a word holds elements 2j, high nibble, and 2j + 1), nibbles shifted out
        of the word, each looked up in the 16 levels: no per-byte extraction before the shift."""
        word = tl.load(word_ptrs, mask=mask, other=0)
        i = tl.arange(0, 8)
        shift = 8 * (i // 2) + 4 * (1 - i % 2)
        nib = (word[:, :, None] >> shift[None, None, :]) & 0xF
        return tl.load(pairs_ptr + nib * 2 + 1)

    @triton.jit
    def block_scales(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, blk, mask, DOUBLE: tl.constexpr,
                     WORDS: tl.constexpr):
        """fp32 absmax of blocks ``blk``: ``code2[qabsmax] * absmax2[blk // 256] + offset`` (or stored fp32).
        WORDS: ``absmax_ptr`` is the uint8 codes viewed as int32 (little-endian, 4 codes a word): each code is
        read with the 4-byte word that holds it. A 1-byte load cannot go through cp.async, so Triton's software
        pipeliner leaves it a synchronous load inside a K loop, and the code2 gather waits on it: a full
        global-memory round trip every K step (sm_90 SASS, Triton 3.6). The word load is pipelined like the others."""
        if DOUBLE:
            if WORDS:
                qa = (tl.load(absmax_ptr + blk // 4, mask=mask, other=0) >> ((blk % 4) * 8).to(tl.int32)) & 0xFF
            else:
                qa = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
            c = tl.load(code2_ptr + qa, mask=mask, other=0.0)
            a2 = tl.load(absmax2_ptr + blk // 256, mask=mask, other=0.0)
            return c * a2 + tl.load(offset_ptr)
        else:
            return tl.load(absmax_ptr + blk, mask=mask, other=0.0)


def kernel_args(q: NF4Tensor):
    """The NF4 pointers for the kernels, and WORDS: whether the uint8 absmax codes go as int32 words (a whole number
    of words at a 4-byte aligned address; see ``block_scales``)."""
    dq = q.double_quant
    a = q.absmax
    words = dq and a.numel() % 4 == 0 and a.data_ptr() % 4 == 0 and a.is_contiguous()
    codes = a.view(torch.int32) if words else a
    return (q.data, codes, q.absmax2 if dq else a, q.code2 if dq else a, q.offset if dq else a,
            nf4_byte_pairs(q.device)), words


if HAS_TRITON:

    @triton.jit
    def _nf4_dequant_kernel(data_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, pairs_ptr, out_ptr, n, n_bytes,
                            BLOCKSIZE: tl.constexpr, DOUBLE: tl.constexpr, ROWS: tl.constexpr,
                            BYTE_TABLE: tl.constexpr, NIBBLE_WORDS: tl.constexpr):
        """ROWS quantisation blocks per program, laid out [ROWS, BLOCKSIZE]: each packed byte is read once and
        gives two outputs (high nibble -> element 2j, low -> 2j + 1), each block's absmax is decoded once and
        broadcast along its row, and every row is written as one contiguous run. The byte mask compares against
        n_bytes = ceil(n / 2), not 2 * pair < n: a stride-2 comparison hides that runs of bytes share a mask value,
        and the compiler then loads every byte on its own (sm_90 SASS: 8 LDG.U8 instead of one 64-bit load).
        NIBBLE_WORDS (n % 8 == 0, the bytes 4-byte aligned): the bytes are read as int32 words, the nibbles shifted
        out of them (``word_levels``) and the tile kept [ROWS, BLOCKSIZE // 8, 8], so a thread's 8 values of a word
        are stored as one 16-byte run: no byte extraction and no layout change through shared memory before the
        store (sm_90, Triton 3.6, 16 values a thread: 256 -> 224 instructions and no shared-memory round trip;
        the pair table, with the round trip: 216)."""
        HALF: tl.constexpr = BLOCKSIZE // 2
        blk = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        if NIBBLE_WORDS:
            W8: tl.constexpr = BLOCKSIZE // 8
            word = blk[:, None] * W8 + tl.arange(0, W8)[None, :]
            levels = word_levels(data_ptr.to(tl.pointer_type(tl.int32)) + word, pairs_ptr, word * 4 < n_bytes)
        else:
            pair = blk[:, None] * HALF + tl.arange(0, HALF)[None, :]
            byte = tl.load(data_ptr + pair, mask=pair < n_bytes, other=0).to(tl.int32)
            levels = tl.reshape(byte_levels(byte, pairs_ptr, BYTE_TABLE), (ROWS, BLOCKSIZE))
        blk_ok = blk * BLOCKSIZE < n
        if DOUBLE:
            qa = tl.load(absmax_ptr + blk, mask=blk_ok, other=0).to(tl.int32)
            c = tl.load(code2_ptr + qa, mask=blk_ok, other=0.0)
            a2 = tl.load(absmax2_ptr + blk // 256, mask=blk_ok, other=0.0)
            scale = c * a2 + tl.load(offset_ptr)
        else:
            scale = tl.load(absmax_ptr + blk, mask=blk_ok, other=0.0)
        if NIBBLE_WORDS:
            offs = ((blk[:, None] * BLOCKSIZE + 8 * tl.arange(0, W8)[None, :])[:, :, None]
                    + tl.arange(0, 8)[None, None, :])
            tl.store(out_ptr + offs, cast_rne(levels * scale[:, None, None], out_ptr.dtype.element_ty), mask=offs < n)
        else:
            offs = blk[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
            tl.store(out_ptr + offs, cast_rne(levels * scale[:, None], out_ptr.dtype.element_ty), mask=offs < n)


def _dequantize_triton(q: NF4Tensor, dtype: torch.dtype, byte_table: bool | None = None) -> torch.Tensor:
    n = q.numel()
    out = torch.empty(n, dtype=dtype, device=q.device)
    if q.blocksize < 2 or q.blocksize & (q.blocksize - 1):
        raise ValueError(f"nf4_dequantize: the Triton kernel needs a power-of-two blocksize, got {q.blocksize}")
    tile = 4096 if q.device.type == "cuda" else 256  # values per program
    rows = max(1, tile // q.blocksize)
    dq = q.double_quant
    dummy = q.absmax
    byte_table = BYTE_TABLE if byte_table is None else byte_table
    words = (not byte_table and n % 8 == 0 and q.blocksize >= 8 and q.data.data_ptr() % 4 == 0
             and q.data.is_contiguous())
    _nf4_dequant_kernel[(cdiv(cdiv(n, q.blocksize), rows),)](
        q.data, q.absmax, q.absmax2 if dq else dummy, q.code2 if dq else dummy, q.offset if dq else dummy,
        nf4_byte_pairs(q.device), out, n, (n + 1) // 2, BLOCKSIZE=q.blocksize, DOUBLE=dq, ROWS=rows,
        BYTE_TABLE=byte_table, NIBBLE_WORDS=words, num_warps=8 if q.device.type == "cuda" else 4,
        enable_fp_fusion=False,  # keep code2 * absmax2 + offset two roundings, as the reference does
    )
    return out.reshape(q.shape)


def nf4_dequantize(q: NF4Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dense weight (``q.shape``, ``dtype`` or ``q.dtype``): Triton on CUDA, PyTorch on the CPU."""
    dtype = dtype or q.dtype
    if use_triton(q.data):
        return _dequantize_triton(q, dtype)
    return nf4_dequantize_reference(q, dtype)
