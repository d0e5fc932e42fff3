"""The residual add fused into the RMSNorm after it (``rmsnorm.add_rms_norm``, ``DecoderLayer.forward_deferred``)
and the kept 16-bit [W | s B] buffer of a frozen LoRA base (``lora_node16.augmented``), against the unfused ops
and fp64."""
from __future__ import annotations

import gc

import pytest
import torch
from torch import nn

import reflectevo.model.transformer as transformer
from reflectevo.kernels import cpu_compiled, kernel_backend
from reflectevo.kernels.rmsnorm import add_rms_norm, rms_norm
from reflectevo.model import ModelConfig, Transformer, lora_node16
from reflectevo.model.lora import LoRALinear, attach_lora, lora_parameters

STEP = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}


def run(x0, y0, w, h_dtype, upstream, compiled: bool):
    """s, h = add_rms_norm(x, y); backward of both with ``upstream`` = (ds, dh); returns s, h, dx, dy."""
    x, y = x0.clone().requires_grad_(True), y0.clone().requires_grad_(True)
    with kernel_backend("torch"), cpu_compiled.compiled_cpu_kernels(compiled):
        s, h = add_rms_norm(x, y, w, 1e-5, h_dtype)
        fused = type(s.grad_fn).__name__ == "_AddRMSNormCastCPUBackward"
    torch.autograd.backward((s, h), upstream)  # outside the block: the node keeps its forward's choice
    return fused, [s.detach(), h.detach(), x.grad, y.grad]


def within_one_step(got, want, max_fraction=0.01):
    """Equal, except a few elements one 16-bit rounding step apart (fp32 values on a rounding boundary)."""
    assert got.dtype == want.dtype and got.shape == want.shape
    step = STEP[want.dtype]
    diff = (got.double() - want.double()).abs()
    assert bool((diff <= want.double().abs().clamp(min=1e-3) * step * 1.01).all())
    assert (diff > 0).double().mean().item() <= max_fraction


@pytest.mark.parametrize("shape,y_dtype,h_dtype", [
    ((37, 40), torch.bfloat16, torch.bfloat16), ((2, 9, 64), torch.float32, torch.bfloat16),
    ((1, 130, 576), torch.bfloat16, torch.bfloat16), ((5, 48), torch.float16, torch.float16)])
def test_fused_add_norm_matches_the_two_ops_and_fp64(shape, y_dtype, h_dtype):
    g = torch.Generator().manual_seed(shape[-1])
    x0 = torch.randn(shape, generator=g) * 2
    y0 = torch.randn(shape, generator=g).to(y_dtype)
    w = torch.rand(shape[-1], generator=g) + 0.5
    upstream = (torch.randn(shape, generator=g), torch.randn(shape, generator=g).to(h_dtype))
    fused, got = run(x0, y0, w, h_dtype, upstream, compiled=True)
    unfused, want = run(x0, y0, w, h_dtype, upstream, compiled=False)
    assert fused and not unfused
    assert torch.equal(got[0], want[0])  # s = x + y: one exact fp32 add either way
    within_one_step(got[1], want[1])
    torch.testing.assert_close(got[2], want[2], rtol=1e-5, atol=1e-6)  # dx: sum order of the row reduction
    assert got[3].dtype == y_dtype
    if y_dtype == torch.float32:
        assert torch.equal(got[3], got[2])
        torch.testing.assert_close(got[3], want[3], rtol=1e-5, atol=1e-6)
    else:
        within_one_step(got[3], want[3])

    xd, yd = x0.double().requires_grad_(True), y0.double().requires_grad_(True)
    sd = xd + yd
    hd = sd * torch.rsqrt(sd.pow(2).mean(-1, keepdim=True) + 1e-5) * w.double()
    torch.autograd.backward((sd, hd), tuple(u.double() for u in upstream))
    assert ((got[1].double() - hd).abs() <= hd.abs() * STEP[h_dtype] + 1e-6).all()
    assert ((got[2].double() - xd.grad).norm() / xd.grad.norm()).item() < 1e-6


def test_fused_add_norm_falls_back_where_it_does_not_apply():
    x, y = torch.randn(4, 16), torch.randn(4, 16).bfloat16()
    trained = nn.Parameter(torch.ones(16))
    with kernel_backend("torch"), cpu_compiled.compiled_cpu_kernels(True):
        s, h = add_rms_norm(x, y, trained, 1e-5, torch.bfloat16)  # a trained weight: the eager graph
        assert type(s.grad_fn).__name__ != "_AddRMSNormCastCPUBackward"
        s2, h2 = add_rms_norm(x.double(), y.double(), torch.ones(16, dtype=torch.float64), 1e-5, torch.bfloat16)
        assert s2.dtype == torch.float64 and h2.dtype == torch.bfloat16
    assert torch.equal(s, x + y) and torch.equal(h, rms_norm(x + y, trained.detach(), 1e-5, torch.bfloat16))


def _tiny(seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=80, hidden_size=64, intermediate_size=128, num_layers=3, num_heads=4,
                      num_kv_heads=2)
    model = Transformer(cfg)
    for p in model.parameters():
        p.requires_grad_(False)
    attach_lora(model, r=4, alpha=8)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_(0, 0.2)
    return model.train(), lora_parameters(model)


@pytest.mark.parametrize("recompute", [False, True])
def test_model_step_with_deferred_residuals_equals_the_plain_layers(recompute, monkeypatch):
    model, params = _tiny()
    model.gradient_checkpointing = recompute
    ids = torch.randint(0, 80, (1, 23))
    seq_ids = torch.tensor([[0] * 10 + [1] * 13])
    positions = torch.cat([torch.arange(10), torch.arange(13)])[None]
    results = []
    for fused in (True, False):
        monkeypatch.setattr(transformer, "FUSED_RESIDUAL_NORM", fused)
        for p in params:
            p.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16), cpu_compiled.compiled_cpu_kernels(True):
            hidden = model.hidden_states(ids, positions, seq_ids=seq_ids)
        (hidden.float() * torch.linspace(-1, 1, 64)).sum().backward()
        results.append([hidden.detach()] + [p.grad.clone() for p in params])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=2e-5, atol=1e-6)


def test_dense_lora_reuses_the_16bit_base_and_sees_in_place_updates():
    torch.manual_seed(3)
    layer = LoRALinear(nn.Linear(32, 24, bias=False), r=4, alpha=8).train()
    layer.base.weight.requires_grad_(False)
    x = torch.randn(5, 32, requires_grad=True)
    w = layer.base.weight
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y1 = layer(x)
    key = (id(w), torch.bfloat16, 32 + 4, 32)  # [W | s B]: K + r columns, B from column K
    first = lora_node16._BUFFERS[key][3]
    assert torch.equal(first[:, :32], w.bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(layer(x), y1)
    assert lora_node16._BUFFERS[key][3] is first  # unchanged: converted once
    with torch.no_grad():
        w.mul_(2.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y2 = layer(x)
    assert torch.equal(lora_node16._BUFFERS[key][3][:, :32], w.bfloat16())
    torch.testing.assert_close(y2.float(), (x.bfloat16() @ w.bfloat16().T).float(), rtol=1e-2, atol=1e-2)
    del layer, w, y1, y2, first
    gc.collect()
    assert key not in lora_node16._BUFFERS
