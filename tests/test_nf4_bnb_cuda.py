"""bitsandbytes' CUDA quantisation rules (reflectevo.kernels.nf4_bnb_cuda) where a CPU can check them: the
fallback of the approximate reciprocal, the 8-bit code search, and how both differ from the CPU rules."""
import math

import torch

from reflectevo.kernels import nf4_bnb_cuda as bc
from reflectevo.kernels.nf4 import NF4_BOUNDS, _quantize_8bit_dynamic, dynamic_code, nf4_quantize

CODE = dynamic_code()


def test_reciprocal_off_cuda_is_ieee_with_denormals_flushed():
    x = torch.cat([torch.rand(1000, generator=torch.Generator().manual_seed(0)) * 10 + 1e-3,
                   torch.tensor([1.0, 3.0, 1e-39, -1e-40, 0.0, 2e-38])])
    assert not bc.hardware_reciprocal_available(x)
    r = bc.approx_reciprocal(x)
    assert torch.equal(r[:-4], 1.0 / x[:-4])
    assert r[-4:-1].isinf().all() and r[-1] == 1.0 / torch.tensor(2e-38)


def _search_scalar(x: float, code: list) -> int:
    """dQuantize<0> transcribed one value at a time (bitsandbytes csrc/kernels.cu), fp32 midpoints."""
    f32 = lambda v: torch.tensor(v, dtype=torch.float32).item()  # noqa: E731
    pivot, lo, hi = 127, 0, 255
    for step in (64, 32, 16, 8, 4, 2, 1):
        if x > code[pivot]:
            lo, pivot = pivot, pivot + step
        else:
            hi, pivot = pivot, pivot - step
    val = code[pivot]
    if x > val:
        return hi if x > f32(f32(code[hi] + val) * 0.5) else pivot
    return lo if x < f32(f32(code[lo] + val) * 0.5) else pivot


def test_search_code_matches_the_kernel_loop_and_nearest_code():
    g = torch.Generator().manual_seed(1)
    mids = (CODE[:-1] + CODE[1:]) * 0.5
    x = torch.cat([torch.rand(3000, generator=g) * 2 - 1, torch.randn(500, generator=g) * 1e-3, CODE, mids,
                   torch.nextafter(mids, torch.full_like(mids, 2.0)), torch.nextafter(mids, torch.full_like(mids, -2.0)),
                   torch.tensor([-1.0, 1.0, 0.0, 1.5, -1.5])])
    got = bc.search_code(x, CODE)
    code = CODE.tolist()
    assert got.tolist() == [_search_scalar(v, code) for v in x.tolist()]
    assert torch.equal(bc.search_code(CODE, CODE), torch.arange(256))
    assert bc.search_code(torch.tensor([math.nan]), CODE).item() == 0
    off_mid = (x[:, None] - mids[None, :]).abs().amin(1) > 1e-6
    nearest = (x[:, None].double() - CODE[None, :].double()).abs().argmin(1)
    assert torch.equal(got[off_mid], nearest[off_mid])


def test_8bit_cuda_rules_differ_from_the_cpu_lut_only_within_a_lut_bin():
    g = torch.Generator().manual_seed(2)
    absmax = torch.rand(64 * 256 + 17, generator=g) * 3
    x = absmax - absmax.mean()
    q_cuda, a_cuda = bc.quantize_8bit_cuda_rules(x, CODE, 256)
    q_cpu, a_cpu = _quantize_8bit_dynamic(x, CODE, 256)
    assert torch.equal(a_cuda, a_cpu)
    diff = torch.nonzero(q_cuda != q_cpu).flatten()
    assert diff.numel() <= x.numel() // 100
    v = x[diff] / a_cpu[diff // 256]
    err_cuda, err_cpu = (CODE[q_cuda[diff].long()] - v).abs(), (CODE[q_cpu[diff].long()] - v).abs()
    assert (err_cuda <= err_cpu).all()  # the search finds the nearest code
    assert (err_cpu - err_cuda <= 2.0 / 65535).all()  # the lookup table's picks are off by less than one of its bins


def test_nf4_cuda_rules_off_cuda():
    """With the IEEE fallback the CUDA rules give the CPU codes, except where the CPU divides (the short last block)
    rather than multiplying by the reciprocal, and for all-zero blocks (NaN -> code 0 on CUDA, 7 on the CPU)."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(64 * 40 + 13, generator=g)
    w[64:128] = 0
    idx, absmax = bc.nf4_indices(w, 64, NF4_BOUNDS)
    q = nf4_quantize(w, double_quant=False)
    assert idx.numel() == w.numel() + 1 and torch.equal(absmax, q.absmax)
    ref = torch.stack([q.data >> 4, q.data & 0xF], 1).flatten().long()
    assert (idx[64:128] == 0).all() and (ref[64:128] == 7).all()
    keep = torch.ones_like(idx, dtype=torch.bool)
    keep[64:128] = False
    assert torch.equal(idx[keep], ref[keep])


def test_cuda_thresholds_are_the_source_decimals_rounded_once():
    """bitsandbytes' kernel compares with fp32 literals; torch's two-step fp32 midpoint is one ulp off for four of
    them, and a value exactly on such a midpoint takes the other code on CUDA."""
    from reflectevo.kernels.nf4 import NF4_BOUNDS_CUDA, NF4_TABLE

    assert NF4_BOUNDS_CUDA.dtype == torch.float32
    # one source literal checked by hand: 0.5016634166240692 lies just below the fp32 halfway point
    # 0.5016634166240692138671875, so the nearest fp32 is 0.5016633868217468, not torch's 0.5016634464263916
    assert NF4_BOUNDS_CUDA[12].item() == 0.5016633868217468 and NF4_BOUNDS[12].item() == 0.5016634464263916
    ulps = (NF4_BOUNDS.view(torch.int32) - NF4_BOUNDS_CUDA.view(torch.int32)).abs()
    assert ulps.max() == 1 and int(ulps.sum()) == 4
    mids = (NF4_TABLE.double()[:-1] + NF4_TABLE.double()[1:]) / 2
    assert ((NF4_BOUNDS_CUDA.double() - mids).abs() <= (NF4_BOUNDS.double() - mids).abs() + 2 ** -25).all()
    # a block whose absmax is 1 (reciprocal exact) holding the tie value: CPU keeps code 12, the CUDA rules give 13
    w = torch.zeros(64)
    w[0], w[1] = 1.0, NF4_BOUNDS[12]
    cpu = nf4_quantize(w, double_quant=False).data[0] & 0xF
    idx, _ = bc.nf4_indices(w, 64, NF4_BOUNDS_CUDA)
    assert cpu.item() == 12 and idx[1].item() == 13
