"""PEFT's rank_pattern / alpha_pattern: per-module r and lora_alpha read as PEFT reads them (first matching key, a
regex over the whole module name or a dotted ending of it), written by save_adapter when the adapters' ranks or
alphas differ, and the other adapter_config keys either honoured or refused. PEFT is the oracle throughout."""
import json
import math
import warnings

import pytest
import torch

from reflectevo.errors import ModelLoadError
from reflectevo.model import lora as lora_mod
from reflectevo.model.lora import attach_lora, has_lora, lora_modules
from reflectevo.model.peft_io import export_merged, load_adapter, save_adapter
from test_lora import IDS, _ours_from_hf_dir, _randomise_lora, _tiny_hf
from test_peft_config_edges import _edit_config, _peft_adapter

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
# first matching key wins (layer 0's q_proj: 2, the other q_proj: 8); full names, dotted endings, anchored regexes
RANKS = {"layers.0.self_attn.q_proj": 2, "q_proj": 8, "model.layers.1.mlp.down_proj": 3,
         r"^model\.layers\.0\.self_attn\.(k|v)_proj": 6, "lm_head": 5}
ALPHAS = {"v_proj": 32, "layers.1.self_attn.o_proj": 3, r"layers\.\d\.mlp\.up_proj": 1.5, "q_proj": 4}


def _peft_module_hparams(pm):
    """{our module path: (r, scaling)} of a PEFT model's LoRA layers."""
    out = {}
    for name, m in pm.named_modules():
        if hasattr(m, "lora_A") and "default" in getattr(m, "r", {}):
            path = name.removeprefix("base_model.model.").removeprefix("model.")
            out[path] = (m.r["default"], m.scaling["default"])
    return out


def _assert_same_layers(ours, pm):
    want = _peft_module_hparams(pm)
    got = {n: (m.r, m.scaling) for n, m in lora_modules(ours).items()}
    assert got.keys() == want.keys()
    for n in want:
        assert got[n][0] == want[n][0], n
        assert math.isclose(got[n][1], want[n][1], rel_tol=1e-12), n


@pytest.mark.parametrize("rslora", [False, True])
def test_rank_and_alpha_patterns_load_with_peft_logits(tmp_path, monkeypatch, rslora):
    d, adapter, ref = _peft_adapter(tmp_path, r=4, lora_alpha=8, target_modules=ALL, rank_pattern=RANKS,
                                    alpha_pattern=ALPHAS, use_rslora=rslora)
    pm = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(d).float(), adapter).eval()
    ours = _ours_from_hf_dir(d)
    load_adapter(ours, adapter)
    _assert_same_layers(ours, pm)
    mods = lora_modules(ours)
    assert mods["layers.0.self_attn.q_proj"].r == 2 and mods["layers.1.self_attn.q_proj"].r == 8
    assert mods["layers.0.self_attn.k_proj"].r == 6 and mods["layers.1.self_attn.k_proj"].r == 4
    assert mods["layers.1.mlp.down_proj"].r == 3 and mods["lm_head"].r == 5
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS), ref, rtol=0, atol=1e-5)  # merged compute (fp32 CPU, no grad)
        assert all(m._merged is not None for m in mods.values())  # W + s B A, as the sampler computes
        monkeypatch.setattr(lora_mod, "MERGED_COMPUTE", False)
        torch.testing.assert_close(ours(IDS), ref, rtol=0, atol=1e-5)  # base + s · B A layer by layer
    merged = transformers.AutoModelForCausalLM.from_pretrained(export_merged(ours, tmp_path / "merged"),
                                                               dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS).logits, ref, rtol=0, atol=1e-5)


