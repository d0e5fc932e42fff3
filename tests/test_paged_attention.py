"""Paged decode attention: Triton kernel (interpreter on CPU) and the CPU cascade path vs the gather reference,
and the reference itself vs attention computed one sequence at a time from the unpaged K/V."""
import pytest
import torch

from reflectevo.kernels import kernel_backend
from reflectevo.kernels.paged_attention import (
    paged_attention_decode,
    paged_attention_decode_reference,
    paged_attention_decode_torch,
    store_kv,
    store_kv_torch,
)


def _paged_problem(lens, Hq, Hkv, D, bs=16, num_blocks=40, shared_prefix_blocks=0, seed=0):
    """Random contexts written into randomly placed blocks; returns the dense K/V per sequence too."""
    g = torch.Generator().manual_seed(seed)
    kc = torch.randn(num_blocks, bs, Hkv, D, generator=g)
    vc = torch.randn(num_blocks, bs, Hkv, D, generator=g)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    shared = [perm.pop() for _ in range(shared_prefix_blocks)]
    tables = []
    for L in lens:
        n = (L + bs - 1) // bs
        tables.append(shared + [perm.pop() for _ in range(n - len(shared))])
    width = max(len(t) for t in tables)
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    q = torch.randn(len(lens), Hq, D, generator=g)
    return q, kc, vc, bt, torch.tensor(lens, dtype=torch.int32)


def _dense(q, kc, vc, bt, lens, scale):
    Hq, Hkv = q.shape[1], kc.shape[2]
    outs = []
    for s, L in enumerate(lens.tolist()):
        k = kc[bt[s].long()].reshape(-1, Hkv, kc.shape[3])[:L].repeat_interleave(Hq // Hkv, dim=1)
        v = vc[bt[s].long()].reshape(-1, Hkv, kc.shape[3])[:L].repeat_interleave(Hq // Hkv, dim=1)
        w = torch.softmax(torch.einsum("hd,lhd->hl", q[s], k) * scale, dim=-1)
        outs.append(torch.einsum("hl,lhd->hd", w, v))
    return torch.stack(outs)


@pytest.mark.parametrize("Hq,Hkv,D", [(4, 4, 16), (6, 2, 32), (8, 1, 16)])
def test_reference_matches_dense(Hq, Hkv, D):
    q, kc, vc, bt, lens = _paged_problem([1, 17, 40, 33, 16], Hq, Hkv, D)
    ref = paged_attention_decode_reference(q, kc, vc, bt, lens, 0.25)
    torch.testing.assert_close(ref, _dense(q, kc, vc, bt, lens, 0.25), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("Hq,Hkv,D", [(4, 2, 16), (6, 2, 32)])
def test_triton_decode_matches_reference(splits, Hq, Hkv, D):
    q, kc, vc, bt, lens = _paged_problem([1, 17, 50, 33, 64], Hq, Hkv, D, seed=splits)
    ref = paged_attention_decode_reference(q, kc, vc, bt, lens, D ** -0.5)
    with kernel_backend("triton"):
        out = paged_attention_decode(q, kc, vc, bt, lens, D ** -0.5, num_splits=splits)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_triton_decode_bf16_cache():
    q, kc, vc, bt, lens = _paged_problem([5, 40, 23], 4, 2, 16, seed=7)
    q, kc, vc = q.bfloat16(), kc.bfloat16(), vc.bfloat16()
    ref = paged_attention_decode_reference(q, kc, vc, bt, lens, 0.25)
    with kernel_backend("triton"):
        out = paged_attention_decode(q, kc, vc, bt, lens, 0.25)
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)


def test_cascade_path_matches_reference():
    q, kc, vc, bt, lens = _paged_problem([40, 64, 35, 49], 6, 2, 16, shared_prefix_blocks=2, seed=3)
    ref = paged_attention_decode_reference(q, kc, vc, bt, lens, 0.3)
    for common in (1, 2):
        out = paged_attention_decode_torch(q, kc, vc, bt, lens, 0.3, common_blocks=common)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_store_kv_triton_matches_torch():
    g = torch.Generator().manual_seed(1)
    kc, vc = torch.zeros(6, 16, 2, 16), torch.zeros(6, 16, 2, 16)
    k, v = torch.randn(5, 2, 16, generator=g), torch.randn(5, 2, 16, generator=g)
    slots = torch.tensor([3, -1, 40, 41, 95])
    a, b = (kc.clone(), vc.clone()), (kc.clone(), vc.clone())
    store_kv_torch(k, v, *a, slots)
    with kernel_backend("triton"):
        store_kv(k, v, *b, slots)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    flat = a[0].view(-1, 2, 16)
    assert torch.equal(flat[40], k[2]) and torch.equal(flat[95], k[4]) and flat[1].abs().sum() == 0


def test_rejects_bad_gqa():
    q, kc, vc, bt, lens = _paged_problem([5], 3, 2, 16)
    with pytest.raises(ValueError, match="multiple"):
        paged_attention_decode(q, kc, vc, bt, lens, 0.25)
