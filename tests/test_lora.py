"""NF4 + LoRA layers against a plain float implementation, and PEFT / transformers round trips on a tiny Llama."""
import json
import math

import pytest
import torch
from torch import nn

from reflectevo.kernels.nf4 import nf4_dequantize_reference
from reflectevo.model.lora import (
    LoRALinear,
    NF4Linear,
    adapters_disabled,
    attach_lora,
    dropout_keep_mask,
    has_lora,
    lora_parameters,
    quantize_model,
)
from reflectevo.model.peft_io import export_merged, load_adapter, save_adapter

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def test_nf4_linear_matches_dequantized_linear():
    lin = nn.Linear(64, 48, bias=True)
    layer = NF4Linear.from_linear(lin, compute_dtype=torch.float32)
    assert not any(p.requires_grad for p in layer.parameters())
    x = torch.randn(3, 5, 64, requires_grad=True)
    w = nf4_dequantize_reference(layer.q, torch.float32)
    y = layer(x)
    torch.testing.assert_close(y, x @ w.t() + lin.bias, rtol=0, atol=0)
    y.square().sum().backward()
    torch.testing.assert_close(x.grad, (2 * y.detach()) @ w)


@pytest.mark.parametrize("use_rslora,quantized,dtype", [(False, True, torch.float32), (True, False, torch.float32),
                                                         (False, True, torch.bfloat16)])
def test_lora_linear_outputs_and_grads_match_float(use_rslora, quantized, dtype):
    torch.manual_seed(0)
    lin = nn.Linear(64, 32, bias=False)
    base = NF4Linear.from_linear(lin, compute_dtype=torch.float32) if quantized else lin
    layer = LoRALinear(base, r=4, alpha=8, dropout=0.0, use_rslora=use_rslora, dtype=dtype)
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    bound = 1 / math.sqrt(64)  # kaiming_uniform(a=sqrt(5)) on fan_in 64
    assert layer.lora_A.weight.abs().max() <= bound and layer.lora_A.weight.abs().max() > 0.8 * bound
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    scaling = 8 / (math.sqrt(4) if use_rslora else 4)
    assert layer.scaling == scaling
    x = torch.randn(2, 7, 64, requires_grad=True)
    y = layer(x)
    w = nf4_dequantize_reference(base.q, torch.float32) if quantized else lin.weight.detach()
    a, b = layer.lora_A.weight.float(), layer.lora_B.weight.float()
    xf = x.detach().clone().requires_grad_(True)
    af, bf = a.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True)
    y_ref = xf @ w.t() + scaling * ((xf.to(dtype).float() @ af.t()).to(dtype).float() @ bf.t())
    tol = 1e-6 if dtype == torch.float32 else 1e-2  # relative (Frobenius) error; bf16 adapters round A, B, A x

    def close(got, want):
        assert ((got.float() - want).norm() / want.norm()).item() < tol

    close(y, y_ref)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    close(x.grad, xf.grad)
    close(layer.lora_A.weight.grad, af.grad)
    close(layer.lora_B.weight.grad, bf.grad)
    close(x.detach() @ layer.merge().t(), y.detach().float())