def test_patterns_checked_against_an_attached_model_per_module(tmp_path):
    """Adapters already attached keep their modules: each must have the r and scale the file gives it."""
    d, adapter, ref = _peft_adapter(tmp_path, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                    rank_pattern={"v_proj": 2}, alpha_pattern={"layers.1.self_attn.q_proj": 2})
    same = _ours_from_hf_dir(d)
    attach_lora(same, r=4, alpha=8, target_modules=("q_proj", "v_proj"),
                ranks={"layers.0.self_attn.v_proj": 2, "layers.1.self_attn.v_proj": 2},
                alphas={"layers.1.self_attn.q_proj": 2})
    load_adapter(same, adapter)
    with torch.no_grad():
        torch.testing.assert_close(same(IDS), ref, rtol=0, atol=1e-5)
    uniform = _ours_from_hf_dir(d)
    attach_lora(uniform, r=4, alpha=8, target_modules=("q_proj", "v_proj"))
    with pytest.raises(ModelLoadError, match=r"adapter_config\.json: r=2 for layers\.0\.self_attn\.v_proj, rank_"
                                             r"pattern 'v_proj'.* has r=4") as e:
        load_adapter(uniform, adapter)
    assert "\n" not in str(e.value)
    alpha_only = _ours_from_hf_dir(d)
    attach_lora(alpha_only, r=4, alpha=8, target_modules=("q_proj", "v_proj"),
                ranks={"layers.0.self_attn.v_proj": 2, "layers.1.self_attn.v_proj": 2})
    with pytest.raises(ModelLoadError, match=r"lora_alpha=2.*layers\.1\.self_attn\.q_proj has scale 2"):
        load_adapter(alpha_only, adapter)


@pytest.mark.parametrize("rslora", [False, True])
def test_mixed_ranks_save_as_patterns_peft_reads_back(tmp_path, rslora):
    hf, d = _tiny_hf(tmp_path)
    ours = _ours_from_hf_dir(d)
    ranks = {"layers.0.self_attn.q_proj": 8, "layers.1.self_attn.q_proj": 2,  # q_proj: no rank shared by all
             "layers.0.self_attn.v_proj": 6, "layers.1.self_attn.v_proj": 6, "lm_head": 3}
    alphas = {"layers.1.mlp.down_proj": 32, "layers.0.mlp.down_proj": 32, "layers.0.self_attn.q_proj": 1.5}
    attach_lora(ours, r=4, alpha=8, target_modules=("q_proj", "v_proj", "o_proj", "down_proj", "lm_head"),
                use_rslora=rslora, ranks=ranks, alphas=alphas)
    _randomise_lora(ours)
    save_adapter(ours, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["use_rslora"]) == (4, 8, rslora)
    assert cfg["rank_pattern"] == {"layers.0.self_attn.q_proj": 8, "layers.1.self_attn.q_proj": 2, "v_proj": 6,
                                   "lm_head": 3}
    assert cfg["alpha_pattern"] == {"layers.0.self_attn.q_proj": 1.5, "down_proj": 32}
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # PEFT warns about pattern keys that match nothing
        pm = peft.PeftModel.from_pretrained(hf, tmp_path / "a").eval()
    _assert_same_layers(ours, pm)
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS), pm(IDS).logits, rtol=0, atol=1e-5)
    back = _ours_from_hf_dir(d)
    load_adapter(back, tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(back(IDS), ours(IDS), rtol=0, atol=0)


def test_save_refuses_adapters_with_different_dropout(tmp_path):
    hf, d = _tiny_hf(tmp_path)
    ours = _ours_from_hf_dir(d)
    attach_lora(ours, r=4, alpha=8, dropout=0.1, target_modules=("q_proj",))
    ours.layers[1].self_attn.q_proj.dropout_p = 0.2
    with pytest.raises(ValueError, match=r"layers\.1\.self_attn\.q_proj.*dropout"):
        save_adapter(ours, tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_pattern_that_matches_no_module_is_ignored_as_peft_does(tmp_path):
    d, adapter, ref = _peft_adapter(tmp_path, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                    rank_pattern={"v_proj": 2})
    # "self_attn" is part of every name but no dotted ending; "k_proj" has no adapter here
    _edit_config(adapter, rank_pattern={"self_attn": 16, "v_proj": 2}, alpha_pattern={"k_proj": 64})
    pm = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(d).float(), adapter).eval()
    ours = _ours_from_hf_dir(d)
    with pytest.warns(RuntimeWarning, match=r"adapter_config\.json: rank_pattern key 'self_attn' matches no"):
        load_adapter(ours, adapter)
    _assert_same_layers(ours, pm)
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS), ref, rtol=0, atol=1e-5)
        torch.testing.assert_close(ours(IDS), pm(IDS).logits, rtol=0, atol=1e-5)


