"""LoRA / QLoRA training paths on the CPU: bf16 autocast (--bf16), merged compute, the fused losses under it."""
import importlib
import json
import math

import pytest
import torch
from torch import nn

from reflectevo.kernels.linear_cross_entropy import linear_cross_entropy
from reflectevo.kernels.linear_logprobs import linear_logprobs
from reflectevo.model import lora
from reflectevo.model.lora import LoRALinear
from reflectevo.trainer import train_dpo, train_sft
from trainer_tiny import cfg, d_plus, d_pm, read_metrics, tiny_model, tiny_tokenizer


def _layer_grads(merged: bool, monkeypatch):
    monkeypatch.setattr(lora, "MERGED_COMPUTE", merged)
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 12), r=4, alpha=8)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(2, 5, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    (y.float() * torch.linspace(-1, 1, 12)).sum().backward()
    return y, x.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad


def test_lora_layer_under_cpu_autocast_trains_as_the_unmerged_layer(monkeypatch):
    merged = _layer_grads(True, monkeypatch)
    plain = _layer_grads(False, monkeypatch)
    for got, want in zip(merged, plain):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("fn", ["cross_entropy", "logprobs"])
def test_fused_losses_under_cpu_autocast_compute_in_fp32(fn, monkeypatch):
    """Autocast never reaches inside the head's chunks: without bf16 matmuls on this CPU (forced here) the result
    is bitwise the fp32 one; the bf16-products path (tests/test_fused_loss_cpu_bf16.py) is its own decision."""
    monkeypatch.setattr(importlib.import_module("reflectevo.kernels.linear_logprobs"), "_ONEDNN_BF16", False)
    g = torch.Generator().manual_seed(1)
    h = torch.randn(3, 7, 16, generator=g)
    w = torch.randn(40, 16, generator=g)
    labels = torch.randint(0, 40, (3, 7), generator=g)
    labels[0, :2] = -100

    def run(autocast):
        x = h.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = (linear_cross_entropy(x, w, labels, reduction="sum") if fn == "cross_entropy"
                   else linear_logprobs(x, w, labels).sum())
        out.backward()
        return out, x.grad

    for got, want in zip(run(True), run(False)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_sft_with_bf16_on_the_cpu_runs(tmp_path, dropout):
    summary = train_sft(tiny_model(), tiny_tokenizer(), d_plus(), cfg(max_steps=2, bf16=True, lora_dropout=dropout),
                        tmp_path / "run")
    ref = train_sft(tiny_model(), tiny_tokenizer(), d_plus(), cfg(max_steps=1, lora_dropout=dropout), tmp_path / "ref")
    first, ref_first = read_metrics(tmp_path / "run")[0], read_metrics(tmp_path / "ref")[0]
    assert summary["steps"] == 2 and torch.isfinite(torch.tensor(summary["final"]["loss"]))
    # step 1 sees the base model (B = 0): bf16 matmuls only round it
    assert first["loss"] == pytest.approx(ref_first["loss"], rel=2e-2) and ref["steps"] == 1


def test_dpo_with_bf16_on_the_cpu_runs(tmp_path):
    summary = train_dpo(tiny_model(), tiny_tokenizer(), d_pm(), cfg(max_steps=2, bf16=True), tmp_path / "run")
    assert summary["steps"] == 2 and torch.isfinite(torch.tensor(summary["final"]["loss"]))


def test_training_from_an_adapter_uses_the_given_lora_dropout(tmp_path):
    from reflectevo.model.lora import lora_modules
    from reflectevo.trainer.cli_args import load_adapter_checked

    train_sft(tiny_model(), tiny_tokenizer(), d_plus(), cfg(max_steps=1, lora_r=4, lora_dropout=0.2), tmp_path / "sft")
    model = tiny_model()
    load_adapter_checked(model, tmp_path / "sft" / "adapter")
    train_dpo(model, tiny_tokenizer(), d_pm(), cfg(max_steps=1, lora_r=4, lora_dropout=0.0), tmp_path / "dpo",
              init_adapter=str(tmp_path / "sft" / "adapter"))
    assert {m.dropout_p for m in lora_modules(model).values()} == {0.0}
    # without dropout the policy equals its reference (the initial adapter) at step 1: loss = log 2
    assert read_metrics(tmp_path / "dpo")[0]["loss"] == pytest.approx(math.log(2), rel=1e-6)
    saved = json.loads((tmp_path / "dpo" / "adapter" / "adapter_config.json").read_text())
    assert saved["lora_dropout"] == 0.0


def test_qlora_nodes_with_dropout_under_activation_checkpointing():
    """NF4 + LoRA layers (one autograd node each) with dropout in a checkpointed decoder: the recomputed forward
    draws the same masks, so the loss and every adapter gradient equal the run without checkpointing."""
    from reflectevo.model.lora import attach_lora, lora_parameters, quantize_model

    model = tiny_model()
    quantize_model(model, compute_dtype=torch.float32)
    attach_lora(model, r=4, alpha=8, dropout=0.2)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_(0, 0.2)
    model.train()
    ids = torch.randint(2, 90, (2, 24))
    runs = []
    for ckpt in (False, True):
        model.gradient_checkpointing = ckpt
        model.zero_grad(set_to_none=True)
        torch.manual_seed(5)
        h = model.hidden_states(ids)
        assert type(model.layers[0].self_attn.q_proj(h).grad_fn).__name__ == "_QLoRABackward"
        loss = h.square().mean()
        loss.backward()
        runs.append([loss.detach()] + [p.grad.clone() for p in lora_parameters(model)])
    for got, want in zip(*runs):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