def test_merged_compute_matches_the_unmerged_layer_and_follows_updates(monkeypatch):
    from reflectevo.model import lora

    torch.manual_seed(0)
    base = nn.Linear(24, 40, bias=True).double()
    merged = LoRALinear(base, r=4, alpha=8, dtype=torch.float64)
    with torch.no_grad():
        merged.lora_B.weight.normal_()
    x = torch.randn(3, 5, 24, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([merged.lora_A.weight, merged.lora_B.weight], lr=0.5)
    for _ in range(2):  # the second pass runs after an optimizer step changed A and B in place
        assert merged._merges(x)
        y = merged(x)
        g = torch.randn_like(y)
        y.backward(g)
        got = (y.detach(), x.grad, merged.lora_A.weight.grad, merged.lora_B.weight.grad)
        x.grad = None
        monkeypatch.setattr(lora, "MERGED_COMPUTE", False)
        merged.zero_grad()
        y_ref = merged(x)
        y_ref.backward(g)
        want = (y_ref.detach(), x.grad, merged.lora_A.weight.grad, merged.lora_B.weight.grad)
        monkeypatch.setattr(lora, "MERGED_COMPUTE", True)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        with torch.no_grad():
            torch.testing.assert_close(merged(x), y_ref.detach(), rtol=1e-12, atol=1e-12)
        x.grad = None
        opt.step()
        opt.zero_grad()
    with adapters_disabled(merged):
        torch.testing.assert_close(merged(x), base(x), rtol=0, atol=0)
    half = LoRALinear(nn.Linear(24, 40).bfloat16(), r=4, dtype=torch.bfloat16)
    assert not half._merges(torch.randn(2, 24, dtype=torch.bfloat16))  # B A would round away in 16 bits
    drop = LoRALinear(nn.Linear(24, 40), r=4, dropout=0.1)
    assert not drop._merges(torch.randn(2, 24)) and drop.eval()._merges(torch.randn(2, 24))


def test_lora_with_dropout_trains_unmerged_and_matches_the_formula():
    torch.manual_seed(0)
    lin = nn.Linear(32, 24, bias=True)
    layer = LoRALinear(lin, r=4, alpha=8, dropout=0.25)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(2, 6, 32, requires_grad=True)
    assert not layer._merges(x)
    torch.manual_seed(7)
    y = layer(x)
    torch.manual_seed(7)  # the same draw: the layer's dropout is its only use of the generator
    keep, inv_keep = dropout_keep_mask(x.shape, 0.25, x.device)
    assert inv_keep == 4 / 3  # 0.25 is a multiple of 2^-16: the exact rescaling
    xf = x.detach().clone().requires_grad_(True)
    af = layer.lora_A.weight.detach().clone().requires_grad_(True)
    bf = layer.lora_B.weight.detach().clone().requires_grad_(True)
    dropped = xf * keep.float() / 0.75
    y_ref = xf @ lin.weight.t() + lin.bias + 2.0 * (dropped @ af.t() @ bf.t())
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    for got, want in ((x.grad, xf.grad), (layer.lora_A.weight.grad, af.grad), (layer.lora_B.weight.grad, bf.grad)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_dropout_keep_mask_rate_and_lanes():
    torch.manual_seed(3)
    keep, inv_keep = dropout_keep_mask((1000, 999), 0.05, "cpu")  # odd size: the last 64-bit word is cut
    assert keep.dtype == torch.bool and keep.shape == (1000, 999)
    p_eff = round(0.05 * 65536) / 65536
    assert inv_keep == 1 / (1 - p_eff) and abs(p_eff - 0.05) < 2 ** -16
    # each of the four 16-bit lanes of a 64-bit draw drops at the same rate (a 63-bit draw would bias the top one)
    lanes = (~keep).flatten()[: 999 * 1000 // 4 * 4].view(-1, 4).float().mean(0)
    assert torch.all((lanes - p_eff).abs() < 0.003), lanes
    again = dropout_keep_mask((1000, 999), 0.05, "cpu")[0]
    assert not torch.equal(keep, again)  # fresh draws each call
    assert dropout_keep_mask((8,), 0.999999, "cpu")[1] == 65536.0  # p near 1: finite rescaling


def test_lora_dropout_only_in_training():
    layer = LoRALinear(nn.Linear(16, 16), r=2, alpha=4, dropout=0.5)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(4, 16)
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x))
    layer.train()
    torch.manual_seed(1)
    assert not torch.allclose(layer(x), layer(x))


# ---------------------------------------------------------------- tiny Llama: ours and transformers'


def _tiny_hf(tmp_path, tie=False):
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=tie)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).float().eval()
    d = tmp_path / "hf"
    hf.save_pretrained(d)
    return hf, d


def _ours_from_hf_dir(d):
    """Our Transformer built from the HF directory (no tokenizer.json, so not via load_model)."""
    from safetensors.torch import load_file

    from reflectevo.model.config import read_config_json
    from reflectevo.model.transformer import Transformer

    config = read_config_json(d / "config.json")
    model = Transformer(config)
    state = {k.removeprefix("model."): v for k, v in load_file(str(d / "model.safetensors")).items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    return model.float().eval()


IDS = torch.tensor([[1, 5, 9, 33, 77, 2, 100, 64, 3, 17]])


def _randomise_lora(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_base_model_matches_transformers(tmp_path):
    hf, d = _tiny_hf(tmp_path)
    ours = _ours_from_hf_dir(d)
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS), hf(IDS).logits, rtol=1e-4, atol=1e-4)


def test_our_adapter_loads_in_peft(tmp_path):
    hf, d = _tiny_hf(tmp_path)
    ours = _ours_from_hf_dir(d)
    params = attach_lora(ours, r=4, alpha=8, target_modules=("q_proj", "v_proj", "down_proj"), use_rslora=True)
    assert has_lora(ours) and len(params) == 2 * 3 * 2
    assert all(p.requires_grad for p in params)
    assert sum(p.requires_grad for p in ours.parameters()) == len(params)
    _randomise_lora(ours)
    save_adapter(ours, tmp_path / "adapter", base_model_name_or_path=str(d))
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["use_rslora"] is True
    assert sorted(cfg["target_modules"]) == ["down_proj", "q_proj", "v_proj"]
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert keys["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"].shape == (4, 64)
    assert keys["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"].shape == (64, 4)
    save_adapter(ours, tmp_path / "adapter", base_model_name_or_path=str(d))  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "hf"]  # no temporary directories left
    pm = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        ref = pm(IDS).logits
        torch.testing.assert_close(ours(IDS), ref, rtol=1e-4, atol=1e-4)
        with adapters_disabled(ours):
            torch.testing.assert_close(ours(IDS), _base_logits(pm), rtol=1e-4, atol=1e-4)
        assert not torch.allclose(ours(IDS), _base_logits(pm), atol=1e-3)