def test_weights_of_another_rank_than_the_pattern_are_a_one_line_error(tmp_path):
    d, adapter, _ = _peft_adapter(tmp_path, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                  rank_pattern={"q_proj": 8})
    _edit_config(adapter, rank_pattern={"layers.1.self_attn.q_proj": 8})  # layer 0's q_proj now r=4, weights r=8
    ours = _ours_from_hf_dir(d)
    with pytest.raises(ModelLoadError, match=r"adapter_model\.safetensors: .*layers\.0\.self_attn\.q_proj\.lora_"
                                             r"[AB]\.weight' has shape .*, the model expects .* for layers\.0\.self_"
                                             r"attn\.q_proj \(r=4") as e:
        load_adapter(ours, adapter)
    assert "\n" not in str(e.value) and str(adapter) in str(e.value)
    assert not has_lora(ours)


@pytest.mark.parametrize("key, value, where", [
    ("rank_pattern", {"q_proj(": 4}, r"rank_pattern key 'q_proj\(' is not a valid regular expression"),
    ("rank_pattern", {"(?i)q_proj": 4}, r"rank_pattern key '\(\?i\)q_proj' is not a valid regular expression"),
    ("rank_pattern", {"q_proj": 0}, r"rank_pattern\['q_proj'\]=0 must be a positive integer"),
    ("rank_pattern", {"q_proj": 2.5}, r"rank_pattern\['q_proj'\]=2.5 must be a positive integer"),
    ("alpha_pattern", {"q_proj": "big"}, r"alpha_pattern\['q_proj'\]=\"big\" is not a finite number"),
    ("alpha_pattern", [1, 2], r"alpha_pattern must be an object"),
])
def test_malformed_patterns_name_the_file_and_key(tmp_path, key, value, where):
    d, adapter, _ = _peft_adapter(tmp_path, r=4, lora_alpha=8, target_modules=["q_proj"])
    _edit_config(adapter, **{key: value})
    ours = _ours_from_hf_dir(d)
    with pytest.raises(ModelLoadError, match=r"adapter_config\.json: " + where) as e:
        load_adapter(ours, adapter)
    assert "\n" not in str(e.value) and not has_lora(ours)


def test_fan_in_fan_out_is_a_no_op_on_linear_layers_as_in_peft(tmp_path):
    """PEFT turns fan_in_fan_out off for nn.Linear targets (Llama has no Conv1D): the adapter loads as usual."""
    d, adapter, ref = _peft_adapter(tmp_path, r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    _edit_config(adapter, fan_in_fan_out=True)
    with pytest.warns(UserWarning, match="fan_in_fan_out"):
        pm = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(d).float(), adapter)
    ours = _ours_from_hf_dir(d)
    load_adapter(ours, adapter)
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS), pm.eval()(IDS).logits, rtol=0, atol=1e-5)
        torch.testing.assert_close(ours(IDS), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("key, value", [
    ("modules_to_save", ["lm_head"]), ("lora_bias", True), ("target_parameters", ["mlp.experts.gate_up_proj"]),
    ("trainable_token_indices", [3, 5]), ("init_lora_weights", "olora"), ("init_lora_weights", "corda"),
    ("init_lora_weights", "loftq"), ("init_lora_weights", "pissa_niter_4"), ("use_bdlora", {"nblocks": 2}),
    ("arrow_config", {"top_k": 2}), ("kasa_config", {"beta": 1}), ("velora_config", {"rank": 2}),
    ("monteclora_config", {"n": 2})])
def test_other_forward_changing_keys_are_refused_naming_the_key(tmp_path, key, value):
    d, adapter, _ = _peft_adapter(tmp_path, r=4, lora_alpha=8, target_modules=["q_proj"])
    _edit_config(adapter, **{key: value})
    ours = _ours_from_hf_dir(d)
    with pytest.raises(ModelLoadError, match=rf"adapter_config\.json: {key}") as e:
        load_adapter(ours, adapter)
    assert "\n" not in str(e.value) and not has_lora(ours)
