"""The CPU paths (no Triton) of RoPE and SwiGLU against their references, gradients included."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from reflectevo.kernels import kernel_backend
from reflectevo.kernels.rope import apply_rope, apply_rope_reference, rope_cos_sin
from reflectevo.kernels.swiglu import swiglu, swiglu_reference

TIGHT = {torch.float32: dict(rtol=1e-6, atol=1e-6), torch.float64: dict(rtol=1e-13, atol=1e-13)}


def _grads(fn, inputs, upstream):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    torch.autograd.backward(outs, upstream)
    return [o.detach() for o in outs], [leaf.grad for leaf in leaves]


def _torch(fn, *args):
    with kernel_backend("torch"):
        return fn(*args)


# ----------------------------------------------------------------------------------------------- RoPE

def _rope_case(b, t, hq, hk, d, dtype, per_row, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, t, hq, d, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(b, t, hk, d, generator=g, dtype=torch.float64).to(dtype)
    pos = torch.stack([torch.arange(t) + 5 * i for i in range(b)]) if per_row else torch.arange(t) + 2
    cos, sin = rope_cos_sin(pos, d, 10000.0, None, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    ups = (torch.randn(q.shape, generator=g, dtype=torch.float64).to(dtype),
           torch.randn(k.shape, generator=g, dtype=torch.float64).to(dtype))
    return q, k, cos, sin, ups


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("b,t,hq,hk,d,per_row", [(2, 7, 4, 2, 64, True), (1, 1, 3, 1, 32, False),
                                                 (2, 3, 5, 5, 6, False), (1, 0, 2, 1, 8, False)])
def test_rope_cpu_matches_reference_and_autograd(dtype, b, t, hq, hk, d, per_row):
    q, k, cos, sin, ups = _rope_case(b, t, hq, hk, d, dtype, per_row, seed=t + d)
    outs, grads = _grads(lambda a, c: _torch(apply_rope, a, c, cos, sin), (q, k), ups)
    outs_ref, grads_ref = _grads(lambda a, c: apply_rope_reference(a, c, cos, sin), (q, k), ups)
    for got, want in zip(outs + grads, outs_ref + grads_ref):
        assert got.dtype == dtype and got.shape == want.shape
        torch.testing.assert_close(got, want, **TIGHT[dtype])


def test_rope_cpu_general_cos_sin_and_gradcheck():
    """Halves of cos/sin that differ: the backward must be the transposed rotation, not the -sin rotation."""
    g = torch.Generator().manual_seed(7)
    q = torch.randn(1, 3, 2, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 3, 1, 8, generator=g, dtype=torch.float64, requires_grad=True)
    cos, sin = torch.randn(2, 3, 8, generator=g, dtype=torch.float64), torch.randn(2, 3, 8, generator=g,
                                                                                  dtype=torch.float64)
    q2 = q.detach().expand(2, 3, 2, 8).clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, c: _torch(apply_rope, a, c, cos, sin), (q2, k))
    ups = (torch.randn(q2.shape, dtype=torch.float64), torch.randn(k.shape, dtype=torch.float64))
    _, grads = _grads(lambda a, c: _torch(apply_rope, a, c, cos, sin), (q2, k), ups)
    _, grads_ref = _grads(lambda a, c: apply_rope_reference(a, c, cos, sin), (q2, k), ups)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, **TIGHT[torch.float64])


@pytest.mark.parametrize("cos_dtype", [torch.float32, torch.bfloat16])
def test_rope_cpu_bf16_rounds_once_from_fp32(cos_dtype):
    """bf16 q/k: computed in fp32 and rounded once, so within one bf16 ulp of the fp32-exact rotation, and equal
    to the reference except where the fused multiply-add lands on the other side of a rounding boundary."""
    q, k, cos, sin, ups = _rope_case(2, 9, 4, 2, 64, torch.bfloat16, True, seed=11)
    cos, sin = cos.to(cos_dtype), sin.to(cos_dtype)
    outs, grads = _grads(lambda a, c: _torch(apply_rope, a, c, cos, sin), (q, k), ups)
    outs_ref, grads_ref = _grads(lambda a, c: apply_rope_reference(a, c, cos.double(), sin.double()),
                                 (q.double(), k.double()), tuple(u.double() for u in ups))
    outs_bf, grads_bf = _grads(lambda a, c: apply_rope_reference(a, c, cos, sin), (q, k), ups)
    for got, exact, ref in zip(outs + grads, outs_ref + grads_ref, outs_bf + grads_bf):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.double(), exact, rtol=2.0 ** -8, atol=1e-6)
        assert (got != ref).float().mean() < 0.01


def test_rope_cpu_non_contiguous_views():
    b, t, hq, hk, d = 2, 5, 4, 2, 16
    qkv = torch.randn(b, t, hq + 2 * hk, d)
    k_bhtd = torch.randn(b, hk, t, d)
    cos, sin = rope_cos_sin(torch.arange(t).expand(b, t), d, 10000.0, None)
    split = lambda x, y: (x[:, :, :hq], y.transpose(1, 2))  # noqa: E731
    ups = tuple(torch.randn(v.shape) for v in split(qkv, k_bhtd))
    outs, grads = _grads(lambda x, y: _torch(apply_rope, *split(x, y), cos, sin), (qkv, k_bhtd), ups)
    outs_ref, grads_ref = _grads(lambda x, y: apply_rope_reference(*split(x, y), cos, sin), (qkv, k_bhtd), ups)
    for got, want in zip(outs + grads, outs_ref + grads_ref):
        torch.testing.assert_close(got, want, **TIGHT[torch.float32])


def test_rope_cpu_trainable_cos_sin_falls_back_to_the_reference():
    q, k, cos, sin, ups = _rope_case(1, 4, 2, 1, 8, torch.float64, False, seed=3)
    cos = cos.clone().requires_grad_(True)
    rq, rk = _torch(apply_rope, q, k, cos, sin)
    (rq.sum() + rk.sum()).backward()
    assert cos.grad is not None and cos.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------- SwiGLU

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_swiglu_cpu_16bit_is_hf_rounding_forward_and_backward(dtype):
    """16-bit CPU inputs: bitwise Hugging Face's MLP ops (F.silu(gate) * up) and their autograd gradients."""
    g = torch.Generator().manual_seed(1)
    gate = (torch.randn(3, 37, 96, generator=g) * 4).to(dtype)
    up = torch.randn(3, 37, 96, generator=g).to(dtype)
    dy = torch.randn(3, 37, 96, generator=g).to(dtype)
    (y,), grads = _grads(lambda a, b: _torch(swiglu, a, b), (gate, up), (dy,))
    (y_hf,), grads_hf = _grads(lambda a, b: F.silu(a) * b, (gate, up), (dy,))
    assert y.dtype == dtype
    assert torch.equal(y, y_hf)
    for got, want in zip(grads, grads_hf):
        assert torch.equal(got, want)
    (y64,), grads64 = _grads(swiglu_reference, (gate.double(), up.double()), (dy.double(),))
    torch.testing.assert_close(y.double(), y64, rtol=2e-2, atol=2e-2)
    for got, want in zip(grads, grads64):
        torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())


def test_swiglu_cpu_16bit_partial_grads_and_no_grad():
    gate = torch.randn(4, 50).bfloat16()
    up = torch.randn(4, 50).bfloat16().requires_grad_(True)
    swiglu(gate, up).sum().backward()
    torch.testing.assert_close(up.grad, F.silu(gate), rtol=0, atol=0)
    with torch.no_grad():
        assert torch.equal(swiglu(gate, up), F.silu(gate) * up)
    assert torch.equal(swiglu(gate.float(), up.float().detach()), swiglu_reference(gate.float(), up.float()))