def _base_logits(pm):
    with pm.disable_adapter():
        return pm(IDS).logits


def test_peft_adapter_loads_into_ours_and_merged_export(tmp_path):
    hf, d = _tiny_hf(tmp_path)
    lcfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                "up_proj", "down_proj"], lora_dropout=0.0,
                           task_type="CAUSAL_LM")
    pm = peft.get_peft_model(hf, lcfg)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    pm.save_pretrained(tmp_path / "peft_adapter")
    pm.eval()
    ours = _ours_from_hf_dir(d)
    load_adapter(ours, tmp_path / "peft_adapter")
    with torch.no_grad():
        ref = pm(IDS).logits
        torch.testing.assert_close(ours(IDS), ref, rtol=1e-4, atol=1e-4)
    # merged export loads in transformers with the same logits
    out = export_merged(ours, tmp_path / "merged")
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    merged = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS).logits, ref, rtol=1e-4, atol=1e-4)


def test_qlora_model_export_matches_dequantized(tmp_path):
    hf, d = _tiny_hf(tmp_path, tie=True)
    ours = _ours_from_hf_dir(d)
    quantize_model(ours, compute_dtype=torch.float32)
    assert type(ours.lm_head) is nn.Linear and ours.lm_head.weight is ours.embed_tokens.weight
    assert isinstance(ours.layers[0].mlp.up_proj, NF4Linear)
    attach_lora(ours, r=4, alpha=4)
    assert isinstance(ours.layers[1].self_attn.o_proj.base, NF4Linear)
    _randomise_lora(ours)
    out = export_merged(ours, tmp_path / "merged")
    merged = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS).logits, ours(IDS), rtol=1e-4, atol=1e-4)
    # the saved adapter reloads onto a fresh quantised model with identical logits
    save_adapter(ours, tmp_path / "a")
    fresh = quantize_model(_ours_from_hf_dir(d), compute_dtype=torch.float32)
    load_adapter(fresh, tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(fresh(IDS), ours(IDS), rtol=0, atol=0)


def test_bad_adapters_name_the_key(tmp_path):
    hf, d = _tiny_hf(tmp_path)
    ours = _ours_from_hf_dir(d)
    attach_lora(ours, r=4, alpha=8, target_modules=("q_proj",))
    save_adapter(ours, tmp_path / "a")
    from safetensors.torch import load_file, save_file

    w = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    # another architecture: a layer this model does not have
    bad = dict(w)
    bad["base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 64)
    save_file(bad, str(tmp_path / "a" / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"layers\.7\.self_attn\.q_proj"):
        load_adapter(_ours_from_hf_dir(d), tmp_path / "a")
    # other shapes
    bad = dict(w)
    bad["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 65)
    save_file(bad, str(tmp_path / "a" / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"layers\.0\.self_attn\.q_proj\.lora_A\.weight.*shape") as e:
        load_adapter(_ours_from_hf_dir(d), tmp_path / "a")
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="adapter_config.json"):
        load_adapter(ours, tmp_path / "nowhere")


def _write_tokenizer(d, vocab_size=100):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(d / "tokenizer.json"))


def test_load_model_nf4_with_peft_adapter(tmp_path):
    from reflectevo.model import load_model

    hf, d = _tiny_hf(tmp_path)
    _write_tokenizer(d)
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"],
                                                 task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    pm.save_pretrained(tmp_path / "ad")
    model, tok = load_model(d, dtype="float32", quantize="nf4", adapter=tmp_path / "ad")
    linears = [n for n, m in model.named_modules() if type(m) is nn.Linear and "lora_" not in n]
    assert linears == ["lm_head"]
    assert isinstance(model.layers[0].self_attn.q_proj, LoRALinear)
    assert isinstance(model.layers[0].self_attn.q_proj.base, NF4Linear)
    assert isinstance(model.layers[0].self_attn.k_proj, NF4Linear)
    manual = quantize_model(_ours_from_hf_dir(d), compute_dtype=torch.float32)
    load_adapter(manual, tmp_path / "ad")
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), manual(IDS), rtol=0, atol=0)
    out = export_merged(model, tmp_path / "merged", tokenizer_dir=d)
    assert (out / "tokenizer.json").is_file()
    again, _ = load_model(out, dtype="float32")
    with torch.no_grad():
        torch.testing.assert_close(again(IDS), model(IDS), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("auto_fused_rows", [0, 1024])  # the measured default (dequant kernel) and the fused one
def test_qlora_layer_on_triton_path_matches_float(auto_fused_rows, monkeypatch):
    import importlib

    from reflectevo.kernels import kernel_backend

    monkeypatch.setattr(importlib.import_module("reflectevo.kernels.nf4_matmul"), "AUTO_FUSED_MAX_ROWS", auto_fused_rows)

    torch.manual_seed(0)
    lin = nn.Linear(64, 48, bias=False)
    layer = LoRALinear(NF4Linear.from_linear(lin, compute_dtype=torch.float32), r=4, alpha=8)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(12, 64, requires_grad=True)
    with kernel_backend("triton"):
        y = layer(x)
        y.square().sum().backward()
    w = layer.merge()
    xf = x.detach().clone().requires_grad_(True)
    y_ref = xf @ w.t()
    y_ref.square().sum().backward()
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, xf.grad, rtol=1e-5, atol=1e-4)


def test_nf4_linear_follows_module_dtype_and_device():
    layer = NF4Linear.from_linear(nn.Linear(64, 32), compute_dtype=torch.float32)
    layer.to(torch.bfloat16)
    assert layer.compute_dtype == torch.bfloat16 and layer.bias.dtype == torch.bfloat16
    assert layer.q.absmax2.dtype == torch.float32 and layer.q.data.dtype == torch.uint8  # storage untouched
    assert layer(torch.randn(2, 64)).dtype == torch.bfloat16
    layer.float()
    assert layer.compute_dtype == torch.float32 and layer(torch.randn(2, 64)).dtype == torch.float32
    layer.to("cpu")
    assert layer.compute_dtype == torch.float32


def test_adapter_with_another_scale_is_refused_by_an_attached_model(tmp_path):
    """Loading into adapters already attached keeps their modules: a file with the same r but another lora_alpha
    (or rsLoRA) would run at the model's scale, not its own."""
    hf, d = _tiny_hf(tmp_path)
    src = _ours_from_hf_dir(d)
    attach_lora(src, r=4, alpha=32, target_modules=("q_proj",))
    _randomise_lora(src)
    save_adapter(src, tmp_path / "a")
    attached = _ours_from_hf_dir(d)
    attach_lora(attached, r=4, alpha=8, target_modules=("q_proj",))
    with pytest.raises(ValueError, match=r"lora_alpha=32.*layers\.0\.self_attn\.q_proj has scale 2") as e:
        load_adapter(attached, tmp_path / "a")
    assert "\n" not in str(e.value)
    same = _ours_from_hf_dir(d)
    attach_lora(same, r=4, alpha=32, target_modules=("q_proj",))
    load_adapter(same, tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(same(IDS), src(IDS), rtol=0, atol=0)


@pytest.mark.parametrize("compute_dtype,adapter_dtype,autocast,dropout,bias", [
    (torch.float32, torch.float32, False, 0.0, False), (torch.float32, torch.float32, False, 0.3, True),
    (torch.bfloat16, torch.float32, False, 0.0, True), (torch.bfloat16, torch.float32, True, 0.3, False),
    (torch.bfloat16, torch.bfloat16, False, 0.0, False)])
def test_qlora_single_node_matches_the_unfused_layer(compute_dtype, adapter_dtype, autocast, dropout, bias,
                                                     monkeypatch):
    """The one-node NF4 + LoRA training path (_QLoRA) against the same layer computed op by op (QLORA_NODE off):
    outputs and the gradients of x, A and B, with dropout (same draw), a frozen bias, mixed dtypes, autocast."""
    from reflectevo.model import lora

    torch.manual_seed(0)
    layer = LoRALinear(NF4Linear.from_linear(nn.Linear(64, 40, bias=bias), compute_dtype=compute_dtype), r=8,
                       alpha=16, dropout=dropout, dtype=adapter_dtype).train()
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x0 = torch.randn(3, 5, 64).to(compute_dtype)
    g = torch.randn(3, 5, 40).to(compute_dtype)
    runs = []
    for node in (True, False):
        monkeypatch.setattr(lora, "QLORA_NODE", node)
        x = x0.clone().requires_grad_(True)
        layer.zero_grad(set_to_none=True)
        torch.manual_seed(11)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = layer(x)
        assert (type(y.grad_fn).__name__ == "_QLoRABackward") == node
        y.backward(g)
        assert y.dtype == compute_dtype and y.shape == (3, 5, 40)
        assert x.grad.dtype == x.dtype and layer.lora_A.weight.grad.dtype == adapter_dtype
        runs.append([y.detach(), x.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad])
    exact = compute_dtype == adapter_dtype == torch.float32 and not autocast
    for got, want in zip(*runs):
        err = ((got.float() - want.float()).norm() / want.float().norm()).item()
        assert err < (1e-6 if exact else 1e-2), err
