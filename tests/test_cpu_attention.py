"""16-bit causal attention on the CPU: SDPA's fused forward, the fp32 backward (reflectevo.kernels.cpu_attention)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from reflectevo.kernels.cpu_attention import causal_attention_fp32_backward, wants_fp32_backward
from reflectevo.model.transformer import causal_attention


def _qkv(b, t, hq, hkv, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    make = lambda h: (torch.randn(b, t, h, d, generator=g) * 1.5).to(dtype)  # noqa: E731
    return make(hq), make(hkv), make(hkv), torch.randn(b, t, hq, d, generator=g).to(dtype)


def _run(fn, q, k, v, dout, dtype=None):
    leaves = [t.detach().to(dtype or t.dtype).requires_grad_(True) for t in (q, k, v)]
    out = fn(*leaves)
    out.backward(dout.to(out.dtype))
    return [out.detach()] + [leaf.grad for leaf in leaves]


def _sdpa(q, k, v):  # [B, T, H, D] in and out, as the model calls it
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=q.shape[2] != k.shape[2]).transpose(1, 2)


def _ours(q, k, v):
    return causal_attention_fp32_backward(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)


def _rel_err(got, want):
    return ((got.double() - want).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b,t,hq,hkv,d", [(1, 97, 6, 2, 32), (2, 40, 4, 4, 16), (1, 600, 2, 1, 64)])
def test_forward_is_sdpa_and_gradients_are_closer_to_fp64(dtype, b, t, hq, hkv, d):
    q, k, v, dout = _qkv(b, t, hq, hkv, d, dtype, seed=t)
    ours = _run(_ours, q, k, v, dout)
    sdpa = _run(_sdpa, q, k, v, dout)
    exact = _run(_sdpa, q, k, v, dout, torch.float64)
    assert torch.equal(ours[0], sdpa[0])
    for got, plain, want in zip(ours[1:], sdpa[1:], exact[1:]):
        assert got.dtype == dtype and got.shape == want.shape
        err, plain_err = _rel_err(got, want), _rel_err(plain, want)
        assert err < 8e-3 and err <= plain_err * 1.05 + 1e-4, (err, plain_err)


def test_fp32_backward_equals_the_fp32_kernel_on_upcast_inputs():
    """The gradients are the fp32 kernel's on the 16-bit inputs and output, rounded once."""
    q, k, v, dout = _qkv(1, 50, 4, 2, 16, torch.bfloat16, seed=1)
    qt, kt, vt = (t.transpose(1, 2).requires_grad_(True) for t in (q, k, v))
    out = causal_attention_fp32_backward(qt, kt, vt)
    out.backward(dout.transpose(1, 2))
    out16, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qt.detach(), kt.detach(), vt.detach(),
                                                                            0.0, True)
    want = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout.transpose(1, 2).float(), qt.detach().float(), kt.detach().float(), vt.detach().float(), out16.float(),
        lse, 0.0, True)
    for got, w in zip((qt.grad, kt.grad, vt.grad), want):
        assert torch.equal(got, w.to(torch.bfloat16))


def test_model_attention_takes_it_only_for_16bit_cpu_training():
    q, k, v, dout = _qkv(1, 30, 4, 2, 16, torch.bfloat16, seed=2)
    assert not wants_fp32_backward(q, k, v)  # no tensor requires grad
    assert wants_fp32_backward(q.requires_grad_(True), k, v)
    with torch.no_grad():
        assert not wants_fp32_backward(q, k, v)
    assert not wants_fp32_backward(q.detach().float().requires_grad_(True), k.float(), v.float())
    q.requires_grad_(False)
    got = _run(lambda a, b_, c: causal_attention(a, b_, c), q, k, v, dout)
    want = _run(_ours, q, k, v, dout)
    for x, y in zip(got, want):
        assert torch.equal(x, y)


def test_packed_rows_train_like_separate_sequences():
    """seq_ids packing: each sequence's attention (and its gradients) as if it ran alone."""
    q, k, v, dout = _qkv(1, 45, 4, 2, 16, torch.bfloat16, seed=3)
    seq_ids = torch.tensor([[0] * 20 + [1] * 25])
    got = _run(lambda a, b_, c: causal_attention(a, b_, c, seq_ids=seq_ids), q, k, v, dout)
    for s, e in ((0, 20), (20, 45)):
        want = _run(_ours, q[:, s:e], k[:, s:e], v[:, s:e], dout[:, s:e])
        for x, y in zip(got, want):
            assert torch.equal(x[:, s:e], y)
