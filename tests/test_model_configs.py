"""Config and tokenizer metadata read as transformers / llama.cpp read them, and what we refuse to guess."""
import json

import pytest
import torch

from reflectevo.errors import ModelLoadError
from reflectevo.model import ModelConfig, load_model
from reflectevo.model.gguf_loader import config_from_gguf
from reflectevo.model.tokenizer import Tokenizer
from test_model import write_tiny_tokenizer

TINY = dict(vocab_size=320, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)


def hf_config(arch, **kw):
    return {"architectures": [arch], **TINY, **kw}


def test_missing_keys_take_the_architecture_defaults():
    mistral = ModelConfig.from_hf(hf_config("MistralForCausalLM"))
    assert mistral.sliding_window == 4096
    assert ModelConfig.from_hf(hf_config("MistralForCausalLM", sliding_window=None)).sliding_window is None
    qwen = ModelConfig.from_hf(hf_config("Qwen2ForCausalLM", use_sliding_window=True, sliding_window=8))
    assert qwen.max_window_layers == 28
    assert [qwen.window_for_layer(i) for i in range(2)] == [None, None]


def test_attention_bias_follows_the_architecture():
    assert ModelConfig.from_hf(hf_config("Qwen2ForCausalLM", attention_bias=False)).attention_bias
    assert not ModelConfig.from_hf(hf_config("MistralForCausalLM", attention_bias=True)).attention_bias
    assert ModelConfig.from_hf(hf_config("LlamaForCausalLM", attention_bias=True)).attention_bias


def test_other_activation_is_refused():
    with pytest.raises(ModelLoadError, match=r"cfg\.json: hidden_act 'gelu'"):
        ModelConfig.from_hf(hf_config("LlamaForCausalLM", hidden_act="gelu"), source="cfg.json")
    assert ModelConfig.from_hf(hf_config("LlamaForCausalLM", hidden_act="silu")).hidden_size == 64


def _gguf_fields(**extra):
    base = {"general.architecture": "llama", "llama.attention.head_count": 4, "llama.embedding_length": 64,
            "llama.feed_forward_length": 112, "llama.block_count": 2, "llama.vocab_size": 320}
    return {**base, **extra}


def test_gguf_rope_scaling_of_unknown_type_is_refused():
    names = {"output.weight"}
    with pytest.raises(ModelLoadError, match=r"m\.gguf: RoPE scaling 'longrope'"):
        config_from_gguf(_gguf_fields(**{"llama.rope.scaling.type": "longrope", "llama.rope.scaling.factor": 4.0}),
                         names, "m.gguf")
    linear = config_from_gguf(_gguf_fields(**{"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 2.0}),
                              names, "m.gguf")
    assert linear.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert config_from_gguf(_gguf_fields(), names, "m.gguf").rope_scaling is None


def _tokenizer_fields(**extra):
    tokens = ["a", "b", "ab", "<|eot_id|>", "<|end_of_text|>", "<|eom_id|>", "<|begin_of_text|>"]
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type":
            [1, 1, 1, 3, 3, 3, 3], "tokenizer.ggml.merges": ["a b"], "tokenizer.ggml.pre": "llama-bpe",
            "tokenizer.ggml.bos_token_id": 6, "tokenizer.ggml.eos_token_id": 3, **extra}


def test_gguf_unknown_pre_tokenizer_is_refused():
    with pytest.raises(ModelLoadError, match="pre-tokenizer 'tekken'"):
        Tokenizer.from_gguf_fields(_tokenizer_fields(**{"tokenizer.ggml.pre": "tekken"}))


def test_gguf_end_of_generation_tokens():
    tok = Tokenizer.from_gguf_fields(_tokenizer_fields())
    assert tok.eos_token_ids[0] == 3
    assert sorted(tok.eos_token_ids) == [3, 4, 5]   # eot (the eos here), end_of_text, eom; not the BOS
    assert tok.encode("ab", add_special_tokens=False) == [2]


def test_special_tokens_map_fills_what_tokenizer_config_lacks(tmp_path):
    transformers = pytest.importorskip("transformers")
    write_tiny_tokenizer(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    for k in ("bos_token", "eos_token"):
        cfg.pop(k, None)
    cfg["chat_template"] = "{{ bos_token }}{% for m in messages %}[{{ m['content'] }}]{{ eos_token }}{% endfor %}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<|im_start|>",
                                                                  "eos_token": "<|im_end|>"}))
    ours = Tokenizer.from_dir(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    messages = [{"role": "user", "content": "hi"}]
    assert ours.apply_chat_template(messages, add_generation_prompt=False) == hf.apply_chat_template(
        messages, tokenize=False)
    assert ours.bos_token_id == hf.bos_token_id
    assert hf.eos_token_id in ours.eos_token_ids


def test_generation_block_renders_its_body(tmp_path):
    write_tiny_tokenizer(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg["chat_template"] = ("{% for m in messages %}{% if m['role'] == 'assistant' %}{% generation %}"
                            "{{ m['content'] }}!{% endgeneration %}{% else %}{{ m['content'] }}:{% endif %}"
                            "{% endfor %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = Tokenizer.from_dir(tmp_path)
    text = tok.apply_chat_template([{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
                                   add_generation_prompt=False)
    assert text == "Q:A!"


def test_qwen2_without_max_window_layers_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Qwen2Config(**TINY, use_sliding_window=True, sliding_window=4)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()
    hf.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw.pop("max_window_layers", None)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    write_tiny_tokenizer(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").float().eval()
    ours, _ = load_model(tmp_path, dtype="float32")
    ids = torch.randint(0, 320, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max().item() <= 1e-4
