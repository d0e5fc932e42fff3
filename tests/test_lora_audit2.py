"""QLoRA layer audit (2): adapters loaded into a model in eval mode run without dropout; a failed adapter load
leaves the model as it was; malformed adapter files are one-line errors naming the file; PEFT's bias="all" /
"lora_only" adapters without trained biases load (PEFT as the oracle)."""
import json

import pytest
import torch

from reflectevo.errors import ModelLoadError
from reflectevo.model.lora import attach_lora, has_lora, lora_modules
from reflectevo.model.peft_io import load_adapter
from test_lora import IDS, _ours_from_hf_dir
from test_peft_config_edges import _edit_config, _peft_adapter

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def test_adapter_loaded_into_an_eval_model_runs_without_dropout(tmp_path):
    """New LoRA layers take the mode of the layer they wrap: an adapter with lora_dropout loaded into a model in eval
    mode (load_model's, or after .eval()) gave other logits on every call, none of them PEFT's."""
    d, adapter, ref = _peft_adapter(tmp_path, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                    lora_dropout=0.3)
    ours = _ours_from_hf_dir(d)  # in eval mode
    load_adapter(ours, adapter)
    assert not any(m.training for m in lora_modules(ours).values())
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS), ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ours(IDS), ref, rtol=1e-4, atol=1e-4)
    ours.train()  # and training mode still turns the adapter's dropout on
    torch.manual_seed(0)
    with torch.no_grad():
        assert not torch.allclose(ours(IDS), ref, atol=1e-4)
    fresh = _ours_from_hf_dir(d).train()
    attach_lora(fresh, r=4, alpha=8, dropout=0.3)
    assert all(m.training for m in lora_modules(fresh).values())


def test_failed_adapter_load_leaves_the_model_untouched(tmp_path):
    """An adapter refused after its LoRA layers were attached left them in place: the model's parameters frozen and
    the next, valid adapter refused (``r=4 but the model's adapter ... has r=8``)."""
    d, adapter, ref = _peft_adapter(tmp_path, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in adapter.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    _edit_config(bad, r=8)  # the weights have r = 4: a shape error found after attaching
    ours = _ours_from_hf_dir(d)
    flags = [p.requires_grad for p in ours.parameters()]
    with torch.no_grad():
        before = ours(IDS)
    with pytest.raises(ModelLoadError, match=r"q_proj\.lora_A\.weight.*shape"):
        load_adapter(ours, bad)
    assert not has_lora(ours)
    assert [p.requires_grad for p in ours.parameters()] == flags
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS), before, rtol=0, atol=0)
    load_adapter(ours, adapter)
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS), ref, rtol=1e-4, atol=1e-4)


def test_adapter_config_without_r_takes_peft_default(tmp_path):
    d, adapter, ref = _peft_adapter(tmp_path, r=8, lora_alpha=16, target_modules=["q_proj"])
    path = adapter / "adapter_config.json"
    cfg = json.loads(path.read_text())
    del cfg["r"]
    path.write_text(json.dumps(cfg))
    assert peft.PeftConfig.from_pretrained(adapter).r == 8  # PEFT reads it as its default
    ours = _ours_from_hf_dir(d)
    load_adapter(ours, adapter)
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS), ref, rtol=1e-4, atol=1e-4)


def _truncate(adapter):
    f = adapter / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:200])


def _garbage_bin(adapter):
    (adapter / "adapter_model.safetensors").unlink()
    (adapter / "adapter_model.bin").write_bytes(b"not a pickle at all")


@pytest.mark.parametrize("name, change, where", [
    ("json list", lambda a: (a / "adapter_config.json").write_text("[1, 2]"), "adapter_config.json"),
    ("r text", lambda a: _edit_config(a, r="four"), "adapter_config.json: r"),
    ("r zero", lambda a: _edit_config(a, r=0), "adapter_config.json: r"),
    ("alpha null", lambda a: _edit_config(a, lora_alpha=None), "adapter_config.json: lora_alpha"),
    ("alpha nan", lambda a: _edit_config(a, lora_alpha=float("nan")), "adapter_config.json: lora_alpha"),
    ("dropout 1.5", lambda a: _edit_config(a, lora_dropout=1.5), "adapter_config.json: lora_dropout"),
    ("truncated weights", _truncate, "adapter_model.safetensors"),
    ("unreadable .bin", _garbage_bin, "adapter_model.bin"),
])
def test_malformed_adapter_files_are_one_line_errors_naming_the_file(tmp_path, name, change, where):
    """Each was a bare KeyError / ValueError / TypeError / ZeroDivisionError / SafetensorError / UnpicklingError
    (a traceback from ``reflectevo eval --adapter``), not the one-line error naming the file the contract asks for."""
    d, adapter, _ = _peft_adapter(tmp_path, r=4, lora_alpha=8, target_modules=["q_proj"])
    change(adapter)
    ours = _ours_from_hf_dir(d)
    with pytest.raises(ModelLoadError, match=where) as e:
        load_adapter(ours, adapter)
    assert "\n" not in str(e.value) and str(adapter) in str(e.value)
    assert not has_lora(ours)


@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_bias_setting_without_trained_biases_loads(tmp_path, bias):
    """PEFT's bias="lora_only" / "all" on a model without linear biases (Llama) saves a plain LoRA adapter, which
    PEFT loads as such; it was refused for the config value alone."""
    d, adapter, ref = _peft_adapter(tmp_path, r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], bias=bias)
    ours = _ours_from_hf_dir(d)
    load_adapter(ours, adapter)
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS), ref, rtol=1e-4, atol=1e-4)


def test_adapter_with_trained_biases_is_refused_naming_the_key(tmp_path):
    """Qwen2 has q/k/v biases: with bias="all" PEFT saves them (trained base biases), which we do not load."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    hf = transformers.Qwen2ForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    pm = peft.get_peft_model(hf, peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj"],
                                                 bias="all"))
    pm.save_pretrained(tmp_path / "adapter")
    ours = _ours_from_hf_dir(tmp_path / "hf")
    with pytest.raises(ModelLoadError, match=r"bias='all'.*layers\.0\.self_attn\.\w_proj\.(base_layer\.)?bias") as e:
        load_adapter(ours, tmp_path / "adapter")
    assert "\n" not in str(e.value) and not has_lora(ours)


def test_errors_about_a_bin_adapter_name_the_bin_file(tmp_path):
    from safetensors.torch import load_file

    d, adapter, _ = _peft_adapter(tmp_path, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    key = next(iter(weights))
    weights[key] = weights[key][:, :-1].clone()  # another shape
    torch.save(weights, adapter / "adapter_model.bin")
    (adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"adapter_model\.bin: .*" + key.split(".")[-3]):
        load_adapter(_ours_from_hf_dir(d), adapter)


def test_list_targets_match_dotted_endings_as_peft():
    from reflectevo.model import ModelConfig, Transformer

    def tiny_model():
        return Transformer(ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                                       num_heads=4, num_kv_heads=2, max_position_embeddings=64))

    model = tiny_model()
    attach_lora(model, r=2, target_modules=["self_attn.q_proj", "mlp.down_proj", "0.self_attn.v_proj"])
    names = sorted(lora_modules(model))
    n = model.config.num_layers
    assert len(names) == 2 * n + 1 and "layers.0.self_attn.v_proj" in names
    assert all(x.endswith(("q_proj", "down_proj")) for x in names if x != "layers.0.self_attn.v_proj")
    with pytest.raises(ValueError):
        attach_lora(tiny_model(), r=2, target_modules=["elf_attn.q_proj"])  # an ending, not any substring
