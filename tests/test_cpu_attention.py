"""16-bit causal attention on the CPU: SDPA's fused forward, the fp32 backward (reflectevo.kernels.cpu_attention)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from reflectevo.kernels.cpu_attention import (_FWD, causal_attention_fp32_backward, causal_forward16,
                                              wants_fp32_backward)
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
def test_forward_is_as_exact_as_sdpa_and_gradients_are_closer_to_fp64(dtype, b, t, hq, hkv, d):
    q, k, v, dout = _qkv(b, t, hq, hkv, d, dtype, seed=t)
    ours = _run(_ours, q, k, v, dout)
    sdpa = _run(_sdpa, q, k, v, dout)
    exact = _run(_sdpa, q, k, v, dout, torch.float64)
    # the same kernel at a length padded to a multiple of 16: at most a rounding step apart, no further from fp64
    assert _rel_err(ours[0], exact[0]) <= _rel_err(sdpa[0], exact[0]) * 1.05 + 1e-6
    assert ((ours[0].double() - sdpa[0].double()).abs() <= sdpa[0].double().abs().clamp(min=1e-2) * 2 ** -7).all()
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
    out16, lse = causal_forward16(qt.detach(), kt.detach(), vt.detach())
    want = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout.transpose(1, 2).float(), qt.detach().float(), kt.detach().float(), vt.detach().float(), out16.float(),
        lse, 0.0, True)
    for got, w in zip((qt.grad, kt.grad, vt.grad), want):
        assert torch.equal(got, w.to(torch.bfloat16))


@pytest.mark.parametrize("t", [1, 16, 37, 466])
def test_padded_forward_is_the_kernel_on_zero_padded_inputs(t):
    """Rows beyond the sequence change nothing for the causal rows before them: the first t rows of the kernel's
    output and lse on the inputs zero-padded to a multiple of 16, bitwise."""
    q, k, v, _ = _qkv(2, t, 6, 2, 32, torch.bfloat16, seed=t)
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    out, lse = causal_forward16(qt, kt, vt)
    padded = -(-t // 16) * 16
    pad = lambda x: torch.cat([x, x.new_zeros(*x.shape[:2], padded - t, x.shape[3])], 2)  # noqa: E731
    want_out, want_lse = _FWD(pad(qt), pad(kt), pad(vt), 0.0, True)[:2]
    assert out.shape == qt.shape and lse.shape == qt.shape[:3]
    assert torch.equal(out, want_out[:, :, :t]) and torch.equal(lse, want_lse[:, :, :t])
    with torch.no_grad():  # 16-bit CPU attention without autograd (a reference pass, bf16 inference) takes it too
        assert torch.equal(causal_attention(q, k, v), out.transpose(1, 2))


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


def _packed_case(lens_by_row, hq=6, hkv=2, d=16, seed=5):
    """q, k, v, dout [R, T, H, D] in bf16 and seq_ids for rows holding sequences of ``lens_by_row`` (a row shorter
    than the longest ends in padding, seq_id -1)."""
    T = max(sum(r) for r in lens_by_row)
    q, k, v, dout = _qkv(len(lens_by_row), T, hq, hkv, d, torch.bfloat16, seed)
    seq_ids = torch.full((len(lens_by_row), T), -1)
    for r, lens in enumerate(lens_by_row):
        at = 0
        for i, n in enumerate(lens):
            seq_ids[r, at:at + n] = i
            at += n
    return q, k, v, dout, seq_ids


@pytest.mark.parametrize("lens_by_row,stacked", [
    ([[40, 41, 42, 39]], True), ([[30, 33], [31, 32]], True), ([[50]] * 3, True),
    ([[30, 33], [31, 29]], False)])  # the last: row 2 ends in 3 padding tokens, a span 11 times shorter
def test_packed_rows_take_one_stacked_backward_equal_to_separate_calls(lens_by_row, stacked):
    q, k, v, dout, seq_ids = _packed_case(lens_by_row)
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
    out = causal_attention(*leaves, seq_ids=seq_ids)
    assert (type(out.grad_fn).__name__ == "_PackedCausalAttention16Backward") == stacked
    out.backward(dout)
    got = [out.detach()] + [t.grad for t in leaves]
    exact = _run(lambda a, b_, c: causal_attention(a, b_, c, seq_ids=seq_ids), q, k, v, dout, torch.float64)
    for r, bounds in enumerate(seq_ids.tolist()):
        ids = torch.tensor(bounds)
        for sid in ids.unique().tolist():
            span = (ids == sid).nonzero().flatten()
            s, e = int(span[0]), int(span[-1]) + 1
            want = _run(_ours, q[r:r + 1, s:e], k[r:r + 1, s:e], v[r:r + 1, s:e], dout[r:r + 1, s:e])
            assert torch.equal(got[0][r:r + 1, s:e], want[0])  # the forward: the same kernel call per sequence
            for x, y, z in zip(got[1:], want[1:], exact[1:]):
                x, y, z = x[r:r + 1, s:e].double(), y.double(), z[r:r + 1, s:e]
                step = y.abs().clamp(min=1e-2) * 2.0 ** -7  # the fp32 sums' order differs: at most a bf16 rounding
                assert bool(((x - y).abs() <= step * 1.01).all())
                assert (x - z).norm() <= (y - z).norm() * 1.05 + 1e-6


def test_packed_rows_of_uneven_lengths_run_one_call_per_sequence():
    q, k, v, dout, seq_ids = _packed_case([[60, 8]])  # padding 2 x 60^2 vs 60^2 + 8^2: per-sequence calls
    out = causal_attention(*(t.detach().requires_grad_(True) for t in (q, k, v)), seq_ids=seq_ids)
    assert type(out.grad_fn).__name__ != "_PackedCausalAttention16Backward"


def test_stacked_backward_with_padding_is_exact_in_fp32_terms():
    """The padded batch adds nothing: against the fp32 kernel run per sequence without padding, to fp32 rounding."""
    from reflectevo.kernels.cpu_attention import _BWD, _FWD, _padded_fp32

    q, k, v, dout, _ = _packed_case([[35 + 8 * i for i in range(3)]], seed=9)
    spans = [(0, 0, 35), (0, 35, 78), (0, 78, 129)]
    views = lambda t: [t[:, s:e].transpose(1, 2) for _, s, e in spans]  # noqa: E731
    fw = [_FWD(a, b_, c, 0.0, True) for a, b_, c in zip(views(q), views(k), views(v))]
    want = [_BWD(*(x.float() for x in (do, a, b_, c, o)), lse, 0.0, True)[:3]
            for do, a, b_, c, (o, lse) in zip(views(dout), views(q), views(k), views(v), fw)]
    rows = lambda t: [t[0, s:e] for _, s, e in spans]  # noqa: E731
    outs = [o[0].transpose(0, 1) for o, _ in fw]
    padded = [_padded_fp32(p, 51) for p in (rows(dout), rows(q), rows(k), rows(v), outs)]
    lse = torch.zeros(3, fw[0][1].shape[1], 51)
    for i, (_, x) in enumerate(fw):
        lse[i, :, :x.shape[2]] = x[0]
    got = _BWD(*padded, lse, 0.0, True)[:3]
    for i, (_, s, e) in enumerate(spans):
        for g, w in zip(got, want[i]):
            torch.testing.assert_close(g[i:i + 1, :, :e - s], w, rtol=1e-5, atol=1e-6)
            assert not g[i, :, e - s:].any()  # padded rows and keys get exactly zero
