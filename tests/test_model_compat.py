"""Loading and templating edge cases, each checked against transformers on a tiny model or tokenizer."""
import json

import pytest
import torch

from reflectevo.model import load_model
from reflectevo.model.tokenizer import Tokenizer
from test_model import write_tiny_tokenizer
from gguf_writer import write_tiny_gguf

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=320, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)


def save_tiny(tmp_path, cfg):
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()
    hf.save_pretrained(tmp_path)
    write_tiny_tokenizer(tmp_path)
    return hf


@pytest.mark.parametrize("bias", ["attention_bias", "mlp_bias"])
def test_llama_with_biases_matches_transformers(tmp_path, bias):
    hf = save_tiny(tmp_path, transformers.LlamaConfig(**TINY, **{bias: True}))
    ours, _ = load_model(tmp_path, dtype="float32")
    ids = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max().item() <= 1e-4


# Mistral-v0.3 style: tool declarations are rendered only when `tools is not none`
TOOLS_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
                  "{% if tools is not none and loop.last %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}"
                  "[INST] {{ m['content'] }}[/INST]{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
                  "{% if documents is not none %}[DOCS]{% endif %}")
MESSAGES = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
            {"role": "user", "content": "again"}]


def test_chat_template_sees_tools_and_documents_as_none(tmp_path):
    write_tiny_tokenizer(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg.update(chat_template=TOOLS_TEMPLATE, bos_token="<|endoftext|>")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ours = Tokenizer.from_dir(tmp_path)
    assert ours.apply_chat_template(MESSAGES) == hf.apply_chat_template(MESSAGES, tokenize=False,
                                                                          add_generation_prompt=True)
    tools = [{"type": "function", "function": {"name": "add", "parameters": {}}}]
    assert ours.apply_chat_template(MESSAGES, tools=tools) == hf.apply_chat_template(
        MESSAGES, tools=tools, tokenize=False, add_generation_prompt=True)


def test_chat_template_jinja_file_wins_over_tokenizer_config(tmp_path):
    write_tiny_tokenizer(tmp_path)  # tokenizer_config.json holds a ChatML template
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}"
                                                  "{% endfor %}", encoding="utf-8")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ours = Tokenizer.from_dir(tmp_path)
    assert ours.apply_chat_template(MESSAGES) == hf.apply_chat_template(MESSAGES, tokenize=False,
                                                                          add_generation_prompt=True)


def write_llama_gguf(path, hf, extra_tensors=()):
    """A float32 llama-architecture GGUF of ``hf`` laid out as llama.cpp's converter writes it."""
    write_tiny_gguf(path, hf, "llama", permute_qk=True, extra_tensors=extra_tensors)


def test_llama31_gguf_uses_its_rope_freqs_tensor(tmp_path):
    """llama.cpp stores Llama-3.1 RoPE scaling as per-frequency divisors in a rope_freqs.weight tensor."""
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
    cfg = transformers.LlamaConfig(**TINY, rope_scaling=scaling)
    cfg.rope_parameters.update(scaling)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).float().eval()
    inv_freq = hf.model.rotary_emb.inv_freq.float()
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    plain = 1.0 / (cfg.rope_parameters["rope_theta"] ** (torch.arange(0, head_dim, 2).float() / head_dim))
    factors = plain / inv_freq
    assert not torch.allclose(factors, torch.ones_like(factors))  # the scaling changes some frequencies
    write_llama_gguf(tmp_path / "tiny.gguf", hf, [("rope_freqs.weight", factors)])
    ours, _ = load_model(tmp_path / "tiny.gguf", dtype="float32")
    ids = torch.randint(0, 320, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max().item() <= 1e-4
    with pytest.raises(ValueError, match="rope_freqs"):  # no transformers config.json can carry the factors
        ours.config.to_hf()


def test_unindexed_model_safetensors_ignores_other_safetensors_files(tmp_path):
    """Mistral repositories ship consolidated.safetensors (another naming) next to the transformers weights."""
    from safetensors.torch import save_file

    hf = save_tiny(tmp_path, transformers.MistralConfig(**TINY))
    save_file({"layers.0.attention.wq.weight": torch.zeros(64, 64)}, str(tmp_path / "consolidated.safetensors"))
    ours, _ = load_model(tmp_path, dtype="float32")
    ids = torch.randint(0, 320, (1, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max().item() <= 1e-4
