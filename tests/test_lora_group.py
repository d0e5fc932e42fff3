"""Projections sharing an input as one node under CPU 16-bit autocast (reflectevo.model.lora_group) against the
layers one by one (each its own lora_node16 node) and fp64, gradients and dropout included; where it does not
apply; the augmented weight buffers it keeps."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from reflectevo.model import lora, lora_group
from reflectevo.model.lora import LoRALinear
from reflectevo.model.lora_group import grouped_projections


def _layers(outs, r=8, seed=0, bias=False, dropout=0.0):
    torch.manual_seed(seed)
    layers = []
    for i, o in enumerate(outs):
        m = LoRALinear(nn.Linear(48, o, bias=bias), r=r + 4 * i, alpha=16, dropout=dropout).train()
        for p in m.base.parameters():
            p.requires_grad_(False)
        with torch.no_grad():
            m.lora_B.weight.normal_(0, 0.3)
        layers.append(m)
    return layers


def _run(layers, x0, ups, grouped, dtype=torch.bfloat16, seed=3):
    x = x0.clone().requires_grad_(True)
    for m in layers:
        m.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the dropout masks: drawn layer by layer in the same order either way
    with torch.autocast("cpu", dtype=dtype):
        ys = grouped_projections(x, layers) if grouped else tuple(m(x) for m in layers)
    assert ys is not None
    assert all(type(y.grad_fn).__name__ == "_LoRANode16Backward" for y in ys)
    assert (len({id(y.grad_fn) for y in ys}) == 1) == grouped  # one node for the group, one per layer otherwise
    torch.autograd.backward(ys, ups)
    adapters = [g for m in layers for g in (m.lora_A.weight.grad, m.lora_B.weight.grad)]
    return [y.detach() for y in ys] + [x.grad] + adapters


def _fp64(layers, x0, ups, seed=3):
    x = x0.double().requires_grad_(True)
    leaves, ys = [], []
    torch.manual_seed(seed)
    for m in layers:
        a = m.lora_A.weight.detach().double().requires_grad_(True)
        b = m.lora_B.weight.detach().double().requires_grad_(True)
        w = m.base.weight.detach().double()
        xa, scale = x, m.scaling
        if m.dropout_p > 0:
            keep, inv = lora.dropout_keep_mask((x0.numel() // x0.shape[-1], x0.shape[-1]), m.dropout_p, "cpu")
            xa, scale = x * keep.view(x0.shape), scale * inv
        y = x @ w.T + scale * (xa @ a.T) @ b.T
        if m.base.bias is not None:
            y = y + m.base.bias.double()
        ys.append(y)
        leaves += [a, b]
    torch.autograd.backward(ys, [u.double() for u in ups])
    return [y.detach() for y in ys] + [x.grad] + [t.grad for t in leaves]


def _rel(got, want):
    return ((got.double() - want).norm() / want.norm()).item()


@pytest.mark.parametrize("outs,bias,dtype,dropout", [
    ((40, 16, 16), False, torch.bfloat16, 0.0), ((64, 64), True, torch.bfloat16, 0.0),
    ((24, 8, 8), False, torch.float16, 0.0), ((40, 16, 16), True, torch.bfloat16, 0.2)])
def test_group_node_matches_the_layers_one_by_one_and_fp64(outs, bias, dtype, dropout):
    layers = _layers(outs, bias=bias, dropout=dropout)
    g = torch.Generator().manual_seed(len(outs))
    x0 = torch.randn(2, 11, 48, generator=g)
    ups = [torch.randn(2, 11, o, generator=g).to(dtype) for o in outs]
    got = _run(layers, x0, ups, True, dtype)
    one_by_one = _run(layers, x0, ups, False, dtype)
    exact = _fp64(layers, x0, ups)
    step = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10
    for y, y1, want in zip(got[:len(outs)], one_by_one[:len(outs)], exact):
        assert y.dtype == y1.dtype == dtype
        assert bool(((y.double() - y1.double()).abs() <= y1.double().abs().clamp(min=1e-2) * step * 2).all())
        assert _rel(y, want) < 1e-2  # its inputs and weights rounded to 16 bits, the sum once
    for a, b, want in zip(got[len(outs):], one_by_one[len(outs):], exact[len(outs):]):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert _rel(a, want) <= 1.5 * _rel(b, want) + 1e-3, (_rel(a, want), _rel(b, want))


def test_group_node_is_not_taken_where_it_does_not_apply(monkeypatch):
    x = torch.randn(3, 48)
    layers = _layers((16, 16))
    assert grouped_projections(x, layers) is None  # no autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert grouped_projections(x, layers) is not None
        with torch.no_grad():
            assert grouped_projections(x, layers) is None
        layers[1].dropout_p = 0.1  # each layer keeps its own mask
        assert grouped_projections(x, layers) is not None
        layers[0].disabled = True
        assert grouped_projections(x, layers) is None
        layers[0].disabled = False
        layers[0].base.weight.requires_grad_(True)
        assert grouped_projections(x, layers) is None
        layers[0].base.weight.requires_grad_(False)
        assert grouped_projections(x, [layers[0], nn.Linear(48, 8)]) is None
        monkeypatch.setattr(lora_group, "GROUPED_NODE", False)
        assert grouped_projections(x, layers) is None


def test_model_step_with_grouped_projections_equals_the_layers_one_by_one(monkeypatch):
    from reflectevo.model import ModelConfig, Transformer
    from reflectevo.model.lora import attach_lora, lora_parameters

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=80, hidden_size=64, intermediate_size=128, num_layers=2,
                                    num_heads=4, num_kv_heads=2))
    for p in model.parameters():
        p.requires_grad_(False)
    attach_lora(model, r=4, alpha=8)
    params = lora_parameters(model)
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.2)
    model.train()
    ids = torch.randint(0, 80, (1, 19))
    calls = []
    real = lora_group.lora_projections16
    monkeypatch.setattr(lora_group, "lora_projections16", lambda x, specs, ldt: calls.append(len(specs)) or
                        real(x, specs, ldt))
    results = []
    for grouped in (True, False):
        monkeypatch.setattr(lora_group, "GROUPED_NODE", grouped)
        for p in params:
            p.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            hidden = model.hidden_states(ids)
        (hidden.float() * torch.linspace(-1, 1, 64)).sum().backward()
        results.append([hidden.detach().float()] + [p.grad.clone() for p in params])
    assert calls == [3, 2, 3, 2]  # q/k/v and gate/up in each of the 2 layers, in the grouped run only
    for got, want in zip(*results):  # bf16 products rounded in other blocks (u, dx) differ by ulps, 0.4 % each
        assert _rel(got, want.double()) < 2e-2, _rel(got, want.double())
