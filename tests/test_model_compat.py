"""Loading and templating edge cases, each checked against transformers on a tiny model or tokenizer."""
import json

import pytest
import torch

from reflectevo.model import load_model
from reflectevo.model.tokenizer import Tokenizer
from test_model import write_tiny_tokenizer

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
