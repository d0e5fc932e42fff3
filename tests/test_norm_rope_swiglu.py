"""Triton RMSNorm, RoPE and SwiGLU (interpreted on CPU) against their PyTorch references and autograd."""
from __future__ import annotations

import math

import pytest
import torch

from reflectevo.kernels import kernel_backend
from reflectevo.kernels.rmsnorm import rms_norm, rms_norm_reference
from reflectevo.kernels.rope import apply_rope, apply_rope_reference, rope_cos_sin, rope_inv_freq
from reflectevo.kernels.swiglu import swiglu, swiglu_reference

TIGHT = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12)}
LLAMA31_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192}


def _triton(fn, *args):
    with kernel_backend("triton"):
        return fn(*args)


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def _grads(fn, inputs, upstream):
    """Run fn on fresh leaf copies of inputs, backprop the upstream grads, return (outputs, grads)."""
    leaves = _leaves(*inputs)
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    torch.autograd.backward(outs, upstream)
    return [o.detach() for o in outs], [leaf.grad for leaf in leaves]


@pytest.fixture
def poisoned_empty(monkeypatch):
    """Every float tensor from torch.empty / empty_like starts as NaN, so an unwritten output element shows."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def fill(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(real_empty_like(*a, **k)))


# ----------------------------------------------------------------------------------------------- RMSNorm

def _norm_inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 0.5
    w = 1 + 0.3 * torch.randn(shape[-1], generator=g, dtype=torch.float64)
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    return x.to(dtype), w.to(dtype), dy.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(2, 3, 576), (5, 100), (1, 1, 64)])
def test_rms_norm_matches_reference_and_autograd(dtype, shape, poisoned_empty):
    x, w, dy = _norm_inputs(shape, dtype)
    (y,), (dx, dw) = _grads(lambda a, b: _triton(rms_norm, a, b, 1e-5), (x, w), (dy,))
    (y_ref,), (dx_ref, dw_ref) = _grads(lambda a, b: rms_norm_reference(a, b, 1e-5), (x, w), (dy,))
    for got, want in ((y, y_ref), (dx, dx_ref), (dw, dw_ref)):
        assert got.dtype == dtype and got.shape == want.shape and not got.isnan().any()
        torch.testing.assert_close(got, want, **TIGHT[dtype])


def test_rms_norm_bf16_close_to_fp64():
    x, w, dy = _norm_inputs((3, 4, 576), torch.bfloat16, seed=1)
    (y,), (dx, dw) = _grads(lambda a, b: _triton(rms_norm, a, b, 1e-6), (x, w), (dy,))
    x64, w64, dy64 = x.double(), w.double(), dy.double()
    (y_ref,), (dx_ref, dw_ref) = _grads(lambda a, b: rms_norm_reference(a, b, 1e-6), (x64, w64), (dy64,))
    assert y.dtype == dx.dtype == dw.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), y_ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(dx.double(), dx_ref, rtol=2e-2, atol=2e-2)
    # dweight sums 12 rows of O(1) terms: compare relative to its scale
    torch.testing.assert_close(dw.double(), dw_ref, rtol=2e-2, atol=2e-2 * dw_ref.abs().max().item())


def test_rms_norm_bf16_forward_is_hf_rounding():
    """Same rounding points as HF LlamaRMSNorm with a bf16 weight: normalise in fp32, round, multiply, round."""
    x, w, _ = _norm_inputs((4, 100), torch.bfloat16, seed=2)
    xf = x.float()
    hf = w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(torch.bfloat16)
    y = _triton(rms_norm, x, w, 1e-5)
    assert torch.equal(rms_norm_reference(x, w, 1e-5), hf)
    # Compiled, the kernel rounds to nearest like torch and may differ from HF by one bf16 ulp (2^-7 relative at
    # most) where its fp32 sum order differs; the CPU interpreter truncates fp32 -> bf16 instead, up to 2 ulps.
    ulps = 1 if y.is_cuda else 2
    torch.testing.assert_close(y.float(), hf.float(), rtol=ulps * 2.0**-7, atol=0)


def test_rms_norm_non_contiguous_and_frozen_weight(poisoned_empty):
    base, w, _ = _norm_inputs((6, 2 * 100), torch.float32, seed=3)
    frozen = w[:100].clone()  # requires_grad False: the kernel skips dweight
    views = (lambda t: t[:, ::2],  # row stride 200, element stride 2
             lambda t: t.view(6, 2, 100).transpose(0, 1))  # [2, 6, 100], rows out of memory order
    for view in views:
        dy = torch.randn(view(base).shape).transpose(0, -1).contiguous().transpose(0, -1)  # non-contiguous
        assert not view(base).is_contiguous() and not dy.is_contiguous()
        (y,), (dbase,) = _grads(lambda t: _triton(rms_norm, view(t), frozen, 1e-5), (base,), (dy,))
        (y_ref,), (dbase_ref,) = _grads(lambda t: rms_norm_reference(view(t), frozen, 1e-5), (base,), (dy,))
        torch.testing.assert_close(y, y_ref, **TIGHT[torch.float32])
        torch.testing.assert_close(dbase, dbase_ref, **TIGHT[torch.float32])
        assert frozen.grad is None


def test_rms_norm_rejects_bad_weight_and_torch_backend_is_reference():
    x, w, _ = _norm_inputs((2, 100), torch.float32)
    with pytest.raises(ValueError, match="weight shape"):
        rms_norm(x, w[:50])
    with kernel_backend("torch"):
        assert torch.equal(rms_norm(x, w, 1e-5), rms_norm_reference(x, w, 1e-5))


# ----------------------------------------------------------------------------------------------- RoPE

def _rope_inputs(b, t, hq, hk, d, dtype, per_row_positions, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, t, hq, d, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(b, t, hk, d, generator=g, dtype=torch.float64).to(dtype)
    if per_row_positions:  # e.g. packed rows: positions differ per batch row
        pos = torch.stack([torch.arange(t) + 7 * i for i in range(b)])
    else:
        pos = torch.arange(t) + 3
    cos, sin = rope_cos_sin(pos, d, 10000.0, None, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    return q, k, cos, sin


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("b,t,hq,hk,d,per_row", [(2, 5, 4, 2, 64, True), (1, 1, 3, 1, 32, False),
                                                 (2, 3, 5, 5, 6, False)])
def test_rope_matches_reference_and_autograd(dtype, b, t, hq, hk, d, per_row, poisoned_empty):
    q, k, cos, sin = _rope_inputs(b, t, hq, hk, d, dtype, per_row)
    ups = (torch.randn(q.shape, dtype=dtype), torch.randn(k.shape, dtype=dtype))
    outs, grads = _grads(lambda a, c: _triton(apply_rope, a, c, cos, sin), (q, k), ups)
    outs_ref, grads_ref = _grads(lambda a, c: apply_rope_reference(a, c, cos, sin), (q, k), ups)
    for got, want in zip(outs + grads, outs_ref + grads_ref):
        assert got.dtype == dtype and got.shape == want.shape and not got.isnan().any()
        torch.testing.assert_close(got, want, **TIGHT[dtype])


def test_rope_backward_is_exact_transpose_for_general_cos_sin():
    """With cos/sin halves that differ, the gradient must still be the transposed rotation."""
    g = torch.Generator().manual_seed(5)
    q, k = torch.randn(1, 3, 2, 8, generator=g, dtype=torch.float64), torch.randn(1, 3, 1, 8, generator=g,
                                                                                 dtype=torch.float64)
    cos, sin = torch.randn(3, 8, generator=g, dtype=torch.float64), torch.randn(3, 8, generator=g,
                                                                                dtype=torch.float64)
    ups = (torch.randn(q.shape, dtype=torch.float64), torch.randn(k.shape, dtype=torch.float64))
    _, grads = _grads(lambda a, c: _triton(apply_rope, a, c, cos, sin), (q, k), ups)
    _, grads_ref = _grads(lambda a, c: apply_rope_reference(a, c, cos, sin), (q, k), ups)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, **TIGHT[torch.float64])


def test_rope_bf16_close_to_fp64():
    q, k, cos, sin = _rope_inputs(2, 4, 4, 2, 64, torch.bfloat16, True, seed=2)
    ups = (torch.randn(q.shape).bfloat16(), torch.randn(k.shape).bfloat16())
    outs, grads = _grads(lambda a, c: _triton(apply_rope, a, c, cos, sin), (q, k), ups)
    outs_ref, grads_ref = _grads(lambda a, c: apply_rope_reference(a, c, cos.double(), sin.double()),
                                 (q.double(), k.double()), tuple(u.double() for u in ups))
    for got, want in zip(outs + grads, outs_ref + grads_ref):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=2e-2)


def test_rope_non_contiguous_fused_qkv_and_bf16_cos(poisoned_empty):
    """q and k as views into a fused qkv projection, and a [B, H, T, D] tensor transposed to [B, T, H, D]."""
    b, t, hq, hk, d = 2, 4, 4, 2, 32
    qkv = torch.randn(b, t, hq + 2 * hk, d)
    k_bhtd = torch.randn(b, hk, t, d)
    cos, sin = rope_cos_sin(torch.arange(t).expand(b, t), d, 500000.0, LLAMA31_SCALING)
    cases = (lambda x, y: (x[:, :, :hq], x[:, :, hq:hq + hk]),
             lambda x, y: (x[:, :, :hq], y.transpose(1, 2)))
    for split in cases:
        assert not any(v.is_contiguous() for v in split(qkv, k_bhtd))
        ups = tuple(torch.randn(v.shape) for v in split(qkv, k_bhtd))
        outs, grads = _grads(lambda x, y: _triton(apply_rope, *split(x, y), cos, sin), (qkv, k_bhtd), ups)
        outs_ref, grads_ref = _grads(lambda x, y: apply_rope_reference(*split(x, y), cos, sin), (qkv, k_bhtd), ups)
        for got, want in zip(outs + grads, outs_ref + grads_ref):
            torch.testing.assert_close(got, want, **TIGHT[torch.float32])
    # bf16 cos/sin (what a bf16 model passes) are upcast in the kernel exactly as in the reference
    q, k = cases[0](qkv, k_bhtd)
    cb, sb = cos.bfloat16(), sin.bfloat16()
    for got, want in zip(_triton(apply_rope, q, k, cb, sb), apply_rope_reference(q, k, cb, sb)):
        torch.testing.assert_close(got, want, **TIGHT[torch.float32])


def test_rope_reference_matches_hf_apply_rotary_pos_emb():
    hf_llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    q, k, cos, sin = _rope_inputs(2, 5, 4, 2, 64, torch.float64, True, seed=4)
    hq, hk = hf_llama.apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    rq, rk = apply_rope_reference(q, k, cos, sin)
    torch.testing.assert_close(rq, hq.transpose(1, 2), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(rk, hk.transpose(1, 2), rtol=1e-14, atol=1e-14)


def test_rope_input_errors():
    q, k, cos, sin = _rope_inputs(1, 3, 2, 1, 8, torch.float32, False)
    with pytest.raises(ValueError, match="cos/sin"):
        apply_rope(q, k, cos[:2], sin[:2])
    with pytest.raises(ValueError, match="k shape"):
        apply_rope(q, k[:, :2], cos, sin)
    with pytest.raises(ValueError, match="not supported"):
        rope_inv_freq(8, 10000.0, {"rope_type": "longrope", "factor": 4.0})
    with pytest.raises(ValueError, match="partial_rotary_factor"):
        rope_inv_freq(8, 10000.0, {"rope_type": "default", "partial_rotary_factor": 0.5})
    with pytest.raises(ValueError, match="low_freq_factor"):
        rope_inv_freq(8, 10000.0, {"rope_type": "llama3", "factor": 8.0})


def _llama3_by_hand(head_dim, theta, factor, low, high, old_len):
    """Direct transcription of the Llama 3.1 frequency rule, one frequency at a time in Python floats."""
    out = []
    for i in range(0, head_dim, 2):
        f = 1.0 / theta ** (i / head_dim)
        wavelen = 2 * math.pi / f
        if wavelen < old_len / high:
            out.append(f)
        elif wavelen > old_len / low:
            out.append(f / factor)
        else:
            s = (old_len / wavelen - low) / (high - low)
            out.append((1 - s) * f / factor + s * f)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("head_dim,theta", [(128, 500000.0), (64, 10000.0)])
def test_rope_inv_freq_llama3_by_hand(head_dim, theta):
    got = rope_inv_freq(head_dim, theta, LLAMA31_SCALING)
    want = _llama3_by_hand(head_dim, theta, 8.0, 1.0, 4.0, 8192)
    assert got.dtype == torch.float32 and got.shape == (head_dim // 2,)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)
    # all three regimes occur for Llama 3.1 at head_dim 128
    plain = rope_inv_freq(head_dim, theta)
    ratio = (plain / got).double()
    if head_dim == 128:
        assert (ratio == 1).any() and (ratio == 8).any() and ((ratio > 1) & (ratio < 8)).any()
    torch.testing.assert_close(rope_inv_freq(head_dim, theta, {"type": "linear", "factor": 4.0}), plain / 4)


def test_rope_inv_freq_and_cos_sin_match_transformers():
    pytest.importorskip("transformers")
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    params = {"rope_theta": 500000.0, **LLAMA31_SCALING}
    cfg = LlamaConfig(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
                      max_position_embeddings=131072, rope_parameters=params)
    hf_inv, attention_factor = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    assert attention_factor == 1.0
    assert torch.equal(rope_inv_freq(128, 500000.0, LLAMA31_SCALING), hf_inv)
    pos = torch.tensor([[0, 1, 2, 3000, 9000, 70000]])
    hf_cos, hf_sin = LlamaRotaryEmbedding(cfg)(torch.zeros(1, 6, 8), pos)
    cos, sin = rope_cos_sin(pos, 128, 500000.0, LLAMA31_SCALING)
    assert cos.shape == hf_cos.shape == (1, 6, 128)
    torch.testing.assert_close(cos, hf_cos, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sin, hf_sin, rtol=1e-6, atol=1e-6)
    assert rope_cos_sin(pos[0], 128, 500000.0, LLAMA31_SCALING)[0].shape == (6, 128)


# ----------------------------------------------------------------------------------------------- SwiGLU

def _glu_inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    gate = torch.randn(shape, generator=g, dtype=torch.float64) * 4
    up = torch.randn(shape, generator=g, dtype=torch.float64)
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    return gate.to(dtype), up.to(dtype), dy.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(3, 7, 100), (2, 1536), (1, 1, 1)])
def test_swiglu_matches_reference_and_autograd(dtype, shape, poisoned_empty):
    gate, up, dy = _glu_inputs(shape, dtype)
    (y,), grads = _grads(lambda a, b: _triton(swiglu, a, b), (gate, up), (dy,))
    (y_ref,), grads_ref = _grads(swiglu_reference, (gate, up), (dy,))
    for got, want in zip([y, *grads], [y_ref, *grads_ref]):
        assert got.dtype == dtype and got.shape == want.shape and not got.isnan().any()
        torch.testing.assert_close(got, want, **TIGHT[dtype])


def test_swiglu_bf16_close_to_fp64_and_extremes():
    gate, up, dy = _glu_inputs((5, 300), torch.bfloat16, seed=1)
    gate[0, :4] = torch.tensor([-200.0, 200.0, -30.0, 0.0])  # saturated sigmoid must stay finite
    (y,), grads = _grads(lambda a, b: _triton(swiglu, a, b), (gate, up), (dy,))
    (y_ref,), grads_ref = _grads(swiglu_reference, (gate.double(), up.double()), (dy.double(),))
    for got, want in zip([y, *grads], [y_ref, *grads_ref]):
        assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=2e-2)


def test_swiglu_non_contiguous_fused_projection(poisoned_empty):
    fused = torch.randn(6, 2 * 100)

    def split(t):
        return t.chunk(2, dim=-1)  # views with row stride 200

    dy = torch.randn(100, 6).t()
    (y,), (dfused,) = _grads(lambda t: _triton(swiglu, *split(t)), (fused,), (dy,))
    (y_ref,), (dfused_ref,) = _grads(lambda t: swiglu_reference(*split(t)), (fused,), (dy,))
    torch.testing.assert_close(y, y_ref, **TIGHT[torch.float32])
    torch.testing.assert_close(dfused, dfused_ref, **TIGHT[torch.float32])
    gate, up = split(fused)
    with pytest.raises(ValueError, match="differ"):
        swiglu(gate, up[:, :50])


def test_norm_kernels_bench_runs_on_cpu():
    from reflectevo.bench import norm_kernels

    result = norm_kernels.run("cpu", quick=True)
    assert set(result["ops"]) == {"rms_norm", "rope", "swiglu"}
    assert "interpreter" in result["note"]
    for row in result["ops"].values():
        assert row["torch"]["fwd_ms"] > 0 and row["torch"]["fwd_bwd_ms"] > 0 and "triton" not in row
    table = norm_kernels.format_table(result)
    assert "| swiglu |" in table and "meaningless" in table


def test_cpu_inference_paths_equal_the_references():
    """Without autograd, fp32 RMSNorm and SwiGLU on the CPU take allocation-light paths: the same numbers."""
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(2, 37, 96, generator=g) * 30, torch.randn(96, generator=g)
    gate, up = torch.randn(3, 41, 160, generator=g) * 8, torch.randn(3, 41, 160, generator=g)
    with torch.inference_mode():
        assert torch.equal(rms_norm(x, w, 1e-5), rms_norm_reference(x, w, 1e-5))
        assert torch.equal(swiglu(gate, up), swiglu_reference(gate, up))
    x.requires_grad_(True)  # with autograd the reference path runs and gradients flow
    rms_norm(x, w, 1e-5).sum().backward()
    assert x.grad is not None
