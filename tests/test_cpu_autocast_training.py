"""16-bit autocast training on the CPU: the one-node dense LoRA layer (lora_node16), the norm that writes the
16-bit projection input (_RMSNormCastCPU), and a whole model step against the op-by-op autocast path."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import reflectevo.model.transformer as transformer
from reflectevo.kernels.rmsnorm import rms_norm, rms_norm_reference
from reflectevo.model import ModelConfig, Transformer
from reflectevo.model import lora
from reflectevo.model.lora import LoRALinear, attach_lora


def _rel(got, want):
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def _layer_run(layer, x0, g, node, autocast_dtype, monkeypatch, seed=11):
    monkeypatch.setattr(lora, "DENSE16_NODE", node)
    x = x0.clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=autocast_dtype):
        y = layer(x)
    assert (type(y.grad_fn).__name__ == "_LoRANode16Backward") == node
    y.backward(g)
    return [y.detach(), x.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad]


@pytest.mark.parametrize("x_dtype,dropout,bias,autocast_dtype", [
    (torch.float32, 0.0, False, torch.bfloat16), (torch.bfloat16, 0.0, True, torch.bfloat16),
    (torch.float32, 0.3, True, torch.bfloat16), (torch.float32, 0.0, False, torch.float16)])
def test_dense_lora16_node_matches_the_autocast_layer(x_dtype, dropout, bias, autocast_dtype, monkeypatch):
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(64, 40, bias=bias), r=8, alpha=16, dropout=dropout).train()
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x0 = torch.randn(3, 5, 64).to(x_dtype)
    g = torch.randn(3, 5, 40).to(autocast_dtype)
    node = _layer_run(layer, x0, g, True, autocast_dtype, monkeypatch)
    ops = _layer_run(layer, x0, g, False, autocast_dtype, monkeypatch)
    for got, want in zip(node, ops):
        assert got.dtype == want.dtype and got.shape == want.shape
    y, dx, da, db = node
    assert y.dtype == autocast_dtype and dx.dtype == x_dtype and da.dtype == db.dtype == torch.float32
    # dB = s dyᵀ u: the same products in the same dtype, bitwise. The node rounds y once (autocast: the base
    # product, the adapter product and their sum), takes du from s B rounded as one tensor and sums dx's two
    # products in 16 bits: y, dx and dA are compared with the fp64 truth against the op-by-op error
    assert torch.equal(node[3], ops[3])
    x64 = x0.double().requires_grad_(True)
    torch.manual_seed(11)
    keep = (lora.dropout_keep_mask((15, 64), dropout, "cpu") if dropout else (None, 1.0))
    mask, inv = keep if dropout else (torch.ones(15, 64, dtype=torch.bool), 1.0)
    w, a, b = (t.detach().double() for t in (layer.base.weight, layer.lora_A.weight, layer.lora_B.weight))
    a64 = a.clone().requires_grad_(True)
    x2 = x64.reshape(15, 64)
    y64 = x2 @ w.T + layer.scaling * inv * ((x2 * mask) @ a64.T) @ b.T
    if bias:
        y64 = y64 + layer.base.bias.detach().double()
    y64.backward(g.double().reshape(15, 40))
    for got, old, want in ((y, ops[0], y64.detach().view(3, 5, 40)), (dx, ops[1], x64.grad), (da, ops[2], a64.grad)):
        err, err_ops = _rel(got, want), _rel(old, want)
        assert err < 2e-2 and err <= 1.5 * err_ops + 1e-3, (err, err_ops)


def test_dense_lora16_node_only_where_it_applies(monkeypatch):
    layer = LoRALinear(nn.Linear(16, 8), r=4).train()
    x = torch.randn(2, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert type(layer(x).grad_fn).__name__ == "_LoRANode16Backward"
        with torch.no_grad():
            assert layer(x).grad_fn is None
        layer.base.bias.requires_grad_(True)  # a trainable bias needs autograd's own nodes
        assert type(layer(x).grad_fn).__name__ != "_LoRANode16Backward"
        layer.base.bias.requires_grad_(False)
        layer.disabled = True
        assert type(layer(x).grad_fn).__name__ != "_LoRANode16Backward"
    layer.disabled = False
    assert type(layer(x).grad_fn).__name__ != "_LoRANode16Backward"  # no autocast: fp32 paths


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_rms_norm_cast_writes_the_autocast_input_and_its_gradients(out_dtype):
    g = torch.Generator().manual_seed(4)
    base = torch.randn(5, 2 * 96, generator=g) * 3 + 0.5
    w = (1 + 0.3 * torch.randn(96, generator=g)).requires_grad_(True)
    dy = torch.randn(5, 96, generator=g).to(out_dtype)
    x = base[:, ::2].clone().requires_grad_(True)
    y = rms_norm(x, w, 1e-5, out_dtype)
    assert y.dtype == out_dtype and type(y.grad_fn).__name__ == "_RMSNormCastCPUBackward"
    assert torch.equal(y, rms_norm(x.detach(), w.detach(), 1e-5).to(out_dtype))
    y.backward(dy)
    x64, w64 = x.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    rms_norm_reference(x64, w64, 1e-5).backward(dy.double())
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-5, atol=1e-5)
    assert rms_norm(x.detach(), w.detach(), 1e-5, torch.float32).dtype == torch.float32  # same dtype: no cast
    assert rms_norm(x.detach().bfloat16(), w.detach(), 1e-5, out_dtype).dtype == out_dtype  # other: cast after


def _tiny(seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2)
    model = Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2) if p.dim() > 1 else p.uniform_(0.8, 1.2)
    attach_lora(model, r=4, alpha=8)
    for m in lora.lora_modules(model).values():
        nn.init.normal_(m.lora_B.weight, std=0.1)
    return model.train()


def _old_layer_forward(self, x, cos, sin, attention=None, seq_ids=None):
    x = x + self.self_attn(self.input_layernorm(x), cos, sin, attention, seq_ids)
    return x + self.mlp(self.post_attention_layernorm(x))


def test_model_step_matches_the_op_by_op_autocast_path(monkeypatch):
    """A packed bf16-autocast step (norms writing bf16, the LoRA node, the CPU attention / RoPE / SwiGLU paths)
    against the same step op by op: the loss and every LoRA gradient agree to bf16 accuracy."""
    model = _tiny()
    ids = torch.randint(0, 64, (1, 40), generator=torch.Generator().manual_seed(1))
    seq_ids = torch.tensor([[0] * 18 + [1] * 22])
    positions = torch.cat([torch.arange(18), torch.arange(22)])[None]
    params = lora.lora_parameters(model)
    runs = []
    for fused in (True, False):
        monkeypatch.setattr(lora, "DENSE16_NODE", fused)
        if not fused:
            monkeypatch.setattr(transformer.DecoderLayer, "forward", _old_layer_forward)
        for p in params:
            p.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = model.hidden_states(ids, positions=positions, seq_ids=seq_ids)
        loss = (h.float() @ model.lm_head.weight.T).logsumexp(-1).mean()
        loss.backward()
        runs.append([loss.detach()] + [p.grad.clone() for p in params])
    torch.testing.assert_close(runs[0][0], runs[1][0], rtol=1e-2, atol=1e-2)
    # the node rounds each projection once where autocast rounds three times: both against the fp64 step (bf16
    # inputs and activations leave small gradients of this tiny model 2-5 % off either way)
    exact = copy.deepcopy(model).double()
    params64 = lora.lora_parameters(exact)
    h = exact.hidden_states(ids, positions=positions, seq_ids=seq_ids)
    (h @ exact.lm_head.weight.T).logsumexp(-1).mean().backward()
    for got, old, p64 in zip(runs[0][1:], runs[1][1:], params64):
        err, err_ops = _rel(got, p64.grad), _rel(old, p64.grad)
        assert err <= 1.5 * err_ops + 1e-3, (err, err_ops)


def _step_grads(model, ids, seq_ids, positions, checkpointing, seed=5):
    model.gradient_checkpointing = checkpointing
    params = lora.lora_parameters(model)
    for p in params:
        p.grad = None
    torch.manual_seed(seed)  # the LoRA dropout masks
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = model.hidden_states(ids, positions=positions, seq_ids=seq_ids)
    (h.float() @ model.lm_head.weight.T).logsumexp(-1).mean().backward()
    return [p.grad.clone() for p in params]


def test_bf16_step_is_deterministic_and_checkpointing_recomputes_it_exactly():
    """The 16-bit CPU nodes with LoRA dropout: the same step twice gives the same bits, and activation
    checkpointing (which recomputes each layer, its dropout masks from the restored RNG state) too."""
    model = _tiny(seed=2)
    for m in lora.lora_modules(model).values():
        m.dropout_p = 0.2
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(3))
    seq_ids = torch.tensor([[0] * 10 + [1] * 14, [0] * 24])
    positions = torch.stack([torch.cat([torch.arange(10), torch.arange(14)]), torch.arange(24)])
    first = _step_grads(model, ids, seq_ids, positions, False)
    again = _step_grads(model, ids, seq_ids, positions, False)
    ckpt = _step_grads(model, ids, seq_ids, positions, True)
    for a, b, c in zip(first, again, ckpt):
        assert a.abs().sum() > 0
        assert torch.equal(a, b) and torch.equal(a, c)


def test_bf16_cpu_run_killed_and_resumed_equals_the_uninterrupted_run(tmp_path, monkeypatch):
    """--bf16 on the CPU (the 16-bit nodes, LoRA dropout): a run stopped after step 3 and resumed ends with the
    same losses and gradient norms, bit for bit, as the run that was never stopped."""
    from reflectevo.trainer import train_sft
    from trainer_tiny import cfg, d_plus, killed_after_step, read_metrics, tiny_model, tiny_tokenizer

    c = dict(max_steps=5, batch_size=2, save_every=2, lr=1e-2, bf16=True, lora_dropout=0.1)
    train_sft(tiny_model(), tiny_tokenizer(), d_plus(6), cfg(**c), tmp_path / "full")
    with killed_after_step(monkeypatch, 3):
        train_sft(tiny_model(), tiny_tokenizer(), d_plus(6), cfg(**c), tmp_path / "run")
    train_sft(tiny_model(), tiny_tokenizer(), d_plus(6), cfg(**c, resume=True), tmp_path / "run")
    full, resumed = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "run")
    assert [m["step"] for m in resumed] == [1, 2, 3, 4, 5]
    assert [(m["loss"], m["grad_norm"]) for m in resumed] == [(m["loss"], m["grad_norm"]) for m in full]
