"""Adapter configs and files PEFT writes that change the forward pass, base weights saved beside an adapter, NF4
on non-finite or denormal weights, and a quantised model's state_dict."""
import json

import pytest
import torch

from reflectevo.errors import ModelLoadError
from reflectevo.kernels.nf4 import _CODE2, _quantize_8bit_dynamic, nf4_quantize
from reflectevo.model.lora import attach_lora, lora_parameters, quantize_model
from reflectevo.model.peft_io import export_merged, load_adapter
from test_lora import IDS, _ours_from_hf_dir, _randomise_lora, _tiny_hf
from trainer_tiny import tiny_model

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def _peft_adapter(tmp_path, tie=False, **kw):
    hf, d = _tiny_hf(tmp_path, tie=tie)
    pm = peft.get_peft_model(hf, peft.LoraConfig(task_type="CAUSAL_LM", **kw))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    pm.eval()
    pm.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        ref = pm(IDS).logits
    return d, tmp_path / "adapter", ref


def _edit_config(adapter, **changes):
    path = adapter / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


@pytest.mark.parametrize("key, value", [("alora_invocation_tokens", [9, 33]), ("use_qalora", True),
                                        ("some_future_option", {"x": 1}), ("init_lora_weights", "pissa"),
                                        ("use_dora", True), ("layer_replication", [[0, 2]])])
def test_config_fields_that_change_the_forward_pass_are_refused(tmp_path, key, value):
    d, adapter, _ = _peft_adapter(tmp_path, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    _edit_config(adapter, **{key: value})
    with pytest.raises(ModelLoadError, match=rf"adapter_config\.json: {key}"):
        load_adapter(_ours_from_hf_dir(d), adapter)


def test_missing_lora_alpha_takes_peft_default(tmp_path):
    d, adapter, _ = _peft_adapter(tmp_path, r=4, lora_alpha=8, target_modules=["q_proj"])
    path = adapter / "adapter_config.json"
    cfg = json.loads(path.read_text())
    del cfg["lora_alpha"]
    path.write_text(json.dumps(cfg))
    pm = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(d).float(), adapter).eval()
    ours = _ours_from_hf_dir(d)
    load_adapter(ours, adapter)
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS), pm(IDS).logits, rtol=1e-4, atol=1e-4)


def test_peft_lm_head_adapter_with_its_base_copy_loads(tmp_path):
    d, adapter, ref = _peft_adapter(tmp_path, r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"])
    from safetensors.torch import load_file, save_file

    weights = load_file(str(adapter / "adapter_model.safetensors"))
    head = "base_model.model.lm_head.base_layer.weight"
    if head not in weights:  # this PEFT version does not store it: add it as newer versions do
        weights[head] = transformers.LlamaForCausalLM.from_pretrained(d).lm_head.weight.detach().clone()
        save_file(weights, str(adapter / "adapter_model.safetensors"))
    ours = _ours_from_hf_dir(d)
    load_adapter(ours, adapter)
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS), ref, rtol=1e-4, atol=1e-4)
    weights[head] = weights[head] + 1.0
    save_file(weights, str(adapter / "adapter_model.safetensors"))
    with pytest.raises(ModelLoadError, match="lm_head.base_layer.weight.*differs"):
        load_adapter(_ours_from_hf_dir(d), adapter)


def test_merged_export_unties_a_tied_head_with_an_adapter(tmp_path):
    hf, d = _tiny_hf(tmp_path, tie=True)
    ours = _ours_from_hf_dir(d)
    attach_lora(ours, r=4, alpha=8, target_modules=("q_proj", "lm_head"))
    _randomise_lora(ours)
    out = export_merged(ours, tmp_path / "merged")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    merged = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS).logits, ours(IDS), rtol=1e-4, atol=1e-4)


def test_nf4_refuses_non_finite_weights():
    for bad in (float("nan"), float("inf"), -float("inf")):
        w = torch.randn(4, 64)
        w[1, 3] = bad
        with pytest.raises(ValueError, match="nan / inf"):
            nf4_quantize(w)


def test_denormal_second_level_absmax_matches_bitsandbytes_rule():
    """1/absmax overflows for a denormal absmax: x * inf is +-inf (codes 255 / 0), 0 * inf is nan (code 0)."""
    q, absmax = _quantize_8bit_dynamic(torch.tensor([1e-45, -3e-45, 0.0, 2e-45]), _CODE2, 256)
    assert q.tolist() == [255, 0, 0, 255]
    assert absmax.item() == pytest.approx(2.8e-45, rel=0.1)
    for w in (torch.full((640,), 1e-38), torch.randn(640) * 1e-40):
        assert torch.isfinite(nf4_quantize(w).absmax2).all()


def test_quantised_model_state_dict_round_trips():
    a = quantize_model(tiny_model(0), compute_dtype=torch.float32)
    b = quantize_model(tiny_model(1), compute_dtype=torch.float32)
    ids = torch.randint(0, 96, (1, 8), generator=torch.Generator().manual_seed(0))
    sd = a.state_dict()
    assert "layers.0.self_attn.q_proj.weight.data" in sd
    assert not torch.equal(a(ids), b(ids))
    b.load_state_dict(sd, strict=True)
    assert torch.equal(a(ids), b(ids))
    del sd["layers.0.self_attn.q_proj.weight.absmax"]
    with pytest.raises(RuntimeError, match="q_proj.weight.absmax"):
        quantize_model(tiny_model(1), compute_dtype=torch.float32).load_state_dict(sd, strict=True)
    lora = quantize_model(tiny_model(0), compute_dtype=torch.float32)
    attach_lora(lora, r=4, alpha=8)
    assert any(k.endswith("base.weight.data") for k in lora.state_dict())
    assert len(lora_parameters(lora)) > 0
